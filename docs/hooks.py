"""MkDocs hook: before every build (and every rebuild of `make docs-serve`) the pages are generated from the
notebooks, docs/*.md and reports/ by the library (nbs/08_docs.ipynb)."""
from mlops_nb.docs import configure_site


def on_config(config):
    return configure_site(config)
