"""Serving throughput, five ways in one run: a trivial FastAPI JSON endpoint (the web framework's ceiling),
`mlops-nb serve` on ONNX (its `/predict`, and its MLflow-protocol `/invocations` with MLflow's payload),
`mlops-nb serve` on scikit-learn, and `mlflow models serve`; same model, same load generator.

Registers one model (the project's default algorithm, with its parity-checked ONNX export) in a throw-away tracking
store, serves it each way on loopback ports, and drives each with single-record requests from the same closed-loop
generator (8 concurrent clients, 10 s by default). The ceiling parses the same JSON bodies and answers a constant.
The ceiling and `mlops-nb serve` (ONNX) run side by side and take turns (`--rounds`, 3 by default, of `seconds / rounds`
each), so a slow spell of the machine falls on both: their req/s is the mean over rounds, their latency percentiles
the worst round's, and the ratio of each round is printed.
Beside them: the ONNX service with its prediction log off (what logging every answered record costs the tail), the
ONNX service at 50% and 80% of its own maximum req/s driven open-loop (requests sent on schedule, latency counted
from when each was due, as wrk2 does: the p99 a closed loop hides), and the scikit-learn service with `--workers 2`
(its time is the model's, so two processes on two cores should approach 2x).
Optionally (`--soak 60`) keeps `mlops-nb serve` (ONNX) under load for that long, sampling its RSS every second, and
checks that the prediction log holds every answered record. The generator runs on the same machine and competes
with the services for its cores: absolute figures understate every service, the ratios are what holds.

    python benchmarks/serving.py [--seconds 10] [--concurrency 8] [--rounds 3] [--soak 60]
    python benchmarks/serving.py --setup-only   # register, serve once, stop: what the isolation test runs

Everything it does (the registration in this process, every service it starts) uses its own temporary tracking store
and registry, whatever MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI say: a team's registry is never touched.

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


def isolated_env(store: Path) -> dict:
    "MLflow's tracking store and registry in `store` (a temporary folder): for this process and every service a benchmark starts."
    uri = f"sqlite:///{store / 'mlflow.db'}"
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def setup(store: Path) -> tuple[str, pd.DataFrame]:
    "Register the default algorithm's Pipeline as champion in `store` (its own registry, never the user's); return its version and the records to send."
    from mlops_nb.core import load_params
    from mlops_nb.data import encode_target, synthetic_churn
    from mlops_nb.export import export_onnx, write_export
    from mlops_nb.registry import _promote, pipeline_run, register_model, use_project_tracking
    from mlops_nb.schema import load_schema
    from mlops_nb.train import build_model
    test = ROOT / "data" / "processed" / "test.parquet"
    df = encode_target(synthetic_churn(2000, seed=7).drop(columns="rownames"), "churn", "Yes")
    X, y = df.drop(columns="churn"), df.churn
    records = pd.read_parquet(test).drop(columns="churn") if test.exists() else X.iloc[:1000]
    shutil.copy2(ROOT / "schema.yaml", store / "schema.yaml")
    (store / "gate.json").write_text('{"blessed": true}')
    os.environ.update(isolated_env(store))   # the user's MLFLOW_TRACKING_URI (a team's server) is not this benchmark's store
    if use_project_tracking(store) != isolated_env(store)["MLFLOW_TRACKING_URI"]: raise SystemExit("the benchmark's tracking store is not its own")
    algorithm = load_params(ROOT / "params.yaml").train.model  # the project's default model (hgb)
    model = build_model(algorithm, X).fit(X, y)
    onnx = export_onnx(model, X.iloc[:500], load_schema(store / "schema.yaml"))
    if not onnx.usable: raise SystemExit(f"the model has no usable ONNX export: {onnx.report.get('reason')}")
    with pipeline_run(run_name="bench-serving"):
        reg = register_model(model, X.head(5), NAME, blessed=True,
                             extra_files=[store / "schema.yaml", store / "gate.json", *write_export(onnx, store / "onnx")])
    _promote(NAME, reg["version"])
    return reg["version"], records


CEILING_APP = """
import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

app = FastAPI()

@app.post("/predict")
async def predict(request: Request):
    orjson.loads(await request.body())   # parse the body, as any service must
    return Response(orjson.dumps({"predictions": [0], "probabilities": [[0.5, 0.5]]}), media_type="application/json")

@app.get("/ready")
async def ready(): return {"ready": True}
"""


def alternate(urls: dict[str, str], records, concurrency: int, seconds: float, rounds: int) -> dict:
    "Load each of `urls` in turn, `rounds` times for `seconds / rounds`: mean req/s, the worst round's latencies."
    from mlops_nb.loadtest import loadtest
    got = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items(): got[name].append(loadtest(url, records, concurrency, seconds / rounds))
    merged = lambda rs: {"rps": round(sum(r["rps"] for r in rs) / len(rs), 1), "round_rps": [r["rps"] for r in rs],
                         **{k: sum(r[k] for r in rs) for k in ("ok", "errors", "requests")},
                         **{k: max(r[k] for r in rs) for k in ("p50_ms", "p95_ms", "p99_ms")}}
    return {name: merged(rs) for name, rs in got.items()}


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


def setup_check(work: Path, env: dict, version: str, records) -> int:
    "The set-up alone: the service the benchmark would load finds the champion `setup` registered, and answers."
    import httpx
    from mlops_nb.loadtest import ServiceProcess
    cmd = [str(BIN / "mlops-nb"), "serve", "--model", f"models:/{NAME}@champion", "--host", "127.0.0.1", "--port", "{port}",
           "--log-dir", "", "--poll-seconds", "0"]
    ours = ServiceProcess(cmd, "/ready", env=env, cwd=work / "project", log=work / "setup-serve.log", timeout=300)
    try: r = httpx.post(ours.url + "/predict", content=json.dumps(records.dropna().head(1).to_dict("records")[0], default=str), timeout=30)
    finally: ours.stop()
    print(json.dumps({"benchmark": "serving", "setup_only": True, "version": version, "status": r.status_code,
                      "served_version": r.json().get("model_version"), "tracking_uri": env["MLFLOW_TRACKING_URI"]}))
    return 0 if r.status_code == 200 and r.json().get("model_version") == version else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="load duration per service")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    ap.add_argument("--rounds", type=int, default=3, help="turns the ceiling and the ONNX service take (each seconds/rounds)")
    ap.add_argument("--soak", type=float, default=0.0, help="also soak mlops-nb serve this many seconds (RSS, log completeness)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "serving.json")
    ap.add_argument("--setup-only", action="store_true", help="register, start mlops-nb serve on it, answer one request, stop (no load, no report)")
    args = ap.parse_args(argv)
    from mlops_nb.core import write_json
    from mlops_nb.loadtest import loadtest
    from mlops_nb.predlog import read_prediction_log

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        version, records = setup(work)
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **isolated_env(work)}
        (work / "project").mkdir()
        shutil.copy2(ROOT / "params.yaml", work / "project" / "params.yaml")
        if args.setup_only: return setup_check(work, env, version, records)
        runs = {}
        # the ceiling: the same web stack (uvicorn, uvloop, httptools, FastAPI) parsing the body and answering a constant
        (work / "ceiling.py").write_text(CEILING_APP)
        ceiling = ServiceProcess([str(BIN / "uvicorn"), "ceiling:app", "--host", "127.0.0.1", "--port", "{port}", "--loop", "uvloop",
                                  "--http", "httptools", "--no-access-log", "--log-level", "warning"], "/ready", env=env, cwd=work,
                                 log=work / "ceiling.log", timeout=600)
        soaked = None
        try:
            for runtime in ("onnx", "sklearn"):
                ours_cmd = [str(BIN / "mlops-nb"), "serve", "--model", f"models:/{NAME}@champion", "--host", "127.0.0.1", "--port", "{port}",
                            "--runtime", runtime, "--log-dir", str(work / f"log-{runtime}"), "--poll-seconds", "0"]
                ours = ServiceProcess(ours_cmd, "/ready", env=env, cwd=work / "project", log=work / f"mlops-serve-{runtime}.log", timeout=600)
                try:
                    if runtime == "onnx":  # side by side with the ceiling, in turns
                        runs.update(alternate({"FastAPI ceiling": ceiling.url + "/predict", "mlops-nb serve (onnx)": ours.url + "/predict"},
                                              records, args.concurrency, args.seconds, args.rounds))
                        ceiling.stop()
                    else: runs[f"mlops-nb serve ({runtime})"] = loadtest(ours.url + "/predict", records, args.concurrency, args.seconds)
                    if runtime == "onnx":  # the drop-in: the same server driven exactly as mlflow models serve is driven below
                        runs["mlops-nb /invocations (onnx)"] = loadtest(ours.url + "/invocations", records, args.concurrency, args.seconds, wrap="mlflow")
                    if runtime == "onnx":  # the tail at fixed rates below the maximum, sent on schedule (open loop, as wrk2)
                        top = runs["mlops-nb serve (onnx)"]["rps"]
                        for share_of_max in (0.5, 0.8):
                            runs[f"onnx at {share_of_max:.0%} of max (open loop)"] = loadtest(ours.url + "/predict", records, max(args.concurrency, 16),
                                                                                              args.seconds, rate=max(1.0, share_of_max * top))
                    if runtime == "onnx" and args.soak > 0: soaked = soak(ours.url, ours.proc.pid, records, args.soak, args.concurrency)
                finally: ours.stop()
                # the same service with the prediction log off (ONNX: what the log costs), and with two workers (scikit-learn: scaling)
                extra, cmd = ("log off", ours_cmd[:-4] + ["--log-dir", "", "--poll-seconds", "0"]) if runtime == "onnx" else \
                             ("2 workers", [*ours_cmd[:-4], "--log-dir", str(work / "log-sklearn-2"), "--poll-seconds", "0", "--workers", "2"])
                other = ServiceProcess(cmd, "/ready", env=env, cwd=work / "project", log=work / f"mlops-serve-{runtime}-{extra}.log", timeout=600)
                try: runs[f"mlops-nb serve ({runtime}, {extra})"] = loadtest(other.url + "/predict", records, args.concurrency, args.seconds)
                finally: other.stop()
        finally: ceiling.stop()
        # the baseline: MLflow's own scoring server, one worker (its default), the same model version
        base = ServiceProcess([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/{version}", "--env-manager", "local",
                                "-h", "127.0.0.1", "-p", "{port}"], "/ping", env=env, log=work / "mlflow-serve.log", timeout=600)
        try: runs["mlflow models serve"] = loadtest(base.url + "/invocations", records, args.concurrency, args.seconds, wrap="mlflow")
        finally: base.stop()
        logged = {rt: len(read_prediction_log(work / f"log-{rt}")) for rt in ("onnx", "sklearn")}
        answered = {"onnx": sum(runs[n]["ok"] for n in ("mlops-nb serve (onnx)", "mlops-nb /invocations (onnx)", "onnx at 50% of max (open loop)",
                                                        "onnx at 80% of max (open loop)")) + (soaked["ok"] if soaked else 0),
                    "sklearn": runs["mlops-nb serve (sklearn)"]["ok"]}

        c, o, k, b = (runs[n] for n in ("FastAPI ceiling", "mlops-nb serve (onnx)", "mlops-nb serve (sklearn)", "mlflow models serve"))
        inv = runs["mlops-nb /invocations (onnx)"]
        print(f"\nsingle-record requests, {args.concurrency} concurrent clients, {args.seconds:g} s each, loopback;"
              f" the load generator shares the machine's {os.cpu_count()} cores with the services\n")
        print(f"{'service':<36}{'req/s':>10}{'of ceiling':>12}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'errors':>8}")
        share = lambda r: r["rps"] / c["rps"] if c["rps"] else float("nan")
        for name, r in runs.items():
            print(f"{name:<36}{r['rps']:>10.1f}{share(r):>11.0%} {r['p50_ms']:>10.2f}{r['p95_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['errors']:>8}")
        ratio = round(o["rps"] / b["rps"], 1) if b["rps"] else None
        print(f"\nratios: ONNX/ceiling {share(o):.2f}, scikit-learn/ceiling {share(k):.2f}, ONNX/scikit-learn {o['rps'] / k['rps']:.1f}x, "
              f"ONNX/mlflow {ratio}x, scikit-learn/mlflow {k['rps'] / b['rps']:.1f}x")
        inv_ratio = round(inv["rps"] / b["rps"], 1) if b["rps"] else None
        print(f"MLflow's protocol, same payload: mlops-nb /invocations {inv['rps']:.1f} req/s, mlflow models serve {b['rps']:.1f} req/s "
              f"({inv_ratio}x); /invocations/predict {inv['rps'] / o['rps']:.2f}")
        print("ONNX/ceiling per round: " + ", ".join(f"{a / b:.2f}" for a, b in zip(o["round_rps"], c["round_rps"])))
        goal = share(o) >= 0.5 and o["p99_ms"] < 20
        print(f"goal (ONNX: at least 50% of the ceiling's req/s, p99 under 20 ms at {args.concurrency} connections): "
              + ("met" if goal else "NOT met"))
        for rt in ("onnx", "sklearn"):
            print(f"prediction log ({rt}): {logged[rt]} rows for {answered[rt]} answered records" + (" (complete)" if logged[rt] == answered[rt] else " (INCOMPLETE)"))
        if soaked:
            print(f"soak {args.soak:g} s: {soaked['rps']} req/s, p99 {soaked['p99_ms']} ms, errors {soaked['errors']}; RSS after warm-up "
                  f"{soaked['rss_start_mb']} -> {soaked['rss_end_mb']} MB (max {soaked['rss_max_mb']}, growth {soaked['rss_growth_pct']}%)")
        off, two = runs["mlops-nb serve (onnx, log off)"], runs["mlops-nb serve (sklearn, 2 workers)"]
        print(f"the prediction log's cost: ONNX p99 {o['p99_ms']:.2f} ms with it, {off['p99_ms']:.2f} ms without; req/s {o['rps'] / off['rps']:.2f} of log-off")
        print(f"--workers: scikit-learn 2 workers / 1 worker {two['rps'] / k['rps']:.2f}x req/s")
        for q in ("50%", "80%"):
            r = runs[f"onnx at {q} of max (open loop)"]
            print(f"ONNX at {q} of its maximum ({r['rate']:.0f} req/s on schedule): p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}")
        r2 = lambda x: round(x, 2)
        result = {"benchmark": "serving", "ours_rps": o["rps"], "baseline": "mlflow models serve", "baseline_rps": b["rps"], "ratio": ratio,
                  "ceiling_rps": c["rps"], "onnx_rps": o["rps"], "sklearn_rps": k["rps"], "mlflow_rps": b["rps"],
                  "onnx_of_ceiling": r2(share(o)), "sklearn_of_ceiling": r2(share(k)), "onnx_over_sklearn": r2(o["rps"] / k["rps"]),
                  "ceiling_p99_ms": c["p99_ms"], "onnx_p99_ms": o["p99_ms"], "sklearn_p99_ms": k["p99_ms"], "mlflow_p99_ms": b["p99_ms"],
                  "ours_p50_ms": o["p50_ms"], "ours_p99_ms": o["p99_ms"], "baseline_p50_ms": b["p50_ms"], "baseline_p99_ms": b["p99_ms"],
                  "goal_met": goal, "concurrency": args.concurrency, "seconds": args.seconds, "rounds": args.rounds,
                  "onnx_of_ceiling_per_round": [r2(a / b) for a, b in zip(o["round_rps"], c["round_rps"])], "cpus": os.cpu_count(),
                  "errors": sum(r["errors"] for r in runs.values()),
                  "invocations_rps": inv["rps"], "invocations_p99_ms": inv["p99_ms"], "invocations_over_mlflow": inv_ratio,
                  "invocations_of_predict": r2(inv["rps"] / o["rps"]) if o["rps"] else None, "log_complete": all(logged[rt] == answered[rt] for rt in logged),
                  "onnx_log_off_rps": off["rps"], "onnx_log_off_p99_ms": off["p99_ms"], "sklearn_2_workers_rps": two["rps"],
                  "sklearn_2_over_1_workers": r2(two["rps"] / k["rps"]),
                  **{f"onnx_rate_{q}_p99_ms": runs[f"onnx at {q}% of max (open loop)"]["p99_ms"] for q in (50, 80)}}
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
