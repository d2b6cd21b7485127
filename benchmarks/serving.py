"""Serving throughput: `mlops-nb serve` against `mlflow models serve`, same model, same load generator.

Registers one model in a throw-away tracking store, serves it both ways on loopback ports, and drives each with
single-record requests from the same closed-loop generator (8 concurrent clients, 10 s by default). Optionally
(`--soak 60`) keeps `mlops-nb serve` under load for that long, sampling its RSS every second, and checks that
the prediction log holds every answered record. The generator runs on the same machine and competes with the
service for its cores: absolute figures understate both services, the ratio is what holds.

    python benchmarks/serving.py [--seconds 10] [--concurrency 8] [--soak 60]

Prints a table, then as its last line one JSON object, also written to reports/benchmarks/serving.json.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mlops_nb.loadtest import ServiceProcess  # noqa: E402
BIN = Path(sys.executable).parent
NAME = "churn-classifier"


def setup(store: Path) -> tuple[str, pd.DataFrame]:
    "Register the default algorithm's Pipeline as champion in `store`; return its version and the records to send."
    from mlops_nb.core import load_params
    from mlops_nb.data import encode_target, synthetic_churn
    from mlops_nb.registry import _promote, pipeline_run, register_model, use_project_tracking
    from mlops_nb.train import build_model
    test = ROOT / "data" / "processed" / "test.parquet"
    df = encode_target(synthetic_churn(2000, seed=7).drop(columns="rownames"), "churn", "Yes")
    X, y = df.drop(columns="churn"), df.churn
    records = pd.read_parquet(test).drop(columns="churn") if test.exists() else X.iloc[:1000]
    shutil.copy2(ROOT / "schema.yaml", store / "schema.yaml")
    (store / "gate.json").write_text('{"blessed": true}')
    use_project_tracking(store)
    algorithm = load_params(ROOT / "params.yaml").train.model  # the project's default model (hgb)
    with pipeline_run(run_name="bench-serving"):
        reg = register_model(build_model(algorithm, X).fit(X, y), X.head(5), NAME, blessed=True,
                             extra_files=[store / "schema.yaml", store / "gate.json"])
    _promote(NAME, reg["version"])
    return reg["version"], records


def soak(url: str, pid: int, records, seconds: float, concurrency: int) -> dict:
    "Load for `seconds` while sampling the service's RSS every second."
    import psutil
    from mlops_nb.loadtest import loadtest
    proc, rss, result = psutil.Process(pid), [], {}
    t = threading.Thread(target=lambda: result.update(loadtest(url + "/predict", records, concurrency, seconds)))
    t.start()
    for _ in range(int(seconds) + 30):
        if not t.is_alive(): break
        rss.append(proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True)))
        time.sleep(1)
    t.join()
    warm = rss[len(rss) // 6:] or rss          # after the first sixth (warm-up)
    mb = [r / 2**20 for r in warm]
    return {**result, "rss_start_mb": round(mb[0], 1), "rss_end_mb": round(mb[-1], 1), "rss_max_mb": round(max(mb), 1),
            "rss_growth_pct": round(100 * (max(mb) - mb[0]) / mb[0], 1), "rss_samples": len(rss)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="load duration per service")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    ap.add_argument("--soak", type=float, default=0.0, help="also soak mlops-nb serve this many seconds (RSS, log completeness)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "serving.json")
    args = ap.parse_args(argv)
    from mlops_nb.core import write_json
    from mlops_nb.loadtest import loadtest
    from mlops_nb.predlog import read_prediction_log

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        version, records = setup(work)
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        (work / "project").mkdir()
        shutil.copy2(ROOT / "params.yaml", work / "project" / "params.yaml")
        runs = {}
        # the baseline: MLflow's own scoring server, one worker (its default), the same model version
        base = ServiceProcess([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/{version}", "--env-manager", "local",
                                "-h", "127.0.0.1", "-p", "{port}"], "/ping", env=env, log=work / "mlflow-serve.log")
        try: runs["mlflow models serve"] = loadtest(base.url + "/invocations", records, args.concurrency, args.seconds, wrap="mlflow")
        finally: base.stop()
        ours_cmd = [str(BIN / "mlops-nb"), "serve", "--model", f"models:/{NAME}@champion", "--host", "127.0.0.1", "--port", "{port}",
                    "--log-dir", str(work / "log"), "--poll-seconds", "0"]
        ours = ServiceProcess(ours_cmd, "/ready", env=env, cwd=work / "project", log=work / "mlops-serve.log")
        try:
            runs["mlops-nb serve"] = loadtest(ours.url + "/predict", records, args.concurrency, args.seconds)
            soaked = soak(ours.url, ours.proc.pid, records, args.soak, args.concurrency) if args.soak > 0 else None
        finally: ours.stop()
        logged = len(read_prediction_log(work / "log"))
        answered = runs["mlops-nb serve"]["ok"] + (soaked["ok"] if soaked else 0)

        o, b = runs["mlops-nb serve"], runs["mlflow models serve"]
        print(f"\nsingle-record requests, {args.concurrency} concurrent clients, {args.seconds:g} s each, loopback;"
              f" the load generator shares the machine's {os.cpu_count()} cores with the service\n")
        print(f"{'service':<22}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'errors':>8}")
        for name, r in runs.items():
            print(f"{name:<22}{r['rps']:>10.1f}{r['p50_ms']:>10.2f}{r['p95_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['errors']:>8}")
        ratio = round(o["rps"] / b["rps"], 1) if b["rps"] else None
        print(f"{'ratio (ours/mlflow)':<22}{ratio:>10}{b['p50_ms'] / o['p50_ms']:>9.1f}x{'':>10}{b['p99_ms'] / o['p99_ms']:>9.1f}x  (latency: baseline/ours)")
        print(f"\nprediction log: {logged} rows for {answered} answered records" + (" (complete)" if logged == answered else " (INCOMPLETE)"))
        if soaked:
            print(f"soak {args.soak:g} s: {soaked['rps']} req/s, p99 {soaked['p99_ms']} ms, errors {soaked['errors']}; RSS after warm-up "
                  f"{soaked['rss_start_mb']} -> {soaked['rss_end_mb']} MB (max {soaked['rss_max_mb']}, growth {soaked['rss_growth_pct']}%)")
        result = {"benchmark": "serving", "ours_rps": o["rps"], "baseline": "mlflow models serve", "baseline_rps": b["rps"], "ratio": ratio,
                  "ours_p50_ms": o["p50_ms"], "ours_p99_ms": o["p99_ms"], "baseline_p50_ms": b["p50_ms"], "baseline_p99_ms": b["p99_ms"],
                  "concurrency": args.concurrency, "seconds": args.seconds, "cpus": os.cpu_count(), "errors": o["errors"] + b["errors"],
                  "log_complete": logged == answered}
        if soaked:
            result.update(soak_seconds=args.soak, soak_rps=soaked["rps"], soak_p99_ms=soaked["p99_ms"], soak_errors=soaked["errors"],
                          rss_start_mb=soaked["rss_start_mb"], rss_end_mb=soaked["rss_end_mb"], rss_growth_pct=soaked["rss_growth_pct"])
        write_json(args.out, result)
        print(json.dumps(result))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
