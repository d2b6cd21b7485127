"""Your notebooks are first-class. A notebook written as a data scientist would (pandas only, a `parameters` cell)
becomes a stage with `mlops-nb stage add`; `dvc repro` runs it in order, a change of its parameter re-runs it alone,
and `evaluate.extra_rules` on its metrics rejects or promotes a candidate. A feature function written in a library
notebook of the project's own package (nbdev-exported) and named in `train.feature_steps` is inside the champion's
Pipeline, and the service answers raw records exactly as the offline model does. Bad input to `stage add` is one
error with nothing written (those checks run no pipeline)."""
import json
import math
import os
import shutil
import sys

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from conftest import TINY, champion_version, copy_project, git_init, run
from mlops_nb.pipeline import set_params_text

KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
SEGMENT_PARAMS = "min_size = 20     # segments with fewer test rows are left out of the table\nby = \"contract\"   # the column that defines a segment"
SEGMENT_CODE = """import json
from pathlib import Path

import pandas as pd

test = pd.read_parquet("data/processed/test.parquet")
counts = test[by].value_counts()
table = pd.DataFrame({"rows": counts, "share": counts / len(test)})
Path("reports/segments").mkdir(parents=True, exist_ok=True)
table[table.rows >= min_size].to_csv("reports/segments/table.csv")
Path("reports/segments/segments.json").write_text(json.dumps({"segments": int(len(counts)), "min_share": float(table.share.min())}))
table"""
STEP = "churnlib.features.charges_per_month"
RULE = {"file": "reports/segments/segments.json", "key": "min_share"}


def write_notebook(path, params_source: str | None, code: str = SEGMENT_CODE):
    "A notebook as a data scientist writes it: a title, a cell tagged `parameters` (None: untagged), the work."
    params = new_code_cell(params_source or "min_size = 20")
    if params_source is not None: params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell("# Customer segments"), params, new_code_cell(code)], metadata=KERNEL)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def add_feature_package(project):
    "The project's own package `churnlib`, exported by nbdev from a library notebook (the project's nbdev lib_path)."
    nb = new_notebook(cells=[new_code_cell("#| default_exp features"), new_markdown_cell("# features\n\n> Churn features."),
                             new_code_cell('#| export\ndef charges_per_month(df):\n    "Total charges per month of tenure (a new customer counts one)."\n'
                                           '    return df.assign(charges_per_month=df["total_charges"] / df["tenure"].clip(lower=1))')], metadata=KERNEL)
    (project / "nbs").mkdir()
    nbformat.write(nb, str(project / "nbs" / "00_features.ipynb"))
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('lib_path = "mlops_nb"', 'lib_path = "churnlib"'))
    run("nbdev-export", cwd=project)
    assert (project / "churnlib" / "features.py").is_file()


def ran(stdout: str) -> list[str]:
    return [line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage")]


def set_params(project, updates: dict):
    p = project / "params.yaml"
    p.write_text(set_params_text(p.read_text(), updates))


def commit(project, message: str):
    run("git", "add", "-A", cwd=project)
    run("git", "commit", "-qm", message, cwd=project)


# ---------------------------------------------------------------- one pipeline project for the module

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    "A project copy with a segments stage of the user's and a feature step of the user's package, run to a champion."
    project = copy_project(tmp_path_factory.mktemp("user_stages") / "project",
                           {**TINY, "evaluate": {**TINY["evaluate"], "deepchecks": False}, "train": {**TINY["train"], "feature_steps": [STEP]}})
    add_feature_package(project)
    # the package is importable where the project runs, as `pip install -e .` makes it
    pyenv = {"PYTHONPATH": str(project)}
    git_init(project)
    run("dvc", "repro", "prepare", cwd=project, env=pyenv)   # the notebook is tried on real data before it is added
    write_notebook(project / "notebooks" / "segments.ipynb", SEGMENT_PARAMS)
    added = run("mlops-nb", "stage", "add", "notebooks/segments.ipynb", "--name", "segments", "--after", "prepare",
                "--outs", "reports/segments/table.csv", "--metrics", "reports/segments/segments.json", "--gate", cwd=project, env=pyenv)
    commit(project, "stage segments, feature step")
    first = run("mlops-nb", "run", cwd=project, env=pyenv)
    return project, pyenv, added, first


@pytest.mark.slow
def test_stage_add_writes_the_stage_and_runs_in_order(pipeline):
    project, _, added, first = pipeline
    assert "commit it: git add pipeline/segments.ipynb params.yaml dvc.yaml" in added.stdout
    from mlops_nb.core import load_params
    from mlops_nb.pipeline import read_stages
    stage = read_stages(project)["segments"]
    assert stage.params == ("segments.min_size", "segments.by")
    assert {"pipeline/segments.ipynb", "data/processed/test.parquet"} <= set(stage.deps)
    assert "reports/segments/segments.json" in read_stages(project)["evaluate"].deps   # --gate
    assert load_params(project / "params.yaml").stages == {"segments": {"min_size": 20, "by": "contract"}}
    order = ran(first.stdout)
    assert "prepare" not in order and order.index("segments") < order.index("evaluate"), order   # prepare ran before the add
    assert json.loads((project / "reports" / "segments" / "segments.json").read_text())["segments"] == 3
    injected = [c for c in json.loads((project / "reports" / "notebooks" / "segments.ipynb").read_text())["cells"]
                if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and "min_size = 20" in "".join(injected[0]["source"])
    assert "-> champion" in first.stdout


@pytest.fixture(scope="module")
def param_change(pipeline):
    "segments.min_size changed in params.yaml: what DVC says is stale, and what `dvc repro` runs."
    project, pyenv, _, _ = pipeline
    set_params(project, {"segments.min_size": 1000})
    commit(project, "segments.min_size 1000")
    stale = json.loads(run("dvc", "status", "--json", cwd=project).stdout or "{}")
    return stale, run("dvc", "repro", cwd=project, env=pyenv)


@pytest.mark.slow
def test_changing_its_parameter_reruns_that_stage_only(pipeline, param_change):
    project, _, _, _ = pipeline
    stale, repro = param_change
    assert list(stale) == ["segments"], stale
    assert ran(repro.stdout) == ["segments"]
    assert pd.read_csv(project / "reports" / "segments" / "table.csv").empty   # the parameter reached the notebook


@pytest.fixture(scope="module")
def gated(pipeline, param_change):
    "An extra gate rule on the segments metric: impossible (the candidate is rejected), then loose (it is promoted)."
    project, pyenv, _, _ = pipeline
    before = champion_version(project)
    set_params(project, {"evaluate.extra_rules": [RULE | {"min": 0.99}]})
    commit(project, "extra rule: min_share >= 0.99")
    strict = run("mlops-nb", "run", cwd=project, env=pyenv, check=False)
    strict_gate = json.loads((project / "reports" / "evaluate" / "gate.json").read_text())
    after_strict = champion_version(project)
    set_params(project, {"evaluate.extra_rules": [RULE | {"min": 0.01}]})
    commit(project, "extra rule: min_share >= 0.01")
    loose = run("mlops-nb", "run", cwd=project, env=pyenv, check=False)
    loose_gate = json.loads((project / "reports" / "evaluate" / "gate.json").read_text())
    return before, (strict, strict_gate, after_strict), (loose, loose_gate, champion_version(project))


@pytest.mark.slow
def test_extra_rule_on_its_metric_rejects_then_promotes(gated):
    before, (strict, strict_gate, after_strict), (loose, loose_gate, after_loose) = gated
    rule = "extra:reports/segments/segments.json:min_share"
    assert strict.returncode == 3, strict.stderr[-2000:]
    assert not strict_gate["blessed"] and strict_gate["failed_rules"] == [rule]
    assert next(r for r in strict_gate["rules"] if r["rule"] == rule)["bound"] == 0.99
    assert after_strict == before   # the champion stays
    assert loose.returncode == 0, loose.stderr[-2000:]
    assert loose_gate["blessed"] and rule in [r["rule"] for r in loose_gate["rules"]]
    assert int(after_loose) > int(before)


@pytest.mark.slow
def test_champion_pipeline_holds_the_feature_step_and_serves_it(pipeline, monkeypatch, tmp_path):
    import httpx
    project, pyenv, _, _ = pipeline
    from test_serve import Server
    from conftest import records_of
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.chdir(project)   # the allow-list is the project's: train.feature_steps' module is trusted there
    from mlops_nb.core import tracking_uri
    from mlops_nb.registry import load_champion, use_project_tracking
    use_project_tracking(project)
    version, model = load_champion("churn-classifier")
    assert [name for name, _ in model.steps][:2] == ["charges_per_month", "features"]
    assert "charges_per_month" in model.named_steps["features"].get_feature_names_out()
    X = pd.read_parquet(project / "data" / "processed" / "test.parquet").drop(columns=["churn"]).head(25)
    server = Server(project, "--log-dir", "", "--poll-seconds", "0", env=pyenv | {"MLFLOW_TRACKING_URI": tracking_uri(project)})
    try: r = server.post(records_of(X))
    finally: server.stop()
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == version
    np.testing.assert_allclose(r.json()["probabilities"], model.predict_proba(X), rtol=0, atol=1e-9)
    # elsewhere the same file is refused: what the artifact declares does not widen the allow-list
    from mlops_nb.core import MlopsError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MlopsError, match="outside the project's allow-list"): load_champion("churn-classifier")


@pytest.mark.slow
def test_onnx_export_records_that_the_step_did_not_convert(pipeline):
    project, pyenv, _, _ = pipeline
    report = json.loads((project / "reports" / "register" / "onnx.json").read_text())
    assert report["converted"] is False and report["feature_steps"] == [STEP] and STEP in report["reason"], report
    out = run("mlops-nb", "export", "models:/churn-classifier@champion", "edge", cwd=project, env=pyenv, check=False)
    assert out.returncode == 1 and "no usable ONNX model" in out.stderr and STEP in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------- bad input: one error, nothing written, no pipeline run

@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    "A project copy that never ran (stage add checks what it can without data)."
    project = copy_project(tmp_path_factory.mktemp("bare") / "project", TINY)
    (project / "reports").mkdir(exist_ok=True)
    (project / "reports" / "found.json").write_text('{"x": 1}')
    return project


def snapshot(project):
    return {f: (project / f).read_text() for f in ("dvc.yaml", "params.yaml")}, sorted(p.name for p in (project / "pipeline").iterdir())


BAD = {
    "no parameters cell": (None, ["--name", "seg"], "has no cell tagged `parameters`: tag the cell that sets your parameters"),
    "not a literal": ("n = len([1, 2])", ["--name", "seg"], "parameters cell, line 1: n = len\\(\\[1, 2\\]\\) is not a literal value"),
    "name taken": (SEGMENT_PARAMS, ["--name", "prepare"], "dvc.yaml has a stage prepare already"),
    "bad name": (SEGMENT_PARAMS, ["--name", "My-Stage"], "--name 'My-Stage': use lower-case letters"),
    "an out another stage writes": (SEGMENT_PARAMS, ["--name", "seg", "--outs", "models/model.joblib"], "stage train writes models/model.joblib already"),
    "a cycle": (SEGMENT_PARAMS, ["--name", "seg", "--after", "prepare", "--outs", "schema.yaml"], "would close a cycle: seg reads prepare reads validate reads seg"),
    "unknown upstream": (SEGMENT_PARAMS, ["--name", "seg", "--after", "prep"], "--after prep: no such stage"),
    "gate without metrics": (SEGMENT_PARAMS, ["--name", "seg", "--gate"], "--gate makes evaluate depend on the stage's metrics"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_and_nothing_is_written(bare, case, tmp_path):
    import re
    params, args, message = BAD[case]
    nb = write_notebook(tmp_path / "mine.ipynb", params)
    before = snapshot(bare)
    r = run("mlops-nb", "stage", "add", str(nb), *args, cwd=bare, check=False)
    assert r.returncode == 1 and re.search(message, r.stderr), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert snapshot(bare) == before


def test_a_notebook_that_fails_in_a_fresh_kernel_is_refused_and_its_outputs_undone(bare, tmp_path):
    code = 'from pathlib import Path\nPath("reports/half.json").write_text("{}")\nraise ValueError("min_size must be positive")'
    nb = write_notebook(tmp_path / "mine.ipynb", "min_size = -1", code)
    before = snapshot(bare)
    r = run("mlops-nb", "stage", "add", str(nb), "--name", "seg", "--metrics", "reports/half.json", cwd=bare, check=False)
    assert r.returncode == 1 and "failed in a fresh kernel" in r.stderr and "ValueError: min_size must be positive" in r.stderr, r.stderr
    assert snapshot(bare) == before and not (bare / "reports" / "half.json").exists()


def test_stage_list_and_remove(bare, tmp_path):
    nb = write_notebook(tmp_path / "mine.ipynb", SEGMENT_PARAMS, 'from pathlib import Path\nPath("reports/seg.json").write_text(\'{"n": 1}\')')
    before = snapshot(bare)
    run("mlops-nb", "stage", "add", str(nb), "--name", "seg", "--metrics", "reports/seg.json", "--gate", cwd=bare)
    listed = run("mlops-nb", "stage", "list", cwd=bare).stdout
    assert "seg" in listed and "yours" in listed and "built in" in listed
    # a value of the wrong type for the notebook's default is named before any kernel starts
    text = (bare / "params.yaml").read_text().replace("min_size: 20", "min_size: many")
    (bare / "params.yaml").write_text(text)
    r = run("mlops-nb", "stage", "seg", cwd=bare, check=False)
    assert r.returncode == 1 and "seg.min_size must be int like its default 20 in pipeline/seg.ipynb, got str 'many'" in r.stderr, r.stderr
    (bare / "params.yaml").write_text(text.replace("min_size: many", "min_size: 20"))
    # a rule over its metrics keeps it: remove the rule first
    set_params(bare, {"evaluate.extra_rules": [{"file": "reports/seg.json", "key": "n", "min": 1}]})
    r = run("mlops-nb", "stage", "remove", "seg", cwd=bare, check=False)
    assert r.returncode == 1 and "evaluate.extra_rules reads reports/seg.json" in r.stderr
    set_params(bare, {"evaluate.extra_rules": []})
    run("mlops-nb", "stage", "remove", "seg", cwd=bare)
    assert snapshot(bare) == before
    r = run("mlops-nb", "stage", "remove", "train", cwd=bare, check=False)
    assert r.returncode == 1 and "stage train is built in" in r.stderr
