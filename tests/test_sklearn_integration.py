"""The adapter inside sklearn's tools: Pipeline, GridSearchCV, cross_validate, learning_curve."""

import numpy as np
import pytest
import sklearn
import torch
from conftest import head_arrays, make_body, make_head, reference_features
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, KFold, cross_validate, learning_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from skl_transfer import LayerVariationalAdapter


def _data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    y = np.tanh(X @ rng.normal(size=5)) + 0.05 * rng.normal(size=n)
    return X, y


def _sequential_body():
    # built from torch's own layers so that loky workers can unpickle it without test modules
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(5, 16, dtype=torch.float64), nn.Tanh(), nn.Linear(16, 16, dtype=torch.float64)
    )


def test_pipeline_with_scaler_equals_ridge_pipeline():
    X, y = _data()
    W0 = np.linspace(-1, 1, 5)
    pipe = make_pipeline(StandardScaler(), LayerVariationalAdapter(head=(W0, 0.0), alpha=3.0)).fit(X, y)
    Xs = StandardScaler().fit_transform(X)
    ridge = Ridge(alpha=3.0).fit(Xs, y - Xs @ W0)
    assert_allclose(pipe[-1].coef_, W0 + ridge.coef_, rtol=1e-10)


def test_grid_search_over_alpha_equals_brute_force_and_parallel():
    X, y = _data()
    body, head = _sequential_body(), nn.Linear(16, 1, dtype=torch.float64)
    alphas = [0.01, 0.1, 1.0, 10.0]
    cv = KFold(4, shuffle=True, random_state=0)
    est = LayerVariationalAdapter(body, head)
    search = GridSearchCV(est, {"alpha": alphas}, cv=cv, scoring="neg_mean_squared_error").fit(X, y)
    par = GridSearchCV(est, {"alpha": alphas}, cv=cv, scoring="neg_mean_squared_error", n_jobs=2).fit(X, y)

    # oracle: Ridge on the residue of each fold, features from a plain forward pass
    Z = reference_features(body, X)
    W0, b0 = head_arrays(head)
    Q = y - Z @ W0[0] - b0[0]
    means = []
    for alpha in alphas:
        errs = []
        for tr, te in cv.split(X):
            r = Ridge(alpha=alpha).fit(Z[tr], Q[tr])
            errs.append(-np.mean((Q[te] - r.predict(Z[te])) ** 2))
        means.append(np.mean(errs))
    assert_allclose(search.cv_results_["mean_test_score"], means, rtol=1e-8)
    assert_allclose(par.cv_results_["mean_test_score"], means, rtol=1e-8)
    assert search.best_params_["alpha"] == alphas[int(np.argmax(means))]
    assert_allclose(search.predict(X), par.predict(X), rtol=1e-12)


def test_cross_validate_and_learning_curve():
    X, y = _data(150)
    est = LayerVariationalAdapter(_sequential_body(), nn.Linear(16, 1, dtype=torch.float64), alpha=0.5)
    res = cross_validate(est, X, y, cv=3, n_jobs=2, return_estimator=True)
    assert len(res["estimator"]) == 3 and np.isfinite(res["test_score"]).all()
    sizes, train, test = learning_curve(
        est, X, y, train_sizes=[8, 16, 32, 64, 100], cv=KFold(3, shuffle=True, random_state=0)
    )
    assert list(sizes) == [8, 16, 32, 64, 100]
    # more target data helps (sparsity study): the largest size beats the smallest on test
    assert test[-1].mean() > test[0].mean()


def test_clone_and_params_are_untouched():
    body, head = make_body(), make_head()
    est = LayerVariationalAdapter(body, head, alpha=0.2, batch_size=7)
    c = clone(est)
    assert c.get_params()["alpha"] == 0.2 and c.get_params()["batch_size"] == 7
    X, y = _data()
    est.fit(X, y)
    assert est.extractor is body and est.head is head  # params are stored, not replaced


def test_sample_weight_metadata_routing():
    X, y = _data()
    sw = np.random.default_rng(2).uniform(0.1, 2.0, len(y))
    with sklearn.config_context(enable_metadata_routing=True):
        est = LayerVariationalAdapter(alpha=1.0).set_fit_request(sample_weight=True)
        pipe = make_pipeline(StandardScaler().set_fit_request(sample_weight=False), est)
        pipe.fit(X, y, sample_weight=sw)
    Xs = StandardScaler().fit_transform(X)
    ridge = Ridge(alpha=1.0).fit(Xs, y, sample_weight=sw)
    assert_allclose(pipe[-1].coef_, ridge.coef_, rtol=1e-10)


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_joblib_backends_equal_sequential(backend):
    import joblib

    X, y = _data()
    est = LayerVariationalAdapter(_sequential_body(), nn.Linear(16, 1, dtype=torch.float64))
    grid = {"alpha": [0.1, 1.0]}
    seq = GridSearchCV(est, grid, cv=3).fit(X, y)
    with joblib.parallel_backend(backend, n_jobs=2):
        par = GridSearchCV(est, grid, cv=3).fit(X, y)
    assert_allclose(seq.cv_results_["mean_test_score"], par.cv_results_["mean_test_score"], rtol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_score_is_r2_of_one_forward_pass(weighted):
    from conftest import CountingModule
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(3)
    X = rng.normal(size=(90, 5))
    y = np.tanh(X[:, :2]) @ np.array([1.0, -0.5]) + 0.1 * rng.normal(size=90)
    body = CountingModule(make_body())
    est = LayerVariationalAdapter(body, make_head(), alpha=0.3, cache=False).fit(X[:60], y[:60])
    sw = rng.uniform(0.5, 2.0, 30) if weighted else None
    before = body.rows_seen
    got = est.score(X[60:], y[60:], sample_weight=sw)
    assert body.rows_seen - before == 30  # the held-out rows through the extractor once (it was twice)
    assert got == r2_score(y[60:], est.predict(X[60:]), sample_weight=sw)
