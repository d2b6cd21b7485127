"""Distributed tuning on a real Dask cluster: a scheduler and two workers started as separate processes on
loopback. The search gives the same scores and the same model as in this process, and its fits ran on both
workers; the train stage does the same from `train.backend: dask` + `train.dask_scheduler` alone."""
import json
import subprocess
import time

import pandas as pd
import pytest

from conftest import BIN, TINY, copy_project, run
from mlops_nb.core import write_parquet
from mlops_nb.data import encode_target, split_stratified, synthetic_churn
from mlops_nb.loadtest import free_port
from mlops_nb.scale import search_backend
from mlops_nb.train import tune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    "The address of a Dask scheduler with two single-threaded workers, each its own process."
    logs = tmp_path_factory.mktemp("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    cmds = [[str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]]
    cmds += [[str(BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
              "--name", f"w{i}"] for i in range(2)]
    procs = []
    for i, cmd in enumerate(cmds):
        procs.append(subprocess.Popen(cmd, stdout=open(logs / f"{i}.log", "w"), stderr=subprocess.STDOUT))
        if i == 0: time.sleep(1)
    try:
        from dask.distributed import Client
        with Client(address, timeout="60s") as client: client.wait_for_workers(2, timeout=90)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
            try: p.wait(30)
            except subprocess.TimeoutExpired: p.kill(); p.wait(10)


def training_frame(n=900, seed=4):
    df = encode_target(synthetic_churn(n, seed=seed).drop(columns="rownames"), "churn", "Yes")
    return split_stratified(df, "churn", 0.25, seed)[0]


def test_search_on_the_cluster_matches_local_and_uses_both_workers(scheduler):
    from dask.distributed import Client, get_task_stream
    train = training_frame()
    X, y = train.drop(columns="churn"), train.churn
    local = tune("logreg", X, y, n_iter=3, cv_folds=2, seed=7, progress=False)
    with Client(scheduler) as watcher, get_task_stream(client=watcher) as stream:
        with search_backend("dask", scheduler) as n_jobs:
            remote = tune("logreg", X, y, n_iter=3, cv_folds=2, seed=7, progress=False, n_jobs=n_jobs)
    assert n_jobs == -1
    assert remote.cv_results.mean_test_score.tolist() == local.cv_results.mean_test_score.tolist()
    assert remote.best_params == local.best_params
    pd.testing.assert_frame_equal(pd.DataFrame(remote.model.predict_proba(X)), pd.DataFrame(local.model.predict_proba(X)))
    workers = {t["worker"] for t in stream.data}
    assert len(stream.data) >= 6 and len(workers) == 2, (len(stream.data), workers)  # 3 candidates x 2 folds, on both


def test_train_stage_runs_its_search_on_the_scheduler_from_params(scheduler, tmp_path):
    project = copy_project(tmp_path / "project", {**TINY, "train": {**TINY["train"], "model": "logreg", "n_iter": 2,
                                                                   "backend": "dask", "dask_scheduler": scheduler}})
    train = training_frame(800, 42)
    write_parquet(project / "data" / "processed" / "train.parquet", train)
    run("mlops-nb", "stage", "train", cwd=project)
    staged = pd.read_csv(project / "reports" / "train" / "cv_results.csv")
    expected = tune("logreg", train.drop(columns="churn"), train.churn, n_iter=2, cv_folds=2, seed=42, progress=False)
    assert staged.mean_test_score.round(12).tolist() == expected.cv_results.mean_test_score.round(12).tolist()
    best = json.loads((project / "reports" / "metrics" / "train.json").read_text())["best_params"]
    assert best == pytest.approx(expected.best_params)


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    project = copy_project(tmp_path / "project", {**TINY, "train": {**TINY["train"], "backend": "dask",
                                                                   "dask_scheduler": f"tcp://127.0.0.1:{free_port()}"}})
    write_parquet(project / "data" / "processed" / "train.parquet", training_frame(300, 1))
    r = run("mlops-nb", "stage", "train", cwd=project, check=False)
    assert r.returncode != 0
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:" in r.stderr + r.stdout


def test_lightgbm_trains_across_both_workers_and_its_onnx_export_passes_parity(scheduler):
    "`train.model: lgbm_dask`: one LightGBM fit across the workers (its tasks on both), scoring like LightGBM trained here; ONNX parity passes."
    from dask.distributed import Client, get_task_stream
    from sklearn.metrics import roc_auc_score
    from mlops_nb.export import export_onnx
    df = encode_target(synthetic_churn(4000, seed=11).drop(columns="rownames"), "churn", "Yes")
    train, test = split_stratified(df, "churn", 0.25, 11)
    X, y, X_test = train.drop(columns="churn"), train.churn, test.drop(columns="churn")
    local = tune("lgbm", X, y, n_iter=1, cv_folds=2, seed=3, progress=False)
    with Client(scheduler) as watcher, get_task_stream(client=watcher) as stream:
        with search_backend("dask", scheduler):   # the client in use is the trainer's cluster
            remote = tune("lgbm_dask", X, y, cv_folds=2, seed=3, progress=False)
    trained = {t["worker"] for t in stream.data if "_xy" in str(t["key"]) or "train_part" in str(t["key"])}
    assert len(trained) == 2, [t["key"] for t in stream.data]
    auc = {name: roc_auc_score(test.churn, m.model.predict_proba(X_test)[:, 1]) for name, m in (("local", local), ("dask", remote))}
    assert auc["dask"] > 0.7 and abs(auc["dask"] - auc["local"]) < 0.05, auc
    assert 0.6 < remote.best_score < 1 and type(remote.model[-1]).__name__ == "LGBMClassifier"
    exported = export_onnx(remote.model, X_test)
    assert exported.usable, exported.report
    assert exported.report["parity"]["test"]["label_mismatches"] == 0 and exported.report["parity"]["probes"]["passed"], exported.report
