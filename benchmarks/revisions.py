"""One benchmark on two revisions, side by side: did a change move the figures?

A refactor promises "behaviour unchanged, figures as before". This runs a benchmark of this checkout and the same
benchmark script on another revision's library (a temporary `git worktree`, removed afterwards), alternating
A, B, A, B... so both see the same machine, and prints each timing key's best of `--repeat` and the ratio.

    .venv/bin/python benchmarks/revisions.py --rev cfa9cfe -- benchmarks/validation.py --skip-full-baseline
    .venv/bin/python benchmarks/revisions.py --rev HEAD~5 --repeat 5 --keys ours_s ours_fit_s -- benchmarks/validation.py --skip-full-baseline

This checkout's benchmark script is copied into the other revision's tree (a benchmark imports the library of
the tree it sits in), so the measurement is the same on both sides and only the library differs. A benchmark that writes its report
under reports/ also does so in this checkout, as when it is run on its own. The last line is one JSON object, also written to
reports/benchmarks/revisions.json. Times are this machine's under whatever else ran (the load average is printed).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timing_keys(report):
    "The numeric keys of a benchmark's report that are times (seconds or milliseconds)."
    return [k for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k.endswith(("_s", "_ms"))]


def run_once(root, script, args):
    "Run `root`'s copy of `script` (it puts `root`'s library first on its path); its report, the last line it prints."
    done = subprocess.run([sys.executable, str(root / script), *args], cwd=root, capture_output=True, text=True)
    if done.returncode: sys.exit(f"{script} failed on {root}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(base, head, keys):
    "Rows (key, best of base, best of head, head/base) for every key both sides report."
    best = lambda runs, k: min(r[k] for r in runs if k in r)
    return [(k, best(base, k), best(head, k), round(best(head, k) / best(base, k), 3)) for k in keys
            if all(k in r for r in base + head) and best(base, k) > 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the revision to compare this checkout with (e.g. a commit before a refactor)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side, alternating (best of N is compared)")
    ap.add_argument("--keys", nargs="*", help="report keys to compare (default: every key ending in _s or _ms)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "revisions.json"))
    ap.add_argument("benchmark", nargs=argparse.REMAINDER, help="-- the benchmark script and its arguments")
    a = ap.parse_args()
    script, *args = [x for x in a.benchmark if x != "--"] or sys.exit("name a benchmark after --")
    if not (ROOT / script).is_file(): sys.exit(f"{script}: no such benchmark in this checkout")
    found = subprocess.run(["git", "rev-parse", "--short", "--verify", f"{a.rev}^{{commit}}"], cwd=ROOT, capture_output=True, text=True)
    rev = found.stdout.strip() or sys.exit(f"--rev {a.rev}: not a commit of this repository")
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(other), rev], cwd=ROOT, check=True)
        try:
            (other / script).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / script, other / script)
            base, head = [], []
            for i in range(a.repeat):
                base.append(run_once(other, script, args)); head.append(run_once(ROOT, script, args))
                print(f"round {i + 1}/{a.repeat}: load {os.getloadavg()[0]:.2f}", file=sys.stderr)
        finally: subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT)
    rows = compare(base, head, a.keys or timing_keys(head[0]))
    print(f"| {script} | {rev} | this checkout | ratio |\n|---|---|---|---|")
    for k, b, h, r in rows: print(f"| {k} | {b} | {h} | {r}x |")
    report = {"benchmark": "revisions", "script": script, "args": args, "rev": rev, "repeat": a.repeat,
              "rows": [dict(key=k, base=b, head=h, ratio=r) for k, b, h, r in rows], "load_avg_1m": round(os.getloadavg()[0], 2)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__": main()
