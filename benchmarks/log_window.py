"""Reading a window of a large prediction log: time and peak memory follow the window, not the log.

Writes logs of `--sizes` rows (1M and 10M by default) spread over ten days in the service's layout (hour partitions,
a part per hour, 20 feature columns plus the log's metadata and a binary model's outputs), then, each in a fresh
process, reads the same 100,000-record window two ways:

- window: `monitor.read_window(log, last=100_000)` (and `since=` the window's start), which opens only the partitions
  the window reaches;
- whole: the whole log read into pandas and then cut to the window (what the reader did before partitions), for the
  sizes in `--whole` (1M by default: the 10M whole read needs about 12 GB).

Each read is the best of `--repeat` fresh processes (time, from after the imports); peak RSS is the process's maximum
resident set (VmHWM: `ru_maxrss` would keep the parent's from before the exec), printed beside what the interpreter and the library hold before reading.

    python benchmarks/log_window.py [--sizes 1000000 10000000] [--window 100000] [--repeat 3] [--whole 1000000]

Prints a table, then as its last line one JSON object, also written to reports/benchmarks/log_window.json.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK = """
def peak_mib():
    "This process's peak resident set in MiB: VmHWM, which starts afresh at exec (ru_maxrss keeps the forking parent's)."
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
    except OSError: pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

READ = PEAK + """
import sys, time
import pandas as pd
from mlops_nb.monitor import read_window
from mlops_nb.predlog import read_prediction_log
mode, folder, window = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = peak_mib()   # the interpreter and the library, before reading
t = time.perf_counter()
if mode == "last": n = len(read_window(folder, last=window))
elif mode == "since": n = len(read_window(folder, since=sys.argv[4]))
else: n = len(read_prediction_log(folder).tail(window))
print(n, time.perf_counter() - t, peak_mib(), base)
"""


def write_log(folder: Path, rows: int, days: int = 10) -> pd.Timestamp:
    "A log of `rows` records over `days` days, one part per hour; the time of its newest record."
    import pyarrow as pa
    from mlops_nb.drift import synthetic_features
    from mlops_nb.logstore import write_parts
    hours = days * 24
    per = rows // hours
    feats = synthetic_features(per, seed=1)
    start = pd.Timestamp("2026-11-01")
    for h in range(hours):
        ts = (start + pd.Timedelta(hours=h) + pd.to_timedelta(np.arange(per) * (3600 / per), unit="s")).to_numpy(dtype="datetime64[us]")
        meta = {"ts": ts, "request_id": [f"h{h}-{i // 8}" for i in range(per)], "record": np.arange(per) % 8, "variant": ["champion"] * per,
                "model_name": ["bench"] * per, "model_version": ["1"] * per, "prediction": np.where(np.arange(per) % 3, "1", "0"),
                "proba_0": np.full(per, 0.3), "proba_1": np.full(per, 0.7)}
        write_parts(pa.table({**meta, **{c: feats[c].to_numpy() for c in feats}}), folder, f"bench-{h:04d}")
    return pd.Timestamp(ts[-1])


def fresh(script: str, *args) -> list[str]:
    "The words `script` prints when run with `args` in a fresh interpreter (its error output on failure)."
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode: raise RuntimeError(f"a fresh process failed:\n{out.stderr[-2000:]}")
    return out.stdout.split()


def read(mode: str, folder: Path, window: int, since: str = "") -> tuple[int, float, float, float]:
    "Rows read, seconds, peak RSS and the RSS before reading (MiB), of one read in a fresh process."
    n, seconds, mib, base = fresh(READ, mode, folder, window, since)
    return int(n), float(seconds), float(mib), float(base)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--window", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--whole", type=int, nargs="*", default=[1_000_000])
    args = ap.parse_args()
    rows, work = [], Path(tempfile.mkdtemp(prefix="bench-log-"))
    try:
        for size in args.sizes:
            folder = work / f"log-{size}"
            t = time.perf_counter()
            newest = write_log(folder, size)
            print(f"wrote a {size:,}-row log in {time.perf_counter() - t:.1f} s", flush=True)
            per_hour = size // 240
            since = str(newest - pd.Timedelta(hours=args.window / per_hour) + pd.Timedelta(microseconds=1))
            for mode in ["last", "since"] + (["whole"] if size in args.whole else []):
                runs = [read(mode, folder, args.window, since) for _ in range(args.repeat)]
                n, secs, mib, base = runs[0][0], min(r[1] for r in runs), max(r[2] for r in runs), min(r[3] for r in runs)
                rows.append({"log_rows": size, "read": mode, "window_rows": n, "seconds": round(secs, 3), "peak_rss_mib": round(mib, 1),
                             "rss_before_read_mib": round(base, 1)})
                print(f"{size:>12,} {mode:<6} {n:>9,} rows {secs:8.3f} s  peak {mib:7.1f} MiB (before reading {base:.0f})", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {(r["log_rows"], r["read"]): r for r in rows}
    small, big = args.sizes[0], args.sizes[-1]
    out = {"benchmark": "log_window", "window": args.window, "rows": rows,
           "last_time_ratio_big_vs_small": round(by[(big, "last")]["seconds"] / by[(small, "last")]["seconds"], 2),
           "last_rss_ratio_big_vs_small": round(by[(big, "last")]["peak_rss_mib"] / by[(small, "last")]["peak_rss_mib"], 2)}
    if (small, "whole") in by:
        out["whole_vs_window_rss_at_small"] = round(by[(small, "whole")]["peak_rss_mib"] / by[(small, "last")]["peak_rss_mib"], 2)
    (ROOT / "reports" / "benchmarks").mkdir(parents=True, exist_ok=True)
    (ROOT / "reports" / "benchmarks" / "log_window.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
