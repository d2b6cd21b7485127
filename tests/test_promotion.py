"""Promotion under contention: real processes (not threads) promoting different candidates at the same moment
against one tracking store; exactly one wins and the aliases stay consistent. Also `mlops-nb promote` refuses what
the gate refused and promotes, explicitly, a version the pipeline would not."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, registry, run
from test_serve import NAME, fit

pytestmark = pytest.mark.slow

RACER = """
import json, os, sys, time
from mlops_nb.registry import promote_candidate, use_project_tracking
root, version, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
use_project_tracking(root)
time.sleep(max(0.0, start - time.time()))            # both processes leave the starting line together
print(json.dumps(promote_candidate("%s", version, "1", True, True)))
""" % NAME


@pytest.fixture
def store(tmp_path):
    "A project folder whose tracking store holds version 1 (champion) and versions 2 to 7 (blessed candidates)."
    from mlops_nb.registry import _promote, pipeline_run, register_model, use_project_tracking
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    use_project_tracking(tmp_path)
    model, X = fit(1, 1.0)
    for i in range(7):
        with pipeline_run(run_name=f"v{i + 1}"):
            register_model(model, X.head(3), NAME, blessed=True, tags={"git_dirty": False})
    _promote(NAME, "1")
    return tmp_path


def test_two_processes_promoting_at_once_exactly_one_wins(store):
    client = registry(store)
    for a, b in [("2", "3"), ("4", "5"), ("6", "7")]:     # three races, each from champion 1
        client.set_registered_model_alias(NAME, "champion", "1")
        client.delete_registered_model_alias(NAME, "previous")
        start = time.time() + 4.0                          # after both interpreters have imported mlflow
        procs = [subprocess.Popen([sys.executable, "-c", RACER, str(store), v, repr(start)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=store) for v in (a, b)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
        winners = [v for v, r in zip((a, b), results) if r["promoted"]]
        assert len(winners) == 1, results
        loser = next(r for r in results if not r["promoted"])
        assert "champion changed from 1 to" in loser["reason"], loser
        champion = str(client.get_model_version_by_alias(NAME, "champion").version)
        previous = str(client.get_model_version_by_alias(NAME, "previous").version)
        assert (champion, previous) == (winners[0], "1")
        assert f"{NAME}--promotion-lock" not in {m.name for m in client.search_registered_models()}   # released


def test_promote_command_checks_the_gate_and_moves_the_alias_explicitly(store):
    client = registry(store)
    client.set_model_version_tag(NAME, "2", "blessed", "false")
    client.set_model_version_tag(NAME, "3", "git_dirty", "True")    # a version the pipeline registered, not promoted
    client.set_model_version_tag(NAME, "3", "compared_with", "1")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    refused = run("mlops-nb", "promote", "2", cwd=store, check=False, env=env)
    assert refused.returncode == 3 and "gate rejected" in refused.stderr, (refused.stdout, refused.stderr)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    done = run("mlops-nb", "promote", "3", cwd=store, check=False, env=env)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "uncommitted changes" in done.stdout                    # said, then done because asked explicitly
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    assert str(client.get_model_version_by_alias(NAME, "previous").version) == "1"
