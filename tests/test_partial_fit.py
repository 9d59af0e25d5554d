"""Out-of-core fitting: partial_fit over batches equals fit on the concatenation."""

import gc
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import CountingModule, make_body, make_head
from numpy.testing import assert_allclose

from skl_transfer import LayerVariationalAdapter


def _data(n, n_in=5, k=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in)) + 3.0  # an offset: raw sums would lose digits, moments do not
    y = np.tanh(X @ rng.normal(size=(n_in, k))) + 0.1 * rng.normal(size=(n, k))
    return X, y


@pytest.mark.parametrize("fit_intercept", ["auto", False])
@pytest.mark.parametrize("weighted", [False, True])
def test_partial_fit_equals_fit_on_concatenation(weighted, fit_intercept):
    body, head = make_body(), make_head(n_out=2)
    X, y = _data(400)
    sw = np.random.default_rng(1).uniform(0.0, 2.0, 400) if weighted else None
    full = LayerVariationalAdapter(body, head, alpha=0.3, fit_intercept=fit_intercept).fit(
        X, y, sample_weight=sw
    )
    part = LayerVariationalAdapter(body, head, alpha=0.3, fit_intercept=fit_intercept, batch_size=16)
    for idx in np.array_split(np.arange(400), 23):  # uneven batches, some smaller than d
        part.partial_fit(X[idx], y[idx], sample_weight=None if sw is None else sw[idx])
    assert part.n_samples_seen_ == 400
    assert_allclose(part.coef_, full.coef_, rtol=1e-10, atol=1e-12)
    assert_allclose(part.intercept_, full.intercept_, rtol=1e-10, atol=1e-12)
    assert_allclose(part.residue_norm_, full.residue_norm_, rtol=1e-10)
    assert_allclose(part.predict(X), full.predict(X), rtol=1e-10, atol=1e-12)


def test_partial_fit_without_extractor_and_continuing_a_fit():
    X, y = _data(300, n_in=6, k=1)
    y = y[:, 0]
    W0 = np.linspace(-1, 1, 6)
    full = LayerVariationalAdapter(head=(W0, 0.5), alpha=0.0).fit(X, y)
    first = LayerVariationalAdapter(head=(W0, 0.5), alpha=0.0).fit(X[:100], y[:100])
    for idx in np.array_split(np.arange(100, 300), 4):
        first.partial_fit(X[idx], y[idx])
    assert_allclose(first.coef_, full.coef_, rtol=1e-10)
    assert_allclose(first.intercept_, full.intercept_, rtol=1e-10)
    assert first.coef_.shape == (6,)


def test_partial_fit_errors():
    body, head = make_body(), make_head(n_out=2)
    X, y = _data(40)
    est = LayerVariationalAdapter(body, head).partial_fit(X[:20], y[:20])
    with pytest.raises(ValueError, match="same shape in every call"):
        est.partial_fit(X[20:], y[20:, 0])
    with pytest.raises(ValueError, match=r"per-sample shape \(4,\)"):
        est.partial_fit(X[20:, :4], y[20:])
    dual = LayerVariationalAdapter(body, head).fit(X[:8], y[:8])  # 8 samples < 16 features
    assert dual.solver_ == "dual"
    with pytest.raises(ValueError, match="dual solver"):
        dual.partial_fit(X[8:], y[8:])


def test_partial_fit_memory_does_not_grow_with_batches():
    X, y = _data(50 * 256, n_in=32, k=1)  # 50 batches of 256 x 32 float64 (64 KiB each)
    est = LayerVariationalAdapter(alpha=1.0)
    peaks, held = [], []
    tracemalloc.start()
    try:
        for i, idx in enumerate(np.array_split(np.arange(len(X)), 50)):
            tracemalloc.reset_peak()
            est.partial_fit(X[idx], y[idx, 0])
            gc.collect()  # what stays held, not what a collection has yet to free
            current, peak = tracemalloc.get_traced_memory()
            if i >= 5:  # after the first calls' one-off caches (imports, sklearn, scipy)
                peaks.append(peak)
                held.append(current)
    finally:
        tracemalloc.stop()
    # neither what a call holds at its peak nor what stays held afterwards grows with the
    # number of batches: over 44 calls, less than one batch (64 KiB; a few hundred bytes per
    # call come from the interpreter and scipy, not from data, up to 25 KiB in all measured).
    # Holding a batch per call would add 2.8 MiB; holding its 32 x 32 Gram matrix, 350 KiB.
    assert max(peaks[-10:]) <= 1.2 * max(peaks[:10])
    assert held[-1] - held[0] < 64 * 1024


def test_partial_fit_zero_weight_batches_and_errors():
    body, head = make_body(), make_head(n_out=2)
    X, y = _data(120)
    sw = np.ones(120)
    sw[:30] = 0.0  # the first batch carries no weight at all
    full = LayerVariationalAdapter(body, head, alpha=0.2).fit(X, y, sample_weight=sw)
    part = LayerVariationalAdapter(body, head, alpha=0.2)
    with pytest.raises(ValueError, match="zero sample_weight"):
        part.partial_fit(X[:30], y[:30], sample_weight=sw[:30])
    for idx in np.array_split(np.arange(120), 4):
        try:
            part.partial_fit(X[idx], y[idx], sample_weight=sw[idx])
        except ValueError:
            assert idx[0] == 0  # only while no positive weight has been seen
    assert_allclose(part.coef_, full.coef_, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="requires y"):
        part.partial_fit(X[:5], None)
    with pytest.raises(ValueError, match="fit_intercept changed"):
        part.set_params(fit_intercept=False).partial_fit(X[:5], y[:5])


# -- fit on an iterable of batches (a DataLoader): the out-of-core input path ------------------


def test_fit_on_a_dataloader_equals_fit_in_memory():
    from torch.utils.data import DataLoader, TensorDataset

    body, head = make_body(), make_head(n_out=2)
    rng = np.random.default_rng(4)
    X, y, sw = rng.normal(size=(300, 5)), rng.normal(size=(300, 2)), rng.uniform(0.1, 2.0, size=300)
    expected = LayerVariationalAdapter(body, head, alpha=0.3).fit(X, y, sample_weight=sw)
    data = DataLoader(TensorDataset(*(torch.as_tensor(a) for a in (X, y, sw))), batch_size=64)
    counting = CountingModule(body)
    est = LayerVariationalAdapter(counting, head, alpha=0.3).fit(data)
    assert_allclose(est.coef_, expected.coef_, rtol=1e-10, atol=1e-12)
    assert_allclose(est.intercept_, expected.intercept_, rtol=1e-10, atol=1e-12)
    assert_allclose(est.residual_norm_, expected.residual_norm_, rtol=1e-8)
    assert est.n_samples_seen_ == 300 and est.input_shape_ == (5,)
    assert counting.rows_seen == 300  # each sample through the extractor once
    assert_allclose(est.predict(X), expected.predict(X), rtol=1e-10, atol=1e-12)


def test_fit_on_a_generator_of_batches_restarts_and_validates():
    body, head = make_body(), make_head()
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(120, 5)), rng.normal(size=120)
    est = LayerVariationalAdapter(body, head, alpha=1.0).fit(X[:30], y[:30])  # an earlier fit is discarded
    est.fit((X[i : i + 50], y[i : i + 50]) for i in range(0, 120, 50))
    expected = LayerVariationalAdapter(body, head, alpha=1.0).fit(X, y)
    assert_allclose(est.coef_, expected.coef_, rtol=1e-10, atol=1e-12)
    assert est.n_samples_seen_ == 120
    with pytest.raises(TypeError, match=r"\(X, y\) or \(X, y, sample_weight\)"):
        LayerVariationalAdapter(body, head).fit(iter([X[:10]]))
    with pytest.raises(ValueError, match="pass y=None"):
        LayerVariationalAdapter(body, head).fit(iter([(X, y)]), y)
    with pytest.raises(ValueError, match="no batches"):
        LayerVariationalAdapter(body, head).fit(iter([]))


def test_partial_fit_refuses_a_head_changed_between_calls():
    # the moments so far hold the residue of the first head: continuing with another was silent
    body = make_body()
    X, y = _data(120)
    est = LayerVariationalAdapter(body, make_head(n_out=2), alpha=0.2)
    est.partial_fit(X[:60], y[:60])
    est.set_params(head=make_head(n_out=2, seed=7))
    with pytest.raises(ValueError, match="head changed between partial_fit calls"):
        est.partial_fit(X[60:], y[60:])
    same = LayerVariationalAdapter(body, make_head(n_out=2), alpha=0.2)  # an equal head continues
    same.partial_fit(X[:60], y[:60])
    same.set_params(head=make_head(n_out=2))
    same.partial_fit(X[60:], y[60:])
    full = LayerVariationalAdapter(body, make_head(n_out=2), alpha=0.2).fit(X, y)
    assert_allclose(same.coef_, full.coef_, rtol=1e-10, atol=1e-12)
