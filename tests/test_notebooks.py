"""Every library notebook runs top to bottom in a fresh process, including the cells flagged slow; then the
documentation site is built from those executions and checked in headless Chromium.

`mlops-nb docs execute` runs a notebook exactly as `nbdev-test --flags slow` does (nbdev's cell selection, execnb's
shell, in the notebook's folder) and keeps the executed copy in _proc/executed/, stamped with what it depends on.
`mlops-nb docs build` (what `make docs` runs) builds the site strictly and offline from those executed notebooks, so
the site's tests come after the notebooks' in this one module (a module runs whole on one test worker): the build
reuses the executions instead of running every notebook again. Headless Chromium finds on each kind of page its
title, the navigation, a rendered image or table, a working search and no console errors; screenshots go to
reports/docs/."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import BIN, ROOT, apt_install, run, skip_or_fail


# the library notebooks, then the guides (nbs/guides/): paths relative to nbs/
NOTEBOOKS = sorted(p.name for p in (ROOT / "nbs").glob("[0-9]*.ipynb")) + sorted(f"guides/{p.name}" for p in (ROOT / "nbs" / "guides").glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
    from mlops_nb.docs import executed_copy, execution_key, stored_key
    r = subprocess.run([str(BIN / "mlops-nb"), "docs", "execute", f"nbs/{name}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # the executed copy is there, stamped with the key of the notebook and library as they are now
    assert stored_key(executed_copy(ROOT / "nbs" / name, ROOT)) == execution_key(ROOT / "nbs" / name, ROOT)


# The documentation site, built from the executions above


SHOTS = ROOT / "reports" / "docs"

# (screenshot name, path, words of the <title>, what the page must render: "img" or "table")
PAGES = [
    ("home", "", "mlops-nb", "table"),
    ("api-docs", "api/docs/", "docs", "table"),
    ("notebook-drift", "library/11_drift/", "drift", "img"),
    ("guide-serving", "guides/04_serving/", "Serving", "table"),
    ("latest-run", "latest-run/", "Latest run", "img"),
]
NAV = ["Home", "Getting started", "Guides", "Library", "API reference", "Latest run"]

# The sections that left the README (issue 28) for the guides: each is a heading of a guide the navigation reaches
MOVED = ["mlops-nb init: what it chooses for your table", "Use your own notebooks and features", "What make run leaves behind",
         "The gate", "Everyday use", "In JupyterLab", "Sweeps", "Serving the champion",
         "Compiled models: ONNX in the service and on edge devices",
         "The ecosystem's protocols: a drop-in for mlflow models serve, and the Open Inference Protocol",
         "A container image for the service", "The feature store (Feast)", "Monitoring production traffic", "Continuous training",
         "Prometheus and Grafana", "Batch prediction", "Continuous delivery workflows", "Documentation site", "Parameters",
         "When one machine is not enough", "On Kubeflow Pipelines and Airflow", "Layout", "Developing", "Benchmarks",
         "A newcomer's first run"]


@pytest.fixture(scope="module")
def site():
    "The site as `make docs` builds it, and what the build printed."
    r = run("mlops-nb", "docs", "build", cwd=ROOT)
    return ROOT / "_site", r.stdout + r.stderr


@pytest.fixture(scope="module")
def base_url(site):
    "The built site served over HTTP on 127.0.0.1, as any static host would serve it."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site[0])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError: time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    "Headless Chromium (Debian's package, installed when missing) driven by Playwright; nothing is downloaded."
    chromium = apt_install("chromium", binary="chromium")
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    try: from playwright.sync_api import sync_playwright
    except ImportError: skip_or_fail("the playwright package is not installed (make: requirements.lock)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])  # tests run as root in CI
        yield b
        b.close()


def open_page(browser, url):
    "A page at `url`, with the console errors, page errors and requests to other hosts it caused."
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
    page.on("request", lambda r: r.url.startswith("http://127.0.0.1") or r.url.startswith("data:")
            or problems.append(f"request to another host: {r.url}"))
    response = page.goto(url, wait_until="networkidle")
    assert response.status == 200, f"{url}: HTTP {response.status}"
    return page, problems


@pytest.mark.slow
def test_build_is_strict_clean_and_offline(site):
    path, out = site
    assert "WARNING" not in out, out[-3000:]
    for name in ["index.html", "getting-started/index.html", "guides/index.html", "api/docs/index.html", "library/11_drift/index.html",
                 "latest-run/index.html", "search/search_index.json"]:
        assert (path / name).is_file(), f"{name} missing from the built site"
    from mlops_nb.docs import remote_assets
    assert remote_assets(path) == []


@pytest.mark.slow
def test_every_library_notebook_and_module_has_a_page(site):
    path, _ = site
    for nb in sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")):
        assert (path / "library" / nb.stem / "index.html").is_file(), f"no page for {nb.name}"
    for mod in sorted((ROOT / "mlops_nb").glob("[a-z]*.py")):
        if mod.stem != "__init__": assert (path / "api" / mod.stem / "index.html").is_file(), f"no API page for mlops_nb.{mod.stem}"
    for nb in sorted((ROOT / "nbs" / "guides").glob("[0-9][0-9]_*.ipynb")):
        assert (path / "guides" / nb.stem / "index.html").is_file(), f"no page for guide {nb.name}"


@pytest.mark.slow
@pytest.mark.parametrize("name,path,title,rendered", PAGES, ids=[p[0] for p in PAGES])
def test_page_in_chromium(browser, base_url, name, path, title, rendered):
    page, problems = open_page(browser, base_url + path)
    try:
        assert title.lower() in page.title().lower(), f"title {page.title()!r} lacks {title!r}"
        nav = page.locator("nav.md-tabs").inner_text()
        assert all(entry in nav for entry in NAV), f"navigation lacks some of {NAV}: {nav[:500]}"
        content = page.locator("article.md-content__inner")
        if rendered == "img":
            sizes = content.locator("img").evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert sizes and all(w > 100 for w in sizes), f"images not rendered: widths {sizes}"
        else:
            assert content.locator("table tbody tr").count() > 0, "no table rendered"
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
        assert problems == []
    finally:
        page.close()


@pytest.mark.slow
def test_every_section_that_left_the_readme_is_reached_from_the_navigation(browser, base_url):
    "Each guide is in the home page's navigation, and each section that left the README is a heading of one of them."
    page, problems = open_page(browser, base_url)
    try:
        links = page.locator("nav.md-nav--primary a[href*='guides/']").evaluate_all("as => as.map(a => a.href)")
    finally:
        page.close()
    guides = sorted({u.split("#")[0] for u in links if not u.rstrip("/").endswith("guides")})
    assert len(guides) == len(list((ROOT / "nbs" / "guides").glob("[0-9][0-9]_*.ipynb"))), guides
    headings = set()
    for url in guides:
        page, problems = open_page(browser, url)
        try:
            headings |= {h.replace("\u00b6", "").strip() for h in page.locator("article h2, article h3").all_inner_texts()}
            assert problems == []
        finally:
            page.close()
    assert [s for s in MOVED if s not in headings] == [], sorted(headings)
    assert problems == []


@pytest.mark.slow
def test_search_finds_a_library_function(browser, base_url):
    page, problems = open_page(browser, base_url)
    try:
        box = page.locator("input.md-search__input")
        box.click()
        box.fill("readme_text")
        first = page.locator(".md-search-result__item a").first
        first.wait_for(timeout=15_000)
        assert "readme_text" in page.locator(".md-search-result").inner_text()
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "search.png"))
        first.click()
        page.wait_for_load_state("networkidle")
        assert "docs" in page.url, page.url  # the result leads to the docs module's pages
        assert problems == []
    finally:
        page.close()


@pytest.mark.slow
def test_a_broken_link_fails_the_build(site, tmp_path):
    "Strict: a page linking to a page that does not exist stops the build with the link named (the copy reuses the executions)."
    project = tmp_path / "project"
    for name in ["nbs", "docs", "mlops_nb", "reports", "pyproject.toml", "params.yaml", "schema.yaml", "requirements.lock", "_proc/executed"]:
        src, dst = ROOT / name, project / name
        if not src.exists(): continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() else shutil.copy2(src, dst)
    with (project / "docs" / "getting-started.md").open("a") as f: f.write("\nSee [the missing page](no-such-page.md).\n")
    r = run("mlops-nb", "docs", "build", cwd=project, check=False)
    assert r.returncode == 1
    assert "no-such-page.md" in r.stderr and "mkdocs build --strict failed" in r.stderr
