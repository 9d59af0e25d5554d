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
    if _plain_and_finite(X):
        return X  # what check_array returns for it, without its conversions' overhead
    return native_byte_order(
        check_array(X, allow_nd=True, dtype="numeric", ensure_all_finite=True, input_name="X")
    )


def _plain_and_finite(X):
    """Whether X is a numpy array that ``check_array(X, allow_nd=True, dtype="numeric")``
    would return unchanged: real numbers in native byte order, at least one sample (and one
    feature when 2-D), and finite (a sum that is finite; else check_array decides and names
    the problem)."""
    if type(X) is not np.ndarray or X.dtype.kind not in "biuf" or not X.dtype.isnative:
        return False
    if X.ndim < 2 or X.shape[0] == 0 or (X.ndim == 2 and X.shape[1] == 0):
        return False
    if X.dtype.kind != "f":
        return True
    torch_reads = (  # torch.from_numpy refuses negative strides and long double; warns on read-only
        X.dtype in (np.float32, np.float64)
        and X.flags.c_contiguous
        and X.flags.writeable
        and min(X.strides) >= 0  # (C-contiguous allows a negative stride on an axis of length 1)
    )
    if not torch_reads:
        with np.errstate(over="ignore", invalid="ignore"):
            return bool(np.isfinite(X.sum()))
    # torch's sum: vectorised and on torch's threads (32 MB of images: 0.8 ms, numpy's 2.7)
    return bool(torch.isfinite(torch.from_numpy(X).sum()))


def native_byte_order(X):
    """X itself, or a copy in native byte order (torch takes no big-endian arrays)."""
    if X.dtype.byteorder not in "=|" and X.dtype.byteorder != np.dtype(X.dtype.char).byteorder:
        return X.astype(X.dtype.newbyteorder("="))
    return X


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
    """Non-negative finite float64 weights of shape (n_samples,); None -> ones.

    The shape is checked by scikit-learn's own ``_check_sample_weight`` (its messages: "Sample
    weights must be 1D array or scalar", "sample_weight.shape == ..."). Weights whose sum
    overflows float64 are refused, as ``Ridge`` refuses them: the moments would be inf.
    """
    from sklearn.utils.validation import _check_sample_weight

    if sample_weight is None:
        return np.ones(n_samples)
    if not isinstance(sample_weight, numbers.Number):
        sample_weight = to_numpy(sample_weight)
    s = _check_sample_weight(
        sample_weight, np.empty((n_samples, 0)), dtype=np.float64, allow_all_zero_weights=True
    )
    if (s < 0).any():
        raise ValueError(f"Negative values in sample_weight (min {s.min():g}); weights must be >= 0.")
    with np.errstate(over="ignore", invalid="ignore"):
        total = s.sum()
    if not np.isfinite(total):
        raise ValueError(
            f"sample_weight sums to more than the largest float64 (max weight {s.max():g}, "
            f"{n_samples} samples): the weighted moments would overflow. Divide sample_weight by "
            "its maximum (or any constant); the ridge solution is unchanged if alpha is divided "
            "by the same constant."
        )
    if not allow_all_zero and not total > 0:
        raise ValueError("sample_weight sums to zero; give at least one sample a positive weight.")
    return s
