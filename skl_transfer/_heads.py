"""A head as a matrix, and back.

A head is the last, adapted layer, a linear map of its input: ``h(z) = z W0^T + b0`` for a
``torch.nn.Linear`` or a pair ``(coef, intercept)`` of array-likes; for a ``Conv1d``/``Conv2d``
the same map applied to every unfolded input patch (``W0`` of shape
``(C_out, C_in * prod(kernel))``); None is a zero prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils import check_array
from torch import nn

from ._torch import floating_dtype, from_numpy, to_float64, to_numpy


@dataclass(frozen=True)
class Prior:
    """The pretrained head as float64 arrays.

    W0 : ndarray of shape (k, d), or None for a zero prior of any shape.
    b0 : ndarray of shape (k,), or None when the head has no bias.
    dtype : torch dtype of the head's weights (float32 when not a torch layer).
    """

    W0: np.ndarray | None
    b0: np.ndarray | None
    dtype: torch.dtype = torch.float32
    geometry: object = None  # LINEAR or a ConvGeometry (set in __post_init__)

    def __post_init__(self):
        if self.geometry is None:
            object.__setattr__(self, "geometry", LINEAR)

    @property
    def n_outputs(self):
        return None if self.W0 is None else self.W0.shape[0]

    @property
    def n_features(self):
        if self.W0 is None:
            return None
        return getattr(self.geometry, "n_features", self.W0.shape[1])  # a block: its input


def _finite_layer(head, W0, b0):
    """``(W0, b0)`` of a torch layer, refused like a ``(coef, intercept)`` pair if not finite."""
    for name, value in (("weight", W0), ("bias", b0)):
        if value is not None and not np.isfinite(value).all():
            raise ValueError(
                f"head={type(head).__name__} has NaN or infinity in its {name} "
                f"({int(np.size(value) - np.isfinite(value).sum())} of {np.size(value)} values); "
                "the update shrinks toward the pretrained weights, so they must be finite. Load "
                "the pretrained weights again, or pass head=None for a zero prior."
            )
    return W0, b0


def as_prior(head):
    """Read a head into a :class:`Prior` (copies; the head itself is never modified)."""
    if head is None:
        return Prior(None, None)
    for base in (nn.Linear, nn.Conv1d, nn.Conv2d):
        if not isinstance(head, base):
            continue
        own = [
            f
            for f in ("forward", "_conv_forward")
            if getattr(type(head), f, None) is not getattr(base, f, None)
        ]
        if own:
            raise TypeError(
                f"head is a {type(head).__name__}, a subclass of torch.nn.{base.__name__} with its own "
                f"{own[0]}: its output is not the layer's (x @ W.T + b for a Linear), which the "
                f"closed-form update fits. Adapt a plain torch.nn.{base.__name__}, or split the "
                "network by hand so that the head is one."
            )
    if isinstance(head, nn.Linear):
        if nn.parameter.is_lazy(head.weight):
            raise TypeError(
                f"head={type(head).__name__} is not initialised yet; run one forward pass of the "
                "network (or use nn.Linear with explicit in_features) before adapting it."
            )
        W0 = to_float64(head.weight).copy()
        b0 = None if head.bias is None else to_float64(head.bias).copy()
        return Prior(*_finite_layer(head, W0, b0), head.weight.dtype)
    if isinstance(head, (nn.Conv1d, nn.Conv2d)):
        geometry = ConvGeometry(head)
        W0 = to_float64(head.weight).reshape(head.out_channels, -1).copy()
        b0 = None if head.bias is None else to_float64(head.bias).copy()
        return Prior(*_finite_layer(head, W0, b0), head.weight.dtype, geometry)
    if isinstance(head, nn.Module):
        raise TypeError(
            f"head={type(head).__name__} is not supported; pass the last torch.nn.Linear, Conv1d or "
            "Conv2d layer, a pair (coef, intercept) of arrays, or None."
        )
    if not isinstance(head, (tuple, list)) or len(head) != 2:
        raise TypeError(
            f"head must be a torch.nn.Linear, a pair (coef, intercept) or None; got "
            f"{type(head).__name__}. Pass e.g. head=(W0, b0) with W0 of shape (k, d)."
        )
    coef, intercept = (to_numpy(h) for h in head)
    if coef is None:
        raise TypeError("head=(coef, intercept) needs coef, an array of shape (k, d) or (d,); got None.")
    W0 = check_array(coef, ensure_2d=False, dtype=np.float64, input_name="head coef", copy=True)
    if W0.ndim == 1:
        W0 = W0[None, :]
    if W0.ndim != 2:
        raise ValueError(f"head coef must have shape (k, d) or (d,), got {W0.shape}.")
    if intercept is None:
        return Prior(W0, None)
    b0 = check_array(
        np.reshape(intercept, -1), ensure_2d=False, dtype=np.float64, input_name="head intercept", copy=True
    )
    if b0.shape[0] == 1 and W0.shape[0] > 1:
        b0 = np.repeat(b0, W0.shape[0])
    if b0.shape != (W0.shape[0],):
        raise ValueError(
            f"head intercept has shape {b0.shape} but coef has {W0.shape[0]} output rows; "
            f"pass a float or an array of shape ({W0.shape[0]},)."
        )
    return Prior(W0, b0)


class AdaptedNetwork(nn.Module):
    """The extractor followed by the adapted head (``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``).

    ``forward(x) = head(flatten(extractor(x)))`` (no flattening before a convolutional
    head). Floating inputs are cast to the extractor's
    dtype (as ``predict`` does) and features to the head's dtype, so a half-precision
    extractor can take float32 inputs and feed a float32 head. The output has the shape of
    the torch layer it replaces: ``(n_samples, k)``, or the conv output shape.
    """

    def __init__(self, extractor, head):
        super().__init__()
        self.extractor = nn.Identity() if extractor is None else extractor
        self.head = head

    def forward(self, x):
        dtype = floating_dtype(self.extractor)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        z = self.extractor(x)
        if isinstance(self.head, (nn.Linear, nn.Sequential)):  # a Linear or a block of them
            z = z.flatten(1)
        return self.head(z.to(floating_dtype(self.head)))


def make_linear(coef, intercept, dtype):
    """A ``nn.Linear`` holding ``coef`` (k, d) and ``intercept`` (k,) (None: no bias)."""
    k, d = coef.shape
    layer = nn.Linear(d, k, bias=intercept is not None, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(from_numpy(coef))
        if intercept is not None:
            layer.bias.copy_(from_numpy(intercept))
    return layer.requires_grad_(False)


class LinearGeometry:
    """A linear head: one design row per sample (the flattened features), k outputs."""

    is_conv = False
    is_block = False  # a block head (several layers, _block.BlockGeometry)

    def signature(self):
        """Everything about the head's shape that decides its design rows (a cache key part)."""
        return "linear"

    def check_features(self, feature_shape, n_outputs_y, y_sample_shape):
        return (n_outputs_y,)

    def rows_per_sample(self, feature_shape):
        return 1

    def design(self, Z, feature_shape):
        """(b, d) flattened features -> (b, d) rows."""
        return Z

    def targets(self, Y, feature_shape):
        """(b, k) targets -> (b, k) rows."""
        return Y

    def outputs(self, Z, feature_shape, coef, intercept):
        return Z @ coef.T + intercept

    def layer(self, coef, intercept, dtype):
        return make_linear(coef, intercept, dtype)


LINEAR = LinearGeometry()  # the geometry of every linear head (it holds no state)


class ConvGeometry:
    """A Conv1d/Conv2d head as a linear map of unfolded patches.

    Each output position of each sample is one design row, the patch of ``C_in * prod(kernel)``
    input values it sees (``torch.nn.functional.unfold`` order, matching
    ``weight.reshape(C_out, -1)``); the targets are the ``C_out`` output channels there.
    """

    is_conv = True
    is_block = False

    def __init__(self, conv):
        if conv.groups != 1:
            raise ValueError(
                f"head={type(conv).__name__} has groups={conv.groups}; only groups=1 convolutions "
                "are a single linear map of patches. Adapt a groups=1 layer."
            )
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"head={type(conv).__name__} has padding_mode={conv.padding_mode!r}; only 'zeros' is "
                "supported. Pad the features in the extractor instead."
            )
        self.ndim = 2 if isinstance(conv, nn.Conv2d) else 1
        self.c_in, self.c_out = conv.in_channels, conv.out_channels
        self.kernel = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        padding = conv.padding
        if padding == "valid":
            padding = (0,) * self.ndim
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel, strict=True)]
            if any(t % 2 for t in total):
                raise ValueError(
                    f"head={type(conv).__name__} uses padding='same' with an even kernel, which pads "
                    "asymmetrically; give explicit integer padding."
                )
            padding = tuple(t // 2 for t in total)
        self.padding = tuple(padding)

    def signature(self):
        """Everything about the head's shape that decides its design rows (a cache key part)."""
        return (
            f"conv{self.ndim}d in={self.c_in} out={self.c_out} kernel={self.kernel} "
            f"stride={self.stride} padding={self.padding} dilation={self.dilation}"
        )

    def _as_2d(self, values, fill):
        return values if self.ndim == 2 else (fill, *values)

    def out_spatial(self, feature_shape):
        spatial = feature_shape[1:]
        return tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                spatial, self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )

    def check_features(self, feature_shape, n_outputs_y, y_sample_shape):
        if len(feature_shape) != self.ndim + 1 or feature_shape[0] != self.c_in:
            raise ValueError(
                f"The conv head expects features of shape (C_in={self.c_in}, {self.ndim} spatial "
                f"dims), but the extractor produces {feature_shape}; pass the head that follows it."
            )
        expected = (self.c_out, *self.out_spatial(feature_shape))
        if tuple(y_sample_shape) != expected:
            raise ValueError(
                f"y has per-sample shape {tuple(y_sample_shape)}, but the conv head outputs {expected} "
                f"on these features; pass y of shape (n_samples, {', '.join(map(str, expected))})."
            )
        return expected

    def rows_per_sample(self, feature_shape):
        return int(np.prod(self.out_spatial(feature_shape)))

    def _unfold(self, F):
        if self.ndim == 1:
            F = F.unsqueeze(2)
        return torch.nn.functional.unfold(
            F,
            self._as_2d(self.kernel, 1),
            dilation=self._as_2d(self.dilation, 1),
            padding=self._as_2d(self.padding, 0),
            stride=self._as_2d(self.stride, 1),
        )

    def design(self, Z, feature_shape):
        """(b, C_in * prod(spatial)) features -> (b * L, C_in * prod(kernel)) patch rows."""
        patches = self._unfold(Z.reshape(Z.shape[0], *feature_shape))  # (b, D, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def targets(self, Y, feature_shape):
        """(b, C_out * L) targets -> (b * L, C_out) rows, in the order of :meth:`design`."""
        return Y.reshape(Y.shape[0], self.c_out, -1).transpose(1, 2).reshape(-1, self.c_out)

    def outputs(self, Z, feature_shape, coef, intercept):
        F = Z.reshape(Z.shape[0], *feature_shape)
        weight = coef.reshape(self.c_out, self.c_in, *self.kernel)
        conv = torch.nn.functional.conv2d if self.ndim == 2 else torch.nn.functional.conv1d
        out = conv(F, weight, intercept, stride=self.stride, padding=self.padding, dilation=self.dilation)
        return out.reshape(out.shape[0], -1)

    def layer(self, coef, intercept, dtype):
        cls = nn.Conv2d if self.ndim == 2 else nn.Conv1d
        layer = cls(
            self.c_in,
            self.c_out,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=intercept is not None,
            dtype=dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(from_numpy(coef.reshape(layer.weight.shape)))
            if intercept is not None:
                layer.bias.copy_(from_numpy(intercept))
        return layer.requires_grad_(False)
