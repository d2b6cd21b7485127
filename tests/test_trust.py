"""A registered pickle is refused by every loader of registered models, with its reason, and none of its code runs:
the test registers a version whose unpickling would write a file, then asks for it through the one loader
(`trust.load_model`), the service's and batch prediction's `load_version`, evaluate's `load_champion`,
`mlops-nb predict`, `mlops-nb monitor`, the slice explorer widget, infrastructure validation's fresh process and
`mlops-nb promote`. The file is never written and the champion never moves."""
import os
import pickle
import subprocess

import pytest

from conftest import BIN
from mlops_nb.core import MlopsError
from test_serve import NAME, fit, register
from test_serve_faults import new_project

pytestmark = pytest.mark.slow


class Evil:
    "Unpickling it writes `marker`: what a malicious model file could do."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "Version 1 (skops) is champion; version 2 is a blessed pickle whose load would write `marker`."
    import mlflow
    from mlops_nb.data import encode_target, synthetic_churn
    from mlops_nb.registry import _client, use_project_tracking
    tmp = tmp_path_factory.mktemp("trust")
    root = new_project(tmp)
    model, X = fit(1, 1.0)
    register(root, model, X)
    marker = tmp / "pwned.txt"
    folder = tmp / "pickled"
    mlflow.sklearn.save_model(model, folder, serialization_format="pickle", input_example=X.head(3), pyfunc_predict_fn="predict_proba",
                              extra_files=[str(root / "schema.yaml")])
    (folder / "model.pkl").write_bytes(pickle.dumps(Evil(marker)))
    use_project_tracking(root)
    with mlflow.start_run(run_name="a pickle") as run: mlflow.log_artifacts(str(folder), "model")
    mv = _client().create_model_version(NAME, f"{run.info.artifact_uri}/model", run.info.run_id, tags={"blessed": "true", "compared_with": "1"})
    assert str(mv.version) == "2"
    (root / "data" / "processed").mkdir(parents=True)
    test = encode_target(synthetic_churn(200, seed=9).drop(columns="rownames"), "churn", "Yes")   # as prepare writes it
    test.to_parquet(root / "data" / "processed" / "test.parquet")
    test.drop(columns="churn").to_csv(tmp / "in.csv", index=False)
    return root, marker, tmp


def cli(root, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(BIN / "mlops-nb"), *args], cwd=root, capture_output=True, text=True, env=env, timeout=600)


REASON = "stored as pickle; only skops files are loaded"


def test_library_loaders_refuse_the_pickle(project):
    from mlops_nb.loading import load_version
    from mlops_nb.registry import _client, load_champion, use_project_tracking
    from mlops_nb.trust import load_model, load_scorer
    from mlops_nb.widgets import slice_explorer
    root, marker, _ = project
    use_project_tracking(root)
    uri = f"models:/{NAME}/2"
    for load in (load_model, load_scorer, load_version):
        with pytest.raises(MlopsError, match=REASON): load(uri)
    with pytest.raises(MlopsError, match=REASON): slice_explorer(root, NAME)   # champion (1) against the newest (2)
    client = _client()
    client.set_registered_model_alias(NAME, "champion", "2")   # as if someone moved the alias by hand
    try:
        with pytest.raises(MlopsError, match=REASON): load_champion(NAME)
    finally: client.set_registered_model_alias(NAME, "champion", "1")
    assert not marker.exists()


def test_infra_validation_refuses_the_pickle_in_its_fresh_process(project):
    import pandas as pd
    from mlops_nb.core import tracking_uri
    from mlops_nb.infra import infra_validate
    root, marker, _ = project
    examples = pd.read_parquet(root / "data" / "processed" / "test.parquet").drop(columns="churn").head(20)
    report = infra_validate(f"models:/{NAME}/2", examples, tracking_uri(root))
    first = report["checks"][0]
    assert not report["ok"] and first["check"] == "loads in a fresh process" and not first["passed"], report
    assert REASON in first["detail"], first
    assert infra_validate(f"models:/{NAME}/1", examples, tracking_uri(root))["checks"][0]["passed"]   # the skops version loads there
    assert not marker.exists()


def test_commands_refuse_the_pickle(project):
    root, marker, tmp = project
    r = cli(root, "predict", "--data", str(tmp / "in.csv"), "--out", str(tmp / "out.csv"), "--model", f"models:/{NAME}/2", "--no-log")
    assert r.returncode == 1 and REASON in r.stderr and not (tmp / "out.csv").exists(), r.stderr
    r = cli(root, "monitor", "--data", str(tmp / "in.csv"), "--model", f"models:/{NAME}/2", "--no-notebook", "--out", str(tmp / "monitor"))
    assert r.returncode == 1 and REASON in r.stderr, r.stdout + r.stderr
    r = cli(root, "promote", "2")
    assert r.returncode == 3 and "loads in a fresh process" in r.stderr and REASON in r.stderr, r.stdout + r.stderr
    from mlops_nb.registry import alias_version, use_project_tracking
    use_project_tracking(root)
    assert str(alias_version(NAME).version) == "1"   # the champion did not move
    assert not marker.exists()
