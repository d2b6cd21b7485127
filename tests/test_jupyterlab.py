"""`jupyter lab` as the README starts it: the project's environment serves the project's kernel, the kernels
run encrypted without ipykernel's "TCP without encryption" warning, and the widget manager extension is there."""
import json
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest

from conftest import BIN, ROOT, skip_or_fail

pytestmark = pytest.mark.slow
TOKEN = "mlops-nb-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port, path, method="GET", body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as r: return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not (BIN.parent / "etc" / "jupyter" / "jupyter_server_config.json").exists():
        skip_or_fail("the environment has no jupyter_server_config.json: rebuild it with `make .venv/.installed`")
    port, log = free_port(), tmp_path_factory.mktemp("lab") / "lab.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "jupyter"), "lab", "--no-browser", "--allow-root", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                                 f"--IdentityProvider.token={TOKEN}", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try: api(port, "/api/status"); break
            except OSError: time.sleep(1)
        else: pytest.fail("jupyter lab did not answer within 120 s:\n" + log.read_text()[-3000:])
        yield port, log
    finally:
        proc.terminate()
        proc.wait(30)


def run_code(port, kernel_id, code):
    import websocket
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?token={TOKEN}", timeout=120)
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({"header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request", "version": "5.3"},
                        "parent_header": {}, "metadata": {}, "content": {"code": code, "silent": False}, "channel": "shell"}))
    try:
        while True:
            m = json.loads(ws.recv())
            if m["parent_header"].get("msg_id") != msg_id: continue
            if m["msg_type"] == "stream": return m["content"]["text"]
            if m["msg_type"] == "error": pytest.fail(f"{m['content']['ename']}: {m['content']['evalue']}")
    finally: ws.close()


def test_the_default_kernel_is_the_projects_environment(lab):
    port, _ = lab
    specs = api(port, "/api/kernelspecs")
    assert specs["default"] == "python3"
    assert specs["kernelspecs"]["python3"]["spec"]["argv"][0] == str(BIN / "python")
    kernel = api(port, "/api/kernels", "POST", {"name": "python3"})
    out = run_code(port, kernel["id"], "import sys, mlops_nb, ipywidgets; print(sys.executable, ipywidgets.__version__)")
    assert out.split()[0] == str(BIN / "python") and out.split()[1].startswith("8.")


def test_kernels_start_without_the_unencrypted_tcp_warning(lab):
    port, log = lab
    kernel = api(port, "/api/kernels", "POST", {"name": "python3"})
    assert run_code(port, kernel["id"], "print(6 * 7)").strip() == "42"
    text = log.read_text()
    assert "Kernel started" in text and "without encryption" not in text


def test_lab_serves_the_widget_manager_to_the_browser(lab):
    import re
    port, _ = lab
    req = urllib.request.Request(f"http://127.0.0.1:{port}/lab", headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(req, timeout=60) as r: page = r.read().decode()
    config = json.loads(re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S).group(1))
    names = {e["name"] for e in config["federated_extensions"]}
    assert "@jupyter-widgets/jupyterlab-manager" in names  # what renders ipywidgets in Lab
