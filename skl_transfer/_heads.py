"""A head as a matrix, and back.

A head is the last, adapted layer ``h(z) = z W0^T + b0``. It is given as a
``torch.nn.Linear``, a pair ``(coef, intercept)`` of array-likes, or None (a zero prior).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils import check_array
from torch import nn

from ._torch import floating_dtype, to_numpy


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

    @property
    def n_outputs(self):
        return None if self.W0 is None else self.W0.shape[0]

    @property
    def n_features(self):
        return None if self.W0 is None else self.W0.shape[1]


def as_prior(head):
    """Read a head into a :class:`Prior` (copies; the head itself is never modified)."""
    if head is None:
        return Prior(None, None)
    if isinstance(head, nn.Linear):
        if nn.parameter.is_lazy(head.weight):
            raise TypeError(
                f"head={type(head).__name__} is not initialised yet; run one forward pass of the "
                "network (or use nn.Linear with explicit in_features) before adapting it."
            )
        W0 = head.weight.detach().to("cpu", torch.float64).numpy().copy()
        b0 = None if head.bias is None else head.bias.detach().to("cpu", torch.float64).numpy().copy()
        return Prior(W0, b0, head.weight.dtype)
    if isinstance(head, nn.Module):
        raise TypeError(
            f"head={type(head).__name__} is not supported; pass the last torch.nn.Linear layer, "
            "a pair (coef, intercept) of arrays, or None."
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
    """The extractor followed by the adapted linear head.

    ``forward(x) = head(flatten(extractor(x)))``. Floating inputs are cast to the extractor's
    dtype (as ``predict`` does) and features to the head's dtype, so a half-precision
    extractor can take float32 inputs and feed a float32 head. The output has shape
    ``(n_samples, k)``, as the torch layer it replaces.
    """

    def __init__(self, extractor, head):
        super().__init__()
        self.extractor = nn.Identity() if extractor is None else extractor
        self.head = head

    def forward(self, x):
        dtype = floating_dtype(self.extractor)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        z = self.extractor(x).flatten(1)
        return self.head(z.to(self.head.weight.dtype))


def make_linear(coef, intercept, dtype):
    """A ``nn.Linear`` holding ``coef`` (k, d) and ``intercept`` (k,) (None: no bias)."""
    k, d = coef.shape
    layer = nn.Linear(d, k, bias=intercept is not None, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(coef))
        if intercept is not None:
            layer.bias.copy_(torch.from_numpy(intercept))
    return layer.requires_grad_(False)
