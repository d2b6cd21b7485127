"""The prediction log with several worker processes and a frozen heap: `mlops-nb serve --workers 2` answers from both
processes into one log folder, and the log holds every answered record exactly once (no worker seals or overwrites
another's open segment), once each worker says on `/ready` that it has loaded its model; the same with the heap left to the collector (MLOPS_NB_GC_FREEZE=0), which only the
benchmark's "before" row uses. The speed of either lives in benchmarks/serving.py."""
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import BIN, records_of
from mlops_nb.loadtest import ServiceProcess
from mlops_nb.predlog import read_prediction_log
from test_serve import project  # noqa: F401  (the module-scoped project fixture: one registration)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workers,freeze", [(2, "1"), (1, "0")])
def test_every_answer_is_logged_once_across_workers(project, tmp_path, workers, freeze):  # noqa: F811
    root, _, X = project
    recs = records_of(X.iloc[:40])
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "MLOPS_NB_GC_FREEZE": freeze}
    s = ServiceProcess([str(BIN / "mlops-nb"), "serve", "--host", "127.0.0.1", "--port", "{port}", "--log-dir", str(log), "--poll-seconds", "0",
                        "--workers", str(workers)], "/ready", env=env, cwd=root, log=root / f"server-{time.monotonic_ns()}.log",
                       timeout=300)   # two workers load the model at once: slow on a busy machine
    try:
        seen, deadline = set(), time.monotonic() + 300   # `/ready` names the worker that answered: each must load its model
        while len(seen) < workers and time.monotonic() < deadline:
            r = httpx.get(s.url + "/ready", headers={"connection": "close"}, timeout=30)   # a new connection: the kernel picks a worker
            if r.status_code == 200: seen.add(r.json()["worker"])
            else: time.sleep(0.2)
        assert len(seen) == workers and (workers == 1 or s.proc.pid not in seen), f"workers ready: {seen}"   # N processes of their own
        def post(i):   # a worker still loading its model answers 503 with retry-after, as a load balancer would see it
            for _ in range(60):
                r = httpx.post(s.url + "/predict", json=recs[i % len(recs)], timeout=30)
                if r.status_code != 503: return r
                time.sleep(1)
            return r
        with ThreadPoolExecutor(8) as pool: got = list(pool.map(post, range(200)))
        assert [r.status_code for r in got] == [200] * len(got), [r.text for r in got if r.status_code != 200][:3]
        ids = [r.json()["request_id"] for r in got]
    finally: s.stop()                                           # SIGTERM: each worker writes and seals what it holds
    logged = read_prediction_log(log, columns=["request_id", "record"])
    assert sorted(logged.request_id) == sorted(ids), f"{len(logged)} rows logged for {len(ids)} answers"
    assert logged.request_id.is_unique
    assert not list(log.glob("segment-*.arrows")), "a worker left its segment unsealed"
