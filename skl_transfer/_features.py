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

    The first time a model key is seen in this process, its first sample goes through the
    cache with a probe for its computation: if that row is missing from every cache, the
    extractor runs on it twice (CPU and the device's random state restored in between) and
    must give the same bits and leave its state (tensors' version counters, attributes) as it
    was; only then is the row stored. Otherwise the extractor is not cached (a warning says why).

    With ``cache="auto"`` and a model not measured yet in this process, the returned cache is
    *measuring* (:meth:`CachedExtractor.choose`): the stream runs the first sample once, and
    the probe's second run happens only if the model is then chosen for caching. With
    ``"auto"`` and a model measured not to pay for the cache, returns None.
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

    if cached.measuring:
        # cache="auto": the stream computes the first sample once; only if the model is to be
        # cached does the probe run it again (cached.choose), so uncached models pay nothing
        cached.check = lambda first: verdict(lambda: _probe(net, X, device, dtype, first)) is None
        return cached

    def probe():  # the cache's compute for the first row: run twice, compared, then stored
        with torch.inference_mode():
            cached.features(X, slice(0, 1), lambda idx: _probe(net, X, device, dtype))

    return cached if verdict(probe) is None else None


def _probe(net, X, device, dtype, first=None):
    """The determinism probe: the first sample of X through ``net`` (again, if ``first`` holds
    its features from a run in the stream) with the random state restored afterwards; raises
    :class:`~skl_transfer._fingerprint.NotDeterministic` when a second run gives other bits or
    changes the module's state. Returns the features."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        if first is None:
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
    array) already holds the features. ``dtype`` is the extractor's output dtype. With an
    extractor, the first batch is the first sample alone (and so in ``predict`` too, whose
    features then have the bits of the fit's, served from the cache or not). ``cached`` is a
    :func:`cached_extractor` or None: cached rows skip the extractor, which runs only on the
    rows of a batch that no cache holds.
    Features stay on the device: the work on them (moments, predictions) is done by torch
    too, so torch's and numpy's thread pools never alternate batch by batch, which on a
    few cores costs an order of magnitude.
    """
    n = X.shape[0]
    if net is not None:
        device, dtype = module_device(net), floating_dtype(net)
    # The first sample goes alone: shape errors and the feature size surface after one
    # sample, before the bulk of the work.
    starts = [0, *range(1, n, batch_size)] if net is not None else range(0, n, batch_size)
    try:
        for start in starts:
            sl = slice(start, 1 if start == 0 and net is not None else min(start + batch_size, n))
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
                        f"{sl.start} to {sl.stop - 1}, but {first_shape} for sample 0; the features of "
                        "every sample must have one shape (pool or pad variable-size outputs in the "
                        "extractor)."
                    )
                Z = raw.reshape(raw.shape[0], -1).to(device=device, dtype=torch.float64)
            handed = time.perf_counter()
            yield sl, Z, raw.dtype, tuple(raw.shape[1:])
            if cached is not None and start > 0 and cached.measuring:
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
