"""Bad input gets a message that names the problem and a non-zero exit: params keys and types, missing
source files, data without a required column."""
import pandas as pd
import pytest
import yaml

from conftest import run
from mlops_nb.data import synthetic_churn


def set_params(project, section, key, value):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_misspelled_params_key_is_named(project):
    params = (project / "params.yaml").read_text().replace("n_iter:", "n_iters:")
    (project / "params.yaml").write_text(params)
    r = run("mlops-nb", "run", cwd=project, check=False)
    assert r.returncode == 1
    assert "unknown key 'train.n_iters' (did you mean 'n_iter'?)" in r.stderr
    assert "Traceback" not in r.stderr
    assert [p.relative_to(project).as_posix() for p in (project / "data").rglob("*.*")] == ["data/labelled/README.md"]  # nothing ran


def test_wrong_type_is_named(project):
    set_params(project, "train", "cv_folds", "three")
    r = run("mlops-nb", "stage", "train", cwd=project, check=False)
    assert r.returncode == 1
    assert "train.cv_folds must be int, got str 'three'" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_source_file_is_named(project):
    set_params(project, "data", "source", "data/incoming/customers.csv")
    r = run("mlops-nb", "stage", "ingest", cwd=project, check=False)
    assert r.returncode == 1
    assert "DataError: data source not found:" in r.stderr and "data/incoming/customers.csv" in r.stderr
    assert not (project / "data" / "raw" / "data.parquet").exists()


def test_csv_missing_a_required_column_stops_validate(project):
    (project / "incoming").mkdir()
    synthetic_churn(300, seed=0).drop(columns=["contract"]).to_csv(project / "incoming" / "batch.csv", index=False)
    set_params(project, "data", "source", "incoming/batch.csv")
    run("mlops-nb", "stage", "ingest", cwd=project)
    r = run("mlops-nb", "stage", "validate", cwd=project, check=False)
    assert r.returncode == 1
    assert "stage validate failed" in r.stderr and "contract" in r.stderr
    anomalies = pd.read_json(project / "reports" / "validate" / "anomalies.json", typ="series")
    assert not anomalies["ok"]
    assert [a["column"] for a in anomalies["anomalies"] if a["severity"] == "error"] == ["contract"]
    assert (project / "reports" / "notebooks" / "validate.ipynb").exists()  # the failed notebook is the report


def test_a_registry_outage_is_one_line_not_a_traceback(project):
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    r = run("mlops-nb", "lineage", "models:/churn-classifier/1", cwd=project, check=False, env=env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr


def test_a_dead_kernel_is_one_line_naming_the_stage(project):
    import json
    nb_path = project / "pipeline" / "ingest.ipynb"
    nb = json.loads(nb_path.read_text())
    nb["cells"].append({"cell_type": "code", "execution_count": None, "id": "kill-self", "metadata": {}, "outputs": [],
                        "source": ["import os, signal\n", "os.kill(os.getpid(), signal.SIGKILL)"]})
    nb_path.write_text(json.dumps(nb))
    r = run("mlops-nb", "stage", "ingest", cwd=project, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "stage ingest failed: its kernel died" in r.stderr, r.stderr
