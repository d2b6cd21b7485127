"""The feature store in the pipeline (`features.enabled`): one tiny `mlops-nb run` on a git copy of the project with the
store on, reused by every test. Training read through the store, the registered version's lineage (feature service and
definitions hash), `POST /predict` by key equal to the same features inline, and the skew gate refusing promotion when
the online store is altered (infra_validate re-run on a copy of the run) or stale (the gate's check)."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, champion_version, copy_project, git_init, registry, run
from mlops_nb.features import KEY, TS, definitions_hash, online_features, open_store, repo_objects, sample_keys, skew_gate

pytestmark = pytest.mark.slow

SKEW_SAMPLE = 30
STORE_ON = {**TINY, "features": {"enabled": True, "skew_sample": SKEW_SAMPLE}}


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    "The project copy after `mlops-nb run` with the store on: (project, the run's result)."
    project = copy_project(tmp_path_factory.mktemp("feature_pipeline") / "project", STORE_ON)
    git_init(project)
    return project, run("mlops-nb", "run", cwd=project, check=False)


@pytest.fixture
def own_copy(piped, tmp_path):
    "A copy of the run's project (git, store, tracking store) for a test that alters it."
    copy = tmp_path / "project"
    shutil.copytree(piped[0], copy, symlinks=True)
    return copy


def _json(project, path): return json.loads((project / path).read_text())


def _raw(project) -> pd.DataFrame: return pd.read_parquet(project / "data" / "raw" / "data.parquet")


def test_the_pipeline_runs_end_to_end_reading_the_store(piped):
    project, r = piped
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Running stage 'materialize'" in r.stdout
    raw = _raw(project)
    published = _json(project, "reports/features/materialize.json")
    assert published["enabled"] and published["customers"] == len(raw) == 800
    assert published["as_of"] == pd.Timestamp(_json(project, "reports/ingest/provenance.json")["ingested_at"]).isoformat()
    # the online store holds the ingested rows: customer k is row k
    keys = [1, 400, 800]
    online = online_features(open_store(project / "features"), keys).set_index(KEY)
    assert online.found.all()
    for k in keys: assert online.at[k, "monthly_charges"] == raw.monthly_charges.iloc[k - 1]
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


def test_the_version_records_the_feature_service_and_definitions(piped):
    project, _ = piped
    version = champion_version(project)
    tags = registry(project).get_model_version("churn-classifier", version).tags
    assert tags["feature_service"] == "churn_model"
    assert tags["feature_definitions"] == definitions_hash(repo_objects(project / "features"))   # hashed again, here
    out = run("mlops-nb", "features", "describe", "churn_model", cwd=project)
    assert json.loads(out.stdout)["used_by"] == [f"churn-classifier/{version}"]


def test_predict_by_key_equals_predict_inline(piped):
    from test_serve import Server, records_of
    project, _ = piped
    raw = _raw(project)
    keys = [1, 17, 333, 800]
    inline_rows = raw.iloc[[k - 1 for k in keys]].drop(columns=["churn"]).reset_index(drop=True)
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
    project = own_copy
    before = champion_version(project)
    key = sample_keys(len(_raw(project)), SKEW_SAMPLE)[3]   # a customer the gate samples
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
    project = own_copy
    sample = sample_keys(len(_raw(project)), SKEW_SAMPLE)
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
