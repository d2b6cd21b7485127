"""The service's other front doors against real servers and a real client: the same records through `/predict`,
MLflow's `/invocations` and the Open Inference Protocol's `infer` get identical predictions; every MLflow payload
format is answered as a real `mlflow models serve` of the same version answers it (and bad payloads with the same
status codes); `tritonclient[http]`'s `InferenceServerClient` checks liveness, readiness, metadata and infers."""
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from conftest import BIN, ROOT, records_of, skip_or_fail
from mlops_nb.loadtest import ServiceProcess

NAME = "churn-classifier"
pytestmark = pytest.mark.slow   # every test here talks to a uvicorn process (and the comparison to mlflow's server)


def fit_and_register(root: Path, C: float = 1.0, alias: str = "champion"):
    "Fit a small classifier, register it in the tracking store at `root` under `alias`; the model, its frame, its version."
    from mlops_nb.data import encode_target, synthetic_churn
    from mlops_nb.registry import _client, _promote, pipeline_run, register_model, use_project_tracking
    from mlops_nb.train import build_model
    for name in ("params.yaml", "schema.yaml"): shutil.copy2(ROOT / name, root / name)
    (root / "gate.json").write_text('{"blessed": true}')
    df = encode_target(synthetic_churn(400, seed=3).drop(columns="rownames"), "churn", "Yes")
    X, y = df.drop(columns="churn"), df.churn
    model = build_model("logreg", X, 0).set_params(classifier__C=C).fit(X, y)
    use_project_tracking(root)
    with pipeline_run(run_name="test-protocols"):
        reg = register_model(model, X.head(5), NAME, blessed=True, extra_files=[root / "schema.yaml", root / "gate.json"])
    if alias == "champion": _promote(NAME, reg["version"])
    else: _client().set_registered_model_alias(NAME, alias, reg["version"])
    return model, X, reg["version"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A project folder with a tracking store and version 1 of a small classifier as champion; the records to send."
    root = tmp_path_factory.mktemp("protocols")
    model, X, version = fit_and_register(root)
    sample = X.iloc[:6].copy()
    sample.iloc[2, sample.columns.get_loc("total_charges")] = np.nan   # one null where the schema allows it
    return root, model, sample, version


def _env(root: Path) -> dict:
    uri = f"sqlite:///{root / 'mlflow.db'}"   # the registry too: a URI another test left in this process's environment is not ours
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


@pytest.fixture(scope="module")
def ours(project):
    root = project[0]
    s = ServiceProcess([str(BIN / "mlops-nb"), "serve", "--host", "127.0.0.1", "--port", "{port}", "--poll-seconds", "0",
                        "--log-dir", str(root / "log")], "/ready", env=_env(root), cwd=root, log=root / "ours.log", timeout=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def theirs(project):
    "A real `mlflow models serve` of the same version, in this environment."
    root, _, _, version = project
    s = ServiceProcess([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/{version}", "--env-manager", "local",
                        "-h", "127.0.0.1", "-p", "{port}"], "/ping", env=_env(root), cwd=root, log=root / "mlflow.log", timeout=300)
    yield s
    s.stop()


def mlflow_payloads(X: pd.DataFrame) -> dict:
    "Every input format of MLflow's scoring protocol documentation: (content type, body)."
    recs = records_of(X)
    cols = {c: [r[c] for r in recs] for c in X.columns}
    split = {"columns": list(X.columns), "data": [[r[c] for c in X.columns] for r in recs]}
    return {"dataframe_split": ("application/json", {"dataframe_split": split}),
            "dataframe_split (with index)": ("application/json", {"dataframe_split": {**split, "index": list(range(len(X)))}}),
            "dataframe_records": ("application/json", {"dataframe_records": recs}),
            "instances (records)": ("application/json", {"instances": recs}),
            "inputs (records)": ("application/json", {"inputs": recs}),
            "inputs (columns)": ("application/json", {"inputs": cols}),
            "text/csv": ("text/csv", X.to_csv(index=False).encode())}


def post(url: str, content_type: str, body) -> httpx.Response:
    import orjson
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(url + "/invocations", content=data, headers={"content-type": content_type}, timeout=60)


def v2_tensors(meta: dict, recs: list[dict]) -> list[dict]:
    return [{"name": i["name"], "datatype": i["datatype"], "shape": [len(recs)], "data": [r[i["name"]] for r in recs]} for i in meta["inputs"]]


def test_the_same_records_through_three_protocols_give_identical_predictions(ours, project):
    _, model, X, _ = project
    recs = records_of(X)
    expected = model.predict_proba(X)
    via_predict = httpx.post(ours.url + "/predict", json=recs, timeout=30).json()
    via_mlflow = post(ours.url, "application/json", {"dataframe_records": recs}).json()
    meta = httpx.get(f"{ours.url}/v2/models/{NAME}", timeout=30).json()
    r = httpx.post(f"{ours.url}/v2/models/{NAME}/infer", json={"inputs": v2_tensors(meta, recs)}, timeout=30)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    via_v2 = np.reshape(out["predict_proba"]["data"], out["predict_proba"]["shape"])
    np.testing.assert_array_equal(np.asarray(via_predict["probabilities"]), np.asarray(via_mlflow["predictions"]))
    np.testing.assert_array_equal(np.asarray(via_predict["probabilities"]), via_v2)
    np.testing.assert_allclose(via_v2, expected, rtol=0, atol=1e-12)   # and they are the model's own
    assert via_predict["predictions"] == out["predict"]["data"] == model.predict(X).tolist()
    # the MLServer pandas codec: the same tensors, marked as a frame
    r = httpx.post(f"{ours.url}/v2/models/{NAME}/versions/1/infer", json={"inputs": v2_tensors(meta, recs), "parameters": {"content_type": "pd"}}, timeout=30)
    assert r.json()["parameters"] == {"content_type": "pd"}
    np.testing.assert_array_equal(np.reshape(r.json()["outputs"][1]["data"], (len(recs), 2)), via_v2)
    # every record answered through any door is in the prediction log, and the metrics count each door
    text = httpx.get(ours.url + "/metrics", timeout=30).text
    for ep in ("/predict", "/invocations", "/v2/infer"): assert f'endpoint="{ep}",model_version="1",status="200"' in text, ep


def test_every_mlflow_payload_format_is_answered_as_mlflow_models_serve_answers(ours, theirs, project):
    _, model, X, _ = project
    for name, (ct, body) in mlflow_payloads(X).items():
        a, b = post(ours.url, ct, body), post(theirs.url, ct, body)
        assert (a.status_code, b.status_code) == (200, 200), (name, a.text[:300], b.text[:300])
        assert set(a.json()) == set(b.json()) == {"predictions"}, name
        np.testing.assert_allclose(np.asarray(a.json()["predictions"]), np.asarray(b.json()["predictions"]), rtol=0, atol=1e-12, err_msg=name)
    for path in ("/ping", "/version"):
        a, b = httpx.get(ours.url + path, timeout=30), httpx.get(theirs.url + path, timeout=30)
        assert (a.status_code, a.text.strip()) == (b.status_code, b.text.strip()), path


def bad_payloads(X: pd.DataFrame) -> dict:
    "(content type, body, the field or phrase our message must name) of payloads both servers refuse."
    recs = records_of(X.iloc[:2])
    return {"not JSON": ("application/json", b"{oops", "not JSON"),
            "no known format key": ("application/json", {"records": recs}, "exactly one of"),
            "two format keys": ("application/json", {"dataframe_records": recs, "instances": recs}, "exactly one of"),
            "a missing column": ("application/json", {"dataframe_records": [recs[0], {k: v for k, v in recs[1].items() if k != "tenure"}]},
                                 "record 1, field 'tenure': missing"),
            "text for a number": ("application/json", {"dataframe_records": [{**recs[0], "tenure": "abc"}]}, "record 0, field 'tenure'"),
            "a short split row": ("application/json", {"dataframe_split": {"columns": list(X.columns), "data": [[1, 2]]}}, "record 0"),
            "a CSV missing a column": ("text/csv", X.drop(columns="tenure").iloc[:2].to_csv(index=False).encode(), "field 'tenure'"),
            "an unsupported content type": ("application/xml", b"<a/>", "content type")}


def test_bad_payloads_get_mlflow_error_bodies_and_its_status_codes(ours, theirs, project):
    _, _, X, _ = project
    differ = []
    for name, (ct, body, named) in bad_payloads(X).items():
        a, b = post(ours.url, ct, body), post(theirs.url, ct, body)
        err, theirs_err = a.json(), (b.json() if "json" in b.headers.get("content-type", "") else {})
        # MLflow's error_code for CSV is INVALID_PARAMETER_VALUE where the same problem in JSON is BAD_REQUEST, and its 415
        # is plain text: its code is compared for JSON bodies, ours is BAD_REQUEST for every refused input
        codes = (err.get("error_code"), theirs_err.get("error_code") if ct == "application/json" else "BAD_REQUEST")
        if a.status_code != b.status_code or codes != ("BAD_REQUEST", "BAD_REQUEST") or not 400 <= a.status_code < 500:
            differ.append((name, a.status_code, err.get("error_code"), b.status_code, theirs_err.get("error_code"), b.text[:200]))
        assert "message" in err and named in err["message"], (name, err)
        assert len(a.content) < 4000, name   # the input is not echoed back whole
    assert not differ, "\n".join(map(repr, differ))


def test_stricter_than_mlflow_an_unknown_category_or_column_is_refused_and_named(ours, project):
    "Where `mlflow models serve` answers anyway (an unseen category, an extra column), this service refuses, naming it."
    _, _, X, _ = project
    rec = records_of(X.iloc[:1])[0]
    for body, named in (({"dataframe_records": [{**rec, "contract": "Weekly"}]}, "record 0, field 'contract': unknown category"),
                        ({"dataframe_records": [{**rec, "colour": "red"}]}, "record 0, field 'colour': not an input of the model")):
        r = post(ours.url, "application/json", body)
        assert (r.status_code, r.json()["error_code"]) == (400, "BAD_REQUEST") and named in r.json()["message"], r.text


def test_tritonclient_checks_health_metadata_and_infers(ours, project):
    try: import tritonclient.http as tc
    except ImportError as e: skip_or_fail(f"tritonclient[http] is not installed: {e}")
    from tritonclient.utils import InferenceServerException
    _, model, X, version = project
    client = tc.InferenceServerClient(url=ours.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, version) and not client.is_model_ready("other")
    assert client.get_server_metadata()["name"] == "mlops-nb"
    meta = client.get_model_metadata(NAME)
    assert meta["versions"] == [version] and [i["name"] for i in meta["inputs"]] == list(X.columns)
    assert [o["name"] for o in meta["outputs"]] == ["predict", "predict_proba"]
    recs = records_of(X)
    inputs = []
    for spec in meta["inputs"]:
        col = [r[spec["name"]] for r in recs]
        dtype = {"BYTES": object, "FP64": np.float64, "INT64": np.int64, "BOOL": bool}[spec["datatype"]]
        arr = np.array([np.nan if v is None else v for v in col], dtype=dtype)
        t = tc.InferInput(spec["name"], [len(recs)], spec["datatype"])
        t.set_data_from_numpy(arr, binary_data=False)
        inputs.append(t)
    outputs = [tc.InferRequestedOutput("predict", binary_data=False), tc.InferRequestedOutput("predict_proba", binary_data=False)]
    result = client.infer(NAME, inputs, model_version=version, outputs=outputs)
    np.testing.assert_allclose(result.as_numpy("predict_proba"), model.predict_proba(X), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result.as_numpy("predict"), model.predict(X))
    # a refused tensor comes back as the client's exception, naming the field (text is no int: its datatype says so already)
    bad = tc.InferInput("tenure", [1], "BYTES")
    bad.set_data_from_numpy(np.array(["abc"], dtype=object), binary_data=False)
    with pytest.raises(InferenceServerException, match="field 'tenure': datatype BYTES does not fit field type int"):
        client.infer(NAME, [bad], outputs=outputs[:1])
    client.close()


def test_tritonclient_defaults_binary_tensors_get_the_json_answers(ours, project):
    "tritonclient's defaults send every tensor as binary data and ask for binary outputs: the same answers as JSON."
    try: import tritonclient.http as tc
    except ImportError as e: skip_or_fail(f"tritonclient[http] is not installed: {e}")
    _, model, X, version = project
    client = tc.InferenceServerClient(url=ours.url.removeprefix("http://"))
    recs = records_of(X)
    inputs = []
    for spec in client.get_model_metadata(NAME)["inputs"]:
        dtype = {"BYTES": object, "FP64": np.float64, "INT64": np.int64, "BOOL": bool}[spec["datatype"]]
        t = tc.InferInput(spec["name"], [len(recs)], spec["datatype"])
        t.set_data_from_numpy(np.array([np.nan if r[spec["name"]] is None else r[spec["name"]] for r in recs], dtype=dtype))  # binary_data=True
        inputs.append(t)
    assert all("binary_data_size" in t._get_tensor()["parameters"] for t in inputs)   # really binary on the wire
    result = client.infer(NAME, inputs, model_version=version)   # no outputs named: every output comes back as binary data
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in result.get_response()["outputs"])
    as_json = httpx.post(f"{ours.url}/v2/models/{NAME}/versions/{version}/infer", timeout=30, json={"inputs": [
        {"name": t.name(), "datatype": t.datatype(), "shape": t.shape(), "data": [r[t.name()] for r in recs]} for t in inputs]}).json()
    expected = {o["name"]: np.reshape(o["data"], o["shape"]) for o in as_json["outputs"]}
    np.testing.assert_array_equal(result.as_numpy("predict_proba"), expected["predict_proba"])
    np.testing.assert_array_equal(result.as_numpy("predict").astype(expected["predict"].dtype), expected["predict"])
    np.testing.assert_allclose(result.as_numpy("predict_proba"), model.predict_proba(X), rtol=0, atol=1e-12)
    # the declared shape and datatype are honoured: a [n, 3] tensor for one column and a BOOL tensor on a float column are refused
    wide = tc.InferInput("tenure", [2, 3], "INT64")
    wide.set_data_from_numpy(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(Exception, match="field 'tenure': shape \\[2, 3\\]: a field's tensor is one column"):
        client.infer(NAME, [wide])
    flag = tc.InferInput("monthly_charges", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]))
    with pytest.raises(Exception, match="field 'monthly_charges': datatype BOOL does not fit field type float"):
        client.infer(NAME, [flag])
    client.close()


def test_canary_and_model_switch_reach_every_protocol(tmp_path):
    "A challenger answers its share through /invocations and infer; a version path pins it; a promotion switches all doors."
    m1, X, v1 = fit_and_register(tmp_path)
    m2, _, v2 = fit_and_register(tmp_path, C=0.01, alias="challenger")
    X = X.iloc[:1]
    p1, p2 = m1.predict_proba(X)[0], m2.predict_proba(X)[0]
    assert abs(p1 - p2).max() > 1e-3   # the two versions answer differently
    rec = records_of(X)
    with ServiceProcess([str(BIN / "mlops-nb"), "serve", "--host", "127.0.0.1", "--port", "{port}", "--challenger-share", "0.5",
                         "--poll-seconds", "0.3", "--log-dir", str(tmp_path / "log")], "/ready", env=_env(tmp_path), cwd=tmp_path,
                        log=tmp_path / "canary.log", timeout=120) as s:
        deadline = time.monotonic() + 30   # ready means the champion is loaded; the challenger loads right after it
        while (meta := httpx.get(f"{s.url}/v2/models/{NAME}", timeout=30).json())["versions"] != [v1, v2] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert meta["versions"] == [v1, v2]
        tensors = {"inputs": v2_tensors(meta, rec)}
        seen = {httpx.post(f"{s.url}/v2/models/{NAME}/infer", json=tensors, timeout=30).json()["model_version"] for _ in range(30)}
        answers = [tuple(post(s.url, "application/json", {"dataframe_records": rec}).json()["predictions"][0]) for _ in range(30)]
        assert seen == {v1, v2}   # both variants answer the infer door (chance of missing one: 2 * 0.5**30)
        assert {np.allclose(a, p1, atol=1e-12) for a in answers} == {True, False} and all(np.allclose(a, p1, atol=1e-12) or np.allclose(a, p2, atol=1e-12) for a in answers)
        pinned = httpx.post(f"{s.url}/v2/models/{NAME}/versions/{v2}/infer", json=tensors, timeout=30).json()
        assert pinned["model_version"] == v2 and np.allclose(pinned["outputs"][1]["data"], p2, atol=1e-12)
        from mlops_nb.registry import _promote, use_project_tracking
        use_project_tracking(tmp_path)
        _promote(NAME, v2)   # the hot switch: champion moves to version 2
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and httpx.get(f"{s.url}/v2/models/{NAME}/versions/{v1}/ready", timeout=30).status_code != 404:
            time.sleep(0.2)
        for _ in range(5):
            np.testing.assert_allclose(post(s.url, "application/json", {"dataframe_records": rec}).json()["predictions"][0], p2, atol=1e-12)
