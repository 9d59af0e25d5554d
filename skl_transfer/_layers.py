"""A named layer of a whole model: its input as the features, the model with it replaced.

``head="fc"`` (a dotted path, as ``model.get_submodule`` takes) adapts that layer of the model
given as ``extractor``. The estimator's private copy of the model is wrapped in
:class:`LayerInput`, whose forward runs the model until the layer is reached and returns the
layer's input: nothing after it is computed, whatever the model returns (a tensor, tuple,
dict or ``ModelOutput``) and whatever it does before (reshapes, permutes) or after
(post-processing). :func:`replace_layer` puts the adapted layer back into a copy of the model.
``head="auto"`` names the last Linear/Conv layer that forward calls (:func:`last_called_layer`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._torch import as_device_arrays

_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)

AUTO = "auto"


def is_auto(head):
    """Whether ``head`` asks for the last Linear/Conv layer that the model's forward calls."""
    return isinstance(head, str) and head == AUTO


def named_layer(model, name):
    """The submodule ``name`` of ``model``; errors name the candidates."""
    if model is None:
        raise ValueError(
            f"head={name!r} names a layer of the extractor, but extractor is None; pass the whole "
            "model as extractor (e.g. LayerVariationalAdapter(model, head='fc'))."
        )
    if not name:
        raise ValueError(
            "head='' names no layer; pass a dotted submodule path such as 'fc' or 'classifier.3'."
        )
    _check_hookable(model, name)
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        layer = None
    if not isinstance(layer, nn.Module):
        names = [n for n, m in model.named_modules() if isinstance(m, _ADAPTABLE)]
        raise ValueError(
            f"head={name!r} is not a submodule of {type(model).__name__}; the Linear/Conv layers "
            f"it has are {names[-8:]} (the last ones shown), named as model.get_submodule takes."
        )
    _check_replaceable(layer, name)
    return layer


def _check_hookable(model, name):
    """A named layer is read through hooks during the model's forward: no TorchScript model."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"head={name!r} names a layer of a TorchScript module ({type(model).__name__}), whose "
            "layers cannot be hooked to read their input. Pass the original torch.nn.Module, or split "
            "the network by hand into an extractor and a head (extractor=body, head=last_layer)."
        )


def _check_replaceable(layer, name):
    """Refuse a layer whose weight the update cannot stand for: one computed at each forward (a
    parametrization, pruning), or whose output is not its weight's (forward hooks). Checked
    before the weight is read (reading a parametrized weight may run it: spectral_norm's power
    iteration writes its buffers in train mode)."""
    from torch.nn.utils import parametrize, prune

    where = f"model.get_submodule({name!r})"
    if parametrize.is_parametrized(layer):
        raise ValueError(
            f"The layer {name!r} has a parametrized weight (weight_norm, spectral_norm or your own "
            "parametrization): its weight is computed at each forward, and the update, which "
            "replaces the weight itself, would be lost on export. Fix: on a copy of the model, "
            f"torch.nn.utils.parametrize.remove_parametrizations({where}, 'weight') (and 'bias' if "
            "parametrized), then adapt that copy."
        )
    if any(isinstance(h, prune.BasePruningMethod) for h in layer._forward_pre_hooks.values()):
        raise ValueError(
            f"The layer {name!r} is pruned: its weight is weight_orig times a mask at each forward, "
            "so the update would be lost on export and would not keep the mask. Fix: "
            f"torch.nn.utils.prune.remove({where}, 'weight') on a copy of the model (the pruned "
            "weight made permanent), then adapt that copy."
        )
    if layer._forward_hooks:
        raise ValueError(
            f"The layer {name!r} has forward hooks, which change its output after the layer: the "
            "update fits the layer's own output (x @ W.T + b), and the exported model would run "
            "the hooks on it. Remove them (handle.remove()) before adapting the layer, or split the "
            "network by hand into an extractor and a head."
        )


class _Reached(BaseException):  # noqa: N818 - not an error: ends a forward pass early
    """Raised by the pre-hook when the layer is reached (a BaseException, so that a model's
    own ``except Exception`` does not swallow it)."""

    def __init__(self, value):
        super().__init__()
        self.value = value


def _layer_input(args, kwargs):
    if args:
        return args[0]
    if len(kwargs) == 1:
        return next(iter(kwargs.values()))
    raise TypeError("the named layer was called without one input tensor")


class LayerInput(nn.Module):
    """The input of ``model``'s layer ``name`` for a batch: the model's forward up to the
    layer's first call, no further."""

    def __init__(self, model, name):
        super().__init__()
        self.model = model
        self.name = name
        self.training = model.training  # the wrapper's mode is its model's (eval in a frozen copy)

    def forward(self, x):
        def stop(module, args, kwargs):
            raise _Reached(_layer_input(args, kwargs))

        handle = self.model.get_submodule(self.name).register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(x)
        except _Reached as reached:
            return reached.value
        finally:
            handle.remove()
        raise ValueError(
            f"{type(self.model).__name__}.forward never called the layer {self.name!r}; name a layer "
            "that forward applies to every sample."
        )


def call_order(model, names, x):
    """The layers ``names`` of ``model`` that its forward calls on the batch ``x``, in the order
    of their calls (a name once per call), seen by pre-hooks removed afterwards."""
    order = []
    handles = []
    try:
        for name in names:
            layer = model.get_submodule(name)
            handles.append(layer.register_forward_pre_hook(lambda m, a, name=name: order.append(name)))
        with torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return order


def count_calls(model, name, x):
    """How many times ``model``'s forward calls its layer ``name`` on the batch ``x``."""
    return len(call_order(model, [name], x))


def check_called_once(model, name, x):
    """Raise a clear error unless ``model``'s forward calls the layer ``name`` exactly once."""
    _check_count(model, name, count_calls(model, name, x))


def _check_count(model, name, n):
    if n == 1:
        return
    if n == 0:
        raise ValueError(
            f"{type(model).__name__}.forward never calls the layer {name!r} (on the first sample of "
            "X); name a layer that forward applies to every sample."
        )
    raise ValueError(
        f"{type(model).__name__}.forward calls the layer {name!r} {n} times per batch (its weights are "
        "shared between calls); the update is for a layer applied once. Name a layer called once, "
        "or split the model by hand into an extractor and a head."
    )


def last_called_layer(model, x):
    """``head="auto"``: the dotted name of the last ``Linear``/``Conv1d``/``Conv2d`` submodule
    that ``model``'s forward calls on the batch ``x`` (last in call order, not in registration
    order), checked to be called once as a named layer is."""
    _check_hookable(model, AUTO)
    candidates = [n for n, m in model.named_modules() if n and isinstance(m, _ADAPTABLE)]
    order = call_order(model, candidates, x)
    if not order:
        has = f"it has {candidates[-8:]}, but forward calls none" if candidates else "it has none"
        raise ValueError(
            f"head='auto' adapts the last torch.nn.Linear, Conv1d or Conv2d layer that "
            f"{type(model).__name__}.forward calls (on the first sample of X), and {has}. Pass the "
            "layer to adapt by name (head='name', a dotted path as model.get_submodule takes), or "
            "split the model by hand into an extractor and a head."
        )
    name = order[-1]
    _check_count(model, name, order.count(name))
    return name


def export_state(model):
    """What :func:`replace_layer` restores on the exported copy: the device, every module's
    training flag and every parameter's ``requires_grad``, as the user's model had them."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    return (
        device,
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def replace_layer(model, name, coef, intercept, state):
    """A deep copy of ``model`` whose layer ``name`` holds ``coef`` (shaped as its weight) and
    ``intercept`` (None: no bias), with the original layer's class and dtype, and the device,
    training flags and ``requires_grad`` of ``state`` (:func:`export_state`)."""
    model = copy.deepcopy(model)
    layer = model.get_submodule(name)
    old = layer.weight
    (weight,) = as_device_arrays(old.device, coef, dtype=old.dtype)
    # new parameters, not writes into the old ones: a weight tied to another layer's (an
    # embedding's) stays that layer's, as the update changed this layer only
    layer.weight = nn.Parameter(weight.reshape(old.shape).clone(), requires_grad=old.requires_grad)
    if intercept is None:
        if layer.bias is not None:
            layer.bias = nn.Parameter(torch.zeros_like(layer.bias), requires_grad=layer.bias.requires_grad)
    else:
        (bias,) = as_device_arrays(old.device, intercept, dtype=old.dtype)
        grad = old.requires_grad if layer.bias is None else layer.bias.requires_grad
        layer.bias = nn.Parameter(bias.clone(), requires_grad=grad)
    device, training, grads = state
    model.to(device)
    for n, m in model.named_modules():
        m.training = training.get(n, m.training)
    for n, p in model.named_parameters():
        p.requires_grad_(grads.get(n, p.requires_grad))
    return model
