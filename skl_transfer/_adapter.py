"""LayerVariationalAdapter: the analytic, regularised update of a pretrained last layer."""

from __future__ import annotations

import copy
import itertools
import time
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from . import _solvers
from ._heads import AdaptedNetwork, as_prior, make_linear
from ._torch import (
    accumulate_moments,
    feature_batches,
    frozen_copy,
    gather_features,
    linear_outputs,
    resolve_device,
    to_numpy,
)
from ._validation import check_input, check_sample_weight, check_target


class LayerVariationalAdapter(RegressorMixin, BaseEstimator):
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
    input_shape_ : tuple
        Per-sample shape of X seen in fit.
    n_features_in_ : int
        Number of columns of X, when X is 2-D.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Column names of X, when X is a DataFrame with string column names and no extractor.

    See Also
    --------
    sklearn.linear_model.Ridge : The same solve with a zero prior and no extractor.

    Notes
    -----
    Features are converted to float64 and every solve is in float64, whatever the
    extractor's dtype. With ``n_samples >= d`` the weighted means and co-moments of
    (Z, Q) are merged batch by batch (Chan et al.), so memory is O(d^2 + batch_size) and
    the N x d feature matrix is never stored; otherwise the n x n kernel is used.
    At ``alpha=0`` eigenvalues of the Gram matrix below ``max(n, d) * eps`` times the
    largest are treated as zero, so rank-deficient features give the minimum-norm
    solution rather than inf or NaN.

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
        "extractor": [torch.nn.Module, None],
        "head": [torch.nn.Module, tuple, list, None],  # which Module, which pair: checked in fit
        "alpha": [Interval(Real, 0, None, closed="left")],
        "fit_intercept": ["boolean", StrOptions({"auto"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "verbose": ["verbose"],
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
    ):
        self.extractor = extractor
        self.head = head
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose

    # -- validation -------------------------------------------------------------------

    def _validate_X(self, X, *, reset, y=None):
        """Validate X (and y in fit). Returns (X, y); y is None in predict.

        Without an extractor, ``validate_data`` records ``n_features_in_`` (and feature names)
        as in every sklearn estimator; with one, the input attributes are set at the end of a
        successful fit by :meth:`_record_input`.
        """
        if self.extractor is None:
            X = to_numpy(X)
            if y is None:
                return validate_data(self, X, reset=reset, dtype=np.float64, force_writeable=True), None
            X, y = validate_data(
                self,
                X,
                to_numpy(y),
                reset=reset,
                multi_output=True,
                y_numeric=True,
                dtype=np.float64,
                force_writeable=True,
            )
            return X, check_target(y, X.shape[0])
        X = check_input(X)
        if not reset and tuple(X.shape[1:]) != self.input_shape_:
            raise ValueError(
                f"X has per-sample shape {tuple(X.shape[1:])}, but {type(self).__name__} was "
                f"fitted on inputs of shape {self.input_shape_}; pass X of shape "
                f"(n_samples, {', '.join(map(str, self.input_shape_))})."
            )
        return X, (None if y is None else check_target(y, X.shape[0]))

    def _record_input(self, X):
        self.input_shape_ = tuple(X.shape[1:])
        if self.extractor is None:
            return
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_  # left by an earlier fit without an extractor
        if X.ndim == 2:
            self.n_features_in_ = X.shape[1]
        elif hasattr(self, "n_features_in_"):
            del self.n_features_in_

    def _resolve_fit_intercept(self, prior):
        if self.fit_intercept != "auto":
            return bool(self.fit_intercept)
        return prior.W0 is None or prior.b0 is not None

    def _check_prior(self, prior, n_outputs, n_features):
        if prior.n_outputs is not None and prior.n_outputs != n_outputs:
            raise ValueError(
                f"The head has {prior.n_outputs} outputs but y has {n_outputs} column(s); pass y "
                f"of shape (n_samples, {prior.n_outputs})"
                + (" (or 1-D)" if prior.n_outputs == 1 else "")
                + " or a head with one output per column of y."
            )
        if n_features is not None and prior.n_features not in (None, n_features):
            source = "the extractor produces" if self.extractor is not None else "X has"
            raise ValueError(
                f"The head expects {prior.n_features} input features but {source} {n_features}; "
                "pass the head that belongs to these features (coef of shape (k, d))."
            )

    # -- features ---------------------------------------------------------------------

    def _runtime_extractor(self):
        """The fitted extractor on the requested device (cached, never pickled)."""
        if self.extractor_ is None:
            return None
        device = resolve_device(self.device)
        if device.type == "cpu":
            return self.extractor_
        cached = getattr(self, "_extractor_on_device", None)
        if cached is None or cached[0] != device:
            cached = (device, frozen_copy(self.extractor_, device))
            self._extractor_on_device = cached
        return cached[1]

    # -- fit / predict ----------------------------------------------------------------

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
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None; "
                "pass the target-domain targets, shape (n_samples,) or (n_samples, k)."
            )
        prior = as_prior(self.head)
        device = resolve_device(self.device)
        X, y = self._validate_X(X, reset=True, y=y)
        n_samples = X.shape[0]
        s = check_sample_weight(sample_weight, n_samples)
        Y = y.reshape(n_samples, -1)
        self._check_prior(prior, Y.shape[1], X.shape[1] if self.extractor is None else None)
        fit_intercept = self._resolve_fit_intercept(prior)

        t0 = time.perf_counter()
        net = None if self.extractor is None else frozen_copy(self.extractor, device)
        batches = feature_batches(net, X, self.batch_size)
        first = next(batches)
        d, feature_dtype = first[1].shape[1], first[2]
        self._check_prior(prior, Y.shape[1], d)
        rtol = _solvers.gram_rtol(
            (n_samples, d), torch.finfo(feature_dtype).eps if feature_dtype.is_floating_point else 0.0
        )
        W0 = np.zeros((Y.shape[1], d)) if prior.W0 is None else prior.W0
        b0 = np.zeros(Y.shape[1]) if prior.b0 is None else prior.b0
        batches = itertools.chain([first], batches)

        if n_samples >= d:
            self.solver_ = "primal"
            moments = accumulate_moments(batches, Y, s, W0, b0)
            t1 = time.perf_counter()
            dWt, db, residual_sq = _solvers.ridge_primal(moments, self.alpha, fit_intercept, rtol)
            residue_sq = _solvers.uncentred(moments)[2]
        else:
            self.solver_ = "dual"
            Z = gather_features(batches)
            Q = Y - Z @ W0.T - b0
            t1 = time.perf_counter()
            dWt, db, residual_sq = _solvers.ridge_dual(Z, Q, s, self.alpha, fit_intercept, rtol)
            residue_sq = float(s @ (Q * Q).sum(1))
        t2 = time.perf_counter()
        if self.verbose:
            print(
                f"[{type(self).__name__}] {n_samples} samples, {d} features, {self.solver_} solve: "
                f"features {t1 - t0:.3f}s, solve {t2 - t1:.3f}s"
            )

        coef = W0 + dWt.T
        intercept = b0 + db
        squeeze = y.ndim == 1
        self.coef_ = coef[0] if squeeze else coef
        self.intercept_ = float(intercept[0]) if squeeze else intercept
        self.delta_coef_ = dWt.T[0] if squeeze else dWt.T.copy()
        self.delta_intercept_ = float(db[0]) if squeeze else db
        self.fit_intercept_ = fit_intercept
        self.residue_norm_ = float(np.sqrt(residue_sq))
        self.residual_norm_ = float(np.sqrt(residual_sq))
        self._record_input(X)
        self.extractor_ = None if net is None else net.to("cpu")
        self._extractor_on_device = None
        self._head_dtype = torch.promote_types(torch.promote_types(prior.dtype, feature_dtype), torch.float32)
        self._has_bias = fit_intercept or prior.b0 is not None
        return self

    def _coef_2d(self):
        return np.atleast_2d(self.coef_), np.atleast_1d(self.intercept_)

    def predict(self, X):
        """Predict with the adapted head.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor (features when ``extractor=None``).

        Returns
        -------
        y_pred : ndarray of shape (n_samples,) or (n_samples, k)
        """
        check_is_fitted(self)
        X, _ = self._validate_X(X, reset=False)
        coef, intercept = self._coef_2d()
        batches = feature_batches(self._runtime_extractor(), X, self.batch_size)
        out = linear_outputs(batches, X.shape[0], coef, intercept)
        return out[:, 0] if np.ndim(self.coef_) == 1 else out

    def to_module(self):
        """The adapted network as a torch module (CPU, eval mode, gradients off).

        Returns
        -------
        module : AdaptedNetwork
            ``head(flatten(extractor(x)))`` with the adapted ``torch.nn.Linear`` head; its
            output has shape (n_samples, k) (k = 1 for 1-D y) and equals ``predict`` up to
            the rounding of the head's dtype (float32 or wider).
        """
        check_is_fitted(self)
        coef, intercept = self._coef_2d()
        head = make_linear(coef, intercept if self._has_bias else None, self._head_dtype)
        extractor = None if self.extractor_ is None else copy.deepcopy(self.extractor_)
        return AdaptedNetwork(extractor, head).eval().requires_grad_(False)

    def __sklearn_is_fitted__(self):
        return hasattr(self, "coef_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.input_tags.allow_nan = False
        return tags

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_extractor_on_device", None)
        return state
