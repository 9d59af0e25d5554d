"""The feature stream: an extractor's features of X batch by batch, through the cache, and
what the estimators read from it (all design rows, all features, several heads' outputs)."""

from __future__ import annotations

import time

import numpy as np
import torch

from . import _fingerprint
from ._cache import CachedExtractor
from ._heads import LINEAR
from ._moments import ROW_BUDGET
from ._torch import as_device_arrays, floating_dtype, forward_rows, from_numpy, module_device, to_float64


def cached_extractor(net, X, cache, digest=None, trusted=False):
    """The feature cache for this extractor and X, or None (``cache`` off, no extractor, or an
    extractor that the cache must not serve).

    ``digest`` is a :class:`~skl_transfer._fingerprint.Digest` of ``net`` computed earlier (the
    fitted copy's, from fit): it is reused only while ``net`` still matches it (same tensors,
    version counters, code, attributes and hooks), else recomputed; a plain string (from a
    pickle) is never trusted. With ``trusted``, a :class:`~skl_transfer._fingerprint.Digest`
    is reused without walking ``net`` again (``net`` is a shared frozen copy, :mod:`._frozen`,
    which nothing writes to, or the fit's own copy) while torch's global state is as it was.
    An extractor that cannot be keyed (:class:`~skl_transfer._fingerprint.Unkeyable`) is not
    cached, with one warning per process and cause.

    The first time a model key is seen in this process, the determinism probe runs, unless a
    directory cache holds the first row (stored by a process that ran it): the extractor runs
    on the first sample alone twice (CPU and the device's random state restored in between) and
    must give the same bits and leave its state (tensors' version counters, attributes) as it
    was. Otherwise the extractor is not cached (a warning says why). The probe's rows are not
    stored: the stream computes the first sample in its batch.

    With ``cache="auto"`` and a model not measured yet in this process, the returned cache is
    *measuring* (:meth:`CachedExtractor.choose`): the probe runs only if the model is then
    chosen for caching. With ``"auto"`` and a model measured not to pay for the cache, returns
    None.
    """
    if net is None or cache is False or cache is None:
        return None
    trusted = trusted and isinstance(digest, _fingerprint.Digest) and digest.same_globals()
    if not trusted and not _fingerprint.still_valid(digest, net):
        try:
            digest = _fingerprint.fingerprint(net)
        except _fingerprint.Unkeyable as err:
            _fingerprint.warn_once(err)
            return None
    device, dtype = module_device(net), floating_dtype(net)
    cached = CachedExtractor(cache, net, device, dtype, X, digest)
    if cached.off:  # cache="auto" and this model costs less to compute than to cache
        return None
    if X.shape[0] == 0:
        return cached

    def verdict(probe):  # None if the extractor may be cached; else warned once, not cached
        found = _fingerprint.verify(cached.mkey, probe)
        if found is not None:
            _fingerprint.warn_once(found)
        return found

    def probe():  # skipped when the process that stored the first row in a directory ran it
        if not cached.on_disk(X, 0):
            _probe(net, X, device, dtype)

    if cached.measuring:
        # cache="auto": only if the model is to be cached does the probe run (cached.choose),
        # so uncached models pay nothing
        cached.check = lambda: verdict(probe) is None
        return cached
    return cached if verdict(probe) is None else None


def _probe(net, X, device, dtype):
    """The determinism probe: the first sample of X through ``net`` twice, the random state
    restored in between; raises :class:`~skl_transfer._fingerprint.NotDeterministic` when the
    second run gives other bits or changes the module's state. Nothing of it is stored: the
    feature stream computes the sample in its batch (a sample alone goes through other float32
    kernels, which round differently)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        first = forward_rows(net, X, np.arange(1), device, dtype)
        state = _fingerprint.fingerprint_state(net)
        second = forward_rows(net, X, np.arange(1), device, dtype)
    if not state.matches(net):
        raise _fingerprint.NotDeterministic(
            "state",
            f"{type(net).__name__}.forward (or one of its hooks) changes its own parameters, "
            "buffers, attributes or hook state",
        )
    if not _fingerprint.same_bits(first, second):
        raise _fingerprint.NotDeterministic(
            "random", f"{type(net).__name__} gave other features for the same sample on a second run"
        )
    return first


def feature_batches(net, X, batch_size, cached=None):
    """Yield ``(slice, Z, dtype, shape)``: features flattened to float64 tensors (b, d) on the
    net's device, the extractor's output dtype and its per-sample output shape.

    ``net`` is a frozen copy from :func:`frozen_copy`, or None when X (a float64 numpy
    array) already holds the features. ``dtype`` is the extractor's output dtype. The batches
    are ``X[0:batch_size]``, ``X[batch_size:2 * batch_size]``, ...: a script running the same
    batches (or all of X at once: float32 matrix products give a row the same bits in any
    batch of 8 rows or more, on the CPU) gets the same features. ``cached`` is a
    :func:`cached_extractor` or None: cached rows skip the extractor, which runs only on the
    rows of a batch that no cache holds.
    Features stay on the device: the work on them (moments, predictions) is done by torch
    too, so torch's and numpy's thread pools never alternate batch by batch, which on a
    few cores costs an order of magnitude.
    """
    n = X.shape[0]
    if net is not None:
        device, dtype = module_device(net), floating_dtype(net)
    try:
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            if net is None:
                yield sl, from_numpy(X[sl]), torch.float64, X.shape[1:]
                continue
            if cached is not None and cached.off:  # cache="auto" chose not to cache this model
                cached = None
            with torch.inference_mode():
                if cached is None:
                    raw = forward_rows(net, X, sl, device, dtype)
                else:
                    raw = cached.features(
                        X,
                        sl,
                        lambda idx, sl=sl: forward_rows(
                            net, X, np.arange(sl.start, sl.stop)[idx], device, dtype
                        ),
                    )
                if start == 0:
                    first_shape = tuple(raw.shape[1:])
                elif tuple(raw.shape[1:]) != first_shape:
                    raise ValueError(
                        f"The extractor returned per-sample shape {tuple(raw.shape[1:])} for samples "
                        f"{sl.start} to {sl.stop - 1}, but {first_shape} for the first batch; the "
                        "features of every sample must have one shape (pool or pad variable-size "
                        "outputs in the extractor)."
                    )
                Z = raw.reshape(raw.shape[0], -1).to(device=device, dtype=torch.float64)
            handed = time.perf_counter()
            yield sl, Z, raw.dtype, tuple(raw.shape[1:])
            if cached is not None and cached.measuring:
                # cache="auto" on a model's first fit: the extractor's and the consumer's time
                # on this batch against the cache's decide whether the cache serves this model
                cached.choose(X, time.perf_counter() - handed)
    finally:
        if cached is not None:
            cached.abandon()  # a stream closed before cache="auto" could choose


def gather_design(batches, Y, s, geometry, feature_shape, residue=None):
    """All design rows, target rows and row weights as float64 numpy (for the dual solve).

    With ``residue`` (a :class:`PerturbResidue`), the second array holds its residue rows
    ``Q`` instead of the target rows.
    """
    rows, targets, weights = [], [], []
    with torch.inference_mode():
        for sl, Z, *_ in batches:
            if residue is None:
                (Yb,) = as_device_arrays(Z.device, Y[sl])
            else:
                Yb = residue(sl, Z)
            R = geometry.design(Z, feature_shape)
            rows.append(to_float64(R))
            targets.append(to_float64(geometry.targets(Yb, feature_shape)))
            weights.append(np.repeat(s[sl], R.shape[0] // Z.shape[0]))
    return np.concatenate(rows), np.concatenate(targets), np.concatenate(weights)


def gather_features(batches):
    """All features as one float64 numpy array (used when n_samples < d)."""
    with torch.inference_mode():
        return to_float64(torch.cat([b[1] for b in batches]))


def head_outputs(batches, n_samples, heads, geometry=LINEAR, feature_shape=()):
    """Outputs of several heads on the same features, as float64 numpy (n_samples, outputs).

    ``heads`` is a list of ``(coef, intercept)`` pairs; the features are computed once for all.
    """
    if geometry.is_conv:
        return _conv_heads_outputs(batches, n_samples, heads, geometry, feature_shape)
    if geometry.is_block:  # the adapted earlier layers, then each head (float64 numpy)
        outs = [np.empty((n_samples, np.shape(coef)[0])) for coef, _ in heads]
        with torch.inference_mode():
            for sl, Z, *_ in batches:
                Z = to_float64(Z)
                for out, (coef, b) in zip(outs, heads, strict=True):
                    out[sl] = geometry.outputs(Z, feature_shape, coef, b)
        return outs
    outs = None
    with torch.inference_mode():
        for sl, Z, *_ in batches:
            if outs is None:
                params = [as_device_arrays(Z.device, coef, b) for coef, b in heads]
            for j, (coef_t, b_t) in enumerate(params):
                if Z.shape[1] != coef_t.shape[1]:
                    raise ValueError(
                        f"The extractor produced {Z.shape[1]} features, but the head was fitted "
                        f"on {coef_t.shape[1]}."
                    )
                Yb = Z @ coef_t.T + b_t
                if outs is None:
                    outs = [None] * len(heads)
                if outs[j] is None:
                    outs[j] = np.empty((n_samples, Yb.shape[1]))
                outs[j][sl] = to_float64(Yb)
    return outs


def _conv_heads_outputs(batches, n_samples, heads, geometry, feature_shape):
    """:func:`head_outputs` of conv heads: the patches of each chunk of samples are formed
    once and multiplied by all the heads' weights at once (one matrix product instead of a
    float64 convolution per head, which torch's CPU kernels run an order slower)."""
    outs = None
    with torch.inference_mode():
        for sl, Z, *_ in batches:
            if outs is None:
                device = Z.device
                W = torch.cat(as_device_arrays(device, *(c for c, _ in heads)))
                b = torch.cat(as_device_arrays(device, *(i for _, i in heads)))
                L = geometry.rows_per_sample(feature_shape)
                H, c_out = len(heads), W.shape[0] // len(heads)
                outs = [np.empty((n_samples, c_out * L)) for _ in heads]
            step, start = max(1, ROW_BUDGET // L), sl.indices(n_samples)[0]
            for i in range(0, Z.shape[0], step):
                P = torch.addmm(b, geometry.design(Z[i : i + step], feature_shape), W.T)  # (m L, H c_out)
                m = P.shape[0] // L
                P = to_float64(P.reshape(m, L, H, c_out).permute(2, 0, 3, 1).reshape(H, m, c_out * L))
                for j in range(H):
                    outs[j][start + i : start + i + m] = P[j]
    return outs
