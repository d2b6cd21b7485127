"""The library and the notebooks never drift: mlops_nb/ is what nbdev-export makes of nbs/, notebooks are
committed clean, and dvc.yaml (the one list of stages), the stage notebooks' parameters cells and params.yaml agree."""
import ast
import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import BIN, ROOT
from mlops_nb.core import builtin_sections, load_params, load_yaml
from mlops_nb.pipeline import BUILTIN_STAGES, MODEL_SECTIONS, check_pipeline, check_stage, notebook_parameters, read_stages


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


STAGES = read_stages(ROOT)
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb")) + sorted((ROOT / "nbs" / "guides").glob("*.ipynb")) + sorted((ROOT / "pipeline").glob("*.ipynb"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_is_clean(nb):
    cells = json.loads(nb.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{nb.name}: cells {dirty} carry outputs (run `make sync`)"


def notebook_code(nb):
    return "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")


# dvc.yaml is the one list of stages: each stage's notebook sets exactly the params dvc.yaml gives it, and params.yaml
# holds each of them (typed by the built-in dataclasses, or, for a stage of yours, by its notebook's defaults)
PARAMS = load_yaml((ROOT / "params.yaml").read_text())


def test_dvc_yaml_lists_the_built_in_stages_first():
    assert list(STAGES)[:len(BUILTIN_STAGES)] == list(BUILTIN_STAGES)
    assert STAGES["register"].dvc_params == ["register.model_name", *MODEL_SECTIONS]   # a model's lineage: what register records


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_notebook_sets_what_dvc_yaml_gives_it(stage):
    s = STAGES[stage]
    defaults = notebook_parameters(ROOT / s.notebook)   # one cell tagged `parameters`, literal values only
    assert set(defaults) == {k.split(".")[-1] for k in s.params}, f"{stage}: {s.notebook} and dvc.yaml disagree on its parameters"
    assert len(s.params) == len(defaults)   # last names never collide
    for key in s.params:
        section, name = key.split(".")
        assert name in (PARAMS.get(section) or {}), f"params.yaml has no {key}, which {stage} reads"
    check_stage(s, load_params(ROOT / "params.yaml"), ROOT)   # your stages' values typed by the notebook's defaults


def test_every_section_of_params_yaml_is_built_in_or_read_by_a_stage():
    read = {k.split(".")[0] for s in STAGES.values() for k in s.dvc_params}
    assert set(PARAMS) <= set(builtin_sections()) | read
    check_pipeline(ROOT)   # no key of your stages' sections outside their notebooks; extra gate rules on files evaluate depends on


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_yaml_declares_what_the_stage_reads(stage):
    spec = DVC[stage]
    assert spec["cmd"] == f"mlops-nb stage {stage}"
    assert spec["params"] == STAGES[stage].dvc_params
    deps = set(spec["deps"])
    assert STAGES[stage].notebook in deps
    reached = {f"mlops_nb/{m}.py" for m in reached_modules(notebook_code(ROOT / STAGES[stage].notebook))}
    assert reached <= deps, f"{stage} reaches library modules dvc.yaml does not list: {sorted(reached - deps)}"


def library_imports(source: str) -> set[str]:
    "The mlops_nb modules `source` imports anywhere (a function's imports run when it is called), absolute or relative."
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import): found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mlops_nb.")}
        elif isinstance(node, ast.ImportFrom) and (node.module == "mlops_nb" or (node.level and not node.module)): found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level: found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlops_nb."): found.add(node.module.split(".")[1])
    return {m for m in found if (ROOT / "mlops_nb" / f"{m}.py").is_file()}


def reached_modules(code: str) -> set[str]:
    "The mlops_nb modules `code` imports, transitively, plus those a reached module runs in a child process."
    from mlops_nb.pipeline import IN_CHILD_PROCESS
    todo, seen = list(library_imports(code)), set()
    while todo:
        if (m := todo.pop()) in seen: continue
        seen.add(m)
        todo += [*library_imports((ROOT / "mlops_nb" / f"{m}.py").read_text()), *IN_CHILD_PROCESS.get(m, ())]
    return seen


def test_modules_that_start_the_cli_in_a_child_declare_what_it_runs():
    "A module that runs `mlops_nb.cli` in a child process (infra starts `mlops-nb serve`) names what it runs in IN_CHILD_PROCESS."
    from mlops_nb.pipeline import IN_CHILD_PROCESS
    reached = set().union(*(reached_modules(notebook_code(ROOT / s.notebook)) for s in STAGES.values()))
    starters = {m for m in reached if "from mlops_nb.cli import main" in (ROOT / "mlops_nb" / f"{m}.py").read_text()}
    assert "infra" in starters and starters <= set(IN_CHILD_PROCESS), starters
    assert {"serve", "predlog", "observe", "protocols"} <= reached_modules(notebook_code(ROOT / STAGES["infra_validate"].notebook))


@pytest.mark.parametrize("stage", [s for s in STAGES if s in BUILTIN_STAGES])
def test_stage_notebook_defaults_are_the_dataclass_defaults(stage):
    "A built-in stage run standalone (papermill, no params.yaml) behaves as the pipeline does with params.yaml unset."
    defaults = notebook_parameters(ROOT / STAGES[stage].notebook)
    sections = builtin_sections()
    for key in STAGES[stage].params:
        section, name = key.split(".")
        field = next(f for f in dataclasses.fields(sections[section]) if f.name == name)
        expected = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        got = defaults[name].default
        assert (got, type(got)) == (expected, type(expected)), f"{stage}: {STAGES[stage].notebook} sets {name} = {got!r}, the dataclass {key} = {expected!r}"


def test_executed_notebooks_are_never_dependencies():
    executed = {f"reports/notebooks/{s}.ipynb" for s in STAGES}
    for name, spec in DVC.items():
        assert not executed & set(spec["deps"]), name


def test_readme_is_generated_from_the_index_notebook():
    from mlops_nb.docs import readme_text
    assert (ROOT / "README.md").read_text() == readme_text(ROOT), "README.md differs from nbs/index.ipynb: run `make sync`"
    text = (ROOT / "README.md").read_text()
    assert text.index("make run") < text.index("make test") < 1000  # the two commands come first
    assert len(text) < 12_000, f"README.md is {len(text)} characters: it is the front door; topics go to a guide (nbs/guides/)"


def test_every_command_the_readme_shows_exists():
    "The README's mlops-nb commands and options exist (each guide's notebook checks its own the same way)."
    from mlops_nb.docs import command_problems, shown_commands
    commands = shown_commands((ROOT / "README.md").read_text())
    assert {"mlops-nb init --data my_table.csv --target label", "mlops-nb run", "mlops-nb serve"} <= set(commands), commands
    assert [p for c in commands for p in command_problems(c)] == []


def test_every_command_the_guides_mention_exists():
    "Each mlops-nb command a guide names in its prose or tables (`mlops-nb promote --from staging`) exists, with its options."
    import re
    from mlops_nb.docs import notebook_markdown
    shown = {c for nb in sorted((ROOT / "nbs" / "guides").glob("[0-9][0-9]_*.ipynb"))
             for c in re.findall(r"`(mlops-nb [^`]+)`", notebook_markdown(nb))}
    assert len(shown) > 20, shown
    helps, problems = {}, []
    for command in sorted(shown):
        words = command.split()
        # `stage NAME` runs a stage: its help is the stage command's; `features apply`, `log prune`: the action's own
        head = tuple(words[1:3]) if len(words) > 2 and re.fullmatch(r"[a-z][a-z_-]*", words[2]) and words[1] != "stage" else tuple(words[1:2])
        if head not in helps: helps[head] = subprocess.run([str(BIN / "mlops-nb"), *head, "--help"], capture_output=True, text=True)
        r = helps[head]
        if r.returncode != 0: problems.append(f"{command}: not a command")
        problems += [f"{command}: no option {o}" for o in re.findall(r"(?<!\S)(--[a-z][\w-]*)", command) if o not in r.stdout]
    assert problems == []


def test_the_readme_links_every_guide():
    text = (ROOT / "README.md").read_text()
    guides = sorted((ROOT / "nbs" / "guides").glob("[0-9][0-9]_*.ipynb"))
    assert guides and [g.name for g in guides if f"](nbs/guides/{g.name})" not in text] == []
