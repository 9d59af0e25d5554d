"""LayerVariationalAdapter against independent oracles: sklearn Ridge on the residue, numpy pinv."""

import copy
import pickle

import joblib
import numpy as np
import pytest
import torch
from conftest import CountingModule, head_arrays, make_body, make_head, reference_features
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Ridge
from torch import nn

from skl_transfer import LayerVariationalAdapter


def _target(n, n_in=5, k=1, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in))
    y = np.sin(X @ rng.normal(size=(n_in, k))) + 0.1 * rng.normal(size=(n, k))
    return X, (y[:, 0] if k == 1 else y)


# -- oracle: Ridge fitted on the transferal residue ----------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [200, 9])  # primal (n >= d = 16) and dual (n < d)
def test_equals_ridge_on_residue(n, weighted, bias, k):
    body, head = make_body(), make_head(n_out=k, bias=bias)
    X, y = _target(n, k=k)
    sw = np.random.default_rng(1).uniform(0.1, 2.0, n) if weighted else None
    alpha = 0.7
    est = LayerVariationalAdapter(body, head, alpha=alpha, batch_size=32).fit(X, y, sample_weight=sw)
    assert est.solver_ == ("primal" if n >= 16 else "dual")
    assert est.fit_intercept_ is bias

    Z = reference_features(body, X)
    W0, b0 = head_arrays(head)
    Q = y.reshape(n, -1) - Z @ W0.T - (0 if b0 is None else b0)
    ridge = Ridge(alpha=alpha, fit_intercept=bias).fit(Z, Q if k > 1 else Q[:, 0], sample_weight=sw)
    W0_shaped = W0 if k > 1 else W0[0]
    assert est.coef_.shape == W0_shaped.shape
    assert_allclose(est.delta_coef_, ridge.coef_, rtol=1e-8, atol=1e-10)
    assert_allclose(est.coef_, W0_shaped + ridge.coef_, rtol=1e-8, atol=1e-10)
    if bias:
        b0_shaped = b0 if k > 1 else b0[0]
        assert_allclose(est.intercept_, b0_shaped + ridge.intercept_, rtol=1e-8, atol=1e-10)
    else:
        assert_allclose(est.intercept_, 0.0)
    pred = est.predict(X)
    assert pred.shape == y.shape
    assert_allclose(pred, Z @ est.coef_.T + est.intercept_, rtol=1e-10, atol=1e-10)

    # diagnostics: the weighted residue norms, computed directly
    s = np.ones(n) if sw is None else sw
    R_after = y.reshape(n, -1) - pred.reshape(n, -1)
    assert_allclose(est.residue_norm_, np.sqrt(np.sum(s[:, None] * Q**2)), rtol=1e-10)
    assert_allclose(est.residual_norm_, np.sqrt(np.sum(s[:, None] * R_after**2)), rtol=1e-6)
    assert est.residual_norm_ < est.residue_norm_


def test_zero_prior_without_extractor_is_ridge():
    X, y = _target(80, n_in=6, k=2)
    est = LayerVariationalAdapter(alpha=2.5).fit(X, y)
    ridge = Ridge(alpha=2.5).fit(X, y)
    assert_allclose(est.coef_, ridge.coef_, rtol=1e-10)
    assert_allclose(est.intercept_, ridge.intercept_, rtol=1e-10)
    assert est.n_features_in_ == 6


def test_pair_head_equals_linear_head():
    body, head = make_body(), make_head(n_out=2)
    X, y = _target(60, k=2)
    W0, b0 = head_arrays(head)
    a = LayerVariationalAdapter(body, head, alpha=0.4).fit(X, y)
    b = LayerVariationalAdapter(body, (W0, b0), alpha=0.4).fit(X, y)
    c = LayerVariationalAdapter(body, (torch.as_tensor(W0), list(b0)), alpha=0.4).fit(X, y)
    assert_allclose(a.coef_, b.coef_, rtol=1e-12)
    assert_allclose(a.intercept_, c.intercept_, rtol=1e-12)


def test_1d_coef_pair_and_float_intercept():
    X, y = _target(50, n_in=4)
    W0 = np.array([0.5, -1.0, 0.0, 2.0])
    est = LayerVariationalAdapter(head=(W0, 0.25), alpha=1.0).fit(X, y)
    ridge = Ridge(alpha=1.0).fit(X, y - X @ W0 - 0.25)
    assert_allclose(est.coef_, W0 + ridge.coef_, rtol=1e-10)
    assert_allclose(est.intercept_, 0.25 + ridge.intercept_, rtol=1e-10)


# -- alpha = 0: the paper's pseudo-inverse formula -----------------------------------------


def test_alpha_zero_fewer_samples_than_features_interpolates():
    body, head = make_body(n_hidden=32), make_head(n_hidden=32, bias=False)
    X, y = _target(12)
    est = LayerVariationalAdapter(body, head, alpha=0.0).fit(X, y)
    Z = reference_features(body, X)
    W0, _ = head_arrays(head)
    Q = y[:, None] - Z @ W0.T
    assert est.solver_ == "dual"
    assert_allclose(est.coef_, W0[0] + (np.linalg.pinv(Z) @ Q)[:, 0], rtol=1e-8, atol=1e-10)
    assert_allclose(est.predict(X), y, atol=1e-9)  # data condition: zero training residual
    assert est.residual_norm_ < 1e-8 * est.residue_norm_


def test_alpha_zero_more_samples_than_features_is_least_squares():
    body, head = make_body(), make_head(bias=False)
    X, y = _target(300)
    est = LayerVariationalAdapter(body, head, alpha=0.0).fit(X, y)
    Z = reference_features(body, X)
    W0, _ = head_arrays(head)
    dW = np.linalg.lstsq(Z, y - Z @ W0[0], rcond=None)[0]
    assert est.solver_ == "primal"
    assert_allclose(est.coef_, W0[0] + dW, rtol=1e-7, atol=1e-9)
    assert_allclose(est.coef_, W0[0] + np.linalg.pinv(Z) @ (y - Z @ W0[0]), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("n", [8, 100])
def test_alpha_zero_rank_deficient_features_are_finite_min_norm(n):
    # ReLU features with dead units and duplicated units: rank < d.
    body = nn.Sequential(nn.Linear(3, 4, dtype=torch.float64), nn.ReLU())
    with torch.no_grad():
        body[0].weight[2] = body[0].weight[0] * 2.0
        body[0].bias[2] = body[0].bias[0] * 2.0
        body[0].weight[3] = 0.0
        body[0].bias[3] = -1.0  # always dead
    head = nn.Linear(4, 1, bias=False, dtype=torch.float64)
    X, y = _target(n, n_in=3)
    est = LayerVariationalAdapter(body, head, alpha=0.0).fit(X, y)
    Z = reference_features(body, X)
    W0, _ = head_arrays(head)
    assert np.isfinite(est.coef_).all()
    assert_allclose(est.coef_, W0[0] + np.linalg.pinv(Z) @ (y - Z @ W0[0]), rtol=1e-7, atol=1e-9)


def test_large_alpha_gives_back_pretrained_head():
    body, head = make_body(), make_head(n_out=2)
    X, y = _target(100, k=2)
    est = LayerVariationalAdapter(body, head, alpha=1e12, fit_intercept=False).fit(X, y)
    W0, b0 = head_arrays(head)
    assert_allclose(est.coef_, W0, rtol=1e-8, atol=1e-9)
    assert_allclose(est.intercept_, b0)


# -- torch side: frozen-ness, dtypes, devices, batching ------------------------------------


def _snapshot(module):
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "training": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "device": [p.device for p in module.parameters()],
        "dtype": [p.dtype for p in module.parameters()],
    }


def _assert_same(module, snap):
    now = _snapshot(module)
    assert now["state"].keys() == snap["state"].keys()
    for key, value in snap["state"].items():
        assert torch.equal(now["state"][key], value), key  # bitwise
    for field in ("training", "requires_grad", "device", "dtype"):
        assert now[field] == snap[field], field


def test_user_module_and_arrays_are_never_modified():
    body, head = make_body(), make_head()
    body[0].weight.requires_grad_(False)  # a mix of flags must survive too
    X, y = _target(64)
    sw = np.linspace(0.5, 1.5, 64)
    X0, y0, sw0 = X.copy(), y.copy(), sw.copy()
    snaps = _snapshot(body), _snapshot(head)
    est = LayerVariationalAdapter(body, head, alpha=0.1, batch_size=16).fit(X, y, sample_weight=sw)
    est.predict(X)
    est.to_module()(torch.as_tensor(X))
    _assert_same(body, snaps[0])
    _assert_same(head, snaps[1])
    assert body.training and head.training
    assert_array_equal(X, X0)
    assert_array_equal(y, y0)
    assert_array_equal(sw, sw0)


def test_inplace_first_layer_cannot_write_into_user_data():
    body = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(5, 8, dtype=torch.float64))
    X, y = _target(30)
    X0 = X.copy()
    Xt = torch.as_tensor(X.copy())
    LayerVariationalAdapter(body, alpha=1.0).fit(X, y).predict(X)
    LayerVariationalAdapter(body, alpha=1.0).fit(Xt, y)
    assert_array_equal(X, X0)
    assert_array_equal(Xt.numpy(), X0)


def test_features_use_inference_mode_statistics():
    # BatchNorm in training mode would use batch statistics; with batch_size=1 it would fail.
    body, head = make_body(), make_head()
    X, y = _target(40)
    a = LayerVariationalAdapter(body, head, alpha=0.3, batch_size=1).fit(X, y)
    b = LayerVariationalAdapter(body, head, alpha=0.3, batch_size=40).fit(X, y)
    assert_allclose(a.coef_, b.coef_, rtol=1e-10)
    assert_allclose(a.predict(X), b.predict(X), rtol=1e-10)
    Z = reference_features(body, X)  # eval-mode oracle
    assert_allclose(a.predict(X), Z @ a.coef_ + a.intercept_, rtol=1e-10)


def test_tensor_input_equals_numpy_input():
    body, head = make_body(), make_head()
    X, y = _target(50)
    a = LayerVariationalAdapter(body, head).fit(X, y)
    b = LayerVariationalAdapter(body, head).fit(torch.as_tensor(X), torch.as_tensor(y))
    assert_allclose(a.coef_, b.coef_, rtol=1e-12)
    assert_allclose(a.predict(X), b.predict(torch.as_tensor(X)), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_extractor_solves_in_float64(dtype):
    body = make_body(batchnorm=False).to(dtype)
    head = make_head().to(dtype)
    X, y = _target(120)
    est = LayerVariationalAdapter(body, head, alpha=0.5).fit(X, y)
    assert est.coef_.dtype == np.float64
    # oracle: features of the low-precision network, then Ridge in float64
    net = copy.deepcopy(body).eval()
    with torch.no_grad():
        Z = net(torch.as_tensor(X, dtype=dtype)).double().numpy()
    W0, b0 = head_arrays(head)
    ridge = Ridge(alpha=0.5).fit(Z, y - Z @ W0[0] - b0[0])
    assert_allclose(est.coef_, W0[0] + ridge.coef_, rtol=1e-7, atol=1e-8)
    module = est.to_module()
    assert module.head.weight.dtype == torch.float32
    out = module(torch.as_tensor(X, dtype=torch.float32)).double().numpy()[:, 0]  # input cast by the module
    assert_allclose(out, est.predict(X), rtol=1e-4, atol=1e-4)


def test_nd_input_and_any_feature_shape():
    conv = nn.Sequential(nn.Conv2d(1, 3, 3, dtype=torch.float64), nn.Tanh())  # output (n, 3, 4, 4)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 1, 6, 6))
    y = rng.normal(size=(30, 2))
    est = LayerVariationalAdapter(conv, alpha=0.2).fit(X, y)
    Z = reference_features(conv, X)
    ridge = Ridge(alpha=0.2).fit(Z, y)
    assert est.coef_.shape == (2, 48)
    assert_allclose(est.coef_, ridge.coef_, rtol=1e-8, atol=1e-10)
    assert est.input_shape_ == (1, 6, 6)
    assert not hasattr(est, "n_features_in_")
    with pytest.raises(ValueError, match=r"per-sample shape \(1, 5, 5\).*\(1, 6, 6\)"):
        est.predict(rng.normal(size=(3, 1, 5, 5)))


def test_to_module_matches_predict():
    body, head = make_body().float(), make_head(n_out=3).float()
    X, y = _target(70, k=3)
    est = LayerVariationalAdapter(body, head, alpha=0.5).fit(X, y)
    module = est.to_module()
    assert not module.training
    assert all(p.device.type == "cpu" and not p.requires_grad for p in module.parameters())
    with torch.no_grad():
        out = module(torch.as_tensor(X, dtype=torch.float32)).double().numpy()
    assert_allclose(out, est.predict(X), rtol=1e-5, atol=1e-5)
    assert isinstance(module.head, nn.Linear) and module.head.bias is not None
    assert module.extractor is not est.extractor_  # the fitted state stays private


def test_to_module_without_extractor_and_bias_free_head():
    X, y = _target(40, n_in=4)
    est = LayerVariationalAdapter(head=(np.ones(4), None), alpha=0.1).fit(X, y)
    assert est.fit_intercept_ is False
    module = est.to_module()
    assert module.head.bias is None
    out = module(torch.as_tensor(X, dtype=torch.float32)).double().numpy()[:, 0]
    assert_allclose(out, est.predict(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "head, fit_intercept, expected",
    [
        (None, "auto", True),
        ("linear_bias", "auto", True),
        ("linear_nobias", "auto", False),
        ("pair_bias", "auto", True),
        ("pair_nobias", "auto", False),
        ("linear_nobias", True, True),
        ("linear_bias", False, False),
    ],
)
def test_fit_intercept_auto_follows_the_head(head, fit_intercept, expected):
    heads = {
        None: None,
        "linear_bias": make_head(),
        "linear_nobias": make_head(bias=False),
        "pair_bias": (np.ones(16), 0.5),
        "pair_nobias": (np.ones(16), None),
    }
    X, y = _target(40)
    est = LayerVariationalAdapter(make_body(), heads[head], fit_intercept=fit_intercept).fit(X, y)
    assert est.fit_intercept_ is expected


def test_device_cpu_and_bad_devices():
    body, head = make_body(), make_head()
    X, y = _target(30)
    a = LayerVariationalAdapter(body, head, device="cpu").fit(X, y)
    b = LayerVariationalAdapter(body, head, device=torch.device("cpu")).fit(X, y)
    assert_allclose(a.coef_, b.coef_)
    with pytest.raises(ValueError, match="not a torch device"):
        LayerVariationalAdapter(body, head, device="gpu0").fit(X, y)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            LayerVariationalAdapter(body, head, device="cuda").fit(X, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    body, head = make_body(), make_head()
    X, y = _target(100)
    snap = _snapshot(body)
    gpu = LayerVariationalAdapter(body, head, device="cuda").fit(X, y)
    cpu = LayerVariationalAdapter(body, head, device="cpu").fit(X, y)
    _assert_same(body, snap)
    assert gpu.extractor_ is not None and next(gpu.extractor_.parameters()).device.type == "cpu"
    assert_allclose(gpu.coef_, cpu.coef_, rtol=1e-9)
    assert_allclose(gpu.predict(X), cpu.predict(X), rtol=1e-9)


# -- persistence ----------------------------------------------------------------------------


def test_pickle_and_joblib_round_trips(tmp_path):
    body, head = make_body(), make_head(n_out=2)
    X, y = _target(50, k=2)
    est = LayerVariationalAdapter(body, head, alpha=0.3).fit(X, y)
    expected = est.predict(X)
    again = pickle.loads(pickle.dumps(est))
    assert_array_equal(again.predict(X), expected)
    joblib.dump(est, tmp_path / "adapter.joblib")
    assert_array_equal(joblib.load(tmp_path / "adapter.joblib").predict(X), expected)


# -- bad input: clear errors, before any work -----------------------------------------------


def _counting():
    return CountingModule(make_body())


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("nan_X", ValueError, "NaN"),
        ("inf_X", ValueError, "infinity"),
        ("nan_X_tensor", ValueError, "NaN"),
        ("inf_y", ValueError, "NaN|infinity"),
        ("nan_y", ValueError, "NaN"),
        ("coef_none", TypeError, "needs coef"),
        ("lazy_head", TypeError, "not initialised"),
        ("y_rows", ValueError, "X has 20 samples but y has 19"),
        ("y_cols", ValueError, "head has 1 outputs but y has 3"),
        ("alpha", ValueError, "alpha"),
        ("head_type", TypeError, "head"),
        ("head_name", ValueError, r"head='linear' is not a submodule of CountingModule.*inner\.4"),
        ("head_module", TypeError, "ConvTranspose1d is not supported"),
        ("sw_negative", ValueError, "Negative values in sample_weight"),
        ("sw_length", ValueError, r"sample_weight.shape == \(5,\), expected \(20,\)"),
        ("sw_zero", ValueError, "sums to zero"),
        ("y_none", ValueError, "requires y"),
        ("X_1d", ValueError, "reshape"),
    ],
)
def test_bad_input_raises_before_any_forward_pass(case, exc, match):
    X, y = _target(20)
    body = _counting()
    head = make_head()
    kwargs = {}
    if case == "nan_X":
        X[3, 1] = np.nan
    elif case == "inf_X":
        X[0, 0] = -np.inf
    elif case == "nan_X_tensor":
        X = torch.as_tensor(X)
        X[4, 4] = float("nan")
    elif case == "nan_y":
        y[7] = np.nan
    elif case == "coef_none":
        head = (None, 0.5)
    elif case == "lazy_head":
        head = nn.LazyLinear(1)
    elif case == "inf_y":
        y[2] = np.inf
    elif case == "y_rows":
        y = y[:-1]
    elif case == "y_cols":
        y = np.column_stack([y, y, y])
    elif case == "alpha":
        kwargs["alpha"] = -1.0
    elif case == "head_type":
        head = 3.5  # strings name a layer of the extractor (head_name)
    elif case == "head_name":
        head = "linear"
    elif case == "head_module":
        head = nn.ConvTranspose1d(16, 1, 3)
    elif case == "sw_negative":
        kwargs["sample_weight"] = -np.ones(20)
    elif case == "sw_length":
        kwargs["sample_weight"] = np.ones(5)
    elif case == "sw_zero":
        kwargs["sample_weight"] = np.zeros(20)
    elif case == "y_none":
        y = None
    elif case == "X_1d":
        X = torch.as_tensor(X[:, 0])
    alpha = kwargs.pop("alpha", 1.0)
    est = LayerVariationalAdapter(body, head, alpha=alpha)
    with pytest.raises(exc, match=match):
        est.fit(X, y, **kwargs)
    assert body.rows_seen == 0
    LayerVariationalAdapter(body, make_head()).fit(*_target(20))
    # the counter does count the private copy's rows; +2: the determinism probe runs the first
    # sample alone twice when a model is first seen
    assert body.rows_seen == 22


def test_head_feature_mismatch_is_caught_on_the_first_batch():
    body = _counting()
    X, y = _target(100)
    est = LayerVariationalAdapter(body, make_head(n_hidden=7), batch_size=10)
    with pytest.raises(ValueError, match="head expects 7 input features but the extractor produces 16"):
        est.fit(X, y)
    # the first batch only: cache="auto" runs the determinism probe once it chooses to cache
    assert body.rows_seen == 10
    with pytest.raises(ValueError, match="head expects 7 input features but X has 5"):
        LayerVariationalAdapter(None, (np.ones(7), 0.0)).fit(X, y)


def test_extractor_rejecting_X_is_wrapped_and_chained():
    body = CountingModule(make_body())
    X, y = _target(20, n_in=3)  # body expects 5 inputs
    with pytest.raises(
        ValueError, match=r"extractor CountingModule failed on a batch of shape \(8, 3\)"
    ) as info:
        LayerVariationalAdapter(body, make_head(), batch_size=8).fit(X, y)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert body.rows_seen <= 8  # found on the first batch


def test_extractor_returning_nonfinite_features():
    body = nn.Sequential(nn.Linear(5, 4, dtype=torch.float64))
    with torch.no_grad():
        body[0].bias[0] = float("nan")
    X, y = _target(20)
    with pytest.raises(ValueError, match="NaN or infinite features"):
        LayerVariationalAdapter(body).fit(X, y)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_one_nonfinite_feature_anywhere_is_refused_and_huge_finite_ones_are_not(value):
    from skl_transfer._torch import check_finite

    Z = torch.full((300, 7), 3e38, dtype=torch.float32)  # finite; their float32 sum overflows
    assert check_finite(Z) is Z
    Z[257, 3] = value
    with pytest.raises(ValueError, match="NaN or infinite features"):
        check_finite(Z)
    Z = torch.zeros(300, 7, dtype=torch.float64)
    Z[0, 0], Z[299, 6] = np.inf, -np.inf  # a sum of inf and -inf: NaN
    with pytest.raises(ValueError, match="NaN or infinite features"):
        check_finite(Z)


def test_predict_errors():
    body, head = make_body(), make_head()
    X, y = _target(30)
    est = LayerVariationalAdapter(body, head)
    with pytest.raises(NotFittedError):
        est.predict(X)
    with pytest.raises(NotFittedError):
        est.to_module()
    est.fit(X, y)
    with pytest.raises(ValueError, match=r"per-sample shape \(4,\).*\(5,\)"):
        est.predict(X[:, :4])
    flat = LayerVariationalAdapter(alpha=1.0).fit(X, y)
    with pytest.raises(ValueError, match="X has 4 features, but LayerVariationalAdapter is expecting 5"):
        flat.predict(X[:, :4])


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_primal_and_dual_paths_agree(alpha, fit_intercept):
    # The same problem twice: 20 samples with d = 16 features (primal), and with 8 zero
    # features appended, d = 24 > 20 (dual). Zero features get zero update in both solutions.
    X, y = _target(20, n_in=16, k=2)
    W0 = np.random.default_rng(5).normal(size=(2, 16))
    Xpad = np.hstack([X, np.zeros((20, 8))])
    W0pad = np.hstack([W0, np.zeros((2, 8))])
    kw = dict(alpha=alpha, fit_intercept=fit_intercept)
    primal = LayerVariationalAdapter(head=(W0, np.ones(2)), **kw).fit(X, y)
    dual = LayerVariationalAdapter(head=(W0pad, np.ones(2)), **kw).fit(Xpad, y)
    assert (primal.solver_, dual.solver_) == ("primal", "dual")
    assert_allclose(dual.coef_[:, :16], primal.coef_, rtol=1e-8, atol=1e-10)
    assert_allclose(dual.coef_[:, 16:], 0.0, atol=1e-12)
    assert_allclose(dual.intercept_, primal.intercept_, rtol=1e-8, atol=1e-10)
    assert_allclose(dual.residual_norm_, primal.residual_norm_, rtol=1e-6, atol=1e-8)


def test_alpha_zero_dual_path_rank_deficient():
    # 8 samples, d = 12 ReLU features of rank <= 6: dual path, minimum-norm solution.
    body = nn.Sequential(nn.Linear(3, 12, dtype=torch.float64), nn.ReLU())
    with torch.no_grad():
        body[0].weight[6:] = body[0].weight[:6] * 3.0
        body[0].bias[6:] = body[0].bias[:6] * 3.0
    head = nn.Linear(12, 1, bias=False, dtype=torch.float64)
    X, y = _target(8, n_in=3)
    est = LayerVariationalAdapter(body, head, alpha=0.0).fit(X, y)
    Z = reference_features(body, X)
    W0, _ = head_arrays(head)
    assert est.solver_ == "dual" and np.isfinite(est.coef_).all()
    assert_allclose(est.coef_, W0[0] + np.linalg.pinv(Z) @ (y - Z @ W0[0]), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("n", [40, 6])
def test_tiny_alpha_is_continuous_on_collinear_features(n):
    # Exactly collinear features: as alpha -> 0 the solution must tend to the alpha = 0 one,
    # never blow up along the rounding-noise directions.
    body = nn.Linear(5, 8, dtype=torch.float64)
    with torch.no_grad():
        body.weight[5:] = body.weight[:3] - body.weight[1:4]
        body.bias[5:] = body.bias[:3] - body.bias[1:4]
    X, y = _target(n)
    ref = LayerVariationalAdapter(body, alpha=0.0).fit(X, y)
    for alpha in (1e-30, 1e-20, 1e-12):
        est = LayerVariationalAdapter(body, alpha=alpha).fit(X, y)
        assert_allclose(est.coef_, ref.coef_, rtol=1e-6, atol=1e-6 * np.abs(ref.coef_).max())


@pytest.mark.parametrize("bias, fit_intercept", [(False, True), (True, False)])
def test_fit_intercept_overrides_against_ridge(bias, fit_intercept):
    body, head = make_body(), make_head(bias=bias)
    X, y = _target(90)
    est = LayerVariationalAdapter(body, head, alpha=0.8, fit_intercept=fit_intercept).fit(X, y)
    Z = reference_features(body, X)
    W0, b0 = head_arrays(head)
    b0 = 0.0 if b0 is None else b0[0]
    ridge = Ridge(alpha=0.8, fit_intercept=fit_intercept).fit(Z, y - Z @ W0[0] - b0)
    assert_allclose(est.coef_, W0[0] + ridge.coef_, rtol=1e-8, atol=1e-10)
    assert_allclose(est.intercept_, b0 + ridge.intercept_, rtol=1e-8, atol=1e-10)
    module = est.to_module()
    assert (module.head.bias is not None) == (bias or fit_intercept)


def test_float16_rank_deficient_features_do_not_fit_rounding_noise():
    # rank-3 features in d = 16: float16 rounding must not be read as 13 extra directions
    body32 = nn.Linear(3, 16)
    X, y = _target(200, n_in=3)
    c32 = LayerVariationalAdapter(body32, alpha=0.0).fit(X, y).coef_
    c16 = LayerVariationalAdapter(copy.deepcopy(body32).half(), alpha=0.0).fit(X, y).coef_
    assert np.abs(c16).max() < 5 * np.abs(c32).max()


def test_failed_fit_leaves_no_fitted_state_and_refit_clears_stale_attributes():
    pd = pytest.importorskip("pandas")
    body, head = make_body(), make_head()
    X, y = _target(30)
    est = LayerVariationalAdapter(body, head)
    with pytest.raises(ValueError):
        est.fit(X, y, sample_weight=-np.ones(30))
    with pytest.raises(NotFittedError):
        est.predict(X)
    frame = pd.DataFrame(X, columns=[f"c{i}" for i in range(5)])
    est.set_params(extractor=None, head=None).fit(frame, y)
    assert list(est.feature_names_in_) == list(frame.columns) and est.input_shape_ == (5,)
    est.set_params(extractor=body, head=head).fit(X, y)
    assert not hasattr(est, "feature_names_in_") and est.input_shape_ == (5,)


def test_object_and_bfloat16_inputs_are_converted():
    body, head = make_body(), make_head()
    X, y = _target(30)
    ref = LayerVariationalAdapter(body, head).fit(X, y)
    obj = LayerVariationalAdapter(body, head).fit(X.astype(object), torch.as_tensor(y).bfloat16())
    yb = torch.as_tensor(y).bfloat16().float().numpy()
    assert_allclose(obj.coef_, LayerVariationalAdapter(body, head).fit(X, yb).coef_, rtol=1e-12)
    assert ref.coef_.shape == obj.coef_.shape


def test_float32_features_keep_weak_but_real_directions():
    # A feature direction 1e-6 times weaker than the others is real in float32 (rounding
    # ~6e-8): alpha = 0 must keep it, as numpy's lstsq on the same features does.
    body = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        body.weight.copy_(torch.diag(torch.tensor([1.0, 0.5, 1e-6])))
    X, y = _target(300, n_in=3)
    est = LayerVariationalAdapter(body, alpha=0.0, fit_intercept=False).fit(X, y)
    Z = reference_features(body, X)
    assert_allclose(est.coef_, np.linalg.lstsq(Z, y, rcond=None)[0], rtol=1e-6)
