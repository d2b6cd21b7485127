"""Monitoring a large window of the prediction log: `mlops_nb.monitor.monitor` against deepchecks' drift checks, same window, same run.

    python benchmarks/monitoring.py [--rows 1000000] [--repeat 3] [--skip-full-baseline] [--skip-evidently]
                                    [--log-sizes 1000000 10000000] [--log-window 100000] [--log-repeat 2]

The window is what the service logs: `--rows` records x 20 features (10 numeric, 10 categorical strings, from
`mlops_nb.drift.synthetic_features`, drift injected in 3 of them) with the log's metadata and a binary model's
outputs (prediction, proba_0, proba_1), written to a prediction log in the service's layout (hour partitions) and read
back as `mlops-nb monitor` reads it (`read_window(log, categorical=True)`: text columns as Categoricals from
Parquet's dictionary pages); that read is timed on its own row, not in "ours". deepchecks gets the same records as
`pandas.read_parquet` gives them (text as Python strings), what a user of it would read. The references are what the pipeline stores with a version, computed once
from 100,000 training rows and not timed: the schema, the feature profile, the prediction profile, the
calibration maps (the form chosen by cross-fitted log loss) and the PCA of the numeric features (multivariate drift,
its threshold from 20,000 held-out rows).

- ours: `monitor(window, ...)`: schema skew of the traffic, every feature's drift, prediction drift, the served
  version mix, metrics estimated before labels (CBPE: accuracy, precision, recall, F1, ROC AUC, the confusion
  matrix), multivariate drift (PCA reconstruction error), and the decision. Best of `--repeat`, the runs of ours
  and of deepchecks interleaved (ours, deepchecks, ours, ...) so that a busy machine weighs on both sides alike;
  the load averages before and after are printed with the figures (the machine may be shared).
- ours without the estimates and the multivariate drift (`calibration=None, multivariate=None`), best of
  `--repeat`, interleaved with the runs above: the ratio says what those two features cost.
- a `--log-window`-record window read from prediction logs of `--log-sizes` records (the service's hour-partitioned
  layout, written by `log_window.write_log`) and monitored, each in a fresh process (best of `--log-repeat`):
  time of the read, time of read + monitor, and peak RSS. Time and memory follow the window, not the log.
- baseline: deepchecks `FeatureDrift` over the features and the two output columns (KS / Cramer's V; its
  `PredictionDrift` needs a model object, which a log does not have), its Datasets built inside the timing. By
  default deepchecks samples `n_samples=100_000` rows per side; the
  headline ratio uses the unsampled run (`n_samples=None`), so both sides read every row.
- Evidently's `DataDriftPreset` over the same columns, all rows, when `evidently` is installed (an optional
  benchmark dependency, not in the project's default install: `pip install evidently==0.7.23`, or
  `pip install -e '.[bench]'`); without it the row says how to install it. `--skip-evidently` leaves it out.

How ours stays fast: the reader hands text columns over as Categoricals (a batch file's are encoded once with
`pd.factorize`), and the schema check (nulls, types, domain), the drift and the version mix count their integer codes,
not a million strings per check; numeric values are binned through a table of uniform cells (an exact search only
where a cell holds a bin edge). The schema check runs a thread per column beside the drift engine's
(`schema.FrameColumns` from 100,000 rows).

The goal (DESIGN.md, "Benchmarks"): ours under 10 s and at least 20x faster than deepchecks. The last line is one
JSON object, also written to reports/benchmarks/monitoring.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from log_window import PEAK, fresh, write_log  # noqa: E402  (the logs of the log-reading benchmark, in its layout)
from validation import run_deepchecks, timed  # noqa: E402  (the same timing and the same deepchecks check)
DRIFT_IN = ["num_00", "num_04", "cat_03"]
CATS = [f"cat_{j:02d}" for j in range(10)] + ["prediction"]   # what deepchecks treats as categorical


def outputs(features: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    "A binary model's logged outputs for `features` (a fixed logistic score of two features) and labels drawn from it."
    z = 0.8 * features.num_00.to_numpy() - 0.5 * features.num_04.to_numpy() + (features.cat_03 == features.cat_03.iloc[0]).to_numpy()
    p1 = 1 / (1 + np.exp(-(z - z.mean())))
    y = (np.random.default_rng(seed).random(len(p1)) < p1).astype(int)
    return pd.DataFrame({"prediction": np.where(p1 >= 0.5, "1", "0"), "proba_0": 1 - p1, "proba_1": p1}), y


def log_window(rows: int, seed: int) -> pd.DataFrame:
    "A prediction-log window: metadata, the 20 drifted features and the model's outputs."
    from mlops_nb.drift import synthetic_features
    feats = synthetic_features(rows, seed=seed, drift_in=DRIFT_IN)
    meta = pd.DataFrame({"ts": pd.Timestamp("2026-11-01") + pd.to_timedelta(np.arange(rows) // 100, unit="s"),
                         "request_id": [f"r{i // 8}" for i in range(rows)], "record": np.arange(rows) % 8,
                         "variant": "champion", "model_name": "bench", "model_version": "1"})
    return pd.concat([meta, feats, outputs(feats, seed)[0]], axis=1)


EVIDENTLY_PIN = "evidently==0.7.23"   # optional: `pip install evidently==0.7.23` (or the project's `bench` extra)


def run_evidently(ref: pd.DataFrame, new: pd.DataFrame, cats: list[str]):
    "Evidently's DataDriftPreset report over the same columns (None when evidently is not installed)."
    try:
        from evidently import DataDefinition, Dataset, Report
        from evidently.presets import DataDriftPreset
    except ImportError: return None
    nums = [c for c in ref.columns if c not in cats]
    definition = DataDefinition(numerical_columns=nums, categorical_columns=cats)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Report([DataDriftPreset()]).run(Dataset.from_pandas(new, data_definition=definition),
                                                Dataset.from_pandas(ref, data_definition=definition))


MONITOR_LOG = PEAK + """
import pickle, sys, time
from mlops_nb.core import Params
from mlops_nb.monitor import monitor, read_window
folder, last, refs = sys.argv[1], int(sys.argv[2]), pickle.load(open(sys.argv[3], "rb"))
base = peak_mib()   # the interpreter, the library and the references
t = time.perf_counter()
window = read_window(folder, last=last, categorical=True)   # as monitor_project reads it
read_s = time.perf_counter() - t
report = monitor(window, params=Params(), **refs)
print(len(window), read_s, time.perf_counter() - t, peak_mib(), base, report.decision)
"""


def read_logged(records: pd.DataFrame) -> tuple[float, pd.DataFrame]:
    "Seconds to read `records` back from a prediction log (the service's layout) as `mlops-nb monitor` does, and the window read."
    import shutil, tempfile
    import pyarrow as pa
    from mlops_nb.logstore import write_parts
    from mlops_nb.monitor import read_window
    folder = Path(tempfile.mkdtemp(prefix="bench-monitor-window-"))
    try:
        write_parts(pa.Table.from_pandas(records.assign(ts=records.ts.astype("datetime64[us]")), preserve_index=False), folder, "bench")
        t, window = timed(lambda: read_window(folder, categorical=True))
    finally: shutil.rmtree(folder, ignore_errors=True)
    assert len(window) == len(records), (len(window), len(records))
    return t, window


def monitor_logs(sizes: list[int], last: int, repeat: int, refs: dict) -> list[dict]:
    "For each log size: a `last`-record window read and monitored in fresh processes (best time of `repeat`, highest peak RSS)."
    import pickle, shutil, tempfile
    out, work = [], Path(tempfile.mkdtemp(prefix="bench-monitor-log-"))
    try:
        (work / "refs.pkl").write_bytes(pickle.dumps(refs))
        for size in sizes:
            folder = work / f"log-{size}"
            t_write, _ = timed(lambda: write_log(folder, size))
            runs = [fresh(MONITOR_LOG, folder, last, work / "refs.pkl") for _ in range(repeat)]
            out.append({"log_rows": size, "window_rows": int(runs[0][0]), "read_s": round(min(float(r[1]) for r in runs), 3),
                        "read_and_monitor_s": round(min(float(r[2]) for r in runs), 3), "peak_rss_mib": round(max(float(r[3]) for r in runs), 1),
                        "rss_before_mib": round(min(float(r[4]) for r in runs), 1), "decision": runs[0][5], "write_s": round(t_write, 1)})
            print(f"log {size:>12,} records: window {out[-1]['window_rows']:,} read {out[-1]['read_s']:.2f} s, read + monitor {out[-1]['read_and_monitor_s']:.2f} s, "
                  f"peak RSS {out[-1]['peak_rss_mib']:.0f} MiB (wrote the log in {t_write:.0f} s)", flush=True)
            shutil.rmtree(folder)
    finally: shutil.rmtree(work, ignore_errors=True)
    return out


def interleaved(fns: dict, repeat: int) -> dict:
    "{name: (best seconds, last result)} of each function, run `repeat` times in turn (a, b, c, a, b, c, ...)."
    best = {k: (float("inf"), None) for k in fns}
    for i in range(repeat):
        for k, f in fns.items():
            t, out = timed(f)
            best[k] = (min(best[k][0], t), out)
            print(f"run {i + 1}/{repeat} {k}: {t:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    return best


def load() -> str:
    "The load averages over 1, 5 and 15 minutes, and the CPUs."
    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) + f" (1/5/15 min, {os.cpu_count()} CPUs)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="records in the monitored window")
    ap.add_argument("--reference-rows", type=int, default=100_000, help="training rows the references are computed from")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side, interleaved (best is reported)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip-full-baseline", action="store_true", help="skip deepchecks without sampling (slow)")
    ap.add_argument("--skip-evidently", action="store_true", help="skip Evidently's DataDriftPreset even if it is installed (slow)")
    ap.add_argument("--log-sizes", type=int, nargs="*", default=[1_000_000, 10_000_000], help="prediction logs the window is read from (none: skip)")
    ap.add_argument("--log-window", type=int, default=100_000, help="records of the window read from each log")
    ap.add_argument("--log-repeat", type=int, default=2, help="fresh processes per log (best time, highest peak RSS)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "monitoring.json"))
    args = ap.parse_args(argv)

    from mlops_nb.core import Params, write_json
    from mlops_nb.drift import fit_multivariate, profile, synthetic_features
    from mlops_nb.monitor import fit_calibration, model_outputs, monitor, prediction_profile
    from mlops_nb.schema import infer_schema

    load_before = load()
    t_gen, (train, generated) = timed(lambda: (synthetic_features(args.reference_rows, seed=args.seed), log_window(args.rows, args.seed + 1)))
    t_read, window = read_logged(generated)
    train_out, train_y = outputs(train, args.seed)
    t_refs, refs = timed(lambda: {"reference": profile(train, schema := infer_schema(train)), "schema": schema,
                                  "prediction_reference": prediction_profile(model_outputs(train_out)),
                                  "calibration": fit_calibration(train_out, train_y),
                                  "multivariate": fit_multivariate(train, synthetic_features(20_000, seed=args.seed + 2))})
    params = Params()

    import deepchecks.tabular  # noqa: F401  (its import is not part of its timing)
    monitor(window.head(20_000), params=params, **refs)   # nor are the lazy imports of our first call
    ref_dc, new_dc = pd.concat([train, train_out], axis=1), generated.drop(columns=["ts", "request_id", "record", "variant", "model_name", "model_version"])
    sides = {"ours": lambda: monitor(window, params=params, **refs),
             "ours_off": lambda: monitor(window, params=params, **{**refs, "calibration": None, "multivariate": None}),
             "dc_sampled": lambda: run_deepchecks(ref_dc, new_dc, 100_000, CATS)}
    if not args.skip_full_baseline: sides["dc_full"] = lambda: run_deepchecks(ref_dc, new_dc, None, CATS)
    best = interleaved(sides, args.repeat)
    (t_ours, report), (t_off, _), (t_dc_sampled, dc_sampled) = best["ours"], best["ours_off"], best["dc_sampled"]
    t_dc_full, dc_full = best.get("dc_full", (None, None))
    load_after = load()
    t_ev = None
    if args.skip_evidently: ev_note = "skipped (--skip-evidently)"
    else:
        try:
            import evidently  # noqa: F401  (its import is not part of its timing)
            t_ev, _ = timed(lambda: run_evidently(ref_dc, new_dc, CATS))
            ev_note = f"{t_ev:.2f} s (evidently {evidently.__version__})"
        except ImportError: ev_note = f"not installed: pip install {EVIDENTLY_PIN}"
    logs = monitor_logs(args.log_sizes, args.log_window, args.log_repeat, refs) if args.log_sizes else []
    baseline_s = t_dc_full if t_dc_full is not None else t_dc_sampled
    dc_drifted = sorted(c for c, v in (dc_full or dc_sampled).items() if v > 0.2)   # deepchecks' default condition

    est = report.estimated["roc_auc"]
    rows = [("window", f"{args.rows:,} records x 20 features + the model's outputs, drift injected in {', '.join(DRIFT_IN)}"),
            ("generate data", f"{t_gen:.2f} s (not timed below)"),
            ("read the window from the log", f"{t_read:.2f} s (read_window(log, categorical=True), as mlops-nb monitor reads it; not in 'ours')"),
            ("references (schema, profiles, calibration)", f"{t_refs:.2f} s from {args.reference_rows:,} rows (once, at evaluate; not in 'ours')"),
            ("ours: monitor", f"{t_ours:.2f} s (best of {args.repeat}, interleaved with deepchecks)"),
            ("ours: decision", f"{report.decision}; drifted {report.drift.drifted}; estimated roc_auc {est['estimate']:.3f} [{est['low']:.3f}, {est['high']:.3f}] "
                                f"({report.estimated['calibration']} maps); multivariate score {report.multivariate['score']:.3f} vs threshold {report.multivariate['threshold']:.3f}"),
            ("ours: monitor without estimates and multivariate", f"{t_off:.2f} s (calibration=None, multivariate=None; best of {args.repeat})"),
            ("ratio ours with them / without", f"{t_ours / t_off:.2f}x"),
            ("deepchecks FeatureDrift, sampled (default n_samples=100,000)", f"{t_dc_sampled:.2f} s (best of {args.repeat})")]
    if t_dc_full is not None: rows.append(("deepchecks FeatureDrift, all rows (n_samples=None)", f"{t_dc_full:.2f} s (best of {args.repeat})"))
    rows += [("deepchecks: drifted (score > 0.2)", str(dc_drifted)),
             (f"ratio deepchecks / ours at {args.rows:,}", f"{baseline_s / t_ours:.1f}x against the {'unsampled' if t_dc_full is not None else 'SAMPLED'} run"),
             ("ratio vs sampled deepchecks", f"{t_dc_sampled / t_ours:.1f}x"),
             ("Evidently DataDriftPreset, all rows", ev_note)]
    if t_ev is not None: rows.append(("ratio Evidently / ours", f"{t_ev / t_ours:.1f}x"))
    for r in logs:
        rows.append((f"{r['window_rows']:,}-record window of a {r['log_rows']:,}-record log", f"read {r['read_s']:.2f} s, read + monitor {r['read_and_monitor_s']:.2f} s, "
                     f"peak RSS {r['peak_rss_mib']:.0f} MiB ({r['rss_before_mib']:.0f} before reading; fresh process, best of {args.log_repeat})"))
    rows += [("load average before / after the timed runs", f"{load_before}  /  {load_after}"),
             ("machine", f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    figures = {"benchmark": "monitoring", "rows": args.rows, "features": 20, "repeat": args.repeat, "ours_s": round(t_ours, 3), "read_window_s": round(t_read, 3),
               "ours_without_estimates_multivariate_s": round(t_off, 3), "ratio_with_vs_without": round(t_ours / t_off, 2),
               "baseline": "deepchecks FeatureDrift", "baseline_s": round(baseline_s, 3), "baseline_sampled": t_dc_full is None,
               "baseline_sampled_s": round(t_dc_sampled, 3), "ratio": round(baseline_s / t_ours, 1),
               "ratio_vs_sampled": round(t_dc_sampled / t_ours, 1), "goal_met": t_ours < 10 and baseline_s / t_ours >= 20,
               "evidently_s": None if t_ev is None else round(t_ev, 3), "ratio_vs_evidently": None if t_ev is None else round(t_ev / t_ours, 1),
               "log_windows": logs, "load_before": load_before, "load_after": load_after,
               "decision": report.decision, "ours_drifted": report.drift.drifted, "multivariate_drifted": report.multivariate["drifted"], "baseline_drifted": dc_drifted}
    write_json(args.out, figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
