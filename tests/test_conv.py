"""Convolutional heads: oracle = unfold the features, sklearn Ridge on the residue of the patches."""

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.linear_model import Ridge
from torch import nn
from torch.nn import functional as F

from skl_transfer import LayerVariationalAdapter


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
