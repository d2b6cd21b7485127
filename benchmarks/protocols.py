"""The Open Inference Protocol's two encodings side by side: a 1,000-row batch sent by `tritonclient.http` as JSON
tensors (`binary_data=False`) and as binary tensor data (its default), to the same `mlops-nb serve`.

Registers a small classifier in a throw-away tracking store and registry (whatever `MLFLOW_TRACKING_URI` and
`MLFLOW_REGISTRY_URI` say: the store is set for this process and for the service), serves it on a loopback port, and alternates the two encodings request by
request (`--requests` each, 30 by default), so a slow spell of the machine falls on both. Reports the bytes on the
wire each way and the client-side latency (median and p95), and the ratios JSON / binary.

    python benchmarks/protocols.py [--rows 1000] [--requests 30]
    python benchmarks/protocols.py --setup-only   # register, serve, answer one request, stop: what the isolation test runs

Prints a table, then as its last line one JSON object, also written to reports/benchmarks/protocols.json.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from mlops_nb.loadtest import ServiceProcess  # noqa: E402
from serving import isolated_env  # noqa: E402  (the same throw-away tracking store and registry)
BIN = Path(sys.executable).parent
NAME = "churn-classifier"   # the model name params.yaml gives the service


def setup(store: Path, rows: int):
    "Register a logistic regression as champion of `NAME` in `store`; the frame of `rows` records to send."
    from mlops_nb.data import encode_target, synthetic_churn
    from mlops_nb.registry import _promote, pipeline_run, register_model, use_project_tracking
    from mlops_nb.train import build_model
    for f in ("params.yaml", "schema.yaml"): shutil.copy2(ROOT / f, store / f)
    (store / "gate.json").write_text('{"blessed": true}')
    df = encode_target(synthetic_churn(max(rows, 500), seed=11).drop(columns="rownames"), "churn", "Yes")
    X, y = df.drop(columns="churn"), df.churn
    model = build_model("logreg", X, 0).fit(X, y)
    use_project_tracking(store)
    with pipeline_run(run_name="bench-protocols"):
        reg = register_model(model, X.head(5), NAME, blessed=True, extra_files=[store / "schema.yaml", store / "gate.json"])
    _promote(NAME, reg["version"])
    return X.iloc[:rows]


def inputs(tc, client, X, binary: bool):
    "The batch as one tritonclient input per field, JSON or binary."
    out = []
    for spec in client.get_model_metadata(NAME)["inputs"]:
        dtype = {"BYTES": object, "FP64": np.float64, "INT64": np.int64, "BOOL": bool}[spec["datatype"]]
        t = tc.InferInput(spec["name"], [len(X)], spec["datatype"])
        t.set_data_from_numpy(X[spec["name"]].to_numpy(dtype=dtype), binary_data=binary)
        out.append(t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--setup-only", action="store_true", help="register, serve, answer one request, stop (no timing, no report)")
    args = ap.parse_args()
    import tritonclient.http as tc
    from tritonclient.http._utils import _get_inference_request
    store = Path(tempfile.mkdtemp(prefix="bench-protocols-"))
    os.environ.update(isolated_env(store))   # never the user's tracking server or registry
    try:
        X = setup(store, args.rows)
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        with ServiceProcess([str(BIN / "mlops-nb"), "serve", "--host", "127.0.0.1", "--port", "{port}", "--poll-seconds", "0",
                             "--log-dir", ""], "/ready", env=env, cwd=store, log=store / "serve.log") as svc:
            client = tc.InferenceServerClient(url=svc.url.removeprefix("http://"), connection_timeout=120, network_timeout=120)
            if args.setup_only:
                answered = client.infer(NAME, inputs(tc, client, X.head(1), False)).as_numpy("predict_proba").shape == (1, 2)
                print(json.dumps({"benchmark": "protocols", "setup_only": True, "answered": answered, "tracking_uri": env["MLFLOW_TRACKING_URI"]}))
                return 0 if answered else 1
            ways = {"json": (inputs(tc, client, X, False), [tc.InferRequestedOutput(o, binary_data=False) for o in ("predict", "predict_proba")]),
                    "binary": (inputs(tc, client, X, True), None)}
            size = {}
            for way, (ins, outs) in ways.items():
                body, header = _get_inference_request(ins, "", outs, 0, False, False, 0, None, None)
                size[way] = {"request_bytes": len(body)}
            first = {w: client.infer(NAME, i, outputs=o).as_numpy("predict_proba") for w, (i, o) in ways.items()}
            assert np.array_equal(first["json"], first["binary"]), "the two encodings answered differently"
            times = {w: [] for w in ways}
            for _ in range(args.requests):
                for way, (ins, outs) in ways.items():
                    t = time.perf_counter(); client.infer(NAME, ins, outputs=outs); times[way].append(time.perf_counter() - t)
            client.close()
    finally:
        shutil.rmtree(store, ignore_errors=True)
    stat = {w: {"p50_ms": round(float(np.median(t)) * 1000, 2), "p95_ms": round(float(np.percentile(t, 95)) * 1000, 2), **size[w]}
            for w, t in times.items()}
    print(f"{args.rows}-row batch, {args.requests} requests each way, alternating")
    print(f"{'encoding':<8} {'request bytes':>14} {'p50 ms':>8} {'p95 ms':>8}")
    for w, s in stat.items(): print(f"{w:<8} {s['request_bytes']:>14,} {s['p50_ms']:>8} {s['p95_ms']:>8}")
    ratio = {"request_bytes": round(stat["json"]["request_bytes"] / stat["binary"]["request_bytes"], 2),
             "p50": round(stat["json"]["p50_ms"] / stat["binary"]["p50_ms"], 2)}
    print(f"JSON / binary: {ratio['request_bytes']}x the bytes, {ratio['p50']}x the median latency")
    out = {"benchmark": "protocols", "rows": args.rows, "requests": args.requests, **{f"{w}_{k}": v for w, s in stat.items() for k, v in s.items()},
           "ratio_request_bytes": ratio["request_bytes"], "ratio_p50": ratio["p50"]}
    (ROOT / "reports" / "benchmarks").mkdir(parents=True, exist_ok=True)
    (ROOT / "reports" / "benchmarks" / "protocols.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
