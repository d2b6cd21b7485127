"""Every library notebook runs top to bottom in a fresh kernel (nbdev-test), including the cells flagged slow."""
import subprocess

import pytest

from conftest import BIN, ROOT

NOTEBOOKS = sorted(p.name for p in (ROOT / "nbs").glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
    r = subprocess.run([str(BIN / "nbdev-test"), "--flags", "slow", "--file-glob", name], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "Success" in r.stdout + r.stderr
