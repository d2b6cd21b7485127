"""`mlops-nb ct` on a real project: the pipeline makes version 1 champion, drifted traffic goes through
`mlops-nb predict` into the prediction log, its labels arrive, and continuous-training cycles run. The first cycle is
SIGKILLed in training (while it runs, a second cycle is refused), the second in the middle of a promotion (after the
alias moved, holding the promotion lock); each is rerun. The scenario runs once per module; each test checks one
property of what it left, against git, DVC, the registry and the data themselves."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import BIN, TINY, champion_version, copy_project, git_init, registry, run

pytestmark = pytest.mark.slow

N = 400   # records per window of traffic
# a hash split keeps each row's side as data is appended; the gate's tolerances are open, so a retrained candidate
# passes and both the training and the promotion phase are reached
# passes and both the training and the promotion phase are reached. The monitor's floor is above the gate's: labels
# that contradict the model (concept drift) trigger retraining, and the retrained candidate still clears the gate.
# Fewer bootstrap resamples and timing repeats: four pipeline runs, and none of them is about intervals or latency.
PARAMS = {**TINY, "prepare": {"split": "hash"}, "monitor": {"min_primary": 0.65}, "infra": {**TINY["infra"], "repeats": 5},
          "evaluate": {**TINY["evaluate"], "deepchecks": False, "min_primary": 0.5, "champion_tolerance": 1.0, "slice_tolerance": 1.0,
                       "bootstrap": 50}}
NAME = "churn-classifier"


def traffic(project: Path, scenario: str, seed: int, tag: str, strength: float = 1.0) -> Path:
    "Score a drifted window with `mlops-nb predict` (it goes to the prediction log); the labels file of its records."
    from mlops_nb.data import synthetic_scenario
    window = synthetic_scenario(N, scenario, seed=seed, strength=strength).drop(columns="rownames")
    # drift that leaves more new customers (tenure 0, no charges yet) than the schema's null tolerance is schema skew,
    # which predict refuses: these customers have been billed once
    window["total_charges"] = window.total_charges.fillna(window.monthly_charges)
    here = project.parent   # outside the project: the cycle commits, and finds nothing else changed
    window.drop(columns="churn").to_parquet(here / f"{tag}.parquet")
    run("mlops-nb", "predict", "--data", str(here / f"{tag}.parquet"), "--out", str(here / f"{tag}-scores.parquet"), cwd=project)
    batch = json.loads((here / f"{tag}-scores.parquet.report.json").read_text())["request_id"]
    labels = here / f"{tag}-labels.csv"
    pd.DataFrame({"request_id": batch, "record": range(N), "label": window.churn}).to_csv(labels, index=False)
    return labels


def start_ct(project: Path, labels: Path, env: dict | None = None) -> subprocess.Popen:
    "`mlops-nb ct` on the last window, in a process group of its own (so a kill reaches dvc and the stage under it)."
    return subprocess.Popen([str(BIN / "mlops-nb"), "ct", "--last", str(N), "--labels", str(labels)], cwd=project, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})})


def wait_for(check, what: str, proc: subprocess.Popen, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := check()): return found
        if proc.poll() is not None: raise AssertionError(f"ct ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stage_running(proc: subprocess.Popen, stage: str) -> bool:
    "Whether `mlops-nb stage STAGE` runs in the process group of `proc` (not in another test's project)."
    return subprocess.run(["pgrep", "-g", str(proc.pid), "-f", f"mlops-nb stage {stage}"], capture_output=True).returncode == 0


@contextlib.contextmanager
def subreaper():
    """Adopt the orphans of the processes this one starts (Linux), so that a killed cycle's dvc is reaped here; on exit
    stop adopting and reap what was adopted, so later tests on this worker see their orphans go as before."""
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    try: yield
    finally:
        prctl(36, 0, 0, 0, 0)
        reap_adopted()


def reap_adopted():
    "Reap every child of this process that has ended (orphans adopted as a subreaper among them)."
    while True:
        try: pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError: return
        if pid == 0: return


def kill(proc: subprocess.Popen):
    """SIGKILL the cycle and every process under it, as a scheduler stopping its job's cgroup does (the notebook kernels
    run in sessions of their own), then reap them as an init would: DVC takes a killed process that is still a zombie
    for a live one holding its lock."""
    import psutil
    tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        try: os.kill(pid, signal.SIGKILL)
        except ProcessLookupError: pass
    proc.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid in tree:   # the orphans are ours (subreaper): reap them
            try: os.waitpid(pid, os.WNOHANG)
            except ChildProcessError: pass
        if not [pid for pid in tree if psutil.pid_exists(pid)]: return
        time.sleep(0.05)
    raise AssertionError(f"processes of the killed cycle were never reaped: {[pid for pid in tree if psutil.pid_exists(pid)]}")


def state(project: Path) -> dict:
    "What a killed or finished cycle left: aliases, pending record, git and DVC status, the registry's lock."
    client = registry(project)
    pending = project / "reports" / "ct" / "pending.json"
    aliases = {a: str(client.get_model_version_by_alias(NAME, a).version) for a in ("champion", "previous")
               if a in client.get_registered_model(NAME).aliases}
    locks = [m.name for m in client.search_registered_models() if m.name.endswith("--promotion-lock")]
    latest = max(int(v.version) for v in client.search_model_versions(f"name='{NAME}'"))
    return {"aliases": aliases, "pending": json.loads(pending.read_text()) if pending.exists() else None, "locks": locks, "latest": str(latest),
            "git": run("git", "status", "--porcelain", cwd=project).stdout.strip(),
            "dvc": json.loads(run("dvc", "status", "--json", cwd=project).stdout or "{}"),
            "head": run("git", "rev-parse", "HEAD", cwd=project).stdout.strip()}


def row_keys(df: pd.DataFrame) -> set:
    return set(pd.util.hash_pandas_object(df.drop(columns="churn"), index=False))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    with subreaper(): return scenario_of(tmp_path_factory)


def scenario_of(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("ct") / "project", PARAMS)
    git_init(project)
    run("mlops-nb", "run", cwd=project)
    run("git", "add", "-A", cwd=project); run("git", "commit", "-qm", "the first pipeline run", cwd=project)
    # the remotes a --push cycle publishes to: a bare git repository (the branch's upstream) and a DVC folder remote
    remote, store = project.parent / "remote.git", project.parent / "dvc-store"
    run("git", "init", "-q", "--bare", "-b", "main", str(remote), cwd=project.parent)
    run("git", "remote", "add", "origin", str(remote), cwd=project); run("git", "push", "-q", "-u", "origin", "main", cwd=project)
    run("dvc", "remote", "add", "-d", "store", str(store), cwd=project)
    run("git", "commit", "-qm", "a DVC remote", "--", ".dvc/config", cwd=project)
    out = {"project": project, "remote": remote, "train_v1": pd.read_parquet(project / "data/processed/train.parquet"),
           "test_v1": pd.read_parquet(project / "data/processed/test.parquet"),
           "raw_v1": pd.read_parquet(project / "data/raw/data.parquet"), "champion_v1": champion_version(project)}

    # cycle 1: sudden drift; killed in training; a second cycle started meanwhile is refused
    labels = traffic(project, "sudden", 11, "w1")
    proc = start_ct(project, labels)
    wait_for(lambda: stage_running(proc, "train"), "the train stage", proc)
    busy = run("mlops-nb", "ct", "--last", str(N), "--labels", str(labels), cwd=project, check=False)
    kill(proc)
    out["busy"], out["killed_in_training"] = busy, state(project)
    # the rerun with --push, while the git remote is away: the commit after register cannot be pushed, so nothing is promoted
    remote.rename(remote.with_name("away.git"))
    out["push_failed"] = run("mlops-nb", "ct", "--last", str(N), "--labels", str(labels), "--push", cwd=project, check=False)
    out["after_push_failed"] = state(project)
    remote.with_name("away.git").rename(remote)
    out["resume1"] = run("mlops-nb", "ct", "--last", str(N), "--labels", str(labels), "--push", cwd=project, check=False)
    out["after1"] = state(project)
    out["cycle1"] = json.loads((project / "reports/ct/latest.json").read_text())
    out["train_v2"] = pd.read_parquet(project / "data/processed/train.parquet")
    out["test_v2"] = pd.read_parquet(project / "data/processed/test.parquet")
    out["raw_v2"] = pd.read_parquet(project / "data/raw/data.parquet")

    # cycle 2: concept drift (half the labels contradict the model); killed inside the promotion, after the alias
    # moved, holding the promotion lock. Its labels file holds every label so far (window 1's too: outside this window)
    w2 = traffic(project, "concept", 12, "w2", strength=0.5)
    labels = project.parent / "all-labels.csv"
    pd.concat([pd.read_csv(project.parent / "w1-labels.csv"), pd.read_csv(w2)]).to_csv(labels, index=False)
    reached = project.parent / "failpoint"
    proc = start_ct(project, labels, {"MLOPS_NB_FAILPOINT": "promote.after_alias", "MLOPS_NB_FAILPOINT_FILE": str(reached)})
    wait_for(reached.exists, "the promotion's failpoint", proc)
    kill(proc)
    out["killed_in_promotion"] = state(project)
    # the rerun completes the promotion, commits dvc.lock and is killed before it records the end of the cycle
    reached = project.parent / "failpoint-ct"
    proc = start_ct(project, labels, {"MLOPS_NB_FAILPOINT": "ct.after_promote", "MLOPS_NB_FAILPOINT_FILE": str(reached)})
    wait_for(reached.exists, "the failpoint after the promotion", proc)
    kill(proc)
    out["killed_after_promote"] = state(project)
    # an edit made after the kill: the cycle does not resume (it would train on it and commit beside it) until it is undone
    params_file = project / "params.yaml"
    kept = params_file.read_text()
    params_file.write_text(kept + "# edited after the kill\n")
    out["edited_resume"] = run("mlops-nb", "ct", "--last", str(N), "--labels", str(labels), cwd=project, check=False)
    out["after_edited"] = state(project)
    params_file.write_text(kept)
    out["resume2"] = run("mlops-nb", "ct", "--last", str(N), "--labels", str(labels), cwd=project, check=False)
    out["after2"] = state(project)
    out["cycle2"] = json.loads((project / "reports/ct/latest.json").read_text())

    # an overlapping window: both windows' records, all labelled. The monitor's floor is raised (a committed params change
    # no stage depends on) so the cycle is due to retrain; every labelled record is training data already
    params = yaml.safe_load(kept)
    params["monitor"]["min_primary"] = 0.99
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "commit", "-qm", "monitor: a higher floor", "--", "params.yaml", cwd=project)
    out["overlap_head"] = run("git", "rev-parse", "HEAD", cwd=project).stdout.strip()
    out["overlap"] = run("mlops-nb", "ct", "--last", str(2 * N), "--labels", str(labels), cwd=project, check=False)
    out["overlap_cycle"] = json.loads((project / "reports/ct/latest.json").read_text())
    out["after_overlap"] = state(project)
    return out


def test_a_second_cycle_is_refused_while_one_runs(scenario):
    assert scenario["busy"].returncode == 75, scenario["busy"].stdout + scenario["busy"].stderr
    assert "another ct cycle is running" in scenario["busy"].stderr


def test_a_cycle_killed_in_training_leaves_the_champion_and_a_committed_snapshot(scenario):
    s, project = scenario["killed_in_training"], scenario["project"]
    assert s["aliases"]["champion"] == scenario["champion_v1"]
    assert s["pending"]["phase"] == "pipeline" and s["pending"]["decision"] == "retrain"
    snapshot = s["pending"]["snapshot"]
    committed = run("git", "show", "--name-only", "--format=", s["pending"]["commits"]["snapshot"], cwd=project).stdout.split()
    assert f"{snapshot}.dvc" in committed


def test_the_rerun_completes_the_killed_cycle_and_promotes_a_new_version(scenario):
    r, c, s = scenario["resume1"], scenario["cycle1"], scenario["after1"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert c["id"] == scenario["killed_in_training"]["pending"]["id"] and c["outcome"] == "promoted"
    assert s["aliases"] == {"champion": c["version"], "previous": scenario["champion_v1"]}
    assert c["gate"]["compared_with"] == scenario["champion_v1"] and c["gate"]["blessed"]
    assert s["pending"] is None and s["locks"] == []


def test_a_completed_cycle_leaves_git_dvc_and_the_lock_consistent(scenario):
    for key in ("after1", "after2"):
        s = scenario[key]
        assert s["git"] == "", f"{key}: uncommitted changes: {s['git']}"
        assert s["dvc"] == {}, f"{key}: dvc status: {s['dvc']}"
    project, c = scenario["project"], scenario["cycle1"]
    log = run("git", "log", "--format=%H %s", cwd=project).stdout
    assert f"{c['commits']['registered']} ct {c['id']}: dvc.lock after register" in log
    # the version records the commit of its data snapshot
    tags = registry(project).get_model_version(NAME, c["version"]).tags
    assert tags["git_commit"] == c["commits"]["snapshot"] and tags["git_dirty"] == "False"


def test_a_failed_push_promotes_nothing_and_leaves_the_cycle_to_the_next_run(scenario):
    r, s = scenario["push_failed"], scenario["after_push_failed"]
    assert r.returncode != 0 and "git push --quiet failed" in r.stderr and "stays pending" in r.stderr, r.stdout + r.stderr
    assert s["aliases"]["champion"] == scenario["champion_v1"]
    assert s["pending"]["id"] == scenario["cycle1"]["id"] and "registered" in s["pending"]["commits"]


def test_a_pushed_cycle_is_rebuilt_from_the_remotes_alone(scenario):
    "With --push, the cycle's commits and everything their dvc.lock names reached the git and DVC remotes."
    c, remote = scenario["cycle1"], scenario["remote"]
    assert run("git", "merge-base", "--is-ancestor", c["commits"]["promoted"], "main", cwd=remote).returncode == 0
    clone = remote.parent / "clone"
    run("git", "clone", "-q", str(remote), str(clone), cwd=remote.parent)
    run("git", "checkout", "-q", c["commits"]["promoted"], cwd=clone)
    run("dvc", "pull", "-q", cwd=clone)   # from the DVC remote: the project's cache is not used
    pd.testing.assert_frame_equal(pd.read_parquet(clone / c["snapshot"]), pd.read_parquet(scenario["project"] / c["snapshot"]))
    assert run("dvc", "status", "--json", cwd=clone).stdout.strip() == "{}"   # every output matches the commit's dvc.lock


def test_the_labelled_window_is_appended_to_the_training_data(scenario):
    project, c = scenario["project"], scenario["cycle1"]
    window = pd.read_parquet(project.parent / "w1.parquet")
    raw_v2 = scenario["raw_v2"]
    assert len(raw_v2) == len(scenario["raw_v1"]) + N == c["data_after"]["rows"]
    pd.testing.assert_frame_equal(raw_v2.tail(N).drop(columns="churn").reset_index(drop=True), window, check_dtype=False)
    labels = pd.read_csv(project.parent / "w1-labels.csv")
    assert raw_v2.tail(N).churn.tolist() == labels.label.tolist()
    assert c["data_before"]["content_hash"] != c["data_after"]["content_hash"]


def test_the_champion_and_the_candidate_are_compared_on_rows_neither_trained_on(scenario):
    test_v2 = row_keys(scenario["test_v2"])
    assert not test_v2 & row_keys(scenario["train_v1"]), "the champion's training rows are in the new test set"
    assert not test_v2 & row_keys(scenario["train_v2"])
    assert row_keys(scenario["test_v1"]) <= test_v2   # rows the first split held out stay held out


def test_a_cycle_killed_inside_a_promotion_is_finished_by_the_rerun(scenario):
    s, c1, c2 = scenario["killed_in_promotion"], scenario["cycle1"], scenario["cycle2"]
    assert s["pending"]["phase"] == "promote"
    assert s["aliases"]["champion"] == s["latest"] != c1["version"] and s["locks"] == [f"{NAME}--promotion-lock"]   # the alias had moved
    r, after = scenario["resume2"], scenario["after2"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert c2["id"] == s["pending"]["id"] and c2["outcome"] == "promoted"
    assert after["aliases"] == {"champion": c2["version"], "previous": c1["version"]} and after["locks"] == []
    assert registry(scenario["project"]).get_model_version(NAME, c2["version"]).tags.get("promoted") == "true"


def test_every_cycle_is_recorded_in_mlflow(scenario):
    client = registry(scenario["project"])
    runs = client.search_runs([client.get_experiment_by_name("mlops-nb-ct").experiment_id])
    recorded = {r.data.tags["mlflow.runName"]: r.data.tags for r in runs}
    for c in (scenario["cycle1"], scenario["cycle2"]):
        tags = recorded[f"ct-{c['id']}"]
        assert (tags["ct.outcome"], tags["ct.version"], tags["ct.commit.snapshot"]) == (c["outcome"], c["version"], c["commits"]["snapshot"])


def test_a_cycle_killed_after_its_promotion_resumes_with_the_commits_it_recorded(scenario):
    s, c2, project = scenario["killed_after_promote"], scenario["cycle2"], scenario["project"]
    recorded = s["pending"]["commits"]
    assert s["pending"]["id"] == c2["id"] and set(recorded) == {"snapshot", "registered", "promoted"}
    assert s["head"] == recorded["promoted"] != recorded["registered"] and s["aliases"]["champion"] == s["latest"] and s["locks"] == []
    assert recorded["registered"] == scenario["killed_in_promotion"]["pending"]["commits"]["registered"]
    # an edit after the kill: refused, naming it; the cycle stays as it was
    e = scenario["edited_resume"]
    assert e.returncode == 1 and "commit or stash" in e.stderr and f"ct cycle {c2['id']} stays pending" in e.stderr, e.stdout + e.stderr
    assert scenario["after_edited"]["pending"] == s["pending"] and scenario["after_edited"]["head"] == s["head"]
    # the resume kept the commits the cycle recorded, and made none
    assert scenario["resume2"].returncode == 0 and c2["commits"] == recorded and c2["outcome"] == "promoted"
    assert scenario["after2"]["head"] == recorded["promoted"] and scenario["after2"]["pending"] is None
    log = run("git", "log", "--format=%H %s", cwd=project).stdout
    assert f"{recorded['registered']} ct {c2['id']}: dvc.lock after register" in log
    assert f"{recorded['promoted']} ct {c2['id']}: dvc.lock after infra_validate" in log and log.count(f"ct {c2['id']}: dvc.lock after") == 2
    assert registry(project).get_model_version(NAME, c2["version"]).tags["git_commit"] == recorded["snapshot"]


def test_labels_outside_the_window_are_counted_not_used(scenario):
    c2 = scenario["cycle2"]
    assert c2["window"]["labelled"] == c2["window"]["new"] == N   # window 1's labels in the same file: outside this window
    assert len(pd.read_parquet(scenario["project"] / c2["snapshot"])) == N


def test_an_overlapping_window_adds_no_duplicate_rows(scenario):
    from mlops_nb.core import ProjectPaths
    from mlops_nb.ct import labelled_ids
    r, c, project = scenario["overlap"], scenario["overlap_cycle"], scenario["project"]
    assert r.returncode == 4 and c["decision"] == "retrain" and c["outcome"] == "no-labels", r.stdout + r.stderr
    assert c["window"]["records"] == c["window"]["labelled"] == 2 * N and c["window"]["new"] == 0 and c["snapshot"] is None
    assert "all training data already" in c["detail"]
    s = scenario["after_overlap"]
    assert s["head"] == scenario["overlap_head"] and s["git"] == "" and s["pending"] is None   # nothing written, nothing committed
    ids = labelled_ids(ProjectPaths(project))
    assert len(ids) == 2 * N and not ids.duplicated().any()   # each logged record once in the snapshots
    snapshots = sorted((project / "data" / "labelled").glob("*.parquet"))
    assert [p.name for p in snapshots] == sorted(Path(c["snapshot"]).name for c in (scenario["cycle1"], scenario["cycle2"]))
