"""Searches share the user's modules (sklearn's clone does not deep-copy them), and every fit
still sees every change to the extractor, however it was written (oracle: a fit with the cache
off on the changed module)."""

import numpy as np
import pytest
import sklearn
import torch
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from torch import nn

from skl_transfer import LayerVariationalAdapter, clear_cache


class Scaled(nn.Module):
    def __init__(self, width=8, d_in=5):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d_in, width, dtype=torch.float64)
        self.register_buffer("shift", torch.zeros(width, dtype=torch.float64))
        self.scale = 1.0

    def forward(self, x):
        return torch.tanh(self.scale * self.lin(x) + self.shift)


def _data(n=60, d_in=5):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d_in))
    return X, X[:, 0] - 0.5 * X[:, 1] + 0.1 * rng.normal(size=n)


def test_clone_shares_the_modules_and_keeps_routing():
    body, head = Scaled(), nn.Linear(8, 1, dtype=torch.float64)
    est = LayerVariationalAdapter(body, head, alpha=0.3, cache=False)
    twin = clone(est)
    assert twin.extractor is body and twin.head is head and twin.alpha == 0.3
    with sklearn.config_context(enable_metadata_routing=True):
        routed = LayerVariationalAdapter(body, head).set_fit_request(sample_weight=True)
        assert clone(routed).get_metadata_routing().fit.requests["sample_weight"] is True
    X, y = _data()
    before = {k: v.clone() for k, v in body.state_dict().items()}
    search = GridSearchCV(est, {"alpha": [0.1, 1.0]}, cv=3).fit(X, y)
    ref = LayerVariationalAdapter(body, head, alpha=search.best_params_["alpha"], cache=False).fit(X, y)
    assert_allclose(search.best_estimator_.coef_, ref.coef_, rtol=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in body.state_dict().items())  # never written


def _change(body, how):
    if how == "in place":
        with torch.no_grad():
            body.lin.weight.mul_(1.5)
    elif how == ".data, one column":  # bumps no version counter and misses every sampled element
        body.lin.weight.data[:, 3] *= 10
    elif how == "new tensor":
        body.lin.weight = nn.Parameter(body.lin.weight.detach() * 1.5)
    elif how == "buffer":
        body.shift.add_(0.25)
    elif how == "attribute":
        body.scale = 1.5


@pytest.mark.parametrize("how", ["in place", ".data, one column", "new tensor", "buffer", "attribute"])
def test_every_change_to_the_extractor_is_seen_by_the_next_fit(how):
    clear_cache()
    body = Scaled(width=600, d_in=600)  # 1.4 MB of weights
    head = nn.Linear(600, 1, dtype=torch.float64)
    X, y = _data(80, d_in=600)
    for _ in range(2):
        LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    _change(body, how)
    est = LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    oracle = LayerVariationalAdapter(body, head, cache=False).fit(X, y)
    assert torch.equal(est.extractor_.lin.weight, body.lin.weight)
    assert_allclose(est.coef_, oracle.coef_, rtol=1e-10, atol=1e-12)
    assert_allclose(est.predict(X), oracle.predict(X), rtol=1e-10, atol=1e-12)


def test_a_write_to_a_fitted_extractor_reaches_no_other_fit():
    clear_cache()
    body = Scaled(width=600, d_in=600)
    head = nn.Linear(600, 1, dtype=torch.float64)
    X, y = _data(80, d_in=600)
    first = LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    first.extractor_.lin.weight.data[:, 3] *= 10  # a fitted attribute, written through .data
    second = LayerVariationalAdapter(body, head, cache=True).fit(X[::-1].copy(), y[::-1].copy())
    oracle = LayerVariationalAdapter(body, head, cache=False).fit(X[::-1].copy(), y[::-1].copy())
    assert second.extractor_.lin.weight is not first.extractor_.lin.weight
    assert_allclose(second.coef_, oracle.coef_, rtol=1e-10, atol=1e-12)
