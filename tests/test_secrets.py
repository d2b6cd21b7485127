"""A database password never leaves the process: against a real PostgreSQL (Debian's package, started by the test,
password authentication on), `mlops-nb predict`, `mlops-nb stage ingest` and `mlops-nb monitor` (its registry in
PostgreSQL) run once succeeding and once failing (a schema mismatch, an empty result, a wrong password, a missing
table), and every output is searched for the password: stdout, stderr and every file they wrote (outputs, reports,
JSON, executed notebooks, the MLflow store). The README's driver-less `postgresql://` URL is the form used."""
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT
from test_predict import batch
from test_serve import NAME, fit, register
from test_serve_faults import new_project

pytestmark = pytest.mark.slow
PW = "Pw-" + secrets.token_hex(8)       # what must never be printed or written
WRONG = "Wrong-" + secrets.token_hex(8)  # a wrong one, never printed either


@pytest.fixture(scope="module")
def db():
    "PostgreSQL on loopback; role `mlflow` needs the password `PW` over TCP; table `customers` holds 300 scoreable rows."
    import sqlalchemy
    from test_scale_services import Postgres
    pg = Postgres()
    try:
        pg.query(f"ALTER ROLE mlflow PASSWORD '{PW}'")
        pg.pg(["createdb", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "mlflow", "tracking"])
        (pg.dir / "data" / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        pg.pg(["pg_ctl", "-D", str(pg.dir / "data"), "reload"])
        url = f"postgresql://mlflow:{PW}@127.0.0.1:{pg.port}/mlflow"
        with sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg2://")).begin() as conn:
            batch(300, seed=4).to_sql("customers", conn, index=False)
        yield pg
    finally: pg.stop()


def url(db, password="${MLOPS_NB_DB_PASSWORD}", database="mlflow") -> str:
    "The README's form: driver-less, the password a reference to an environment variable (or given literally)."
    return f"postgresql://mlflow:{password}@127.0.0.1:{db.port}/{database}"


def cli(root, *args, env=None):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "MLOPS_NB_DB_PASSWORD": PW,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run([str(BIN / "mlops-nb"), *args], cwd=root, capture_output=True, text=True, env=env, timeout=900)


def leaks(r, *folders) -> list[str]:
    "Where a password shows up: the command's stdout or stderr, or a file under `folders`."
    found = [name for name, text in (("stdout", r.stdout), ("stderr", r.stderr)) if PW in text or WRONG in text]
    for folder in folders:
        for f in Path(folder).rglob("*"):
            if f.is_file() and f.name != "params.yaml" and (PW.encode() in (data := f.read_bytes()) or WRONG.encode() in data): found.append(str(f))
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = new_project(tmp_path_factory.mktemp("secrets"))
    model, X = fit(1, 1.0)
    register(root, model, X)
    return root


def test_predict_from_postgresql_never_shows_the_password(db, project, tmp_path):
    root = project
    ok = cli(root, "predict", "--data", url(db), "--query", "select * from customers", "--out", str(tmp_path / "out.csv"), "--log-dir", str(tmp_path / "log"))
    assert ok.returncode == 0 and "scored 300 rows" in ok.stdout, ok.stdout + ok.stderr
    assert "postgresql://mlflow:${MLOPS_NB_DB_PASSWORD}@" in (tmp_path / "out.csv.report.json").read_text()
    literal = url(db, PW)   # given on the command line: shown masked
    ok = cli(root, "predict", "--data", literal, "--query", "select * from customers", "--out", str(tmp_path / "out2.csv"), "--no-log")
    assert ok.returncode == 0 and "postgresql://mlflow:***@" in (tmp_path / "out2.csv.report.json").read_text(), ok.stderr
    failures = {
        "schema mismatch": (literal, "select rownames, tenure from customers", "missing column(s)"),
        "empty result": (literal, "select * from customers where false", "holds no rows (the query returned none)"),
        "missing table": (literal, "select * from nowhere", "SQL source failed: ProgrammingError"),
        "wrong password": (url(db, WRONG), "select * from customers", "password authentication failed"),
        "psycopg2 named": (literal.replace("postgresql://", "postgresql+psycopg2://"), "select rownames from customers", "missing column(s)"),
    }
    for what, (source, query, expected) in failures.items():
        r = cli(root, "predict", "--data", source, "--query", query, "--out", str(tmp_path / "bad.csv"), "--log-dir", str(tmp_path / "log"))
        assert r.returncode == 1 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, (what, r.stderr)
        if what in ("schema mismatch", "empty result"): assert "postgresql://mlflow:***@" in r.stderr, r.stderr   # the source is named, masked
        assert "rows 0--1" not in r.stderr and not leaks(r), (what, r.stderr)
    assert not leaks(ok, tmp_path, root)


def test_ingest_from_postgresql_never_shows_the_password(db, project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project, root)
    shutil.copytree(ROOT / "pipeline", root / "pipeline")
    shutil.copy2(ROOT / "dvc.yaml", root / "dvc.yaml")   # the stage list (a stage is one of dvc.yaml's)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source=url(db), query="select * from customers")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ok = cli(root, "stage", "ingest")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    provenance = yaml.safe_load((root / "reports" / "ingest" / "provenance.json").read_text())
    assert provenance["rows"] == 300 and provenance["source"] == url(db), provenance
    assert not leaks(ok, root)
    for password, query in ((PW, "select * from nowhere"), (WRONG, "select * from customers"), ("${MLOPS_NB_DB_PASSWORD}", "select * from customers where false")):
        params["data"].update(source=url(db, password), query=query)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))   # a literal password in params.yaml is the user's own file
        r = cli(root, "stage", "ingest")
        assert r.returncode == 1 and ("SQL source failed" in r.stderr or "returned no rows" in r.stderr), r.stderr
        assert not leaks(r, root / "reports", root / "data"), (query, r.stderr)


def test_mlflow_params_show_the_password_masked():
    from mlops_nb.core import load_params
    from mlops_nb.pipeline import pipeline_params
    params = load_params(ROOT / "params.yaml")
    d = params.to_dict()
    d["data"]["source"] = f"postgresql://etl:{PW}@db/crm"
    from mlops_nb.core import parse_params
    recorded = pipeline_params(parse_params(d))
    assert recorded["data"]["source"] == "postgresql://etl:***@db/crm" and PW not in str(recorded)


def test_monitor_with_a_postgresql_registry_never_shows_the_password(db, tmp_path):
    from test_monitor import champion_project
    root = tmp_path / "project"
    root.mkdir()
    batch(200, seed=6).drop(columns="rownames").to_csv(tmp_path / "in.csv", index=False)
    tracking = url(db, PW, "tracking").replace("postgresql://", "postgresql+psycopg2://")   # MLflow's own URL names its driver (README)
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    failed = cli(root, "monitor", "--data", str(tmp_path / "in.csv"), "--no-notebook", env={"MLFLOW_TRACKING_URI": tracking.replace(PW, WRONG)})
    assert failed.returncode == 1 and not leaks(failed), failed.stderr
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking   # the champion is registered in PostgreSQL, as a team's tracking server stores it
    try: champion_project(root)
    finally:
        if old is None: del os.environ["MLFLOW_TRACKING_URI"]
        else: os.environ["MLFLOW_TRACKING_URI"] = old
        import mlflow; mlflow.set_tracking_uri(None)
    ok = cli(root, "monitor", "--data", str(tmp_path / "in.csv"), "--no-notebook", env={"MLFLOW_TRACKING_URI": tracking})
    assert ok.returncode in (0, 4) and "monitor:" in ok.stdout, ok.stdout + ok.stderr
    assert not leaks(ok, root / "reports")
