"""``head=None`` is Ridge: scale invariance, accuracy beyond scaling, Ridge's output
conventions, overflowing weights and the degrees of freedom (issue 12, items 12, 15, 17, 19, 20).

Oracles: ``sklearn.linear_model.Ridge``, numpy's ``lstsq``/``pinv``, and the exact ridge solution
computed in 100-digit arithmetic (mpmath) from the float64 data; never a value of this library.
"""

import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.linear_model import Ridge

from skl_transfer import LayerVariationalAdapter, LayerVariationalAdapterCV, _solvers

mpmath = pytest.importorskip("mpmath")


def exact_ridge(X, y, alpha, fit_intercept=True, sample_weight=None, dps=100):
    """The ridge solution of the float64 data, in ``dps``-digit arithmetic: ``(coef, intercept)``
    with coef (d,) for 1-D y, else (k, d)."""
    with mpmath.workdps(dps):
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        n, d = X.shape
        Y = y.reshape(n, -1)
        k = Y.shape[1]
        s = [mpmath.mpf(float(v)) for v in (np.ones(n) if sample_weight is None else sample_weight)]
        Xm = [[mpmath.mpf(float(v)) for v in row] for row in X]
        Ym = [[mpmath.mpf(float(v)) for v in row] for row in Y]
        S = mpmath.fsum(s)
        zero = mpmath.mpf(0)
        mx = [mpmath.fsum(s[i] * Xm[i][j] for i in range(n)) / S if fit_intercept else zero for j in range(d)]
        my = [mpmath.fsum(s[i] * Ym[i][j] for i in range(n)) / S if fit_intercept else zero for j in range(k)]
        Xc = [[Xm[i][j] - mx[j] for j in range(d)] for i in range(n)]
        Yc = [[Ym[i][j] - my[j] for j in range(k)] for i in range(n)]
        G = mpmath.matrix(d, d)
        B = mpmath.matrix(d, k)
        for a in range(d):
            for b in range(a, d):
                G[a, b] = G[b, a] = mpmath.fsum(s[i] * Xc[i][a] * Xc[i][b] for i in range(n))
            G[a, a] += mpmath.mpf(float(alpha))
            for j in range(k):
                B[a, j] = mpmath.fsum(s[i] * Xc[i][a] * Yc[i][j] for i in range(n))
        W = mpmath.lu_solve(G, B)
        coef = np.array([[float(W[a, j]) for a in range(d)] for j in range(k)])
        intercept = np.array(
            [float(my[j] - mpmath.fsum(mx[a] * W[a, j] for a in range(d))) for j in range(k)]
        )
    return (coef[0], intercept[0]) if y.ndim == 1 else (coef, intercept)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _scaled_data(n=200, d=8, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.logspace(-8, 8, d)
    X = rng.normal(size=(n, d)) * scale
    y = X @ (rng.normal(size=d) / scale) + rng.normal(size=n)
    return X, y


# -- item 12: scale invariance ---------------------------------------------------------


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("alpha", [1e-10, 1e-6, 1e-3, 1.0, 1e3])
def test_columns_scaled_1e_8_to_1e8_equal_ridge(alpha, fit_intercept):
    X, y = _scaled_data()
    est = LayerVariationalAdapter(None, None, alpha=alpha, fit_intercept=fit_intercept).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ridge's cholesky warns about the raw Gram's rcond
        ridge = Ridge(alpha=alpha, fit_intercept=fit_intercept, solver="cholesky").fit(X, y)
    assert rel(est.coef_, ridge.coef_) < 1e-6
    assert est.intercept_ == pytest.approx(ridge.intercept_, rel=1e-6, abs=1e-9)
    assert est.score(X, y) == pytest.approx(ridge.score(X, y), abs=1e-9)


@pytest.mark.parametrize("alpha", [1e-3, 1.0])
def test_scaled_columns_against_exact_arithmetic(alpha):
    X, y = _scaled_data(n=60, d=6, seed=1)
    coef, intercept = exact_ridge(X, y, alpha)
    est = LayerVariationalAdapter(None, None, alpha=alpha).fit(X, y)
    assert rel(est.coef_, coef) < 1e-10
    assert est.intercept_ == pytest.approx(intercept, rel=1e-10)


def test_scaled_columns_partial_fit_streams_the_same_solution():
    """The streamed moments path (no data kept) is scale-invariant too."""
    X, y = _scaled_data()
    est = LayerVariationalAdapter(None, None, alpha=1e-3)
    for i in range(0, 200, 50):
        est.partial_fit(X[i : i + 50], y[i : i + 50])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ridge = Ridge(alpha=1e-3, solver="cholesky").fit(X, y)
    assert rel(est.coef_, ridge.coef_) < 1e-6


@pytest.mark.parametrize("cv", [None, 4])
def test_scaled_columns_cv_paths_equal_ridge_brute_force(cv):
    """The alpha paths (leave-one-out, K-fold) stay equal to fold-by-fold Ridge fits."""
    from sklearn.model_selection import KFold, LeaveOneOut

    X, y = _scaled_data(n=40, d=6, seed=2)
    alphas = [1e-3, 1.0, 100.0]
    est = LayerVariationalAdapterCV(None, None, alphas=alphas, cv=cv).fit(X, y)
    splitter = LeaveOneOut() if cv is None else KFold(cv)
    expected = []
    for alpha in alphas:
        scores = []
        for train, test in splitter.split(X):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ridge = Ridge(alpha=alpha, solver="cholesky").fit(X[train], y[train])
            pred = ridge.predict(X[test])
            scores.append(-np.mean((y[test] - pred) ** 2) if cv is None else ridge.score(X[test], y[test]))
        expected.append(np.mean(scores))
    assert_allclose(est.cv_results_["mean_test_score"], expected, rtol=1e-6)


def test_zero_variance_and_constant_columns_get_zero_coefficients():
    """Equilibration must not blow up a column whose centred variance is rounding noise."""
    X, y = _scaled_data(n=50, d=5, seed=3)
    X = np.hstack([X, np.full((50, 1), 1e8 + 0.1), np.zeros((50, 1))])
    est = LayerVariationalAdapter(None, None, alpha=1e-3).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ridge = Ridge(alpha=1e-3, solver="cholesky").fit(X[:, :5], y)
    assert_allclose(est.coef_[5:], 0.0, atol=1e-20)
    assert rel(est.coef_[:5], ridge.coef_) < 1e-6


@pytest.mark.parametrize("n", [30, 4])  # primal and dual
def test_alpha_zero_is_min_norm_in_original_units_for_collinear_columns_of_any_scale(n):
    """At alpha = 0 rank-deficient features give pinv(Z) Q (the original units' minimum norm),
    also when the collinear columns have very different scales (equilibration is a change of
    variables only)."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=(n, 3))
    Z = np.hstack([base, 1e6 * base[:, :1], 1e-4 * base[:, 1:2] - base[:, 2:3]])
    y = rng.normal(size=n)
    est = LayerVariationalAdapter(None, None, alpha=0.0, fit_intercept=False).fit(Z, y)
    expected = np.linalg.pinv(Z) @ y
    assert rel(est.coef_, expected) < 1e-7


# -- item 20: accuracy beyond scaling ------------------------------------------------------


def _base(n, d, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, X @ rng.normal(size=d) + 0.1 * rng.normal(size=n)


@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
@pytest.mark.parametrize("shape", [(60, 6), (10, 30)], ids=["primal", "dual"])
def test_offset_features_without_intercept_match_exact_ridge(offset, shape):
    X, y = _base(*shape, seed=5)
    X = X + offset
    for alpha in [1e-6, 1e-2, 1.0]:
        coef, _ = exact_ridge(X, y, alpha, fit_intercept=False)
        assert rel(Ridge(alpha=alpha, fit_intercept=False, solver="svd").fit(X, y).coef_, coef) < 1e-8
        est = LayerVariationalAdapter(None, None, alpha=alpha, fit_intercept=False).fit(X, y)
        assert rel(est.coef_, coef) < 1e-8, alpha


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_weights_spanning_1e_6_to_1e6_match_exact_ridge(fit_intercept):
    X, y = _base(40, 6, seed=6)
    sw = np.full(40, 1e-6)
    sw[:3] = 1e6  # three heavy samples: the Gram matrix has condition ~1e12
    for alpha in [1e-6, 1e-3]:
        coef, intercept = exact_ridge(X, y, alpha, fit_intercept, sw)
        ridge = Ridge(alpha=alpha, fit_intercept=fit_intercept, solver="svd").fit(X, y, sample_weight=sw)
        assert rel(ridge.coef_, coef) < 1e-8
        est = LayerVariationalAdapter(None, None, alpha=alpha, fit_intercept=fit_intercept)
        est.fit(X, y, sample_weight=sw)
        assert rel(est.coef_, coef) < 1e-8, alpha
        assert est.intercept_ == pytest.approx(intercept, rel=1e-8, abs=1e-12)


def test_dual_weights_spanning_1e_6_to_1e6_match_exact_ridge():
    X, y = _base(10, 30, seed=7)
    sw = np.logspace(-6, 6, 10)
    for alpha in [1e-6, 1e-3]:
        coef, _ = exact_ridge(X, y, alpha, True, sw)
        est = LayerVariationalAdapter(None, None, alpha=alpha).fit(X, y, sample_weight=sw)
        assert est.solver_ == "dual"
        assert rel(est.coef_, coef) < 1e-8


class _Shift(torch.nn.Module):
    """A float64 extractor whose features are the inputs plus a large offset."""

    def forward(self, x):
        return x + 1e5


def test_in_memory_extractor_fit_is_solved_from_the_features():
    X, y = _base(60, 6, seed=8)
    Xt = torch.as_tensor(X)
    coef, _ = exact_ridge(X + 1e5, y, 1e-3, fit_intercept=False)
    est = LayerVariationalAdapter(_Shift(), (np.zeros(6), None), alpha=1e-3, cache=False).fit(Xt, y)
    assert est.solver_ == "primal"
    assert rel(est.coef_, coef) < 1e-8


def test_well_conditioned_fits_do_not_touch_the_data(monkeypatch):
    """The data path costs a QR of the design: only ill-conditioned problems pay it."""
    calls = []
    real = _solvers.ridge_from_data
    monkeypatch.setattr(_solvers, "ridge_from_data", lambda *a, **k: calls.append(1) or real(*a, **k))
    X, y = _base(200, 20, seed=9)
    LayerVariationalAdapter(None, None, alpha=1.0).fit(X, y)
    LayerVariationalAdapter(None, None, alpha=0.0).fit(X, y)
    LayerVariationalAdapter(None, None, alpha=1e-3).fit(*_scaled_data())  # equilibration suffices
    assert calls == []
    LayerVariationalAdapter(None, None, alpha=1e-3, fit_intercept=False).fit(X + 1e6, y)
    assert calls == [1]


# -- item 15: weights whose sum overflows -------------------------------------------------------


def test_weights_whose_sum_overflows_are_refused():
    X, y = _base(20, 3, seed=10)
    with pytest.raises(ValueError, match="sample_weight sums to more than the largest float64.*Divide"):
        LayerVariationalAdapter(None, None).fit(X, y, sample_weight=np.full(20, 1e308))
    with pytest.raises(ValueError, match="sample_weight sums to more than the largest float64"):
        LayerVariationalAdapter(None, None).partial_fit(X, y, sample_weight=np.full(20, 1e308))


def test_moments_that_overflow_are_refused():
    X, y = _base(20, 3, seed=11)
    with pytest.raises(ValueError, match="moments of the features overflowed"):
        LayerVariationalAdapter(None, None).fit(X * 1e160, y, sample_weight=np.full(20, 1e10))


def test_weights_scaled_with_alpha_change_nothing():
    """The exact rescaling the error message suggests."""
    X, y = _base(30, 4, seed=12)
    sw = np.random.default_rng(0).uniform(0.5, 2.0, size=30)
    a = LayerVariationalAdapter(None, None, alpha=2.0).fit(X, y, sample_weight=sw * 1e300)
    b = LayerVariationalAdapter(None, None, alpha=2.0 / 1e300).fit(X, y, sample_weight=sw)
    assert_allclose(a.coef_, b.coef_, rtol=1e-12)


# -- item 17: diagnostics_.dof is the trace of the hat matrix ------------------------------------


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("shape", [(40, 5), (6, 12)], ids=["primal", "dual"])
def test_dof_is_the_trace_of_the_hat_matrix(fit_intercept, shape):
    X, y = _base(*shape, seed=13)
    sw = np.random.default_rng(1).uniform(0.2, 3.0, size=shape[0])
    alpha = 0.7
    est = LayerVariationalAdapter(None, None, alpha=alpha, fit_intercept=fit_intercept)
    est.fit(X, y, sample_weight=sw)
    # y_hat = H y with H = X_a (X_a^T W X_a + alpha P)^{-1} X_a^T W, X_a = [X, 1] (with an intercept)
    Xa = np.hstack([X, np.ones((len(X), 1))]) if fit_intercept else X
    P = np.eye(Xa.shape[1])
    if fit_intercept:
        P[-1, -1] = 0.0
    H = Xa @ np.linalg.solve(Xa.T @ (sw[:, None] * Xa) + alpha * P, Xa.T * sw)
    assert_allclose(H @ y, est.predict(X), rtol=1e-9)  # it is this fit's hat matrix
    assert est.diagnostics_.dof == pytest.approx(np.trace(H), rel=1e-10)


# -- item 19: Ridge's output conventions -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("y_shape", ["1d", "n1", "n3"])
@pytest.mark.parametrize("Est", [LayerVariationalAdapter, LayerVariationalAdapterCV])
def test_head_none_follows_ridge_output_conventions(Est, y_shape, fit_intercept, dtype):
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(14)
    X = rng.normal(size=(25, 4))
    Y = {"1d": rng.normal(size=25), "n1": rng.normal(size=(25, 1)), "n3": rng.normal(size=(25, 3))}[y_shape]
    X = X.astype(dtype)
    if Est is LayerVariationalAdapter:
        ridge = Ridge(alpha=1.0, fit_intercept=fit_intercept).fit(X, Y)
        est = Est(None, None, alpha=1.0, fit_intercept=fit_intercept).fit(X, Y)
    else:
        ridge = RidgeCV(alphas=(0.1, 1.0, 10.0), fit_intercept=fit_intercept).fit(X, Y)
        est = Est(None, None, alphas=(0.1, 1.0, 10.0), fit_intercept=fit_intercept).fit(X, Y)
    assert est.coef_.shape == ridge.coef_.shape
    assert est.coef_.dtype == ridge.coef_.dtype
    assert type(est.intercept_) is type(ridge.intercept_)
    assert np.shape(est.intercept_) == np.shape(ridge.intercept_)
    assert np.asarray(est.intercept_).dtype == np.asarray(ridge.intercept_).dtype
    tol = 1e-5 if dtype == np.float32 else 1e-10
    assert_allclose(est.coef_, ridge.coef_, rtol=tol, atol=tol)
    assert_allclose(est.intercept_, ridge.intercept_, rtol=tol, atol=tol)
    for Xp in (X, X.astype(np.float64), X.astype(np.float32)):
        pred, expected = est.predict(Xp), ridge.predict(Xp)
        assert pred.shape == expected.shape and pred.dtype == expected.dtype
        assert_allclose(pred, expected, rtol=tol, atol=tol)
    assert est.score(X, Y) == pytest.approx(ridge.score(X, Y), rel=tol)


@pytest.mark.parametrize("sw", [np.ones((20, 1)), np.ones((1, 20))])
def test_2d_sample_weights_get_sklearns_message(sw):
    X, y = _base(20, 3, seed=15)
    with pytest.raises(ValueError, match="Sample weights must be 1D array or scalar"):
        LayerVariationalAdapter(None, None).fit(X, y, sample_weight=sw)


def test_other_heads_keep_float64_and_the_heads_output_shapes():
    """With a head or an extractor the outputs are the head's: float64, (k, d) coef_ for 2-D y
    (k = 1 included) and predictions (n, k); 1-D y gives (d,) and (n,), intercept_ a float."""
    rng = np.random.default_rng(16)
    X = rng.normal(size=(25, 4)).astype(np.float32)
    y = rng.normal(size=(25, 1))
    est = LayerVariationalAdapter(None, (np.zeros((1, 4)), np.zeros(1))).fit(X, y)
    assert est.coef_.shape == (1, 4) and est.coef_.dtype == np.float64
    assert est.intercept_.shape == (1,) and est.predict(X).shape == (25, 1)
    assert est.predict(X).dtype == np.float64
    est = LayerVariationalAdapter(torch.nn.Identity(), None, cache=False).fit(torch.as_tensor(X), y[:, 0])
    assert est.coef_.shape == (4,) and est.coef_.dtype == np.float64
    assert type(est.intercept_) is float and est.predict(torch.as_tensor(X)).dtype == np.float64


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("alpha", [1e-6, 1.0])
def test_fewer_rows_than_scaled_columns_against_exact_arithmetic(alpha, weighted):
    # n < d (the dual form) with an intercept: centring leaves the rows one exact null
    # direction, which is no rank deficiency; columns on scales 1e-5 to 1e5 leave the kernel
    # ill-conditioned although the ridge problem is not (the solve from the rows was refused
    # and the thresholded kernel eigendecomposition was 4e-3 off at alpha = 1)
    rng = np.random.default_rng(2)
    n, d = 16, 24
    X = rng.normal(size=(n, d)) * 10 ** rng.uniform(-5, 5, size=d)
    y = X @ rng.normal(size=d) + rng.normal(size=n)
    sw = rng.uniform(0.2, 3.0, n) if weighted else None
    coef, intercept = exact_ridge(X, y, alpha, sample_weight=sw)
    est = LayerVariationalAdapter(None, None, alpha=alpha).fit(X, y, sample_weight=sw)
    assert rel(est.coef_, coef) < 1e-8
    assert est.intercept_ == pytest.approx(intercept, rel=1e-8)
