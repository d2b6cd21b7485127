"""Scale: the pipeline's data path at 100k, 1M and 10M synthetic rows, streamed (mlops-nb) vs in memory.

    python benchmarks/scale.py [--sizes 100000 1000000 10000000] [--max-train-rows 200000] [--baseline-max 1000000] [--dask] [--repeat 1]

For each size the synthetic churn generator feeds ingest -> validate (schema + drift) -> prepare (split,
reference profile) -> train (hgb, cross-validated search on at most `--max-train-rows` sampled rows) ->
evaluate (every test row). Each stage runs in a fresh Python process, so its peak RSS is its own (the
process's high-water mark, imports included); wall time is the stage's work, imports excluded.

- ours: the streamed functions of `mlops_nb.scale` (what the stages call), Parquet in, Parquet out.
- dask (with `--dask`): `compute.engine: dask` for ingest, validate and prepare, and `train.model: lgbm_dask` for train,
  on a `dask scheduler` and two `dask worker` processes (one thread each) started on loopback for each of those stages;
  the row also gives each worker's peak RSS during the stage (the driver's is the stage process's). Ingest reads a
  Parquet source a row group per task: the same synthetic rows as ours, written beforehand (untimed, by a process of
  its own) as many Parquet files of at most 250k rows, two row groups each (`compute.ingest_data`; its content
  hash equals ours'). As the pipeline does,
  prepare writes the `--max-train-rows` sample and the training rows it left out (`train_rest.parquet`), train fits
  LightGBM's Dask trainer on both (every training row), each worker reading its row groups (`compute.fit_all_rows`),
  and evaluate scores the test split a row group per task (`compute.score_partitions`). Compared with ours (hgb, a
  2-candidate search on the sample): training time and the test split's ROC AUC, and each stage's cost per row.
- baseline (sizes up to `--baseline-max`): the same work in memory with pandas, the way the stages worked
  before streaming (whole frame read, validated, profiled, split): its peak RSS is what grows with rows.

Printed: a table per stage and size, the growth exponent b of time ~ rows^b per stage and end to end (1 is
linear; fitted over the sizes run), the peak RSS of the largest size, and last one JSON object (also written
to reports/benchmarks/scale.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "validate", "prepare", "train", "evaluate"]
TARGET, POSITIVE = "churn", "Yes"


def stage(name: str, folder: Path, rows: int, max_train_rows: int, mode: str) -> dict:
    "Run one stage in this process; return its wall time (imports excluded) and this process's peak RSS."
    import numpy as np
    import pandas as pd
    from mlops_nb import compute as compute_, scale
    from mlops_nb.core import ComputeParams, ValidateParams, content_hash, write_json, write_parquet
    from mlops_nb.data import drop_identifiers, encode_target, split_stratified, synthetic_churn
    from mlops_nb.drift import Profile, detect_drift, profile
    from mlops_nb.metrics import classification_metrics
    from mlops_nb.schema import load_schema, validate
    from mlops_nb.train import tune
    import joblib
    schema = load_schema(ROOT / "schema.yaml")
    compute = ComputeParams("dask", os.environ["DASK_SCHEDULER_ADDRESS"]) if mode == "dask" else None
    dask = mode == "dask"
    if dask: mode = "ours"   # the same streamed functions, dispatched to the cluster for validate, prepare, train and evaluate
    raw, train_p, test_p, rest_p = folder / "raw.parquet", folder / "train.parquet", folder / "test.parquet", folder / "train_rest.parquet"
    start = time.perf_counter()
    extra = {}
    if name == "ingest" and dask:   # the Parquet files `write_source` wrote, a row group per task, written here in order
        extra = compute_.ingest_data(str(folder / "source"), raw, drop_columns=["rownames"], compute=compute)
        extra = {"content_hash": extra["content_hash"][:12]}
    elif name == "ingest":
        if mode == "ours": extra = scale.ingest_to_parquet("synthetic", raw, n_rows=rows, seed=42, drop_columns=["rownames"])
        else:
            df = drop_identifiers(synthetic_churn(rows, 42), ["rownames"])
            write_parquet(raw, df)
            extra = {"rows": len(df), "content_hash": content_hash(df)}
        extra = {"content_hash": extra["content_hash"][:12]}
    elif name == "validate":
        # the champion's reference profile, made at its training time (not part of this stage's cost)
        reference = Profile.from_dict(json.loads((folder / "reference_in.json").read_text()))
        start = time.perf_counter()
        if mode == "ours":
            result, drift = compute_.validate_data(raw, schema, compute), compute_.drift_data(reference, raw, ValidateParams(), compute)
        else:
            df = pd.read_parquet(raw)
            result, drift = validate(df, schema), detect_drift(reference, df.drop(columns=[TARGET]), ValidateParams())
        extra = {"errors": len(result.errors), "drifted": drift.drifted}
    elif name == "prepare":
        if mode == "ours":
            summary, _ = compute_.split_data(raw, train_p, test_p, TARGET, POSITIVE, 0.25, 42, max_train_rows, compute=compute,
                                             rest_path=rest_p if dask else None)
            ref = compute_.profile_data(train_p, schema, exclude=[TARGET], compute=compute)
        else:
            train, test = split_stratified(encode_target(pd.read_parquet(raw), TARGET, POSITIVE), TARGET, 0.25, 42)
            if max_train_rows and len(train) > max_train_rows: train = train.sample(max_train_rows, random_state=42)
            write_parquet(train_p, train); write_parquet(test_p, test)
            summary = {"train": {"rows": len(train)}, "test": {"rows": len(test)}}
            ref = profile(train.drop(columns=[TARGET]), schema)
        write_json(folder / "reference.json", ref.to_dict())
        extra = {"train_rows": summary["train"]["rows"], "test_rows": summary["test"]["rows"]}
    elif name == "train" and dask:   # LightGBM's Dask trainer on every training row (the sample and the rest): the workers read the row groups
        from mlops_nb.compute import compute_client, fit_all_rows
        from mlops_nb.train import build_model
        head = next(scale.iter_batches(train_p, 50_000)).drop(columns=[TARGET])
        with compute_client(compute):
            start = time.perf_counter()
            model, train_rows = fit_all_rows(build_model("lgbm_dask", head, 42), [train_p, rest_p], TARGET)
        joblib.dump(model, folder / "model.joblib")
        extra = {"model": "lgbm_dask", "train_rows": train_rows}
    elif name == "train":
        train = pd.read_parquet(train_p)
        result = tune("hgb", train.drop(columns=[TARGET]), train[TARGET], n_iter=2, cv_folds=2, seed=42, progress=False)
        joblib.dump(result.model, folder / "model.joblib")
        extra = {"model": "hgb", "cv_roc_auc": round(result.best_score, 4), "train_rows": len(train)}
    elif name == "evaluate" and dask:   # the test split scored a row group per task, the predictions gathered in order
        import functools
        from mlops_nb.evaluate import predict_scores
        model = joblib.load(folder / "model.joblib")
        scores = compute_.score_partitions(test_p, TARGET, functools.partial(predict_scores, model, task="binary"), compute)
        y = scale.read_column(test_p, TARGET).to_numpy()
        metrics = classification_metrics(y, scores)
        extra = {"roc_auc": round(metrics["roc_auc"], 4), "test_rows": len(y)}
    elif name == "evaluate":
        model = joblib.load(folder / "model.joblib")
        ys, ps = [], []
        for batch in scale.iter_batches(test_p, 250_000):
            ys.append(batch[TARGET].to_numpy()); ps.append(model.predict_proba(batch.drop(columns=[TARGET]))[:, 1])
        metrics = classification_metrics(np.concatenate(ys), np.concatenate(ps))
        extra = {"roc_auc": round(metrics["roc_auc"], 4), "test_rows": int(metrics.get("n", sum(map(len, ys))))}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


class Cluster:
    "A `dask scheduler` and two `dask worker` processes (one thread each) on loopback; `peaks()` gives each worker's peak RSS."
    def __init__(self, folder: Path, workers: int=2):
        from mlops_nb.loadtest import free_port
        bin_ = Path(sys.executable).parent
        self.address = f"tcp://127.0.0.1:{free_port()}"
        port = self.address.rsplit(":", 1)[1]
        log = open(folder / "dask.log", "a")
        self.procs = [subprocess.Popen([str(bin_ / "dask"), "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
                                       stdout=log, stderr=subprocess.STDOUT)]
        self.procs += [subprocess.Popen([str(bin_ / "dask"), "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1",
                                         "--no-dashboard", "--local-directory", str(folder / f"w{i}")], stdout=log, stderr=subprocess.STDOUT)
                       for i in range(workers)]
        from dask.distributed import Client
        self.client = Client(self.address, timeout="60s")
        self.client.wait_for_workers(workers, timeout=120)
    def peaks(self) -> list[float]:
        "Each worker's peak RSS in MB since it started."
        return sorted(v / 1024 for v in self.client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).values())
    def close(self):
        self.client.close()
        for p in reversed(self.procs):
            p.terminate()
            try: p.wait(30)
            except subprocess.TimeoutExpired: p.kill(); p.wait(10)


def write_source(folder: Path, rows: int):
    "Ours' synthetic rows (`scale.synthetic_chunks`, 1M-row chunks) as Parquet files of at most 250k rows in `folder`, two row groups each: dask's ingest source."
    import math
    from mlops_nb.scale import synthetic_chunks
    per_file = min(250_000, math.ceil(rows / 8))
    folder.mkdir()
    i = 0
    for chunk in synthetic_chunks(rows, 42, 1_000_000):
        for k in range(0, len(chunk), per_file):
            chunk.iloc[k:k + per_file].to_parquet(folder / f"part-{i:04d}.parquet", index=False, row_group_size=math.ceil(per_file / 2))
            i += 1


def run_stage(name, folder, rows, max_train_rows, mode) -> dict:
    if mode == "dask" and name == "ingest" and not (folder / "source").exists():   # untimed, in a process of its own: a child's peak RSS starts from its parent's
        subprocess.run([sys.executable, __file__, "--write-source", "--dir", str(folder / "source"), "--rows", str(rows)], check=True)
    if mode == "dask" and name in ("ingest", "validate", "prepare", "train", "evaluate"):   # a fresh cluster per stage: the workers' peaks are the stage's
        cluster = Cluster(folder)
        try:
            r = _run_stage(name, folder, rows, max_train_rows, mode, {"DASK_SCHEDULER_ADDRESS": cluster.address})
            return {**r, "worker_peak_rss_mb": [round(p) for p in cluster.peaks()]}
        finally: cluster.close()
    return _run_stage(name, folder, rows, max_train_rows, "ours" if mode == "dask" else mode)


def _run_stage(name, folder, rows, max_train_rows, mode, env=None) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--dir", str(folder), "--rows", str(rows),
           "--max-train-rows", str(max_train_rows), "--mode", mode]
    # one OpenMP thread per process unless told otherwise: on a shared, oversubscribed machine HGB's spinning OpenMP
    # threads made a 75k-row search take minutes instead of seconds, which says nothing about the data path
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0: raise SystemExit(f"{mode} {name} at {rows} rows failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def exponent(sizes, seconds) -> float | None:
    "Least-squares slope of log(seconds) on log(rows)."
    pts = [(math.log(n), math.log(max(s, 1e-3))) for n, s in zip(sizes, seconds)]
    if len(pts) < 2: return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--max-train-rows", type=int, default=200_000, help="prepare.max_train_rows")
    ap.add_argument("--baseline-max", type=int, default=1_000_000, help="largest size run in memory too (0: none)")
    ap.add_argument("--dask", action="store_true", help="also run ingest (from Parquet files), validate, prepare, train (lgbm_dask, every training row) and evaluate on a local Dask scheduler with two workers")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each stage (on the same inputs); the fastest is kept, all are printed")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--write-source", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="ours", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_source:  # a child: dask's ingest source
        write_source(Path(args.dir), args.rows)
        return
    if args.stage:  # a child: one stage, one JSON line
        print(json.dumps(stage(args.stage, Path(args.dir), args.rows, args.max_train_rows, args.mode)))
        return
    from mlops_nb.data import drop_identifiers, synthetic_churn
    from mlops_nb.drift import profile
    from mlops_nb.schema import load_schema
    results, load_start = {}, os.getloadavg()
    print(f"{'rows':>11} {'mode':>9} {'stage':>9} {'seconds':>9} {'peak RSS MB':>12}  notes")
    for rows in args.sizes:
        for mode in ["ours"] + (["dask"] if args.dask else []) + (["in-memory"] if rows <= args.baseline_max else []):
            with tempfile.TemporaryDirectory(prefix="mlops-nb-scale-") as tmp:
                folder = Path(tmp)
                # a champion's reference profile from other data of the same kind (what validate compares with)
                ref = profile(drop_identifiers(synthetic_churn(50_000, 7), ["rownames", "churn"]), load_schema(ROOT / "schema.yaml"))
                (folder / "reference_in.json").write_text(json.dumps(ref.to_dict()))
                for name in STAGES:   # each stage `--repeat` times over the same inputs: the fastest run is kept, every run's time printed
                    runs = [run_stage(name, folder, rows, args.max_train_rows, mode) for _ in range(args.repeat)]
                    r = {**min(runs, key=lambda x: x["seconds"]), **({"runs_seconds": [round(x["seconds"], 1) for x in runs]} if args.repeat > 1 else {})}
                    results.setdefault(mode, {}).setdefault(rows, {})[name] = r
                    notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("seconds", "peak_rss_mb"))
                    print(f"{rows:>11,} {mode:>9} {name:>9} {r['seconds']:>9.1f} {r['peak_rss_mb']:>12,.0f}  {notes}", flush=True)
    ours = results["ours"]
    sizes = sorted(ours)
    total = {n: sum(ours[n][s]["seconds"] for s in STAGES) for n in sizes}
    peak = {n: max(ours[n][s]["peak_rss_mb"] for s in STAGES) for n in sizes}
    growth = {s: exponent(sizes, [ours[n][s]["seconds"] for n in sizes]) for s in STAGES}
    growth["end_to_end"] = exponent(sizes, [total[n] for n in sizes])
    print()
    for n in sizes:
        base = results.get("in-memory", {}).get(n)
        side = (f" | in memory: {sum(base[s]['seconds'] for s in STAGES):.1f} s, peak {max(base[s]['peak_rss_mb'] for s in STAGES):,.0f} MB"
                if base else "")
        print(f"{n:>11,} rows: streamed {total[n]:.1f} s, peak {peak[n]:,.0f} MB{side}")
    print("growth exponent b (time ~ rows^b): " + ", ".join(f"{k} {v:.2f}" for k, v in growth.items() if v is not None))
    largest = sizes[-1]
    print(f"largest size {largest:,} rows: peak RSS {peak[largest] / 1024:.2f} GB ({'within' if peak[largest] < 8192 else 'ABOVE'} 8 GB)")
    out = {"benchmark": "scale", "sizes": sizes, "max_train_rows": args.max_train_rows,
           "seconds": {str(n): round(total[n], 1) for n in sizes}, "peak_rss_mb": {str(n): round(peak[n]) for n in sizes},
           "per_stage": {str(n): {s: {"seconds": round(ours[n][s]["seconds"], 2), "peak_rss_mb": round(ours[n][s]["peak_rss_mb"]),
                                      **({"runs_seconds": ours[n][s]["runs_seconds"]} if "runs_seconds" in ours[n][s] else {})}
                                  for s in STAGES} for n in sizes},
           "baseline": "pandas in memory",
           "baseline_peak_rss_mb": {str(n): round(max(v[s]["peak_rss_mb"] for s in STAGES)) for n, v in results.get("in-memory", {}).items()},
           "baseline_seconds": {str(n): round(sum(v[s]["seconds"] for s in STAGES), 1) for n, v in results.get("in-memory", {}).items()},
           "growth_exponent": {k: (round(v, 3) if v is not None else None) for k, v in growth.items()},
           "within_8gb": peak[largest] < 8192, "repeat": args.repeat, "cpus": os.cpu_count(),
           "load_average_start": [round(x, 2) for x in load_start], "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    print(f"load average (1/5/15 min) at start {', '.join(f'{x:.1f}' for x in load_start)}, at end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; each stage the fastest of {args.repeat} run(s)")
    if "dask" in results:   # per stage: seconds, the driver's peak RSS and each worker's
        out["dask"] = {str(n): {s: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                                    if k in ("seconds", "peak_rss_mb", "worker_peak_rss_mb", "runs_seconds")}
                                for s, r in results["dask"][n].items()} for n in sorted(results["dask"])}
        out["dask_per_row_us"] = {str(n): {s: round(r["seconds"] / n * 1e6, 2) for s, r in results["dask"][n].items()} for n in sorted(results["dask"])}
        out["trainer"] = {str(n): {"sampled_hgb": {"train_seconds": round(ours[n]["train"]["seconds"], 1), "train_rows": ours[n]["train"]["train_rows"],
                                                   "test_roc_auc": ours[n]["evaluate"]["roc_auc"]},
                                   "dask_lgbm_all_rows": {"train_seconds": round(results["dask"][n]["train"]["seconds"], 1),
                                                          "train_rows": results["dask"][n]["train"]["train_rows"],
                                                          "test_roc_auc": results["dask"][n]["evaluate"]["roc_auc"]}}
                         for n in sorted(results["dask"])}
        for n, t in out["trainer"].items():
            print(f"{int(n):>11,} rows, trainer: sampled hgb {t['sampled_hgb']} | Dask LightGBM {t['dask_lgbm_all_rows']}")
        if len(out["dask_per_row_us"]) > 1:
            lo, hi = sorted(results["dask"])[0], sorted(results["dask"])[-1]
            print("Dask per-row cost, µs/row " + ", ".join(f"{s} {out['dask_per_row_us'][str(lo)][s]} -> {out['dask_per_row_us'][str(hi)][s]}"
                                                           for s in STAGES) + f" ({lo:,} -> {hi:,} rows)")
        for n, stages in results["dask"].items():
            print(f"{n:>11,} rows on Dask: ingest {stages['ingest']['seconds']:.1f} s, validate {stages['validate']['seconds']:.1f} s, "
                  f"prepare {stages['prepare']['seconds']:.1f} s (streamed: {ours[n]['ingest']['seconds']:.1f} s, {ours[n]['validate']['seconds']:.1f} s, "
                  f"{ours[n]['prepare']['seconds']:.1f} s); driver peak "
                  f"{max(stages[s]['peak_rss_mb'] for s in ('ingest', 'validate', 'prepare', 'train')):,.0f} MB, workers "
                  f"{max(max(stages[s]['worker_peak_rss_mb']) for s in ('ingest', 'validate', 'prepare', 'train')):,} MB")
    (ROOT / "reports" / "benchmarks").mkdir(parents=True, exist_ok=True)
    (ROOT / "reports" / "benchmarks" / "scale.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
