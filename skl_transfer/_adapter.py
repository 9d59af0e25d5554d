"""LayerVariationalAdapter: the analytic, regularised update of a pretrained last layer."""

from __future__ import annotations

import time
from numbers import Real
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, StrOptions

from . import _solvers
from ._base import AdapterRegressorMixin, BaseAdapter, MomentsMixin
from ._dask import dask_moments, is_dask_array
from ._features import gather_design
from ._moments import accumulate_moments
from ._perturb import PerturbResidue
from ._torch import host_bits, is_tensor, to_numpy
from ._validation import check_sample_weight, native_byte_order

# The moments of a perturb fit and the squared norms of its residue's terms (one cache entry):
# the Moments fields first, so that the cache sizes it like any moments entry.
_PerturbMoments = NamedTuple(
    "_PerturbMoments", [*_solvers.Moments.__annotations__.items(), ("terms_sq", dict)]
)


def _is_batch_iterable(X):
    """A DataLoader, iterator or other iterable that is not array-like: a stream of batches."""
    if isinstance(X, torch.utils.data.DataLoader) or hasattr(X, "__next__"):
        return True
    if isinstance(X, (np.ndarray, torch.Tensor, list, tuple, str, bytes)) or is_dask_array(X):
        return False
    return hasattr(X, "__iter__") and not hasattr(X, "__array__") and not hasattr(X, "shape")


class LayerVariationalAdapter(MomentsMixin, AdapterRegressorMixin, BaseAdapter):
    r"""Closed-form adaptation of a pretrained last layer to a new domain.

    With ``Z = extractor(X)`` (flattened to ``n_samples x d``) and the pretrained head
    ``h(z) = z W_0^T + b_0``, the transferal residue is ``Q = Y - h(Z)`` and the update solves

    .. math::

        \min_{\Delta W, \Delta b} \sum_i s_i \| z_i \Delta W^T + \Delta b - q_i \|^2
        + \alpha \| \Delta W \|_F^2

    i.e. ridge regression of the residue on the target features, which shrinks the head
    toward its pretrained weights. ``coef_ = W_0 + \Delta W`` and
    ``intercept_ = b_0 + \Delta b``. The bias is never penalised and is updated only when
    the intercept is fitted. With ``alpha=0`` the update is the minimum-norm least-squares
    solution, ``\Delta W^T = Z^+ Q`` for a bias-free head (the paper's formula).

    ``method="perturb"`` is the paper's first-order variant for domain shifts given as pairs:
    target samples ``x~_i = x_i + dx_i`` (X) with labels ``y~_i`` (y), each paired with a source
    sample ``x_i`` (``X_source``, e.g. the same image less blurred) with label ``y_i``
    (``y_source``). With ``f = h o F`` the pretrained network, the residue is

    .. math::

        Q = \Delta Y - J_f(X) \Delta X + (Y - f(X)),

    where ``J_f(x) dx`` replaces ``f(x~) - f(x)`` by its first-order estimate; it is computed
    by forward-mode autodiff (``torch.func.jvp`` of the frozen extractor at ``x`` along
    ``dx``, batch by batch, never finite differences). The update is regressed, as in the
    paper and its authors' code, on the target features ``Z = F(X~)``: the features the
    adapted head sees on the target domain. For an affine extractor ``F(x~) = F(x) + J_F dx``
    and the two methods give the same update.

    Parameters
    ----------
    extractor : torch.nn.Module or None, default=None
        Frozen body of the pretrained network, mapping a batch of inputs to features of
        any shape (flattened per sample). It is deep-copied, put in eval mode and run
        under ``torch.inference_mode``; the module passed in is never modified.
        None means X already holds the features (2-D).
    head : torch.nn.Linear, (coef, intercept) pair or None, default=None
        Pretrained last layer. A pair holds ``coef`` of shape (k, d) or (d,) and
        ``intercept`` as an array of shape (k,), a float, or None. None is a zero prior:
        the estimator is then ridge regression on the features.
    alpha : float, default=1.0
        Penalty on ``||coef_ - W_0||_F^2``, used as written (not squared). Must be >= 0.
    method : {"exact", "perturb"}, default="exact"
        How the transferal residue is computed. "exact": ``Q = Y - h(Z)`` from the target
        data alone. "perturb": the first-order residue above, from target samples paired
        row by row with source samples, passed to ``fit`` as ``X_source`` and ``y_source``
        (with metadata routing enabled, request them with
        ``set_fit_request(X_source=True, y_source=True)``).
    fit_intercept : bool or "auto", default="auto"
        Whether to update the bias. "auto" follows the head: True for a Linear with a
        bias, a pair with an intercept, or ``head=None``; False otherwise.
    batch_size : int, default=256
        Samples per forward pass and per accumulation step of the normal equations.
    device : str or torch.device, default="auto"
        Where the extractor runs: "auto" is cuda when available, else cpu.
    verbose : int, default=0
        Print the time of the forward pass and of the solve when > 0.
    cache : "auto", bool, str, os.PathLike or joblib.Memory, default="auto"
        Feature cache, so that searches, cross-validation and learning curves run the
        extractor on each distinct sample once. True: in this process's memory (least
        recently used rows evicted beyond 1 GiB; see :func:`skl_transfer.set_cache_limit`).
        "auto": the same, for each extractor whose rows cost more to compute than to cache
        (measured on its first fit in the process: the cache's work is at most 30 % of the
        extractor's and the estimator's on the first batch); others run as with False.
        A directory (or a ``joblib.Memory``): also in an SQLite file there, shared by worker
        processes (``n_jobs > 1``, dask); it must be owned by you and not writable by others.
        False or None: no cache. Keys cover the extractor's code (its classes' methods and what
        they call), hooks, parameters, buffers and attributes, the input bytes, device and
        dtype; a cached feature is bitwise the one the extractor computed. An extractor that
        cannot be keyed, or that is not deterministic, is not cached (a ``CacheKeyWarning``
        says why).

    Attributes
    ----------
    coef_ : ndarray of shape (k, d) or (d,)
        Adapted weights (torch Linear layout); (d,) when y is 1-D.
    intercept_ : ndarray of shape (k,) or float
        Adapted bias (zero when the head has none and it is not fitted).
    delta_coef_ : ndarray, same shape as coef_
        ``coef_ - W_0``, the layer variation.
    delta_intercept_ : ndarray of shape (k,) or float
        ``intercept_ - b_0``.
    fit_intercept_ : bool
        The resolved ``fit_intercept``.
    residue_norm_ : float
        Transferal residue on the training data before the update,
        ``sqrt(sum_i s_i ||y_i - h(z_i)||^2)`` (the Frobenius norm of Q for unit weights).
    residual_norm_ : float
        The same norm after the update, with the adapted head. With ``method="perturb"``
        both norms are those of the first-order residue ``Q`` and of ``Q`` minus the update.
    residue_terms_ : dict
        ``method="perturb"`` only: the weighted norms ``sqrt(sum_i s_i ||t_i||^2)`` of the
        residue's terms, ``"label_shift"`` (``y~ - y``), ``"intrinsic"`` (``J_f(x) dx``),
        ``"source_error"`` (``y - f(x)``), and ``"taylor_remainder"``
        (``f(x~) - f(x) - J_f(x) dx``, the error of the first-order estimate: small next to
        ``"intrinsic"`` when the shift is small enough for the first-order variant).
    solver_ : {"primal", "dual"}
        "primal" solves the d x d normal equations accumulated batch by batch
        (n_samples >= d); "dual" the n x n kernel system (n_samples < d).
    extractor_ : torch.nn.Module or None
        The private frozen copy of the extractor (CPU, eval mode).
    n_samples_seen_ : int
        Number of samples the update was computed from (summed over ``partial_fit`` calls).
    input_shape_ : tuple
        Per-sample shape of X seen in fit.
    n_features_in_ : int
        Number of columns of X, when X is 2-D.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Column names of X, when X is a DataFrame with string column names and no extractor.

    See Also
    --------
    LayerVariationalAdapterCV : The same update with alpha chosen by cross-validation.
    sklearn.linear_model.Ridge : The same solve with a zero prior and no extractor.

    Notes
    -----
    Features are converted to float64 and every solve is in float64, whatever the
    extractor's dtype. With ``n_samples >= d`` the weighted means and co-moments of
    (Z, Q) are merged batch by batch (Chan et al.), so memory is O(d^2 + batch_size) and
    the N x d feature matrix is never stored; otherwise the n x n kernel is used.
    The Gram matrix is scaled to a unit diagonal before it is factorised (a change of
    variables: the penalty stays ``alpha ||dW||^2`` in the features' units), so the solve does
    not depend on the features' scales. One Cholesky factorisation serves when that matrix is
    well conditioned; otherwise features held in memory are solved from the data (a QR of the
    design, as Ridge's svd solver), and streamed moments by an eigendecomposition whose
    eigenvalues below ``max(max(n, d) * eps64, eps_f**2)`` times the largest (``eps_f``: the
    machine epsilon of the extractor's dtype) are treated as zero for every alpha, so
    rank-deficient features give the minimum-norm solution at ``alpha=0`` rather than inf or
    NaN, and the solution is continuous as alpha goes to 0.

    ``partial_fit`` merges the moments of each batch into the running ones (never raw sums),
    so the model after the last batch equals ``fit`` on all the data; memory does not grow
    with the number of batches.

    ``method="perturb"`` costs one forward pass of X (the target features, cached like
    those of "exact") and one forward-mode pass of X_source (about two to three forward
    passes; not cached, as it depends on the pair). The paper's code builds ``J_f`` by
    forward finite differences, one network evaluation per input coordinate and sample.
    The source arrays are split with X by ``GridSearchCV`` and ``cross_validate`` (they are
    sample-aligned), but a Pipeline transforms X only: with preprocessing steps before the
    adapter, put the preprocessing in the extractor instead, so that X and X_source see the
    same map. ``method="perturb"`` does not take dask arrays (use ``partial_fit``).

    References
    ----------
    H.-H. Tseng, H.-Y. Lin, K.-H. Hung, Y. Tsao. "Interpretations of Domain Adaptations
    via Layer Variational Analysis", ICLR 2023, arXiv:2302.01798.

    Examples
    --------
    >>> import numpy as np
    >>> from skl_transfer import LayerVariationalAdapter
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.normal(size=(50, 3))
    >>> W0 = np.array([[1.0, -2.0, 0.5]])
    >>> y = Z @ np.array([1.2, -2.0, 0.4]) + 0.3
    >>> adapter = LayerVariationalAdapter(head=(W0, 0.0), alpha=0.0).fit(Z, y)
    >>> np.round(adapter.coef_, 6), round(adapter.intercept_, 6)
    (array([ 1.2, -2. ,  0.4]), 0.3)
    """

    _parameter_constraints: dict = {
        **BaseAdapter._parameter_constraints,
        "alpha": [Interval(Real, 0, None, closed="left")],
        "method": [StrOptions({"exact", "perturb"})],
    }

    def __init__(
        self,
        extractor=None,
        head=None,
        *,
        alpha=1.0,
        method="exact",
        fit_intercept="auto",
        batch_size=256,
        device="auto",
        verbose=0,
        cache="auto",
    ):
        self.extractor = extractor
        self.head = head
        self.alpha = alpha
        self.method = method
        self.fit_intercept = fit_intercept
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.cache = cache

    _supports_conv = True

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None, X_source=None, y_source=None):
        """Fit the layer update on target-domain data.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape), or an iterable of batches
            Inputs of the extractor, or features (n_samples, d) when ``extractor=None``.
            With ``method="perturb"``: the target samples ``x~_i``. For data that does not
            fit in memory, a ``torch.utils.data.DataLoader`` (or any iterable that is not an
            array) yielding ``(X, y)`` or ``(X, y, sample_weight)`` batches, with ``y=None``:
            the batches are streamed once through the moments and solved once at the end, the
            same update as ``fit`` on all of them (the moments path).
        y : array-like of shape (n_samples,) or (n_samples, k)
            Targets on the head's output scale (None with an iterable X).
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights ``s_i`` of the squared errors.
        X_source : array-like or torch.Tensor of the shape of X, default=None
            ``method="perturb"`` only (required there): the source sample ``x_i`` paired
            with each target sample, ``x~_i = x_i + dx_i``. Floating point.
        y_source : array-like of the shape of y, default=None
            ``method="perturb"`` only (required there): the labels ``y_i`` of the source
            samples.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        from ._base import _is_float32

        # head=None without an extractor is Ridge: float32 X gives float32 coef_, as there
        self._ridge_dtype = (
            np.float32 if self.extractor is None and self.head is None and _is_float32(X) else None
        )
        if _is_batch_iterable(X):
            return self._fit_batches(X, y, sample_weight, X_source, y_source)
        perturb = self._uses_source(X_source, y_source)
        if is_dask_array(X):
            if perturb:
                raise ValueError(
                    "method='perturb' does not take dask arrays; call partial_fit on numpy "
                    "batches (with their X_source and y_source), or use method='exact'."
                )
            return self._fit_dask(X, y, sample_weight)
        p = self._start(X, y, sample_weight)
        spec = p.spec
        residue = None
        if perturb:
            X_source, Y_source = self._check_source(p.X, p.Y, spec, X_source, y_source)
            residue = PerturbResidue(
                p.net, p.X, X_source, p.Y, Y_source, p.s, spec.W0, spec.b0, spec.geometry, spec.feature_shape
            )
        n_rows = p.n_samples * spec.rows_per_sample  # samples x output positions for a conv head
        data_tol = _solvers.data_rtol((n_rows, spec.d), spec.feature_eps)
        if n_rows >= spec.d:
            solver = "primal"
            # The design rows stay available (features: X itself; an extractor's: the batches,
            # kept by reference while n_rows x d fits DATA_MAX_ENTRIES) so that an ill-conditioned
            # problem can be re-solved from them; a perturb residue is streamed only.
            in_memory = residue is None and n_rows * spec.d <= _solvers.DATA_MAX_ENTRIES
            tapped = []
            if in_memory and p.net is not None:

                def tap(batches):
                    for batch in batches:
                        tapped.append(batch)
                        yield batch

                p.batches = tap(p.batches)

            def data():
                if not in_memory:
                    return None
                if p.net is None:
                    Z = p.X
                    return Z, p.Y - Z @ spec.W0.T - spec.b0, p.s
                # moments from the cache leave the stream unread: read it now (cached rows)
                Z, T, w = gather_design(
                    iter(tapped or p.batches), p.Y, p.s, spec.geometry, spec.feature_shape
                )
                return Z, T - Z @ spec.W0.T - spec.b0, w

            moments = self._primal_moments(p, residue)
            t1 = time.perf_counter()
            dWt, db, residual_sq = _solvers.ridge_primal(
                moments, self.alpha, spec.fit_intercept, spec.rtol(n_rows), data=data, data_tol=data_tol
            )
            tapped.clear()
            residue_sq = _solvers.uncentred(moments)[2]
        else:
            solver, moments = "dual", None
            Z, T, w = gather_design(p.batches, p.Y, p.s, spec.geometry, spec.feature_shape, residue)
            Q = T if perturb else T - Z @ spec.W0.T - spec.b0
            t1 = time.perf_counter()
            dWt, db, residual_sq = _solvers.ridge_dual(
                Z, Q, w, self.alpha, spec.fit_intercept, spec.rtol(n_rows), data_tol=data_tol
            )
            residue_sq = float(w @ (Q * Q).sum(1))
        self._log(
            f"{p.n_samples} samples, {spec.d} features, {solver} solve: "
            f"features{' and jvp' if perturb else ''} {t1 - p.t0:.3f}s, "
            f"solve {time.perf_counter() - t1:.3f}s"
        )
        self._store(spec, p.X, p.net, dWt, db, residue_sq, residual_sq, p.digest)
        self.solver_ = solver
        self.n_samples_seen_ = p.n_samples
        self._moments = moments  # lets partial_fit continue a primal fit
        self._moments_method = self.method
        self._set_terms(None if residue is None else residue.terms_sq)
        return self

    def _primal_moments(self, p, residue):
        """Moments of (Z, Q) for the primal solve, through the cache of a search's fits."""
        spec = p.spec
        key = None
        if p.cached is not None:
            # a search fits every candidate on the same folds: their moments are computed once
            extra = () if residue is None else (["perturb"], host_bits(residue.X_source), residue.Y_source)
            # every input of the moments: targets, weights, prior, the head's geometry (a conv
            # head's padding and dilation decide its patches), feature shape and batching
            key = p.cached.moments_key(
                p.Y, p.s, spec.W0, spec.b0, [spec.geometry.signature()], list(spec.feature_shape),
                [self.batch_size], *extra,
            )  # fmt: skip
        entry = None if key is None else p.cached.get_moments(key)
        if entry is None:
            moments = p.moments(residue=residue)
            entry = moments if residue is None else _PerturbMoments(*moments, dict(residue.terms_sq))
            if key is not None:
                p.cached.put_moments(key, entry)
        if residue is None:
            return entry
        residue.terms_sq.update(entry.terms_sq)
        return _solvers.Moments(*entry[:6])

    def _uses_source(self, X_source, y_source):
        """Whether this fit is ``method="perturb"``; errors for source arrays that do not fit the method."""
        given = [name for name, v in (("X_source", X_source), ("y_source", y_source)) if v is not None]
        if self.method == "exact":
            if given:
                raise ValueError(
                    f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} only used by "
                    "method='perturb' (the first-order residue from paired source samples); "
                    "method='exact' computes the residue from the target data alone. Set "
                    "method='perturb', or do not pass the source arrays."
                )
            return False
        missing = [name for name in ("X_source", "y_source") if name not in given]
        if missing:
            raise ValueError(
                f"method='perturb' needs the source samples paired with the target ones, but "
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: call "
                "fit(X, y, X_source=X_src, y_source=y_src), with X[i] = X_src[i] + dX[i] row by "
                "row. Through a Pipeline or a search with metadata routing enabled, request them "
                "with set_fit_request(X_source=True, y_source=True)."
            )
        return True

    def _check_source(self, X, Y, spec, X_source, y_source):
        """Validate the source arrays against the (validated) target ones.

        Returns ``(X_source, Y_source)``: X_source like X (float64 2-D without an extractor,
        tensors kept as they are), Y_source float64 of shape (n_samples, outputs).
        """
        if is_tensor(X_source) and self.extractor is not None:
            if X_source.is_floating_point() and not bool(torch.isfinite(X_source).all()):
                raise ValueError("X_source contains NaN or infinity; remove or impute those samples.")
            Xs = X_source
        else:
            Xs = native_byte_order(
                check_array(
                    to_numpy(X_source),
                    allow_nd=self.extractor is not None,
                    dtype=np.float64 if self.extractor is None else "numeric",
                    ensure_all_finite=True,
                    input_name="X_source",
                )
            )
        if Xs.shape[0] != X.shape[0]:
            raise ValueError(
                f"X has {X.shape[0]} samples but X_source has {Xs.shape[0]}; method='perturb' needs "
                "one source sample per target sample, paired row by row (X[i] = X_source[i] + dX[i])."
            )
        if tuple(Xs.shape[1:]) != tuple(X.shape[1:]):
            raise ValueError(
                f"X_source has per-sample shape {tuple(Xs.shape[1:])} but X has {tuple(X.shape[1:])}; "
                "a source sample and its target sample must have the same shape (X[i] = X_source[i] + dX[i])."
            )
        y_shape = (X.shape[0], *spec.y_shape)
        Ys = check_array(
            to_numpy(y_source), ensure_2d=False, allow_nd=True, dtype=np.float64, input_name="y_source"
        )
        if Ys.shape != y_shape:
            raise ValueError(
                f"y_source has shape {Ys.shape} but y has {y_shape}; pass the source labels with the "
                "shape of y, one row per sample, paired with the rows of y."
            )
        return Xs, Ys.reshape(Y.shape)

    def _set_terms(self, terms_sq):
        """Store ``residue_terms_`` from squared norms (None: an exact fit, which has none)."""
        self._terms_sq = terms_sq
        if terms_sq is None:
            if hasattr(self, "residue_terms_"):
                del self.residue_terms_
            return
        self.residue_terms_ = {name: float(np.sqrt(max(v, 0.0))) for name, v in terms_sq.items()}

    def _fit_dask(self, X, y, sample_weight):
        """Fit over a dask array: block moments on the workers, merged, one primal solve."""
        if X.ndim < 2 or any(np.isnan(c) for c in X.chunks[0]):
            raise ValueError(
                "A dask X needs shape (n_samples, *input_shape) with known chunk sizes; "
                "call X.compute_chunk_sizes() first."
            )
        n = X.shape[0]
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None.")
        y = y if is_dask_array(y) else np.asarray(to_numpy(y))
        if y.shape[0] != n:
            raise ValueError(f"X has {n} samples but y has {y.shape[0]}; pass one target row per sample.")
        if sample_weight is not None and not is_dask_array(sample_weight):
            sample_weight = check_sample_weight(sample_weight, n)
        elif sample_weight is not None and sample_weight.shape != (n,):
            raise ValueError(
                f"sample_weight.shape == {sample_weight.shape}, expected ({n},): one weight per sample."
            )
        s = np.ones(n) if sample_weight is None else sample_weight
        # set up (validation, frozen copy, feature size) on the first sample, here; blocks
        # are seen once, so the workers do not cache features
        p = self._start(np.asarray(X[:1].compute()), np.asarray(y[:1]), None, use_cache=False)
        spec = p.spec
        moments = dask_moments(p.net, X, y, s, spec, self.batch_size)
        if not moments.weight > 0:
            raise ValueError("sample_weight sums to zero; give at least one sample a positive weight.")
        dWt, db, residual_sq = _solvers.ridge_primal(
            moments, self.alpha, spec.fit_intercept, spec.rtol(n * spec.rows_per_sample)
        )
        self._store(spec, X, p.net, dWt, db, _solvers.uncentred(moments)[2], residual_sq, p.digest)
        self.solver_ = "primal"
        self.n_samples_seen_ = n
        self._moments = moments
        self._moments_method = "exact"
        self._set_terms(None)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def _fit_batches(self, data, y, sample_weight, X_source, y_source):
        """``fit`` over an iterable of ``(X, y[, sample_weight])`` batches (a DataLoader)."""
        if y is not None or sample_weight is not None or X_source is not None or y_source is not None:
            raise ValueError(
                "With an iterable X (a DataLoader of batches), y and sample_weight come from its "
                "batches: pass y=None and yield (X, y) or (X, y, sample_weight) tuples. "
                "method='perturb' needs arrays or partial_fit."
            )
        if self.method != "exact":
            raise ValueError("method='perturb' does not take an iterable X; call partial_fit on its batches.")
        self._moments = None  # start again, as fit does
        self.__dict__.pop("solver_", None)
        n_batches = 0
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                raise TypeError(
                    "Each batch of an iterable X must be a tuple (X, y) or (X, y, sample_weight), "
                    f"got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                    + "."
                )
            Xb, yb, *swb = batch
            self._partial(Xb, yb, swb[0] if swb else None, None, None, solve=False)
            n_batches += 1
        if n_batches == 0:
            raise ValueError("The iterable X yielded no batches; pass at least one (X, y) batch.")
        spec, moments = self._spec, self._moments
        dWt, db, residual_sq = _solvers.ridge_primal(
            moments, self.alpha, spec.fit_intercept, spec.rtol(self.n_samples_seen_ * spec.rows_per_sample)
        )
        X_last = Xb if hasattr(Xb, "shape") else np.asarray(Xb)
        residue_sq = _solvers.uncentred(moments)[2]
        self._store(spec, X_last, self.extractor_, dWt, db, residue_sq, residual_sq, self._weights_digest)
        return self

    def partial_fit(self, X, y, sample_weight=None, X_source=None, y_source=None):
        """Add a batch of target-domain data to the update (out-of-core fitting).

        The first call sets the estimator up as ``fit`` does; later calls (and calls after a
        ``fit`` that used the primal solver) run the extractor copied then, merge the batch's
        moments into the running ones and re-solve: after the last batch the model equals
        ``fit`` on all batches together. ``alpha`` may change between calls.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            A batch of inputs (features when ``extractor=None``).
        y : array-like of shape (n_samples,) or (n_samples, k)
            Its targets; the same number of columns in every call.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the batch's samples.
        X_source : array-like or torch.Tensor of the shape of X, default=None
            ``method="perturb"`` only (required there): the batch's source samples.
        y_source : array-like of the shape of y, default=None
            ``method="perturb"`` only (required there): their labels.

        Returns
        -------
        self : object
            The updated estimator.
        """
        return self._partial(X, y, sample_weight, X_source, y_source, solve=True)

    def _partial(self, X, y, sample_weight, X_source, y_source, solve):
        """One partial_fit step; ``solve=False`` merges the batch's moments without solving
        (the batches of an iterable fit, solved once after the last)."""
        perturb = self._uses_source(X_source, y_source)
        moments = getattr(self, "_moments", None)
        if moments is None and self.__dict__.get("_moments_dropped"):
            raise ValueError(
                "partial_fit cannot continue this fit: its moments were dropped by drop_moments(). "
                "Call fit on all the data, or partial_fit on a fresh clone from the first batch."
            )
        if moments is None and getattr(self, "solver_", None) == "dual":
            raise ValueError(
                "partial_fit cannot continue a fit that used the dual solver (fewer samples "
                "than features): it kept no d x d moments. Call partial_fit from the first "
                "batch on, or fit on all the data at once."
            )
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None; "
                "pass the batch's targets."
            )
        if moments is not None and getattr(self, "_moments_method", "exact") != self.method:
            raise ValueError(
                f"method changed to {self.method!r} between calls; the moments so far hold the "
                f"residue of method={self._moments_method!r}. Call fit (or partial_fit on a clone) "
                "to start again."
            )
        # Streamed data is seen once: the feature cache would only fill memory.
        if moments is None:
            p = self._start(X, y, sample_weight, use_cache=False, allow_zero_weight=True)
            spec, X, Y, s, net, batches, n_seen = p.spec, p.X, p.Y, p.s, p.net, p.batches, 0
            digest, runtime, terms_sq = p.digest, p.net, None
        else:
            spec, net, n_seen = self._spec, self.extractor_, self.n_samples_seen_
            digest = self._weights_digest
            X, y = self._validate_X(X, reset=False, y=y, y_max_ndim=max(2, len(spec.y_shape) + 1))
            Y = y.reshape(X.shape[0], -1)
            if tuple(y.shape[1:]) != spec.y_shape:
                raise ValueError(
                    f"y has shape {y.shape} but earlier batches had per-sample shape {spec.y_shape}; "
                    "pass targets of the same shape in every call."
                )
            if self._resolve_fit_intercept(spec.prior) != spec.fit_intercept:
                raise ValueError(
                    "fit_intercept changed between partial_fit calls; the moments so far were "
                    f"set up for fit_intercept_={spec.fit_intercept}. Call fit to start again."
                )
            s = check_sample_weight(sample_weight, X.shape[0], allow_all_zero=True)
            runtime, terms_sq = self._runtime_extractor(), getattr(self, "_terms_sq", None)
            batches = self._features(runtime, X, use_cache=False)
        residue = None
        if perturb:
            X_source, Y_source = self._check_source(X, Y, spec, X_source, y_source)
            residue = PerturbResidue(
                runtime, X, X_source, Y, Y_source, s, spec.W0, spec.b0, spec.geometry, spec.feature_shape
            )
        m = accumulate_moments(
            batches,
            Y,
            s,
            spec.W0,
            spec.b0,
            spec.geometry,
            spec.feature_shape,
            residue=residue,
            blas=runtime is None,
        )
        moments = m if moments is None else _solvers.merge_moments(moments, m)
        n_seen += X.shape[0]
        if not moments.weight > 0:
            raise ValueError(
                "All samples seen so far by partial_fit have zero sample_weight; the update "
                "needs at least one positively weighted sample."
            )
        if solve:
            dWt, db, residual_sq = _solvers.ridge_primal(
                moments, self.alpha, spec.fit_intercept, spec.rtol(n_seen * spec.rows_per_sample)
            )
        else:
            k = spec.W0.shape[0]
            dWt, db, residual_sq = np.zeros((spec.d, k)), np.zeros(k), np.nan
        self._store(spec, X, net, dWt, db, _solvers.uncentred(moments)[2], residual_sq, digest)
        self.solver_ = "primal"
        self.n_samples_seen_ = n_seen
        self._moments = moments
        self._moments_method = self.method
        if residue is not None and terms_sq is not None:
            terms_sq = {name: terms_sq[name] + v for name, v in residue.terms_sq.items()}
        self._set_terms(None if residue is None else terms_sq or residue.terms_sq)
        return self
