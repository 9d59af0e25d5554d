"""Repeated fits of an unchanged extractor: sklearn's clone shares the modules, and the digest
of a fit's private copy is reused without hashing the weights again, while every change is
still seen (oracle: a fit with the cache off on the changed module)."""

import numpy as np
import pytest
import sklearn
import torch
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from torch import nn

from skl_transfer import LayerVariationalAdapter, _fingerprint, clear_cache


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 8, dtype=torch.float64)
        self.register_buffer("shift", torch.zeros(8, dtype=torch.float64))
        self.scale = 1.0

    def forward(self, x):
        return torch.tanh(self.scale * self.lin(x) + self.shift)


def _data(n=60):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 5))
    return X, X[:, 0] - 0.5 * X[:, 1] + 0.1 * rng.normal(size=n)


@pytest.fixture
def hashed(monkeypatch):
    """Counts the weight hashes of the test (extractors of any size take the reuse path)."""
    calls = []
    real = _fingerprint._hashed
    monkeypatch.setattr(_fingerprint, "_hashed", lambda walk: calls.append(1) or real(walk))
    monkeypatch.setattr(_fingerprint, "COPY_MIN_BYTES", 0)
    clear_cache()
    yield calls
    clear_cache()


def test_clone_shares_the_modules_and_keeps_routing():
    body, head = Scaled(), nn.Linear(8, 1, dtype=torch.float64)
    est = LayerVariationalAdapter(body, head, alpha=0.3, cache=False)
    twin = clone(est)
    assert twin.extractor is body and twin.head is head and twin.alpha == 0.3
    with sklearn.config_context(enable_metadata_routing=True):
        routed = LayerVariationalAdapter(body, head).set_fit_request(sample_weight=True)
        assert clone(routed).get_metadata_routing().fit.requests["sample_weight"] is True
    X, y = _data()
    search = GridSearchCV(est, {"alpha": [0.1, 1.0]}, cv=3).fit(X, y)
    ref = LayerVariationalAdapter(body, head, alpha=search.best_params_["alpha"], cache=False).fit(X, y)
    assert_allclose(search.best_estimator_.coef_, ref.coef_, rtol=1e-12)


def _change(body, how):
    if how == "in place":
        with torch.no_grad():
            body.lin.weight.mul_(1.5)
    elif how == ".data":  # bumps no version counter: seen through the sampled elements
        body.lin.weight.data.mul_(1.5)
    elif how == "new tensor":
        body.lin.weight = nn.Parameter(body.lin.weight.detach() * 1.5)
    elif how == "buffer":
        body.shift.add_(0.25)
    elif how == "attribute":
        body.scale = 1.5


@pytest.mark.parametrize("how", ["in place", ".data", "new tensor", "buffer", "attribute"])
def test_unchanged_extractor_is_not_hashed_again_and_changes_are_seen(hashed, how):
    body = Scaled()
    head = nn.Linear(8, 1, dtype=torch.float64)
    X, y = _data()
    LayerVariationalAdapter(body, head).fit(X, y)
    assert len(hashed) == 1
    est = LayerVariationalAdapter(body, head).fit(X, y)
    assert len(hashed) == 1  # the second fit reuses the digest of the first copy
    assert_allclose(est.predict(X), LayerVariationalAdapter(body, head, cache=False).fit(X, y).predict(X))
    _change(body, how)
    est = LayerVariationalAdapter(body, head).fit(X, y)
    assert len(hashed) == 2
    oracle = LayerVariationalAdapter(body, head, cache=False).fit(X, y)
    assert_allclose(est.coef_, oracle.coef_, rtol=1e-12)
    assert_allclose(est.predict(X), oracle.predict(X), rtol=1e-12)


def test_small_extractors_are_hashed_every_time(hashed, monkeypatch):
    monkeypatch.setattr(_fingerprint, "COPY_MIN_BYTES", 1 << 22)
    body, head = Scaled(), nn.Linear(8, 1, dtype=torch.float64)
    X, y = _data()
    for _ in range(2):
        LayerVariationalAdapter(body, head).fit(X, y)
    assert len(hashed) == 2


def test_tensors_without_version_counters_are_always_hashed(hashed):
    with torch.inference_mode():
        body = Scaled()  # inference tensors: no version counter to trust
    head = nn.Linear(8, 1, dtype=torch.float64)
    X, y = _data()
    for _ in range(2):
        LayerVariationalAdapter(body, head).fit(X, y)
    assert len(hashed) == 2


def test_fits_of_an_unchanged_extractor_share_its_frozen_weights(hashed):
    """The private copies of later fits take the first copy's frozen tensors (not copied again),
    in modules of their own; a write to a fitted ``extractor_`` or to the user's module ends
    the sharing, and the features stay those of a fit with the cache off."""
    body = Scaled()
    head = nn.Linear(8, 1, dtype=torch.float64)
    X, y = _data()
    first = LayerVariationalAdapter(body, head).fit(X, y)
    second = LayerVariationalAdapter(body, head).fit(X, y)
    assert second.extractor_ is not first.extractor_
    assert second.extractor_.lin.weight is first.extractor_.lin.weight
    assert second.extractor_.shift is first.extractor_.shift
    assert body.lin.weight is not first.extractor_.lin.weight  # never the user's tensors
    assert not second.extractor_.lin.weight.requires_grad and not second.extractor_.training

    with torch.no_grad():
        first.extractor_.lin.weight.mul_(2.0)  # a write to a fitted attribute
    third = LayerVariationalAdapter(body, head).fit(X, y)
    assert third.extractor_.lin.weight is not first.extractor_.lin.weight
    oracle = LayerVariationalAdapter(body, head, cache=False).fit(X, y)
    assert_allclose(third.coef_, oracle.coef_, rtol=1e-12)
    assert_allclose(third.predict(X), oracle.predict(X), rtol=1e-12)

    _change(body, "in place")
    fourth = LayerVariationalAdapter(body, head).fit(X, y)
    assert fourth.extractor_.lin.weight is not third.extractor_.lin.weight
    oracle = LayerVariationalAdapter(body, head, cache=False).fit(X, y)
    assert_allclose(fourth.coef_, oracle.coef_, rtol=1e-12)
