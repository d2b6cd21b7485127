"""The feature store, side by side with what a user would otherwise write, on the same synthetic history:

1. historical retrieval (a point-in-time training set): Feast's `get_historical_features` through
   `mlops_nb.features.training_set` (the local provider's file offline store) against a plain pandas `merge_asof`,
   for each `--entities` size; the two must give the same values (checked on every feature column);
2. online lookup + prediction by key through the service: `mlops-nb serve --feature-repo` answering
   `{"customer_id": k}` against the same service answering the same features sent inline (what a client that keeps
   its own feature copy sends): p50/p99 latency and req/s, same load generator, same model (the project's default
   algorithm, served on ONNX).

Every customer has `--snapshots` monthly snapshots; each label is observed 10 days after one of them. The machine is
shared and noisy: the ratios are what holds.

    python benchmarks/features.py [--entities 7000 1000000] [--snapshots 3] [--seconds 10] [--concurrency 8]
    python benchmarks/features.py --setup-only   # a small store, the model registered, one request by key: what the isolation test runs

The model is registered in the benchmark's own temporary tracking store, and the service it starts reads that store,
whatever MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI say: a team's registry is never touched.

Prints a table, then as its last line one JSON object, also written to reports/benchmarks/features.json.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def store_over(work: Path, hist: pd.DataFrame):
    "A Feast repository in `work` over `hist`, its definitions applied (the project's schema.yaml)."
    from mlops_nb.features import apply, feature_objects, open_store, write_store_yaml
    from mlops_nb.schema import load_schema
    (work / "repo").mkdir(parents=True)
    (work / "data").mkdir(parents=True)
    hist.to_parquet(work / "data" / "customers.parquet")
    write_store_yaml(work / "repo", "../data/registry.db", "../data/online.db")
    store = open_store(work / "repo")
    apply(store, feature_objects(load_schema(ROOT / "schema.yaml"), source_path="../data/customers.parquet"))
    return store


def labels_for(hist: pd.DataFrame, snapshots: int, seed: int = 0) -> pd.DataFrame:
    "One label per customer, observed 10 days after one of its snapshots (chosen at random)."
    rng = np.random.default_rng(seed)
    first = hist.groupby("customer_id").event_timestamp.min()
    return pd.DataFrame({"customer_id": first.index.to_numpy(),
                         "event_timestamp": (first + pd.Timedelta(days=30) * rng.integers(0, snapshots, len(first))
                                             + pd.Timedelta(days=10)).to_numpy(),
                         "churn": rng.choice(["No", "Yes"], len(first))})


def merge_asof(hist: pd.DataFrame, labels: pd.DataFrame, ttl=pd.Timedelta(days=90)) -> pd.DataFrame:
    "The pandas baseline: a point-in-time join with the same TTL, rows in the labels' order."
    out = pd.merge_asof(labels.assign(_row=np.arange(len(labels))).sort_values("event_timestamp"),
                        hist.sort_values("event_timestamp"), on="event_timestamp", by="customer_id", tolerance=ttl)
    return out.sort_values("_row").drop(columns="_row").reset_index(drop=True)


def historical(n: int, snapshots: int, work: Path) -> dict:
    from mlops_nb.features import synthetic_history, training_set
    hist = synthetic_history(n, snapshots, seed=3)
    labels = labels_for(hist, snapshots)
    store = store_over(work, hist)
    t0 = time.perf_counter()
    feast = training_set(store, labels)
    t_feast = time.perf_counter() - t0
    t0 = time.perf_counter()
    pandas = merge_asof(hist, labels)
    t_pandas = time.perf_counter() - t0
    cols = [c for c in hist.columns if c not in ("customer_id", "event_timestamp")]
    agree = all(feast[c].astype(object).where(feast[c].notna(), None).tolist() == pandas[c].astype(object).where(pandas[c].notna(), None).tolist()
                for c in cols)
    return {"entities": n, "rows": len(hist), "feast_s": round(t_feast, 3), "pandas_s": round(t_pandas, 3),
            "feast_over_pandas": round(t_feast / t_pandas, 1), "same_values": agree}


def serving(n: int, snapshots: int, work: Path, seconds: float, concurrency: int, setup_only: bool = False) -> dict:
    from serving import NAME, isolated_env, setup
    from mlops_nb.features import materialize, synthetic_history
    from mlops_nb.loadtest import ServiceProcess, loadtest
    hist = synthetic_history(n, snapshots, seed=3, end=pd.Timestamp.now(tz="UTC").floor("s") - pd.Timedelta(hours=1))
    store = store_over(work / "fs", hist)
    t0 = time.perf_counter()
    materialize(store)
    t_mat = time.perf_counter() - t0
    version, _ = setup(work)   # the project's default algorithm with its ONNX export, registered as champion in work's own store
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **isolated_env(work)}
    (work / "project").mkdir()
    shutil.copy2(ROOT / "params.yaml", work / "project" / "params.yaml")
    newest = hist.groupby("customer_id").tail(1)
    keys = newest.customer_id.sample(min(1000, n), random_state=1).tolist()
    by_key = [json.dumps({"customer_id": int(k)}).encode() for k in keys]
    feats = newest.set_index("customer_id").loc[keys].drop(columns="event_timestamp")
    inline = [json.dumps({c: (None if isinstance(v, float) and np.isnan(v) else v.item() if hasattr(v, "item") else v)
                          for c, v in r.items()}).encode() for r in feats.to_dict("records")]
    cmd = [str(BIN / "mlops-nb"), "serve", "--model", f"models:/{NAME}@champion", "--host", "127.0.0.1", "--port", "{port}",
           "--runtime", "onnx", "--log-dir", str(work / "log"), "--poll-seconds", "0", "--feature-repo", str(work / "fs" / "repo")]
    server = ServiceProcess(cmd, "/ready", env=env, cwd=work / "project", log=work / "serve.log", timeout=600)
    try:
        if setup_only:   # one request by key: the service found the champion setup registered, and the online store
            import httpx
            r = httpx.post(server.url + "/predict", content=by_key[0], timeout=30)
            return {"setup_only": True, "version": version, "status": r.status_code, "served_version": r.json().get("model_version"),
                    "tracking_uri": env["MLFLOW_TRACKING_URI"]}
        runs = {}
        for name, bodies in (("by key (online store)", by_key), ("inline features", inline)) * 2:   # two turns each, alternating
            r = loadtest(server.url + "/predict", bodies, concurrency, seconds / 2)
            runs.setdefault(name, []).append(r)
    finally: server.stop()
    pick = lambda name: {"rps": round(sum(r["rps"] for r in runs[name]) / 2, 1), "p50_ms": max(r["p50_ms"] for r in runs[name]),
                         "p99_ms": max(r["p99_ms"] for r in runs[name]), "errors": sum(r.get("errors", 0) for r in runs[name])}
    return {"materialize_s": round(t_mat, 2), "entities": n, "by_key": pick("by key (online store)"), "inline": pick("inline features")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, nargs="+", default=[7000, 1_000_000], help="customers of the historical retrieval runs")
    ap.add_argument("--snapshots", type=int, default=3, help="monthly snapshots per customer")
    ap.add_argument("--serving-entities", type=int, default=7000, help="customers in the online store the service reads")
    ap.add_argument("--seconds", type=float, default=10.0, help="load per serving mode")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "features.json")
    ap.add_argument("--setup-only", action="store_true", help="a 50-customer store, the model registered, one request by key (no timing, no report)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from mlops_nb.core import write_json
    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        if args.setup_only:
            done = serving(50, 2, work / "serve", 0, 1, setup_only=True)
            print(json.dumps({"benchmark": "features", **done}))
            return 0 if done["status"] == 200 and done["served_version"] == done["version"] else 1
        hist_runs = [historical(n, args.snapshots, work / f"hist-{n}") for n in args.entities]
        served = serving(args.serving_entities, args.snapshots, work / "serve", args.seconds, args.concurrency)
    finally: shutil.rmtree(work, ignore_errors=True)
    print(f"{'entities':>10} {'rows':>10} {'Feast s':>9} {'merge_asof s':>13} {'ratio':>7}  same values")
    for r in hist_runs:
        print(f"{r['entities']:>10} {r['rows']:>10} {r['feast_s']:>9} {r['pandas_s']:>13} {r['feast_over_pandas']:>7}  {r['same_values']}")
    print(f"\nserving {served['entities']} customers (materialised in {served['materialize_s']} s), {args.concurrency} clients:")
    for name in ("by_key", "inline"):
        s = served[name]
        print(f"  {name:>8}: {s['rps']:>7} req/s  p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  errors {s['errors']}")
    result = {"benchmark": "features", "baseline": "pandas merge_asof; the service with the features inline",
              "historical": hist_runs, "materialize_s": served["materialize_s"],
              "by_key_rps": served["by_key"]["rps"], "by_key_p50_ms": served["by_key"]["p50_ms"], "by_key_p99_ms": served["by_key"]["p99_ms"],
              "inline_rps": served["inline"]["rps"], "inline_p50_ms": served["inline"]["p50_ms"], "inline_p99_ms": served["inline"]["p99_ms"],
              "by_key_over_inline_rps": round(served["by_key"]["rps"] / served["inline"]["rps"], 2),
              "errors": served["by_key"]["errors"] + served["inline"]["errors"], "cpus": os.cpu_count()}
    write_json(args.out, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
