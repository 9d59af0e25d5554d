"""Input checks shared by the estimators: run before any forward pass or solve."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.utils import check_array

from ._torch import is_tensor, to_numpy


def check_input(X):
    """Validate X for an extractor: shape (n_samples, *input_shape), finite, numeric.

    numpy arrays and array-likes go through ``check_array`` (n-D allowed, dtype kept);
    torch tensors are checked in place on their own device and never copied here.
    """
    if is_tensor(X):
        if X.ndim < 2:
            raise ValueError(
                f"Expected X of shape (n_samples, *input_shape), got a tensor of shape "
                f"{tuple(X.shape)}. Reshape with X.reshape(-1, 1) if each sample is a scalar."
            )
        if X.shape[0] == 0:
            raise ValueError("Found X with 0 sample(s); at least 1 is required.")
        if X.is_complex():
            raise ValueError("Complex data not supported; pass a real tensor.")
        if X.is_floating_point() and not bool(torch.isfinite(X).all()):
            raise ValueError("Input X contains NaN or infinity; remove or impute those samples.")
        return X
    return check_array(X, allow_nd=True, dtype="numeric", ensure_all_finite=True, input_name="X")


def check_target(y, n_samples, max_ndim=2):
    """y as a float64 array of shape (n_samples,) or (n_samples, k) (n-D up to ``max_ndim``
    for convolutional heads)."""
    y = check_array(to_numpy(y), ensure_2d=False, allow_nd=max_ndim > 2, dtype=np.float64, input_name="y")
    if y.ndim > max_ndim:
        raise ValueError(
            f"y must have shape (n_samples,) or (n_samples, k), got {y.shape}"
            + ("; an n-D y is for convolutional heads." if max_ndim == 2 else ".")
        )
    if y.shape[0] != n_samples:
        raise ValueError(f"X has {n_samples} samples but y has {y.shape[0]}; pass one target row per sample.")
    return y


def check_sample_weight(sample_weight, n_samples, allow_all_zero=False):
    """Non-negative finite float64 weights of shape (n_samples,); None -> ones."""
    if sample_weight is None:
        return np.ones(n_samples)
    if isinstance(sample_weight, numbers.Number):
        sample_weight = np.full(n_samples, sample_weight, dtype=np.float64)
    s = check_array(to_numpy(sample_weight), ensure_2d=False, dtype=np.float64, input_name="sample_weight")
    if s.ndim != 1 or s.shape[0] != n_samples:
        raise ValueError(f"sample_weight.shape == {s.shape}, expected ({n_samples},): one weight per sample.")
    if (s < 0).any():
        raise ValueError(f"Negative values in sample_weight (min {s.min():g}); weights must be >= 0.")
    if not allow_all_zero and not s.sum() > 0:
        raise ValueError("sample_weight sums to zero; give at least one sample a positive weight.")
    return s
