"""Benchmarks never touch the user's registry. A team's registry (here a SQLite store the test creates, with version 1 of
`churn-classifier` as champion) is named by MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI; each benchmark that registers
or promotes runs its set-up (`--setup-only`: the registration, promotion and the service it starts, without the load)
and must leave that registry exactly as it was: the same models, versions, aliases and runs."""
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import BIN, ROOT

pytestmark = pytest.mark.slow
NAME = "churn-classifier"
BENCHMARKS = ["serving", "features", "pipeline_overhead", "protocols"]   # every file in benchmarks/ that registers or promotes itself


def snapshot(uri: str) -> dict:
    "What a benchmark must not change: registered models, their versions, aliases and tags, and the runs."
    c = MlflowClient(uri, registry_uri=uri)
    models = {m.name: {"aliases": dict(m.aliases), "tags": dict(m.tags)} for m in c.search_registered_models()}
    versions = sorted((v.name, str(v.version), v.run_id) for v in c.search_model_versions())
    runs = sorted(r.info.run_id for e in c.search_experiments() for r in c.search_runs([e.experiment_id]))
    return {"models": models, "versions": versions, "runs": runs}


@pytest.fixture(scope="module")
def team_registry(tmp_path_factory):
    "A registry with a champion, as a team's tracking server holds it: (uri, its state)."
    from test_serve import fit, register
    root = tmp_path_factory.mktemp("team")
    for name in ("params.yaml", "schema.yaml"): (root / name).write_text((ROOT / name).read_text())
    (root / "gate.json").write_text('{"blessed": true}')
    model, X = fit(1, 1.0)
    assert register(root, model, X) == "1"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    state = snapshot(uri)
    assert {k: str(v) for k, v in state["models"][NAME]["aliases"].items()} == {"champion": "1"}
    return uri, state


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_a_benchmark_leaves_the_users_registry_untouched(team_registry, bench):
    uri, before = team_registry
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{bench}.py"), "--setup-only"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert '"setup_only": true' in r.stdout.strip().splitlines()[-1]
    assert uri not in r.stdout   # the benchmark says which store it used: its own
    after = snapshot(uri)
    assert after == before, f"{bench} changed the user's registry"
    assert str(MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(NAME, "champion").version) == "1"


def test_the_benchmarks_that_run_whole_pipelines_drop_the_users_registry():
    "newcomer.py runs `init -> run` in project copies: their environment names neither the user's tracking store nor registry."
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:////team/mlflow.db", "MLFLOW_REGISTRY_URI": "sqlite:////team/mlflow.db"}
    code = "import sys; sys.argv = ['newcomer']; import runpy; g = runpy.run_path('benchmarks/newcomer.py', run_name='imported'); " \
           "print(sorted(k for k in g['ENV'] if k.startswith('MLFLOW_')))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MLFLOW_TRACKING_URI" not in r.stdout and "MLFLOW_REGISTRY_URI" not in r.stdout, r.stdout

