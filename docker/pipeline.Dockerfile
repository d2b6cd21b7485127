# The image of the pipeline's steps on Kubeflow Pipelines (`mlops-nb orchestrate kubeflow --image IMAGE`): the whole
# environment of requirements.lock (papermill, DVC, MLflow, deepchecks, Feast...), git and the `mlops-nb` command.
# A step clones the project at the run's commit and runs `mlops-nb stage NAME` there with the clone's library first
# on PYTHONPATH, so this image changes only when the lock does. The serving image stays the small one (../Dockerfile).
#   docker build -f docker/pipeline.Dockerfile -t mlops-nb-pipeline .    (from the project root)
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY=true \
    MPLBACKEND=Agg

# git: each step clones the project at the run's commit (Debian's current git: an exact revision pin breaks the
# build when bookworm's archive moves on to a security update)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY mlops_nb/ mlops_nb/
# the stage notebooks run on the kernel named python3, as `make` installs it
RUN pip install --no-cache-dir --no-deps . \
 && python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mlops-nb)" \
 && useradd --system --uid 10001 --create-home --home-dir /home/mlops --shell /usr/sbin/nologin mlops

USER 10001
WORKDIR /home/mlops
