"""The library and the notebooks never drift: mlops_nb/ is what nbdev-export makes of nbs/, notebooks are
committed clean, and every stage notebook, dvc.yaml and the stage table agree on the params they use."""
import ast
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import BIN, ROOT
from mlops_nb.pipeline import STAGES


def test_library_is_what_nbdev_export_makes(tmp_path):
    for name in ["nbs", "mlops_nb", "pyproject.toml"]:
        src = ROOT / name
        shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() else shutil.copy2(src, tmp_path / name)
    r = subprocess.run([str(BIN / "nbdev-export")], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    differ = [p.name for p in sorted((tmp_path / "mlops_nb").glob("*.py"))
              if p.read_text() != (ROOT / "mlops_nb" / p.name).read_text()]
    missing = sorted({p.name for p in (ROOT / "mlops_nb").glob("*.py")} ^ {p.name for p in (tmp_path / "mlops_nb").glob("*.py")})
    assert not differ and not missing, f"mlops_nb/ out of sync with nbs/ (run `make sync`): differ {differ}, only on one side {missing}"


NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb")) + sorted((ROOT / "pipeline").glob("*.ipynb"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_is_clean(nb):
    cells = json.loads(nb.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{nb.name}: cells {dirty} carry outputs (run `make sync`)"


def parameters_cell(nb):
    cells = json.loads(nb.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{nb.name}: expected one cell tagged `parameters`, found {len(tagged)}"
    return "".join(tagged[0]["source"])


def notebook_code(nb):
    return "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_notebook_parameters_match_the_stage_table(stage):
    tree = ast.parse(parameters_cell(ROOT / STAGES[stage].notebook))
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
    assert names == {k.split(".")[-1] for k in STAGES[stage].params}
    # literal defaults, so the notebook runs standalone
    assert all(isinstance(node, ast.Assign) and isinstance(ast.literal_eval(node.value), (str, int, float, bool, list))
               for node in tree.body)


DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_has_exactly_the_stages():
    assert list(DVC) == list(STAGES) == ["ingest", "validate", "materialize", "prepare", "train", "evaluate", "register", "infra_validate"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_yaml_declares_what_the_stage_reads(stage):
    spec = DVC[stage]
    assert spec["cmd"] == f"mlops-nb stage {stage}"
    assert spec["params"] == STAGES[stage].dvc_params
    deps = set(spec["deps"])
    assert STAGES[stage].notebook in deps
    imported = {node.module.split(".")[1] for node in ast.walk(ast.parse(notebook_code(ROOT / STAGES[stage].notebook)))
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlops_nb.")}
    assert {f"mlops_nb/{m}.py" for m in imported} <= deps, f"{stage} imports modules dvc.yaml does not list"


def test_executed_notebooks_are_never_dependencies():
    executed = {f"reports/notebooks/{s}.ipynb" for s in STAGES}
    for name, spec in DVC.items():
        assert not executed & set(spec["deps"]), name


def test_readme_is_generated_from_the_index_notebook():
    from mlops_nb.docs import readme_text
    assert (ROOT / "README.md").read_text() == readme_text(ROOT), "README.md differs from nbs/index.ipynb: run `make sync`"
    text = (ROOT / "README.md").read_text()
    assert text.index("make run") < text.index("make test") < 1000  # the two commands come first
