"""The feature cache never serves features of another computation (issue 12, items A1, A2, A4, A5).

Every check compares against an independent oracle: a plain torch forward of the module, or
the same fit with ``cache=False``.
"""

import functools
import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import CountingModule, make_body, make_head, reference_features
from numpy.testing import assert_allclose, assert_array_equal
from torch import nn

from skl_transfer import LayerVariationalAdapter, cache_info


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    from skl_transfer import _fingerprint

    getattr(_fingerprint, "forget", lambda: None)()  # the next fit probes its model again
    getattr(_fingerprint, "_WARNED", set()).clear()  # and warns again


def _data(n=40, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, np.tanh(X @ rng.normal(size=d)) + 0.1 * rng.normal(size=n)


def _fit(body, X, y, **kw):
    return LayerVariationalAdapter(body, alpha=0.1, **kw).fit(X, y)


def _same_as_uncached(body, X, y):
    cached = _fit(body, X, y)
    plain = _fit(body, X, y, cache=False)
    assert_array_equal(cached.coef_, plain.coef_)
    assert_array_equal(cached.predict(X), plain.predict(X))
    return cached


def _define(source, name="Body"):
    """A class defined by exec, as a re-run notebook cell would: same __module__ and __qualname__."""
    namespace = {"torch": torch, "nn": nn, "__name__": "notebook_cell"}
    exec(source, namespace)
    return namespace[name]


BODY = """
class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 8, dtype=torch.float64)

    def forward(self, x):
        return {expr}
"""


def test_redefined_class_with_another_forward_is_a_miss():
    X, y = _data()
    A = _define(BODY.format(expr="torch.tanh(self.lin(x))"))
    B = _define(BODY.format(expr="torch.relu(self.lin(x))"))
    assert (A.__module__, A.__qualname__) == (B.__module__, B.__qualname__)
    a = A()
    b = B()
    b.load_state_dict(a.state_dict())  # same name, same weights, other code
    _same_as_uncached(a, X, y)
    _same_as_uncached(b, X, y)


def test_helpers_class_attributes_and_plain_attributes_are_keyed():
    X, y = _data()
    src = """
def act(x):
    return x * {k}

class Body(nn.Module):
    shift = {shift}

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 8, dtype=torch.float64)
        self.scale = 1.0

    def forward(self, x):
        return act(self.lin(x)) * self.scale + self.shift
"""
    torch.manual_seed(0)
    base = _define(src.format(k=1.0, shift=0.0))()
    state = base.state_dict()
    for k, shift, scale in [(1.0, 0.0, 1.0), (3.0, 0.0, 1.0), (1.0, 2.0, 1.0), (1.0, 0.0, 5.0)]:
        body = _define(src.format(k=k, shift=shift))()  # a global helper, then a class attribute
        body.load_state_dict(state)
        body.scale = scale  # then a plain (non-tensor) attribute
        _same_as_uncached(body, X, y)


def test_object_attributes_are_keyed_by_type_and_do_not_defeat_the_cache():
    class Config:
        pass

    body = CountingModule(make_body())
    body.config = Config()
    X, y = _data()
    _fit(body, X, y)
    seen = body.rows_seen
    body.config = Config()  # another object of the same type: still all hits
    _fit(body, X, y)
    assert body.rows_seen == seen


def _scaler(scale):
    def hook(module, args, out):
        return out * scale

    return hook


class _Scale:
    def __init__(self, scale):
        self.scale = scale

    def hook(self, module, args, out):
        return out * self.scale


def _partial_hook(module, args, out, scale):
    return out * scale


def _pre_hook(module, args, kwargs, scale):
    return (args[0] * scale,), kwargs


REGISTER = {
    "closure": lambda m, s: m.register_forward_hook(_scaler(s)),
    "bound": lambda m, s: m.register_forward_hook(_Scale(s).hook),
    "partial": lambda m, s: m.register_forward_hook(functools.partial(_partial_hook, scale=s)),
    "pre_kwargs": lambda m, s: m.register_forward_pre_hook(
        functools.partial(_pre_hook, scale=s), with_kwargs=True
    ),
    "global": lambda m, s: nn.modules.module.register_module_forward_hook(_scaler(s)),
}


@pytest.mark.parametrize("kind", list(REGISTER))
def test_hook_state_is_keyed(kind):
    X, y = _data()
    body = make_body()
    for scale in (1.0, 100.0):
        handle = REGISTER[kind](body[4], scale)
        try:
            est = _same_as_uncached(body, X, y)
        finally:
            handle.remove()
        if kind == "global":
            continue  # every module scales its output: cache=False above is the oracle
        # independent oracle: a plain forward with the hook's effect done by hand
        ref = copy_eval(body)
        with torch.no_grad():
            h = ref[:4](torch.as_tensor(X))
            Z = ref[5](ref[4](h * scale) if kind == "pre_kwargs" else ref[4](h) * scale).numpy()
        assert_allclose(est.predict(X), Z @ est.coef_ + est.intercept_, rtol=1e-9, atol=1e-12)


def copy_eval(module):
    import copy

    return copy.deepcopy(module).eval()


def test_hook_whose_state_cannot_be_keyed_turns_the_cache_off_with_one_warning():
    class Holder:  # an object of no value kind: its state cannot be read
        def __init__(self, scale):
            self.scale = scale

    X, y = _data()
    body = make_body()
    holder = Holder(1.0)
    handle = body.register_forward_hook(lambda m, a, out: out * holder.scale)
    try:
        with pytest.warns(UserWarning, match="feature cache is not used.*cannot be keyed.*Holder"):
            _fit(body, X, y)
        holder.scale = 100.0  # would be served stale if the first fit had been cached
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning per process and cause
            _same_as_uncached(body, X, y)
        assert cache_info()["rows"] == 0
    finally:
        handle.remove()


class _FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 8, dtype=torch.float64)

    def forward(self, x):
        return nn.functional.dropout(self.lin(x), 0.5, training=True)  # ignores eval()


class _Drifting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 8, dtype=torch.float64)

    def forward(self, x):
        self.lin.bias.add_(1.0)  # changes its own weights
        return self.lin(x)


class _Touching(nn.Module):
    """Same output every run, but forward writes its own buffer in place: refused as well."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 8, dtype=torch.float64)
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        self.seen.mul_(1.0)
        return self.lin(x)


@pytest.mark.parametrize("cache", ["auto", True])
@pytest.mark.parametrize(
    "cls, match",
    [(_FunctionalDropout, "to_module"), (_Drifting, "changes its own"), (_Touching, "changes its own")],
)
def test_nondeterministic_extractors_are_not_cached(cls, match, cache):
    X, y = _data()
    torch.manual_seed(1)
    body = cls()
    init = {k: v.clone() for k, v in body.state_dict().items()}
    results = []
    for seed in (0, 1):
        body.load_state_dict(init)
        torch.manual_seed(seed)
        plain = _fit(body, X, y, cache=False)
        body.load_state_dict(init)
        torch.manual_seed(seed)
        if seed == 0:
            with pytest.warns(UserWarning, match=match):
                cached = _fit(body, X, y, cache=cache)
        else:
            cached = _fit(body, X, y, cache=cache)  # the second fit of the same model: no stale features
        if seed == 1 or cls is _FunctionalDropout or cache == "auto":
            # cache=True probes before the stream: the probe's two runs move a self-changing
            # copy on, so only the later fits, which do not probe again, match cache=False
            # exactly. "auto" runs the first sample once in the stream and re-runs it after (the
            # random state restored either way): every fit matches cache=False.
            assert_array_equal(cached.coef_, plain.coef_)
        results.append(cached.coef_)
    assert cache_info()["rows"] == 0
    if cls is _FunctionalDropout or (cls is _Drifting and cache is True):
        assert not np.array_equal(results[0], results[1])


def _fitted(X, y):
    est = LayerVariationalAdapter(make_body(), make_head(), alpha=0.1).fit(X, y)
    assert est.extractor_ is not None  # its own copy (made on first access): what the edits write
    est.predict(X)  # fills the cache with the fitted copy's rows, and keys that copy
    return est


def _oracle(est, X):
    Z = reference_features(est.extractor_, X)
    return Z @ np.atleast_2d(est.coef_).T.reshape(Z.shape[1], -1)[:, 0] + est.intercept_


EDITS = {
    "in_place": lambda m: m[0].weight.mul_(2.0),
    "new_parameter": lambda m: setattr(m[0], "bias", nn.Parameter(m[0].bias + 1.0)),
    "new_module": lambda m: m.__setitem__(5, nn.Tanh()),
    "hook": lambda m: m[4].register_forward_hook(lambda mod, a, out: out * 3.0),
    "data_replaced": lambda m: setattr(m[0].weight, "data", m[0].weight.data * 3.0),
    "through_data": lambda m: m[0].weight.data.mul_(2.0),  # no version bump: seen by the sampled elements
}


@pytest.mark.parametrize("pickled", [False, True])
@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_extractor_is_never_served_stale_rows(edit, pickled):
    X, y = _data(30)
    est = _fitted(X, y)
    if pickled:
        est = pickle.loads(pickle.dumps(est))
        assert est.extractor_ is not None
        est.predict(X)  # recomputes the digest (never trusted from the pickle), rows are hits
    with torch.no_grad():
        EDITS[edit](est.extractor_)
    assert_allclose(est.predict(X), _oracle(est, X), rtol=1e-9, atol=1e-12)


def test_unpickled_digest_is_recomputed():
    X, y = _data(30)
    est = _fitted(X, y)
    state = pickle.loads(pickle.dumps(est)).__dict__
    assert state["_weights_digest"] is None


def test_digest_follows_weight_edits_and_is_stable():
    from skl_transfer import _fingerprint

    net = nn.Sequential(*[nn.Linear(300, 300) for _ in range(4)])
    d = _fingerprint.fingerprint(net)
    assert d.matches(net)
    assert _fingerprint.fingerprint(net) == d
    with torch.no_grad():
        net[0].weight[0, 0] += 1.0
    assert not d.matches(net)
    assert _fingerprint.fingerprint(net) != d


def test_predict_reuses_the_fit_digest_until_the_extractor_changes(monkeypatch):
    from skl_transfer import _fingerprint

    X, y = _data(30)
    est = _fitted(X, y)
    calls = []
    real = _fingerprint.fingerprint
    monkeypatch.setattr(_fingerprint, "fingerprint", lambda net: calls.append(1) or real(net))
    est.predict(X)
    est.predict(X[:5])
    assert calls == []  # the weights are not hashed again while extractor_ matches its digest
    with torch.no_grad():
        est.extractor_[0].bias.add_(1.0)
    assert_allclose(est.predict(X), _oracle(est, X), rtol=1e-9, atol=1e-12)
    est.predict(X)
    assert len(calls) == 1  # hashed once after the edit, then reused
    loaded = pickle.loads(pickle.dumps(est))
    loaded.predict(X)
    assert len(calls) == 2  # never trusted from a pickle


class _LazyTable(nn.Module):
    """Builds a tensor attribute on its first call, then leaves it alone: deterministic."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 8, dtype=torch.float64)

    def forward(self, x):
        if not hasattr(self, "table"):
            self.table = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
        return self.lin(x) * self.table


def test_probe_costs_two_rows_and_allows_a_lazy_first_call():
    X, y = _data()
    body = CountingModule(_LazyTable())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = _fit(body, X, y)
        assert body.rows_seen == len(X) + 2  # the first sample alone twice, once per new model
        _fit(body, X, y)
        assert body.rows_seen == len(X) + 2  # all hits
    assert_array_equal(cached.coef_, _fit(body, X, y, cache=False).coef_)


def test_a_recording_hook_is_not_served_from_the_cache():
    X, y = _data()
    body = make_body()
    recorded = {}
    handle = body[4].register_forward_hook(lambda m, a, out: recorded.__setitem__("out", out))
    try:
        with pytest.warns(UserWarning, match="changes its own"):
            _fit(body, X, y)
    finally:
        handle.remove()
    assert cache_info()["rows"] == 0


def test_functions_reached_through_a_module_global_are_keyed():
    import types

    X, y = _data()
    helpers = types.ModuleType("my_helpers")  # a user module that the forward calls into
    src = BODY.format(expr="helpers.act(self.lin(x))")
    torch.manual_seed(0)
    state = None
    for k in (1.0, 4.0):
        exec(f"def act(x):\n    return torch.tanh(x) * {k}", {"torch": torch}, vars(helpers))
        namespace = {"torch": torch, "nn": nn, "helpers": helpers, "__name__": "notebook_cell"}
        exec(src, namespace)
        body = namespace["Body"]()
        if state is None:
            state = body.state_dict()
        body.load_state_dict(state)
        _same_as_uncached(body, X, y)
