"""Convolutional heads: oracle = unfold the features, sklearn Ridge on the residue of the patches."""

import copy
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import CountingModule
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, KFold, ShuffleSplit
from torch import nn
from torch.nn import functional as F

from skl_transfer import GradientDescentAdapter, LayerVariationalAdapter, LayerVariationalAdapterCV


def _body2d(c_out=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, c_out, 3, padding=1, dtype=torch.float64), nn.Tanh())


def _features(body, X):
    with torch.no_grad():
        return copy.deepcopy(body).eval()(torch.as_tensor(X)).double()


def _oracle(head, Fz, y, alpha, fit_intercept, sample_weight=None):
    """Patches by torch's unfold, then Ridge on the residue rows."""
    conv2d = isinstance(head, nn.Conv2d)
    Fu = Fz if conv2d else Fz.unsqueeze(2)
    as2 = (lambda v, f: tuple(v)) if conv2d else (lambda v, f: (f, *v))
    padding = head.padding
    if padding == "same":  # odd kernels only: symmetric
        padding = tuple(d * (k - 1) // 2 for d, k in zip(head.dilation, head.kernel_size, strict=True))
    P = F.unfold(
        Fu, as2(head.kernel_size, 1), dilation=as2(head.dilation, 1), padding=as2(padding, 0),
        stride=as2(head.stride, 1),
    )  # fmt: skip
    n, D, L = P.shape
    rows = P.transpose(1, 2).reshape(-1, D).numpy()
    c_out = head.out_channels
    T = torch.as_tensor(y).reshape(n, c_out, L).transpose(1, 2).reshape(-1, c_out).numpy()
    W0 = head.weight.detach().double().reshape(c_out, -1).numpy()
    b0 = np.zeros(c_out) if head.bias is None else head.bias.detach().double().numpy()
    sw = None if sample_weight is None else np.repeat(sample_weight, L)
    r = Ridge(alpha=alpha, fit_intercept=fit_intercept).fit(rows, T - rows @ W0.T - b0, sample_weight=sw)
    return W0 + r.coef_, b0 + (r.intercept_ if fit_intercept else 0.0)


@pytest.mark.parametrize(
    "head",
    [
        nn.Conv2d(4, 2, 3, stride=2, padding=1, dtype=torch.float64),
        nn.Conv2d(4, 3, (5, 3), padding=(2, 1), dilation=(1, 2), bias=False, dtype=torch.float64),
        nn.Conv2d(4, 1, 3, padding="same", dtype=torch.float64),
    ],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_conv2d_head_equals_ridge_on_patches(head, weighted):
    body = _body2d()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 1, 9, 9))
    Fz = _features(body, X)
    with torch.no_grad():
        y = (head(Fz) * 1.3 + 0.1 * torch.randn(head(Fz).shape, dtype=torch.float64)).numpy()
    sw = rng.uniform(0.2, 2.0, 40) if weighted else None
    est = LayerVariationalAdapter(body, head, alpha=0.5, batch_size=7).fit(X, y, sample_weight=sw)
    coef, intercept = _oracle(head, Fz, y, 0.5, head.bias is not None, sw)
    assert est.coef_.shape == (head.out_channels, head.in_channels * int(np.prod(head.kernel_size)))
    assert_allclose(est.coef_, coef, rtol=1e-7, atol=1e-9)
    assert_allclose(est.intercept_, intercept, rtol=1e-7, atol=1e-9)
    # predictions: a real convolution with the adapted kernel; the exported module agrees
    pred = est.predict(X)
    assert pred.shape == y.shape
    weight = torch.as_tensor(coef).reshape(head.weight.shape)
    bias = None if head.bias is None else torch.as_tensor(intercept)
    expect = F.conv2d(Fz, weight, bias, stride=head.stride, padding=head.padding, dilation=head.dilation)
    assert_allclose(pred, expect.numpy(), rtol=1e-7, atol=1e-9)
    module = est.to_module()
    assert (
        isinstance(module.head, nn.Conv2d) and module.head.padding == head.padding or head.padding == "same"
    )
    out = module(torch.as_tensor(X)).double().numpy()
    assert_allclose(out, pred, rtol=1e-5, atol=1e-5)
    assert est.residual_norm_ < est.residue_norm_


def test_conv1d_head_and_dual_path():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1, dtype=torch.float64), nn.ReLU())
    head = nn.Conv1d(6, 2, 5, stride=2, dtype=torch.float64)  # D = 30 per row
    rng = np.random.default_rng(1)
    for n, length in [(30, 16), (2, 9)]:  # 30 x 6 rows (primal); 2 x 3 = 6 rows < 30 (dual)
        X = rng.normal(size=(n, 2, length))
        Fz = _features(body, X)
        with torch.no_grad():
            y = rng.normal(size=tuple(head(Fz).shape))
        est = LayerVariationalAdapter(body, head, alpha=0.3).fit(X, y)
        assert est.solver_ == ("primal" if n == 30 else "dual")
        coef, intercept = _oracle(head, Fz, y, 0.3, True)
        assert_allclose(est.coef_, coef, rtol=1e-7, atol=1e-9)
        assert_allclose(est.intercept_, intercept, rtol=1e-7, atol=1e-9)
        assert isinstance(est.to_module().head, nn.Conv1d)


def test_partial_fit_with_conv_head_equals_fit():
    body, head = _body2d(), nn.Conv2d(4, 2, 3, padding=1, dtype=torch.float64)
    X = np.random.default_rng(2).normal(size=(60, 1, 8, 8))
    with torch.no_grad():
        y = head(_features(body, X)).numpy() + 0.1
    full = LayerVariationalAdapter(body, head, alpha=0.1).fit(X, y)
    part = LayerVariationalAdapter(body, head, alpha=0.1)
    for idx in np.array_split(np.arange(60), 5):
        part.partial_fit(X[idx], y[idx])
    assert_allclose(part.coef_, full.coef_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.Conv2d(4, 2, 3, groups=2), "groups=2"),
        (lambda: nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (lambda: nn.Conv2d(4, 2, 2, padding="same"), "even kernel"),
    ],
)
def test_unsupported_conv_heads(make, match):
    X = np.zeros((5, 1, 8, 8))
    with pytest.raises(ValueError, match=match):
        LayerVariationalAdapter(_body2d(), make()).fit(X, np.zeros((5, 2, 8, 8)))


def test_wrong_y_shape_for_conv_head():
    body, head = _body2d(), nn.Conv2d(4, 2, 3, stride=2, dtype=torch.float64)
    X = np.zeros((5, 1, 9, 9))
    with pytest.raises(ValueError, match=r"conv head outputs \(2, 4, 4\)"):
        LayerVariationalAdapter(body, head).fit(X, np.zeros((5, 2, 9, 9)))
    with pytest.raises(ValueError, match="needs y of shape"):
        LayerVariationalAdapter(body, head).fit(X, np.zeros((5, 2)))


def test_patches_are_never_all_materialised():
    # 96 samples of 32 x 33 x 33 features and a 32 -> 1, 5 x 5 head: all patches in float64
    # would take 96 * 1089 * 800 * 8 bytes = 669 MB; the fit must stay far below that.
    code = textwrap.dedent(
        """
        import resource, numpy as np, torch
        from torch import nn
        from skl_transfer import LayerVariationalAdapter
        X = np.random.default_rng(0).normal(size=(96, 32, 33, 33)).astype(np.float32)
        head = nn.Conv2d(32, 1, 5, padding=2, bias=False)
        with torch.no_grad():
            y = head(torch.as_tensor(X)).numpy()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        LayerVariationalAdapter(nn.Identity(), head, alpha=1.0, cache=False, batch_size=32).fit(X, y)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """
    )
    grown_mb = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert grown_mb < 250, grown_mb


# -- conv heads in LayerVariationalAdapterCV and GradientDescentAdapter -------------------------


def _conv_problem(n=30, seed=0):
    rng = np.random.default_rng(seed)
    body = _body2d()
    torch.manual_seed(seed + 1)
    head = nn.Conv2d(4, 2, 3, dtype=torch.float64)
    X = rng.normal(size=(n, 1, 8, 8))
    y = rng.normal(size=(n, 2, 6, 6))
    return body, head, X, y, rng.uniform(0.2, 2.0, size=n)


def _brute_force_mse(body, head, X, y, sw, folds, alpha):
    """Mean over folds of the weighted, flattened held-out MSE of Ridge on patches."""
    Fz = _features(body, X)
    scores = []
    for train, test in folds:
        coef, b = _oracle(head, Fz[train], y[train], alpha, True, sw[train])
        weight = torch.as_tensor(coef).reshape(head.weight.shape)
        pred = F.conv2d(Fz[test], weight, torch.as_tensor(b)).numpy().reshape(len(test), -1)
        err = ((pred - y[test].reshape(len(test), -1)) ** 2).mean(axis=1)
        scores.append(-float(sw[test] @ err / sw[test].sum()))
    return np.mean(scores)


@pytest.mark.parametrize(
    "cv",
    [
        KFold(4, shuffle=True, random_state=0),
        ShuffleSplit(3, test_size=0.2, train_size=0.5, random_state=0),  # train is not the complement
    ],
)
def test_cv_with_conv_head_equals_brute_force_kfold(cv):
    body, head, X, y, sw = _conv_problem()
    alphas = [0.01, 1.0, 100.0]
    est = LayerVariationalAdapterCV(body, head, alphas=alphas, cv=cv, scoring="neg_mean_squared_error")
    est.fit(X, y, sample_weight=sw)
    folds = list(cv.split(X))
    expected = [_brute_force_mse(body, head, X, y, sw, folds, a) for a in alphas]
    assert_allclose(est.cv_results_["mean_test_score"], expected, rtol=1e-8)
    best = alphas[int(np.argmax(expected))]
    assert est.alpha_ == best
    coef, b = _oracle(head, _features(body, X), y, best, True, sw)
    assert_allclose(est.coef_, coef, rtol=1e-7, atol=1e-9)
    assert_allclose(est.intercept_, b, rtol=1e-7, atol=1e-9)
    assert est.predict(X).shape == y.shape


def test_cv_with_conv_head_equals_grid_search_default_scoring():
    body, head, X, y, sw = _conv_problem(seed=3)
    alphas = [0.1, 10.0, 1000.0]
    cv = KFold(3, shuffle=True, random_state=1)
    est = LayerVariationalAdapterCV(body, head, alphas=alphas, cv=cv).fit(X, y)
    grid = GridSearchCV(LayerVariationalAdapter(body, head), {"alpha": alphas}, cv=cv).fit(X, y)
    assert_allclose(est.cv_results_["mean_test_score"], grid.cv_results_["mean_test_score"], rtol=1e-8)
    assert_allclose(est.coef_, grid.best_estimator_.coef_, rtol=1e-8, atol=1e-12)
    again = pickle.loads(pickle.dumps(est))
    assert_array_equal(again.predict(X), est.predict(X))


def test_conv_cv_and_gd_leave_the_users_modules_and_arrays_alone():
    body, head, X, y, sw = _conv_problem(n=12)
    states = [copy.deepcopy(m.state_dict()) for m in (body, head)]
    arrays = [a.copy() for a in (X, y, sw)]
    LayerVariationalAdapterCV(body, head, alphas=[1.0, 10.0], cv=3).fit(X, y, sample_weight=sw)
    GradientDescentAdapter(body, head, epochs=3).fit(X, y, sample_weight=sw)
    for m, state in zip((body, head), states, strict=True):
        assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
        assert all(p.requires_grad for p in m.parameters())
    for a, before in zip((X, y, sw), arrays, strict=True):
        assert_array_equal(a, before)


def test_score_of_a_conv_head_is_r2_of_flattened_outputs():
    body, head, X, y, _ = _conv_problem()
    est = LayerVariationalAdapter(body, head, alpha=1.0).fit(X, y)
    pred = est.predict(X).reshape(len(X), -1)
    assert est.score(X, y) == pytest.approx(r2_score(y.reshape(len(X), -1), pred), rel=1e-12)


def test_leave_one_out_with_a_conv_head_is_refused_before_any_forward_pass():
    body, head, X, y, _ = _conv_problem()
    counting = CountingModule(body)
    with pytest.raises(ValueError, match="cv=5"):
        LayerVariationalAdapterCV(counting, head, alphas=[1.0], cv=None).fit(X, y)
    assert counting.rows_seen == 0


def test_gradient_descent_conv_head_converges_to_the_closed_form():
    body, head, X, y, sw = _conv_problem(n=20)
    alpha = 0.5
    gd = GradientDescentAdapter(
        body, head, lr=1e-2, epochs=1500, weight_decay=alpha / sw.sum(), random_state=0
    ).fit(X, y, sample_weight=sw)
    coef, b = _oracle(head, _features(body, X), y, alpha, True, sw)
    assert_allclose(gd.coef_, coef, atol=1e-4)
    assert_allclose(gd.intercept_, b, atol=1e-4)
    assert gd.predict(X).shape == y.shape
    assert isinstance(gd.to_module().head, nn.Conv2d)
    assert gd.residual_norm_ < gd.residue_norm_
