# The prediction service: `mlops-nb serve` for the model at MODEL_URI, read from the registry at MLFLOW_TRACKING_URI.
#   docker build -t mlops-nb-serve .      (podman build works the same)
#   docker compose up                     (the service beside an MLflow tracking server: compose.yaml)
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_URI=models:/churn-classifier@champion \
    MLFLOW_TRACKING_URI=http://mlflow:5000 \
    PORT=8000

WORKDIR /app
# only what serving imports, at the versions of requirements.lock (no pipeline, notebook or docs tooling)
COPY requirements.lock docker/serve-requirements.in ./
RUN pip install --no-cache-dir -c requirements.lock -r serve-requirements.in
# LightGBM's models (train.model lgbm, lgbm_dask), served by scikit-learn, load OpenMP's runtime, which the slim base lacks
# (Debian's current libgomp1: an exact revision pin breaks the build when bookworm's archive moves on to a security update)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md params.yaml schema.yaml ./
COPY mlops_nb/ mlops_nb/
RUN pip install --no-cache-dir --no-deps . \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin mlops \
 && mkdir -p /app/logs \
 && chown mlops /app/logs

USER 10001
EXPOSE 8000
# healthy once the model is loaded and warmed up (/ready), not merely when the process is up
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['PORT'] + '/ready', timeout=2)"]
CMD ["sh", "-c", "exec mlops-nb serve --model \"$MODEL_URI\" --host 0.0.0.0 --port \"$PORT\" --log-dir /app/logs/predictions"]
