"""A team's setup on real engines, started on loopback by the test: PostgreSQL (Debian's package) as MLflow's
backend store, an S3 API (moto in server mode) as the artifact store behind `mlflow server --serve-artifacts`,
and the same S3 API as the project's DVC remote. One pipeline run with `MLFLOW_TRACKING_URI` pointing at the
server, then: lineage, two processes racing to promote, rollback picked up by the service's registry polling,
and `dvc push` / `dvc pull` into a fresh clone that then has nothing to run."""
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from conftest import BIN, TINY, apt_install, copy_project, git_init, run, skip_or_fail
from mlops_nb.core import content_hash, load_yaml
from mlops_nb.data import drop_identifiers, encode_target, split_by_hash, synthetic_churn
from mlops_nb.loadtest import free_port

pytestmark = pytest.mark.slow
MODEL = "churn-classifier"
# deepchecks stays on: dvc.yaml declares its reports as outputs; the split is the streamed one, sampling 500 training rows
PARAMS = {**TINY, "prepare": {"max_train_rows": 500}, "serve": {"poll_seconds": 0.5}}
# MLflow 3's server also starts a job runner by default (for GenAI judges and trace roll-ups, unused here): eight more
# Python processes importing MLflow (about 1.4 GB) that made the server take minutes to answer on a loaded 2-core
# machine. The deploy recipes turn it off the same way.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def wait_http(url, proc, log, timeout=300):  # bounds a hang; mlflow server starts in well under a minute (see SERVER_ENV)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None: break
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: time.sleep(0.3)
    raise AssertionError(f"{url} did not answer (exit {proc.poll()}):\n{Path(log).read_text()[-3000:]}")


def start(cmd, log, env=None, user=None):
    if user: cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait(10)


class Postgres:
    "A throw-away PostgreSQL cluster on 127.0.0.1 and a free port (as user postgres when running as root)."
    def __init__(self):
        apt_install("postgresql", binary="pg_ctlcluster")
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found: skip_or_fail("postgresql is installed but no initdb was found under /usr/lib/postgresql")
        self.bin = Path(found[-1]).parent
        self.user = "postgres" if os.geteuid() == 0 else None
        folder = Path(tempfile.mkdtemp(prefix="mlops-nb-pg-"))  # short: the socket path must fit 107 bytes
        self.dir, self.port = folder, free_port()
        if self.user: shutil.chown(folder, self.user)
        self.pg(["initdb", "-D", str(folder / "data"), "-U", "mlflow", "--auth=trust", "-E", "UTF8"])
        self.pg(["pg_ctl", "-D", str(folder / "data"), "-l", str(folder / "server.log"), "-w", "-t", "60", "start",
                 "-o", f"-h 127.0.0.1 -p {self.port} -k {folder}"])
        self.pg(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", "mlflow"])
        self.uri = f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/mlflow"

    def pg(self, cmd):
        full = [str(self.bin / cmd[0]), *cmd[1:]]
        if self.user: full = ["runuser", "-u", self.user, "--", *full]
        r = subprocess.run(full, capture_output=True, text=True, cwd=self.dir)
        if r.returncode != 0: raise AssertionError(f"{cmd[0]} failed: {r.stdout[-1500:]}{r.stderr[-1500:]}")
        return r.stdout

    def query(self, sql: str) -> str:
        return self.pg(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", "-d", "mlflow", "-At", "-c", sql])

    def stop(self):
        subprocess.run(([ "runuser", "-u", self.user, "--"] if self.user else []) +
                       [str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    "PostgreSQL + moto S3 + `mlflow server`, and a project copy whose pipeline ran against them."
    tmp = tmp_path_factory.mktemp("team")
    pg = Postgres()
    procs = []
    try:
        s3_port, mlflow_port = free_port(), free_port()
        s3 = f"http://127.0.0.1:{s3_port}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "MLFLOW_S3_ENDPOINT_URL": s3}
        env.pop("MLFLOW_TRACKING_URI", None)
        procs.append(start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], tmp / "moto.log", env))
        wait_http(s3, procs[-1], tmp / "moto.log")
        import boto3
        store = boto3.client("s3", endpoint_url=s3, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
        for bucket in ("mlflow-artifacts", "dvc"): store.create_bucket(Bucket=bucket)
        procs.append(start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                            "--backend-store-uri", pg.uri, "--artifacts-destination", "s3://mlflow-artifacts",
                            "--serve-artifacts", "--workers", "1"], tmp / "mlflow.log", {**env, **SERVER_ENV}))
        server = f"http://127.0.0.1:{mlflow_port}"
        wait_http(server + "/health", procs[-1], tmp / "mlflow.log")
        # the clients get the tracking URI and, for DVC only, S3 credentials from the environment; no MLflow S3 settings
        client_env = {"MLFLOW_TRACKING_URI": server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                      "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": ""}
        project = copy_project(tmp / "project", PARAMS)
        run("dvc", "remote", "add", "-d", "shared", "s3://dvc/mlops-nb", cwd=project)
        run("dvc", "remote", "modify", "shared", "endpointurl", s3, cwd=project)
        commit = git_init(project)
        result = run("mlops-nb", "run", cwd=project, env=client_env)
        # the registry as the run left it (later tests race and roll back; each test reads what it needs from here)
        mc = MlflowClient(server, registry_uri=server)
        after_run = {"champion": mc.get_model_version_by_alias(MODEL, "champion"),
                     "versions": sorted(str(v.version) for v in mc.search_model_versions(f"name = '{MODEL}'"))}
        run("git", "add", "-A", cwd=project)
        run("git", "commit", "-qm", "pipeline run", cwd=project)
        yield {"project": project, "commit": commit, "env": client_env, "server": server, "pg": pg, "s3": store,
               "tmp": tmp, "run": result, "after_run": after_run}
    finally:
        for p in reversed(procs): stop(p)
        pg.stop()


def client(team):
    from mlflow import MlflowClient
    return MlflowClient(team["server"], registry_uri=team["server"])


def test_pipeline_runs_against_the_server_and_its_stores(team):
    project = team["project"]
    assert "pipeline finished" in team["run"].stdout and "-> champion" in team["run"].stdout
    splits = json.loads((project / "reports" / "prepare" / "splits.json").read_text())
    held = split_by_hash(encode_target(pd.read_parquet(project / "data" / "raw" / "data.parquet"), "churn", "Yes"), "churn", 0.25, 42)[1]
    # the streamed split holds out the rows the in-memory hash split holds out, and caps the training rows
    assert 450 <= len(pd.read_parquet(project / "data" / "processed" / "train.parquet")) <= 500 and splits["test"]["rows"] == len(held)
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()  # nothing went to the local default
    champion = team["after_run"]["champion"]
    assert str(champion.version) == "1" and champion.tags["blessed"] == "true" and team["after_run"]["versions"] == ["1"]
    # independently of MLflow's client: the registry's rows are in PostgreSQL, the model files in the bucket
    assert team["pg"].query(f"select version from model_versions where name = '{MODEL}'").split() == ["1"]
    assert team["pg"].query("select count(*) from runs").strip() != "0"
    keys = [o["Key"] for page in team["s3"].get_paginator("list_objects_v2").paginate(Bucket="mlflow-artifacts")
            for o in page.get("Contents", [])]
    assert any(k.endswith("MLmodel") for k in keys) and any("reports/notebooks/train.ipynb" in k for k in keys)


def test_lineage_from_the_server(team):
    r = run("mlops-nb", "lineage", f"models:/{MODEL}/1", "--json", cwd=team["project"], env=team["env"])  # the run's version
    record = json.loads(r.stdout)
    text = json.dumps(record)
    assert team["commit"] in text
    expected = drop_identifiers(synthetic_churn(800, seed=42), ["rownames"])
    assert content_hash(expected) in text


# A racer: promote its copy's registered candidate as infra_validate does, once every racer is at the barrier. Its
# critical section is traced (when it got the lock, when it let go) and the alias move holds the lock for 3 s, so the
# two promotions overlap in time: only the lock can keep them apart.
RACER = """
import json, os, sys, time
from contextlib import contextmanager
from pathlib import Path
import mlops_nb.registry as reg
copy, barrier, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
events, real_lock, real_promote = {}, reg.promotion_lock, reg._promote
@contextmanager
def traced(name, **kw):
    with real_lock(name, **kw) as owner:
        events["locked"] = time.time()
        try: yield owner
        finally: events["unlocking"] = time.time()
def slow_promote(name, version):
    real_promote(name, version)
    time.sleep(3)
reg.promotion_lock, reg._promote = traced, slow_promote
registration = json.loads((copy / "reports/register/registration.json").read_text())
gate = json.loads((copy / "reports/evaluate/gate.json").read_text())
reg.use_project_tracking(copy)
reg.alias_version("churn-classifier")   # connected to the tracking server before the barrier
(barrier / str(os.getpid())).touch()
while len(list(barrier.iterdir())) < n: time.sleep(0.005)
start = time.time()
p = reg.promote_candidate("churn-classifier", registration["version"], gate["compared_with"], gate["blessed"], True)
p |= {"version": registration["version"], "start": start, **events}
(copy / "reports/infra").mkdir(parents=True, exist_ok=True)
(copy / "reports/infra/promotion.json").write_text(json.dumps(p))
"""


@pytest.fixture(scope="module")
def race(team):
    "Two project copies evaluate and register a candidate against champion 1, then two processes promote them at once (behind a barrier)."
    copies = []
    for name in ("b", "c"):
        dest = team["tmp"] / name
        shutil.copytree(team["project"], dest, ignore=shutil.ignore_patterns(".git", ".dvc/cache", "logs"))
        # what is raced is the promotion: no deepchecks suites and no ONNX conversion in the racers (the run above had both)
        params = load_yaml((dest / "params.yaml").read_text())
        params["evaluate"]["deepchecks"], params["export"]["onnx"] = False, False
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        copies.append(dest)
    for stage in ("evaluate", "register"):
        procs = [subprocess.Popen([str(BIN / "mlops-nb"), "stage", stage], cwd=c,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **team["env"]})
                 for c in copies]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), f"stage {stage}: " + "\n".join(o[-2000:] for o in outs)
    barrier = team["tmp"] / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **team["env"]}
    procs = [subprocess.Popen([str(BIN / "python"), "-c", RACER, str(c), str(barrier), str(len(copies))], cwd=c,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for c in copies]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "racers: " + "\n".join(o[-2000:] for o in outs)
    promotions = [json.loads((c / "reports" / "infra" / "promotion.json").read_text()) for c in copies]
    mc = client(team)
    return {"promotions": promotions,
            "champion": str(mc.get_model_version_by_alias(MODEL, "champion").version),
            "previous": str(mc.get_model_version_by_alias(MODEL, "previous").version)}


def test_two_racing_promotions_one_wins(race):
    promotions = race["promotions"]
    assert sorted(p["version"] for p in promotions) == ["2", "3"]
    winners = [p for p in promotions if p["promoted"]]
    losers = [p for p in promotions if not p["promoted"]]
    assert len(winners) == 1 and len(losers) == 1, promotions
    assert "champion changed from 1" in losers[0]["reason"]
    assert race["champion"] == winners[0]["version"] and race["previous"] == "1"
    winner, loser = winners[0], losers[0]
    # the two promotions were forced to overlap: both had started before the winner let go of the lock ...
    assert max(winner["start"], loser["start"]) < winner["unlocking"], promotions
    # ... and the lock kept them apart: the loser got it only after the winner had moved the alias and let go
    assert loser["locked"] >= winner["unlocking"], promotions


def test_rollback_reaches_the_service_through_registry_polling(team, race):
    project, env = team["project"], {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **team["env"]}
    port = free_port()
    log = team["tmp"] / "serve.log"
    service = start([str(BIN / "mlops-nb"), "serve", "--port", str(port), "--log-dir", str(team["tmp"] / "predictions"),
                     "--poll-seconds", "0.5"], log, env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/ready", service, log)
        version = lambda: json.load(urllib.request.urlopen(url + "/metadata", timeout=5))["version"]
        before = str(client(team).get_model_version_by_alias(MODEL, "champion").version)
        assert str(version()) == before
        out = run("mlops-nb", "rollback", cwd=project, env=team["env"]).stdout
        after = str(client(team).get_model_version_by_alias(MODEL, "champion").version)
        assert after != before and f"champion: {after}" in out
        deadline = time.monotonic() + 60
        while str(version()) != after and time.monotonic() < deadline: time.sleep(0.5)
        assert str(version()) == after
    finally:
        stop(service)


def test_dvc_push_then_pull_on_a_fresh_clone_runs_nothing(team):
    project, env = team["project"], team["env"]
    run("dvc", "push", cwd=project, env=env)
    keys = [o["Key"] for page in team["s3"].get_paginator("list_objects_v2").paginate(Bucket="dvc") for o in page.get("Contents", [])]
    assert keys and all(k.startswith("mlops-nb/") for k in keys)
    clone = team["tmp"] / "clone"
    run("git", "clone", "-q", str(project), str(clone), cwd=team["tmp"])
    assert not (clone / "data" / "raw" / "data.parquet").exists()
    run("dvc", "pull", cwd=clone, env=env)
    for out in ("data/raw/data.parquet", "data/processed/train.parquet", "models/model.joblib"):
        assert (clone / out).read_bytes() == (project / out).read_bytes(), out
    r = run("mlops-nb", "run", cwd=clone, env=env)
    assert "Running stage" not in r.stdout and "pipeline finished" in r.stdout
    assert json.loads(run("dvc", "status", "--json", cwd=clone).stdout or "{}") == {}
