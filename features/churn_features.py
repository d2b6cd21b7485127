"""Feature definitions of the project, built from schema.yaml: every column but the target (params.yaml base.target)
is a feature of the view `customer_features`, keyed by `customer_id`; the feature service `churn_model` is what the
default model reads.

`feast apply` in this folder, or `mlops_nb.features.apply`, registers them. This folder holds definitions only:
Feast imports every .py file under it.
"""
from pathlib import Path

from mlops_nb.core import load_params
from mlops_nb.features import feature_objects
from mlops_nb.schema import load_schema

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
customer, customers_source, customer_features, churn_model = feature_objects(
    load_schema(ROOT / "schema.yaml"), target=PARAMS.base.target, source_path="../data/features/customers.parquet",
    key_column=PARAMS.prepare.key_column)   # the declared entity column is the key, not a feature
