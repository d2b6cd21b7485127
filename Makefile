# Two commands on a fresh machine with python3 and make: `make run`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY := true
export MPLBACKEND := Agg

.PHONY: run test test-fast sync lint lock bench serve docs docs-serve clean-venv help tools-kfp tools-airflow

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# The environment is rebuilt whenever the lock (or the package metadata) is newer than it.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mlops-nb)" >/dev/null
	@# JupyterLab's kernels get CurveZMQ keys: encrypted, and no "running over TCP without encryption" warning per kernel
	@mkdir -p $(VENV)/etc/jupyter && echo '{"MappingKernelManager": {"transport_encryption": "auto"}}' > $(VENV)/etc/jupyter/jupyter_server_config.json
	@touch $@

run: $(STAMP)  ## set up, then run the whole pipeline (dvc repro)
	$(BIN)/mlops-nb run

# test files run in parallel, one worker per core, each file whole on one worker (PYTEST_WORKERS=0: one process, file order)
PYTEST_WORKERS ?= auto
XDIST := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)  ## set up, then run every test (unit, notebooks, sync, pipeline smoke)
	$(BIN)/python -m pytest $(XDIST)

test-fast: $(STAMP)  ## the tests without the slow pipeline/server ones
	$(BIN)/python -m pytest $(XDIST) -m "not slow"

sync: $(STAMP)  ## regenerate mlops_nb/ from nbs/ and strip notebook outputs
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-clean --fname pipeline
	$(BIN)/nbdev-export
	$(BIN)/mlops-nb readme

bench: $(STAMP)  ## run every benchmark in benchmarks/
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

docs: $(STAMP)  ## build the documentation site into _site/ (executed notebooks, API, latest run; offline, strict)
	$(BIN)/mlops-nb docs build

docs-serve: $(STAMP)  ## serve the documentation site on 127.0.0.1:8001, rebuilt when a notebook or report changes
	$(BIN)/mlops-nb docs serve

serve: $(STAMP)  ## serve the champion model
	$(BIN)/mlops-nb serve

lock:  ## rewrite requirements.lock from the current .venv
	@(echo "# Exact versions of everything installed in .venv (make installs from this file)."; \
	  echo "# Regenerate with: make lock"; \
	  $(BIN)/pip freeze --all --exclude-editable | grep -v '^mlops-nb') > requirements.lock.tmp
	@mv requirements.lock.tmp requirements.lock

clean-venv:  ## remove the environment
	rm -rf $(VENV)

# The orchestrators' SDKs cannot share the project's environment (kfp needs protobuf<7; Airflow 3 needs a newer
# fastapi/pydantic/uvicorn than Feast allows): each gets a tool environment of its own, built from its own lock.
TOOLS := .tools

$(TOOLS)/%/.installed: tools/%/requirements.lock
	@test -x $(TOOLS)/$*/bin/python || $(PYTHON) -m venv $(TOOLS)/$*
	$(TOOLS)/$*/bin/python -m pip install --quiet --disable-pip-version-check -r tools/$*/requirements.lock
	@touch $@

tools-kfp: $(TOOLS)/kfp/.installed  ## the kfp SDK's environment (.tools/kfp), for `mlops-nb orchestrate kubeflow`

tools-airflow: $(TOOLS)/airflow/.installed  ## Airflow's environment (.tools/airflow), to test the generated DAGs
