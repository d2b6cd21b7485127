"""The container image of the service (`Dockerfile`, `compose.yaml`, `docker/serve-requirements.in`).

This machine cannot run containers: podman installs, but its runtime's setrlimit calls are refused by the sandbox the
machine runs in. So the image is checked in three ways that need no container: hadolint lints the Dockerfile; its
promises (slim base, non-root user, healthcheck on /ready, model and tracking URIs from the environment) and the
compose file's wiring are read back; and the Dockerfile's own install lines are run in a fresh environment laid out
like the image's /app, which then serves a registered model as the container would."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from conftest import BIN, ROOT, records_of

NAME = "container-model"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    "(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."
    text = re.sub(r"\\\n\s*", " ", "\n".join(l for l in dockerfile.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l.strip() else "") for l in text.splitlines() if l.strip()]


def test_the_dockerfile_lints_clean():
    r = subprocess.run([str(BIN / "hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_image_keeps_its_promises_and_compose_wires_it_to_a_tracking_server():
    ins = instructions(ROOT / "Dockerfile")
    first = lambda name: next(a for i, a in ins if i == name)
    assert re.fullmatch(r"python:3\.11-slim[\w.-]*", first("FROM"))                          # a slim base
    user = [a for i, a in ins if i == "USER"][-1]
    assert user not in ("root", "0") and ins.index(("USER", user)) > max(k for k, (i, _) in enumerate(ins) if i == "RUN")  # runs as non-root
    assert "/ready" in first("HEALTHCHECK") and "--start-period" in first("HEALTHCHECK")
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "MODEL_URI=" in env and "MLFLOW_TRACKING_URI=" in env and "$MODEL_URI" in first("CMD")
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert compose["serve"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert compose["serve"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert "server" in compose["mlflow"]["command"] and "/health" in " ".join(compose["mlflow"]["healthcheck"]["test"])
    # everything the image copies is in the build context .dockerignore lets through
    allowed = {l[1:].rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines() if l.startswith("!")}
    copied = {p.rstrip("/") for i, a in ins if i == "COPY" for p in a.split()[:-1]}
    assert copied <= allowed, copied - allowed


@pytest.fixture(scope="module")
def image_env(tmp_path_factory):
    "A fresh environment installed by the Dockerfile's own RUN lines, with the image's /app laid out beside it."
    work = tmp_path_factory.mktemp("image")
    runs = [a for i, a in instructions(ROOT / "Dockerfile") if i == "RUN"]
    assert runs[0] == "pip install --no-cache-dir -c requirements.lock -r serve-requirements.in", runs[0]
    app = work / "app"
    app.mkdir()
    for f in ["requirements.lock", "docker/serve-requirements.in", "pyproject.toml", "README.md", "params.yaml", "schema.yaml"]:
        shutil.copy2(ROOT / f, app / Path(f).name)
    shutil.copytree(ROOT / "mlops_nb", app / "mlops_nb", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, capture_output=True)
    pip = [str(work / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for cmd in (pip + ["-c", "requirements.lock", "-r", "serve-requirements.in"], pip + ["--no-deps", "."]):
        r = subprocess.run(cmd, cwd=app, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    return work / "venv" / "bin", app


@pytest.mark.slow
def test_the_image_install_lines_serve_a_registered_model(image_env, tmp_path):
    from mlops_nb.data import encode_target, synthetic_churn
    from mlops_nb.loadtest import ServiceProcess
    from mlops_nb.registry import _promote, pipeline_run, register_model, use_project_tracking
    from mlops_nb.train import build_model
    bin_, app = image_env
    installed = {p["name"].lower() for p in json.loads(subprocess.run([str(bin_ / "python"), "-m", "pip", "list", "--format", "json"],
                                                                        capture_output=True, text=True, check=True).stdout)}
    assert not installed & {"deepchecks", "dvc", "papermill", "jupyterlab", "nbdev"}, installed   # serving only: no pipeline tooling
    store = tmp_path / "registry"
    store.mkdir()
    shutil.copy2(ROOT / "schema.yaml", store / "schema.yaml")
    (store / "gate.json").write_text('{"blessed": true}')
    df = encode_target(synthetic_churn(600, seed=3).drop(columns="rownames"), "churn", "Yes")
    X, y = df.drop(columns="churn"), df.churn
    model = build_model("logreg", X, seed=0).fit(X, y)
    uri = use_project_tracking(store)
    with pipeline_run(run_name="container"):
        version = register_model(model, X.head(5), NAME, blessed=True, extra_files=[store / "schema.yaml", store / "gate.json"])["version"]
    _promote(NAME, version)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MODEL_URI": f"models:/{NAME}@champion", "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    # the image's CMD, with a loopback host and a free port instead of 0.0.0.0:$PORT
    cmd = [str(bin_ / "mlops-nb"), "serve", "--model", env["MODEL_URI"], "--host", "127.0.0.1", "--port", "{port}", "--log-dir", str(tmp_path / "log")]
    with ServiceProcess(cmd, "/ready", env=env, cwd=app, log=tmp_path / "serve.log", timeout=180) as s:
        records = records_of(X.head(20))
        answer = httpx.post(s.url + "/predict", json=records, timeout=60).json()
        assert answer["model_version"] == str(version)
        np.testing.assert_allclose(answer["probabilities"], model.predict_proba(X.head(20)), rtol=0, atol=1e-9)
        bad = httpx.post(s.url + "/predict", json={**records[0], "contract": "Lifetime"}, timeout=60)
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "contract"
