"""method="perturb": the first-order residue Q = dY - J_f(X) dX + (Y - f(X)) from paired samples.

Oracles: the exact method (equal for an affine extractor), central finite differences of the
network in float64, and sklearn Ridge on a residue computed here with reverse-mode Jacobians.
"""

import copy
import pickle

import numpy as np
import pytest
import sklearn
import torch
from conftest import head_arrays, make_body, make_head, reference_features
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.exceptions import UnsetMetadataPassedError
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils._param_validation import InvalidParameterError
from torch import nn
from torch.nn import functional as F

from skl_transfer import LayerVariationalAdapter


def _pairs(n=60, n_in=5, k=1, scale=0.05, seed=0):
    """Source samples X_src, target samples X = X_src + dX, labels y_src and y = y_src + dY."""
    rng = np.random.default_rng(seed)
    X_src = rng.normal(size=(n, n_in))
    X = X_src + scale * rng.normal(size=(n, n_in))
    shape = (n,) if k == 1 else (n, k)
    y_src = rng.normal(size=shape)
    y = y_src + 0.1 * rng.normal(size=shape)
    return X, y, X_src, y_src


def _network(body, head):
    """The user's network f = head o flatten o body, copied, in eval mode (the oracle's f)."""
    body = copy.deepcopy(body).eval()
    head = copy.deepcopy(head).eval()
    return lambda x: head(body(x).flatten(1)) if isinstance(head, nn.Linear) else head(body(x))


def _jvp_central_differences(f, X_src, X, h=1e-5):
    """J_f(x) dx per sample by central differences over every input coordinate, float64."""
    X_src = torch.as_tensor(X_src, dtype=torch.float64)
    dX = torch.as_tensor(X, dtype=torch.float64) - X_src
    out = torch.zeros_like(f(X_src).flatten(1))
    flat = X_src.reshape(len(X_src), -1)
    with torch.no_grad():
        for j in range(flat.shape[1]):
            e = torch.zeros_like(flat)
            e[:, j] = h
            up = f((flat + e).reshape(X_src.shape)).flatten(1)
            down = f((flat - e).reshape(X_src.shape)).flatten(1)
            out += (up - down) / (2 * h) * dX.reshape(len(X_src), -1)[:, j : j + 1]
    return out.numpy()


def _jvp_reverse_mode(f, X_src, X):
    """J_f(x) dx per sample by reverse-mode autodiff (the double-vjp trick of
    ``torch.autograd.functional.jvp``), independent of the library's forward mode."""
    X_src = torch.as_tensor(X_src)
    _, jvp = torch.autograd.functional.jvp(f, X_src, torch.as_tensor(X) - X_src)
    return jvp.flatten(1).numpy()


def _residue(f, X, y, X_src, y_src, jvp):
    """The paper's Q = dY - J_f(X) dX + (Y - f(X)), flattened per sample."""
    n = len(X)
    with torch.no_grad():
        f_src = f(torch.as_tensor(X_src)).flatten(1).numpy()
    y, y_src = np.reshape(y, (n, -1)), np.reshape(y_src, (n, -1))
    return (y - y_src) - jvp + (y_src - f_src)


# -- equal to "exact" for an affine extractor ---------------------------------------------


def _affine_linear():
    torch.manual_seed(3)
    body = nn.Sequential(nn.Linear(5, 8, dtype=torch.float64), nn.Linear(8, 6, dtype=torch.float64))
    return body, make_head(6, 2), (5,), (2,)


def _affine_conv():
    torch.manual_seed(4)
    body = nn.Conv2d(1, 3, 3, padding=1, dtype=torch.float64)
    head = nn.Conv2d(3, 2, 3, dtype=torch.float64)
    return body, head, (1, 6, 6), (2, 4, 4)


@pytest.mark.parametrize("case", [_affine_linear, _affine_conv])
@pytest.mark.parametrize("n", [4, 80])  # dual (n < d) and primal solves
def test_affine_extractor_equals_exact(case, n):
    body, head, in_shape, out_shape = case()
    rng = np.random.default_rng(1)
    X_src = rng.normal(size=(n, *in_shape))
    X = X_src + rng.normal(size=X_src.shape)  # a large shift: first order is exact for F affine
    y_src, y = rng.normal(size=(n, *out_shape)), rng.normal(size=(n, *out_shape))
    sw = rng.uniform(0.5, 2.0, n)
    exact = LayerVariationalAdapter(body, head, alpha=0.3).fit(X, y, sample_weight=sw)
    pert = LayerVariationalAdapter(body, head, alpha=0.3, method="perturb")
    pert.fit(X, y, sample_weight=sw, X_source=X_src, y_source=y_src)
    assert pert.solver_ == exact.solver_
    assert_allclose(pert.coef_, exact.coef_, rtol=1e-8, atol=1e-8)
    assert_allclose(pert.intercept_, exact.intercept_, rtol=1e-8, atol=1e-8)
    assert_allclose(pert.residue_norm_, exact.residue_norm_, rtol=1e-8)
    assert_allclose(pert.residual_norm_, exact.residual_norm_, rtol=1e-8, atol=1e-8)
    assert pert.residue_terms_["taylor_remainder"] < 1e-8 * pert.residue_terms_["intrinsic"]
    assert not hasattr(exact, "residue_terms_")


def test_no_extractor_equals_exact():
    """Without an extractor X holds the features, F is the identity: both methods agree."""
    X, y, X_src, y_src = _pairs(k=2)
    W0, b0 = np.ones((2, 5)), np.zeros(2)
    exact = LayerVariationalAdapter(head=(W0, b0), alpha=0.1).fit(X, y)
    pert = LayerVariationalAdapter(head=(W0, b0), alpha=0.1, method="perturb")
    pert.fit(X, y, X_source=X_src, y_source=y_src)
    assert_allclose(pert.coef_, exact.coef_, rtol=1e-10, atol=1e-12)
    assert_allclose(pert.intercept_, exact.intercept_, rtol=1e-10, atol=1e-12)


# -- a nonlinear network: finite differences and reverse-mode oracles ---------------------


@pytest.mark.parametrize("n", [8, 60])  # dual and primal solves
def test_matches_central_finite_differences(n):
    body, head = make_body(), make_head()  # BatchNorm and Dropout, left in training mode
    X, y, X_src, y_src = _pairs(n=n)
    f = _network(body, head)
    Q = _residue(f, X, y, X_src, y_src, _jvp_central_differences(f, X_src, X))
    Z = reference_features(body, X)  # the update is regressed on the target features F(x~)
    ridge = Ridge(alpha=0.5).fit(Z, Q[:, 0])
    est = LayerVariationalAdapter(body, head, alpha=0.5, method="perturb")
    est.fit(X, y, X_source=X_src, y_source=y_src)
    assert_allclose(est.delta_coef_, ridge.coef_, rtol=1e-4, atol=1e-4 * np.abs(ridge.coef_).max())
    assert_allclose(est.delta_intercept_, ridge.intercept_, rtol=1e-4, atol=1e-6)
    assert_allclose(est.residue_norm_, np.linalg.norm(Q), rtol=1e-6)


def test_equals_ridge_on_explicit_residue_linear_head():
    body, head = make_body(), make_head(n_out=2)
    X, y, X_src, y_src = _pairs(k=2)
    sw = np.random.default_rng(5).uniform(0.2, 2.0, len(X))
    f = _network(body, head)
    jvp = _jvp_reverse_mode(f, X_src, X)
    Q = _residue(f, X, y, X_src, y_src, jvp)
    Z = reference_features(body, X)
    ridge = Ridge(alpha=0.7).fit(Z, Q, sample_weight=sw)
    est = LayerVariationalAdapter(body, head, alpha=0.7, method="perturb")
    est.fit(X, y, sample_weight=sw, X_source=X_src, y_source=y_src)
    assert_allclose(est.delta_coef_, ridge.coef_, rtol=1e-8, atol=1e-10)
    assert_allclose(est.delta_intercept_, ridge.intercept_, rtol=1e-8, atol=1e-10)
    W0, b0 = head_arrays(head)
    assert_allclose(est.coef_, W0 + ridge.coef_, rtol=1e-8, atol=1e-10)

    # the residue's terms, weighted norms computed independently
    def norm(T):
        return np.sqrt(sw @ (np.reshape(T, (len(X), -1)) ** 2).sum(1))

    with torch.no_grad():
        f_src, f_tgt = (f(torch.as_tensor(a)).numpy() for a in (X_src, X))
    expected = {
        "label_shift": norm(y - y_src),
        "intrinsic": norm(jvp),
        "source_error": norm(y_src - f_src),
        "taylor_remainder": norm(f_tgt - f_src - jvp),
    }
    for name, value in expected.items():
        assert_allclose(est.residue_terms_[name], value, rtol=1e-7, err_msg=name)
    assert_allclose(est.residue_norm_, norm(Q), rtol=1e-10)


def test_equals_ridge_on_explicit_residue_conv_head():
    torch.manual_seed(2)
    body = nn.Sequential(nn.Conv2d(1, 3, 3, dtype=torch.float64), nn.Tanh())  # (1, 8, 8) -> (3, 6, 6)
    head = nn.Conv2d(3, 2, 3, padding=1, dtype=torch.float64)  # -> (2, 6, 6)
    rng = np.random.default_rng(0)
    n = 30
    X_src = rng.normal(size=(n, 1, 8, 8))
    X = X_src + 0.05 * rng.normal(size=X_src.shape)
    y_src = rng.normal(size=(n, 2, 6, 6))
    y = y_src + 0.1 * rng.normal(size=y_src.shape)
    f = _network(body, head)
    Q = _residue(f, X, y, X_src, y_src, _jvp_reverse_mode(f, X_src, X))  # (n, 2 * 36)
    with torch.no_grad():
        Zt = copy.deepcopy(body).eval()(torch.as_tensor(X))
    rows = F.unfold(Zt, 3, padding=1).transpose(1, 2).reshape(-1, 27).numpy()  # (n * 36, 27)
    Q_rows = Q.reshape(n, 2, 36).transpose(0, 2, 1).reshape(-1, 2)
    ridge = Ridge(alpha=0.2).fit(rows, Q_rows)
    est = LayerVariationalAdapter(body, head, alpha=0.2, method="perturb", batch_size=7)
    est.fit(X, y, X_source=X_src, y_source=y_src)
    assert_allclose(est.delta_coef_, ridge.coef_, rtol=1e-8, atol=1e-10)
    assert_allclose(est.delta_intercept_, ridge.intercept_, rtol=1e-8, atol=1e-10)
    assert est.predict(X).shape == y.shape


def test_float32_network_and_tensor_inputs():
    """A float32 network with tensor inputs: the jvp runs in float32, close to the float64 oracle."""
    body64, head64 = make_body(), make_head()
    body, head = copy.deepcopy(body64).float(), copy.deepcopy(head64).float()
    X, y, X_src, y_src = _pairs()
    ref = LayerVariationalAdapter(body64, head64, alpha=1.0, method="perturb")
    ref.fit(X, y, X_source=X_src, y_source=y_src)
    est = LayerVariationalAdapter(body, head, alpha=1.0, method="perturb")
    est.fit(torch.as_tensor(X, dtype=torch.float32), y, X_source=torch.as_tensor(X_src), y_source=y_src)
    assert_allclose(est.coef_, ref.coef_, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    body, head = make_body(), make_head(n_out=2)
    X, y, X_src, y_src = _pairs(k=2)
    cpu = LayerVariationalAdapter(body, head, method="perturb", device="cpu")
    cpu.fit(X, y, X_source=X_src, y_source=y_src)
    gpu = LayerVariationalAdapter(body, head, method="perturb", device="cuda")
    gpu.fit(
        torch.as_tensor(X, device="cuda"), y, X_source=torch.as_tensor(X_src, device="cuda"), y_source=y_src
    )
    assert_allclose(gpu.coef_, cpu.coef_, rtol=1e-8, atol=1e-10)
    for name, value in cpu.residue_terms_.items():
        assert_allclose(gpu.residue_terms_[name], value, rtol=1e-8, err_msg=name)
    assert next(gpu.extractor_.parameters()).device.type == "cpu"


# -- sklearn integration: partial_fit, the cache, routing, pickling ------------------------


def test_partial_fit_equals_fit():
    body, head = make_body(), make_head(n_out=2)
    X, y, X_src, y_src = _pairs(n=120, k=2)
    full = LayerVariationalAdapter(body, head, alpha=0.3, method="perturb")
    full.fit(X, y, X_source=X_src, y_source=y_src)
    part = LayerVariationalAdapter(body, head, alpha=0.3, method="perturb", batch_size=16)
    for sl in (slice(0, 50), slice(50, 90), slice(90, 120)):
        part.partial_fit(X[sl], y[sl], X_source=X_src[sl], y_source=y_src[sl])
    assert_allclose(part.coef_, full.coef_, rtol=1e-9, atol=1e-12)
    assert_allclose(part.intercept_, full.intercept_, rtol=1e-9, atol=1e-12)
    for name, value in full.residue_terms_.items():
        assert_allclose(part.residue_terms_[name], value, rtol=1e-9, err_msg=name)
    part.set_params(method="exact")
    with pytest.raises(ValueError, match="method changed"):
        part.partial_fit(X[:5], y[:5])


def test_cached_moments_depend_on_the_source_samples():
    """Fits on the same (X, y) share the feature cache, but never moments of other source pairs."""
    body, head = make_body(), make_head()
    X, y, X_src, y_src = _pairs()
    est = LayerVariationalAdapter(body, head, alpha=0.3, method="perturb")
    first = est.fit(X, y, X_source=X_src, y_source=y_src).coef_.copy()
    terms = dict(est.residue_terms_)
    again = est.fit(X, y, X_source=X_src, y_source=y_src)  # moments from the cache
    assert_array_equal(again.coef_, first)
    assert again.residue_terms_ == terms
    other = est.fit(X, y, X_source=X_src + 0.01, y_source=y_src).coef_
    assert np.abs(other - first).max() > 1e-6
    uncached = LayerVariationalAdapter(body, head, alpha=0.3, method="perturb", cache=False)
    assert_allclose(uncached.fit(X, y, X_source=X_src + 0.01, y_source=y_src).coef_, other, rtol=1e-12)
    exact = LayerVariationalAdapter(body, head, alpha=0.3).fit(X, y)  # same X and y: its own moments
    assert_allclose(exact.coef_, LayerVariationalAdapter(body, head, alpha=0.3, cache=False).fit(X, y).coef_)


def test_pipeline_and_search_with_metadata_routing():
    body, head = make_body(), make_head()
    X, y, X_src, y_src = _pairs(n=90)
    source = {"X_source": X_src, "y_source": y_src}
    direct = LayerVariationalAdapter(body, head, alpha=0.5, method="perturb").fit(X, y, **source)
    cv = KFold(3, shuffle=True, random_state=0)
    with sklearn.config_context(enable_metadata_routing=True):
        est = LayerVariationalAdapter(body, head, alpha=0.5, method="perturb")
        with pytest.raises(UnsetMetadataPassedError):  # the request is explicit
            make_pipeline(FunctionTransformer(), est).fit(X, y, **source)
        est.set_fit_request(X_source=True, y_source=True)
        pipe = make_pipeline(FunctionTransformer(), est).fit(X, y, **source)
        assert_allclose(pipe[-1].coef_, direct.coef_, rtol=1e-12)

        search = GridSearchCV(est, {"alpha": [0.05, 0.5, 5.0]}, cv=cv).fit(X, y, **source)
        scores = cross_validate(est, X, y, cv=cv, params=source)["test_score"]
    # every fold got the rows of X_source and y_source that belong to its rows of X
    for i, (train, test) in enumerate(cv.split(X)):
        for j, alpha in enumerate([0.05, 0.5, 5.0]):
            fold = LayerVariationalAdapter(body, head, alpha=alpha, method="perturb")
            fold.fit(X[train], y[train], X_source=X_src[train], y_source=y_src[train])
            assert_allclose(
                search.cv_results_[f"split{i}_test_score"][j], fold.score(X[test], y[test]), rtol=1e-10
            )
            if alpha == 0.5:
                assert_allclose(scores[i], fold.score(X[test], y[test]), rtol=1e-10)
    best = LayerVariationalAdapter(body, head, alpha=search.best_params_["alpha"], method="perturb")
    assert_allclose(search.best_estimator_.coef_, best.fit(X, y, **source).coef_, rtol=1e-12)


def test_search_without_metadata_routing():
    """With routing off, fit parameters reach the estimator as before, split along with X."""
    body, head = make_body(), make_head()
    X, y, X_src, y_src = _pairs(n=60)
    est = LayerVariationalAdapter(body, head, method="perturb")
    search = GridSearchCV(est, {"alpha": [0.1, 1.0]}, cv=3).fit(X, y, X_source=X_src, y_source=y_src)
    pipe = make_pipeline(FunctionTransformer(), est)
    pipe.fit(X, y, layervariationaladapter__X_source=X_src, layervariationaladapter__y_source=y_src)
    assert search.best_estimator_.residue_terms_ is not None
    assert_allclose(pipe[-1].coef_, clone_fit(est, X, y, X_src, y_src).coef_, rtol=1e-12)


def clone_fit(est, X, y, X_src, y_src):
    return sklearn.clone(est).fit(X, y, X_source=X_src, y_source=y_src)


def test_user_module_and_arrays_are_not_modified():
    body, head = make_body(), make_head()
    X, y, X_src, y_src = _pairs()
    state = copy.deepcopy(body.state_dict())
    W0 = head.weight.detach().clone()
    arrays = [a.copy() for a in (X, y, X_src, y_src)]
    Xt_src = torch.as_tensor(X_src).clone()
    Xt_src_copy = Xt_src.clone()
    est = LayerVariationalAdapter(body, head, method="perturb").fit(X, y, X_source=Xt_src, y_source=y_src)
    assert body.training and all(p.requires_grad for p in body.parameters())
    for key, value in body.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(head.weight, W0)
    for before, after in zip(arrays, (X, y, X_src, y_src), strict=True):
        assert_array_equal(before, after)
    assert torch.equal(Xt_src, Xt_src_copy)
    assert est.extractor is body and est.head is head


def test_pickle_round_trip():
    body, head = make_body(), make_head()
    X, y, X_src, y_src = _pairs()
    est = LayerVariationalAdapter(body, head, alpha=0.2, method="perturb")
    est.fit(X, y, X_source=X_src, y_source=y_src)
    back = pickle.loads(pickle.dumps(est))
    assert_array_equal(back.predict(X), est.predict(X))
    assert back.residue_terms_ == est.residue_terms_
    assert back.get_params()["method"] == "perturb"
    back.partial_fit(X[:10], y[:10], X_source=X_src[:10], y_source=y_src[:10])  # continues


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, missing",
    [
        ({}, "X_source and y_source are missing"),
        ({"X_source": 0}, "y_source is missing"),
        ({"y_source": 0}, "X_source is missing"),
    ],
)
def test_perturb_needs_both_source_arrays(given, missing):
    X, y, X_src, y_src = _pairs()
    arrays = {"X_source": X_src, "y_source": y_src}
    est = LayerVariationalAdapter(make_body(), make_head(), method="perturb")
    with pytest.raises(ValueError, match=f"{missing}.*set_fit_request"):
        est.fit(X, y, **{name: arrays[name] for name in given})
    with pytest.raises(ValueError, match=missing):
        est.partial_fit(X, y, **{name: arrays[name] for name in given})


def test_exact_refuses_source_arrays():
    X, y, X_src, y_src = _pairs()
    est = LayerVariationalAdapter(make_body(), make_head())
    with pytest.raises(ValueError, match="only used by method='perturb'"):
        est.fit(X, y, X_source=X_src, y_source=y_src)
    with pytest.raises(ValueError, match="X_source is only used by method='perturb'"):
        est.fit(X, y, X_source=X_src)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda X, y, Xs, ys: (X, y, Xs[:-1], ys), "X has 60 samples but X_source has 59"),
        (
            lambda X, y, Xs, ys: (X, y, Xs[:, :4], ys),
            r"X_source has per-sample shape \(4,\) but X has \(5,\)",
        ),
        (lambda X, y, Xs, ys: (X, y, Xs, ys[:-1]), r"y_source has shape \(59,\) but y has \(60,\)"),
        (lambda X, y, Xs, ys: (X, y, Xs, ys[:, None]), r"y_source has shape \(60, 1\) but y has \(60,\)"),
        (lambda X, y, Xs, ys: (X, y, np.where(Xs > 1, np.nan, Xs), ys), "X_source.*NaN"),
        (lambda X, y, Xs, ys: (X, y, Xs, np.where(ys > 1, np.inf, ys)), "y_source.*infinity"),
    ],
)
def test_unpaired_source_arrays(change, match):
    X, y, X_src, y_src = change(*_pairs())
    est = LayerVariationalAdapter(make_body(), make_head(), method="perturb")
    with pytest.raises(ValueError, match=match):
        est.fit(X, y, X_source=X_src, y_source=y_src)


def test_integer_inputs_and_invalid_method():
    X, y, X_src, y_src = _pairs()
    est = LayerVariationalAdapter(nn.Sequential(nn.Flatten()), head=(np.ones(5), 0.0), method="perturb")
    with pytest.raises(ValueError, match="must be floating-point"):
        est.fit(X.astype(np.int64), y, X_source=X_src.astype(np.int64), y_source=y_src)
    with pytest.raises(InvalidParameterError, match="method"):
        LayerVariationalAdapter(method="taylor").fit(X, y)
