"""`mlops-nb monitor` against the prediction log of a real `mlops-nb serve`: traffic like the training data gives
exit 0 (`none`), a shifted numeric feature exit 4 (`retrain`), a column the upstream stopped filling (null in every
record, which each record's schema allows but the batch's does not) exit 5 (`alert`); labels that contradict the
model make the realized metric fall below the floor (`retrain`); bad input is one line and exit 1."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import ROOT, records_of, run
from test_serve import NAME, Server

PHASE = 400     # records per traffic phase
CHUNK = 50      # records per request


def churn(n: int, seed: int):
    from mlops_nb.data import encode_target, synthetic_churn
    df = encode_target(synthetic_churn(n, seed=seed).drop(columns="rownames"), "churn", "Yes")
    return df.drop(columns="churn"), df.churn


def champion_project(root: Path):
    "`root` as a project whose champion stores what the pipeline stores: schema, reference profile, prediction profile, test metrics, calibration."
    from mlops_nb.core import write_json
    from mlops_nb.drift import profile
    from mlops_nb.monitor import fit_calibration, outputs_of, prediction_profile
    from mlops_nb.registry import _promote, pipeline_run, register_model, use_project_tracking
    from mlops_nb.schema import load_schema
    from mlops_nb.train import build_model
    for name in ("params.yaml", "schema.yaml"): shutil.copy2(ROOT / name, root / name)
    X, y = churn(1200, seed=1)
    train, test = slice(0, 800), slice(800, 1200)
    model = build_model("logreg", X.iloc[train], 1).fit(X.iloc[train], y.iloc[train])
    outputs = outputs_of(model, X.iloc[test])   # as the evaluate stage stores it
    files = {"reference_profile.json": profile(X.iloc[train], load_schema(root / "schema.yaml")).to_dict(),
             "prediction_profile.json": prediction_profile(outputs).to_dict(), "evaluate.json": {"roc_auc": 0.8, "n": 400},
             "calibration.json": fit_calibration(outputs, y.iloc[test]).to_dict()}
    for name, obj in files.items(): write_json(root / name, obj)
    use_project_tracking(root)
    with pipeline_run(run_name="test-monitor"):
        reg = register_model(model, X.head(5), NAME, blessed=True, extra_files=[root / "schema.yaml", *(root / f for f in files)])
    _promote(NAME, reg["version"])
    return root, model


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return champion_project(tmp_path_factory.mktemp("monitor"))


def send(server, X: pd.DataFrame, prefix: str) -> list[str]:
    "POST `X` in requests of CHUNK records with our own request ids; every request must be answered."
    ids = []
    for i in range(0, len(X), CHUNK):
        rid = f"{prefix}-{i // CHUNK}"
        r = server.post(records_of(X.iloc[i:i + CHUNK]), headers={"x-request-id": rid})
        assert r.status_code == 200, r.text
        ids.append(rid)
    return ids


def logged(folder: Path, n: int) -> int:
    "Wait until the log holds `n` records (its writer flushes every second); how many it holds."
    import time
    from mlops_nb.predlog import read_prediction_log
    for _ in range(100):
        k = len(read_prediction_log(folder)) if folder.is_dir() else 0
        if k >= n: return k
        time.sleep(0.2)
    return k


def monitor(root: Path, *args, notebook: bool = False):
    source = [] if "--data" in args else ["--log-dir", str(root / "log")]
    r = run("mlops-nb", "monitor", *source, *args, "--out", str(root / "out"), *([] if notebook else ["--no-notebook"]), cwd=root, check=False)
    report = json.loads((root / "out" / "monitor.json").read_text()) if r.returncode in (0, 4, 5) else None
    return r, report


@pytest.mark.slow
def test_monitor_decides_on_a_real_services_log(project):
    root, model = project
    live, live_y = churn(PHASE, seed=7)
    server = Server(root, "--log-dir", str(root / "log"), "--poll-seconds", "0")
    try:
        send(server, live, "calm")
        assert logged(root / "log", PHASE) == PHASE
        # labels arrive with the window: true ones leave the decision alone, and the realized metric is the model's own
        labels = pd.DataFrame({"request_id": [f"calm-{i // CHUNK}" for i in range(PHASE)], "record": [i % CHUNK for i in range(PHASE)],
                               "label": live_y.map({1: "Yes", 0: "No"}).to_numpy()})
        labels.to_csv(root / "labels.csv", index=False)
        r, calm = monitor(root, "--last", str(PHASE), "--labels", str(root / "labels.csv"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert calm["decision"] == "none" and calm["drift"]["drifted"] == [] and calm["schema"]["alerts"] == []
        assert len(calm["drift"]["features"]) == len(live.columns)                 # every feature scored, always
        assert calm["predictions"] is not None and calm["predictions"]["retrain"] is False
        assert calm["version_mix"] == [{"model_name": NAME, "model_version": "1", "variant": "champion", "records": PHASE, "share": 1.0}]
        expected = roc_auc_score(live_y, model.predict_proba(live)[:, 1])
        assert calm["metrics"]["realized"]["n"] == PHASE and abs(calm["metrics"]["realized"]["roc_auc"] - expected) < 1e-9
        assert calm["metrics"]["offline"] == {"roc_auc": 0.8, "n": 400}
        # estimated from the calibrated probabilities alone (the labels play no part): the realized metric falls inside
        est = calm["metrics"]["estimated"]["roc_auc"]
        assert est["low"] <= expected <= est["high"] and est["high"] - est["low"] < 0.2, est
        assert f"estimated roc_auc: {est['estimate']:.4g}" in r.stdout and f"realized {expected:.4g}" in r.stdout
        # contradicting labels (the relation between features and label changed, the features did not): retrain
        labels.assign(label=live_y.map({1: "No", 0: "Yes"}).to_numpy()).to_csv(root / "flipped.csv", index=False)
        r, flipped = monitor(root, "--last", str(PHASE), "--labels", str(root / "flipped.csv"))
        assert r.returncode == 4 and flipped["decision"] == "retrain", r.stdout + r.stderr
        assert flipped["drift"]["drifted"] == [] and "realized roc_auc" in flipped["reasons"][-1]

        # a shifted numeric feature (kept inside the schema's range, so it is value skew, not schema skew)
        hi = 118.75
        send(server, live.assign(monthly_charges=np.minimum(live.monthly_charges * 1.5, hi)), "shift")
        assert logged(root / "log", 2 * PHASE) == 2 * PHASE
        (root / "pipeline").mkdir(exist_ok=True)
        shutil.copy2(ROOT / "pipeline" / "monitor.ipynb", root / "pipeline")
        r, shift = monitor(root, "--last", str(PHASE), notebook=True)
        assert r.returncode == 4, r.stdout + r.stderr
        assert shift["decision"] == "retrain" and "monthly_charges" in shift["drift"]["drifted"] and not shift["schema"]["alerts"]
        assert r.stdout.startswith(f"monitor: retrain ({PHASE} records against models:/{NAME}/1)")
        # the executed monitoring notebook beside the report: the decision, and the drift plotted
        cells = json.loads((root / "out" / "monitor.ipynb").read_text())["cells"]
        outputs = [o for c in cells for o in c.get("outputs", [])]
        assert "Decision: `retrain`" in json.dumps(outputs) and "monthly_charges" in json.dumps(outputs)
        assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2   # feature drift and prediction drift

        # a client sends request id calm-0 again, for other records: the log holds calm-0's records 0..2 twice
        assert server.post(records_of(live.tail(3)), headers={"x-request-id": "calm-0"}).status_code == 200
        # a broken upstream: total_charges arrives null in every record (one null is valid, so the service answers)
        send(server, live.assign(total_charges=np.nan), "broken")
        assert logged(root / "log", 3 * PHASE + 3) == 3 * PHASE + 3
    finally:
        server.stop()
    r, broken = monitor(root, "--last", str(PHASE))     # the stopped service's sealed log
    assert r.returncode == 5, r.stdout + r.stderr
    assert broken["decision"] == "alert" and [(a["kind"], a["column"]) for a in broken["schema"]["alerts"]] == [("null_rate", "total_charges")]
    assert (root / "out" / "drift_scores.png").stat().st_size > 0

    # a batch file (inputs only; the version's model scores it): an unknown category in a third of the rows alerts
    live.assign(contract=np.where(np.arange(PHASE) % 3 == 0, "Weekly", live.contract)).to_csv(root / "batch.csv", index=False)
    r, batch = monitor(root, "--data", str(root / "batch.csv"))
    assert r.returncode == 5, r.stdout + r.stderr
    assert [(a["kind"], a["column"]) for a in batch["schema"]["alerts"]] == [("out_of_domain", "contract")]
    assert batch["predictions"] is not None and batch["version_mix"] == [] and batch["source"] == {"data": str(root / "batch.csv")}

    # errors: one line, exit 1, naming the problem
    (root / "nolabel.csv").write_text("id,label\ncalm-0,Yes\n")
    for args, message in [(["--labels", str(root / "nolabel.csv")], "labels: no 'request_id' column"),
                          (["--model", f"models:/{NAME}@nobody"], f"no such model version: models:/{NAME}@nobody"),
                          (["--since", "2000-01-01T00:00:00", "--last", "3"], "not allowed with argument")]:
        r, _ = monitor(root, *args)
        assert r.returncode in (1, 2) and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = run("mlops-nb", "monitor", "--log-dir", str(root / "empty"), cwd=root, check=False)
    assert r.returncode == 1 and r.stderr.strip() == f"error: prediction log folder not found: {root / 'empty'}", r.stderr

    # the reused request id: calm-0's labels match two records each, and are refused, naming it (the file as a whole)
    r, _ = monitor(root, "--labels", str(root / "labels.csv"))
    assert r.returncode == 1 and "labels: 50 of 400 labels match several logged records" in r.stderr, r.stderr
    assert "request id 'calm-0' was used by 2 requests" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # without them, the labels match one to one against the whole log: outside the window (the broken traffic), counted
    labels[labels.request_id != "calm-0"].to_csv(root / "labels-ok.csv", index=False)
    r, report = monitor(root, "--last", str(PHASE), "--labels", str(root / "labels-ok.csv"))
    assert r.returncode == 5 and report["metrics"]["realized"] is None, r.stdout + r.stderr
    assert "350 of 350 labels name logged records outside the window: not used" in report["notes"], report["notes"]
    assert any(n.startswith("1 request ids were used by several requests") and "'calm-0'" in n for n in report["notes"]), report["notes"]


@pytest.mark.slow
def test_a_request_level_label_for_a_batch_is_refused(project):
    "`mlops-nb predict` logs a 600-record batch under one request id: one label for the request is refused, one per record joins."
    root, _ = project
    X, y = churn(600, seed=3)
    X["total_charges"] = X.total_charges.fillna(X.monthly_charges)   # new customers billed once: within the schema's null tolerance
    X.to_parquet(root / "batch600.parquet")
    run("mlops-nb", "predict", "--data", str(root / "batch600.parquet"), "--out", str(root / "scores600.parquet"), "--log-dir", str(root / "batch-log"), cwd=root)
    batch = json.loads((root / "scores600.parquet.report.json").read_text())["request_id"]
    pd.DataFrame({"request_id": [batch], "label": ["Yes"]}).to_csv(root / "one-label.csv", index=False)
    code, report, out = monitor_on(root, root / "batch-log", "--labels", str(root / "one-label.csv"))
    assert code == 1 and report is None, out
    assert f"labels: 1 of 1 labels match several logged records, and a label must name one: request {batch!r} has 600 records" in out, out
    per_record = pd.DataFrame({"request_id": batch, "record": range(600), "label": y.map({1: "Yes", 0: "No"}).to_numpy()})
    per_record.to_csv(root / "per-record.csv", index=False)
    code, report, out = monitor_on(root, root / "batch-log", "--labels", str(root / "per-record.csv"))
    assert code in (0, 4) and report["metrics"]["realized"]["n"] == 600, out
    # a few labels of records the log never saw are tolerated and counted; a file of them is refused
    pd.concat([per_record, per_record.head(20).assign(request_id="batch-unknown")]).to_csv(root / "some-stray.csv", index=False)
    code, report, out = monitor_on(root, root / "batch-log", "--labels", str(root / "some-stray.csv"))
    assert code in (0, 4) and "20 of 620 labels name no logged record (tolerated up to 5%)" in report["notes"], out
    per_record.assign(request_id="batch-unknown").to_csv(root / "stray.csv", index=False)
    code, report, out = monitor_on(root, root / "batch-log", "--labels", str(root / "stray.csv"))
    assert code == 1 and "600 of 600 labels (100%) name no logged record, more than the 5% tolerated" in out, out


def monitor_on(root: Path, log: Path, *args):
    "`mlops-nb monitor` on the log folder `log`: the exit code, the report (None on an error) and what it printed."
    out = log.with_name(log.name + "-out")
    r = run("mlops-nb", "monitor", "--log-dir", str(log), *args, "--out", str(out), cwd=root, check=False)
    return r.returncode, json.loads((out / "monitor.json").read_text()) if r.returncode in (0, 4, 5) else None, r.stdout + r.stderr


@pytest.mark.slow
def test_each_drift_scenario_of_the_generator_gets_its_decision(project):
    from mlops_nb.data import synthetic_scenario
    root, _ = project
    log = root / "scenario-log"
    inputs = lambda df: df.drop(columns=["rownames", "churn"])
    server = Server(root, "--log-dir", str(log), "--poll-seconds", "0")
    decisions = {}
    try:
        for k, scenario in enumerate(["none", "gradual", "sudden", "broken_column", "concept"]):
            traffic = synthetic_scenario(PHASE, scenario, seed=40 + k, strength=0.6 if scenario == "concept" else 1.0)
            send(server, inputs(traffic), scenario)
            assert logged(log, (k + 1) * PHASE) == (k + 1) * PHASE
            code, report, out = monitor_on(root, log, "--last", str(PHASE))
            decisions[scenario] = code
        # a new category is refused by the service record by record, so it never reaches the log; in a batch it is schema skew
        novel = synthetic_scenario(PHASE, "new_category", seed=50, strength=0.3)
        refused = server.post(records_of(inputs(novel[novel.payment_method == "Crypto wallet"].head(1))))
        assert refused.status_code == 422 and "payment_method" in refused.text
    finally:
        server.stop()
    inputs(novel).to_csv(root / "novel.csv", index=False)
    r = run("mlops-nb", "monitor", "--data", str(root / "novel.csv"), "--out", str(root / "novel-out"), cwd=root, check=False)
    decisions["new_category"] = r.returncode
    # concept drift: the inputs did not move (none) until the labels arrive and contradict the model (retrain)
    traffic = synthetic_scenario(PHASE, "concept", seed=44, strength=0.6)
    labels = pd.DataFrame({"request_id": [f"concept-{i // CHUNK}" for i in range(PHASE)], "record": [i % CHUNK for i in range(PHASE)],
                           "label": traffic.churn.to_numpy()})
    labels.to_csv(root / "concept-labels.csv", index=False)
    code, report, out = monitor_on(root, log, "--last", str(PHASE), "--labels", str(root / "concept-labels.csv"))
    decisions["concept + labels"] = code
    assert decisions == {"none": 0, "gradual": 4, "sudden": 4, "broken_column": 5, "concept": 0, "new_category": 5,
                         "concept + labels": 4}, decisions
    assert report["drift"]["drifted"] == [] and report["reasons"][-1].startswith("realized roc_auc"), report["reasons"]
