"""Fitting over a dask array: per-block sufficient statistics on the workers, merged here.

dask is optional (``pip install skl-transfer[dask]``); nothing here imports it unless X is
already a dask array.
"""

from __future__ import annotations

import sys

import numpy as np

from . import _solvers
from ._features import feature_batches
from ._moments import accumulate_moments


def is_dask_array(X):
    da = sys.modules.get("dask.array")
    return da is not None and isinstance(X, da.Array)


def _block_moments(net, X, Y, s, spec, batch_size):
    """Moments of one block of samples (runs on a worker)."""
    X = np.asarray(X, dtype=np.float64) if net is None else np.asarray(X)
    if np.issubdtype(X.dtype, np.floating) and not np.isfinite(X).all():
        raise ValueError("Input X contains NaN or infinity; remove or impute those samples.")
    Y = np.asarray(Y, dtype=np.float64).reshape(X.shape[0], -1)  # conv targets flattened per sample
    if not np.isfinite(Y).all():
        raise ValueError("Input y contains NaN or infinity; remove or impute those samples.")
    s = np.asarray(s, dtype=np.float64)
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("sample_weight must be finite and >= 0; got negative, NaN or infinite weights.")
    batches = feature_batches(net, X, batch_size)
    return accumulate_moments(
        batches, Y, s, spec.W0, spec.b0, spec.geometry, spec.feature_shape, blas=net is None
    )


def dask_moments(net, X, Y, s, spec, batch_size):
    """Merged moments of all blocks of the dask array X (blocks along the sample axis).

    ``Y`` and ``s`` are dask arrays or numpy arrays with one row per sample; they are
    chunked like X. Each block runs the (pickled) frozen extractor on a worker.
    """
    import dask
    import dask.array as da

    X = X.rechunk({i: -1 for i in range(1, X.ndim)})
    rows = X.chunks[0]
    Y = da.asarray(Y)
    Y = Y.rechunk({0: rows, **{i: -1 for i in range(1, Y.ndim)}})
    s = da.asarray(s).rechunk((rows,))
    net_d = dask.delayed(net, pure=True)
    tasks = [
        dask.delayed(_block_moments, pure=True)(net_d, xb, yb, sb, spec, batch_size)
        for xb, yb, sb in zip(
            X.to_delayed().ravel(), Y.to_delayed().ravel(), s.to_delayed().ravel(), strict=True
        )
    ]
    moments = None
    for m in dask.compute(*tasks):
        moments = m if moments is None else _solvers.merge_moments(moments, m)
    return moments
