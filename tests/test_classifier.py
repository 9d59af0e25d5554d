"""LayerVariationalClassifier against independent oracles (sklearn, scipy), and its contracts."""

import pickle

import numpy as np
import pytest
import torch
from conftest import head_arrays, make_body, make_head, reference_features
from numpy.testing import assert_allclose, assert_array_equal
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

from skl_transfer import LayerVariationalClassifier, _solvers


def _data(n=150, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    y = np.argmax(X[:, :k] + 0.5 * rng.normal(size=(n, k)), axis=1)
    return X, y


@parametrize_with_checks([LayerVariationalClassifier(), LayerVariationalClassifier(loss="log", max_iter=50)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(params=["dense", "hessian-free"])
def hessian(request, monkeypatch):
    """Both Newton paths: the dense k(d+1) Hessian, and conjugate gradients on its products
    (the path of heads too large for it, forced here by a zero size bound)."""
    if request.param == "hessian-free":
        monkeypatch.setattr(_solvers, "DENSE_HESSIAN_BYTES", 0)
    return request.param


def test_log_loss_without_head_equals_logistic_regression(hessian):
    X, y = _data(300)
    alpha = 2.0
    est = LayerVariationalClassifier(loss="log", alpha=alpha, tol=1e-12, max_iter=50).fit(X, y)
    ref = LogisticRegression(C=1 / (2 * alpha), tol=1e-12, max_iter=10000).fit(X, y)  # 0.5||W||^2 + C * CE
    assert_allclose(est.coef_, ref.coef_, atol=1e-6)
    assert_allclose(est.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    assert 1 <= est.n_iter_ < 50


def test_log_loss_with_pretrained_head_equals_direct_minimisation(hessian):
    body, head = make_body(), make_head(n_out=3)
    X, y = _data(120)
    sw = np.random.default_rng(2).uniform(0.5, 2.0, 120)
    alpha = 0.7
    est = LayerVariationalClassifier(body, head, loss="log", alpha=alpha, tol=1e-12, max_iter=50)
    est.fit(X, y, sample_weight=sw)
    Z = reference_features(body, X)
    W0, b0 = head_arrays(head)

    def objective(theta):
        W, b = theta[:48].reshape(3, 16), theta[48:]
        L = Z @ W.T + b
        lse = np.log(np.exp(L - L.max(1, keepdims=True)).sum(1)) + L.max(1)
        P = np.exp(L - lse[:, None])
        P[np.arange(120), y] -= 1
        G = (P * sw[:, None]).T
        grad = np.concatenate([(G @ Z + 2 * alpha * (W - W0)).ravel(), G.sum(1)])
        return float(sw @ (lse - L[np.arange(120), y]) + alpha * ((W - W0) ** 2).sum()), grad

    res = minimize(objective, np.concatenate([W0.ravel(), b0]), jac=True, method="L-BFGS-B",
                   options=dict(ftol=1e-15, gtol=1e-10, maxiter=20000))  # fmt: skip
    W_ref, b_ref = res.x[:48].reshape(3, 16), res.x[48:]
    assert_allclose(est.coef_, W_ref, atol=1e-5)
    L_ref = Z @ W_ref.T + b_ref
    assert_allclose(est.decision_function(X) - est.decision_function(X).mean(1, keepdims=True),
                    L_ref - L_ref.mean(1, keepdims=True), atol=1e-5)  # fmt: skip


def test_squared_loss_is_ridge_on_margin_corrected_logit_targets():
    body, head = make_body(), make_head(n_out=3)
    X, y = _data(200)
    est = LayerVariationalClassifier(body, head, alpha=1.5, encoding="margin", margin=2.0).fit(X, y)
    Z = reference_features(body, X)
    W0, b0 = head_arrays(head)
    L0 = Z @ W0.T + b0
    T = L0.copy()
    for i in range(len(y)):  # independent, explicit loop
        rival = max(L0[i, j] for j in range(3) if j != y[i])
        short = max(0.0, 2.0 - (L0[i, y[i]] - rival))
        T[i] -= short / 2
        T[i, y[i]] = L0[i, y[i]] + short / 2
    ridge = Ridge(alpha=1.5).fit(Z, T - L0)
    assert_allclose(est.coef_, W0 + ridge.coef_, rtol=1e-8, atol=1e-10)
    assert_allclose(est.intercept_, b0 + ridge.intercept_, rtol=1e-8, atol=1e-10)
    # rows the pretrained head already gets right with margin carry no residue
    ok = (L0[np.arange(200), y] - np.where(np.eye(3, dtype=bool)[y], -np.inf, L0).max(1)) >= 2.0
    assert_allclose((T - L0)[ok], 0.0)


def test_predictions_module_and_binary_shapes():
    body, head = make_body().float(), make_head(n_out=3).float()
    X, y = _data(90)
    est = LayerVariationalClassifier(body, head, alpha=0.5).fit(X, y)
    L = est.decision_function(X)
    assert_array_equal(est.predict(X), est.classes_[L.argmax(1)])
    assert_allclose(est.predict_proba(X).sum(1), 1.0)
    out = est.to_module()(torch.as_tensor(X, dtype=torch.float32)).double().numpy()
    assert_allclose(out, L, rtol=1e-5, atol=1e-5)
    Xb, yb = _data(80, k=2)
    labels = np.array(["cat", "dog"])[yb]
    probe = LayerVariationalClassifier(alpha=0.1).fit(Xb, labels)  # head=None: any labels
    assert list(probe.classes_) == ["cat", "dog"] and probe.decision_function(Xb).shape == (80,)


def test_label_set_must_match_the_head():
    body, head = make_body(), make_head(n_out=3)
    X, y = _data(40)
    with pytest.raises(ValueError, match="logits of 3 classes"):
        LayerVariationalClassifier(body, head).fit(X, y + 1)  # label 3 beyond the head
    with pytest.raises(ValueError, match="logits of 3 classes"):
        LayerVariationalClassifier(body, head).fit(X, np.array(["a", "b", "c"])[y])
    est = LayerVariationalClassifier(body, head).fit(X[y < 2], y[y < 2])  # a subset is fine
    assert list(est.classes_) == [0, 1, 2]


def test_frozen_pickle_and_grid_search():
    body, head = make_body(), make_head(n_out=3)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    X, y = _data(120)
    search = GridSearchCV(LayerVariationalClassifier(body, head, loss="log"), {"alpha": [0.1, 10.0]}, cv=3)
    search.fit(X, y)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    again = pickle.loads(pickle.dumps(search.best_estimator_))
    assert_array_equal(again.predict_proba(X), search.predict_proba(X))


def test_auto_margin_is_log_of_nine_times_rivals_for_the_margin_encoding():
    X, y = _data(60, k=4)
    body, head = make_body(), make_head(n_out=4)
    auto = LayerVariationalClassifier(body, head, encoding="margin").fit(X, y)
    explicit = LayerVariationalClassifier(body, head, encoding="margin", margin=np.log(9 * 3)).fit(X, y)
    assert_allclose(auto.coef_, explicit.coef_, rtol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # logits below and above the log(27) floor
def test_onehot_encoding_is_ridge_on_scaled_one_hot_targets(scale):
    body, head = make_body(), make_head(n_out=4)
    with torch.no_grad():
        head.weight.mul_(scale)
    X, y = _data(150, k=4)
    sw = np.random.default_rng(3).uniform(0.5, 2.0, size=150)
    est = LayerVariationalClassifier(body, head, alpha=2.0).fit(X, y, sample_weight=sw)
    Z = reference_features(body, X)
    W0, b0 = head_arrays(head)
    L0 = Z @ W0.T + b0
    gaps = [(max(row) - sum(row) / 4) * 4 / 3 for row in L0]  # explicit, per sample
    margin = max(np.log(27.0), np.average(gaps, weights=sw))
    T = L0.mean(axis=1, keepdims=True) + margin * (np.eye(4)[y] - 0.25)
    ridge = Ridge(alpha=2.0).fit(Z, T - L0, sample_weight=sw)
    assert_allclose(est.coef_, W0 + ridge.coef_, rtol=1e-8, atol=1e-10)
    assert_allclose(est.intercept_, b0 + ridge.intercept_, rtol=1e-8, atol=1e-10)


def test_log_loss_warns_when_head_classes_have_no_weight():
    # their unpenalised intercepts have no finite optimum (the fit stops where max_iter stops it):
    # said, with the fix; fit_intercept=False keeps the pretrained intercepts and converges
    import warnings

    rng = np.random.default_rng(0)
    Z = rng.normal(size=(40, 5))
    W0, b0 = rng.normal(size=(3, 5)), rng.normal(size=3)
    y = np.where(Z[:, 0] > 0, 0, 2)  # class 1 of the head never occurs
    with pytest.warns(UserWarning, match=r"1 of the 3 classes \(1\) have no weight in y"):
        LayerVariationalClassifier(None, (W0, b0), loss="log", alpha=1.0).fit(Z, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = LayerVariationalClassifier(None, (W0, b0), loss="log", alpha=1.0, fit_intercept=False).fit(
            Z, y
        )
    assert_allclose(kept.intercept_, b0, rtol=0, atol=0)
