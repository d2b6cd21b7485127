"""The Feast feature store (mlops_nb.features) on a synthetic history whose features change over time: the project's
feature repository applied by Feast's own CLI, point-in-time training sets, online lookups of the newest values, the
skew check failing on a stale or altered online store, and `POST /predict` by entity key through a real service.

One Feast repository per module (a copy of `features/` in a temporary project), applied and materialised once."""
import shutil
import time

import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, run
from mlops_nb.features import (KEY, TS, entity_keys, materialize, online_features, open_store, skew_check, synthetic_history,
                               training_set)

TODAY = pd.Timestamp.now(tz="UTC").floor("D")


def _history() -> pd.DataFrame:
    # 60 customers, 5 monthly snapshots ending yesterday; a fifth stopped being updated 3 months ago (beyond the 90-day TTL)
    return synthetic_history(60, 5, seed=11, end=TODAY - pd.Timedelta(days=1), stale_share=0.2)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    "A project with the repository `features/`, applied with `feast apply` and materialised: (project root, history)."
    root = tmp_path_factory.mktemp("feature_store")
    for name in ("params.yaml", "schema.yaml"): shutil.copy2(ROOT / name, root / name)
    shutil.copytree(ROOT / "features", root / "features")
    hist = _history()
    (root / "data" / "features").mkdir(parents=True)
    hist.to_parquet(root / "data" / "features" / "customers.parquet")
    run("feast", "apply", cwd=root / "features")   # Feast's CLI imports the repository's definitions itself
    materialize(open_store(root / "features"))
    return root, hist


def _newest(hist: pd.DataFrame) -> pd.DataFrame:
    return hist.groupby(KEY).tail(1).set_index(KEY)


def test_the_repository_defines_every_schema_column_but_the_target(repo):
    from mlops_nb.schema import load_schema
    store = open_store(repo[0] / "features")
    view = store.get_feature_view("customer_features")
    assert sorted(f.name for f in view.features) == sorted(c for c in load_schema(ROOT / "schema.yaml").columns if c != "churn")
    assert [p.name for p in store.get_feature_service("churn_model").feature_view_projections] == ["customer_features"]


def test_training_set_uses_the_values_valid_at_each_label_time(repo):
    root, hist = repo
    rng = np.random.default_rng(5)
    first = hist.groupby(KEY)[TS].min()
    # each label observed 10 days after one of its customer's first three snapshots
    labels = pd.DataFrame({KEY: first.index.to_numpy(),
                           TS: (first + pd.Timedelta(days=30) * rng.integers(0, 3, len(first)) + pd.Timedelta(days=10)).to_numpy(),
                           "churn": rng.choice(["No", "Yes"], len(first))})
    got = training_set(open_store(root / "features"), labels)
    # the expected values by pandas' merge_asof on the history itself: an independent point-in-time join
    exp = pd.merge_asof(labels.sort_values(TS), hist.sort_values(TS), on=TS, by=KEY).set_index(KEY).loc[labels[KEY]]
    assert got[KEY].tolist() == labels[KEY].tolist() and got.churn.tolist() == labels.churn.tolist()
    for col in ("tenure", "monthly_charges", "total_charges", "contract"):
        assert got[col].tolist() == exp[col].tolist(), col
    # the newest values (a leak from the labels' future) differ for most rows, so the assertions above would catch one
    newest = _newest(hist).loc[labels[KEY]]
    assert (got.tenure.to_numpy() != newest.tenure.to_numpy()).mean() > 0.5


def test_online_lookups_return_the_newest_values(repo):
    root, hist = repo
    keys = [1, 7, 30, 99_999]
    on = online_features(open_store(root / "features"), keys)
    assert on.found.tolist() == [True, True, True, False]
    newest = _newest(hist).loc[keys[:3]]
    for col in ("tenure", "monthly_charges", "contract", TS):
        assert on[col][:3].tolist() == newest[col].tolist(), col


@pytest.fixture
def own_store(repo, tmp_path):
    "A copy of the module's applied and materialised store, for a test that alters it."
    shutil.copytree(repo[0], tmp_path / "p", ignore=shutil.ignore_patterns("mlflow.db", "log*"))
    return tmp_path / "p"


def _fresh(hist: pd.DataFrame, n: int) -> list[int]:
    newest = _newest(hist)
    return newest.index[newest[TS] >= TODAY - pd.Timedelta(days=2)][:n].tolist()


def test_skew_check_fails_when_the_online_store_is_altered(repo, own_store):
    hist = repo[1]
    store, keys = open_store(own_store / "features"), _fresh(hist, 12)
    assert skew_check(store, keys)["passed"]
    altered = _newest(hist).loc[[keys[3]]].reset_index()
    altered["monthly_charges"] += 10.0
    store.write_to_online_store("customer_features", altered)
    report = skew_check(store, keys)
    assert not report["passed"]
    assert [(m["customer_id"], m["feature"]) for m in report["mismatches"]] == [(keys[3], "monthly_charges")]


def test_skew_check_fails_when_the_online_store_is_stale(repo, own_store):
    hist = repo[1]
    store, keys = open_store(own_store / "features"), _fresh(hist, 12)
    # the offline data moves on (a snapshot taken this morning) and nobody materialises it
    today = _newest(hist).loc[keys].reset_index().assign(**{TS: TODAY + pd.Timedelta(hours=1)})
    today["tenure"] = (today.tenure + 1).clip(upper=72)
    pd.concat([hist, today]).to_parquet(own_store / "data" / "features" / "customers.parquet")
    report = skew_check(store, keys, at=TODAY + pd.Timedelta(hours=2))
    assert not report["passed"]
    changed = set(today.loc[today.tenure != _newest(hist).loc[keys].tenure.to_numpy(), KEY])
    assert {m["customer_id"] for m in report["mismatches"]} == changed and changed
    materialize(store, end=TODAY + pd.Timedelta(hours=2))   # materialised again: no skew
    assert skew_check(store, keys, at=TODAY + pd.Timedelta(hours=2))["passed"]


# --- the service, by key ---

@pytest.fixture(scope="module")
def served(repo):
    "`mlops-nb serve --feature-repo features` on a registered model: (server, model, root, history)."
    from test_serve import Server, fit, register
    root, hist = repo
    (root / "gate.json").write_text('{"blessed": true}')
    model, X = fit(1, 1.0)
    register(root, model, X)
    s = Server(root, "--log-dir", str(root / "log"), "--poll-seconds", "0", "--feature-repo", "features")
    yield s, model, root, hist
    s.stop()


@pytest.mark.slow
def test_predict_by_key_equals_inline_features_and_the_model(served):
    from conftest import records_of
    server, model, root, hist = served
    keys = _fresh(hist, 5)
    by_key = server.post({KEY: keys})
    assert by_key.status_code == 200, by_key.text
    newest = _newest(hist).loc[keys, [c for c in hist.columns if c not in (KEY, TS)]]
    inline = server.post(records_of(newest.reset_index(drop=True)))
    assert inline.status_code == 200, inline.text
    assert by_key.json()["probabilities"] == inline.json()["probabilities"]
    np.testing.assert_allclose(by_key.json()["probabilities"], model.predict_proba(newest), rtol=0, atol=1e-12)
    one = server.post({KEY: keys[0]})
    assert one.status_code == 200, one.text
    np.testing.assert_allclose(one.json()["probabilities"], model.predict_proba(newest.iloc[:1]), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_unknown_and_bad_keys_are_4xx_naming_them(served):
    server = served[0]
    r = server.post({KEY: [1, 424242]})
    assert r.status_code == 404, r.text
    assert r.json()["errors"] == [{"record": 1, "field": KEY, "problem": f"unknown {KEY} 424242: not in the online store"}]
    r = server.post({KEY: "1"})
    assert r.status_code == 422 and "must be a 64-bit integer" in r.json()["errors"][0]["problem"]
    r = server.post(b'{"customer_id": 9223372036854775808}')   # one past Feast's INT64: a 422, not a 500
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["problem"] == f"{KEY} must be a 64-bit integer, got 9223372036854775808"


@pytest.mark.slow
def test_too_many_keys_are_a_413_before_any_lookup(served):
    "100,000 keys (578 KB, under max_body_bytes) are refused by count before the online store is read; a request within it is read once."
    from starlette.testclient import TestClient
    from mlops_nb.core import ServeParams
    from mlops_nb.serve import create_app
    from test_serve import NAME
    root, hist = served[2], served[3]
    app = create_app(f"models:/{NAME}@champion", ServeParams(), f"sqlite:///{root / 'mlflow.db'}", log_dir="", poll_seconds=0,
                     feature_repo=root / "features")
    lookups = []
    features = app.state.service.features
    features._read = lambda keys, _read=features._read: lookups.append(len(keys)) or _read(keys)
    with TestClient(app) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200: break
            time.sleep(0.1)
        body = ('{"%s": [%s]}' % (KEY, ",".join(str(k) for k in range(1, 100_001)))).encode()
        assert len(body) > 500_000
        r = client.post("/predict", content=body)
        assert r.status_code == 413, r.text
        assert r.json()["errors"][0]["problem"] == "100000 keys, more than max_records 1000"
        assert lookups == []   # refused before any lookup
        r = client.post("/predict", json={KEY: 2**63})
        assert r.status_code == 422 and lookups == [], r.text
        r = client.post("/predict", json={KEY: _fresh(hist, 3)})
        assert r.status_code == 200, r.text
        assert lookups == [3]


@pytest.mark.slow
def test_stale_features_are_answered_and_counted_and_keys_logged(served):
    from mlops_nb.predlog import read_prediction_log
    server, _, root, hist = served
    newest = _newest(hist)
    stale = newest.index[newest[TS] < TODAY - pd.Timedelta(days=90)].tolist()
    assert stale
    before = _stale_count(server)
    r = server.post({KEY: stale})
    assert r.status_code == 200, r.text
    assert _stale_count(server) - before == len(stale)
    rid = r.json()["request_id"]
    for _ in range(100):   # the log is written within serve.log_flush_seconds (1 s)
        log = read_prediction_log(root / "log") if (root / "log").exists() else pd.DataFrame({"request_id": []})
        if (log.request_id == rid).any(): break
        time.sleep(0.2)
    assert log.loc[log.request_id == rid, "entity_key"].tolist() == [str(k) for k in stale]
    assert log.loc[log.request_id == rid, "tenure"].tolist() == newest.loc[stale, "tenure"].tolist()


def _stale_count(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "mlops_stale_features"
               for s in fam.samples if s.name.endswith("_total"))


@pytest.mark.slow
def test_features_list_and_describe(repo):
    root = repo[0]
    out = run("mlops-nb", "features", "list", cwd=root).stdout
    assert "customer_features  (19 fields, entities customer, ttl 90 days" in out and "in services: churn_model" in out
    assert "tenure Int64" in out and "contract String" in out and "materialized until never" not in out
    bad = run("mlops-nb", "features", "describe", "nope", cwd=root, check=False)
    assert bad.returncode == 1 and "no feature view or feature service named 'nope'" in bad.stderr


@pytest.mark.slow
def test_features_apply_publishes_the_ingested_snapshot(own_store):
    from mlops_nb.data import synthetic_churn
    missing = run("mlops-nb", "features", "apply", cwd=own_store, check=False)
    assert missing.returncode == 1 and "data/raw/data.parquet not found: run the ingest stage first" in missing.stderr
    raw = synthetic_churn(30, seed=4).drop(columns="rownames")   # what the ingest stage writes
    (own_store / "data" / "raw").mkdir(parents=True)
    raw.to_parquet(own_store / "data" / "raw" / "data.parquet")
    as_of = (TODAY - pd.Timedelta(hours=6)).isoformat()
    run("mlops-nb", "features", "apply", "--as-of", as_of, cwd=own_store)
    published = pd.read_parquet(own_store / "data" / "features" / "customers.parquet")
    published = published[published[TS] == pd.Timestamp(as_of)]   # appended to the module's history
    ids = entity_keys(raw.drop(columns="churn"))   # the data has no customer id: keys from the rows' content (not the label)
    assert published[KEY].tolist() == sorted(ids) and "churn" not in published
    on = online_features(open_store(own_store / "features"), ids.iloc[[0, 29]].tolist())
    assert on.found.tolist() == [True, True]
    assert on.tenure[:2].tolist() == raw.tenure.iloc[[0, 29]].tolist()
    assert on[TS][:2].tolist() == [pd.Timestamp(as_of)] * 2


@pytest.mark.slow
def test_a_reordered_source_keeps_every_key_on_its_customer(own_store):
    "The same id answers the same customer after the source is reordered and grown, and the earlier snapshot stays for point-in-time joins."
    from mlops_nb.data import synthetic_churn
    raw = synthetic_churn(40, seed=5).drop(columns="rownames")
    shutil.rmtree(own_store / "data")   # a store of its own: no history, nothing materialised
    (own_store / "data" / "raw").mkdir(parents=True)
    first = TODAY - pd.Timedelta(days=2)
    raw.to_parquet(own_store / "data" / "raw" / "data.parquet")
    run("mlops-nb", "features", "apply", "--as-of", first.isoformat(), cwd=own_store)
    ids = entity_keys(raw.drop(columns="churn"))
    # the source changes under the same customers: rows reversed and shuffled, ten new customers in the middle
    grown = pd.concat([raw.iloc[::-1], synthetic_churn(50, seed=6).drop(columns="rownames").tail(10)]).sample(frac=1, random_state=3)
    grown.to_parquet(own_store / "data" / "raw" / "data.parquet")
    run("mlops-nb", "features", "apply", "--as-of", (TODAY - pd.Timedelta(hours=1)).isoformat(), cwd=own_store)
    store = open_store(own_store / "features")
    on = online_features(store, ids.tolist())
    assert on.found.all()
    for c in ("tenure", "monthly_charges", "contract", "payment_method"): assert on[c].tolist() == raw[c].tolist(), c
    source = pd.read_parquet(own_store / "data" / "features" / "customers.parquet")
    assert source.groupby(TS).size().tolist() == [40, 50]   # both snapshots kept
    past = training_set(store, pd.DataFrame({KEY: ids.tolist(), TS: first + pd.Timedelta(hours=1)}))
    assert past.tenure.tolist() == raw.tenure.tolist()   # the earlier snapshot, joined at its time
    # the keys a position would have given (1..40) answer nobody: they are not keys
    assert not online_features(store, list(range(1, 41))).found.any()
