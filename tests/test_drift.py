"""Drift detection: known injected drift is found, nothing else is, scores match independent implementations."""
import json
import math
import os
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy import stats

from mlops_nb.core import MlopsError, ValidateParams
from mlops_nb.drift import DriftReport, Profile, detect_drift, plot_drift, plot_drifted, profile, synthetic_features
from mlops_nb.schema import infer_schema

FEATURES = [f"num_{j:02d}" for j in range(10)] + [f"cat_{j:02d}" for j in range(10)]


@pytest.fixture(scope="module")
def reference():
    df = synthetic_features(20_000, seed=100)
    return df, profile(df)


@pytest.mark.parametrize("seed", range(5))
def test_finds_exactly_the_injected_drift(reference, seed):
    _, prof = reference
    rng = np.random.default_rng(seed)
    drifted = sorted(rng.choice(FEATURES, size=3, replace=False).tolist())
    batch = synthetic_features(20_000, seed=seed, drift_in=drifted)
    report = detect_drift(prof, batch, ValidateParams())
    assert sorted(report.drifted) == drifted
    assert report.retrain
    assert all(f.psi is not None for f in report.features)             # scores always reported
    numeric = [f for f in report.features if f.name.startswith("num")]
    assert all(f.ks is not None and f.ks_pvalue is not None for f in numeric)
    categorical = [f for f in report.features if f.name.startswith("cat")]
    assert all(f.chi2_pvalue is not None and f.linf is not None for f in categorical)


@pytest.mark.parametrize("seed", range(5))
def test_no_drift_no_flags(reference, seed):
    _, prof = reference
    report = detect_drift(prof, synthetic_features(20_000, seed=seed))
    assert report.drifted == [] and not report.retrain


def test_min_drifted_controls_retrain(reference):
    _, prof = reference
    batch = synthetic_features(5_000, seed=7, drift_in=["num_02", "cat_05"])
    assert detect_drift(prof, batch, ValidateParams(min_drifted=2)).retrain
    assert not detect_drift(prof, batch, ValidateParams(min_drifted=3)).retrain


def test_scores_match_independent_implementations(reference):
    ref, prof = reference
    batch = synthetic_features(20_000, seed=9, drift_in=["num_00", "cat_01"])
    by = {f.name: f for f in detect_drift(prof, batch).features}
    # KS on continuous features: scipy's exact two-sample statistic on the raw samples; the sketch is within 1/200
    for col in ["num_00", "num_01", "num_02", "num_03"]:
        a, b = ref[col].dropna(), batch[col].dropna()
        assert by[col].ks == pytest.approx(stats.ks_2samp(a, b).statistic, abs=0.006)
    # PSI with decile bins computed directly by pandas
    a, b = ref["num_00"], batch["num_00"]
    edges = np.quantile(a, np.linspace(0, 1, 11))[1:-1]
    bins = [-np.inf, *edges, np.inf]
    p = pd.cut(a, bins).value_counts(normalize=True, sort=False).to_numpy()
    q = pd.cut(b, bins).value_counts(normalize=True, sort=False).to_numpy()
    assert by["num_00"].psi == pytest.approx(np.sum((q - p) * np.log(q / p)), rel=1e-6)
    # chi-square and L-infinity from the raw categorical counts
    ca, cb = ref["cat_01"].value_counts(), batch["cat_01"].value_counts()
    table = pd.concat([ca, cb], axis=1).fillna(0).to_numpy().T
    assert by["cat_01"].chi2 == pytest.approx(stats.chi2_contingency(table, correction=False)[0], rel=1e-6)
    linf = (ca / ca.sum()).sub(cb / cb.sum(), fill_value=0).abs().max()
    assert by["cat_01"].linf == pytest.approx(linf, abs=1e-12)


def test_million_rows_are_not_all_flagged():
    rng = np.random.default_rng(0)
    n = 1_000_000
    ref = pd.DataFrame({"x": rng.normal(0, 1, n), "c": rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])})
    new = pd.DataFrame({"x": rng.normal(0.02, 1, n), "c": rng.choice(["a", "b", "c"], n, p=[0.49, 0.31, 0.2])})
    report = detect_drift(profile(ref), new)
    assert report.drifted == []
    assert all((f.ks_pvalue if f.kind == "numeric" else f.chi2_pvalue) < 1e-6 for f in report.features)


def test_profile_round_trips_through_json(reference):
    ref, prof = reference
    back = Profile.from_dict(json.loads(json.dumps(prof.to_dict(), allow_nan=False)))
    assert back == prof
    batch = synthetic_features(3_000, seed=4, drift_in=["num_03"])
    assert detect_drift(back, batch).to_dict() == detect_drift(prof, batch).to_dict()


def test_schema_guides_the_profile():
    df = synthetic_features(2_000, seed=1).assign(id=np.arange(2_000), code=np.arange(2_000) % 4)
    s = infer_schema(df, key="id")
    prof = profile(df, schema=s)
    assert "id" not in prof.features and prof.skipped["id"]
    assert prof.features["code"].kind == "numeric"
    assert profile(df.astype({"code": str})).features["code"].kind == "categorical"


def test_report_frame_dict_and_plots(reference, tmp_path):
    _, prof = reference
    batch = synthetic_features(2_000, seed=3, drift_in=["num_04", "cat_02"])
    report = detect_drift(prof, batch)
    frame = report.to_frame()
    assert list(frame.index) == FEATURES and frame.loc["num_04", "drifted"]
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["drifted"] == report.drifted and d["retrain"] is True
    figs = plot_drifted(report, prof, batch)
    assert sorted(figs) == ["cat_02", "num_04"]
    for name, fig in figs.items():
        fig.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    plot_drift(report, prof, batch, "num_01")   # a feature that did not drift can be drawn too
    with pytest.raises(MlopsError): plot_drift(report, prof, batch, "nope")


# ---------------------------------------------------------------- property-based

names = st.one_of(st.text(max_size=6), st.sampled_from(["", "0", "null", "a b", "é", "x"]))


def columns(n):
    atoms = st.one_of(st.none(), st.just(float("nan")), st.integers(-10**20, 10**20), st.floats(),
                      st.text(max_size=4), st.booleans(), st.just(pd.Timestamp("2024-01-01")), st.just(b"b"),
                      st.just((1, 2)))
    return st.one_of(
        st.lists(st.integers(-2**63, 2**63 - 1), min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype="int64")),
        st.lists(st.floats(), min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype="float64")),
        st.lists(st.booleans(), min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype=bool)),
        st.lists(st.sampled_from(["a", "b", "c"]) | st.none(), min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype=object)),
        st.lists(st.text(max_size=3), min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype="category")),
        st.lists(st.integers(-10**18, 10**18) | st.none(), min_size=n, max_size=n).map(lambda v: pd.Series(pd.to_datetime(v, unit="ns"))),
        st.lists(atoms, min_size=n, max_size=n).map(lambda v: pd.Series(v, dtype=object)),
    )


@st.composite
def frames(draw, labels=None):
    n = draw(st.integers(0, 15))
    k = draw(st.integers(0, 4))
    cols = [draw(columns(n)) for _ in range(k)]
    df = pd.concat(cols, axis=1, ignore_index=True) if cols else pd.DataFrame(index=range(n))
    if cols: df.columns = [draw(st.sampled_from(labels) | names) if labels else draw(names) for _ in range(k)]
    return df


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_drift_never_crashes(data):
    ref = data.draw(frames())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no silent NaN arithmetic either
        prof = profile(ref, bins=data.draw(st.integers(1, 12)), grid=data.draw(st.integers(1, 300)))
        prof = Profile.from_dict(json.loads(json.dumps(prof.to_dict(), allow_nan=False)))
        batch = data.draw(frames(labels=list(prof.features) or None))
        report = detect_drift(prof, batch, ValidateParams())
    json.dumps(report.to_dict(), allow_nan=False)
    assert [f.name for f in report.features] == list(prof.features)
    for f in report.features:
        for v in (f.psi, f.ks, f.linf):
            assert v is None or (math.isfinite(v) and v >= -1e-12)
        for v in (f.ks_pvalue, f.chi2_pvalue):
            assert v is None or 0 <= v <= 1
        # the documented rule, from the scores: an effect above its threshold, and significant
        t = ValidateParams()
        if f.psi is None: expected = False
        else:
            size, bound, p = (f.ks, t.ks, f.ks_pvalue) if f.kind == "numeric" else (f.linf, t.linf, f.chi2_pvalue)
            expected = (f.psi > t.psi or size > bound) and p < t.chi2_pvalue
        assert f.drifted is expected, f
    assert report.retrain is (len(report.drifted) >= ValidateParams().min_drifted)


def test_bad_inputs_raise_mlops_errors(reference):
    _, prof = reference
    with pytest.raises(MlopsError): profile([1, 2, 3])
    with pytest.raises(MlopsError): detect_drift(prof, [1, 2])
    with pytest.raises(MlopsError): Profile.from_dict({"nope": 1})


# ---------------------------------------------------------------- agreement with deepchecks

def test_agrees_with_deepchecks_feature_drift():
    os.environ.setdefault("DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY", "true")
    tabular = pytest.importorskip("deepchecks.tabular")
    from deepchecks.tabular.checks import FeatureDrift
    injected = ["num_01", "num_03", "cat_02", "cat_06"]
    ref = synthetic_features(4_000, seed=11)
    new = synthetic_features(4_000, seed=12, drift_in=injected)
    cats = [c for c in ref if c.startswith("cat")]
    params = ValidateParams()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = FeatureDrift(numerical_drift_method="KS", categorical_drift_method="PSI", n_samples=None
                              ).run(tabular.Dataset(ref, cat_features=cats), tabular.Dataset(new, cat_features=cats))
    scores = {c: v["Drift score"] for c, v in result.value.items()}
    theirs = sorted(c for c, v in scores.items() if v > (params.psi if c in cats else params.ks))
    ours = detect_drift(profile(ref), new, params)
    assert theirs == sorted(injected)
    assert sorted(ours.drifted) == theirs
    by = {f.name: f for f in ours.features}
    for c in ref.columns:
        if c not in cats: assert by[c].ks == pytest.approx(scores[c], abs=0.01)


def _joint(n: int, seed: int, decoupled: bool = False) -> pd.DataFrame:
    "The synthetic features with num_01 tied to num_00 (r about 0.8); decoupled: num_01 shuffled, its marginal kept."
    df = synthetic_features(n, seed=seed)
    rng = np.random.default_rng(seed)
    df["num_01"] = 0.8 * (df.num_00 - df.num_00.mean()) / df.num_00.std() + 0.6 * rng.normal(size=n)
    if decoupled: df["num_01"] = rng.permutation(df.num_01.to_numpy())
    return df


def test_multivariate_drift_sees_a_decoupled_pair_no_marginal_shows():
    from mlops_nb.drift import fit_multivariate, multivariate_drift
    ref = fit_multivariate(_joint(20_000, 1), _joint(2_000, 2))
    assert all(c.startswith("num_") for c in ref.columns) and len(ref.errors) == 2_000
    for n, seed in ((500, 3), (200_000, 4)):                                  # plain traffic, small and large: quiet
        assert not multivariate_drift(ref, _joint(n, seed))["drifted"]
    moved = _joint(5_000, 5, decoupled=True)
    assert detect_drift(profile(_joint(20_000, 1)), moved).drifted == []     # every feature's own scores: quiet
    verdict = multivariate_drift(ref, moved)
    assert verdict["drifted"] and verdict["score"] > verdict["threshold"] > verdict["reference"], verdict
