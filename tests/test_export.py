"""The ONNX export end to end: `mlops-nb export` writes a registered version for a device; the service answers the same
on both runtimes and says which one answered; the edge runner, in a fresh environment holding only onnxruntime and
numpy (and what they pull in), answers what the service answers and refuses bad records naming record and field."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import BIN, ROOT, records_of, skip_or_fail
from mlops_nb.loadtest import ServiceProcess

NAME = "churn-classifier"
TOLERANCE = 1e-4


def _env(project: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A project folder whose champion (version 1, the default algorithm) is stored with its parity-checked ONNX export."
    from threadpoolctl import threadpool_limits
    from mlops_nb.data import encode_target, synthetic_churn
    from mlops_nb.export import export_onnx, write_export
    from mlops_nb.registry import _promote, pipeline_run, register_model, use_project_tracking
    from mlops_nb.schema import load_schema
    from mlops_nb.train import build_model
    root = tmp_path_factory.mktemp("export")
    for name in ("params.yaml", "schema.yaml"): shutil.copy2(ROOT / name, root / name)
    df = encode_target(synthetic_churn(600, seed=5).drop(columns="rownames"), "churn", "Yes")
    X, y = df.drop(columns="churn"), df.churn
    with threadpool_limits(1):
        model = build_model("hgb", X.iloc[:450], 0).set_params(classifier__max_iter=50).fit(X.iloc[:450], y.iloc[:450])
        exp = export_onnx(model, X.iloc[450:], load_schema(root / "schema.yaml"), TOLERANCE)
    assert exp.usable, exp.report
    use_project_tracking(root)
    with pipeline_run(run_name="test-export"):
        reg = register_model(model, X.head(5), NAME, blessed=True,
                             extra_files=[root / "schema.yaml", *write_export(exp, root / "onnx")])
        plain = register_model(model, X.head(5), NAME, blessed=True, extra_files=[root / "schema.yaml"])
    _promote(NAME, reg["version"])
    records = records_of(X.iloc[450:510])
    records[0]["total_charges"] = None   # a missing value the schema allows
    return root, reg["version"], plain["version"], records


def test_cli_export_writes_what_a_device_needs(project, tmp_path):
    root, version, plain, _ = project
    out = tmp_path / "device"
    r = subprocess.run([str(BIN / "mlops-nb"), "export", f"models:/{NAME}@champion", "--format", "onnx", str(out)],
                       cwd=root, env=_env(root), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["edge_runner.py", "example.json", "model.onnx", "onnx.json"]
    assert json.loads((out / "onnx.json").read_text())["passed"] is True
    # a version registered without an ONNX export is refused with the reason, not a traceback
    r = subprocess.run([str(BIN / "mlops-nb"), "export", f"models:/{NAME}/{plain}", str(tmp_path / "nothing")],
                       cwd=root, env=_env(root), capture_output=True, text=True)
    assert r.returncode == 1 and "has no ONNX export" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "nothing").exists()


@pytest.fixture(scope="module")
def answers(project):
    "The service's answers to the same records on each runtime, and what /metadata says of it."
    root, version, _, records = project
    out = {}
    for runtime in ("onnx", "sklearn"):
        server = ServiceProcess([str(BIN / "mlops-nb"), "serve", "--host", "127.0.0.1", "--port", "{port}", "--runtime", runtime,
                                 "--log-dir", "", "--poll-seconds", "0"], "/ready", env=_env(root), cwd=root,
                                log=root / f"server-{runtime}.log", timeout=120)
        try:
            batch = httpx.post(server.url + "/predict", json=records, timeout=60).json()
            single = [httpx.post(server.url + "/predict", json=r, timeout=60).json() for r in records[:5]]
            out[runtime] = {"batch": batch, "single": single, "metadata": httpx.get(server.url + "/metadata", timeout=30).json()}
        finally: server.stop()
    return out


@pytest.mark.slow
def test_service_answers_the_same_on_both_runtimes_and_says_which(answers):
    onnx, sk = answers["onnx"], answers["sklearn"]
    assert (onnx["metadata"]["runtime"], sk["metadata"]["runtime"]) == ("onnx", "sklearn")
    assert onnx["metadata"]["runtime_reason"].startswith("ONNX parity-checked")
    a, b = np.array(onnx["batch"]["probabilities"]), np.array(sk["batch"]["probabilities"])
    assert a.shape == b.shape == (60, 2)
    assert np.abs(a - b).max() <= TOLERANCE
    assert onnx["batch"]["predictions"] == sk["batch"]["predictions"]
    for x, y in zip(onnx["single"], sk["single"]):   # one record per request: batches of one on both runtimes
        assert np.abs(np.array(x["probabilities"]) - np.array(y["probabilities"])).max() <= TOLERANCE


@pytest.fixture(scope="module")
def edge_env(tmp_path_factory):
    "A fresh virtual environment with only onnxruntime and numpy installed (the versions of this environment)."
    import numpy
    import onnxruntime
    venv = tmp_path_factory.mktemp("edge") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        f"onnxruntime=={onnxruntime.__version__}", f"numpy=={numpy.__version__}"], capture_output=True, text=True)
    if r.returncode != 0: skip_or_fail(f"cannot install onnxruntime and numpy in a fresh environment: {r.stderr[-500:]}")
    return py


@pytest.mark.slow
def test_edge_runner_with_only_onnxruntime_and_numpy_answers_like_the_service(project, answers, edge_env, tmp_path):
    root, _, _, records = project
    installed = subprocess.run([str(edge_env), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert {"onnxruntime", "numpy"} <= names
    assert not names & {"scikit-learn", "pandas", "mlflow", "skl2onnx", "onnx", "mlops-nb"}, names
    out = tmp_path / "device"
    subprocess.run([str(BIN / "mlops-nb"), "export", f"models:/{NAME}@champion", str(out)], cwd=root, env=_env(root),
                   check=True, capture_output=True)
    (out / "records.json").write_text(json.dumps(records))
    # run from the device folder with an isolated interpreter: nothing of this project is importable there
    r = subprocess.run([str(edge_env), "-I", "edge_runner.py", "model.onnx", "records.json"], cwd=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    edge = json.loads(r.stdout)
    service = answers["onnx"]["batch"]
    assert edge["classes"] == service["classes"] and edge["predictions"] == service["predictions"]
    assert np.abs(np.array(edge["probabilities"]) - np.array(service["probabilities"])).max() <= TOLERANCE
    assert np.abs(np.array(edge["probabilities"]) - np.array(answers["sklearn"]["batch"]["probabilities"])).max() <= TOLERANCE
    # the example record written by the export answers too
    assert subprocess.run([str(edge_env), "-I", "edge_runner.py", "model.onnx", "example.json"], cwd=out,
                          capture_output=True, text=True).returncode == 0
    # input is validated against the exported schema: every offending record and field, exit 2
    bad = [records[0], {**records[1], "contract": "Three year", "tenure": "abc"}, {k: v for k, v in records[2].items() if k != "tenure"}]
    r = subprocess.run([str(edge_env), "-I", "edge_runner.py", "model.onnx", "-"], cwd=out, input=json.dumps(bad),
                       capture_output=True, text=True)
    assert r.returncode == 2 and not r.stdout
    errors = json.loads(r.stderr)["errors"]
    assert [(e["record"], e["field"]) for e in errors] == [(1, "tenure"), (1, "contract"), (2, "tenure")], errors


@pytest.mark.slow
def test_edge_runner_latency_and_size_are_reported(project, edge_env, tmp_path):
    "Not a timed assert: the single-row latency and artifact size are measured and printed for the report."
    root, _, _, records = project
    out = tmp_path / "device"
    subprocess.run([str(BIN / "mlops-nb"), "export", f"models:/{NAME}@champion", str(out)], cwd=root, env=_env(root),
                   check=True, capture_output=True)
    code = ("import json, time, sys; sys.path.insert(0, '.'); import edge_runner as e; m = e.EdgeModel('model.onnx'); "
            "r = json.load(open('example.json')); [m.predict(r) for _ in range(20)]; ts = []\n"
            "for _ in range(200): t = time.perf_counter(); m.predict(r); ts.append((time.perf_counter() - t) * 1000)\n"
            "ts.sort(); print(json.dumps({'p50_ms': ts[100], 'p99_ms': ts[198]}))")
    r = subprocess.run([str(edge_env), "-I", "-c", code], cwd=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    timing = json.loads(r.stdout)
    print(f"\nedge runner: model.onnx {(out / 'model.onnx').stat().st_size} bytes, single-row p50 {timing['p50_ms']:.3f} ms, p99 {timing['p99_ms']:.3f} ms")
    assert timing["p50_ms"] > 0


# the target of each task, taken from the synthetic churn table
TARGETS = {"binary": "churn", "multiclass": "contract", "regression": "monthly_charges"}
SMALL = {"logreg": {}, "rf": {"n_estimators": 25}, "hgb": {"max_iter": 40}}


def task_data(task: str):
    "Features and target of `task`: 400 rows to fit on, 100 to check; every number one a float32 holds exactly."
    from mlops_nb.data import synthetic_churn
    from mlops_nb.train import feature_columns
    df = synthetic_churn(500, seed=3).drop(columns="rownames")
    X, y = df.drop(columns=TARGETS[task]), df[TARGETS[task]]
    numeric, _ = feature_columns(X)
    X = X.astype({c: "float32" for c in numeric}).astype({c: "float64" for c in numeric})
    return X.iloc[:400], y.iloc[:400], X.iloc[400:]


def fitted(family: str, task: str, X, y):
    from threadpoolctl import threadpool_limits
    from mlops_nb.train import build_model
    model = build_model(family, X, 0, task)
    model.steps[-1][1].set_params(**SMALL[family])
    with threadpool_limits(1): return model.fit(X, y)


@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.parametrize("task", list(TARGETS))
def test_every_family_of_every_task_exports_with_parity(task, family):
    "Each zoo family of each task converts, and its ONNX model answers like the Pipeline, also on missing values and unseen categories."
    from mlops_nb.edge import EdgeModel
    from mlops_nb.export import export_onnx, probe_frame
    X, y, X_test = task_data(task)
    model = fitted(family, task, X, y)
    exp = export_onnx(model, X_test, tolerance=TOLERANCE)
    assert exp.usable, exp.report
    # an independent look, through the edge runner's own API, at records with holes and categories never seen
    probes = probe_frame(X_test, n=40, seed=1)
    assert probes.isna().any().any() and (probes == "never seen in training").any().any()
    records = records_of(probes)
    answer = EdgeModel(exp.model).predict(records)
    if task == "regression":
        assert "probabilities" not in answer
        np.testing.assert_allclose(answer["predictions"], model.predict(probes), rtol=TOLERANCE, atol=TOLERANCE)
        return
    proba = model.predict_proba(probes)
    np.testing.assert_allclose(answer["probabilities"], proba, atol=TOLERANCE)
    assert answer["classes"] == list(model.classes_) and len(answer["classes"]) == (3 if task == "multiclass" else 2)
    top2 = np.sort(proba, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * TOLERANCE   # a near-tie may fall either way in float32
    assert (np.asarray(answer["predictions"])[decided] == model.predict(probes)[decided]).all()


def test_text_columns_of_any_kind_convert_to_one_lookup_with_parity():
    """Text columns skl2onnx's own conversion trips on (a bool column: its imputer's fill value False) or spreads over seven
    nodes each, with more categories than the encoder keeps (infrequent ones share a column), the lookup's separator and
    non-ASCII inside values, and missing values: one lookup in the graph, answers like the Pipeline on unseen values too."""
    import onnx
    import pandas as pd
    from mlops_nb.edge import EdgeModel
    from mlops_nb.export import export_onnx, probe_frame
    from mlops_nb.train import MAX_CATEGORIES, build_model
    rng = np.random.default_rng(4)
    n = 300
    X = pd.DataFrame({"x": rng.normal(size=n), "flag": rng.random(n) < 0.3,
                      "city": rng.choice([f"c{i}" for i in range(2 * MAX_CATEGORIES)], n),
                      "odd": rng.choice(["a\x1fb", "é ü", "0\x1f1", "x"], n).astype(object)})
    X.loc[::7, "odd"], X.loc[::11, "city"] = np.nan, np.nan
    y = (X.x + X.flag + (X.city < "c2") + (X.odd == "é ü")).gt(0.5).astype(int)
    model = build_model("hgb", X, 0).fit(X, y)
    exp = export_onnx(model, X.iloc[200:], tolerance=TOLERANCE)
    assert exp.usable, exp.report
    ops = [node.op_type for node in onnx.load_from_string(exp.model).graph.node]
    assert ops.count("LabelEncoder") == 1 and len(ops) < 12, ops
    probes = probe_frame(X.iloc[200:], n=60, seed=2)
    probes.loc[probes.flag == "never seen in training", "flag"] = True   # a bool field takes bools (or null)
    records = records_of(probes)
    np.testing.assert_allclose(EdgeModel(exp.model).predict(records)["probabilities"], model.predict_proba(probes), atol=TOLERANCE)


def test_parity_catches_a_split_that_float32_rounding_flips():
    """ONNX trees compare float32 values: an input just above a threshold in float64 rounds onto it and goes the other way.
    The export's parity check sees it, and the version is not served by ONNX."""
    from mlops_nb.export import export_onnx
    from mlops_nb.train import feature_columns
    X, y, X_test = task_data("multiclass")
    model = fitted("hgb", "multiclass", X, y)
    numeric, _ = feature_columns(X)
    node = next(n for n in model[-1]._predictors[0][0].nodes if not n["is_leaf"] and n["feature_idx"] < len(numeric))
    column, threshold = numeric[node["feature_idx"]], float(node["num_threshold"])
    above, on = X_test.copy(), X_test.copy()
    above[column], on[column] = np.nextafter(threshold, np.inf), threshold
    assert np.float32(above[column].iloc[0]) == np.float32(threshold)
    assert np.abs(model.predict_proba(above) - model.predict_proba(on)).max() > TOLERANCE   # the split matters to the Pipeline
    exp = export_onnx(model, above, tolerance=TOLERANCE)
    assert exp.report["converted"] and not exp.usable
    assert exp.report["reason"].startswith("parity: max abs difference"), exp.report


def test_a_conversion_onnxruntime_refuses_is_recorded_not_raised():
    "skl2onnx 1.20 converts an integer-coded categorical into a graph onnxruntime refuses: the version records why, nothing raises."
    from mlops_nb.export import export_onnx
    X, y, X_test = task_data("multiclass")
    from mlops_nb.train import build_model
    model = build_model("logreg", X, 0, "multiclass", categorical=["senior_citizen"]).fit(X, y)
    exp = export_onnx(model, X_test, tolerance=TOLERANCE)
    assert exp.model is None and not exp.usable and exp.report["converted"] is False
    assert exp.report["reason"].startswith("onnxruntime cannot load the converted model"), exp.report
