"""The one torch/numpy boundary.

Everything that touches a torch module or tensor on behalf of the estimators lives here:
device policy, the private frozen copy of the extractor, batched inference under
``torch.inference_mode`` and the conversion of features to float64 numpy arrays.
"""

from __future__ import annotations

import copy
import time
import warnings

import numpy as np
import torch
from scipy import linalg

from . import _fingerprint, _solvers
from ._cache import CachedExtractor


def is_tensor(x):
    return isinstance(x, torch.Tensor)


def to_numpy(x):
    """A CPU numpy view or copy of ``x`` if it is a tensor; ``x`` unchanged otherwise."""
    if is_tensor(x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # no numpy equivalent; float32 holds it exactly
            x = x.float()
        return x.numpy()
    return x


def resolve_device(device):
    """``"auto"`` -> cuda when available else cpu; anything else must name a usable device."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:0'."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} asks for CUDA but torch.cuda.is_available() is False; "
            "use device='auto' or device='cpu'."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} asks for MPS, which is not available; use device='cpu'.")
    if dev.type == "meta":
        raise ValueError(
            f"device={device!r} holds no data (meta tensors have shapes only), so no features can be "
            "computed there; use device='auto', 'cpu' or 'cuda'."
        )
    if dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as err:
            cause = (str(err).strip().splitlines() or [""])[0][:200]
            raise ValueError(
                f"device={device!r} cannot hold tensors in this torch ({type(err).__name__}: {cause}); "
                "use device='auto', 'cpu' or 'cuda', or install the torch backend for that device."
            ) from err
    return dev


def frozen_copy(module, device):
    """A private copy of ``module`` on ``device``, in eval mode, with gradients off.

    The user's module is only read (deep-copied): its weights, training flag, device,
    dtype and requires_grad flags stay as they were.
    """
    try:
        net = copy.deepcopy(module)
    except Exception as err:
        raise ValueError(
            f"Could not copy the extractor {type(module).__name__} ({err}); the estimator works on "
            "a private copy so as never to modify yours. Make the module deep-copyable (for "
            "weight norm, use torch.nn.utils.parametrizations.weight_norm)."
        ) from err
    net.to(device)
    net.eval()
    net.requires_grad_(False)
    return net


def floating_dtype(module):
    """The dtype of the module's first floating-point parameter or buffer, or None."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def module_device(module):
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _input_batch(X, sl, device, dtype):
    """A private copy of rows ``sl`` of X as a tensor on ``device``.

    Floating inputs are cast to the extractor's dtype; the copy guarantees that an
    in-place first layer can never write into the user's array.
    """
    if is_tensor(X):
        xb = X[sl].detach()
    else:
        xb = torch.from_numpy(np.array(X[sl], copy=True, order="C"))
    if dtype is not None and xb.is_floating_point():
        return xb.to(device=device, dtype=dtype, copy=True)
    return xb.to(device=device, copy=True)


def _forward(net, xb):
    """One forward pass of the frozen copy; errors name the batch and keep the cause."""
    try:
        out = net(xb)
    except Exception as err:
        if not xb.is_floating_point() and floating_dtype(net) is not None:
            fix = (
                f"X has dtype {xb.dtype}, passed to the extractor unchanged (integers stay integers, "
                "for extractors that take indices such as an nn.Embedding), while the extractor "
                f"computes in {floating_dtype(net)}: convert X, e.g. X.astype(np.float32) (scaled "
                "as the network expects, e.g. / 255 for 8-bit images)."
            )
        else:
            fix = "Pass X of shape (n_samples, *input_shape) with the input shape the extractor expects."
        raise ValueError(
            f"The extractor {type(net).__name__} failed on a batch of shape "
            f"{tuple(xb.shape)} (dtype {xb.dtype}): {err}. {fix}"
        ) from err
    return _check_output(out, xb.shape[0])


def _check_output(out, n):
    """The extractor's output for a batch of ``n`` samples: one real tensor, batch first."""
    if not is_tensor(out):
        raise TypeError(
            f"The extractor must return a tensor of features, got {type(out).__name__}; "
            "wrap it so that forward returns a single tensor."
        )
    if out.is_complex():
        raise ValueError(
            f"The extractor returned complex features (dtype {out.dtype}); the update is real. "
            "Return real features from the extractor, e.g. torch.view_as_real(z).flatten(1) "
            "(real and imaginary parts as features) or z.abs()."
        )
    if out.ndim == 0 or out.shape[0] != n:
        raise ValueError(
            f"The extractor returned shape {tuple(out.shape)} for a batch of "
            f"{n} samples; its output must keep the batch dimension first."
        )
    return out


def _check_finite(Z):
    if not bool(torch.isfinite(Z).all()):
        raise ValueError(
            "The extractor produced NaN or infinite features; check its weights and "
            "the scale and dtype of X (float16 overflows above 65504)."
        )
    return Z


def _forward_rows(net, X, rows, device, dtype):
    """Finite-checked features of the rows of X at ``rows`` (a slice or indices)."""
    return _check_finite(_forward(net, _input_batch(X, rows, device, dtype)))


def cached_extractor(net, X, cache, digest=None):
    """The feature cache for this extractor and X, or None (``cache`` off, no extractor, or an
    extractor that the cache must not serve).

    ``digest`` is a :class:`~skl_transfer._fingerprint.Digest` of ``net`` computed earlier (the
    fitted copy's, from fit): it is reused only while ``net`` still matches it (same tensors,
    version counters, code, attributes and hooks), else recomputed; a plain string (from a
    pickle) is never trusted. An extractor that cannot be keyed
    (:class:`~skl_transfer._fingerprint.Unkeyable`) is not cached, with one warning per process
    and cause.

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
    if not _fingerprint.still_valid(digest, net):
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
            first = _forward_rows(net, X, np.arange(1), device, dtype)
        state = _fingerprint.fingerprint_state(net)
        second = _forward_rows(net, X, np.arange(1), device, dtype)
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
    extractor, the first batch is the first sample alone. ``cache`` is the estimators'
    ``cached`` is a :func:`cached_extractor` or None: cached rows skip the extractor, which
    runs only on the rows of a batch that no cache holds.
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
                yield sl, torch.from_numpy(X[sl]), torch.float64, X.shape[1:]
                continue
            if cached is not None and cached.off:  # cache="auto" chose not to cache this model
                cached = None
            with torch.inference_mode():
                if cached is None:
                    raw = _forward_rows(net, X, sl, device, dtype)
                else:
                    raw = cached.features(
                        X,
                        sl,
                        lambda idx, sl=sl: _forward_rows(
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


def _as_device_arrays(device, *arrays):
    return [torch.as_tensor(a, dtype=torch.float64, device=device) for a in arrays]


class MomentSums:
    """Running weighted moments of design and residue rows, on the features' device.

    The same moments as merging :func:`~skl_transfer._solvers.batch_moments` of every batch
    with :func:`~skl_transfer._solvers.merge_moments` (each batch centred on its own mean,
    Chan, Golub & LeVeque's pairwise update), computed in place: one ``d x d`` float64
    accumulator, never a new one per batch. Each batch adds ``A^T A``
    (``A = diag(sqrt(s)) [Z - m_z, Q - m_q]``, so that one product holds ``G``, ``B`` and
    ``qq``) to the upper triangle only, block row by block row
    (``addmm_`` into views: about 9/16 of a full product's flops with 8 blocks), then the
    rank-1 correction of the means. Everything runs in torch, on the device and in the thread
    pool of the forward pass: handing the products to numpy's or scipy's BLAS, whose idle
    threads spin against torch's, made both the forward pass and the products slower.

    On the CPU, with ``blas=True`` (features that no torch extractor computes, so no torch
    work alternates with it) or when torch runs one thread, ``A^T A`` is added by BLAS ``syrk``
    instead, in place into a Fortran-ordered accumulator that ``G`` views: half a product's
    flops (an SRCNN fit on one thread: 13 s instead of 19 s).
    """

    def __init__(self, d, k, device, blas=False):
        f64 = dict(dtype=torch.float64, device=device)
        D = d + k  # rows [z, q]: one product gives G, B and qq (the trace of the q block)
        self.d, self.weight, self._A = d, 0.0, None
        self.mean = torch.zeros(D, **f64)
        self._syrk = None
        # one torch thread: no torch worker threads for BLAS's idle ones to spin against
        if torch.device(device).type == "cpu" and (blas or torch.get_num_threads() == 1):
            self._G = np.zeros((D, D), order="F")
            self._syrk = linalg.get_blas_funcs("syrk", (self._G,))
            self.G = torch.from_numpy(self._G)  # a view: updated in place by syrk and torch alike
        else:
            self.G = torch.zeros(D, D, **f64)  # upper triangle only until moments()
        edges = np.linspace(0, D, max(1, min(8, D // 128)) + 1).astype(int)
        self.blocks = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def _add_gram(self, A, scale):
        """``G += scale A^T A`` on the upper triangle."""
        if self._syrk is not None:  # A.numpy().T is Fortran-ordered: syrk reads A without a copy
            out = self._syrk(scale, A.numpy().T, beta=1.0, c=self._G, trans=0, lower=0, overwrite_c=1)
            if out is not self._G:  # pragma: no cover - f2py copies only a non-Fortran array
                self._G[...] = out
            return
        for a, b in self.blocks:
            self.G[a:b, a:].addmm_(A[:, a:b].T, A[:, a:], alpha=scale)

    def add(self, Z, Q, s):
        """Add a batch: float64 tensors ``Z`` (b, d), ``Q`` (b, k), ``s`` (b,) (not modified)."""
        S_b = float(s.sum())
        if S_b <= 0.0:
            return self
        n, d = Z.shape
        if self._A is None or self._A.shape[0] < n:  # reused: a fresh array costs page faults
            self._A = torch.empty(n, self.G.shape[0], dtype=torch.float64, device=Z.device)
        A = self._A[:n]
        mean = torch.cat([s @ Z, s @ Q]) / S_b
        torch.sub(Z, mean[:d], out=A[:, :d])
        torch.sub(Q, mean[d:], out=A[:, d:])
        if bool(s.min() != s.max()):
            A.mul_(s.sqrt()[:, None])
            scale = 1.0
        else:  # equal weights (the common case): scale the product instead of the rows
            scale = float(s[0])
        self._add_gram(A, scale)
        S = self.weight + S_b
        delta = mean - self.mean
        f = self.weight * S_b / S
        if f > 0.0:
            self.G.addr_(delta, delta, alpha=f)
        self.mean.add_(delta, alpha=S_b / S)
        self.weight = S
        return self

    def moments(self):
        """The accumulated moments as numpy :class:`~skl_transfer._solvers.Moments`."""
        G = np.triu(to_numpy(self.G))
        G += np.triu(G, 1).T
        mean, d = to_numpy(self.mean), self.d
        return _solvers.Moments(
            self.weight, mean[:d].copy(), mean[d:].copy(), G[:d, :d].copy(), G[:d, d:].copy(),
            float(np.trace(G[d:, d:])),
        )  # fmt: skip


def accumulate_moments(
    batches, Y, s, W0, b0, geometry=None, feature_shape=(), labels=None, residue=None, blas=False
):
    """Moments of the design rows and residue rows ``Q = targets - rows W0^T - b0``, merged
    batch by batch, returned as numpy.

    ``geometry`` turns a batch of features into design rows (a linear head: the features;
    a conv head: their patches) and a batch of targets into target rows; None is linear.
    Memory is O(d^2 + batch): the full design matrix is never formed. With ``labels``
    (one non-negative int per sample), returns one set of moments per label
    ``0 .. labels.max()`` instead (zero moments for a label without samples), still in one pass.
    ``residue`` (a :class:`PerturbResidue`, or None) gives each batch's residue ``Q`` per
    sample, which then replaces ``targets - h(Z)``; ``Y`` is not read. ``blas``: the features
    come from no torch extractor (see :class:`MomentSums`).
    """
    n_groups = 1 if labels is None else int(labels.max()) + 1
    groups = [None] * n_groups
    device = None
    with torch.inference_mode():
        for sl, Z, *_ in batches:
            if device is None:
                device = Z.device
                Yt, st, W0t, b0t = _as_device_arrays(device, Y, s, W0, b0)
            Yb = Yt[sl] if residue is None else residue(sl, Z)
            sb = st[sl]
            present = [0] if labels is None else np.unique(labels[sl])
            for g in present:
                if labels is None:
                    Zg, Yg, sg = Z, Yb, sb
                else:
                    idx = torch.as_tensor(np.flatnonzero(labels[sl] == g), device=device)
                    Zg, Yg, sg = Z[idx], Yb[idx], sb[idx]
                for rows, targets, w in _design_chunks(Zg, Yg, sg, geometry, feature_shape):
                    Q = targets if residue is not None else targets - rows @ W0t.T - b0t
                    if groups[g] is None:
                        groups[g] = MomentSums(W0.shape[1], W0.shape[0], device, blas)
                    groups[g].add(rows, Q, w)
    k, d = W0.shape
    out = [
        _solvers.Moments(0.0, np.zeros(d), np.zeros(k), np.zeros((d, d)), np.zeros((d, k)), 0.0)
        if m is None
        else m.moments()
        for m in groups
    ]
    return out[0] if labels is None else out


ROW_BUDGET = 4096  # design rows (patches) formed at once for a conv head (~4 copies live)


def _design_chunks(Z, Y, w, geometry, feature_shape):
    """Yield (design rows, target rows, row weights) for a batch, in chunks of samples whose
    patches number at most ROW_BUDGET (one sample at least): a conv head's patches are never
    all materialised, only about ROW_BUDGET x C_in * prod(kernel) floats at a time."""
    if geometry is None or geometry.kind == "linear":
        yield Z, Y, w
        return
    per = geometry.rows_per_sample(feature_shape)
    step = max(1, ROW_BUDGET // per)
    for i in range(0, Z.shape[0], step):
        rows = geometry.design(Z[i : i + step], feature_shape)
        yield rows, geometry.targets(Y[i : i + step], feature_shape), w[i : i + step].repeat_interleave(per)


def gather_design(batches, Y, s, geometry, feature_shape, residue=None):
    """All design rows, target rows and row weights as float64 numpy (for the dual solve).

    With ``residue`` (a :class:`PerturbResidue`), the second array holds its residue rows
    ``Q`` instead of the target rows.
    """
    rows, targets, weights = [], [], []
    with torch.inference_mode():
        for sl, Z, *_ in batches:
            if residue is None:
                Yb = torch.as_tensor(Y[sl], dtype=torch.float64, device=Z.device)
            else:
                Yb = residue(sl, Z)
            R = geometry.design(Z, feature_shape)
            rows.append(R.cpu().numpy())
            targets.append(geometry.targets(Yb, feature_shape).cpu().numpy())
            weights.append(np.repeat(s[sl], R.shape[0] // Z.shape[0]))
    return np.concatenate(rows), np.concatenate(targets), np.concatenate(weights)


def gather_features(batches):
    """All features as one float64 numpy array (used when n_samples < d)."""
    with torch.inference_mode():
        return torch.cat([b[1] for b in batches]).cpu().numpy()


def head_outputs(batches, n_samples, heads, geometry=None, feature_shape=()):
    """Outputs of several heads on the same features, as float64 numpy (n_samples, outputs).

    ``heads`` is a list of ``(coef, intercept)`` pairs; the features are computed once for all.
    """
    if geometry is not None and geometry.kind != "linear":
        return _conv_heads_outputs(batches, n_samples, heads, geometry, feature_shape)
    outs = None
    with torch.inference_mode():
        for sl, Z, *_ in batches:
            if outs is None:
                params = [_as_device_arrays(Z.device, coef, b) for coef, b in heads]
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
                outs[j][sl] = Yb.cpu().numpy()
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
                W = torch.cat(_as_device_arrays(device, *(c for c, _ in heads)))
                b = torch.cat(_as_device_arrays(device, *(i for _, i in heads)))
                L = geometry.rows_per_sample(feature_shape)
                H, c_out = len(heads), W.shape[0] // len(heads)
                outs = [np.empty((n_samples, c_out * L)) for _ in heads]
            step, start = max(1, ROW_BUDGET // L), sl.indices(n_samples)[0]
            for i in range(0, Z.shape[0], step):
                P = torch.addmm(b, geometry.design(Z[i : i + step], feature_shape), W.T)  # (m L, H c_out)
                m = P.shape[0] // L
                P = P.reshape(m, L, H, c_out).permute(2, 0, 3, 1).reshape(H, m, c_out * L).cpu().numpy()
                for j in range(H):
                    outs[j][start + i : start + i + m] = P[j]
    return outs


# -- method="perturb": the first-order residue from paired source samples ---------------


def _raw_rows(X, rows, device):
    """A private copy of the rows of X as a tensor on ``device``, in X's own dtype."""
    if is_tensor(X):
        return X[rows].detach().to(device=device, copy=True)
    return torch.from_numpy(np.array(X[rows], copy=True, order="C")).to(device)


_JVP_IMPORTED = False


def _jvp(net, x, v):
    """``torch.func.jvp(net, (x,), (v,))``.

    torch's first jvp imports its forward-mode decompositions through the deprecated
    ``torch.jit.script`` (torch 2.13), a warning about torch's internals that the user can do
    nothing about: it is silenced on that first call only.
    """
    global _JVP_IMPORTED
    if _JVP_IMPORTED:
        return torch.func.jvp(net, (x,), (v,))
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning
        )
        out = torch.func.jvp(net, (x,), (v,))
    _JVP_IMPORTED = True
    return out


def linearised_features(net, X_source, X, rows, device, dtype):
    """``F(x)`` and ``J_F(x) dx`` for rows of the pairs ``(x, x~ = x + dx)``, float64 (b, d).

    One forward-mode pass of the frozen copy (``torch.func.jvp``) at the source inputs ``x``
    along ``dx = x~ - x``: the features there and their directional derivative, so that
    ``F(x) + J_F(x) dx`` is the first-order estimate of the target features. ``dx`` is
    formed in the wider of the two inputs' dtypes before the cast to the extractor's
    ``dtype``, so a small shift is not lost to the rounding of the inputs. ``net=None``
    (X holds the features) is the identity: ``(x, dx)``.
    """
    xs, xt = _raw_rows(X_source, rows, device), _raw_rows(X, rows, device)
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
            out, tangent = _jvp(net, xs, dx)
    except Exception as err:
        raise ValueError(
            f"Forward-mode differentiation (torch.func.jvp) of the extractor {type(net).__name__} "
            f"failed on a batch of shape {tuple(xs.shape)}: {err}. method='perturb' needs an "
            "extractor whose operations support forward-mode autodiff; use method='exact' otherwise."
        ) from err
    b = _check_output(out, xs.shape[0]).shape[0]
    F = _check_finite(out).reshape(b, -1).to(torch.float64)
    dF = _check_finite(tangent).reshape(b, -1).to(torch.float64)
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

    def __init__(self, net, X, X_source, Y, Y_source, s, W0, b0, geometry=None, feature_shape=()):
        self.net, self.X, self.X_source = net, X, X_source
        self.Y, self.Y_source, self.s = Y, Y_source, s
        self.W0, self.b0 = W0, b0
        self.geometry, self.feature_shape = geometry, feature_shape
        self.dtype = None if net is None else floating_dtype(net)
        self.terms_sq = dict.fromkeys(self.TERMS, 0.0)
        self._params = None

    def _head(self, Z, coef, intercept):
        if self.geometry is None or self.geometry.kind == "linear":
            return Z @ coef.T + intercept
        return self.geometry.outputs(Z, self.feature_shape, coef, intercept)

    def __call__(self, sl, Z):
        device = Z.device
        if self._params is None or self._params[0] != device:
            self._params = (device, *_as_device_arrays(device, self.W0, self.b0, np.zeros_like(self.b0)))
        _, W0t, b0t, zero = self._params
        F, dF = linearised_features(self.net, self.X_source, self.X, sl, device, self.dtype)
        Yt, Ys, sb = _as_device_arrays(device, self.Y[sl], self.Y_source[sl], self.s[sl])
        f_source = self._head(F, W0t, b0t)  # f(x)
        intrinsic = self._head(dF, W0t, zero)  # J_f(x) dx
        label_shift = Yt - Ys
        source_error = Ys - f_source
        Q = label_shift - intrinsic + source_error
        remainder = self._head(Z, W0t, b0t) - f_source - intrinsic
        for name, T in zip(self.TERMS, (label_shift, intrinsic, source_error, remainder), strict=True):
            self.terms_sq[name] += float(sb @ (T * T).sum(1))
        return Q
