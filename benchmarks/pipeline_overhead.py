"""What papermill + DVC cost on top of the work itself: the fixed cost of a notebook stage.

Runs the whole pipeline twice on the same data, each in its own fresh git copy of the project, stage by stage
(`dvc repro --single-item STAGE`, timed one at a time, in pipeline order):
  1. ours: every stage notebook executed by papermill in its own kernel (`mlops-nb stage NAME`), as `make run` does;
  2. plain: the same pipeline written as plain Python scripts (the code cells of each stage notebook, with the same
     parameters injected as literals) in a dvc.yaml with the same deps, params and outputs, also run by `dvc repro`.
A stage's fixed cost is its time in (1) minus its time in (2): the same library calls, so the difference is the
kernel start, the runner's imports, papermill's notebook I/O and the executed notebook DVC caches.
Then it times the pieces of that cost on their own (a papermill kernel running an empty cell, the runner's
imports, each stage's import cell in a fresh interpreter) and a no-op `mlops-nb run` (nothing to do) against a
no-op `dvc repro` of the plain scripts. The last line is one JSON object (also in reports/benchmarks/pipeline_overhead.json).

    .venv/bin/python benchmarks/pipeline_overhead.py            # the default dataset and params
    .venv/bin/python benchmarks/pipeline_overhead.py --tiny     # 800 synthetic rows, 2 candidates: a quick look
    .venv/bin/python benchmarks/pipeline_overhead.py --tiny --repeat 3   # each stage 3 times (--force): best of 3
    .venv/bin/python benchmarks/pipeline_overhead.py --setup-only        # a tiny copy; register and promote as its stages would

Each copy registers and promotes in its own tracking store (its mlflow.db): MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI
are removed from the stages' environment, so a team's registry is never touched.

One run of a stage varies by seconds on a shared machine (other processes, MLflow's store); with --repeat N each
stage runs N times in both projects, interleaved, and each side's time is its best of N (as timeit does: noise only
ever adds time), so a stage's fixed cost is best(notebook) - best(plain script).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
from mlops_nb.core import load_params, write_json  # noqa: E402
from mlops_nb.pipeline import BUILTIN_STAGES as STAGES, stage_parameters  # noqa: E402

FILES = ["params.yaml", "schema.yaml", "dvc.yaml", "pipeline", "features", ".dvc", ".dvcignore", ".gitignore", "mlops_nb",
         "data/labelled/README.md"]  # the labelled windows ingest appends (none yet): a dependency of ingest
TINY = {"data": {"source": "synthetic", "n_rows": 800}, "train": {"model": "logreg", "n_iter": 2, "cv_folds": 2},
        "evaluate": {"min_primary": 0.6}}
TINY_ALLOWED = ["Simple Model Comparison", "Feature Label Correlation Change"]  # noise on 200 test rows (as in the tests)
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
       "DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY": "true", "MPLBACKEND": "Agg", "GIT_AUTHOR_NAME": "bench",
       "GIT_AUTHOR_EMAIL": "bench@example.com", "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"): ENV.pop(var, None)   # each copy's own mlflow.db, never the user's registry

# what the register and infra_validate stages do with the tracking store, run in a copy with the stages' environment
STAGE_TRACKING = """
from pathlib import Path
from mlops_nb.data import encode_target, synthetic_churn
from mlops_nb.registry import _promote, pipeline_run, register_model, use_project_tracking
from mlops_nb.train import build_model
uri = use_project_tracking(Path.cwd())   # as every stage notebook does
df = encode_target(synthetic_churn(200, seed=0).drop(columns="rownames"), "churn", "Yes")
X, y = df.drop(columns="churn"), df.churn
with pipeline_run(run_name="bench-setup"):
    reg = register_model(build_model("logreg", X).fit(X, y), X.head(5), "churn-classifier", blessed=True)
_promote("churn-classifier", reg["version"])
print(uri)
"""


def setup_check(dest: Path) -> int:
    "The set-up alone: a tiny copy, and a registration and promotion in it with the stages' environment, which must land in the copy's store."
    project_copy(dest, tiny=True)
    git_commit(dest)
    r = subprocess.run([str(BIN / "python"), "-c", STAGE_TRACKING], cwd=dest, env=ENV, capture_output=True, text=True)
    uri = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    own = f"sqlite:///{dest.resolve() / 'mlflow.db'}"
    print(json.dumps({"benchmark": "pipeline_overhead", "setup_only": True, "tracking_uri": uri, "own_store": uri == own}))
    if r.returncode: print(r.stderr[-3000:], file=sys.stderr)
    return 0 if r.returncode == 0 and uri == own else 1


def project_copy(dest: Path, tiny: bool) -> Path:
    dest.mkdir(parents=True)
    for name in FILES:
        src = ROOT / name
        if src.is_dir(): shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    if tiny:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for section, values in TINY.items(): params[section].update(values)
        params["evaluate"]["deepchecks_allowed"] = [*params["evaluate"]["deepchecks_allowed"], *TINY_ALLOWED]
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def git_commit(dest: Path):
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark copy"]):
        subprocess.run(["git", *args], cwd=dest, check=True, env=ENV, capture_output=True)


def code_cells(stage: str, root: Path) -> list[str]:
    import nbformat
    nb = nbformat.read(root / "pipeline" / f"{stage}.ipynb", as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]


def as_scripts(dest: Path, params) -> None:
    "Rewrite the copy at `dest` as plain Python scripts: scripts/<stage>.py and a dvc.yaml that runs them."
    (dest / "scripts").mkdir()
    spec = yaml.safe_load((dest / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        assigns = "\n".join(f"{k} = {v!r}" for k, v in stage_parameters(name, params, dest).items())
        cells = [c.replace("\ndisplay(", "\nprint(") for c in code_cells(name, dest)]
        (dest / "scripts" / f"{name}.py").write_text(assigns + "\n\n" + "\n\n".join(cells) + "\n")
        stage["cmd"] = f"python scripts/{name}.py"
        stage["deps"] = [f"scripts/{name}.py" if d == f"pipeline/{name}.ipynb" else d for d in stage["deps"]]
        stage["outs"] = [o for o in stage["outs"] if (next(iter(o)) if isinstance(o, dict) else o) != f"reports/notebooks/{name}.ipynb"]
    (dest / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def timed(cmd, cwd, check=True) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if check and r.returncode != 0: sys.exit(f"{' '.join(map(str, cmd[:4]))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return elapsed


def best_of(n, cmd, cwd) -> float:
    return min(timed(cmd, cwd) for _ in range(n))


def pieces(ours: Path) -> dict:
    "The parts of a stage's fixed cost, each on its own (best of 3)."
    py = str(BIN / "python")
    empty = ours / "empty.ipynb"
    empty.write_text(json.dumps({"cells": [{"cell_type": "code", "execution_count": None, "id": "e", "metadata": {}, "outputs": [], "source": "1"}],
                                 "metadata": {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}},
                                 "nbformat": 4, "nbformat_minor": 5}))
    from mlops_nb.pipeline import run_stage  # noqa: F401  (what the runner imports, for the kernel timing below)
    runner = "import mlops_nb.cli, mlops_nb.pipeline; from mlops_nb.pipeline import _papermill; _papermill()"
    out = {"python_start_s": best_of(3, [py, "-c", "pass"], ours),
           "runner_imports_s": best_of(3, [py, "-c", runner], ours)}
    kernel = (f"{runner}\nimport time, papermill; t = time.perf_counter()\n"
              f"from mlops_nb.pipeline import execute\nexecute({str(empty)!r}, {str(ours / 'empty-out.ipynb')!r}, {{}}, {str(ours)!r})\n"
              "print(time.perf_counter() - t)")
    runs = [subprocess.run([py, "-c", kernel], cwd=ours, env=ENV, capture_output=True, text=True) for _ in range(3)]
    bad = [r for r in runs if r.returncode != 0]
    if bad: sys.exit(f"empty notebook failed:\n{bad[0].stderr[-2000:]}")
    out["kernel_empty_cell_s"] = min(float(r.stdout.strip().splitlines()[-1]) for r in runs)
    out["stage_imports_s"] = {}
    for name in STAGES:
        first = code_cells(name, ours)[0]
        imports = "\n".join(l for l in first.splitlines() if l.startswith(("import ", "from ")) or l.startswith(" ") and out_import(first, l))
        out["stage_imports_s"][name] = round(best_of(2, [py, "-c", imports], ours) - out["python_start_s"], 2)
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


def out_import(cell: str, line: str) -> bool:
    "Continuation lines of a parenthesised `from ... import (` statement."
    before = cell[:cell.index(line)]
    return before.rfind("import (") > before.rfind(")")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="800 synthetic rows and a 2-candidate search")
    ap.add_argument("--repeat", type=int, default=1, help="run every stage this many times (reruns forced): best of N")
    ap.add_argument("--setup-only", action="store_true", help="a tiny copy, registered and promoted in as its stages would (no timing, no report)")
    args = ap.parse_args()
    if args.setup_only:
        with tempfile.TemporaryDirectory() as tmp: return setup_check(Path(tmp) / "ours")
    with tempfile.TemporaryDirectory() as tmp:
        ours = project_copy(Path(tmp) / "ours", args.tiny)
        plain = project_copy(Path(tmp) / "plain", args.tiny)
        params = load_params(plain / "params.yaml")
        as_scripts(plain, params)
        git_commit(ours); git_commit(plain)
        runs = {name: {"ours_s": [], "plain_s": []} for name in STAGES}
        for k in range(args.repeat):   # interleaved, so that a slow minute of the machine hits both alike
            for name in STAGES:
                repro = [str(BIN / "dvc"), "repro", "--single-item", *(["--force"] if k else []), name]
                runs[name]["ours_s"].append(timed(repro, ours))
                runs[name]["plain_s"].append(timed(repro, plain))
        per_stage = {name: {key: min(times) for key, times in r.items()} for name, r in runs.items()}
        # nothing to do: the exit code only repeats the last run's promotion decision
        noop_run = statistics.median(timed([str(BIN / "mlops-nb"), "run"], ours, check=False) for _ in range(3))
        noop_plain = statistics.median(timed([str(BIN / "dvc"), "repro"], plain, check=False) for _ in range(3))
        parts = pieces(ours)
    t_ours, t_plain = sum(s["ours_s"] for s in per_stage.values()), sum(s["plain_s"] for s in per_stage.values())
    fixed = {name: s["ours_s"] - s["plain_s"] for name, s in per_stage.items()}
    print(f"{'stage':<16}{'notebook (papermill)':>22}{'plain script':>14}{'fixed cost':>12}")
    for name, s in per_stage.items():
        print(f"{name:<16}{s['ours_s']:>21.1f}s{s['plain_s']:>13.1f}s{fixed[name]:>11.1f}s")
    print(f"{'total':<16}{t_ours:>21.1f}s{t_plain:>13.1f}s{t_ours - t_plain:>11.1f}s")
    print(f"fixed cost per stage: median {statistics.median(fixed.values()):.1f}s, mean {statistics.mean(fixed.values()):.1f}s "
          f"(ratio {t_ours / t_plain:.2f}x over the whole pipeline); stages at most 4 s: {sum(v <= 4 for v in fixed.values())} of {len(fixed)}"
          + (f"; best of {args.repeat} runs" if args.repeat > 1 else ""))
    print(f"no-op `mlops-nb run` (nothing to do): {noop_run:.2f}s; no-op `dvc repro` of the plain scripts: {noop_plain:.2f}s")
    print("pieces, each on its own: python start {python_start_s}s, runner imports {runner_imports_s}s, "
          "papermill kernel + one empty cell {kernel_empty_cell_s}s".format(**parts))
    print("each stage's import cell in a fresh interpreter: " + ", ".join(f"{k} {v}s" for k, v in parts["stage_imports_s"].items()))
    result = {"benchmark": "pipeline_overhead", "data": "tiny synthetic" if args.tiny else params.data.source,
              "ours_s": round(t_ours, 2), "baseline": "dvc repro of the same stages as plain python scripts",
              "baseline_s": round(t_plain, 2), "ratio": round(t_ours / t_plain, 3), "overhead_s": round(t_ours - t_plain, 2),
              "stages": len(STAGES), "repeat": args.repeat, "fixed_cost_per_stage_s": {k: round(v, 2) for k, v in fixed.items()},
              "fixed_cost_median_s": round(statistics.median(fixed.values()), 2),
              "noop_run_s": round(noop_run, 2), "noop_plain_dvc_repro_s": round(noop_plain, 2), "pieces": parts}
    write_json(ROOT / "reports" / "benchmarks" / "pipeline_overhead.json", result)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
