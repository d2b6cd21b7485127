"""Batch prediction through the real command: `mlops-nb predict` scores a file in chunks with the champion of a real
MLflow registry (or a pinned version), writes the output atomically, logs the rows like the service's traffic, and
refuses schema skew with the column named, writing and logging nothing; its answers are the service's."""
import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import BIN, ROOT, records_of
from mlops_nb.predlog import read_prediction_log
from test_serve import NAME, Server, fit, register
from test_serve_faults import new_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A project whose registry holds version 1 (champion) and version 2 (no alias) of two different models."
    root = new_project(tmp_path_factory.mktemp("predict"))
    champion, X = fit(1, 1.0)
    other, _ = fit(2, 0.01)
    register(root, champion, X)
    register(root, other, X, alias_only="candidate")
    return root, {"1": champion, "2": other}


def predict(root, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(BIN / "mlops-nb"), "predict", *args], cwd=root, capture_output=True, text=True, env=env, timeout=600)


def batch(n: int, seed: int) -> pd.DataFrame:
    "Synthetic input rows that fit the schema (its null rates and ranges hold for the whole table, not for a few rows)."
    from mlops_nb.data import synthetic_churn
    from mlops_nb.schema import load_schema
    df = synthetic_churn(n, seed=seed).drop(columns="churn")
    for c, spec in load_schema(ROOT / "schema.yaml").columns.items():
        if c in df and spec.type in ("int", "float"): df[c] = df[c].fillna(df[c].median()).clip(spec.min, spec.max)
    return df


def test_the_champion_scores_every_chunk_and_the_log_holds_them(project, tmp_path):
    root, models = project
    df = batch(450, seed=5)
    df.to_csv(tmp_path / "in.csv", index=False)
    r = predict(root, "--data", str(tmp_path / "in.csv"), "--out", str(tmp_path / "out.parquet"), "--key", "rownames",
                "--chunk-rows", "100", "--log-dir", str(tmp_path / "log"))
    assert r.returncode == 0, r.stderr
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out.rownames.tolist() == df.rownames.tolist() and set(out.model_version) == {"1"}
    X = df.drop(columns="rownames")
    np.testing.assert_allclose(out[["proba_0", "proba_1"]].to_numpy(), models["1"].predict_proba(X), atol=1e-12)
    assert out.prediction.tolist() == models["1"].predict(X).tolist()
    log = read_prediction_log(tmp_path / "log")
    assert len(log) == 450 and set(log.variant) == {"batch"} and log.tenure.tolist() == df.tenure.tolist()
    report = json.loads((tmp_path / "out.parquet.report.json").read_text())
    assert report["rows"] == 450 and report["model_version"] == "1"


def test_a_pinned_version_answers_instead_of_the_champion(project, tmp_path):
    root, models = project
    df = batch(50, seed=6)
    df.to_parquet(tmp_path / "in.parquet")
    r = predict(root, "--data", str(tmp_path / "in.parquet"), "--out", str(tmp_path / "out.csv"), "--model", f"models:/{NAME}/2", "--no-log")
    assert r.returncode == 0, r.stderr
    out = pd.read_csv(tmp_path / "out.csv")
    assert out.row.tolist() == list(range(50)) and set(out.model_version) == {2}
    np.testing.assert_allclose(out[["proba_0", "proba_1"]].to_numpy(), models["2"].predict_proba(df.drop(columns="rownames")), atol=1e-9)
    assert not (root / "logs").exists()


def test_schema_skew_is_refused_naming_the_column_and_nothing_is_written(project, tmp_path):
    root, _ = project
    df = batch(300, seed=7)
    df.loc[250:260, "contract"] = "Weekly"           # 3.7% unknown: beyond the schema's 1%, in the last chunk only
    df.to_csv(tmp_path / "bad.csv", index=False)
    (tmp_path / "out.parquet").write_bytes(b"the previous output")
    r = predict(root, "--data", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "out.parquet"), "--chunk-rows", "100",
                "--log-dir", str(tmp_path / "log"))
    assert r.returncode == 1 and "contract" in r.stderr and "Weekly" in r.stderr and "nothing was scored" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "out.parquet").read_bytes() == b"the previous output"
    assert not (tmp_path / "out.parquet.report.json").exists()
    assert read_prediction_log(tmp_path / "log").empty
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "log") == ["bad.csv", "out.parquet"]   # no temporary file left


def test_a_failing_chunk_logs_nothing_and_its_retry_logs_each_row_once(project, tmp_path):
    root, _ = project
    df = batch(300, seed=8)
    df.insert(0, "customer", [str(i) if i < 150 else f"C{i}" for i in range(300)])   # numeric in chunk 1, alphanumeric from row 150
    df.to_csv(tmp_path / "in.csv", index=False)
    (tmp_path / "out.parquet").write_bytes(b"the previous output")
    args = ("--out", str(tmp_path / "out.parquet"), "--key", "customer", "--chunk-rows", "100", "--log-dir", str(tmp_path / "log"))
    r = predict(root, "--data", str(tmp_path / "in.csv"), *args)
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]   # the rest is the progress bar
    assert r.returncode == 1 and len(errors) == 1 and errors[0].startswith("error: chunk 2 (rows 100-199) failed"), r.stderr
    assert "column 'customer'" in errors[0] and "ArrowInvalid" not in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert read_prediction_log(tmp_path / "log").empty and (tmp_path / "out.parquet").read_bytes() == b"the previous output"
    df.assign(customer="C" + df.customer.str.lstrip("C")).to_csv(tmp_path / "fixed.csv", index=False)
    r = predict(root, "--data", str(tmp_path / "fixed.csv"), *args)
    assert r.returncode == 0, r.stderr
    log = read_prediction_log(tmp_path / "log")
    assert len(log) == 300 and log.record.tolist() == list(range(300)) and log.request_id.nunique() == 1
    assert pd.read_parquet(tmp_path / "out.parquet").customer.tolist() == [f"C{i}" for i in range(300)]
    r = predict(root, "--data", str(tmp_path / "fixed.csv"), "--out", str(tmp_path / "other.csv"), "--key", "customer_id", "--no-log")
    assert r.returncode == 1 and "--key 'customer_id' is not a column of" in r.stderr and not (tmp_path / "other.csv").exists(), r.stderr


def test_batch_answers_equal_the_services(project, tmp_path):
    "Both decide with `serve.threshold` (here a tuned 0.3, not the default 0.5)."
    root, models = project
    df = batch(240, seed=8)
    df.to_parquet(tmp_path / "in.parquet")
    params = (root / "params.yaml").read_text()
    tuned = yaml.safe_load(params)
    tuned["serve"]["threshold"] = 0.3
    (root / "params.yaml").write_text(yaml.safe_dump(tuned, sort_keys=False))
    try:
        r = predict(root, "--data", str(tmp_path / "in.parquet"), "--out", str(tmp_path / "out.parquet"), "--chunk-rows", "64", "--no-log")
        s = Server(root, "--log-dir", "", "--poll-seconds", "0")
        try: answer = s.post(records_of(df.drop(columns="rownames"))).json()
        finally: s.stop()
    finally: (root / "params.yaml").write_text(params)   # the other tests see the default threshold
    assert r.returncode == 0, r.stderr
    out = pd.read_parquet(tmp_path / "out.parquet")
    proba = models["1"].predict_proba(df.drop(columns="rownames"))[:, 1]
    assert out.prediction.tolist() == (proba >= 0.3).astype(int).tolist() != models["1"].predict(df.drop(columns="rownames")).tolist()
    assert answer["model_version"] == "1" and answer["predictions"] == out.prediction.tolist()
    np.testing.assert_allclose(out[["proba_0", "proba_1"]].to_numpy(), np.asarray(answer["probabilities"]), atol=1e-9)
