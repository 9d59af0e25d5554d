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
    LayerVariationalAdapter,
    LayerVariationalAdapterCV,
    LayerVariationalClassifier,
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
