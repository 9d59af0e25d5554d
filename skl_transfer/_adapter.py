"""LayerVariationalAdapter: the analytic, regularised update of a pretrained last layer."""

from __future__ import annotations

import time
from numbers import Real

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval

from . import _solvers
from ._base import AdapterRegressorMixin, BaseAdapter
from ._dask import dask_moments, is_dask_array
from ._torch import accumulate_moments, gather_design, to_numpy
from ._validation import check_sample_weight


class LayerVariationalAdapter(AdapterRegressorMixin, BaseAdapter):
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
    fit_intercept : bool or "auto", default="auto"
        Whether to update the bias. "auto" follows the head: True for a Linear with a
        bias, a pair with an intercept, or ``head=None``; False otherwise.
    batch_size : int, default=256
        Samples per forward pass and per accumulation step of the normal equations.
    device : str or torch.device, default="auto"
        Where the extractor runs: "auto" is cuda when available, else cpu.
    verbose : int, default=0
        Print the time of the forward pass and of the solve when > 0.
    cache : bool, str, os.PathLike or joblib.Memory, default=True
        Feature cache, so that searches, cross-validation and learning curves run the
        extractor on each distinct sample once. True: in this process's memory (least
        recently used rows evicted beyond 1 GiB; see :func:`skl_transfer.set_cache_limit`).
        A directory (or a ``joblib.Memory``): also in an SQLite file there, shared by worker
        processes (``n_jobs > 1``, dask). False or None: no cache. Keys cover the extractor's
        class, repr, parameters and buffers (bitwise), the input bytes, device and dtype;
        a cached feature is bitwise the one the extractor computed.

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
        The same norm after the update, with the adapted head.
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
    Gram eigenvalues below ``max(max(n, d) * eps64, eps_f**2)`` times the largest
    (``eps_f``: the machine epsilon of the extractor's dtype) are treated as zero for every alpha,
    so rank-deficient features give the minimum-norm solution at ``alpha=0`` rather than
    inf or NaN, and the solution is continuous as alpha goes to 0.

    ``partial_fit`` merges the moments of each batch into the running ones (never raw sums),
    so the model after the last batch equals ``fit`` on all the data; memory does not grow
    with the number of batches.

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
    }

    def __init__(
        self,
        extractor=None,
        head=None,
        *,
        alpha=1.0,
        fit_intercept="auto",
        batch_size=256,
        device="auto",
        verbose=0,
        cache=True,
    ):
        self.extractor = extractor
        self.head = head
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.cache = cache

    _supports_conv = True

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the layer update on target-domain data.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor, or features (n_samples, d) when ``extractor=None``.
        y : array-like of shape (n_samples,) or (n_samples, k)
            Targets on the head's output scale.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights ``s_i`` of the squared errors.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        if is_dask_array(X):
            return self._fit_dask(X, y, sample_weight)
        p = self._start(X, y, sample_weight)
        spec = p.spec
        n_rows = p.n_samples * spec.rows_per_sample  # samples x output positions for a conv head
        if n_rows >= spec.d:
            solver = "primal"
            # a search fits every candidate on the same folds: their moments are computed once
            key = (
                None
                if p.cached is None
                else p.cached.moments_key(p.Y, p.s, spec.W0, spec.b0, [self.batch_size])
            )
            moments = None if key is None else p.cached.get_moments(key)
            if moments is None:
                moments = accumulate_moments(
                    p.batches, p.Y, p.s, spec.W0, spec.b0, spec.geometry, spec.feature_shape
                )
                if key is not None:
                    p.cached.put_moments(key, moments)
            t1 = time.perf_counter()
            dWt, db, residual_sq = _solvers.ridge_primal(
                moments, self.alpha, spec.fit_intercept, spec.rtol(n_rows)
            )
            residue_sq = _solvers.uncentred(moments)[2]
        else:
            solver, moments = "dual", None
            Z, T, w = gather_design(p.batches, p.Y, p.s, spec.geometry, spec.feature_shape)
            Q = T - Z @ spec.W0.T - spec.b0
            t1 = time.perf_counter()
            dWt, db, residual_sq = _solvers.ridge_dual(
                Z, Q, w, self.alpha, spec.fit_intercept, spec.rtol(n_rows)
            )
            residue_sq = float(w @ (Q * Q).sum(1))
        self._log(
            f"{p.n_samples} samples, {spec.d} features, {solver} solve: "
            f"features {t1 - p.t0:.3f}s, solve {time.perf_counter() - t1:.3f}s"
        )
        self._store(spec, p.X, p.net, dWt, db, residue_sq, residual_sq, p.digest)
        self.solver_ = solver
        self.n_samples_seen_ = p.n_samples
        self._moments = moments  # lets partial_fit continue a primal fit
        return self

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
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, sample_weight=None):
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

        Returns
        -------
        self : object
            The updated estimator.
        """
        moments = getattr(self, "_moments", None)
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
        # Streamed data is seen once: the feature cache would only fill memory.
        if moments is None:
            p = self._start(X, y, sample_weight, use_cache=False, allow_zero_weight=True)
            spec, X, Y, s, net, batches, n_seen = p.spec, p.X, p.Y, p.s, p.net, p.batches, 0
            digest = p.digest
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
            batches = self._features(self._runtime_extractor(), X, use_cache=False)
        m = accumulate_moments(batches, Y, s, spec.W0, spec.b0, spec.geometry, spec.feature_shape)
        moments = m if moments is None else _solvers.merge_moments(moments, m)
        n_seen += X.shape[0]
        if not moments.weight > 0:
            raise ValueError(
                "All samples seen so far by partial_fit have zero sample_weight; the update "
                "needs at least one positively weighted sample."
            )
        dWt, db, residual_sq = _solvers.ridge_primal(
            moments, self.alpha, spec.fit_intercept, spec.rtol(n_seen)
        )
        self._store(spec, X, net, dWt, db, _solvers.uncentred(moments)[2], residual_sq, digest)
        self.solver_ = "primal"
        self.n_samples_seen_ = n_seen
        self._moments = moments
        return self
