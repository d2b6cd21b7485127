"""The prediction service against a real uvicorn process (`mlops-nb serve`) on the loopback interface: answers equal
the model's own predict_proba, bad input is a 4xx naming field and record, metrics parse, every answered record
is logged, a champion switch under load fails no request, the canary share is respected."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import BIN, ROOT, metric, records_of
from mlops_nb.loadtest import ServiceProcess

NAME = "churn-classifier"


def fit(seed: int, C: float):
    "A small fitted Pipeline, its training frame X (label dropped)."
    from mlops_nb.data import encode_target, synthetic_churn
    from mlops_nb.train import build_model
    df = encode_target(synthetic_churn(400, seed=seed).drop(columns="rownames"), "churn", "Yes")
    X, y = df.drop(columns="churn"), df.churn
    model = build_model("logreg", X, seed).set_params(classifier__C=C).fit(X, y)
    return model, X


def register(root: Path, model, X, alias_only: str | None = None) -> str:
    "Register `model` in the tracking store at `root`; promote it unless `alias_only` names another alias."
    from mlops_nb.registry import _client, _promote, pipeline_run, register_model, use_project_tracking
    use_project_tracking(root)
    with pipeline_run(run_name="test-serve"):
        reg = register_model(model, X.head(5), NAME, blessed=alias_only is None, tags={"data_hash": "hash-" + str(len(X))},
                             extra_files=[root / "schema.yaml", root / "gate.json"])
    if alias_only: _client().set_registered_model_alias(NAME, alias_only, reg["version"])
    else: _promote(NAME, reg["version"])
    return reg["version"]


class Server(ServiceProcess):
    "`mlops-nb serve` in a project folder, on a free loopback port; always terminated."
    def __init__(self, project: Path, *args, env: dict | None = None):
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", **(env or {})}
        super().__init__([str(BIN / "mlops-nb"), "serve", "--host", "127.0.0.1", "--port", "{port}", *args], "/ready",
                         env=env, cwd=project, log=project / f"server-{time.monotonic_ns()}.log", timeout=90)
        self.project = project

    def post(self, body, **kw):
        if isinstance(body, (bytes, str)): return httpx.post(self.url + "/predict", content=body, timeout=30, **kw)
        return httpx.post(self.url + "/predict", json=body, timeout=30, **kw)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A project folder with params.yaml, a tracking store and version 1 of the model as champion."
    root = tmp_path_factory.mktemp("serve")
    for name in ("params.yaml", "schema.yaml"): shutil.copy2(ROOT / name, root / name)
    (root / "gate.json").write_text('{"blessed": true}')
    model, X = fit(1, 1.0)
    register(root, model, X)
    return root, model, X


@pytest.fixture(scope="module")
def server(project):
    root, _, _ = project
    s = Server(root, "--log-dir", str(root / "log-main"), "--poll-seconds", "0")
    yield s
    s.stop()


def test_single_and_list_answers_equal_the_models_own(server, project):
    _, model, X = project
    recs = records_of(X.iloc[:5])
    one = server.post(recs[0])
    assert one.status_code == 200, one.text
    body = one.json()
    assert (body["model_name"], body["model_version"], body["variant"], body["classes"]) == (NAME, "1", "champion", [0, 1])
    assert body["request_id"] and one.headers["x-request-id"] == body["request_id"]
    np.testing.assert_allclose(body["probabilities"], model.predict_proba(X.iloc[:1]), rtol=0, atol=1e-12)
    many = server.post(recs).json()
    np.testing.assert_allclose(many["probabilities"], model.predict_proba(X.iloc[:5]), rtol=0, atol=1e-12)
    assert many["predictions"] == model.predict(X.iloc[:5]).tolist()
    # the client's request id is kept
    assert server.post(recs[0], headers={"x-request-id": "abc-1"}).json()["request_id"] == "abc-1"
    for unfit in (b"a" * 10_000, b"caf\xe9"):   # too long, not ASCII: the service uses an id of its own, and says which
        r = server.post(recs[0], headers={"x-request-id": unfit})
        assert r.status_code == 200 and len(r.json()["request_id"]) == 32 and r.headers["x-request-id"] == r.json()["request_id"]


def test_null_allowed_where_the_schema_allows_it(server, project):
    _, model, X = project
    rec = {**records_of(X.iloc[:1])[0], "total_charges": None}
    r = server.post(rec)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["probabilities"], model.predict_proba(X.iloc[:1].assign(total_charges=np.nan)), atol=1e-12)


def _good(project) -> dict:
    return records_of(project[2].iloc[:1])[0]


BAD = {  # name: (body builder, expected status, expected (record, field) of the first error, problem fragment)
    "missing field": (lambda g: [g, {k: v for k, v in g.items() if k != "tenure"}], 422, (1, "tenure"), "missing"),
    "wrong type": (lambda g: {**g, "tenure": "abc"}, 422, (0, "tenure"), "expected int, got str"),
    "fraction for int": (lambda g: {**g, "tenure": 2.5}, 422, (0, "tenure"), "fraction"),
    "bool for number": (lambda g: {**g, "monthly_charges": True}, 422, (0, "monthly_charges"), "got bool"),
    "unknown category": (lambda g: [g, g, {**g, "contract": "Weekly"}], 422, (2, "contract"), "unknown category"),
    "null not allowed": (lambda g: {**g, "contract": None}, 422, (0, "contract"), "null"),
    "NaN": (lambda g: json.dumps({**g, "monthly_charges": float("nan")}), 422, (0, "monthly_charges"), "finite"),
    "Infinity": (lambda g: json.dumps([g, {**g, "total_charges": float("-inf")}]), 422, (1, "total_charges"), "finite"),
    "unknown field": (lambda g: {**g, "customer_id": "x" * 1000}, 422, (0, "customer_id"), "not an input"),
    "label sent": (lambda g: {**g, "churn": 1}, 422, (0, "churn"), "not an input"),
    "not an object": (lambda g: [g, 42], 422, (1, None), "expected an object"),
    "empty list": (lambda g: [], 422, (None, None), "empty list"),
    "scalar body": (lambda g: "3", 422, (None, None), "got int"),
    "not JSON": (lambda g: b"{'tenure': 3", 400, (None, None), "not JSON"),
    "too many records": (lambda g: [g] * 1001, 413, (None, None), "max_records"),
    "body too large": (lambda g: b"[" + b" " * 1_100_000 + b"]", 413, (None, None), "max_body_bytes"),
}


def test_a_body_sent_in_pieces_is_read_whole_and_measured_as_it_comes(server, project):
    "Chunked transfer, no Content-Length: the service joins the pieces, and refuses a body that grows past max_body_bytes."
    _, model, X = project
    body = json.dumps(records_of(X.iloc[:200])).encode()
    pieces = lambda b, n: (b[i:i + n] for i in range(0, len(b), n))
    r = httpx.post(server.url + "/predict", content=pieces(body, 7_000), timeout=30)
    assert "content-length" not in r.request.headers and r.status_code == 200, r.text[:300]
    np.testing.assert_allclose(r.json()["probabilities"], model.predict_proba(X.iloc[:200]), rtol=0, atol=1e-12)
    huge = b"[" + b" " * 1_100_000 + b"]"   # over the default max_body_bytes (1 MB), never declared
    r = httpx.post(server.url + "/predict", content=pieces(huge, 64_000), timeout=30)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["errors"][0]["problem"], r.text[:300]


def test_a_client_that_hangs_up_mid_body_is_counted_as_499_not_a_failure(server, project):
    import socket
    by_status = lambda: {k: metric(server.url, "mlops_requests", status=k) for k in ("499", "500")}
    before = by_status()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:   # 1,000 bytes declared, 10 sent, then gone
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{\"tenure\"")
        time.sleep(0.3)
    for _ in range(100):   # counted once the service notices the hang-up
        after = by_status()
        if after["499"] > before["499"]: break
        time.sleep(0.05)
    assert after["499"] == before["499"] + 1 and after["500"] == before["500"], (before, after)
    assert server.post(_good(project)).status_code == 200   # and the service answers the next client as ever


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_naming_record_and_field(server, project, case):
    build, status, (record, field), fragment = BAD[case]
    r = server.post(build(_good(project)))
    assert r.status_code == status, (r.status_code, r.text[:500])
    errors = r.json()["errors"]
    assert (errors[0]["record"], errors[0]["field"]) == (record, field), errors
    assert fragment in errors[0]["problem"], errors
    assert len(r.content) < 5000                       # never echoes the body
    for e in errors: assert len(json.dumps(e.get("value"))) < 100


def test_all_errors_at_once(server, project):
    g = _good(project)
    r = server.post([{**g, "tenure": "a"}, g, {**g, "contract": "Weekly", "female": "no"}])
    assert r.status_code == 422
    assert [(e["record"], e["field"]) for e in r.json()["errors"]] == [(0, "tenure"), (2, "female"), (2, "contract")]


def test_concurrent_requests_each_get_their_own_answer(server, project):
    _, model, X = project
    recs = records_of(X.iloc[:160])
    expected = model.predict_proba(X.iloc[:160])
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: client.post(server.url + "/predict", json=r), recs))
    assert all(a.status_code == 200 for a in answers)
    np.testing.assert_allclose(np.vstack([a.json()["probabilities"] for a in answers]), expected, atol=1e-12)
    assert len({a.json()["request_id"] for a in answers}) == len(recs)


def test_health_ready_metadata(server, project):
    _, _, X = project
    assert httpx.get(server.url + "/health").json() == {"status": "alive"}
    assert httpx.get(server.url + "/ready").json()["model_version"] == "1"
    meta = httpx.get(server.url + "/metadata").json()
    assert (meta["name"], meta["version"], meta["alias"], meta["data_hash"]) == (NAME, "1", "champion", f"hash-{len(X)}")
    assert [f["name"] for f in meta["input_schema"]] == list(X.columns)
    contract = next(f for f in meta["input_schema"] if f["name"] == "contract")
    assert contract["domain"] == ["Month-to-month", "One year", "Two year"]
    assert server.post(meta["example"]).status_code == 200   # the example validates


def test_metrics_parse(server, project):
    server.post(_good(project))
    server.post({"tenure": "x"})
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("mlops_requests", "mlops_request_latency_seconds", "mlops_requests_in_flight", "mlops_predictions",
                 "mlops_prediction_score", "mlops_batch_size", "mlops_model_info"):
        assert name in families, name
    ok = [s for s in families["mlops_requests"].samples if s.labels.get("status") == "200" and s.name.endswith("_total")]
    assert ok and ok[0].labels["model_version"] == "1" and ok[0].labels["endpoint"] == "/predict"
    assert any(s.labels.get("status") == "422" for s in families["mlops_requests"].samples)
    buckets = [s for s in families["mlops_request_latency_seconds"].samples if s.name.endswith("_bucket") and s.labels["status"] == "200"]
    assert buckets and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value >= 1
    assert sum(s.value for s in families["mlops_predictions"].samples) >= 1


def _wait_for(pred, seconds=30.0, step=0.2):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred(): return True
        time.sleep(step)
    return False


@pytest.mark.slow
def test_champion_switch_under_load_fails_nothing_and_log_holds_every_answer(project, tmp_path):
    from mlops_nb.loadtest import loadtest
    from mlops_nb.predlog import read_prediction_log
    root, model1, X = project
    log_dir = tmp_path / "log"
    s = Server(root, "--log-dir", str(log_dir), "--poll-seconds", "0.3")
    try:
        before = s.post(records_of(X.iloc[:1])[0]).json()["model_version"]
        model2, _ = fit(2, 0.01)            # another model: other probabilities
        totals, stop = {"ok": 0, "errors": 0, "rounds": 0}, threading.Event()
        def drive():                        # load in 1.5 s rounds until told to stop (at most 40 rounds)
            while not stop.is_set() and totals["rounds"] < 40:
                r = loadtest(s.url + "/predict", X, concurrency=4, seconds=1.5)
                totals["ok"] += r["ok"]; totals["errors"] += r["errors"]; totals["rounds"] += 1
        t = threading.Thread(target=drive)
        t.start()
        try:
            time.sleep(1.0)
            v2 = register(root, model2, X)  # moves `champion` while the load runs
            switched = _wait_for(lambda: httpx.get(s.url + "/ready").json()["model_version"] == v2, 60)
            time.sleep(1.5)                 # keep the load on after the switch
        finally:
            stop.set()
            t.join(60)
        assert switched and not t.is_alive()
        assert totals["errors"] == 0 and totals["ok"] > 0, totals
        result = totals
        r = s.post(records_of(X.iloc[:3]))
        assert r.json()["model_version"] == v2 != before
        np.testing.assert_allclose(r.json()["probabilities"], model2.predict_proba(X.iloc[:3]), atol=1e-12)
        answered = result["ok"] + 3 + 1
        meta = httpx.get(s.url + "/metadata").json()
        assert meta["version"] == v2
        versions_served = {smp.labels["model_version"] for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)
                           if f.name == "mlops_requests" for smp in f.samples if smp.labels.get("status") == "200"}
        assert {before, v2} <= versions_served, versions_served
        # `mlops-nb rollback` gives `champion` back to the previous version; the running service follows it
        rb = subprocess.run([str(BIN / "mlops-nb"), "rollback"], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
        assert rb.returncode == 0 and f"champion: {before}" in rb.stdout, rb.stderr
        assert _wait_for(lambda: httpx.get(s.url + "/ready").json()["model_version"] == before, 60)
    finally:
        s.stop()
    # the log: one row per answered record, with the version that answered
    log = read_prediction_log(log_dir)
    assert len(log) == answered, (len(log), answered)
    assert set(log.model_version) == {before, v2}
    assert log.request_id.nunique() == answered - 2      # the 3-record request has one id
    assert list(log.columns[:7]) == ["ts", "request_id", "record", "variant", "model_name", "model_version", "prediction"]
    assert set(X.columns) <= set(log.columns)


@pytest.mark.slow
def test_canary_share_is_roughly_respected(tmp_path, project):
    root0, _, X = project
    root = tmp_path / "canary"
    root.mkdir()
    for name in ("params.yaml", "schema.yaml", "gate.json"): shutil.copy2(root0 / name, root / name)
    m1, _ = fit(1, 1.0)
    m2, _ = fit(3, 0.1)
    register(root, m1, X)
    v_ch = register(root, m2, X, alias_only="challenger")
    s = Server(root, "--log-dir", "", "--challenger-share", "0.3", "--poll-seconds", "0")
    try:
        recs = records_of(X.iloc[:400])
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
            answers = [a.json() for a in pool.map(lambda r: client.post(s.url + "/predict", json=r), recs)]
        share = sum(a["variant"] == "challenger" for a in answers) / len(answers)
        assert 0.2 <= share <= 0.4, share               # binomial sd 0.023: 4 sd either way
        for a, rec_i in zip(answers, range(len(recs))):
            assert a["model_version"] == (v_ch if a["variant"] == "challenger" else "1")
        ch = [i for i, a in enumerate(answers) if a["variant"] == "challenger"]
        np.testing.assert_allclose(np.vstack([answers[i]["probabilities"] for i in ch]), m2.predict_proba(X.iloc[ch]), atol=1e-12)
        meta = httpx.get(s.url + "/metadata").json()
        assert meta["challenger"]["version"] == v_ch and meta["challenger_share"] == 0.3
        variants = {smp.labels["variant"] for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)
                    if f.name == "mlops_predictions" for smp in f.samples}
        assert variants == {"champion", "challenger"}
    finally:
        s.stop()
