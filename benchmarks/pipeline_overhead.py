"""What papermill + DVC cost on top of the work itself.

Runs the whole pipeline twice on the same data, each in its own fresh copy of the project:
  1. `dvc repro` - every stage notebook executed by papermill in its own kernel, as `make run` does;
  2. one plain Python process that executes the code cells of the same stage notebooks, in order, with the
     same injected parameters: the same library calls, without kernels, papermill or DVC.
Prints both wall times and their ratio; the last line is one JSON object (also written to
reports/benchmarks/pipeline_overhead.json).

    .venv/bin/python benchmarks/pipeline_overhead.py            # the default dataset and params
    .venv/bin/python benchmarks/pipeline_overhead.py --tiny     # 800 synthetic rows, 2 candidates: a quick look
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
from mlops_nb.core import load_params, write_json  # noqa: E402
from mlops_nb.pipeline import STAGES, stage_parameters  # noqa: E402

FILES = ["params.yaml", "schema.yaml", "dvc.yaml", "pipeline", ".dvc", ".dvcignore", ".gitignore", "mlops_nb"]
TINY = {"data": {"source": "synthetic", "n_rows": 800}, "train": {"model": "logreg", "n_iter": 2, "cv_folds": 2},
        "evaluate": {"min_primary": 0.6}}

# Executes the stage notebooks' code cells in one process: the "plain Python" side of the comparison.
PLAIN = r'''
import json, sys, nbformat
stages = json.loads(sys.argv[1])
for name, params in stages:
    namespace = {"__name__": "__main__"}
    exec("\n".join(f"{k} = {v!r}" for k, v in params.items()), namespace)
    for cell in nbformat.read(f"pipeline/{name}.ipynb", as_version=4).cells:
        if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
            exec(compile(cell.source, f"{name}.ipynb", "exec"), namespace)
'''


def project_copy(dest: Path, tiny: bool) -> Path:
    dest.mkdir(parents=True)
    for name in FILES:
        src = ROOT / name
        if src.is_dir(): shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp"))
        elif src.exists(): shutil.copy2(src, dest / name)
    if tiny:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for section, values in TINY.items(): params[section].update(values)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark copy"]):
        subprocess.run(["git", *args], cwd=dest, check=True, env=env, capture_output=True)
    return dest


def timed(cmd, cwd) -> float:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY": "true", "MPLBACKEND": "Agg"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0: sys.exit(f"{' '.join(cmd[:3])} failed:\n{r.stderr[-3000:]}")
    return elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="800 synthetic rows and a 2-candidate search")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = project_copy(Path(tmp) / "dvc", args.tiny)
        plain = project_copy(Path(tmp) / "plain", args.tiny)
        params = load_params(plain / "params.yaml")
        stages = [(name, stage_parameters(name, params)) for name in STAGES]
        t_pipeline = timed([str(BIN / "dvc"), "repro"], ours)
        t_plain = timed([sys.executable, "-c", PLAIN, json.dumps(stages)], plain)
    result = {"benchmark": "pipeline_overhead", "data": "tiny synthetic" if args.tiny else params.data.source,
              "ours_s": round(t_pipeline, 2), "baseline": "same notebook code in one python process",
              "baseline_s": round(t_plain, 2), "ratio": round(t_pipeline / t_plain, 3),
              "overhead_s": round(t_pipeline - t_plain, 2), "stages": len(STAGES)}
    print(f"{'run':<44}{'wall time':>12}")
    print(f"{'dvc repro (papermill, one kernel per stage)':<44}{t_pipeline:>11.1f}s")
    print(f"{'one plain python process':<44}{t_plain:>11.1f}s")
    print(f"ratio {result['ratio']:.2f}x: {result['overhead_s']:.1f}s of overhead over {len(STAGES)} stages "
          f"({result['overhead_s'] / len(STAGES):.1f}s a stage: kernel start, imports, notebook I/O, DVC hashing)")
    write_json(ROOT / "reports" / "benchmarks" / "pipeline_overhead.json", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
