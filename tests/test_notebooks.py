"""Every library notebook runs top to bottom in a fresh process, including the cells flagged slow.

`mlops-nb docs execute` runs a notebook exactly as `nbdev-test --flags slow` does (nbdev's cell selection, execnb's
shell, in the notebook's folder) and keeps the executed copy in _proc/executed/, stamped with what it depends on;
the documentation site (tests/test_site.py, `make docs`) shows those outputs instead of executing every notebook again."""
import subprocess

import pytest

from conftest import BIN, ROOT

NOTEBOOKS = sorted(p.name for p in (ROOT / "nbs").glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
    from mlops_nb.docs import EXECUTED, execution_key, stored_key
    r = subprocess.run([str(BIN / "mlops-nb"), "docs", "execute", f"nbs/{name}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # the executed copy is there, stamped with the key of the notebook and library as they are now
    assert stored_key(ROOT / EXECUTED / name) == execution_key(ROOT / "nbs" / name, ROOT)
