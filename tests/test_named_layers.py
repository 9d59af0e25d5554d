"""head="name": adapt a named layer of a whole model, and export the whole model back.

Three model structures, with random weights (nothing downloaded): a torchvision-style ResNet
(a residual conv body, global pooling and a flatten inside forward, then `fc`); a Hugging
Face-style classifier returning a dict with `logits` and its head at `head.classifier`;
a CREPE-style model that permutes and reshapes before its `classifier` and applies a sigmoid
after it. The oracle: the named layer's input captured by a plain forward hook on the user's
model, then sklearn's Ridge on the residue.
"""

import copy

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.linear_model import Ridge
from torch import nn

from skl_transfer import (
    GradientDescentAdapter,
    GradientDescentClassifier,
    LayerVariationalAdapter,
    LayerVariationalAdapterCV,
    LayerVariationalClassifier,
    LayerVariationalClassifierCV,
    transferability,
)


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class ResNetLike(nn.Module):
    """torchvision's ResNet layout: conv1/bn1, residual layers, avgpool, flatten, fc."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.layer1 = nn.Sequential(_Block(6), _Block(6))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _Head(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.classifier = nn.Linear(d, k)

    def forward(self, h):
        return self.classifier(torch.tanh(self.dense(h)))


class DictOutputModel(nn.Module):
    """A Hugging Face-style model: returns {"logits": ..., "hidden": ...}; head inside `head`."""

    def __init__(self, n_in=8, d=12, k=2):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_in, d), nn.GELU(), nn.Linear(d, d))
        self.head = _Head(d, k)

    def forward(self, x):
        hidden = self.encoder(x)
        return {"logits": self.head(hidden), "hidden": hidden}


class CrepeLike(nn.Module):
    """Permutes and reshapes before its classifier, a sigmoid after it (as torchcrepe's CREPE)."""

    def __init__(self, bins=5):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, (5, 1), stride=(2, 1))
        self.pool = nn.MaxPool2d((2, 1))
        self.in_features = 4 * 3
        self.classifier = nn.Linear(self.in_features, bins)

    def forward(self, x):  # x: (batch, 32) frames
        x = self.pool(torch.relu(self.conv(x[:, None, :, None])))  # (batch, 4, 7, 1)
        x = x[:, :, :3].permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))


def _layer_io(model, name, X):
    """The named layer's input and output on X, by a forward hook on the user's model."""
    seen = {}
    hook = model.get_submodule(name).register_forward_hook(
        lambda m, a, out: seen.update(z=a[0].detach().double().numpy(), o=out.detach().double().numpy())
    )
    try:
        with torch.no_grad():
            model(torch.as_tensor(X))
    finally:
        hook.remove()
    return seen["z"].reshape(len(X), -1), seen["o"].reshape(len(X), -1)


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [dict(m._forward_hooks) for m in model.modules()],
        [dict(m._forward_pre_hooks) for m in model.modules()],
    )


def _same_state(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


MODELS = [
    (ResNetLike, "fc", lambda rng: rng.normal(size=(60, 1, 6, 6)).astype(np.float32)),
    (DictOutputModel, "head.classifier", lambda rng: rng.normal(size=(60, 8)).astype(np.float32)),
    (CrepeLike, "classifier", lambda rng: rng.normal(size=(60, 32)).astype(np.float32)),
]


@pytest.mark.parametrize("cls, name, make_X", MODELS, ids=[m[0].__name__ for m in MODELS])
def test_named_layer_equals_ridge_on_the_layer_input(cls, name, make_X):
    torch.manual_seed(0)
    model = cls().train()  # a user's model in training mode: the estimator uses an eval copy
    rng = np.random.default_rng(0)
    X = make_X(rng)
    before = _state(model)
    model.eval()
    Z, out0 = _layer_io(model, name, X)
    model.train()
    Y = out0 + 0.3 * rng.normal(size=out0.shape)  # targets in the layer's output space
    est = LayerVariationalAdapter(model, name, alpha=0.5).fit(X, Y)
    _same_state(before, _state(model))  # the user's model is untouched, training flag included
    layer = model.get_submodule(name)
    W0 = layer.weight.detach().double().numpy()
    b0 = layer.bias.detach().double().numpy()
    ridge = Ridge(alpha=0.5).fit(Z, Y - Z @ W0.T - b0)
    assert_allclose(est.coef_, W0 + ridge.coef_, rtol=1e-6, atol=1e-6)
    assert_allclose(est.intercept_, b0 + ridge.intercept_, rtol=1e-6, atol=1e-6)
    # float32 features: sample 0 goes through alone, so its last bits may differ from the batch's
    assert_allclose(est.predict(X), Z @ est.coef_.T + est.intercept_, rtol=1e-6, atol=1e-7)

    exported = est.to_module()
    assert type(exported) is cls and exported is not model
    assert exported.get_submodule(name).weight.dtype == layer.weight.dtype
    assert exported.training  # as the user's model was at fit
    _, out = _layer_io(exported.eval(), name, X)  # the exported layer's output = predict
    assert_allclose(out, est.predict(X), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the model's own forward runs unchanged around the adapted layer
        full = exported(torch.as_tensor(X))
    full = full["logits"] if isinstance(full, dict) else full
    if cls is CrepeLike:
        assert_allclose(full.numpy(), 1 / (1 + np.exp(-est.predict(X))), rtol=1e-5, atol=1e-5)
    _same_state(before, _state(model))


def test_named_layer_for_every_estimator():
    torch.manual_seed(1)
    model = DictOutputModel(k=3).double()  # float64: features equal the oracle's to the last bits
    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 8))
    Z, out0 = _layer_io(model, "head.classifier", X)
    y = out0.argmax(1)
    y[:20] = rng.integers(0, 3, 20)  # a shifted labelling
    clf = LayerVariationalClassifier(model, "head.classifier", alpha=1.0).fit(X, y)
    ref = LayerVariationalClassifier(None, _pair(model, "head.classifier"), alpha=1.0).fit(Z, y)
    assert_allclose(clf.coef_, ref.coef_, rtol=1e-6, atol=1e-8)
    Y = out0 + 0.1
    cv = LayerVariationalAdapterCV(model, "head.classifier", alphas=[0.1, 1.0, 10.0]).fit(X, Y)
    cv_ref = LayerVariationalAdapterCV(None, _pair(model, "head.classifier"), alphas=[0.1, 1.0, 10.0]).fit(
        Z, Y
    )
    assert cv.alpha_ == cv_ref.alpha_
    assert_allclose(cv.coef_, cv_ref.coef_, rtol=1e-6, atol=1e-8)
    gd = GradientDescentAdapter(model, "head.classifier", epochs=3, random_state=0).fit(X, Y)
    gd_ref = GradientDescentAdapter(None, _pair(model, "head.classifier"), epochs=3, random_state=0).fit(Z, Y)
    assert_allclose(gd.coef_, gd_ref.coef_, rtol=1e-4, atol=1e-5)


def _pair(model, name):
    layer = model.get_submodule(name)
    return layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(self.fc(torch.relu(self.body(x))))


def test_named_layer_errors():
    X, y = np.ones((10, 4), np.float32), np.zeros(10)
    with pytest.raises(ValueError, match="calls the layer 'fc' 2 times"):
        LayerVariationalAdapter(_Twice(), "fc").fit(X, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="never calls the layer 'unused'"):
        LayerVariationalAdapter(_Twice(), "unused").fit(X, y)
    with pytest.raises(ValueError, match=r"'fcc' is not a submodule of _Twice.*'fc'"):
        LayerVariationalAdapter(_Twice(), "fcc").fit(X, y)
    with pytest.raises(ValueError, match="extractor is None"):
        LayerVariationalAdapter(None, "fc").fit(X, y)


def test_named_layer_cache_and_pickle_round_trip():
    import pickle

    torch.manual_seed(2)
    model = CrepeLike()
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 32)).astype(np.float32)
    Z, out0 = _layer_io(model, "classifier", X)
    est = LayerVariationalAdapter(model, "classifier", alpha=1.0).fit(X, out0 + 0.2)
    again = pickle.loads(pickle.dumps(est))
    assert_allclose(again.predict(X), est.predict(X), rtol=0, atol=0)
    exported = again.to_module()
    assert type(exported) is CrepeLike
    before = copy.deepcopy(model.state_dict())
    LayerVariationalAdapter(model, "classifier", alpha=2.0).fit(X, out0)  # served from the cache
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- head="auto": the last Linear/Conv layer that forward calls ------------------------------


@pytest.mark.parametrize("cls, name, make_X", MODELS, ids=[m[0].__name__ for m in MODELS])
def test_auto_is_the_named_last_layer(cls, name, make_X):
    torch.manual_seed(3)
    model = cls().train()
    rng = np.random.default_rng(3)
    X = make_X(rng)
    model.eval()
    Z, out0 = _layer_io(model, name, X)
    model.train()
    Y = out0 + 0.3 * rng.normal(size=out0.shape)
    before = _state(model)
    auto = LayerVariationalAdapter(model, "auto", alpha=0.5).fit(X, Y)
    _same_state(before, _state(model))  # no hook left, weights, buffers and flags unchanged
    named = LayerVariationalAdapter(model, name, alpha=0.5).fit(X, Y)
    assert auto.head_name_ == named.head_name_ == name
    np.testing.assert_array_equal(auto.coef_, named.coef_)
    np.testing.assert_array_equal(auto.intercept_, named.intercept_)
    np.testing.assert_array_equal(auto.predict(X), named.predict(X))

    exported = auto.to_module()  # the whole model, the chosen layer replaced
    assert type(exported) is cls and exported is not model and exported.training
    _, out = _layer_io(exported.eval(), name, X)
    assert_allclose(out, auto.predict(X), rtol=1e-5, atol=1e-5)
    for (key, value), (key_ex, value_ex) in zip(
        model.state_dict().items(), exported.state_dict().items(), strict=True
    ):
        assert key == key_ex
        if not key.startswith(name + "."):  # every other tensor is the user's
            assert torch.equal(value, value_ex)
    _same_state(before, _state(model))


class _CallOrder(nn.Module):
    """Registers its output layer first and an unused Linear last: call order decides."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(6, 2, dtype=torch.float64)  # registered first, called last
        self.body = nn.Sequential(nn.Linear(4, 6, dtype=torch.float64), nn.Tanh())
        self.spare = nn.Linear(2, 2, dtype=torch.float64)  # registered last, never called

    def forward(self, x):
        return self.out(self.body(x))


def test_auto_picks_by_call_order_not_registration_order():
    torch.manual_seed(4)
    model = _CallOrder()
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1] == "spare"
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 4))
    Z, out0 = _layer_io(model, "out", X)
    Y = out0 + 0.2 * rng.normal(size=out0.shape)
    auto = LayerVariationalAdapter(model, "auto", alpha=1.0).fit(X, Y)
    assert auto.head_name_ == "out"
    W0, b0 = _pair(model, "out")  # the oracle: Ridge on the captured input of `out`
    ridge = Ridge(alpha=1.0).fit(Z, Y - Z @ W0.T - b0)
    assert_allclose(auto.coef_, W0 + ridge.coef_, rtol=1e-10, atol=1e-12)
    assert_allclose(auto.intercept_, b0 + ridge.intercept_, rtol=1e-10, atol=1e-12)


class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()
        self.fc = nn.Linear(4, 2)  # present, but applied functionally: never called as a module

    def forward(self, x):
        return nn.functional.linear(self.act(x), self.fc.weight, self.fc.bias)


def test_auto_errors():
    X, Y = np.ones((10, 4), np.float32), np.zeros((10, 4))
    with pytest.raises(ValueError, match=r"forward calls the layer 'fc' 2 times"):
        LayerVariationalAdapter(_Twice(), "auto").fit(X, Y)
    with pytest.raises(
        ValueError, match=r"'auto'.*it has none\. Pass the layer to adapt by name \(head='name'"
    ):
        LayerVariationalAdapter(nn.Sequential(nn.Tanh(), nn.Flatten()), "auto").fit(X, Y)
    with pytest.raises(ValueError, match=r"it has \['fc'\], but forward calls none.*head='name'"):
        LayerVariationalAdapter(_NoLinear(), "auto").fit(X, Y)
    with pytest.raises(ValueError, match="extractor must be the whole model"):
        LayerVariationalAdapter(None, "auto").fit(X, Y)
    with pytest.raises(ValueError, match="extractor must be the whole model"):
        LayerVariationalClassifier(None, "auto").fit(X, np.zeros(10, int))


AUTO_ESTIMATORS = [
    (LayerVariationalAdapter, dict(alpha=1.0), "regression"),
    (LayerVariationalAdapterCV, dict(alphas=[0.1, 1.0, 10.0]), "regression"),
    (LayerVariationalClassifier, dict(alpha=1.0), "labels"),
    (LayerVariationalClassifierCV, dict(alphas=[0.1, 1.0, 10.0]), "labels"),
    (GradientDescentAdapter, dict(epochs=3, random_state=0), "regression"),
    (GradientDescentClassifier, dict(epochs=3, random_state=0), "labels"),
]


@pytest.mark.parametrize("cls, params, target", AUTO_ESTIMATORS, ids=[e[0].__name__ for e in AUTO_ESTIMATORS])
def test_auto_for_every_estimator(cls, params, target):
    torch.manual_seed(5)
    model = DictOutputModel(k=3).double().train()
    rng = np.random.default_rng(5)
    X = rng.normal(size=(50, 8))
    Z, out0 = _layer_io(model, "head.classifier", X)
    if target == "labels":
        y = out0.argmax(1)
        y[:15] = rng.integers(0, 3, 15)
    else:
        y = out0 + 0.2 * rng.normal(size=out0.shape)
    before = _state(model)
    auto = cls(model, "auto", **params).fit(X, y)
    _same_state(before, _state(model))
    named = cls(model, "head.classifier", **params).fit(X, y)
    assert auto.head_name_ == named.head_name_ == "head.classifier"
    assert_allclose(auto.coef_, named.coef_, rtol=1e-12, atol=1e-12)
    assert_allclose(auto.intercept_, named.intercept_, rtol=1e-12, atol=1e-12)
    exported = auto.to_module()
    assert type(exported) is DictOutputModel
    _, out = _layer_io(exported.eval(), "head.classifier", X)
    scores = auto.predict(X) if target == "regression" else auto.decision_function(X)
    assert_allclose(out, scores, rtol=1e-10, atol=1e-10)
    # the (extractor, head module) and (coef, intercept) forms name no layer
    body = nn.Sequential(model.encoder, nn.Tanh())
    pair = cls(None, _pair(model, "head.classifier"), **params).fit(Z, y)
    assert pair.head_name_ is None
    assert cls(body, model.head.classifier, **params).fit(X, y).head_name_ is None


def test_auto_with_partial_fit():
    torch.manual_seed(6)
    model = ResNetLike().double()
    rng = np.random.default_rng(6)
    X = rng.normal(size=(40, 1, 6, 6))
    _, out0 = _layer_io(model, "fc", X)
    Y = out0 + 0.1 * rng.normal(size=out0.shape)
    est = LayerVariationalAdapter(model, "auto").partial_fit(X[:20], Y[:20]).partial_fit(X[20:], Y[20:])
    full = LayerVariationalAdapter(model, "fc").fit(X, Y)
    assert est.head_name_ == "fc"
    assert_allclose(est.coef_, full.coef_, rtol=1e-10, atol=1e-12)


# -- transferability on a named layer -------------------------------------------------------


class _ResNetBody(nn.Module):
    """ResNetLike's forward up to (not including) fc: the explicit (body, head) split."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        return torch.flatten(m.avgpool(m.layer1(torch.relu(m.bn1(m.conv1(x))))), 1)


@pytest.mark.parametrize("head", ["fc", "auto"])
def test_transferability_of_a_named_layer(head):
    from sklearn.model_selection import LeaveOneOut
    from test_transferability import ALPHAS, brute_force_cv

    torch.manual_seed(7)
    model = ResNetLike().double().train()
    rng = np.random.default_rng(7)
    X = rng.normal(size=(30, 1, 6, 6))
    model.eval()
    Z, out0 = _layer_io(model, "fc", X)  # the features, by a hook on the user's model
    model.train()
    Y = out0 + 0.3 * rng.normal(size=out0.shape)
    before = _state(model)
    named = transferability(model, head, X, Y, alphas=ALPHAS)
    _same_state(before, _state(model))
    assert named.adapter.head_name_ == "fc"
    split = transferability(_ResNetBody(model), model.fc, X, Y, alphas=ALPHAS)
    on_features = transferability(None, _pair(model, "fc"), Z, Y, alphas=ALPHAS)
    numbers = ["pretrained_mse", "adapted_mse", "probe_mse", "alpha", "probe_alpha", "target_mse"]
    for other in (split, on_features):
        for key in numbers:
            assert_allclose(getattr(named, key), getattr(other, key), rtol=1e-10, atol=1e-12)
    adapted, alpha = brute_force_cv(Z, Y, np.ones(len(Y)), _pair(model, "fc"), LeaveOneOut())
    assert_allclose(named.adapted_mse, adapted, rtol=1e-8)
    assert named.alpha == alpha


# -- layers the update cannot stand for, and tied weights (a review's findings) ---------------------


def _mlp(d_in=5, hidden=8, k=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, k))


def _xy(n=60, d_in=5, k=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d_in)).astype(np.float32)
    return X, np.tanh(X[:, :k]) + 0.1 * rng.normal(size=(n, k))


def _parametrized():
    from torch.nn.utils import parametrizations

    model = _mlp()
    parametrizations.spectral_norm(model[2])
    return model.train()  # spectral_norm's power iteration runs on reading the weight in train mode


def _pruned():
    from torch.nn.utils import prune

    model = _mlp()
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    with torch.no_grad():  # (until a forward recomputes it without grad, the copy cannot be made)
        model(torch.zeros(1, 5))
    return model


def _hooked():
    model = _mlp()
    model[2].register_forward_hook(lambda m, args, out: out + 5.0)
    return model


@pytest.mark.parametrize(
    "make, match",
    [(_parametrized, "parametrized weight"), (_pruned, "is pruned"), (_hooked, "forward hooks")],
    ids=["parametrized", "pruned", "hooked"],
)
@pytest.mark.parametrize("head", ["2", "auto"])
def test_a_layer_the_update_cannot_stand_for_is_refused_untouched(make, match, head):
    model = make()
    X, y = _xy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        LayerVariationalAdapter(model, head, alpha=0.1).fit(X, y)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # spectral_norm's _u and _v too


class _TiedLM(nn.Module):
    """A language model's head tied to its embedding (lm_head.weight is emb.weight)."""

    def __init__(self, vocab=7, d=6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, idx):
        return self.lm_head(torch.tanh(self.mix(self.emb(idx).mean(1))))


def test_a_tied_weight_is_untied_in_the_export():
    model = _TiedLM()
    rng = np.random.default_rng(0)
    X = rng.integers(0, 7, size=(80, 4))
    y = rng.normal(size=(80, 7))
    est = LayerVariationalAdapter(model, "lm_head", alpha=0.1).fit(X, y)
    exported = est.to_module()
    assert torch.equal(exported.emb.weight, model.emb.weight)  # the embedding is not the update
    assert exported.lm_head.weight is not exported.emb.weight
    with torch.no_grad():
        out = exported(torch.from_numpy(X)).numpy()
    assert_allclose(out, est.predict(X), rtol=1e-5, atol=1e-5)
    # the oracle: Ridge on the layer's input, captured from the user's model
    feats = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: feats.append(args[0].detach()))
    with torch.no_grad():
        model.eval()(torch.from_numpy(X))
    handle.remove()
    Z = feats[0].double().numpy()
    W0 = model.lm_head.weight.detach().double().numpy()
    ridge = Ridge(alpha=0.1, fit_intercept=False).fit(Z, y - Z @ W0.T)
    assert_allclose(est.coef_, W0 + ridge.coef_, rtol=1e-8, atol=1e-10)


class _CosineLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.weight, dim=1).T


def test_a_linear_subclass_with_its_own_forward_is_refused():
    X, y = _xy()
    body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
    with pytest.raises(TypeError, match="_CosineLinear, a subclass of torch.nn.Linear with its own forward"):
        LayerVariationalAdapter(body, _CosineLinear(8, 2)).fit(X, y)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), _CosineLinear(8, 2))
    with pytest.raises(TypeError, match="its own forward"):
        LayerVariationalAdapter(model, "2").fit(X, y)


def test_a_torchscript_model_names_the_fix_for_a_named_layer():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
        model = torch.jit.script(_mlp())
    X, y = _xy()
    for head in ("2", "auto"):
        with pytest.raises(ValueError, match="TorchScript module"):
            LayerVariationalAdapter(model, head).fit(X, y)


def test_an_added_bias_follows_the_layers_requires_grad():
    model = _mlp()
    model[2] = nn.Linear(8, 2, bias=False)
    model.requires_grad_(False)
    X, y = _xy()
    exported = LayerVariationalAdapter(model, "2", fit_intercept=True).fit(X, y).to_module()
    assert not any(p.requires_grad for p in exported.parameters())


class _PerToken(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(3, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):  # (n, tokens, 3) -> a Linear on every token, then a mean
        return self.fc(torch.tanh(self.emb(x))).mean(1)


def test_a_layer_applied_to_every_position_is_refused_by_what_it_is():
    X = np.random.default_rng(0).normal(size=(20, 4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="applied to every position of an input of shape \\(4, 8\\)"):
        LayerVariationalAdapter(_PerToken(), "fc").fit(X, np.zeros((20, 2)))
