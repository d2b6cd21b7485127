"""Monitoring a large window of the prediction log: `mlops_nb.monitor.monitor` against deepchecks' drift checks, same window, same run.

    python benchmarks/monitoring.py [--rows 1000000] [--repeat 3] [--skip-full-baseline] [--skip-evidently]

The window is what the service logs: `--rows` records x 20 features (10 numeric, 10 categorical strings, from
`mlops_nb.drift.synthetic_features`, drift injected in 3 of them) with the log's metadata and a binary model's
outputs (prediction, proba_0, proba_1). The references are what the pipeline stores with a version, computed once
from 100,000 training rows and not timed: the schema, the feature profile, the prediction profile, the
calibration maps (the form chosen by cross-fitted log loss) and the PCA of the numeric features (multivariate drift,
its threshold from 20,000 held-out rows).

- ours: `monitor(window, ...)`: schema skew of the traffic, every feature's drift, prediction drift, the served
  version mix, metrics estimated before labels (CBPE: accuracy, precision, recall, F1, ROC AUC, the confusion
  matrix), multivariate drift (PCA reconstruction error), and the decision. Best of `--repeat`.
- baseline: deepchecks `FeatureDrift` over the features and the two output columns (KS / Cramer's V; its
  `PredictionDrift` needs a model object, which a log does not have), its Datasets built inside the timing. By
  default deepchecks samples `n_samples=100_000` rows per side; the
  headline ratio uses the unsampled run (`n_samples=None`), so both sides read every row.
- Evidently's `DataDriftPreset` over the same columns, all rows, when `evidently` is installed (an optional
  benchmark dependency, not in the project's default install: `pip install evidently==0.7.23`, or
  `pip install -e '.[bench]'`); without it the row says how to install it. `--skip-evidently` leaves it out.

How ours stays fast: each categorical text column is encoded once (`pd.factorize`) and the schema check (nulls,
types, domain) and the drift count its codes, not a million strings per check; the version mix groups codes.

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="records in the monitored window")
    ap.add_argument("--reference-rows", type=int, default=100_000, help="training rows the references are computed from")
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours (best is reported)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip-full-baseline", action="store_true", help="skip deepchecks without sampling (slow)")
    ap.add_argument("--skip-evidently", action="store_true", help="skip Evidently's DataDriftPreset even if it is installed (slow)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "monitoring.json"))
    args = ap.parse_args(argv)

    from mlops_nb.core import Params, write_json
    from mlops_nb.drift import fit_multivariate, profile, synthetic_features
    from mlops_nb.monitor import fit_calibration, model_outputs, monitor, prediction_profile
    from mlops_nb.schema import infer_schema

    t_gen, (train, window) = timed(lambda: (synthetic_features(args.reference_rows, seed=args.seed), log_window(args.rows, args.seed + 1)))
    train_out, train_y = outputs(train, args.seed)
    t_refs, refs = timed(lambda: {"reference": profile(train, schema := infer_schema(train)), "schema": schema,
                                  "prediction_reference": prediction_profile(model_outputs(train_out)),
                                  "calibration": fit_calibration(train_out, train_y),
                                  "multivariate": fit_multivariate(train, synthetic_features(20_000, seed=args.seed + 2))})
    params = Params()
    t_ours, report = timed(lambda: monitor(window, params=params, **refs), args.repeat)

    import deepchecks.tabular  # noqa: F401  (its import is not part of its timing)
    ref_dc, new_dc = pd.concat([train, train_out], axis=1), window.drop(columns=["ts", "request_id", "record", "variant", "model_name", "model_version"])
    t_dc_sampled, dc_sampled = timed(lambda: run_deepchecks(ref_dc, new_dc, 100_000, CATS))
    t_dc_full = dc_full = None
    if not args.skip_full_baseline: t_dc_full, dc_full = timed(lambda: run_deepchecks(ref_dc, new_dc, None, CATS))
    t_ev = None
    if args.skip_evidently: ev_note = "skipped (--skip-evidently)"
    else:
        try:
            import evidently  # noqa: F401  (its import is not part of its timing)
            t_ev, _ = timed(lambda: run_evidently(ref_dc, new_dc, CATS))
            ev_note = f"{t_ev:.2f} s (evidently {evidently.__version__})"
        except ImportError: ev_note = f"not installed: pip install {EVIDENTLY_PIN}"
    baseline_s = t_dc_full if t_dc_full is not None else t_dc_sampled
    dc_drifted = sorted(c for c, v in (dc_full or dc_sampled).items() if v > 0.2)   # deepchecks' default condition

    est = report.estimated["roc_auc"]
    rows = [("window", f"{args.rows:,} records x 20 features + the model's outputs, drift injected in {', '.join(DRIFT_IN)}"),
            ("generate data", f"{t_gen:.2f} s (not timed below)"),
            ("references (schema, profiles, calibration)", f"{t_refs:.2f} s from {args.reference_rows:,} rows (once, at evaluate; not in 'ours')"),
            ("ours: monitor", f"{t_ours:.2f} s (best of {args.repeat})"),
            ("ours: decision", f"{report.decision}; drifted {report.drift.drifted}; estimated roc_auc {est['estimate']:.3f} [{est['low']:.3f}, {est['high']:.3f}] "
                                f"({report.estimated['calibration']} maps); multivariate score {report.multivariate['score']:.3f} vs threshold {report.multivariate['threshold']:.3f}"),
            ("deepchecks FeatureDrift, sampled (default n_samples=100,000)", f"{t_dc_sampled:.2f} s")]
    if t_dc_full is not None: rows.append(("deepchecks FeatureDrift, all rows (n_samples=None)", f"{t_dc_full:.2f} s"))
    rows += [("deepchecks: drifted (score > 0.2)", str(dc_drifted)),
             ("ratio deepchecks / ours", f"{baseline_s / t_ours:.1f}x against the {'unsampled' if t_dc_full is not None else 'SAMPLED'} run"),
             ("ratio vs sampled deepchecks", f"{t_dc_sampled / t_ours:.1f}x"),
             ("Evidently DataDriftPreset, all rows", ev_note)]
    if t_ev is not None: rows.append(("ratio Evidently / ours", f"{t_ev / t_ours:.1f}x"))
    rows += [
             ("machine", f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    figures = {"benchmark": "monitoring", "rows": args.rows, "features": 20, "ours_s": round(t_ours, 3),
               "baseline": "deepchecks FeatureDrift", "baseline_s": round(baseline_s, 3), "baseline_sampled": t_dc_full is None,
               "baseline_sampled_s": round(t_dc_sampled, 3), "ratio": round(baseline_s / t_ours, 1),
               "ratio_vs_sampled": round(t_dc_sampled / t_ours, 1), "goal_met": t_ours < 10 and baseline_s / t_ours >= 20,
               "evidently_s": None if t_ev is None else round(t_ev, 3), "ratio_vs_evidently": None if t_ev is None else round(t_ev / t_ours, 1),
               "decision": report.decision, "ours_drifted": report.drift.drifted, "multivariate_drifted": report.multivariate["drifted"], "baseline_drifted": dc_drifted}
    write_json(args.out, figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
