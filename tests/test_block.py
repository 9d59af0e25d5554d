"""Block heads (the last L layers) by variable projection, against independent oracles:
scipy's least_squares on the projected problem, torch autograd for stationarity, today's
one-layer fit, and the three forms of the step's system against each other."""

import copy
import pickle

import numpy as np
import pytest
import torch
from conftest import CountingModule
from numpy.testing import assert_allclose
from scipy.optimize import least_squares
from sklearn.model_selection import GridSearchCV
from torch import nn

from skl_transfer import (
    GradientDescentAdapter,
    LayerVariationalAdapter,
    LayerVariationalAdapterCV,
    LayerVariationalClassifier,
    LayerVariationalClassifierCV,
    _block,
    _solvers,
)


def _problem(bias=True, n=150, d=3, m=4, k=2, seed=0, scale=0.1):
    """Features, a pretrained Tanh block, targets from a perturbed copy of it, weights."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d))
    block = nn.Sequential(nn.Linear(d, m, bias=bias), nn.Tanh(), nn.Linear(m, k, bias=bias)).double()
    teacher = copy.deepcopy(block)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(scale * torch.randn_like(p))
        Y = teacher(torch.from_numpy(Z)).numpy() + 0.05 * rng.normal(size=(n, k))
    return Z, block, Y, rng.uniform(0.5, 2.0, n)


def _projected_residual(block, Z, Y, s, alpha, alpha_body, bias):
    """The oracle's residual of the projected problem: the earlier layer's parameters are the
    unknowns; the last layer is the ridge solution (toward its pretrained weights, intercept
    unpenalised) of the normal equations written out here in numpy."""
    W1_0, b1_0 = to64(block[0].weight), (to64(block[0].bias) if bias else None)
    W2_0, b2_0 = to64(block[2].weight), (to64(block[2].bias) if bias else None)
    m, d = W1_0.shape
    theta0 = np.concatenate([W1_0.ravel(), b1_0]) if bias else W1_0.ravel()

    def residual(theta):
        W1 = theta[: m * d].reshape(m, d)
        H = np.tanh(Z @ W1.T + (theta[m * d :] if bias else 0.0))
        Ht = np.hstack([H, np.ones((len(H), 1))]) if bias else H
        E = np.eye(Ht.shape[1])
        if bias:
            E[-1, -1] = 0.0  # the intercept is not penalised
        prior = np.hstack([W2_0, b2_0[:, None]]) if bias else W2_0
        Wt = np.linalg.solve(
            Ht.T @ (s[:, None] * Ht) + alpha * E, Ht.T @ (s[:, None] * Y) + alpha * E @ prior.T
        )
        R = np.sqrt(s)[:, None] * (Ht @ Wt - Y)
        penalty = np.sqrt(alpha) * (Wt[:m] - W2_0.T)
        return np.concatenate([R.ravel(), penalty.ravel(), np.sqrt(alpha_body) * (theta - theta0)])

    return residual, theta0


def to64(t):
    return t.detach().double().numpy().copy()


def _full_objective_grad(est, Z, Y, s, block0, alpha, alpha_body):
    """Gradient (torch autograd) of the full objective with respect to every parameter of a
    block, at the fitted block and at the pretrained one."""

    def grad(net):
        net = copy.deepcopy(net).double().requires_grad_(True)
        out = net(torch.from_numpy(Z))
        F = (torch.from_numpy(s) * ((out - torch.from_numpy(Y)) ** 2).sum(1)).sum()
        F = F + alpha * ((net[-1].weight - block0[-1].weight.double()) ** 2).sum()
        for new, old in zip(net[:-1].parameters(), block0[:-1].parameters(), strict=True):
            F = F + alpha_body * ((new - old.double()) ** 2).sum()
        return np.concatenate(
            [p.ravel().detach().numpy() for p in torch.autograd.grad(F, list(net.parameters()))]
        )

    return grad(est.to_module().head), grad(block0)


@pytest.mark.parametrize("bias", [True, False])
def test_matches_least_squares_on_the_projected_problem(bias):
    Z, block, Y, s = _problem(bias)
    alpha, alpha_body = 0.1, 0.1
    before = copy.deepcopy(block.state_dict())
    est = LayerVariationalAdapter(None, block, alpha=alpha, alpha_body=alpha_body, max_iter=300, tol=1e-15)
    est.fit(Z, Y, sample_weight=s)
    residual, theta0 = _projected_residual(block, Z, Y, s, alpha, alpha_body, bias)
    ref = least_squares(residual, theta0, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
    assert_allclose(est.loss_curve_[-1], (ref.fun**2).sum(), rtol=1e-6)
    assert_allclose(est.loss_curve_[0], (residual(theta0) ** 2).sum(), rtol=1e-12)  # same objective
    assert np.all(np.diff(est.loss_curve_) <= 0)
    g_fit, g0 = _full_objective_grad(est, Z, Y, s, block, alpha, alpha_body)
    assert np.abs(g_fit).max() < 1e-6 * np.abs(g0).max()  # stationary in every parameter
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())  # untouched


@pytest.mark.parametrize("bias", [True, False])
def test_without_alpha_body_a_local_optimum_from_the_pretrained_point(bias):
    # several local minima: the one reached is stationary, and least_squares started there
    # finds nothing lower nearby (started from the pretrained point it can take another path)
    Z, block, Y, s = _problem(bias, seed=1)
    est = LayerVariationalAdapter(None, block, alpha=0.1, max_iter=500, tol=1e-15).fit(Z, Y, sample_weight=s)
    assert np.all(np.diff(est.loss_curve_) <= 0) and est.loss_curve_[-1] < est.loss_curve_[0]
    g_fit, g0 = _full_objective_grad(est, Z, Y, s, block, 0.1, 0.0)
    assert np.abs(g_fit).max() < 1e-5 * np.abs(g0).max()
    residual, _ = _projected_residual(block, Z, Y, s, 0.1, 0.0, bias)
    theta = np.concatenate(
        [to64(est.to_module().head[0].weight).ravel()]
        + ([to64(est.to_module().head[0].bias)] if bias else [])
    )
    ref = least_squares(residual, theta, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
    assert (ref.fun**2).sum() > est.loss_curve_[-1] * (1 - 1e-6)


def test_one_layer_block_is_todays_fit():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 8), nn.ReLU()).double()
    head = nn.Linear(8, 2).double()
    X, Y = rng.normal(size=(120, 5)), rng.normal(size=(120, 2))
    s = rng.uniform(0.5, 2, 120)
    for alpha in (0.0, 0.3):
        a = LayerVariationalAdapter(body, nn.Sequential(head), alpha=alpha).fit(X, Y, sample_weight=s)
        b = LayerVariationalAdapter(body, head, alpha=alpha).fit(X, Y, sample_weight=s)
        assert_allclose(a.coef_, b.coef_, rtol=1e-12, atol=1e-12)
        assert_allclose(a.intercept_, b.intercept_, rtol=1e-12, atol=1e-12)
        assert_allclose(a.predict(X), b.predict(X), rtol=1e-12, atol=1e-12)
        assert a.n_iter_ == b.n_iter_ == 1 and len(a.loss_curve_) == 1
    y = rng.integers(0, 2, 120)
    a = LayerVariationalClassifier(body, nn.Sequential(head)).fit(X, y)
    b = LayerVariationalClassifier(body, head).fit(X, y)
    assert_allclose(a.coef_, b.coef_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["ridge", "rank-deficient"])
def test_primal_dual_and_cg_steps_are_the_same(case):
    """The three forms of the step's system give the same iterates: with alpha > 0, an intercept
    and k = 2; and with alpha = 0, no intercept, k = 1 and a dead ReLU unit (features of
    deficient rank, so that the projection is an exact projector with a null direction)."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    k = 2 if case == "ridge" else 1
    Z, Y, s = rng.normal(size=(40, 3)), rng.normal(size=(40, k)), rng.uniform(0.5, 2, 40)
    act = nn.GELU() if case == "ridge" else nn.ReLU()
    block = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), act, nn.Linear(4, k)).double()
    alpha, alpha_body, intercept = (0.1, 0.05, True) if case == "ridge" else (0.0, 0.0, False)
    if case == "rank-deficient":
        with torch.no_grad():
            block[2].bias[0] = -100.0  # the first unit of the last hidden layer is always 0
    parsed = _block.parse_block(block)
    fits = {
        f: _block.fit_block(parsed, Z, Y, s, alpha, alpha_body, intercept, 6, 0.0, form=f)
        for f in ("primal", "dual", "cg")
    }
    for form in ("dual", "cg"):
        assert fits[form].solver == form and fits[form].n_iter == 6
        assert_allclose(fits[form].loss_curve, fits["primal"].loss_curve, rtol=1e-10)
        assert_allclose(fits[form].block.body_params(), fits["primal"].block.body_params(), atol=1e-8)
    assert np.all(np.diff(fits["primal"].loss_curve) < 0)


def test_export_pickle_and_search_with_cached_features():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    body = CountingModule(nn.Sequential(nn.Linear(5, 8), nn.ReLU()))
    block = nn.Sequential(nn.Linear(8, 6), nn.LeakyReLU(0.1), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 2))
    X, Y = rng.normal(size=(90, 5)).astype(np.float32), rng.normal(size=(90, 2))
    est = LayerVariationalAdapter(body, block, alpha=0.1, max_iter=5, cache=True).fit(X, Y)
    net = est.to_module()
    assert isinstance(net.head, nn.Sequential) and net.head[0].weight.dtype == torch.float32
    with torch.no_grad():
        out = net(torch.from_numpy(X)).double().numpy()
    assert_allclose(out, est.predict(X), rtol=1e-5, atol=1e-5)  # a float32 block
    again = pickle.loads(pickle.dumps(est))
    assert_allclose(again.predict(X), est.predict(X), rtol=1e-12)
    seen = body.rows_seen
    grid = {"alpha": [0.01, 0.1], "alpha_body": [0.0, 1.0], "max_iter": [2, 4]}
    search = GridSearchCV(LayerVariationalAdapter(body, block, cache=True), grid, cv=3).fit(X, Y)
    assert body.rows_seen == seen  # every row's features came from the cache
    assert search.best_estimator_.n_iter_ <= search.best_params_["max_iter"]


def test_classifier_with_a_block_fits_the_target_logits():
    # oracle: the adapter on the classifier's target logits, written out from the pretrained
    # block's logits (encoding "onehot", a fixed margin)
    rng = np.random.default_rng(2)
    torch.manual_seed(2)
    block = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    Z, y = rng.normal(size=(100, 4)), rng.integers(0, 3, 100)
    with torch.no_grad():
        L0 = block(torch.from_numpy(Z)).numpy()
    T = L0.mean(axis=1, keepdims=True) + 3.0 * (np.eye(3)[y] - 1 / 3)
    kw = dict(alpha=0.5, alpha_body=0.2, max_iter=8, tol=0.0)
    clf = LayerVariationalClassifier(None, block, margin=3.0, **kw).fit(Z, y)
    reg = LayerVariationalAdapter(None, block, **kw).fit(Z, T)
    assert_allclose(clf.coef_, reg.coef_, rtol=1e-9, atol=1e-10)
    assert_allclose(clf.loss_curve_, reg.loss_curve_, rtol=1e-10)
    assert_allclose(clf.decision_function(Z), reg.predict(Z), rtol=1e-9, atol=1e-9)


def test_refusals_name_the_fix():
    rng = np.random.default_rng(0)
    Z, Y = rng.normal(size=(30, 4)), rng.normal(size=(30, 2))
    block = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    with pytest.raises(TypeError, match="must end in a torch.nn.Linear"):
        LayerVariationalAdapter(None, nn.Sequential(nn.Linear(4, 2), nn.ReLU())).fit(Z, Y)
    with pytest.raises(ValueError, match="do not act elementwise"):
        LayerVariationalAdapter(None, nn.Sequential(nn.Linear(4, 5), nn.Softmax(dim=1), nn.Linear(5, 2))).fit(
            Z, Y
        )
    with pytest.raises(TypeError, match="BatchNorm1d.*Keep other layers in the extractor"):
        LayerVariationalAdapter(None, nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))).fit(
            Z, Y
        )
    for est in (LayerVariationalAdapterCV(None, block), GradientDescentAdapter(None, block)):
        with pytest.raises(TypeError, match="GridSearchCV"):
            est.fit(Z, Y)
    with pytest.raises(TypeError, match="GridSearchCV"):
        LayerVariationalClassifierCV(None, block).fit(Z, rng.integers(0, 2, 30))
    with pytest.raises(ValueError, match="loss='squared'"):
        LayerVariationalClassifier(None, block, loss="log").fit(Z, rng.integers(0, 2, 30))
    fitted = LayerVariationalAdapter(None, block, max_iter=1).fit(Z, Y)
    with pytest.raises(AttributeError, match="loss_curve_"):
        _ = fitted.diagnostics_
    with pytest.raises(ValueError, match="call fit on all batches"):
        LayerVariationalAdapter(None, block).partial_fit(Z, Y)
    with pytest.raises(ValueError, match="outputs 5"):
        LayerVariationalAdapter(None, nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(6, 2))).fit(Z, Y)
    with pytest.raises(ValueError, match="input features"):
        LayerVariationalAdapter(None, block).fit(rng.normal(size=(30, 3)), Y)


def test_warm_start_continues_the_path():
    """max_iter=3 then, warm, max_iter=4 more ends where one fit with max_iter=7 ends (the same
    iterates: loss curves to 1e-12); a cold refit starts again; another block shape is refused."""
    Z, block, Y, s = _problem(True, seed=2)
    straight = LayerVariationalAdapter(None, block, alpha=0.1, max_iter=7, tol=0.0).fit(Z, Y, sample_weight=s)
    assert straight.n_iter_ == 7
    est = LayerVariationalAdapter(None, block, alpha=0.1, max_iter=3, tol=0.0, warm_start=True)
    est.fit(Z, Y, sample_weight=s)
    first = est.loss_curve_
    est.set_params(max_iter=4).fit(Z, Y, sample_weight=s)
    assert est.n_iter_ == 4
    assert_allclose(np.r_[first, est.loss_curve_[1:]], straight.loss_curve_, rtol=1e-12)
    assert_allclose(est.coef_, straight.coef_, rtol=1e-10, atol=1e-12)
    assert_allclose(est.predict(Z), straight.predict(Z), rtol=1e-10, atol=1e-12)
    cold = LayerVariationalAdapter(None, block, alpha=0.1, max_iter=3, tol=0.0).fit(Z, Y, sample_weight=s)
    cold.set_params(max_iter=4).fit(Z, Y, sample_weight=s)  # warm_start=False: from the pretrained block
    assert_allclose(cold.loss_curve_[0], straight.loss_curve_[0], rtol=1e-12)
    wider = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    with pytest.raises(ValueError, match="warm_start=False"):
        est.set_params(head=wider).fit(Z, Y)


@pytest.mark.parametrize("shape", [(40, 8, 3), (6, 10, 6)])
def test_row_space_reduction_gives_the_same_iterates(shape):
    """Features of rank rho < d (low rank; fewer samples than features): the steps on W_1 V give
    the full parametrisation's iterates, from the pretrained block, from a warm start inside the
    row space, and (alpha_body = 0: nothing moves it) from one with a part outside."""
    n, d, rank = shape
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    Z = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))
    Y, s = rng.normal(size=(n, 2)), rng.uniform(0.5, 2, n)
    block = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 2)).double()
    parsed = _block.parse_block(block)
    assert _block.row_space(Z).shape == (d, rank)
    theta = parsed.body_params()
    inside = _block.fit_block(parsed, Z, Y, s, 0.1, 0.05, True, 2, 0.0, reduce=False)
    outside = theta + 0.1 * rng.normal(size=theta.size)
    runs = [(None, 0.05), ((inside.block.body_params(), inside.damping), 0.05), ((outside, (0.5, 2.0)), 0.0)]
    for start, alpha_body in runs:
        a, b = (
            _block.fit_block(parsed, Z, Y, s, 0.1, alpha_body, True, 5, 0.0, start=start, reduce=r)
            for r in (True, False)
        )
        assert a.n_iter == b.n_iter == 5
        assert_allclose(a.loss_curve, b.loss_curve, rtol=1e-10)
        assert_allclose(a.block.body_params(), b.block.body_params(), atol=1e-8)
        assert_allclose(a.solution.dWt, b.solution.dWt, atol=1e-8)


def test_one_blas_thread_contexts_of_several_threads_restore_the_limit():
    """Contexts entered A, B and left A, B (two threads' steps overlapping) restore BLAS's
    thread count once both have left, and hold it at one while either is inside."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})

    before = blas_threads()
    a, b = _solvers.one_blas_thread(), _solvers.one_blas_thread()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert blas_threads() == [1]
    b.__exit__(None, None, None)
    assert blas_threads() == before
