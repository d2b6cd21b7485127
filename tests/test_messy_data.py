"""Messy real data, one test per case: odd column names, datetime columns, free text and high-cardinality columns,
booleans and integer-coded categoricals, a target with missing values, a class rarer than the CV folds. Each
checks the message `mlops-nb init` prints, or what the model and the schema do with the column."""
import numpy as np
import pandas as pd
import pytest

from mlops_nb.core import load_yaml
from mlops_nb.data import DataError, encode_target
from mlops_nb.init import plan_init
from mlops_nb.pipeline import set_params_text
from mlops_nb.schema import infer_schema, parse_schema, schema_to_yaml, validate
from mlops_nb.train import MAX_CATEGORIES, TrainingError, build_model, tune

N = 120
rng = np.random.default_rng(0)


def frame(**extra):
    "A small labelled frame: one informative numeric, one categorical, a binary label, plus `extra` columns."
    x = rng.normal(size=N)
    base = {"x": x, "plan": np.where(np.arange(N) % 2, "basic", "pro"), "label": np.where(x + rng.normal(0, .5, N) > 0, "yes", "no")}
    return pd.DataFrame(base | extra)


def test_odd_column_names_are_kept_verbatim_everywhere():
    names = {"Monthly Spend": rng.gamma(2, 30, N), "Plan.Type": np.where(np.arange(N) % 3, "A", "B"), "Région": np.where(np.arange(N) % 2, "Nord", "Süd"), "ÄGE": rng.integers(18, 90, N)}
    df = frame(**names)
    plan = plan_init(df, "label")
    # the schema keeps the names exactly, and validates the same frame without an anomaly
    schema = parse_schema(plan.schema_yaml, "schema.yaml")
    assert set(names) <= set(schema.columns)
    assert validate(df, schema).ok
    # params.yaml holds them as slice columns and reads them back unchanged
    text = set_params_text("evaluate:\n  slice_columns: []  # slices\n", {"evaluate.slice_columns": list(names)})
    assert load_yaml(text)["evaluate"]["slice_columns"] == list(names)
    # the model trains on them and answers for the same names
    X, y = df.drop(columns="label"), df.label
    model = build_model("logreg", X).fit(X, y)
    assert list(model.feature_names_in_) == list(X.columns)
    assert {"Plan.Type_A", "Région_Süd"} <= set(model[0].get_feature_names_out())


def test_datetime_columns_are_dropped_and_said_so():
    df = frame(signup=pd.date_range("2023-01-01", periods=N, freq="D").strftime("%Y-%m-%d"),
               seen=pd.date_range("2023-01-01", periods=N, freq="h"))
    plan = plan_init(df, "label")
    assert plan.updates["data.drop_columns"] == ["signup", "seen"]
    assert "column 'signup': datetime, dropped (data.drop_columns; prepare.split: time can split by it) [dates]" in plan.choices
    X = df.drop(columns=["label", "signup"])
    model = build_model("logreg", X).fit(X, df.label)   # a datetime that still reaches the model is no feature
    assert not any(n.startswith("seen") for n in model[0].get_feature_names_out())


def test_free_text_is_dropped_and_high_cardinality_is_capped():
    words = np.array(["late", "refund", "great", "broken", "slow", "support", "price", "thanks"])
    df = frame(review=[" ".join(rng.choice(words, 6)) + f" order {i}" for i in range(N)],
               city=[f"city{i % 90}" for i in range(N)])
    plan = plan_init(df, "label")
    assert "review" in plan.updates["data.drop_columns"] and "city" not in plan.updates["data.drop_columns"]
    assert any(c.startswith("column 'review': free text, dropped") for c in plan.choices)
    assert "column 'city': high-cardinality categorical, one-hot encoded into at most 20 columns [90 distinct values]" in plan.choices
    X = df.drop(columns=["label", "review"])
    encoded = build_model("logreg", X).fit(X, df.label)[0].get_feature_names_out()
    assert sum(n.startswith("city_") for n in encoded) <= MAX_CATEGORIES   # not 90 columns


def test_booleans_and_integer_codes_are_categories():
    flag = np.arange(N) % 4 == 0
    df = frame(vip=flag, opted_in=pd.Series(np.where(np.arange(N) % 5 == 0, None, flag), dtype=object), region=np.arange(N) % 4 + 1)
    plan = plan_init(df, "label")
    assert plan.updates["train.categorical_columns"] == ["region"]
    assert "column 'vip': boolean, a category [true/false]" in plan.choices
    assert "column 'region': integer-coded categorical, one-hot encoded (train.categorical_columns) [4 integer codes]" in plan.choices
    X = df.drop(columns="label")
    model = build_model("hgb", X, categorical=plan.updates["train.categorical_columns"]).fit(X, df.label)
    names = set(model[0].get_feature_names_out())
    assert {"region_1", "region_2", "region_3", "region_4", "vip_True", "opted_in_True"} <= names
    assert np.isfinite(model.predict_proba(X)).all()


def test_a_target_with_missing_values_loses_those_rows_counted():
    df = frame()
    df.loc[df.index % 8 == 0, "label"] = None
    plan = plan_init(df, "label")
    assert "target 'label': 15 row(s) without a label will be dropped by prepare" in plan.choices
    assert len(encode_target(df, "label", "yes")) == N - 15
    schema = infer_schema(df)
    assert schema.columns["label"].max_null_fraction >= 15 / N   # the batch with its gaps is valid


def test_a_class_rarer_than_the_folds_is_a_clear_error():
    df = frame()
    df.loc[:1, "label"] = "maybe"   # two rows
    with pytest.raises(DataError, match="class 'maybe' of the target has 2 rows, fewer than the 3 train.cv_folds needs"):
        plan_init(df, "label")
    X, y = df.drop(columns="label"), df.label
    with pytest.raises(DataError, match="class 'maybe' of the target has 2 rows, fewer than the 5 train.cv_folds needs"):
        tune("logreg", X, y, n_iter=1, cv_folds=5, progress=False, task="multiclass")
