"""Fault injection against a real `mlops-nb serve` process: the registry goes away (a real `mlflow server` stopped, the
SQLite registry held under an exclusive lock), the prediction log's disk fills up, the server is SIGKILLed, a record
poisons the model inside a batch. Each test sets up its own project, registry and server."""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from conftest import BIN, ROOT, metric, records_of, skip_or_fail
from mlops_nb.loadtest import ServiceProcess, free_port
from mlops_nb.predlog import read_prediction_log
from test_serve import NAME, Server, fit, register

pytestmark = pytest.mark.slow


def new_project(tmp_path: Path, serve: dict | None = None) -> Path:
    "A project folder (params, schema) with version 1 of a small model as champion in its SQLite registry."
    root = tmp_path / "project"
    root.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["serve"].update(serve or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy2(ROOT / "schema.yaml", root / "schema.yaml")
    (root / "gate.json").write_text('{"blessed": true}')
    return root


class Traffic:
    "Requests sent without pause from `clients` threads until stopped; every status is recorded."
    def __init__(self, url: str, records: list[dict], clients: int = 2):
        self.url, self.records, self.statuses, self.answered = url, records, [], 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        for t in self._threads: t.start()

    def _run(self, i: int):
        with httpx.Client(timeout=30) as client:
            k = i
            while not self._stop.is_set():
                r = client.post(self.url + "/predict", json=self.records[k % len(self.records)])
                self.statuses.append(r.status_code)
                if r.status_code == 200: self.answered += 1
                k += 2

    def stop(self) -> list[int]:
        self._stop.set()
        for t in self._threads: t.join(60)
        return self.statuses


def wait_for(pred, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred(): return True
        time.sleep(0.1)
    return False


# -- the registry goes away ---------------------------------------------------------------------------------------

def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    "A real tracking server on loopback, its store in `root`; returns once it answers."
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                             "--default-artifact-root", str(root / "server-artifacts")],
                            cwd=root, stdout=open(root / f"mlflow-server-{port}.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    if not wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), 240):   # slow on a loaded CI machine
        stop_process_group(proc)
        skip_or_fail(f"mlflow server did not start: {(root / f'mlflow-server-{port}.log').read_text()[-2000:]}")
    return proc


def _answers(url: str) -> bool:
    try: return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError: return False


def stop_process_group(proc: subprocess.Popen):
    "Stop `proc` and the workers it started (it leads its own process group)."
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)


def test_tracking_server_outage_keeps_the_loaded_version_serving(tmp_path, monkeypatch):
    root = new_project(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_server = start_mlflow_server(root, port)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        model, X = fit(1, 1.0)
        register(root, model, X)
        env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
        s = Server(root, "--log-dir", "", "--poll-seconds", "0.5", env=env)
        try:
            traffic = Traffic(s.url, records_of(X.iloc[:50]))
            time.sleep(0.5)
            stop_process_group(mlflow_server)        # the outage: longer than two poll intervals
            assert wait_for(lambda: metric(s.url, "mlops_registry_errors") >= 2, 30)
            time.sleep(1.5)
            ready, meta = httpx.get(s.url + "/ready"), httpx.get(s.url + "/metadata")
            statuses = traffic.stop()
            assert ready.status_code == 200 and ready.json()["model_version"] == "1", ready.text
            assert meta.status_code == 200 and meta.json()["version"] == "1"
            assert statuses and set(statuses) == {200}, {c: statuses.count(c) for c in set(statuses)}
            assert metric(s.url, "mlops_registry_up") == 0
            mlflow_server = start_mlflow_server(root, port)   # back: the service says so
            assert wait_for(lambda: metric(s.url, "mlops_registry_up") == 1, 30)
        finally:
            s.stop()
        log = (root / next(p.name for p in root.glob("server-*.log"))).read_text()
        assert "registry unavailable" in log and "registry available again" in log, log[-2000:]
    finally:
        stop_process_group(mlflow_server)


def test_sqlite_registry_under_an_exclusive_lock_keeps_serving(tmp_path):
    root = new_project(tmp_path)
    model, X = fit(1, 1.0)
    register(root, model, X)
    s = Server(root, "--log-dir", "", "--poll-seconds", "0.3")
    try:
        traffic = Traffic(s.url, records_of(X.iloc[:50]))
        db = sqlite3.connect(root / "mlflow.db", timeout=0, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")              # what a writer holding the database looks like to readers
        try:
            assert wait_for(lambda: metric(s.url, "mlops_registry_errors") >= 1, 60)
            ready = httpx.get(s.url + "/ready")
        finally:
            db.execute("ROLLBACK"); db.close()
        statuses = traffic.stop()
        assert ready.status_code == 200 and ready.json()["model_version"] == "1", ready.text
        assert statuses and set(statuses) == {200}, {c: statuses.count(c) for c in set(statuses)}
        assert wait_for(lambda: metric(s.url, "mlops_registry_up") == 1, 30)
        # the alias still moves once the registry is back
        v2 = register(root, fit(2, 0.01)[0], X)
        assert wait_for(lambda: httpx.get(s.url + "/ready").json()["model_version"] == v2, 60)
    finally:
        s.stop()


# -- the prediction log ----------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    "A 4 MB tmpfs: a disk that can be filled up in a test (root only)."
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0: skip_or_fail("mounting a small tmpfs to fill up needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0: skip_or_fail(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> Path:
    "Fill the file system of `folder` until a write fails; return the filler file."
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True: f.write(b"\0" * 65536)
        except OSError: pass
        try:
            while True: f.write(b"\0" * 512)
        except OSError: pass
    return filler


def test_log_disk_full_mid_run_blocks_nothing_and_loses_no_row(tmp_path, small_disk):
    root = new_project(tmp_path, {"log_flush_seconds": 0.2})
    model, X = fit(1, 1.0)
    register(root, model, X)
    log_dir = small_disk / "log"
    s = Server(root, "--log-dir", str(log_dir), "--poll-seconds", "0")
    try:
        traffic = Traffic(s.url, records_of(X.iloc[:50]))
        time.sleep(0.6)
        filler = fill(small_disk)                 # the disk is full: every write of the log fails
        assert wait_for(lambda: metric(s.url, "mlops_prediction_log_write_errors") >= 2, 30)
        n_during = traffic.answered
        time.sleep(0.5)
        assert traffic.answered > n_during         # answers keep coming while the log cannot write
        filler.unlink()                            # space again
        time.sleep(0.6)
        statuses = traffic.stop()
        assert set(statuses) == {200}
        answered = traffic.answered
        assert wait_for(lambda: metric(s.url, "mlops_prediction_log_pending_rows") == 0, 30)
        dropped = metric(s.url, "mlops_prediction_log_dropped_rows")
    finally:
        s.stop()
    log = read_prediction_log(log_dir)
    assert dropped == 0
    assert len(log) == answered, (len(log), answered)
    assert log.request_id.nunique() == answered     # each answered record exactly once


def test_sigkill_after_a_flush_interval_loses_no_answered_record(tmp_path):
    root = new_project(tmp_path, {"log_flush_seconds": 0.2})
    model, X = fit(1, 1.0)
    register(root, model, X)
    log_dir = tmp_path / "log"
    s = Server(root, "--log-dir", str(log_dir), "--poll-seconds", "0")
    try:
        recs = records_of(X.iloc[:40])
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda r: client.post(s.url + "/predict", json=r), recs))
        assert all(a.status_code == 200 for a in answers)
        time.sleep(1.0)                            # longer than serve.log_flush_seconds
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(10)
    finally:
        s.stop()
    log = read_prediction_log(log_dir)
    assert sorted(log.request_id) == sorted(a.json()["request_id"] for a in answers)
    # the next start seals what the killed process left
    s2 = Server(root, "--log-dir", str(log_dir), "--poll-seconds", "0")
    s2.stop()
    assert not list(log_dir.glob("segment-*")) and len(read_prediction_log(log_dir)) == len(recs)


# -- a record that breaks the model ------------------------------------------------------------------------------

def strict_model(X):
    "A Pipeline whose one-hot encoder raises on a category it has not seen (the schema below allows any text)."
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler
    from mlops_nb.data import encode_target, synthetic_churn
    df = encode_target(synthetic_churn(400, seed=1).drop(columns="rownames"), "churn", "Yes")
    X, y = df.drop(columns="churn")[["tenure", "monthly_charges", "contract"]], df.churn
    pre = ColumnTransformer([("num", StandardScaler(), ["tenure", "monthly_charges"]),
                             ("cat", OneHotEncoder(handle_unknown="error"), ["contract"])])
    return make_pipeline(pre, LogisticRegression()).fit(X, y), X


def test_a_poisoned_record_fails_only_its_own_request(tmp_path):
    root = new_project(tmp_path)
    schema = yaml.safe_load((ROOT / "schema.yaml").read_text())
    del schema["columns"]["contract"]["domain"]    # free text: validation lets any contract through
    (root / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    model, X = strict_model(None)
    register(root, model, X)
    log_dir = tmp_path / "log"
    s = Server(root, "--log-dir", str(log_dir), "--poll-seconds", "0")
    try:
        good = records_of(X.iloc[:60])
        poisoned = [good[0], good[1], {**good[2], "contract": "Weekly"}]
        bodies = good[:30] + [poisoned] + good[30:]
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: client.post(s.url + "/predict", json=b), bodies))
        bad = answers[30]
        assert bad.status_code == 422, bad.text
        assert [(e["record"], e["field"]) for e in bad.json()["errors"]] == [(2, None)], bad.text
        assert "could not score" in bad.json()["errors"][0]["problem"]
        ok = answers[:30] + answers[31:]
        assert [a.status_code for a in ok] == [200] * 60
        np.testing.assert_allclose(np.vstack([a.json()["probabilities"] for a in ok]), model.predict_proba(X.iloc[:60]), atol=1e-12)
        alone = s.post({**good[0], "contract": "Weekly"})   # alone too: the model still scores its example, so the record is to blame
        assert alone.status_code == 422 and alone.json()["errors"][0]["record"] == 0, alone.text
    finally:
        s.stop()
    log = read_prediction_log(log_dir)
    assert sorted(log.request_id) == sorted(a.json()["request_id"] for a in ok)   # the failed request is not logged
