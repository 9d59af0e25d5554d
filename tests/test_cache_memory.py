"""The in-memory feature cache: what it holds is what it counts, and it serves fresh features.

Oracles are independent of the cache: a plain torch forward of the module, a fit with
``cache=False``, and tracemalloc's count of the bytes the process holds.
"""

import gc
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal
from torch import nn

from skl_transfer import LayerVariationalAdapter, _cache, cache_info, clear_cache, set_cache_limit


def _mlp(n_in, d, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 16, dtype=dtype), nn.ReLU(), nn.Linear(16, d, dtype=dtype)).eval()


def _forward(net, X):
    with torch.no_grad():
        return net(torch.as_tensor(X)).numpy()


class _Counted:
    """``compute`` for CachedExtractor.features: the net on rows ``sl`` of X, counting rows."""

    def __init__(self, net, X):
        self.net, self.X, self.rows = net, X, 0

    def __call__(self, sl):
        def compute(idx):
            rows = np.arange(len(self.X))[sl][idx]
            self.rows += len(rows)
            with torch.no_grad():
                return self.net(torch.as_tensor(self.X[rows]))

        return compute


def _extract(net, X, batch, counted=None):
    """All features of X through a CachedExtractor, in batches as the estimators run them."""
    counted = counted or _Counted(net, X)
    cached = _cache.CachedExtractor(True, net, torch.device("cpu"), torch.float32, X)
    parts = []
    for start in range(0, len(X), batch):
        sl = slice(start, min(start + batch, len(X)))
        parts.append(cached.features(X, sl, counted(sl)).numpy())
    return np.concatenate(parts), counted


@pytest.mark.parametrize(
    "n, d, n_in, dtype",
    [(30_000, 1, 4, torch.float32), (4_000, 64, 8, torch.float32), (2_000, 256, 3, torch.float64)],
)
def test_x_accounted_bytes_match_tracemalloc(n, d, n_in, dtype):
    """cache_info()["bytes"] is within 10 % of what the cache really holds (the old cache
    counted 0.6-0.9 of it: one tuple, key and array per row, its OrderedDict)."""
    net = _mlp(n_in, d, dtype)
    rng = np.random.default_rng(0)
    npdtype = np.float32 if dtype == torch.float32 else np.float64
    X, X2 = (rng.normal(size=(n, n_in)).astype(npdtype) for _ in range(2))
    y = rng.normal(size=n)
    # warm-up: first-use allocations of torch, sklearn and the hashing keys are not the cache's
    LayerVariationalAdapter(net, alpha=1.0).fit(X[:50], y[:50]).predict(X2[:50])
    clear_cache()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        est = LayerVariationalAdapter(net, alpha=1.0).fit(X, y)
        est.predict(X2)  # a second model key's worth of rows: predict's copy
        del est
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    info = cache_info()
    assert info["rows"] >= 2 * n
    assert abs(info["bytes"] - grown) <= 0.1 * grown, (info["bytes"], grown)
    itemsize = np.dtype(npdtype).itemsize
    # and it holds little beyond the features: the keys' index (24 bytes a row) and chunk headers
    assert info["bytes"] <= 2 * n * (d * itemsize + 24 + 1) * 1.05 + (d + 1) ** 2 * 8 + 64 * 1024


def test_bound_holds_and_evicted_rows_come_back():
    net = _mlp(4, 32)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(5_000, 4)).astype(np.float32)
    try:
        set_cache_limit(200_000)  # about a third of the features
        Z, counted = _extract(net, X, 256)
        info = cache_info()
        assert 0 < info["bytes"] <= info["max_bytes"] and 0 < info["rows"] < 5_000
        np.testing.assert_array_equal(Z, _forward(net, X))
        assert counted.rows == 5_000
        # the most recent rows are held (hits), the oldest were evicted: recomputed, held again
        Xr = X[::-1].copy()
        Z2, counted2 = _extract(net, Xr, 256)
        np.testing.assert_array_equal(Z2, _forward(net, Xr))
        assert 0 < counted2.rows < 5_000
        assert cache_info()["bytes"] <= 200_000
    finally:
        set_cache_limit(_cache.DEFAULT_LIMIT)


def test_rows_are_served_bitwise_in_any_order_and_subset():
    net = _mlp(6, 24)
    rng = np.random.default_rng(2)
    X = rng.normal(size=(3_000, 6)).astype(np.float32)
    ref = _forward(net, X)
    Z, counted = _extract(net, X, 300)
    assert_array_equal(Z, ref) and counted.rows == 3_000
    for idx in (
        rng.permutation(3_000),
        np.sort(rng.choice(3_000, 700, replace=False)),
        np.arange(3_000)[::-7],
    ):
        Zi, c = _extract(net, np.ascontiguousarray(X[idx]), 128)
        assert_array_equal(Zi, ref[idx])
        assert c.rows == 0  # all hits, through the scattered-slot path
    # half old rows, half new: only the new ones run
    Xn = np.concatenate([X[:500], rng.normal(size=(500, 6)).astype(np.float32)])[rng.permutation(1_000)]
    Zn, c = _extract(net, Xn, 64)
    assert_array_equal(Zn, _forward(net, Xn))
    assert c.rows == 500


def test_repeated_samples_run_once_across_batches():
    net = _mlp(3, 8)
    rng = np.random.default_rng(3)
    A = rng.normal(size=(100, 3)).astype(np.float32)
    X = np.concatenate([A, A, A[::-1]])
    Z, counted = _extract(net, X, 50)
    assert_array_equal(Z, _forward(net, X))
    assert counted.rows == 100
    assert cache_info()["rows"] == 100


@pytest.mark.parametrize("width, dtype", [(1, np.float16), (3, np.float16), (5, np.int8), (700, np.float32)])
def test_row_keys_tell_rows_apart(width, dtype):
    """Each single-bit change anywhere in a row changes its key (narrow rows by the
    multilinear hash, rows over 2 KiB by SHA-256); equal rows have equal keys."""
    rng = np.random.default_rng(4)
    base = rng.integers(0, 100, size=(1, width)).astype(dtype)
    nbytes = base.nbytes
    flips = np.repeat(base, 8 * nbytes, axis=0)
    raw = flips.view(np.uint8).reshape(8 * nbytes, nbytes)
    for bit in range(8 * nbytes):
        raw[bit, bit // 8] ^= 1 << (bit % 8)
    rows = np.concatenate([base, base, flips])
    keys = _cache.row_keys(np.ascontiguousarray(rows))
    assert keys.shape == (len(rows), 2) and keys.dtype == np.uint64
    assert (keys[0] == keys[1]).all()
    assert len(np.unique(keys[1:], axis=0)) == len(rows) - 1


def test_threads_sharing_rows_compute_each_once():
    net = _mlp(5, 16)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(4_000, 5)).astype(np.float32)
    parts = [X[:3_000], X[1_000:], X[rng.permutation(4_000)]]
    counter = _Counted(net, X)
    lock = threading.Lock()
    results = [None] * len(parts)

    def run(i):
        c = _Counted(net, parts[i])
        results[i] = _extract(net, parts[i], 200, c)[0]
        with lock:
            counter.rows += c.rows

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for part, Z in zip(parts, results, strict=True):
        assert_array_equal(Z, _forward(net, part))
    assert counter.rows == 4_000


def test_moments_entries_are_counted_and_evicted():
    net = _mlp(4, 128)
    rng = np.random.default_rng(6)
    X = rng.normal(size=(400, 4)).astype(np.float32)
    y = rng.normal(size=400)
    LayerVariationalAdapter(net, alpha=1.0).fit(X, y)
    rows_only = 400 * (128 * 4 + 24)
    assert cache_info()["bytes"] >= rows_only + 128 * 128 * 8  # the d x d moments of the fit
    plain = LayerVariationalAdapter(net, alpha=1.0, cache=False).fit(X, y)
    again = LayerVariationalAdapter(net, alpha=1.0).fit(X, y)  # moments from the cache
    assert_array_equal(again.coef_, plain.coef_)
    clear_cache()
    assert cache_info()["bytes"] == 0 and cache_info()["rows"] == 0
