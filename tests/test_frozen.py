"""The frozen copy and the row keys kept for the next fit (issue 16): a search copies and hashes
an unchanged extractor once, hashes each fold once, and every change is still seen (oracles: a
fit with the cache off on a copy of the module, never kept before, and the row hash computed
afresh)."""

import copy
import gc
import weakref

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.model_selection import GridSearchCV
from torch import nn

from skl_transfer import (
    CacheKeyWarning,
    LayerVariationalAdapter,
    _cache,
    _fingerprint,
    _frozen,
    clear_cache,
    config_context,
    get_config,
    set_config,
)


def _body(width=16, d_in=6):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()).double()


def _data(n=80, d_in=6):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d_in))
    return X, X[:, 0] - 0.5 * X[:, 1] + 0.1 * rng.normal(size=n)


def _oracle(body, head, **params):
    """An estimator that fits a fresh copy of ``body``: a module no fit has kept a copy of."""
    return LayerVariationalAdapter(copy.deepcopy(body), head, cache=False, **params)


def test_a_search_copies_and_hashes_an_unchanged_extractor_once(monkeypatch):
    clear_cache()
    body, head = _body(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    copies, hashes = [], []
    real_copy, real_hash = _frozen.frozen_copy, _fingerprint.fingerprint
    monkeypatch.setattr(_frozen, "frozen_copy", lambda m, d: copies.append(1) or real_copy(m, d))
    monkeypatch.setattr(_fingerprint, "fingerprint", lambda net: hashes.append(1) or real_hash(net))
    grid = {"alpha": [0.01, 0.1, 1.0, 10.0]}
    search = GridSearchCV(LayerVariationalAdapter(body, head, cache=True), grid, cv=3).fit(X, y)
    assert (len(copies), len(hashes)) == (1, 1)  # 13 fits and 12 predicts
    oracle = GridSearchCV(_oracle(body, head), grid, cv=3).fit(X, y)
    assert_allclose(search.cv_results_["mean_test_score"], oracle.cv_results_["mean_test_score"], rtol=1e-10)
    assert_allclose(search.best_estimator_.coef_, oracle.best_estimator_.coef_, rtol=1e-10)


@pytest.mark.parametrize("cache", [True, False])  # the copy is kept with the cache off too
@pytest.mark.parametrize("how", ["no_grad in place", ".data", "numpy view", "training flag", "negative zero"])
def test_a_kept_copy_is_not_reused_once_the_extractor_changed(how, cache):
    clear_cache()
    body, head = _body(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    body[2].bias.data[0] = 0.0
    first = LayerVariationalAdapter(body, head, cache=cache).fit(X, y)
    assert LayerVariationalAdapter(body, head, cache=cache).fit(X, y)._extractor is first._extractor
    if how == "no_grad in place":
        with torch.no_grad():
            body[2].bias.add_(0.5)
    elif how == ".data":  # no version counter moves
        body[2].weight.data[3, 5] += 1.0
    elif how == "numpy view":
        body[0].weight.detach().numpy()[1, 2] *= -3.0
    elif how == "training flag":  # a user's module in train mode: the copy is eval all the same
        body.train(not body.training)
    else:  # the same value, other bits: the digest is bitwise, so the copy must follow
        body[2].bias.data[0] = -0.0
    second = LayerVariationalAdapter(body, head, cache=cache).fit(X, y)
    oracle = _oracle(body, head).fit(X, y)
    assert second._extractor is not first._extractor
    for a, b in zip(second.extractor_.parameters(), body.parameters(), strict=True):
        assert torch.equal(a.view(torch.int64), b.view(torch.int64))
    assert_array_equal(second.coef_, oracle.coef_)  # the cache promises the same bits
    assert_array_equal(second.predict(X), oracle.predict(X))
    changed = how not in ("training flag", "negative zero")
    assert changed == (np.abs(first.coef_ - second.coef_).max() > 1e-6)


def test_extractor_gives_each_estimator_its_own_copy_and_predict_follows_it():
    clear_cache()
    body, head = _body(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    one = LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    two = LayerVariationalAdapter(body, head, alpha=2.0, cache=True).fit(X, y)
    assert one._extractor is two._extractor  # shared while nobody holds it
    mine = one.extractor_
    assert mine is one.extractor_ and mine is not two._extractor
    assert all(p is not q for p, q in zip(mine.parameters(), body.parameters(), strict=True))
    with torch.no_grad():
        mine[0].weight.mul_(2.0)  # an edit to a fitted attribute: this estimator's alone
    with torch.no_grad():
        Z = mine(torch.from_numpy(X)).numpy()
    assert_allclose(one.predict(X), Z @ one.coef_ + one.intercept_, rtol=1e-10, atol=1e-12)
    oracle = _oracle(body, head, alpha=2.0).fit(X, y)
    assert_allclose(two.predict(X), oracle.predict(X), rtol=1e-10, atol=1e-12)
    three = LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    assert_allclose(three.coef_, _oracle(body, head).fit(X, y).coef_, rtol=1e-10)


def test_the_row_keys_kept_for_an_array_are_those_of_its_bits():
    clear_cache()
    rng = np.random.default_rng(1)
    wide = rng.normal(size=(50, 3, 40)).astype(np.float32)  # 480 bytes a row: the multilinear hash
    image = rng.normal(size=(20, 1, 32, 32)).astype(np.float32)  # 4 KB a row: SHA-256
    for X in (wide, image):
        fresh = _cache._hash_rows(X)
        assert_array_equal(_cache._keys_of(X), fresh)
        assert_array_equal(_cache._keys_of(X.copy()), fresh)  # an equal array: the kept keys
        edited = X.copy()
        edited.reshape(len(X), -1)[7, 5] += 1.0
        keys = _cache._keys_of(edited)
        assert_array_equal(keys, _cache._hash_rows(edited))
        assert (keys[7] != fresh[7]).any() and (np.delete(keys, 7, 0) == np.delete(fresh, 7, 0)).all()
        signed = X.copy()
        signed.reshape(len(X), -1)[3, 0] = -0.0
        X.reshape(len(X), -1)[3, 0] = 0.0
        assert_array_equal(_cache._keys_of(signed), _cache._hash_rows(signed))
        assert_array_equal(_cache._keys_of(X), _cache._hash_rows(X))
        assert (_cache._keys_of(signed)[3] != _cache._keys_of(X)[3]).any()


def test_the_kept_keys_are_used_only_for_equal_bits(monkeypatch):
    clear_cache()
    image = np.random.default_rng(2).normal(size=(30, 1, 32, 32)).astype(np.float32)
    calls = []
    real = _cache._hash_rows
    monkeypatch.setattr(_cache, "_hash_rows", lambda X: calls.append(len(X)) or real(X))
    first = _cache._keys_of(image)
    again = _cache._keys_of(image.copy())
    assert calls == [30]  # the second array was compared, not hashed
    assert_array_equal(again, first)
    flipped = image.copy()
    flipped[29, 0, 31, 31] = np.nextafter(flipped[29, 0, 31, 31], np.inf)  # the last bit of the last row
    assert_array_equal(_cache._keys_of(flipped), real(flipped))
    assert calls == [30, 30]


def test_predict_sees_a_change_of_torch_global_state():
    """A shared copy's digest is trusted without a walk, but not across a change of torch's
    global state (here a global forward hook that doubles every module's output)."""
    clear_cache()
    body, head = _body(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    est = LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    oracle = _oracle(body, head).fit(X, y)
    assert_array_equal(est.predict(X), oracle.predict(X))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: 2.0 * out)
    try:
        assert_array_equal(est.predict(X), oracle.predict(X))
    finally:
        handle.remove()
    assert_array_equal(est.predict(X), oracle.predict(X))


class _Counting(nn.Module):
    """A forward that changes its own attribute: its copy is not reused once it ran."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 16, dtype=torch.float64)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.lin(x))


def test_a_copy_whose_forward_changed_it_is_not_reused():
    clear_cache()
    body, head = _Counting(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    with pytest.warns(CacheKeyWarning, match="changes its own"):
        first = LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    second = LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    assert second._extractor is not first._extractor and body.calls == 0
    assert_array_equal(second.coef_, _oracle(body, head).fit(X, y).coef_)


class _Config:
    def __init__(self, scale):
        self.scale = scale


class _Configured(nn.Module):
    """A value read from an object of the user's own class: keyed by its type only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 16, dtype=torch.float64)
        self.config = _Config(1.0)

    def forward(self, x):
        return torch.tanh(self.config.scale * self.lin(x))


def test_a_module_with_state_the_walk_cannot_see_is_copied_for_each_fit(monkeypatch):
    clear_cache()
    body, head = _Configured(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    first = LayerVariationalAdapter(body, head, cache=True).fit(X[:40], y[:40])
    body.config.scale = 3.0  # unseen by the digest: rows already cached stay (documented)
    second = LayerVariationalAdapter(body, head, cache=True).fit(X[40:], y[40:])  # new rows
    oracle = _oracle(body, head).fit(X[40:], y[40:])
    assert second._extractor is not first._extractor and second._extractor.config.scale == 3.0
    assert_array_equal(second.coef_, oracle.coef_)
    walked = []  # and the module itself is not walked again for nothing (only its copies are)
    real = _fingerprint.walk
    monkeypatch.setattr(_fingerprint, "walk", lambda net: walked.append(net is body) or real(net))
    LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    assert walked and not any(walked)


class _Phased(nn.Module):
    """A complex128 buffer (16-byte elements) in the forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 16, dtype=torch.float64)
        self.register_buffer("phase", torch.full((16,), 0.5 + 0.25j, dtype=torch.complex128))

    def forward(self, x):
        return torch.tanh(self.lin(x) * self.phase.real + self.phase.imag)


def test_a_complex_buffer_is_compared_bitwise():
    clear_cache()
    body, head = _Phased(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    first = LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    again = LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    assert again._extractor is first._extractor
    body.phase.data[3] = 0.5 - 0.25j  # the imaginary part only, through .data
    third = LayerVariationalAdapter(body, head, cache=True).fit(X, y)
    assert third._extractor is not first._extractor
    assert_array_equal(third.coef_, _oracle(body, head).fit(X, y).coef_)


def test_a_copy_no_other_estimator_holds_is_handed_out_as_it_is():
    X, y = _data()
    model = nn.Sequential(_body(), nn.Linear(16, 1, dtype=torch.float64))
    est = LayerVariationalAdapter(model, "1").fit(X, y)  # a named layer's model: never kept
    held = est._extractor
    assert est.extractor_ is held  # never kept, so never shared: no second copy


class _Scaled(nn.Module):
    """A user's class whose forward reads a plain attribute and a tensor attribute."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = _body()
        self.scale = 1.0
        self.shift = torch.zeros(16, dtype=torch.float64)

    def forward(self, x):
        return self.scale * self.body(x) + self.shift


def _edit(body, how):
    """Change ``body`` (a _Scaled) in a way that torch's version counters or identities show."""
    lin = body.body[2]
    if how == "no_grad in place":
        with torch.no_grad():
            lin.weight[3, 5] += 1.0
    elif how == "load_state_dict":
        state = {k: v.clone() for k, v in body.state_dict().items()}
        state["body.2.bias"][0] += 1.0
        body.load_state_dict(state)
    elif how == "nn.init":
        nn.init.normal_(lin.bias, generator=torch.Generator().manual_seed(1))
    elif how == "new parameter":
        lin.bias = nn.Parameter(lin.bias.detach() + 1.0)
    elif how == "set data":  # the same Parameter object, a new storage
        lin.weight.data = lin.weight.detach() * 2.0
    elif how == "plain attribute":
        body.scale = 2.0
    elif how == "tensor attribute in place":
        body.shift.add_(1.0)
    elif how == "forward hook":
        body.body.register_forward_hook(lambda m, args, out: out * 2.0)
    elif how == "class code":  # monkeypatched on the user's class (undone by the caller)
        _Scaled.forward = lambda self, x: 2.0 * self.scale * self.body(x) + self.shift
    elif how == "default dtype":  # torch's global state (undone by the caller)
        torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize(
    "how",
    [
        "no_grad in place",
        "load_state_dict",
        "nn.init",
        "new parameter",
        "set data",
        "plain attribute",
        "tensor attribute in place",
        "forward hook",
        "class code",
        "default dtype",
    ],
)
def test_trusting_version_counters_still_sees_every_change_they_show(how):
    clear_cache()
    body, head = _Scaled(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    forward, dtype = _Scaled.forward, torch.get_default_dtype()
    with config_context(trust_version_counters=True):
        first = LayerVariationalAdapter(body, head).fit(X, y)
        kept = first._extractor
        assert LayerVariationalAdapter(body, head).fit(X, y)._extractor is kept  # unchanged: reused
        try:
            _edit(body, how)
            second = LayerVariationalAdapter(body, head).fit(X, y)
            oracle = _oracle(body, head).fit(X, y)
        finally:
            _Scaled.forward = forward
            torch.set_default_dtype(dtype)
    assert second._extractor is not kept
    assert_array_equal(second.coef_, oracle.coef_)
    if how != "default dtype":  # (float64 throughout: the same features)
        moved = np.abs(first.coef_ - second.coef_).max() + abs(first.intercept_ - second.intercept_)
        assert moved > 1e-6  # (a constant shift of the features moves the intercept alone)


def test_trusting_version_counters_misses_writes_no_counter_sees_and_the_default_does_not():
    """The documented price of trust_version_counters: a write through ``.data`` (or a numpy
    view) moves no version counter, so the copy is reused; by default it is not."""
    clear_cache()
    body, head = _Scaled(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    with config_context(trust_version_counters=True):
        kept = LayerVariationalAdapter(body, head).fit(X, y)._extractor
        body.body[2].weight.data[3, 5] += 1.0
        assert LayerVariationalAdapter(body, head).fit(X, y)._extractor is kept
    fitted = LayerVariationalAdapter(body, head).fit(X, y)
    assert fitted._extractor is not kept
    assert_array_equal(fitted.coef_, _oracle(body, head).fit(X, y).coef_)


def test_trusting_version_counters_walks_a_tree_it_cannot_check_shallowly():
    """A module holding a list (mutable in place) is compared bitwise as by default."""
    clear_cache()
    body, head = _Scaled(), nn.Linear(16, 1, dtype=torch.float64)
    body.scales = [1.0]
    X, y = _data()
    with config_context(trust_version_counters=True):
        kept = LayerVariationalAdapter(body, head).fit(X, y)._extractor
        assert LayerVariationalAdapter(body, head).fit(X, y)._extractor is kept
        body.body[2].weight.data[3, 5] += 1.0  # no counter moves, but the walk compares bits
        second = LayerVariationalAdapter(body, head).fit(X, y)
    assert second._extractor is not kept
    assert_array_equal(second.coef_, _oracle(body, head).fit(X, y).coef_)


def test_config_is_checked_and_restored():
    assert get_config() == {"trust_version_counters": False}
    with config_context(trust_version_counters=True):
        assert get_config()["trust_version_counters"] is True
        with pytest.raises(TypeError, match="trust_version_counters must be True or False, got 'yes'"):
            set_config(trust_version_counters="yes")
    assert get_config()["trust_version_counters"] is False
    with pytest.raises(TypeError, match=r"Unknown setting\(s\) \['trust'\]"):
        with config_context(trust=True):
            pass


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("refers", [False, True])
def test_keeping_a_copy_does_not_keep_the_users_module_alive(trust, refers):
    """``deepcopy`` shares functions: a hook whose default holds the module is shared by the
    copy, which the memo (keyed weakly by the module) would then keep alive with the module.
    Such a copy is not kept; others are, and neither keeps the module alive."""
    clear_cache()
    body, head = _Scaled(), nn.Linear(16, 1, dtype=torch.float64)
    if refers:
        body.register_load_state_dict_post_hook(lambda module, keys, owner=body: None)
    X, y = _data()
    with config_context(trust_version_counters=trust):
        est = LayerVariationalAdapter(body, head).fit(X, y)
        again = LayerVariationalAdapter(body, head).fit(X, y)
        assert (again._extractor is est._extractor) != refers
        assert_array_equal(again.coef_, _oracle(body, head).fit(X, y).coef_)
    alive = weakref.ref(body)
    del body, est, again
    gc.collect()
    assert alive() is None


def test_an_inference_tensor_is_compared_bitwise_even_when_trusting_version_counters():
    """A buffer made under torch.inference_mode keeps no version counter: the tree is compared
    bitwise (and walked), with trust_version_counters too."""
    clear_cache()
    body, head = _Scaled(), nn.Linear(16, 1, dtype=torch.float64)
    with torch.inference_mode():
        body.shift = torch.zeros(16, dtype=torch.float64)
    X, y = _data()
    with config_context(trust_version_counters=True):
        kept = LayerVariationalAdapter(body, head).fit(X, y)._extractor
        assert LayerVariationalAdapter(body, head).fit(X, y)._extractor is kept
        with torch.inference_mode():
            body.shift[3] += 1.0  # an in-place write no counter records
        second = LayerVariationalAdapter(body, head).fit(X, y)
    assert second._extractor is not kept
    assert_array_equal(second.intercept_, _oracle(body, head).fit(X, y).intercept_)


# -- what a copy shares with its module, and tensors' own state (a review's findings) -------------

_OUTSIDE = torch.ones(16, dtype=torch.float64)  # a global tensor the forward reads
_OUTSIDE_NET = nn.Linear(16, 16, dtype=torch.float64)  # a global module the forward calls


class _Lin(nn.Module):
    """The layer the modules below read their globals around (no forward of its own)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 16, dtype=torch.float64)


class _ReadsGlobal(_Lin):
    def forward(self, x):
        return torch.tanh(self.lin(x)) * _OUTSIDE


class _ReadsClassTensor(_ReadsGlobal):
    scale = torch.ones(16, dtype=torch.float64)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.scale


class _ReadsDefault(_ReadsGlobal):
    def forward(self, x, scale=torch.ones(16, dtype=torch.float64)):  # noqa: B008 (what is tested)
        return torch.tanh(self.lin(x)) * scale


class _CallsGlobalModule(_ReadsGlobal):
    def forward(self, x):
        return torch.tanh(_OUTSIDE_NET(torch.tanh(self.lin(x))))


def _outside_tensor(body):
    if isinstance(body, _CallsGlobalModule):
        return _OUTSIDE_NET.weight
    if isinstance(body, _ReadsClassTensor):
        return type(body).scale
    if isinstance(body, _ReadsDefault):
        return type(body).forward.__defaults__[0]
    return _OUTSIDE


@pytest.mark.parametrize("cls", [_ReadsGlobal, _ReadsClassTensor, _ReadsDefault, _CallsGlobalModule])
@pytest.mark.parametrize("cache", [True, False])
def test_an_edit_of_a_tensor_the_copy_shares_with_its_module_is_seen(cls, cache):
    # deepcopy shares globals, classes and functions: comparing the copy with its module cannot
    # see such a tensor change (the two hold the same object), so the copy is not kept
    clear_cache()
    body, head = cls(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    shared = _outside_tensor(body)
    before = shared.detach().clone()
    try:
        first = LayerVariationalAdapter(body, head, alpha=0.1, cache=cache).fit(X, y)
        with torch.no_grad():
            shared.mul_(3.0)
        second = LayerVariationalAdapter(body, head, alpha=0.1, cache=cache).fit(X, y)
        oracle = _oracle(body, head, alpha=0.1).fit(X, y)
        assert_array_equal(second.coef_, oracle.coef_)
        assert np.abs(first.coef_ - oracle.coef_).max() > 1e-3  # the edit matters
        # the first estimator's copy reads the edited tensor too: its predict, through the
        # cache, is what it computes with the cache off
        cached = first.predict(X)
        assert_array_equal(cached, first.set_params(cache=False).predict(X))
    finally:
        with torch.no_grad():
            shared.copy_(before)


_SCALE = 1.0  # a global number the forward reads


class _ReadsGlobalNumber(_Lin):  # (not of _ReadsGlobal: its forward reads a global tensor)
    def forward(self, x):
        return torch.tanh(_SCALE * self.lin(x))


def test_predict_through_a_shared_copy_sees_a_change_of_the_globals_its_code_reads():
    # the kept copy runs the class's code, which reads the global as it is now: predict's
    # cache must not serve the rows of the old value
    global _SCALE
    clear_cache()
    body, head = _ReadsGlobalNumber(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    est = LayerVariationalAdapter(body, head, alpha=0.1, cache=True).fit(X, y)
    assert _frozen.is_shared(est._extractor)
    try:
        _SCALE = 3.0
        cached = est.predict(X)
        assert_array_equal(cached, est.set_params(cache=False).predict(X))
    finally:
        _SCALE = 1.0


class _TensorAttribute(nn.Module):
    """A forward that reads a Python attribute set on a tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 16, dtype=torch.float64)
        self.t = torch.ones(16, dtype=torch.float64)
        self.t.scale = 1.0

    def forward(self, x):
        return torch.tanh(self.lin(x)) * (self.t * self.t.scale)


@pytest.mark.parametrize("cache", [True, False])
def test_an_attribute_set_on_a_tensor_is_seen(cache):
    clear_cache()
    body, head = _TensorAttribute(), nn.Linear(16, 1, dtype=torch.float64)
    X, y = _data()
    first = LayerVariationalAdapter(body, head, alpha=0.1, cache=cache).fit(X, y)
    body.t.scale = 3.0
    second = LayerVariationalAdapter(body, head, alpha=0.1, cache=cache).fit(X, y)
    assert second._extractor is not first._extractor and second._extractor.t.scale == 3.0
    assert_array_equal(second.coef_, _oracle(body, head, alpha=0.1).fit(X, y).coef_)
    # the digest keys it too: another value is another model
    assert _fingerprint.fingerprint(first._extractor) != _fingerprint.fingerprint(second._extractor)


def _conv_body():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    body.notes = ["a list: the walk's path, not the shallow check"]
    return body


@pytest.mark.parametrize("cache", [True, False])
def test_a_change_of_memory_format_is_seen(cache):
    # channels_last runs other convolution kernels, which round otherwise: another model
    clear_cache()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3, 8, 8)).astype(np.float32)
    y = X[:, 0, 0, 0] + 0.1 * rng.normal(size=40)
    body, head = _conv_body(), nn.Linear(64, 1)
    first = LayerVariationalAdapter(body, head, alpha=0.1, cache=cache).fit(X, y)
    body.to(memory_format=torch.channels_last)
    second = LayerVariationalAdapter(body, head, alpha=0.1, cache=cache).fit(X, y)
    assert second._extractor is not first._extractor
    assert second._extractor[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_array_equal(second.coef_, _oracle(body, head, alpha=0.1).fit(X, y).coef_)


@pytest.mark.parametrize(
    "value",
    [
        torch.ones(3, dtype=torch.complex128).conj(),  # a lazy conjugate
        torch.ones(3, dtype=torch.complex128).conj().imag,  # a lazy negation
        torch.empty(3, device="meta"),
    ],
    ids=["conj bit", "neg bit", "meta"],
)
def test_tensor_attributes_of_every_kind_are_compared_without_error(value):
    clear_cache()
    body, head = _body(), nn.Linear(16, 1, dtype=torch.float64)
    body.extra = value  # unused by the forward
    X, y = _data()
    first = LayerVariationalAdapter(body, head, cache=False).fit(X, y)
    again = LayerVariationalAdapter(body, head, cache=False).fit(X, y)
    assert again._extractor is first._extractor
    assert_array_equal(again.coef_, _oracle(body, head).fit(X, y).coef_)
    assert _fingerprint.same_bits(value, copy.deepcopy(value))


def test_a_torchscript_extractor_is_fitted_and_not_cached():
    import warnings

    clear_cache()
    X, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated
        body = torch.jit.trace(_body(), torch.zeros(2, 6, dtype=torch.float64))
    head = nn.Linear(16, 1, dtype=torch.float64)
    with pytest.warns(CacheKeyWarning, match="TorchScript module"):
        est = LayerVariationalAdapter(body, head, alpha=0.1, cache=True).fit(X, y)
    assert all(p.requires_grad for p in body.parameters())  # the user's module untouched
    oracle = LayerVariationalAdapter(_body(), head, alpha=0.1, cache=False).fit(X, y)
    assert_allclose(est.coef_, oracle.coef_, rtol=1e-12)
