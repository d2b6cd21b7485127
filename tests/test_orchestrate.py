"""The pipeline on Kubeflow Pipelines and Airflow (`mlops-nb orchestrate`), generated from dvc.yaml and params.yaml.

Each orchestrator runs in its own tool environment (`make tools-kfp`, `make tools-airflow`: built here when missing,
from their locks). Kubeflow: the compiled pipeline is loaded back with the kfp SDK; its DAG, commands and parameters
are checked against dvc.yaml and params.yaml read here; then every task's container command runs in dependency order,
its placeholders filled the way KFP's launcher fills them (parameters, artifact paths), each in a fresh clone as in a
pod of the image, sharing only the artifacts and the tracking store. Airflow: `airflow dags test` (a real engine, a
temporary AIRFLOW_HOME on SQLite) runs the generated DAG in a fresh clone, then again with a corrupted batch. Both end
with the champion and test metrics of one `mlops-nb run` on the same tiny params (shared by the module)."""
import json
import os
import re
import sqlite3
import subprocess

import pytest
import yaml

from conftest import BIN, ROOT, TINY, champion_version, copy_project, git_init, registry, run
from mlops_nb.core import load_yaml

pytestmark = pytest.mark.slow

COMMON = {"git_url", "git_branch", "git_commit", "tracking_uri"}


def tool_bin(tool: str):
    "The bin folder of a tool environment, built with its make target when missing (pip's cache makes a rebuild quick)."
    if not (ROOT / ".tools" / tool / ".installed").exists():
        r = subprocess.run(["make", f"tools-{tool}"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"make tools-{tool} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return ROOT / ".tools" / tool / "bin"


def stage_params(params: dict, keys: list) -> dict:
    "The section.key leaves a stage lists (a whole section means all its keys), with params.yaml's values."
    leaves = {}
    for key in keys:
        section, _, name = key.partition(".")
        for n in ([name] if name else params[section]): leaves[f"{section}.{n}"] = params[section][n]
    return leaves


def dvc_dag(project) -> dict:
    "stage -> the stages whose outs it lists as deps, read straight from dvc.yaml."
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    outs = {s: [next(iter(o)) if isinstance(o, dict) else o for k in ("outs", "metrics", "plots") for o in spec.get(k, [])]
            for s, spec in stages.items()}
    inside = lambda a, b: a == b or a.startswith(b + "/")
    return {s: sorted(u for u in stages if u != s and any(inside(d, o) or inside(o, d) for d in spec["deps"] for o in outs[u]))
            for s, spec in stages.items()}


def metrics_of(project):
    return json.loads((project / "reports" / "metrics" / "evaluate.json").read_text())


def champion_metrics(project, uri=None):
    if uri: os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        client = registry(project)
        champion = client.get_model_version_by_alias("churn-classifier", "champion")
        return str(champion.version), {k: v for k, v in client.get_run(champion.run_id).data.metrics.items() if k.startswith("test_")}
    finally: os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    "A project copy with tiny params, committed, and the result of one `mlops-nb run` in a clone of it."
    base = tmp_path_factory.mktemp("orchestrate")
    project = copy_project(base / "project", TINY)
    commit = git_init(project)
    reference = base / "reference"
    run("git", "clone", "-q", str(project), str(reference), cwd=base)
    run("mlops-nb", "run", cwd=reference)
    return base, project, commit, {"champion": champion_metrics(reference), "metrics": metrics_of(reference)}


# Kubeflow

@pytest.fixture(scope="module")
def kfp_pipeline(source):
    "The pipeline compiled for the project copy, as the kfp SDK loads it back (its inputs and its PipelineSpec)."
    base, project, _, _ = source
    tools = tool_bin("kfp").parent.parent
    out = base / "pipeline.yaml"
    run("mlops-nb", "orchestrate", "kubeflow", str(out), "--image", "example.org/mlops-nb-pipeline:1", cwd=project,
        env={"MLOPS_NB_TOOLS": str(tools)})
    loader = ("import json, sys\nfrom google.protobuf import json_format\nfrom kfp import components\n"
              "c = components.load_component_from_file(sys.argv[1])\n"
              "print(json.dumps({'name': c.name, 'inputs': {k: [v.type, v.default] for k, v in c.component_spec.inputs.items()},"
              " 'spec': json_format.MessageToDict(c.component_spec.implementation.graph)}))")
    r = subprocess.run([str(tool_bin("kfp") / "python"), "-c", loader, str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_kubeflow_dag_commands_and_parameters_are_dvc_yamls(source, kfp_pipeline):
    _, project, _, _ = source
    spec, params = kfp_pipeline["spec"], load_yaml((project / "params.yaml").read_text())
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    tasks = spec["root"]["dag"]["tasks"]
    stage_of = {t: v["taskInfo"]["name"] for t, v in tasks.items()}   # KFP's task keys are DNS-like (infra-validate)
    assert {stage_of[t]: sorted(stage_of[u] for u in v.get("dependentTasks", [])) for t, v in tasks.items()} == dvc_dag(project)
    defaults = {}
    for key, task in tasks.items():
        name = stage_of[key]
        container = spec["deploymentSpec"]["executors"][spec["components"][task["componentRef"]["name"]]["executorLabel"]]["container"]
        assert container["image"] == "example.org/mlops-nb-pipeline:1"
        command, script = container["command"], container["command"][2]
        assert command[:2] == ["bash", "-c"] and command[3] == name
        assert re.findall(r"^mlops-nb stage .*$", script, re.M) == [f"mlops-nb stage {name}"]   # the stage, and only it
        leaves = stage_params(params, stages[name].get("params", []))
        assert set(task["inputs"]["parameters"]) == COMMON | {k.replace(".", "__") for k in leaves}, name
        args = container["args"]
        pairs = args[args.index("--params") + 1:]   # key, its placeholder: what `mlops-nb orchestrate params` writes
        assert dict(zip(pairs[::2], pairs[1::2])) == {k: f"{{{{$.inputs.parameters['{k.replace('.', '__')}']}}}}" for k in leaves}
        assert task["retryPolicy"]["maxRetryCount"] >= 1 and task["cachingOptions"]["enableCache"]
        assert "notebook" in spec["components"][task["componentRef"]["name"]]["outputDefinitions"]["artifacts"]
        defaults.update(leaves)
    pipeline_inputs = kfp_pipeline["inputs"]
    assert set(pipeline_inputs) == COMMON | {k.replace(".", "__") for k in defaults}
    for key, value in defaults.items():   # typed, params.yaml's value as default
        kind, default = pipeline_inputs[key.replace(".", "__")]
        assert kind == {bool: "Boolean", int: "Integer", float: "Float", list: "List", dict: "Dict"}.get(type(value), "String"), key
        assert default == value, key


def fill(template: str, values: dict, paths: dict) -> str:
    "A KFP placeholder filled as the launcher does: a parameter's value (integers as integers, lists and dicts as JSON), an artifact's path."
    def param(m):
        value, kind = values[m.group(1)]
        return value if kind == "STRING" else json.dumps(int(value) if kind == "NUMBER_INTEGER" else value)
    template = re.sub(r"\{\{\$\.inputs\.parameters\['(\w+)'\]\}\}", param, template)
    return re.sub(r"\{\{\$\.(inputs|outputs)\.artifacts\['(\w+)'\]\.path\}\}", lambda m: str(paths[m.group(1), m.group(2)]), template)


def topological(tasks: dict) -> list:
    order = []
    while len(order) < len(tasks):
        order += sorted(t for t, v in tasks.items() if t not in order and set(v.get("dependentTasks", [])) <= set(order))
    return order


@pytest.fixture(scope="module")
def kfp_run(source, kfp_pipeline):
    "Every task's command, in dependency order, each in a fresh clone; the artifacts and the tracking store are shared."
    base, project, commit, _ = source
    spec = kfp_pipeline["spec"]
    declared = spec["root"]["inputDefinitions"]["parameters"]
    store = base / "kfp-tracking"
    store.mkdir()
    submitted = dict(git_url=str(project), git_branch="main", git_commit=commit, tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    pipeline_params = {k: (submitted.get(k, v.get("defaultValue")), v["parameterType"]) for k, v in declared.items()}
    artifacts, tasks = base / "kfp-artifacts", spec["root"]["dag"]["tasks"]
    for name in topological(tasks):
        task = tasks[name]
        comp = spec["components"][task["componentRef"]["name"]]
        container = spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]
        paths = {("outputs", a): artifacts / name / a for a in comp["outputDefinitions"]["artifacts"]}
        for a, src in task["inputs"].get("artifacts", {}).items():
            paths["inputs", a] = artifacts / src["taskOutputArtifact"]["producerTask"] / src["taskOutputArtifact"]["outputArtifactKey"]
        values = {p: pipeline_params[v["componentInputParameter"]] for p, v in task["inputs"]["parameters"].items()}
        cmd = [fill(a, values, paths) for a in container["command"] + container["args"]]
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(base)}
        r = subprocess.run(cmd, cwd=base, capture_output=True, text=True, env=env)
        assert r.returncode == 0, f"task {name} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return artifacts, f"sqlite:///{store / 'mlflow.db'}"


def test_kubeflow_tasks_end_with_the_champion_and_metrics_of_mlops_nb_run(source, kfp_run):
    _, project, _, reference = source
    artifacts, uri = kfp_run
    metrics = json.loads((artifacts / "evaluate" / "reports_metrics_evaluate_json").read_text())
    assert metrics == pytest.approx(reference["metrics"], abs=1e-9, rel=0)
    version, champion = champion_metrics(project, uri)
    assert (version, champion) == (reference["champion"][0], pytest.approx(reference["champion"][1], abs=1e-9, rel=0))
    notebook = json.loads((artifacts / "train" / "notebook").read_text())   # the executed notebook, an output artifact
    assert any(c.get("outputs") for c in notebook["cells"] if c["cell_type"] == "code")


def test_kubeflow_example_is_current():
    "deploy/kubeflow/pipeline.yaml is what `mlops-nb orchestrate kubeflow` makes of this dvc.yaml and params.yaml."
    tool_bin("kfp")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        run("mlops-nb", "orchestrate", "kubeflow", f"{tmp}/p.yaml", cwd=ROOT)
        assert (ROOT / "deploy" / "kubeflow" / "pipeline.yaml").read_text() == open(f"{tmp}/p.yaml").read(), \
            "deploy/kubeflow/pipeline.yaml is stale: mlops-nb orchestrate kubeflow deploy/kubeflow/pipeline.yaml"


def test_pipeline_image_lints_clean():
    "docker/pipeline.Dockerfile (the image of the KFP steps) passes hadolint, as the serving Dockerfile does."
    r = subprocess.run([str(BIN / "hadolint"), "--no-color", str(ROOT / "docker" / "pipeline.Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# Airflow

def test_airflow_examples_are_current(tmp_path):
    run("mlops-nb", "orchestrate", "airflow", str(tmp_path), cwd=ROOT)
    for f in ["mlops_nb_pipeline.py", "mlops_nb_ct.py"]:
        assert (ROOT / "deploy" / "airflow" / f).read_text() == (tmp_path / f).read_text(), \
            f"deploy/airflow/{f} is stale: mlops-nb orchestrate airflow deploy/airflow"


@pytest.fixture(scope="module")
def airflow(source):
    "A temporary Airflow (SQLite) with the project copy's generated DAGs, and a function running `airflow dags test`."
    base, project, _, _ = source
    home = base / "airflow"
    run("mlops-nb", "orchestrate", "airflow", str(home / "dags"), "--schedule", "@daily", cwd=project)
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "MLOPS_NB_BIN": str(BIN)}
    airflow_cmd = str(tool_bin("airflow") / "airflow")
    r = subprocess.run([airflow_cmd, "db", "migrate"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    def dags_test(checkout, logical_date):
        r = subprocess.run([airflow_cmd, "dags", "test", "mlops_nb_pipeline", logical_date], env={**env, "MLOPS_NB_PROJECT": str(checkout)},
                           capture_output=True, text=True)
        with sqlite3.connect(home / "airflow.db") as db:
            states = dict(db.execute("SELECT ti.task_id, ti.state FROM task_instance ti JOIN dag_run r ON ti.run_id = r.run_id "
                                     "AND ti.dag_id = r.dag_id WHERE r.dag_id = 'mlops_nb_pipeline' AND r.logical_date LIKE ?",
                                     (logical_date[:10] + "%",)))
        return r, states
    return dags_test


def test_airflow_dag_runs_the_pipeline_then_stops_at_a_corrupted_batch(source, airflow, tmp_path):
    base, project, _, reference = source
    from mlops_nb.data import drop_identifiers, synthetic_churn
    from test_schema import four_problem_batch
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    checkout = tmp_path / "checkout"
    run("git", "clone", "-q", str(project), str(checkout), cwd=tmp_path)
    r, states = airflow(checkout, "2026-01-01T00:00:00+00:00")
    assert states == {s: "success" for s in stages}, f"{states}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert metrics_of(checkout) == pytest.approx(reference["metrics"], abs=1e-9, rel=0)
    version, champion = champion_metrics(checkout)
    assert (version, champion) == (reference["champion"][0], pytest.approx(reference["champion"][1], abs=1e-9, rel=0))

    # a corrupted batch: validate's task fails, every task after it is skipped (upstream failed), the champion stays
    batch, _, _ = four_problem_batch(drop_identifiers(synthetic_churn(800, seed=42), ["rownames"]))
    batch.to_csv(checkout / "batch.csv", index=False)
    params = load_yaml((checkout / "params.yaml").read_text())
    params["data"]["source"] = "batch.csv"
    (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r, states = airflow(checkout, "2026-01-02T00:00:00+00:00")
    after = stages[stages.index("validate") + 1:]
    assert states == {"ingest": "success", "validate": "failed", **{s: "upstream_failed" for s in after}}, f"{states}\n{r.stderr[-3000:]}"
    assert champion_version(checkout) == version
    anomalies = json.loads((checkout / "reports" / "validate" / "anomalies.json").read_text())
    assert any(a["severity"] == "error" for a in anomalies["anomalies"])
