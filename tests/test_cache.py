"""The feature cache: each distinct sample through the extractor once, results unchanged."""

import joblib
import numpy as np
import pytest
import torch
from conftest import CountingModule, FileCountingModule, make_body, make_head
from numpy.testing import assert_array_equal
from sklearn.model_selection import GridSearchCV, KFold, cross_validate, learning_curve
from torch import nn

from skl_transfer import LayerVariationalAdapter, cache_info, set_cache_limit

ALPHAS = [0.01, 0.1, 1.0, 10.0, 100.0]


def _data(n=100, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    return X, np.tanh(X @ rng.normal(size=5)) + 0.1 * rng.normal(size=n)


def _plain_body():
    # torch's own layers only, so that worker processes can unpickle it anywhere
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Linear(5, 16, dtype=torch.float64), nn.Tanh(), nn.Linear(16, 16, dtype=torch.float64)
    )


def test_grid_search_runs_the_extractor_once_per_sample():
    body = CountingModule(make_body())
    X, y = _data()
    GridSearchCV(LayerVariationalAdapter(body, make_head()), {"alpha": ALPHAS}, cv=5).fit(X, y)
    # 5 alphas x 5 folds x (train + test) + refit, once each; +2: the determinism probe runs the
    # first sample alone twice the first time a model is seen in a process
    assert body.rows_seen == len(X) + 2


def test_learning_curve_and_cross_validate_run_the_extractor_once_per_sample():
    body = CountingModule(make_body())
    X, y = _data(120)
    est = LayerVariationalAdapter(body, make_head(), alpha=0.1)
    learning_curve(est, X, y, train_sizes=[10, 40, 80], cv=KFold(3, shuffle=True, random_state=0))
    cross_validate(est, X, y, cv=4)
    assert body.rows_seen == len(X) + 2  # +2: the determinism probe (first sample alone, twice)


def test_cached_and_uncached_fits_are_identical():
    body, head = make_body().float(), make_head().float()
    X, y = _data(300)
    plain = LayerVariationalAdapter(body, head, alpha=0.1, cache=False).fit(X, y)
    cold = LayerVariationalAdapter(body, head, alpha=0.1).fit(X, y)
    warm = LayerVariationalAdapter(body, head, alpha=0.1).fit(X, y)
    for est in (cold, warm):
        assert_array_equal(est.coef_, plain.coef_)
        assert_array_equal(est.intercept_, plain.intercept_)
        assert_array_equal(est.predict(X), plain.predict(X))
    dual_plain = LayerVariationalAdapter(body, head, cache=False).fit(X[:10], y[:10])
    dual_warm = LayerVariationalAdapter(body, head).fit(X[:10], y[:10])
    assert_array_equal(dual_warm.coef_, dual_plain.coef_)


def test_changed_weights_inputs_or_dtype_are_misses():
    body = CountingModule(make_body())
    X, y = _data(50)
    LayerVariationalAdapter(body).fit(X, y)
    assert body.rows_seen == 52  # +2 on each new model: the determinism probe runs its first sample twice
    LayerVariationalAdapter(body).fit(X, y)
    assert body.rows_seen == 52  # all hits
    X2 = X.copy()
    X2[7, 2] += 1e-12  # one changed input row
    LayerVariationalAdapter(body).fit(X2, y)
    assert body.rows_seen == 53
    with torch.no_grad():
        body.inner[0].weight[0, 0] += 1e-12  # one changed weight: every row is new
    LayerVariationalAdapter(body).fit(X, y)
    assert body.rows_seen == 105
    body.inner[2].running_mean.add_(1e-3)  # a changed buffer too
    LayerVariationalAdapter(body).fit(X, y)
    assert body.rows_seen == 157
    LayerVariationalAdapter(body).fit(X.astype(np.float32), y)  # other input dtype
    assert body.rows_seen == 209
    LayerVariationalAdapter(body, cache=False).fit(X, y)
    assert body.rows_seen == 259


def test_memory_bound_and_disabling():
    body = CountingModule(make_body())
    X, y = _data(200)
    try:
        set_cache_limit(100 * 16 * 8)  # room for 100 float64 rows of 16 features
        LayerVariationalAdapter(body).fit(X, y)
        info = cache_info()
        assert info["bytes"] <= info["max_bytes"] == 12800 and 0 < info["rows"] <= 100
        set_cache_limit(0)
        LayerVariationalAdapter(body).fit(X, y)
        LayerVariationalAdapter(body).fit(X, y)
        # +2: the determinism probe runs the first sample alone twice when the model is first seen
        assert body.rows_seen == 602 and cache_info()["rows"] == 0
    finally:
        set_cache_limit(1 << 30)
    with pytest.raises(ValueError, match="max_bytes"):
        set_cache_limit(-1)


def test_threading_backend_shares_the_process_cache():
    body = CountingModule(make_body())
    X, y = _data()
    est = LayerVariationalAdapter(body, make_head())
    with joblib.parallel_backend("threading", n_jobs=2):
        par = GridSearchCV(est, {"alpha": ALPHAS}, cv=5).fit(X, y)
    assert body.rows_seen == len(X) + 2  # +2: the determinism probe (first sample alone, twice)
    ref = GridSearchCV(
        LayerVariationalAdapter(make_body(), make_head(), cache=False), {"alpha": ALPHAS}, cv=5
    )
    ref.fit(X, y)
    np.testing.assert_allclose(
        par.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"], rtol=1e-12
    )


@pytest.mark.parametrize("as_memory", [False, True])
def test_directory_cache_across_loky_workers(tmp_path, as_memory):
    counter = tmp_path / "rows.txt"
    body = FileCountingModule(_plain_body(), counter)
    location = tmp_path / "features"
    cache = joblib.Memory(location, verbose=0) if as_memory else str(location)
    X, y = _data()
    est = LayerVariationalAdapter(body, nn.Linear(16, 1, dtype=torch.float64), cache=cache)
    par = GridSearchCV(est, {"alpha": ALPHAS}, cv=5, n_jobs=2).fit(X, y)
    # the determinism probe runs the first sample alone twice, once per process and model: at
    # most two extra rows per worker (none in a worker that finds the first row in the directory)
    assert len(X) <= body.rows_seen() <= len(X) + 4
    ref = GridSearchCV(est.set_params(cache=False), {"alpha": ALPHAS}, cv=5).fit(X, y)
    np.testing.assert_allclose(
        par.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"], rtol=1e-12
    )


def test_cached_moments_follow_targets_weights_and_prior():
    body = make_body()
    X, y = _data(120)
    rng = np.random.default_rng(9)
    variants = [
        dict(y=y, sw=None, head=make_head()),
        dict(y=y + 1.0, sw=None, head=make_head()),  # other targets
        dict(y=y, sw=rng.uniform(0.5, 1.5, 120), head=make_head()),  # other weights
        dict(y=y, sw=None, head=make_head(seed=7)),  # other prior
    ]
    for v in variants * 2:  # the second round hits the caches
        cached = LayerVariationalAdapter(body, v["head"], alpha=0.1).fit(X, v["y"], sample_weight=v["sw"])
        plain = LayerVariationalAdapter(body, v["head"], alpha=0.1, cache=False).fit(
            X, v["y"], sample_weight=v["sw"]
        )
        assert_array_equal(cached.coef_, plain.coef_)
        assert_array_equal(cached.intercept_, plain.intercept_)


def test_bfloat16_and_integer_tensor_inputs_are_keyed_by_dtype():
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 8)

        def forward(self, x):
            return torch.tanh(self.lin(x.float()))

    body = Cast()
    Xi = torch.randint(1, 50, (64, 4), dtype=torch.int32)
    Xf = Xi.view(torch.float32)  # the same bytes, another dtype
    y = np.random.default_rng(0).normal(size=64)
    LayerVariationalAdapter(body).fit(Xi, y)
    cached = LayerVariationalAdapter(body).fit(Xf, y)
    plain = LayerVariationalAdapter(body, cache=False).fit(Xf, y)
    assert_array_equal(cached.coef_, plain.coef_)
    Xb = torch.randn(50, 4).bfloat16()
    bf = nn.Linear(4, 8).bfloat16()
    a = LayerVariationalAdapter(bf).fit(Xb, y[:50])
    b = LayerVariationalAdapter(bf).fit(Xb, y[:50])
    c = LayerVariationalAdapter(bf, cache=False).fit(Xb, y[:50])
    assert_array_equal(a.coef_, c.coef_)
    assert_array_equal(b.coef_, c.coef_)


def test_hooks_and_tensor_attributes_are_part_of_the_key():
    body = CountingModule(make_body())
    X, y = _data(30)
    LayerVariationalAdapter(body).fit(X, y)
    handle = body.inner.register_forward_hook(lambda m, i, o: o * 2.0)
    doubled = LayerVariationalAdapter(body).fit(X, y)
    assert body.rows_seen == 64  # a hook changes forward: a miss (+2 per new model: the probe)
    assert_array_equal(doubled.coef_, LayerVariationalAdapter(body, cache=False).fit(X, y).coef_)
    handle.remove()
    body.scale = torch.ones(1)
    LayerVariationalAdapter(body).fit(X, y)
    body.scale.mul_(3.0)  # a plain tensor attribute changed in place
    LayerVariationalAdapter(body).fit(X, y)
    assert body.rows_seen == 158  # 5 fits of 30, 4 new models probed


def test_partial_fit_and_dask_do_not_fill_the_cache():
    body = make_body()
    X, y = _data(200)
    est = LayerVariationalAdapter(body)
    for idx in np.array_split(np.arange(200), 10):
        est.partial_fit(X[idx], y[idx])
    assert cache_info()["rows"] == 0
