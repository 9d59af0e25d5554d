"""The default ``cache="auto"``: a model is cached only when the cache costs it little.

conftest.py makes "auto" cache every model (so that row counts elsewhere are deterministic);
here the real rule runs, on extractors far from its threshold on either side.
"""

import threading
import time

import numpy as np
import pytest
import torch
from conftest import CountingModule
from numpy.testing import assert_array_equal
from torch import nn

from skl_transfer import LayerVariationalAdapter, _cache, cache_info, clear_cache
from skl_transfer._features import cached_extractor, feature_batches
from skl_transfer._torch import frozen_copy

REAL_RULE = _cache._worth_caching  # imported before conftest's fixture patches it


@pytest.fixture
def real_rule(monkeypatch):
    monkeypatch.setattr(_cache, "_worth_caching", REAL_RULE)


def _cheap(n_in=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, 1)).eval()


class _Slow(nn.Module):
    """A tiny layer that takes 20 ms a call: far costlier per row than the cache."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x):
        time.sleep(0.02)
        return self.lin(x)


def _data(n, n_in=4, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)).astype(dtype), rng.normal(size=n)


def test_rule_is_a_share_of_the_compute_time():
    assert REAL_RULE(0.3, 1.0) and REAL_RULE(0.0, 0.0)
    assert not REAL_RULE(0.31, 1.0) and not REAL_RULE(1e-9, 0.0)
    assert _cache.AUTO_SHARE == 0.3


def test_a_cheap_extractor_is_not_cached_and_fits_as_without_cache(real_rule):
    # 100,000 rows through a 4-16-1 MLP in one batch: hashing, sorting and storing a row costs
    # about twice computing it here, far above the 0.3 share
    body = CountingModule(_cheap())
    X, y = _data(100_000)
    est = LayerVariationalAdapter(body, batch_size=100_000).fit(X, y)
    assert cache_info()["rows"] == 0 and cache_info()["bytes"] == 0
    assert body.rows_seen == len(X)  # not cached: no determinism probe either
    again = LayerVariationalAdapter(body, batch_size=100_000).fit(X, y)
    assert body.rows_seen == 2 * len(X)  # remembered: not measured again
    plain = LayerVariationalAdapter(body, batch_size=100_000, cache=False).fit(X, y)
    for fitted in (est, again):
        assert_array_equal(fitted.coef_, plain.coef_)
        assert_array_equal(fitted.intercept_, plain.intercept_)
    clear_cache()  # forgets the choice: the next fit measures again
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_cache, "_worth_caching", lambda cache_seconds, compute_seconds: True)
        LayerVariationalAdapter(body, batch_size=100_000).fit(X, y)
    assert cache_info()["rows"] == len(X)


def test_a_costly_extractor_is_cached_from_its_first_fit(real_rule):
    body = CountingModule(_Slow())
    X, y = _data(200, dtype=np.float64)
    first = LayerVariationalAdapter(body, alpha=0.1, batch_size=64).fit(X, y)
    assert cache_info()["rows"] == len(X)  # the measured first batch was stored too
    assert body.rows_seen == len(X) + 2  # the probe: the first sample alone, twice
    second = LayerVariationalAdapter(body, alpha=0.1, batch_size=64).fit(X, y)
    assert body.rows_seen == len(X) + 2  # all hits
    plain = LayerVariationalAdapter(body, alpha=0.1, batch_size=64, cache=False).fit(X, y)
    for fitted in (first, second):
        assert_array_equal(fitted.coef_, plain.coef_)


def test_a_measured_fit_stores_its_moments_for_the_next_fit():
    # conftest's rule: "auto" caches after measuring; the moments key is computed only then
    body = CountingModule(_cheap())
    X, y = _data(300)
    LayerVariationalAdapter(body, alpha=1.0, batch_size=64).fit(X, y)
    rows_only = len(X) * (1 * 4 + 24)
    assert cache_info()["bytes"] > rows_only + 2 * 8  # rows, index and the fit's moments
    before = dict(_cache._MEMORY._moments)
    assert len(before) == 1
    LayerVariationalAdapter(body, alpha=2.0, batch_size=64).fit(X, y)  # same data: a hit
    assert dict(_cache._MEMORY._moments).keys() == before.keys()


def test_an_abandoned_measurement_does_not_block_other_threads():
    body = _cheap()
    X, y = _data(50)
    net = frozen_copy(body, torch.device("cpu"))
    cached = cached_extractor(net, X, "auto")
    assert cached.measuring
    stream = feature_batches(net, X, 16, cached)
    next(stream)  # the probe's row; then the stream is dropped before the first batch
    stream.close()
    assert not cached.measuring
    done = []
    worker = threading.Thread(target=lambda: done.append(LayerVariationalAdapter(body).fit(X, y)))
    worker.start()
    worker.join(30)
    assert done and not worker.is_alive()


def test_a_directory_named_auto_needs_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    X, y = _data(20, dtype=np.float64)
    LayerVariationalAdapter(_cheap().double(), cache="auto").fit(X, y)
    assert not (tmp_path / "auto").exists()  # "auto" is the default mode, not a directory
    LayerVariationalAdapter(_cheap().double(), cache="./auto").fit(X, y)
    assert (tmp_path / "auto").is_dir()
