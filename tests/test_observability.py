"""Prometheus and Grafana against the real thing: Debian's `prometheus` scrapes a real `mlops-nb serve` that has
answered traffic and exports the latest `mlops-nb monitor` report, with the project's scrape config and alert rules
(`deploy/prometheus/`); every query of every panel of the Grafana dashboard (`deploy/grafana/`) returns data, and
every alert rule loads and evaluates without error."""
import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, apt_install, run
from mlops_nb.loadtest import ServiceProcess
from test_monitor import CHUNK, PHASE, champion_project, churn, logged, send
from test_serve import Server

pytestmark = pytest.mark.slow
DEPLOY = ROOT / "deploy"


def panel_queries() -> list[tuple[str, str]]:
    "(panel title, PromQL) of every target of the dashboard, Grafana's interval variable filled in as a user's would be."
    dash = json.loads((DEPLOY / "grafana" / "mlops-nb-dashboard.json").read_text())
    return [(p["title"], t["expr"].replace("$__rate_interval", "1m")) for p in dash["panels"] for t in p["targets"]]


def query(url: str, expr: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def prometheus_bin():
    return apt_install("prometheus", binary="prometheus")


def test_config_and_rules_pass_promtool(prometheus_bin):
    promtool = Path(prometheus_bin).with_name("promtool")
    r = run(str(promtool), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"), cwd=ROOT)
    assert "SUCCESS" in r.stdout + r.stderr
    r = run(str(promtool), "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"), cwd=ROOT)
    assert "SUCCESS: 8 rules found" in r.stdout + r.stderr, r.stdout + r.stderr


def test_prometheus_scrapes_the_service_and_every_panel_has_data(prometheus_bin, tmp_path):
    (tmp_path / "project").mkdir()
    root, _ = champion_project(tmp_path / "project")
    live, _ = churn(PHASE, seed=7)
    server = Server(root, "--log-dir", str(root / "log"), "--poll-seconds", "0")
    prom = None
    try:
        send(server, live, "calm")
        assert server.post([{"tenure": "many"}]).status_code in (400, 422)   # a refused request: a non-200 status series
        assert logged(root / "log", PHASE) == PHASE
        # the monitor writes its report where the service reads it (serve.monitor_report, relative to the project)
        r = run("mlops-nb", "monitor", "--log-dir", str(root / "log"), "--last", str(PHASE), cwd=root, check=False,
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert (root / "reports" / "monitor" / "monitor.json").is_file()
        # the project's scrape config and rules, pointed at this service and scraping every second
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
        shutil.copy2(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = ServiceProcess([prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               "--web.listen-address=127.0.0.1:{port}"], "/-/ready", cwd=tmp_path, log=tmp_path / "prometheus.log", timeout=60)
        for _ in range(20):                 # a few scrapes of answered traffic, so rates have two samples
            send(server, live.head(CHUNK), f"more{_}")
            time.sleep(0.5)
        results = {}
        for _ in range(60):
            results = {(title, expr): query(prom.url, expr) for title, expr in panel_queries()}
            if all(r["data"]["result"] for r in results.values()): break
            time.sleep(1)
        empty = [f"{title}: {expr}" for (title, expr), r in results.items() if r["status"] != "success" or not r["data"]["result"]]
        assert not empty, "panels without data:\n" + "\n".join(empty)
        # independent of our own exporter's text: the values Prometheus stored are the report's
        report = json.loads((root / "reports" / "monitor" / "monitor.json").read_text())
        got = query(prom.url, 'mlops_monitor_decision == 1')["data"]["result"]
        assert [s["metric"]["decision"] for s in got] == [report["decision"]]
        est = report["metrics"]["estimated"]["roc_auc"]["estimate"]
        got = query(prom.url, 'mlops_monitor_metric{metric="roc_auc",source="estimated"}')["data"]["result"]
        assert abs(float(got[0]["value"][1]) - est) < 1e-9
        assert len(query(prom.url, 'mlops_monitor_drift_score{stat="psi"}')["data"]["result"]) == len(report["drift"]["features"])
        # every alert rule loaded and evaluated without error
        with urllib.request.urlopen(prom.url + "/api/v1/rules", timeout=10) as resp: groups = json.loads(resp.read())["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        for _ in range(30):
            if all(r.get("health") == "ok" for r in rules): break
            time.sleep(1)
            with urllib.request.urlopen(prom.url + "/api/v1/rules", timeout=10) as resp: rules = [r for g in json.loads(resp.read())["data"]["groups"] for r in g["rules"]]
        assert len(rules) == 8 and all(r.get("health") == "ok" for r in rules), [(r["name"], r.get("health"), r.get("lastError")) for r in rules]
    finally:
        if prom is not None: prom.stop()
        server.stop()
