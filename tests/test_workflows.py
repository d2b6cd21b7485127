"""The GitHub Actions workflows users copy from .github/workflows/: they validate offline (GitHub's workflow schema,
zizmor's security audits), and a small runner (tests/workflow_runner.py) walks them on this machine against a bare
git repository standing in for GitHub, a DVC remote on a real S3 API (moto's server) and a local MLflow tracking
store: a push to a development branch moves `staging` and the service tests pass against it, the champion stays;
the promotion job then moves `champion`."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, TINY, copy_project, run, skip_or_fail
from workflow_runner import UnknownExpression, load_workflow, run_job, triggered

WORKFLOWS = ROOT / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml"))
NAME = "churn-classifier"


def test_the_four_workflows_are_there():
    assert [f.name for f in FILES] == ["cd.yml", "ci.yml", "ct.yml", "promote.yml"]


def test_workflows_validate_against_githubs_schema(tmp_path):
    r = run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *map(str, FILES), cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "not-a-workflow.yml"   # the check can fail: a job without steps or runs-on
    bad.write_text("on: push\njobs:\n  x:\n    name: nothing\n")
    assert run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", str(bad), cwd=tmp_path, check=False).returncode == 1


def test_zizmor_finds_nothing_even_pedantic(tmp_path):
    "zizmor's offline audits (unpinned actions, credentials left in the checkout, permissions, template injection, ...)."
    for persona in ("regular", "pedantic"):
        r = run("zizmor", "--offline", "--no-config", "--persona", persona, *map(str, FILES), cwd=ROOT, check=False)
        assert r.returncode == 0 and "No findings" in r.stdout, r.stdout + r.stderr
    unsafe = tmp_path / "unsafe.yml"   # the audit can fail: a tag instead of a SHA, the token kept, an expansion in run:
    unsafe.write_text("on: pull_request\npermissions: {}\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
                      "      - uses: actions/checkout@v4\n      - run: echo ${{ github.event.pull_request.title }}\n")
    r = run("zizmor", "--offline", "--no-config", str(unsafe), cwd=tmp_path, check=False)
    assert r.returncode != 0 and "unpinned-uses" in r.stdout and "template-injection" in r.stdout and "artipacked" in r.stdout, r.stdout


def test_secrets_come_from_the_secret_store_and_no_run_step_expands_an_expression():
    for f in FILES:
        text = f.read_text()
        for line in text.splitlines():
            if "AWS_" in line or "MLFLOW_TRACKING_URI" in line:
                if ":" in line and not line.lstrip().startswith("#") and "${{" in line:
                    assert "${{ secrets." in line, (f.name, line)
        for job in load_workflow(f)["jobs"].values():
            for step in job["steps"]:
                assert "${{" not in step.get("run", ""), (f.name, step.get("name"))   # values reach scripts via env:
                if "uses" in step:
                    assert len(step["uses"].split("@")[1]) == 40, step["uses"]     # pinned to a commit
                if step.get("uses", "").startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False


def test_what_starts_each_workflow():
    wf = {f.stem: load_workflow(f) for f in FILES}
    assert triggered(wf["ci"], "push", "refs/heads/main") and triggered(wf["ci"], "pull_request")
    assert triggered(wf["cd"], "push", "refs/heads/dev") and triggered(wf["cd"], "push", "refs/heads/feature/x")
    assert not triggered(wf["cd"], "push", "refs/heads/main") and not triggered(wf["cd"], "push", "refs/heads/master")
    assert not triggered(wf["cd"], "push", "refs/tags/v1.0") and not triggered(wf["cd"], "pull_request")
    assert triggered(wf["promote"], "push", "refs/tags/v1.0") and triggered(wf["promote"], "workflow_dispatch")
    assert not triggered(wf["promote"], "push", "refs/heads/dev") and not triggered(wf["promote"], "push", "refs/heads/main")
    assert triggered(wf["ct"], "schedule") and triggered(wf["ct"], "workflow_dispatch") and not triggered(wf["ct"], "push", "refs/heads/main")
    # the development branches of CD are the ones the pipeline does not treat as production
    production = yaml.safe_load((ROOT / "params.yaml").read_text())["register"]["production_branches"]
    assert sorted(wf["cd"]["on"]["push"]["branches-ignore"]) == sorted(production)


# ---- the runner itself, on a small workflow -------------------------------------------------------------------

RUNNER_WF = """
on: push
env: {GREETING: "${{ vars.GREETING }}"}
jobs:
  j:
    runs-on: ubuntu-latest
    env: {TOKEN: "${{ secrets.TOKEN }}"}
    steps:
      - uses: actions/checkout@0000000000000000000000000000000000000000
        with: {persist-credentials: false}
      - name: env and files
        id: first
        run: |
          test "$GREETING $TOKEN $GITHUB_REF_NAME" = "hello s3cret dev"
          test -f marker.txt
          echo "LATER=from-env-file" >> "$GITHUB_ENV"
          mkdir -p tools && printf '#!/bin/sh\\necho tool ran\\n' > tools/mytool && chmod +x tools/mytool
          echo "$PWD/tools" >> "$GITHUB_PATH"
          echo "answer=42" >> "$GITHUB_OUTPUT"
          echo "# hello summary" >> "$GITHUB_STEP_SUMMARY"
          sleep 600 &
          echo "$!" > sleeper.pid
      - name: sees what the first step set
        if: steps.first.outputs.answer == '42'
        run: test "$LATER" = from-env-file && mytool
      - name: fails
        run: "false"
      - name: skipped after a failure
        run: echo never
      - name: always runs
        if: always()
        run: echo cleanup
"""


def running(pid: int) -> bool:
    "Whether `pid` runs: a killed process that nobody has reaped yet (a zombie) does not."
    import psutil
    try: return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return False


@pytest.fixture
def tiny_remote(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "marker.txt").write_text("x")
    for args in (["init", "-q", "-b", "dev"], ["add", "-A"], ["commit", "-qm", "x"]): run("git", *args, cwd=src)
    run("git", "clone", "-q", "--bare", str(src), str(tmp_path / "remote.git"), cwd=tmp_path)
    return tmp_path / "remote.git"


def test_the_runner_runs_steps_like_github(tmp_path, tiny_remote):
    wf = tmp_path / "wf.yml"
    wf.write_text(RUNNER_WF)
    context = {"secrets": {"TOKEN": "s3cret"}, "vars": {"GREETING": "hello"}}
    r = run_job(wf, "j", remote=tiny_remote, ref="refs/heads/dev", event="push", workspace=tmp_path / "ws",
                context=context, base_env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert [(s.name, s.outcome) for s in r.steps] == [
        ("actions/checkout@0000000000000000000000000000000000000000", "success"), ("env and files", "success"),
        ("sees what the first step set", "success"), ("fails", "failure"), ("skipped after a failure", "skipped"),
        ("always runs", "success")], r.log()
    assert not r.ok and "tool ran" in r.step("sees what the first step set").output and r.summary == "# hello summary\n"
    pid = int((tmp_path / "ws" / "sleeper.pid").read_text())
    assert not running(pid)                                         # the background process died with the job
    with pytest.raises(UnknownExpression, match="secrets.TOKEN"):   # an expression the context lacks: no guessing
        run_job(wf, "j", remote=tiny_remote, ref="refs/heads/dev", event="push", workspace=tmp_path / "ws2",
                context={"vars": {"GREETING": "hello"}}, base_env={"PATH": os.environ["PATH"]})
    wf.write_text(RUNNER_WF.replace("${{ vars.GREETING }}", "${{ vars.GREETING || 'x' }}"))
    with pytest.raises(UnknownExpression, match="unsupported expression"):
        run_job(wf, "j", remote=tiny_remote, ref="refs/heads/dev", event="push", workspace=tmp_path / "ws3",
                context=context, base_env={"PATH": os.environ["PATH"]})


# ---- the workflows, end to end ---------------------------------------------------------------------------------

# TINY's pipeline; the CD job's own load test runs 2 s against budgets any machine meets (speed belongs in benchmarks)
PARAMS = {**TINY, "evaluate": {**TINY["evaluate"], "deepchecks": False},   # deepchecks runs in the pipeline smoke test
          "serve": {"loadtest_seconds": 2.0, "loadtest_concurrency": 2, "budget_p99_ms": 60000.0, "budget_min_rps": 0.1}}
KEY = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
BUCKET = "dvc-remote"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_champion(tracking: Path):
    "A champion without skill (fitted on shuffled labels) registered before any workflow runs, with the files the pipeline stores: version 1."
    from mlops_nb.data import encode_target, synthetic_churn
    from mlops_nb.drift import profile
    from mlops_nb.registry import _promote, pipeline_run, register_model, use_project_tracking
    from mlops_nb.schema import load_schema
    from mlops_nb.train import build_model
    schema_file = ROOT / "schema.yaml"
    df = encode_target(synthetic_churn(800, seed=7), "churn", "Yes", "binary")
    X, y = df.drop(columns=["churn", *yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["drop_columns"]], errors="ignore"), df.churn
    (tracking / "reference_profile.json").write_text(json.dumps(profile(X, load_schema(schema_file)).to_dict()))
    model = build_model("logreg", X, seed=0).fit(X, y.sample(frac=1, random_state=0).to_numpy())   # labels shuffled: no skill
    use_project_tracking(tracking)
    with pipeline_run(run_name="seeded champion"):
        v = register_model(model, X.head(5), NAME, blessed=True, tags={"git_dirty": False},
                           extra_files=[schema_file, tracking / "reference_profile.json"])["version"]
    _promote(NAME, v)
    return v


@pytest.fixture(scope="module")
def github(tmp_path_factory):
    """A bare repository holding a copy of the project (tiny params, the workflows, a DVC remote on moto's S3 server)
    with branches main and dev, an MLflow tracking store whose champion is version 1, and moto running."""
    if not (BIN / "moto_server").exists(): skip_or_fail("moto_server is not installed (moto[server] in requirements.lock)")
    for tool in ("curl", "jq", "make"):
        if shutil.which(tool) is None: skip_or_fail(f"{tool} is not installed (GitHub's runners have it)")
    tmp = tmp_path_factory.mktemp("workflows")
    port = free_port()
    moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        import boto3
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", **{k.lower(): v for k, v in KEY.items()})
        for _ in range(100):
            try: s3.create_bucket(Bucket=BUCKET); break
            except Exception: time.sleep(0.2)
        else: skip_or_fail("moto_server did not start")
        tracking = tmp / "tracking"
        tracking.mkdir()
        uri = f"sqlite:///{tracking / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        champion = seed_champion(tracking)
        src = copy_project(tmp / "src", PARAMS)
        shutil.copytree(WORKFLOWS, src / ".github" / "workflows")
        for name in ("Makefile", "requirements.lock"): shutil.copy2(ROOT / name, src / name)
        for args in (["remote", "add", "-d", "storage", f"s3://{BUCKET}/store"],
                     ["remote", "modify", "storage", "endpointurl", f"http://127.0.0.1:{port}"],
                     ["remote", "modify", "storage", "region", "us-east-1"]):
            run("dvc", *args, cwd=src)
        for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "the project"],
                     ["checkout", "-qb", "dev"], ["commit", "-q", "--allow-empty", "-m", "work on a development branch"]):
            run("git", *args, cwd=src)
        run("git", "clone", "-q", "--bare", str(src), str(tmp / "remote.git"), cwd=tmp)
        yield {"tmp": tmp, "remote": tmp / "remote.git", "s3": s3, "uri": uri, "champion": champion, "endpoint": f"http://127.0.0.1:{port}"}
    finally:
        if saved is None: os.environ.pop("MLFLOW_TRACKING_URI", None)
        else: os.environ["MLFLOW_TRACKING_URI"] = saved
        os.killpg(moto.pid, 15)
        moto.wait(timeout=30)


def job(github, workflow, job_id, ref, event, name, inputs=None, replace=None, vars=None):
    "Run a job of a project workflow as GitHub would on `event` at `ref`, with the secrets a user sets."
    wf = github["remote"].parent / "src" / ".github" / "workflows" / workflow   # the copy in the pushed project
    secrets = {"MLFLOW_TRACKING_URI": github["uri"], **KEY}
    # the install step is `make .venv/.installed` (minutes): here the test's own environment is put on PATH instead
    steps = {s.get("name") for s in load_workflow(wf)["jobs"][job_id]["steps"]}
    replace = {**({"Install": f'echo "{BIN}" >> "$GITHUB_PATH"'} if "Install" in steps else {}), **(replace or {})}
    base_env = {"PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN),  # not on PATH until "Install"
                "HOME": str(github["tmp"] / f"home-{name}"), "LANG": "C.UTF-8",
                **{k: v for k, v in os.environ.items() if k.startswith("GIT_")}}
    Path(base_env["HOME"]).mkdir()
    return run_job(wf, job_id, remote=github["remote"], ref=ref, event=event, workspace=github["tmp"] / name,
                   context={"secrets": secrets, "inputs": inputs or {}, "vars": vars or {}, "github": {"ref": ref}},
                   base_env=base_env, replace=replace)


def alias(github, a):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    try: return str(MlflowClient(github["uri"], registry_uri=github["uri"]).get_model_version_by_alias(NAME, a).version)
    except MlflowException: return None


@pytest.mark.slow
def test_ci_job_runs_the_tests_of_the_pushed_commit(github):
    # `make test` of the copied project would run this whole suite again: the runner replaces it by a command that
    # only proves the job reached the pushed tree with the Makefile target the step calls
    r = job(github, "ci.yml", "test", "refs/heads/dev", "push", "ci", replace={"Test": "make -n test | grep -q pytest && git log -1 --format=%s"})
    assert r.ok, r.log()
    assert "work on a development branch" in r.step("Test").output


@pytest.mark.slow
def test_push_to_dev_moves_staging_then_the_promotion_job_moves_champion(github):
    assert alias(github, "champion") == github["champion"] and alias(github, "staging") is None   # given
    cd = job(github, "cd.yml", "staging", "refs/heads/dev", "push", "cd")
    assert cd.ok, cd.log()
    assert [s.outcome for s in cd.steps] == ["success"] * len(cd.steps), cd.log()
    staged = alias(github, "staging")
    assert staged is not None and staged != github["champion"]       # the test environment moved ...
    assert alias(github, "champion") == github["champion"]           # ... production did not
    # the service the job started served the staged version, answered the example and refused the bad requests
    assert json.loads((github["tmp"] / "cd" / "ready.json").read_text())["model_version"] == staged
    api = cd.step("API tests against staging").output
    assert "the example record: 200" in api and api.count("bad request refused with 4") == 3, api
    load = json.loads((github["tmp"] / "cd" / "loadtest.json").read_text())
    assert load["passed"] and load["requests"] > 0, load
    # the job summary: metrics, gate, release gate, promotion to staging, drift against the seeded champion, load test
    for part in ["| roc_auc |", "### Gate: blessed", "### Infrastructure validation", f"Promoted: version {staged} -> staging",
                 "### Drift against the champion's training data", "### Load test against staging"]:
        assert part in cd.summary, (part, cd.summary)
    # dvc push reached the S3 remote: the raw data's content is there under its hash
    lock = yaml.safe_load((github["tmp"] / "cd" / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw/data.parquet")
    github["s3"].head_object(Bucket=BUCKET, Key=f"store/files/md5/{md5[:2]}/{md5[2:]}")

    # promotion: a malformed version is refused before anything moves; then staging's version becomes champion
    bad = job(github, "promote.yml", "promote", "refs/heads/main", "workflow_dispatch", "promote-bad", inputs={"version": "--name=x"})
    assert not bad.ok and "version must be a number" in bad.step("Promote (mlops-nb promote)").output, bad.log()
    assert alias(github, "champion") == github["champion"]
    promote = job(github, "promote.yml", "promote", "refs/heads/main", "workflow_dispatch", "promote", inputs={"version": "staging"})
    assert promote.ok, promote.log()
    assert alias(github, "champion") == staged and alias(github, "previous") == github["champion"]


@pytest.mark.slow
def test_continuous_training_retrains_when_the_traffic_drifted(github):
    "The scheduled job reads the prediction log from S3; a drifted window (exit 4 of monitor) takes the retraining steps."
    from mlops_nb.data import synthetic_churn
    tmp, src = github["tmp"], github["tmp"] / "src"
    drop = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["drop_columns"]
    batch = synthetic_churn(500, seed=11).drop(columns=["churn", *drop], errors="ignore").dropna().head(400)   # no null beyond the schema's allowance
    batch["contract"] = "Two year"              # within the schema's domain, far from the training mix: drift, not skew
    batch.to_csv(tmp / "ct-batch.csv", index=False)
    log = tmp / "ct-log"
    run("mlops-nb", "predict", "--data", str(tmp / "ct-batch.csv"), "--out", str(tmp / "ct-scores.parquet"), "--log-dir", str(log), cwd=src)
    files = [f for f in log.rglob("*") if f.is_file()]
    assert files
    for f in files: github["s3"].upload_file(str(f), BUCKET, f"predictions/{f.relative_to(log)}")
    before = alias(github, "champion")
    # retraining is `mlops-nb run --force`, the pipeline run the CD test already makes: here it is replaced by a
    # command that only shows the step ran in the project, so this test costs a monitor run, not a pipeline run
    ct = job(github, "ct.yml", "monitor-and-retrain", "refs/heads/main", "schedule", "ct",
             vars={"PREDICTION_LOG_URL": f"s3://{BUCKET}/predictions/", "S3_ENDPOINT_URL": github["endpoint"]},
             replace={"Retrain (mlops-nb run)": "mlops-nb status"})
    assert ct.ok, ct.log()
    assert sorted(p.name for p in (tmp / "ct" / "prediction-log").rglob("*") if p.is_file()) == sorted(f.name for f in files)
    monitor = ct.step("Monitor (mlops-nb monitor)").output
    assert "monitor: retrain (400 records" in monitor and "contract" in monitor, monitor
    assert [s.outcome for s in ct.steps[-4:]] == ["success"] * 4, ct.log()   # pull, retrain, push, summary: taken
    assert "### Monitoring: exit 4" in ct.summary and alias(github, "champion") == before
