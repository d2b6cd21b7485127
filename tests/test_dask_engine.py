"""`compute.engine: dask` on a real cluster: a `dask scheduler` and two `dask worker` processes on loopback (one
thread each, a memory limit well below the data's in-memory size, each in its own folder), the data served as many
Parquet files by an S3 API (moto in server mode). Validation, drift, the reference profile and the split give the
local streamed path's answers on the same data, on both workers, within the workers' memory; a worker SIGKILLed
mid-split changes nothing; an unreachable scheduler and a partition with a schema error stop the stage with one
clear message and nothing written.

Size: ROWS synthetic rows (1.2M by default, about 940 MB in pandas; `MLOPS_NB_DASK_ROWS` sets it) as 12 files of
two row groups each, so the module stays within a few minutes on 2 cores; the issue asks for about 2M."""
import io
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, TINY, copy_project, run
from mlops_nb.compute import drift_data, profile_data, split_data, validate_data
from mlops_nb.core import ComputeParams
from mlops_nb.data import synthetic_churn
from mlops_nb.loadtest import free_port
from mlops_nb.scale import ScaleError, drift_parquet, profile_parquet, split_parquet, validate_parquet
from mlops_nb.schema import load_schema
from test_scale_services import start, stop, wait_http

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ROWS = int(os.environ.get("MLOPS_NB_DASK_ROWS", 1_200_000))
FILES = 12
MEMORY_LIMIT = 512 * 2**20   # each worker's (about 200 MB of it is the imported libraries); the data is about 940 MB in pandas
# a process's peak resident memory in bytes: VmHWM, which starts afresh at exec (ru_maxrss keeps the peak of the process
# that forked it: the test process's, for workers it started); a lambda, so that Client.run ships it by value
PEAK_RSS = lambda: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
KEY = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def frames():
    "The data set, file by file: `synthetic_churn` chunks with their own seeds and continuing ids."
    per = ROWS // FILES
    for i in range(FILES):
        df = synthetic_churn(per, seed=100 + i).drop(columns="rownames")
        yield df


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    "Moto S3 with the data under s3://data/churn/, the same rows as one local file, a scheduler and two workers."
    tmp = tmp_path_factory.mktemp("dask-engine")
    procs = []
    try:
        s3_port, port = free_port(), free_port()
        s3 = f"http://127.0.0.1:{s3_port}"
        env = {**os.environ, **KEY, "AWS_ENDPOINT_URL": s3}
        procs.append(start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], tmp / "moto.log", env))
        wait_http(s3, procs[-1], tmp / "moto.log")
        import boto3
        store = boto3.client("s3", endpoint_url=s3, **{k.lower(): v for k, v in KEY.items() if k != "AWS_DEFAULT_REGION"},
                             region_name="us-east-1")
        store.create_bucket(Bucket="data")
        import pyarrow as pa, pyarrow.parquet as pq
        local = None
        for i, df in enumerate(frames()):
            buf = io.BytesIO()
            df.to_parquet(buf, index=False, row_group_size=-(-len(df) // 2))
            store.put_object(Bucket="data", Key=f"churn/part-{i:03d}.parquet", Body=buf.getvalue())
            table = pa.Table.from_pandas(df, preserve_index=False)
            if local is None: local = pq.ParquetWriter(tmp / "local.parquet", table.schema)
            local.write_table(table)
        local.close()
        address = f"tcp://127.0.0.1:{port}"
        procs.append(start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                           tmp / "scheduler.log", env))
        workers = {}
        for name in ("w0", "w1"):
            (tmp / name).mkdir()
            workers[name] = tmp / f"{name}.log"
            procs.append(start([str(BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                                "--memory-limit", str(MEMORY_LIMIT), "--local-directory", str(tmp / name), "--name", name],
                               workers[name], env))
        from dask.distributed import Client
        watcher = Client(address, timeout="60s")
        watcher.wait_for_workers(2, timeout=120)
        os.environ.update({**KEY, "AWS_ENDPOINT_URL": s3})   # this process (the driver) reads the footers from S3 too
        yield {"address": address, "s3": "s3://data/churn/", "local": tmp / "local.parquet", "tmp": tmp, "watcher": watcher,
               "store": store, "logs": workers, "compute": ComputeParams("dask", address)}
        watcher.close()
    finally:
        for k in ("AWS_ENDPOINT_URL",): os.environ.pop(k, None)
        for p in reversed(procs): stop(p)


def worker_names(stream) -> set:
    return {t["worker"] for t in stream}


def test_validation_drift_and_profile_on_s3_equal_the_streamed_path(cluster):
    from dask.distributed import get_task_stream
    schema = load_schema(ROOT / "schema.yaml")
    reference = profile_parquet(cluster["local"], schema, exclude=["churn"])
    first = cluster["tmp"] / "first.parquet"   # a reference from one file: the others differ by their seeds, not by much
    pd.read_parquet(cluster["local"]).head(ROWS // FILES).to_parquet(first, index=False)
    small_ref = profile_parquet(first, schema, exclude=["churn"])
    with get_task_stream(client=cluster["watcher"]) as stream:
        validated = validate_data(cluster["s3"], schema, cluster["compute"])
        profiled = profile_data(cluster["s3"], schema, exclude=["churn"], compute=cluster["compute"])
        drifted = drift_data(small_ref, cluster["s3"], compute=cluster["compute"])
    assert validated.to_dict() == validate_parquet(cluster["local"], schema).to_dict()
    assert validated.n_rows == ROWS // FILES * FILES
    assert profiled.to_dict() == reference.to_dict()
    assert drifted.to_dict() == drift_parquet(small_ref, cluster["local"]).to_dict()
    assert [f.psi for f in drifted.features] == [f.psi for f in drift_parquet(small_ref, cluster["local"]).features]
    assert len(worker_names(stream.data)) == 2, worker_names(stream.data)


@pytest.fixture(scope="module")
def local_split(cluster):
    out = cluster["tmp"] / "local-split"
    out.mkdir()
    summary = split_parquet(cluster["local"], out / "train.parquet", out / "test.parquet", "churn", "Yes", 0.25, 42, split="hash",
                            batch_rows=ROWS // FILES)
    return summary, out


def test_split_on_s3_equals_the_streamed_split_and_workers_stay_within_memory(cluster, local_split):
    from dask.distributed import get_task_stream
    out = cluster["tmp"] / "dask-split"
    out.mkdir()
    with get_task_stream(client=cluster["watcher"]) as stream:
        summary = split_data(cluster["s3"], out / "train.parquet", out / "test.parquet", "churn", "Yes", 0.25, 42, split="hash",
                             compute=cluster["compute"])
    assert summary == local_split[0]
    for side in ("train", "test"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{side}.parquet"), pd.read_parquet(local_split[1] / f"{side}.parquet"))
    split_tasks = [t for t in stream.data if "_split_part" in t["key"]]
    assert len(split_tasks) == 2 * FILES and len(worker_names(split_tasks)) == 2
    # peak resident memory of each worker process since it started, against its limit; and no worker was restarted
    peaks = cluster["watcher"].run(PEAK_RSS)
    assert len(peaks) == 2 and all(p < MEMORY_LIMIT for p in peaks.values()), peaks
    for log in cluster["logs"].values():
        text = log.read_text()
        assert "Restarting" not in text and "exceeded" not in text and "Pausing worker" not in text, text[-2000:]


def test_a_worker_killed_mid_split_changes_nothing(cluster, local_split):
    watcher = cluster["watcher"]
    pids = watcher.run(os.getpid)
    victim = sorted(pids)[1]
    out = cluster["tmp"] / "killed-split"
    out.mkdir()
    result = {}
    def split():
        try: result["summary"] = split_data(cluster["s3"], out / "train.parquet", out / "test.parquet", "churn", "Yes", 0.25, 42,
                                            split="hash", compute=cluster["compute"])
        except Exception as e: result["error"] = e
    t0 = time.time()
    thread = threading.Thread(target=split)
    thread.start()
    deadline = time.monotonic() + 120
    while not any("_split_part" in t["key"] and t["worker"] == victim for t in watcher.get_task_stream(start=t0)):
        assert time.monotonic() < deadline and thread.is_alive(), "the victim ran no split task"
        time.sleep(0.05)
    os.kill(pids[victim], signal.SIGKILL)   # mid-split: it has split a partition, more are queued
    thread.join(300)
    assert "_split_part" in str([t["key"] for t in watcher.get_task_stream(start=t0) if t["worker"] != victim])
    assert not thread.is_alive() and "error" not in result, result
    assert result["summary"] == local_split[0]
    for side in ("train", "test"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{side}.parquet"), pd.read_parquet(local_split[1] / f"{side}.parquet"))
    watcher.wait_for_workers(2, timeout=120)   # the nanny starts a fresh worker for the next tests


def test_a_file_with_other_columns_is_named(cluster, tmp_path):
    broken = next(frames()).drop(columns="tenure")
    buf = io.BytesIO()
    broken.to_parquet(buf, index=False)
    cluster["store"].put_object(Bucket="data", Key="broken/part-000.parquet", Body=cluster["store"].get_object(
        Bucket="data", Key="churn/part-000.parquet")["Body"].read())
    cluster["store"].put_object(Bucket="data", Key="broken/part-001.parquet", Body=buf.getvalue())
    with pytest.raises(ScaleError, match=r"s3://data/broken/part-001.parquet: its columns .* are not those of"):
        validate_data("s3://data/broken/", load_schema(ROOT / "schema.yaml"), cluster["compute"])



def test_ingest_from_s3_on_the_cluster_equals_the_local_ingest(cluster, tmp_path):
    """Ingest of s3://data/churn/ on the cluster (a row group per task, both workers, within their memory) writes the rows,
    provenance and content hash of ingesting the same rows from one local file here; the stage does it under
    `compute.engine: dask`, and a file with other columns stops it with one message naming the file, nothing written."""
    from dask.distributed import get_task_stream
    from mlops_nb.compute import ingest_data
    from mlops_nb.data import DataError
    from mlops_nb.scale import ingest_to_parquet, iter_batches
    here = ingest_to_parquet(str(cluster["local"]), tmp_path / "local.parquet", drop_columns=["rownames"], chunk_rows=ROWS // FILES)
    with get_task_stream(client=cluster["watcher"]) as stream:
        there = ingest_data(cluster["s3"], tmp_path / "dask.parquet", drop_columns=["rownames"], compute=cluster["compute"])
    assert there.pop("source") == "s3://data/churn/" and there.pop("ingested_at")
    assert there == {k: v for k, v in here.items() if k not in ("source", "ingested_at")} and there["rows"] == ROWS // FILES * FILES
    for a, b in zip(iter_batches(tmp_path / "dask.parquet", 200_000), iter_batches(tmp_path / "local.parquet", 200_000), strict=True):
        pd.testing.assert_frame_equal(a, b)   # a batch at a time: the test's own memory stays small
    read = [t for t in stream.data if "_ingest_part" in str(t["key"])]
    assert len(read) == 2 * FILES and len(worker_names(read)) == 2, (len(read), worker_names(read))
    peaks = cluster["watcher"].run(PEAK_RSS)
    assert len(peaks) == 2 and all(p < MEMORY_LIMIT for p in peaks.values()), peaks

    small = next(frames()).head(1000)
    for key, df in (("ingest-bad/part-000.parquet", small), ("ingest-bad/part-001.parquet", small.drop(columns="tenure"))):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False, row_group_size=250)
        cluster["store"].put_object(Bucket="data", Key=key, Body=buf.getvalue())
    with pytest.raises(DataError, match=r"^s3://data/ingest-bad/part-001.parquet: its columns .* are not those of s3://data/ingest-bad/part-000.parquet"):
        ingest_data("s3://data/ingest-bad/", tmp_path / "bad.parquet", compute=cluster["compute"])
    assert not (tmp_path / "bad.parquet").exists()
    # the stage: unreachable scheduler, then the file with other columns, then one good file on S3
    project = copy_project(tmp_path / "project", {**TINY, "data": {"source": "s3://data/ingest-bad/"},
                                                  "compute": {"engine": "dask", "scheduler": f"tcp://127.0.0.1:{free_port()}"}})
    raw, record = project / "data" / "raw" / "data.parquet", project / "reports" / "ingest" / "provenance.json"
    r = run("mlops-nb", "stage", "ingest", cwd=project, check=False)
    assert r.returncode != 0 and "cannot reach the Dask scheduler at tcp://127.0.0.1:" in r.stdout + r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not raw.exists() and not record.exists()
    import yaml
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["compute"]["scheduler"] = cluster["address"]
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    r = run("mlops-nb", "stage", "ingest", cwd=project, check=False)
    assert r.returncode != 0 and "s3://data/ingest-bad/part-001.parquet: its columns" in r.stdout + r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not raw.exists() and not record.exists()
    p["data"]["source"] = "s3://data/ingest-bad/part-000.parquet"
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    run("mlops-nb", "stage", "ingest", cwd=project)
    pd.testing.assert_frame_equal(pd.read_parquet(raw), small)
    assert json.loads(record.read_text())["source"] == "s3://data/ingest-bad/part-000.parquet"

def stage_project(tmp_path, scheduler):
    project = copy_project(tmp_path / "project", {**TINY, "compute": {"engine": "dask", "scheduler": scheduler}})
    return project


def test_stages_on_the_cluster_fail_clearly_and_split_as_locally(cluster, tmp_path):
    "Unreachable scheduler and a partition with a schema error: one message, non-zero exit, nothing written; then validate and prepare."
    project = stage_project(tmp_path, f"tcp://127.0.0.1:{free_port()}")
    raw = project / "data" / "raw" / "data.parquet"
    raw.parent.mkdir(parents=True, exist_ok=True)
    good = synthetic_churn(2000, seed=7).drop(columns="rownames")
    good.to_parquet(raw, index=False, row_group_size=500)   # four partitions
    anomalies = project / "reports" / "validate" / "anomalies.json"
    r = run("mlops-nb", "stage", "validate", cwd=project, check=False)
    assert r.returncode != 0 and "cannot reach the Dask scheduler at tcp://127.0.0.1:" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr and not anomalies.exists()

    import yaml
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["compute"]["scheduler"] = cluster["address"]
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    bad = good.copy()
    bad.loc[1500:, "payment_method"] = "Bitcoin"   # the last partition only
    bad.to_parquet(raw, index=False, row_group_size=500)
    r = run("mlops-nb", "stage", "validate", cwd=project, check=False)
    assert r.returncode != 0 and "schema skew in 1 place(s): payment_method: out_of_domain" in r.stdout + r.stderr, r.stderr[-2000:]
    assert "payment_method" in anomalies.read_text()   # the record of what failed is written whole, before the stage stops
    assert not (project / "data" / "processed" / "train.parquet").exists()

    good.to_parquet(raw, index=False, row_group_size=500)
    run("mlops-nb", "stage", "validate", cwd=project)
    run("mlops-nb", "stage", "prepare", cwd=project)
    there = {s: pd.read_parquet(project / "data" / "processed" / f"{s}.parquet") for s in ("train", "test")}
    splits = json.loads((project / "reports" / "prepare" / "splits.json").read_text())
    reference = json.loads((project / "models" / "reference_profile.json").read_text())
    p["compute"]["engine"] = "local"
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    run("mlops-nb", "stage", "prepare", cwd=project)
    for s in ("train", "test"): pd.testing.assert_frame_equal(there[s], pd.read_parquet(project / "data" / "processed" / f"{s}.parquet"))
    assert splits == json.loads((project / "reports" / "prepare" / "splits.json").read_text())
    assert reference == json.loads((project / "models" / "reference_profile.json").read_text())


def test_a_whole_run_on_the_cluster_trains_across_both_workers_and_its_champion_serves(cluster, tmp_path):
    """`compute.engine: dask` and `train.model: lgbm_dask` (LightGBM's Dask trainer, on the cluster $DASK_SCHEDULER_ADDRESS
    names): validate, prepare and the training run on the two workers within their memory; the model learns from every
    training row (the sample of `prepare.max_train_rows` and the rows it left out), not the sample; its ONNX export passes
    parity, the release gate (served, called, load-tested) passes, it becomes champion, and `mlops-nb serve` answers with it."""
    import httpx
    import sys
    import mlflow
    from dask.distributed import get_task_stream
    from conftest import champion_version, git_init
    from mlops_nb.loadtest import ServiceProcess
    from mlops_nb.registry import use_project_tracking
    project = copy_project(tmp_path / "project", {
        **TINY, "data": {"source": "synthetic", "n_rows": 3000}, "train": {"model": "lgbm_dask"}, "prepare": {"max_train_rows": 1000},
        "evaluate": {**TINY["evaluate"], "sample_rows": 500},   # below the test split's ~750 rows: the frame-based parts read a sample
        "compute": {"engine": "dask", "scheduler": cluster["address"]},
        "infra": {**TINY["infra"], "service": True}, "register": {"promote_dirty": True},
        "serve": {"loadtest_seconds": 1.0, "budget_p99_ms": 60000.0, "budget_min_rps": 0.1}})
    git_init(project)
    with get_task_stream(client=cluster["watcher"]) as stream:
        result = run("mlops-nb", "run", cwd=project, env={"DASK_SCHEDULER_ADDRESS": cluster["address"]})
    assert "-> champion" in result.stdout, result.stdout[-3000:]
    keys = {t["key"] if isinstance(t["key"], str) else str(t["key"]) for t in stream.data}
    trained = [t for t in stream.data if "_xy" in str(t["key"]) or "_train_part" in str(t["key"])]
    assert len(worker_names(trained)) == 2, (worker_names(trained), sorted(keys)[:20])       # both workers trained
    assert any("_check_one" in str(t["key"]) for t in stream.data) and any("_split_part" in str(t["key"]) for t in stream.data)
    peaks = cluster["watcher"].run(PEAK_RSS)
    assert all(p < MEMORY_LIMIT for p in peaks.values()), peaks
    processed = project / "data" / "processed"
    sample, rest = (len(pd.read_parquet(processed / f"{s}.parquet")) for s in ("train", "train_rest"))
    splits = json.loads((project / "reports" / "prepare" / "splits.json").read_text())
    trained_on = json.loads((project / "reports" / "metrics" / "train.json").read_text())["train_rows"]
    assert sample <= 1000 < trained_on == sample + rest == 3000 - splits["unlabelled_rows_dropped"] - splits["test"]["rows"], \
        (sample, rest, trained_on, splits)
    use_project_tracking(project)
    run_id = json.loads((project / "models" / "mlflow_run.json").read_text())["run_id"]
    assert mlflow.get_run(run_id).data.metrics["train_rows"] == trained_on
    # evaluate scored the test split a row group per task: its metrics are those of the model scoring it here
    import joblib
    from mlops_nb.evaluate import predict_scores, task_metrics
    test_split = pd.read_parquet(processed / "test.parquet")
    here = task_metrics("binary", test_split.churn, predict_scores(joblib.load(project / "models" / "model.joblib"), test_split.drop(columns="churn"), "binary"))
    assert json.loads((project / "reports" / "metrics" / "evaluate.json").read_text()) == pytest.approx(here, abs=1e-9, rel=0)
    assert here["n"] == len(test_split) > 500   # every test row, not the sample
    # the frame-based parts read a seeded sample of evaluate.sample_rows test rows, and gate.json says so
    gate = json.loads((project / "reports" / "evaluate" / "gate.json").read_text())
    assert gate["sample"]["rows"] == 500 and gate["sample"]["of"] == len(test_split), gate.get("sample")
    assert "deepchecks suites and the effects of their failed checks" in gate["sample"]["used_for"] and "metrics" in gate["sample"]["every_row"]
    slices = pd.read_csv(project / "reports" / "evaluate" / "slices.csv")
    assert (slices.query("slice == 'overall'").n == 500).all(), slices.head()
    assert "a seeded sample of 500 of them" in (project / "reports" / "notebooks" / "evaluate.ipynb").read_text()
    assert any("_score_part" in str(t["key"]) for t in stream.data)
    infra = json.loads((project / "reports" / "infra" / "infra.json").read_text())
    assert all(c["passed"] for c in infra["checks"]) and any("load test" in c["check"] for c in infra["checks"]), infra["checks"]
    use_project_tracking(project)
    files = Path(mlflow.artifacts.download_artifacts(f"models:/churn-classifier/{champion_version(project)}")) / "extra_files"
    onnx_report = json.loads((files / "onnx.json").read_text())
    assert onnx_report["passed"] and (files / "model.onnx").is_file(), onnx_report
    record = pd.read_parquet(project / "data" / "processed" / "test.parquet").drop(columns="churn").head(3)
    with ServiceProcess([str(Path(sys.executable).parent / "mlops-nb"), "serve", "--port", "{port}", "--log-dir", ""],
                        "/ready", cwd=project, log=tmp_path / "serve.log", timeout=120) as s:
        ready = httpx.get(s.url + "/ready", timeout=30).json()
        answer = httpx.post(s.url + "/predict", json=json.loads(record.to_json(orient="records")), timeout=60)
    assert ready["model_version"] == champion_version(project) and answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 3, answer.json()

    # `mlops-nb predict` on the cluster (compute.engine dask in this project's params): the test split as three Parquet files
    # on S3, a row group of at most 100 rows per task, equals `--engine local` on the same rows read here 100 at a time
    test = pd.read_parquet(processed / "test.parquet").drop(columns="churn")
    for i, k in enumerate(range(0, len(test), -(-len(test) // 3))):
        buf = io.BytesIO()
        test.iloc[k:k + -(-len(test) // 3)].to_parquet(buf, index=False, row_group_size=100)
        cluster["store"].put_object(Bucket="data", Key=f"scoring/part-{i:03d}.parquet", Body=buf.getvalue())
    test.to_parquet(tmp_path / "scoring.parquet", index=False)
    with get_task_stream(client=cluster["watcher"]) as stream:
        there = run("mlops-nb", "predict", "--data", "s3://data/scoring/", "--out", str(tmp_path / "dask.parquet"), "--no-log", cwd=project)
    here = run("mlops-nb", "predict", "--engine", "local", "--data", str(tmp_path / "scoring.parquet"), "--out", str(tmp_path / "local.parquet"),
               "--chunk-rows", "100", "--no-log", cwd=project)
    assert f"scored {len(test)} rows" in there.stdout and f"scored {len(test)} rows" in here.stdout, there.stdout + here.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "dask.parquet"), pd.read_parquet(tmp_path / "local.parquet"))
    reports = [json.loads((tmp_path / f"{n}.parquet.report.json").read_text()) for n in ("dask", "local")]
    assert [{k: v for k, v in r.items() if k not in ("source", "out", "request_id")} for r in reports][0] == \
           [{k: v for k, v in r.items() if k not in ("source", "out", "request_id")} for r in reports][1]
    scored = [t for t in stream.data if "_on_partition" in str(t["key"])]
    assert len(scored) >= 2 * 6 and len(worker_names(scored)) == 2, (len(scored), worker_names(scored))   # checked and scored on both workers


def test_monitor_on_the_cluster_equals_the_local_engine(cluster, tmp_path):
    """`mlops-nb monitor --data s3://data/churn/ --engine dask` against a small champion (a logistic regression registered
    in this test's own store, with the references the pipeline stores): the schema checks and the feature drift (a column
    per task) and the scoring of the batch (a row group per task) run on both workers within their memory, the driver
    never holds the batch, and the report is `--engine local`'s on the same rows read whole (the same schema result, drift
    scores, prediction drift, estimated metrics and decision). An unreachable scheduler and a CSV batch: one line, exit 1."""
    import sys
    import yaml
    from dask.distributed import get_task_stream
    from test_monitor import champion_project
    root, _ = champion_project(tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["compute"]["engine"] == "local"   # the flag chooses the engine; $DASK_SCHEDULER_ADDRESS names the cluster

    def monitor(engine: str, data, out: str, scheduler: str = cluster["address"]):
        """The command in a Python process that prints its own peak memory (bytes) as its last line: VmHWM, which exec resets
        (ru_maxrss keeps the parent's peak across exec: a test process that held 1.6 GB would be every child's floor)."""
        code = ("import sys; from mlops_nb.cli import main; rc = main(sys.argv[1:]); "
                "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))); sys.exit(rc)")
        r = run(sys.executable, "-c", code, "monitor", "--engine", engine, "--data", str(data), "--out", str(tmp_path / out), "--no-notebook",
                cwd=root, check=False, env={"DASK_SCHEDULER_ADDRESS": scheduler})
        report = tmp_path / out / "monitor.json"
        return r, json.loads(report.read_text()) if report.exists() else None

    started = time.perf_counter()
    with get_task_stream(client=cluster["watcher"]) as stream:
        there, dask_report = monitor("dask", cluster["s3"], "dask")
    seconds = [time.perf_counter() - started]
    here, local_report = monitor("local", cluster["local"], "local")
    seconds.append(time.perf_counter() - started - seconds[0])
    assert dask_report is not None and local_report is not None, there.stderr[-3000:] + here.stderr[-3000:]
    assert there.returncode == here.returncode == dask_report["exit_code"] and there.returncode in (0, 4), there.stdout + there.stderr
    assert dask_report["n_records"] == local_report["n_records"] == ROWS // FILES * FILES
    for key in ("drift", "schema", "predictions", "decision", "reasons", "version_mix", "window", "multivariate"):
        assert dask_report[key] == local_report[key], key
    # the estimated metrics: to 1e-6 (a row group's scores may differ from the whole batch's in their last bits, and ranks with them)
    flat = lambda o: [v for x in (o.values() if isinstance(o, dict) else o) for v in flat(x)] if isinstance(o, (dict, list)) else [o]
    metrics = [flat(r["metrics"]) for r in (dask_report, local_report)]
    assert [v for v in metrics[0] if not isinstance(v, float)] == [v for v in metrics[1] if not isinstance(v, float)]
    assert [v for v in metrics[0] if isinstance(v, float)] == pytest.approx([v for v in metrics[1] if isinstance(v, float)], rel=1e-6, abs=1e-9)
    assert dask_report["predictions"] is not None and dask_report["metrics"]["estimated"]["n"] == ROWS // FILES * FILES   # the batch was scored
    assert dask_report["notes"][:-1] == local_report["notes"] and "engine dask" in dask_report["notes"][-1], dask_report["notes"]
    tasks = {kind: [t for t in stream.data if kind in str(t["key"])] for kind in ("_check_one", "_score_part", "_window_part")}
    assert all(tasks.values()) and all(len(worker_names(ts)) == 2 for k, ts in tasks.items() if k != "_check_one"), \
        {k: worker_names(ts) for k, ts in tasks.items()}
    assert len(tasks["_score_part"]) == 2 * FILES   # every row group scored once
    peaks = cluster["watcher"].run(PEAK_RSS)
    assert len(peaks) == 2 and all(p < MEMORY_LIMIT for p in peaks.values()), peaks
    driver, whole = int(there.stdout.split()[-1]), int(here.stdout.split()[-1])
    assert driver < whole / 2, (driver, whole)   # the local engine holds the batch; the Dask driver its outputs and a sample
    print(f"monitor of {ROWS} rows: dask driver peak {driver / 2**20:.0f} MiB in {seconds[0]:.1f} s, local {whole / 2**20:.0f} MiB "
          f"in {seconds[1]:.1f} s; worker peaks {sorted(round(p / 2**20) for p in peaks.values())} MiB")   # figures, not asserted

    r, report = monitor("dask", cluster["s3"], "unreachable", scheduler=f"tcp://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and report is None and "error: cannot reach the Dask scheduler at tcp://127.0.0.1:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    pd.read_parquet(cluster["local"]).head(100).to_csv(tmp_path / "batch.csv", index=False)
    r, report = monitor("dask", tmp_path / "batch.csv", "csv")
    assert r.returncode == 1 and report is None and "compute.engine dask monitors Parquet data" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
