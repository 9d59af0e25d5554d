"""Ordinary workflows that must never give a silently wrong model (issue 12, items 3, 11, 13, 14, 16).

Oracles: uncached fits, sklearn's Ridge on the residue, a plain torch forward, pickle bytes.
"""

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_body, make_head, reference_features
from numpy.testing import assert_allclose
from sklearn.linear_model import Ridge
from torch import nn

from skl_transfer import (
    LayerVariationalAdapter,
    LayerVariationalAdapterCV,
    LayerVariationalClassifier,
)


def _data(n=60, p=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    return X, np.tanh(X @ rng.normal(size=p)) + 0.1 * rng.normal(size=n)


# -- item 3: the moments key covers the head's geometry ----------------------------------


def test_conv_heads_with_other_geometry_do_not_share_cached_moments():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, dtype=torch.float64), nn.Tanh())
    a = nn.Conv2d(3, 1, 3, padding=1, dtype=torch.float64)
    b = nn.Conv2d(3, 1, 3, padding=2, dilation=2, dtype=torch.float64)
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 1, 8, 8))
    y = rng.normal(size=(40, 1, 8, 8))
    LayerVariationalAdapter(body, a, alpha=0.1).fit(X, y)  # fills the cache with a's moments
    cached = LayerVariationalAdapter(body, b, alpha=0.1).fit(X, y)
    plain = LayerVariationalAdapter(body, b, alpha=0.1, cache=False).fit(X, y)
    assert_allclose(cached.coef_, plain.coef_, rtol=1e-12, atol=1e-14)


# -- item 11: feature names are checked whenever X is 2-D ---------------------------------


def test_dataframe_columns_reordered_at_predict_raise_with_an_extractor():
    X, y = _data()
    cols = [f"c{i}" for i in range(X.shape[1])]
    df = pd.DataFrame(X, columns=cols)
    est = LayerVariationalAdapter(make_body(), make_head(), alpha=0.1).fit(df, y)
    assert list(est.feature_names_in_) == cols
    with pytest.warns(UserWarning, match="fitted with feature names"):
        assert_allclose(est.predict(X), est.predict(df))
    with pytest.raises(ValueError, match="feature names"):
        est.predict(df[cols[::-1]])
    with pytest.raises(ValueError, match="feature names"):
        est.predict(df.rename(columns={"c0": "other"}))


def test_feature_names_are_dropped_by_a_fit_on_an_array_and_kept_per_fit():
    X, y = _data()
    df = pd.DataFrame(X, columns=[f"c{i}" for i in range(X.shape[1])])
    est = LayerVariationalAdapter(make_body(), make_head()).fit(df, y)
    est.fit(X, y)
    assert not hasattr(est, "feature_names_in_")
    est.fit(df, y)
    cv = LayerVariationalAdapterCV(make_body(), make_head(), alphas=[0.1, 1.0], cv=3).fit(df, y)
    with pytest.raises(ValueError, match="feature names"):
        cv.predict(df[df.columns[::-1]])


# -- item 13: a fitted estimator carries no training rows --------------------------------


def test_pickle_of_a_dual_fit_carries_no_training_features():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(8, 5))
    y = rng.normal(size=8)
    body = make_body(n_hidden=64)
    est = LayerVariationalAdapter(body, make_head(64), alpha=0.5).fit(X, y)
    assert est.solver_ == "dual"
    Z = reference_features(body, X)
    blob = pickle.dumps(est)
    for i in range(len(X)):
        assert Z[i].tobytes() not in blob
        assert X[i].tobytes() not in blob
    again = pickle.loads(blob)
    # the diagnostics survive the round trip: the residue's norm is the direct one
    W0, b0 = make_head(64).weight.detach().numpy(), make_head(64).bias.detach().numpy()
    Q = y - (Z @ W0.T + b0)[:, 0]
    assert_allclose(again.diagnostics_.residue_norm, np.linalg.norm(Q), rtol=1e-10)
    assert_allclose(again.predict(X), est.predict(X), rtol=0, atol=0)


def test_drop_moments_keeps_predictions_and_diagnostics():
    X, y = _data(200)
    est = LayerVariationalAdapter(make_body(), make_head(), alpha=0.5).fit(X, y)
    assert est.solver_ == "primal"
    before = est.predict(X)
    blob = pickle.dumps(est.drop_moments())
    again = pickle.loads(blob)
    assert_allclose(again.predict(X), before, rtol=0, atol=0)
    assert again.diagnostics_.n_samples == 200
    with pytest.raises(ValueError, match="drop_moments"):
        again.partial_fit(X, y)


# -- item 14: a head with NaN or infinite weights is refused ----------------------------


@pytest.mark.parametrize("where", ["weight", "bias"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_torch_head_with_nonfinite_weights_is_refused(where, value):
    X, y = _data()
    head = make_head()
    with torch.no_grad():
        getattr(head, where).view(-1)[0] = value
    for est in (
        LayerVariationalAdapter(make_body(), head),
        LayerVariationalAdapterCV(make_body(), head, alphas=[1.0], cv=3),
    ):
        with pytest.raises(ValueError, match="NaN or infinity"):
            est.fit(X, y)
    conv = nn.Conv2d(2, 1, 3)
    with torch.no_grad():
        conv.weight.view(-1)[3] = value
    with pytest.raises(ValueError, match="NaN or infinity"):
        LayerVariationalAdapter(nn.Identity(), conv).fit(np.zeros((3, 2, 5, 5)), np.zeros((3, 1, 3, 3)))


# -- item 16: messages that name the value and the fix ---------------------------------


def test_integer_X_into_a_float_extractor_names_the_dtype():
    X, y = _data()
    Xi = (np.abs(X) * 50).astype(np.uint8)
    with pytest.raises(ValueError, match=r"uint8.*astype\(np\.float32\)"):
        LayerVariationalAdapter(make_body(), make_head()).fit(Xi, y)


def test_integer_X_into_an_embedding_still_works():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Embedding(10, 4, dtype=torch.float64), nn.Flatten())
    rng = np.random.default_rng(0)
    X = rng.integers(0, 10, size=(50, 3))
    y = rng.normal(size=50)
    est = LayerVariationalAdapter(body, alpha=0.1).fit(X, y)
    Z = body(torch.as_tensor(X)).detach().numpy()
    ref = Ridge(alpha=0.1).fit(Z, y)
    assert_allclose(est.coef_, ref.coef_, rtol=1e-8)


def test_big_endian_X_equals_native():
    X, y = _data()
    Xb = X.astype(">f8")
    for body in (make_body(), None):
        head = make_head() if body is not None else None
        a = LayerVariationalAdapter(body, head, alpha=0.1, cache=False).fit(Xb, y)
        b = LayerVariationalAdapter(body, head, alpha=0.1, cache=False).fit(X, y)
        assert_allclose(a.coef_, b.coef_, rtol=0, atol=0)
        assert_allclose(a.predict(Xb), b.predict(X), rtol=0, atol=0)


@pytest.mark.parametrize("device", ["meta", "xla"])
def test_devices_that_cannot_run_the_extractor_are_refused_before_any_work(device):
    X, y = _data()
    with pytest.raises(ValueError, match=rf"device='{device}'.*'cpu'"):
        LayerVariationalAdapter(make_body(), make_head(), device=device).fit(X, y)


class _RaggedBody(nn.Module):
    """Returns 3 features for a full batch of 16 and 4 for a smaller one (a bug in a user's model)."""

    def forward(self, x):
        width = 3 if x.shape[0] == 16 else 4
        return x[:, :width]


def test_feature_size_changing_between_batches_is_named():
    X, y = _data()  # 60 samples: batches of 16, 16, 16 and 12
    with pytest.raises(ValueError, match=r"per-sample shape \(4,\) for samples 48 to 59.*\(3,\)"):
        LayerVariationalAdapter(_RaggedBody(), alpha=1.0, batch_size=16).fit(X, y)


class _ComplexBody(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x)


def test_complex_features_are_refused():
    X, y = _data()
    with pytest.raises(ValueError, match="complex"):
        LayerVariationalAdapter(_ComplexBody(), alpha=1.0).fit(X, y)


def test_classifier_checks_feature_names_too():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5))
    y = (X[:, 0] > 0).astype(int)
    df = pd.DataFrame(X, columns=list("abcde"))
    est = LayerVariationalClassifier(make_body(), make_head(n_out=2)).fit(df, y)
    with pytest.raises(ValueError, match="feature names"):
        est.predict(df[list("edcba")])


@pytest.mark.parametrize("cache", [False, True])
def test_negative_strides_equal_a_copy(cache):
    # numpy calls an array with a negative stride on an axis of length 1 C-contiguous (the
    # channel flip X[:, ::-1] of 1-channel images, a reversed single column); torch takes no
    # negative strides: the fit must equal the fit on a copy, not fail
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(40, 1, 4, 4))[:, ::-1]
    assert imgs.flags.c_contiguous and min(imgs.strides) < 0
    y = rng.normal(size=40)
    body = nn.Sequential(nn.Flatten(), nn.Linear(16, 5, dtype=torch.float64), nn.Tanh())
    head = nn.Linear(5, 1, dtype=torch.float64)
    got = LayerVariationalAdapter(body, head, alpha=0.5, cache=cache).fit(imgs, y)
    ref = LayerVariationalAdapter(body, head, alpha=0.5, cache=False).fit(imgs.copy(), y)
    np.testing.assert_array_equal(got.coef_, ref.coef_)
    np.testing.assert_array_equal(got.predict(imgs), ref.predict(imgs.copy()))
    col = rng.normal(size=(40, 1))[:, ::-1]  # features: ridge regression, as sklearn's
    plain = LayerVariationalAdapter(alpha=0.5, cache=cache).fit(col, y)
    ridge = Ridge(alpha=0.5).fit(col.copy(), y)
    assert_allclose(plain.coef_, ridge.coef_, rtol=1e-12)
    assert_allclose(plain.predict(col), ridge.predict(col.copy()), rtol=1e-12)
