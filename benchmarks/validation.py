"""Schema validation + drift detection of a large batch: mlops-nb against deepchecks' FeatureDrift, same data, same run.

    python benchmarks/validation.py [--rows 1000000] [--skip-full-baseline]

Both sides get a reference frame and a batch of `--rows` rows x 20 features (10 numeric, 10 categorical
strings) from `mlops_nb.drift.synthetic_features`, with drift injected into 3 features.

- ours: `validate(batch, schema)` + `detect_drift(profile, batch)`. The schema and the reference profile are
  computed once at training time and stored; their cost is printed on its own line, not in "ours".
- baseline: deepchecks `FeatureDrift` (train_test_validation's feature-drift check: KS for numeric, Cramer's V
  for categorical features), including building its two `Dataset`s. By default deepchecks SAMPLES
  `n_samples=100_000` rows per side; the headline ratio uses the unsampled run (`n_samples=None`) so both
  sides read every row. The sampled run is reported too.

Timings are wall-clock, best of `--repeat` for ours (deepchecks runs once). Peak memory of ours is measured
in a separate, untimed pass with tracemalloc. The last line is one JSON object, also written to
reports/benchmarks/validation.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

os.environ.setdefault("DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
DRIFT_IN = ["num_00", "num_04", "cat_03"]


def timed(f, repeat=1):
    "(best wall time over `repeat` runs, last result)"
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - start)
    return best, out


def run_deepchecks(ref, new, n_samples, cats=None):
    "deepchecks' FeatureDrift scores per column; `cats`: the categorical columns (default: those named cat_*)."
    from deepchecks.tabular import Dataset
    from deepchecks.tabular.checks import FeatureDrift
    cats = [c for c in ref.columns if c.startswith("cat")] if cats is None else cats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = FeatureDrift(n_samples=n_samples).run(Dataset(ref, cat_features=cats), Dataset(new, cat_features=cats))
    return {c: v["Drift score"] for c, v in result.value.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the reference and of the batch")
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours (best is reported)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip-full-baseline", action="store_true", help="skip deepchecks without sampling (slow)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "validation.json"))
    args = ap.parse_args(argv)

    from mlops_nb.core import ValidateParams, write_json
    from mlops_nb.drift import detect_drift, profile, synthetic_features
    from mlops_nb.schema import infer_schema, validate

    t_gen, (ref, new) = timed(lambda: (synthetic_features(args.rows, seed=args.seed),
                                       synthetic_features(args.rows, seed=args.seed + 1, drift_in=DRIFT_IN)))
    params = ValidateParams()
    t_fit, (schema, prof) = timed(lambda: (lambda s: (s, profile(ref, s)))(infer_schema(ref)))

    def ours():
        return validate(new, schema), detect_drift(prof, new, params)

    t_ours, (result, report) = timed(ours, args.repeat)
    tracemalloc.start()
    ours()
    ours_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()

    import deepchecks.tabular  # noqa: F401  (its ~3 s import is not part of its timing)
    t_dc_sampled, dc_sampled = timed(lambda: run_deepchecks(ref, new, 100_000))
    t_dc_full = dc_full = None
    if not args.skip_full_baseline:
        t_dc_full, dc_full = timed(lambda: run_deepchecks(ref, new, None))
    baseline_s = t_dc_full if t_dc_full is not None else t_dc_sampled
    dc_scores = dc_full or dc_sampled
    # deepchecks' default condition: drift score above 0.2 (KS for numeric, Cramer's V for categorical)
    dc_drifted = sorted(c for c, v in dc_scores.items() if v > 0.2)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n_cols = ref.shape[1]
    rows = [("data", f"{args.rows:,} rows x {n_cols} features, reference and batch, drift injected in {', '.join(DRIFT_IN)}"),
            ("generate data", f"{t_gen:.2f} s (not timed below)"),
            ("ours: schema + profile of the reference", f"{t_fit:.2f} s (once, at training time; not in 'ours')"),
            ("ours: validate + detect_drift", f"{t_ours:.2f} s (best of {args.repeat}); peak {ours_peak_mb:.0f} MB traced"),
            ("ours: result", f"{len(result.errors)} errors, {len(result.warnings)} warnings; drifted {report.drifted}"),
            ("deepchecks FeatureDrift, sampled (default n_samples=100,000)", f"{t_dc_sampled:.2f} s")]
    if t_dc_full is not None:
        rows.append(("deepchecks FeatureDrift, all rows (n_samples=None)", f"{t_dc_full:.2f} s"))
    rows += [("deepchecks: drifted (score > 0.2)", str(dc_drifted)),
             ("ratio deepchecks / ours", f"{baseline_s / t_ours:.1f}x against the {'unsampled' if t_dc_full is not None else 'SAMPLED'} run"),
             ("ratio vs sampled deepchecks", f"{t_dc_sampled / t_ours:.1f}x"),
             ("process peak RSS", f"{rss_mb:.0f} MB"),
             ("machine", f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))

    figures = {"benchmark": "validation", "rows": args.rows, "features": n_cols,
               "ours_s": round(t_ours, 3), "ours_fit_s": round(t_fit, 3),
               "baseline": "deepchecks FeatureDrift", "baseline_s": round(baseline_s, 3),
               "baseline_sampled": t_dc_full is None, "baseline_sampled_s": round(t_dc_sampled, 3),
               "ratio": round(baseline_s / t_ours, 1), "ratio_vs_sampled": round(t_dc_sampled / t_ours, 1),
               "ours_peak_mb": round(ours_peak_mb), "rss_peak_mb": round(rss_mb),
               "ours_drifted": report.drifted, "baseline_drifted": dc_drifted}
    write_json(args.out, figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
