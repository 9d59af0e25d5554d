"""transferability() against brute-force cross-validation, and LogME against scipy's Gaussian."""

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import optimize
from scipy.stats import multivariate_normal
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold, LeaveOneOut

from skl_transfer import logme, transferability
from skl_transfer._transferability import _logme_column, logme_evidence

ALPHAS = [0.01, 0.3, 3.0, 30.0]


def brute_force_cv(Z, Y, s, prior, splitter, fit_intercept=True):
    """min over ALPHAS of the held-out weighted MSE of Ridge on the residue of ``prior`` (W0, b0)."""
    W0, b0 = prior
    Q = Y - Z @ W0.T - b0
    best = []
    for alpha in ALPHAS:
        fold_mse = []
        errors = np.empty_like(Y)
        for train, test in splitter.split(Z):
            ridge = Ridge(alpha=alpha, fit_intercept=fit_intercept).fit(
                Z[train], Q[train], sample_weight=s[train]
            )
            pred = Z[test] @ W0.T + b0 + ridge.predict(Z[test]).reshape(len(test), -1)
            errors[test] = (Y[test] - pred) ** 2
            fold_mse.append(np.average(errors[test].mean(1), weights=s[test]))
        pooled = np.average(errors.mean(1), weights=s)
        best.append(pooled if isinstance(splitter, LeaveOneOut) else np.mean(fold_mse))
    j = int(np.argmin(best))
    return best[j], ALPHAS[j]


def task(n=30, d=5, k=2, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d)) + 0.5
    W0 = rng.normal(size=(k, d))
    b0 = rng.normal(size=k)
    Y = Z @ (W0 + 0.4 * rng.normal(size=(k, d))).T + b0 + 0.5 + 0.3 * rng.normal(size=(n, k))
    return Z, Y, W0, b0


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("cv", [None, 4])
def test_held_out_errors_match_brute_force(weighted, cv):
    Z, Y, W0, b0 = task()
    n, k = Y.shape
    s = np.random.default_rng(1).uniform(0.5, 2.0, n) if weighted else np.ones(n)
    result = transferability(None, (W0, b0), Z, Y, alphas=ALPHAS, cv=cv, sample_weight=s)
    splitter = LeaveOneOut() if cv is None else KFold(cv)
    adapted, alpha = brute_force_cv(Z, Y, s, (W0, b0), splitter)
    probe, probe_alpha = brute_force_cv(Z, Y, s, (np.zeros((k, 5)), np.zeros(k)), splitter)
    assert_allclose(result.adapted_mse, adapted, rtol=1e-8)
    assert_allclose(result.probe_mse, probe, rtol=1e-8)
    assert result.alpha == alpha and result.probe_alpha == probe_alpha
    Q = Y - Z @ W0.T - b0
    assert_allclose(result.pretrained_mse, np.average((Q**2).mean(1), weights=s), rtol=1e-10)
    assert_allclose(
        result.target_mse, np.average(((Y - np.average(Y, 0, weights=s)) ** 2).mean(1), weights=s)
    )
    assert_allclose(result.ratio_to_pretrained, adapted / result.pretrained_mse, rtol=1e-8)
    assert_allclose(result.ratio_to_probe, adapted / probe, rtol=1e-8)
    assert result.diagnostics.rank == np.linalg.matrix_rank(Z - Z.mean(0))
    assert result.adapter.alpha_ == alpha
    assert result.cv == ("leave-one-out" if cv is None else "4-fold")


def test_linear_head_and_extractor_give_the_same_numbers_as_features():
    import torch
    from torch import nn

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 6, dtype=torch.float64), nn.Tanh())
    head = nn.Linear(6, 1, dtype=torch.float64)
    X = np.random.default_rng(2).normal(size=(25, 3))
    y = np.sin(X[:, 0]) + X[:, 1]
    with torch.no_grad():
        Z = body(torch.as_tensor(X)).numpy()
    via_body = transferability(body, head, X, y, alphas=ALPHAS)
    W0, b0 = head.weight.detach().numpy(), head.bias.detach().numpy()
    adapted, _ = brute_force_cv(Z, y[:, None], np.ones(25), (W0, b0), LeaveOneOut())
    assert_allclose(via_body.adapted_mse, adapted, rtol=1e-7)
    assert "leave-one-out" in repr(via_body) and "pretrained head" in via_body.summary()


def test_bad_input_is_refused_clearly():
    Z, Y, W0, b0 = task()
    with pytest.raises(ValueError, match="needs the pretrained head"):
        transferability(None, None, Z, Y)
    with pytest.raises(ValueError, match="alpha = 0 is not allowed"):
        transferability(None, (W0, b0), Z, Y, alphas=[0.0, 1.0])
    with pytest.raises(ValueError, match="samples"):
        transferability(None, (W0, b0), Z, Y[:5])
    with pytest.raises(ValueError, match="outputs"):
        transferability(None, (W0[:1], b0[:1]), Z, Y)
    with pytest.raises(ValueError, match="shape"):
        logme(Z, Y[:4])


# -- LogME -------------------------------------------------------------------------------


def brute_log_evidence(F, y, alpha, beta):
    """log N(y; 0, I / beta + F F^T / alpha): the marginal likelihood of Bayesian linear regression."""
    n = F.shape[0]
    return multivariate_normal(np.zeros(n), np.eye(n) / beta + F @ F.T / alpha).logpdf(y)


@pytest.mark.parametrize("n, D", [(12, 4), (6, 9)])
def test_logme_evidence_formula_equals_the_gaussian_marginal(n, D):
    rng = np.random.default_rng(3)
    F = rng.normal(size=(n, D))
    y = F @ rng.normal(size=D) + 0.5 * rng.normal(size=n)
    U, sv, _ = np.linalg.svd(F, full_matrices=False)
    x2 = (U.T @ y) ** 2
    for alpha, beta in [(0.3, 2.0), (5.0, 0.1), (1.0, 1.0)]:
        formula = logme_evidence(sv**2, x2, y @ y - x2.sum(), n, D, alpha, beta)
        assert_allclose(formula, brute_log_evidence(F, y, alpha, beta), rtol=1e-10)


@pytest.mark.parametrize("n, D", [(15, 4), (6, 9)])
def test_logme_is_the_maximised_evidence(n, D):
    rng = np.random.default_rng(4)
    F = rng.normal(size=(n, D))
    Y = np.column_stack([F @ rng.normal(size=D) + 0.3 * rng.normal(size=n), rng.normal(size=n)])
    best = []
    for j, y in enumerate(Y.T):
        res = optimize.minimize(
            lambda p, y=y: -brute_log_evidence(F, y, np.exp(p[0]), np.exp(p[1])),
            x0=[0.0, 0.0],
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000},
        )
        best.append(-res.fun / n)
        U, sv, _ = np.linalg.svd(F, full_matrices=False)
        _, alpha, beta = _logme_column(U, sv**2, D, y)
        if j == 0 and n > D:  # an interior maximum (the others are on the boundary: alpha or beta -> inf)
            assert_allclose([np.log(alpha), np.log(beta)], res.x, atol=1e-3)
    assert_allclose(logme(F, Y), np.mean(best), rtol=1e-7)


def test_logme_prefers_informative_features():
    rng = np.random.default_rng(5)
    F = rng.normal(size=(100, 5))
    y = F @ np.array([1.0, -1.0, 0.5, 0.0, 2.0]) + 0.1 * rng.normal(size=100)
    assert logme(F, y) > logme(rng.normal(size=(100, 5)), y)
