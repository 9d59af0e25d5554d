"""``method="perturb"``: the paper's first-order transferal residue from paired source samples."""

from __future__ import annotations

import numpy as np
import torch

from ._heads import LINEAR
from ._torch import as_device_arrays, check_finite, check_output, floating_dtype, jvp, raw_rows


def linearised_features(net, X_source, X, rows, device, dtype):
    """``F(x)`` and ``J_F(x) dx`` for rows of the pairs ``(x, x~ = x + dx)``, float64 (b, d).

    One forward-mode pass of the frozen copy (``torch.func.jvp``) at the source inputs ``x``
    along ``dx = x~ - x``: the features there and their directional derivative, so that
    ``F(x) + J_F(x) dx`` is the first-order estimate of the target features. ``dx`` is
    formed in the wider of the two inputs' dtypes before the cast to the extractor's
    ``dtype``, so a small shift is not lost to the rounding of the inputs. ``net=None``
    (X holds the features) is the identity: ``(x, dx)``.
    """
    xs, xt = raw_rows(X_source, rows, device), raw_rows(X, rows, device)
    if not (xs.is_floating_point() and xt.is_floating_point()):
        raise ValueError(
            "method='perturb' differentiates the network with respect to its input, so X and "
            f"X_source must be floating-point (got {xt.dtype} and {xs.dtype}); convert them, "
            "e.g. X.astype(np.float32), or use method='exact'."
        )
    wide = torch.promote_types(xs.dtype, xt.dtype)
    dx = xt.to(wide) - xs.to(wide)
    if net is None:
        return xs.to(torch.float64), dx.to(torch.float64)
    dtype = xs.dtype if dtype is None else dtype
    xs, dx = xs.to(dtype), dx.to(dtype)
    try:
        with torch.no_grad():
            out, tangent = jvp(net, xs, dx)
    except Exception as err:
        raise ValueError(
            f"Forward-mode differentiation (torch.func.jvp) of the extractor {type(net).__name__} "
            f"failed on a batch of shape {tuple(xs.shape)}: {err}. method='perturb' needs an "
            "extractor whose operations support forward-mode autodiff; use method='exact' otherwise."
        ) from err
    b = check_output(out, xs.shape[0]).shape[0]
    F = check_finite(out).reshape(b, -1).to(torch.float64)
    dF = check_finite(tangent).reshape(b, -1).to(torch.float64)
    return F, dF


class PerturbResidue:
    """The paper's first-order transferal residue, batch by batch (``method="perturb"``).

    For pairs ``(x_i, x~_i = x_i + dx_i)`` with labels ``(y_i, y~_i)`` and ``f = h o F``::

        Q = dY - J_f(X) dX + (Y - f(X)),    dY = Y~ - Y,

    where ``J_f(x) dx = W0 J_F(x) dx`` (the head is affine) with ``J_F(x) dx`` from
    :func:`linearised_features` (forward mode, never finite differences) and the head applied
    in float64. Called with the slice and the target features ``Z~`` of each batch of the
    feature stream (``accumulate_moments(..., residue=...)``), it returns ``Q`` of shape
    (b, outputs) on the features' device, and adds the weighted squared norms of its terms
    to ``terms_sq``: ``label_shift`` (dY), ``intrinsic`` (J_f(X) dX), ``source_error``
    (Y - f(X)) and ``taylor_remainder`` (f(X~) - f(X) - J_f(X) dX, the error of the first-order
    estimate, from the target features the stream computes anyway).
    """

    TERMS = ("label_shift", "intrinsic", "source_error", "taylor_remainder")

    def __init__(self, net, X, X_source, Y, Y_source, s, W0, b0, geometry=LINEAR, feature_shape=()):
        self.net, self.X, self.X_source = net, X, X_source
        self.Y, self.Y_source, self.s = Y, Y_source, s
        self.W0, self.b0 = W0, b0
        self.geometry, self.feature_shape = geometry, feature_shape
        self.dtype = None if net is None else floating_dtype(net)
        self.terms_sq = dict.fromkeys(self.TERMS, 0.0)
        self._params = None

    def _head(self, Z, coef, intercept):
        if not self.geometry.is_conv:
            return Z @ coef.T + intercept
        return self.geometry.outputs(Z, self.feature_shape, coef, intercept)

    def __call__(self, sl, Z):
        device = Z.device
        if self._params is None or self._params[0] != device:
            self._params = (device, *as_device_arrays(device, self.W0, self.b0, np.zeros_like(self.b0)))
        _, W0t, b0t, zero = self._params
        F, dF = linearised_features(self.net, self.X_source, self.X, sl, device, self.dtype)
        Yt, Ys, sb = as_device_arrays(device, self.Y[sl], self.Y_source[sl], self.s[sl])
        f_source = self._head(F, W0t, b0t)  # f(x)
        intrinsic = self._head(dF, W0t, zero)  # J_f(x) dx
        label_shift = Yt - Ys
        source_error = Ys - f_source
        Q = label_shift - intrinsic + source_error
        remainder = self._head(Z, W0t, b0t) - f_source - intrinsic
        for name, T in zip(self.TERMS, (label_shift, intrinsic, source_error, remainder), strict=True):
            self.terms_sq[name] += float(sb @ (T * T).sum(1))
        return Q
