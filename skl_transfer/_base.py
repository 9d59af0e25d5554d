"""Machinery shared by the adapters: validation, the frozen extractor, prediction, export."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import os
import time
from dataclasses import dataclass
from numbers import Integral

import joblib
import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.metrics import r2_score
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_feature_names, check_is_fitted, validate_data

from . import _diagnostics, _fingerprint, _frozen, _solvers
from ._block import BlockGeometry, block_prior, fit_block, is_block
from ._features import cached_extractor, feature_batches, head_outputs
from ._heads import AdaptedNetwork, Prior, as_prior
from ._layers import (
    LayerInput,
    check_called_once,
    export_state,
    is_auto,
    last_called_layer,
    named_layer,
    replace_layer,
)
from ._moments import accumulate_moments
from ._torch import floating_dtype, frozen_copy, input_batch, module_device, resolve_device, to_numpy
from ._validation import check_input, check_sample_weight, check_target


@dataclass
class HeadSpec:
    """What a fit learns about the head before solving: prior, sizes, dtypes (picklable)."""

    prior: Prior
    W0: np.ndarray  # (k, d), zeros for a zero prior
    b0: np.ndarray  # (k,)
    y_ndim: int
    fit_intercept: bool
    feature_dtype: torch.dtype
    geometry: object = None  # LinearGeometry or ConvGeometry
    feature_shape: tuple = ()  # per-sample shape of the extractor's output
    y_shape: tuple = ()  # per-sample shape of y (predictions have it too)

    @property
    def d(self):
        return self.W0.shape[1]

    @property
    def rows_per_sample(self):
        return self.geometry.rows_per_sample(self.feature_shape)

    @property
    def feature_eps(self):
        return torch.finfo(self.feature_dtype).eps if self.feature_dtype.is_floating_point else 0.0

    def rtol(self, n_rows):
        """The eigenvalue threshold of a design of ``n_rows`` rows of these features."""
        return _solvers.gram_rtol((n_rows, self.d), self.feature_eps)


@dataclass
class Problem:
    """One validated fit call: the data, the head spec and the feature stream.

    ``batches`` yields ``(slice, Z, dtype, shape)`` from :func:`feature_batches`; its first batch
    has already been run, so the feature size and dtype are known.
    """

    X: object
    Y: np.ndarray
    s: np.ndarray
    spec: HeadSpec
    net: torch.nn.Module | None
    batches: object
    t0: float
    cached: object = None  # the feature cache of this call, or None

    @property
    def n_samples(self):
        return self.Y.shape[0]

    @property
    def shape(self):
        """``(n_rows, d)`` of the design: samples times a conv head's output positions, features."""
        return (self.n_samples * self.spec.rows_per_sample, self.spec.d)

    @property
    def targets(self):
        """Per-output statistics of the targets, for ``diagnostics_``."""
        return _diagnostics.TargetStats(self.Y, self.s, self.spec.rows_per_sample)

    @property
    def digest(self):
        return None if self.cached is None else self.cached.digest

    def moments(self, **kwargs):
        """Moments of the whole feature stream (:func:`accumulate_moments`; ``labels`` or
        ``residue`` as keywords)."""
        spec = self.spec
        return accumulate_moments(
            self.batches,
            self.Y,
            self.s,
            spec.W0,
            spec.b0,
            spec.geometry,
            spec.feature_shape,
            blas=self.net is None,
            **kwargs,
        )


class BaseAdapter(BaseEstimator):
    """Base class of the adapters (not public): everything but the solve."""

    _parameter_constraints: dict = {
        "extractor": [torch.nn.Module, None],
        "head": [torch.nn.Module, tuple, list, str, None],  # which Module, pair or name: checked in fit
        "fit_intercept": ["boolean", StrOptions({"auto"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "verbose": ["verbose"],
        "cache": ["boolean", str, os.PathLike, joblib.Memory, None],
    }

    @property
    def _forward_batch_size(self):
        """Samples per forward pass of the extractor."""
        return self.batch_size

    def __sklearn_clone__(self):
        """``sklearn.base.clone`` (as GridSearchCV, cross_validate and learning_curve call it):
        the clone shares this estimator's ``torch.nn.Module`` parameters (extractor, head)
        instead of deep-copying them, and clones every other parameter as sklearn does. The
        estimators only read those modules (fit works on its own frozen copy), so sharing is
        safe, and a deep copy of a large network per candidate and fold costs more than the
        fit itself."""
        params = {
            name: value if isinstance(value, torch.nn.Module) else clone(value, safe=False)
            for name, value in self.get_params(deep=False).items()
        }
        new = type(self)(**params)
        if hasattr(self, "_metadata_request"):
            new._metadata_request = copy.deepcopy(self._metadata_request)
        if hasattr(self, "_sklearn_output_config"):
            new._sklearn_output_config = copy.deepcopy(self._sklearn_output_config)
        if hasattr(self, "_skl_callbacks"):
            new._skl_callbacks = self._skl_callbacks
        return new

    # -- validation -------------------------------------------------------------------

    _supports_conv = False  # estimators that handle convolutional heads set True
    _ridge_update = False  # set by RidgeUpdateMixin: the head is a ridge update of y's residue

    def _validate_X(self, X, *, reset, y=None, y_max_ndim=2):
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
        # the column names of a 2-D X (a DataFrame) are checked as sklearn does, extractor or not:
        # recorded in fit, and reordered or renamed columns refused at predict
        if reset or hasattr(self, "feature_names_in_") or not isinstance(X, np.ndarray | torch.Tensor):
            _check_feature_names(self, X, reset=reset)  # (an array has none: nothing to check)
        X = check_input(X)
        if not reset and tuple(X.shape[1:]) != self.input_shape_:
            raise ValueError(
                f"X has per-sample shape {tuple(X.shape[1:])}, but {type(self).__name__} was "
                f"fitted on inputs of shape {self.input_shape_}; pass X of shape "
                f"(n_samples, {', '.join(map(str, self.input_shape_))})."
            )
        return X, (None if y is None else check_target(y, X.shape[0], max_ndim=y_max_ndim))

    def _record_input(self, X):
        self.input_shape_ = tuple(X.shape[1:])
        if self.extractor is None:
            return
        if X.ndim == 2:
            self.n_features_in_ = X.shape[1]
        elif hasattr(self, "n_features_in_"):
            del self.n_features_in_

    _supports_block = False  # estimators that adapt a block head (an nn.Sequential) set True

    def _prior(self):
        """The pretrained head as a :class:`Prior`: ``head``, or the layer of ``extractor`` it names."""
        if is_block(self.head):
            if not self._supports_block:
                raise TypeError(
                    f"{type(self).__name__} adapts one layer, and head is a block (an nn.Sequential of "
                    f"{len(self.head)} modules). LayerVariationalAdapter and LayerVariationalClassifier "
                    "(loss='squared') adapt blocks; choose their alpha, alpha_body and max_iter with "
                    "sklearn.model_selection.GridSearchCV, or pass the block's last Linear as head."
                )
            return block_prior(self.head)
        name = self._layer_name()
        return as_prior(self.head if name is None else named_layer(self.extractor, name))

    def _layer_name(self):
        """The dotted name of the layer of ``extractor`` that ``head`` names (for ``"auto"``, the
        one found in this fit, inside :meth:`_head_resolved`), or None for a module, pair or None."""
        if not isinstance(self.head, str):
            return None
        if not is_auto(self.head):
            return self.head
        resolved = self.__dict__.get("_auto_head")
        if resolved is None:
            raise ValueError(
                f"head='auto' is resolved from X during fit, but {type(self).__name__} needed the "
                "head before seeing X; pass the layer's name instead (e.g. head='fc')."
            )
        return resolved[0]

    @contextlib.contextmanager
    def _head_resolved(self, X):
        """Within: ``head="auto"`` names the layer found on X's first sample.

        Yields ``(name, net)``, ``net`` the frozen copy of the model that the probe ran on (which
        :meth:`_start` uses), or None when ``head`` is not ``"auto"``. Nested uses (a fit that
        needs the head before :meth:`_start`, e.g. to check labels) share the outermost probe;
        nothing is kept once it ends.
        """
        if not is_auto(self.head) or "_auto_head" in self.__dict__:
            yield self.__dict__.get("_auto_head")
            return
        if not isinstance(self.extractor, torch.nn.Module):
            raise ValueError(
                "head='auto' adapts the last Linear/Conv layer that the model's forward calls, so "
                f"extractor must be the whole model (a torch.nn.Module), got {self.extractor!r}; pass "
                "the model as extractor (e.g. LayerVariationalAdapter(model, head='auto'))."
            )
        X, _ = self._validate_X(X, reset=True)  # y is checked in _start, once the layer is known
        device = resolve_device(self.device)
        copied = _frozen.frozen(self.extractor, device, keep=False)  # a named layer's: not kept
        net = copied.net
        name = last_called_layer(net, input_batch(X, slice(0, 1), device, floating_dtype(net)))
        self._auto_head = (name, copied)
        try:
            yield self._auto_head
        finally:
            del self._auto_head

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

    def _start(self, X, y, sample_weight, use_cache=True, allow_zero_weight=False):
        """Validate a fit call, copy the extractor, run it on the first batch.

        Every check that needs no forward pass runs first; the head's size and X's shape
        are then checked against the extractor's first batch.
        """
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None; "
                "pass the target-domain targets, shape (n_samples,) or (n_samples, k)."
            )
        self.__dict__.pop("_moments_dropped", None)  # a fit starts again
        with self._head_resolved(X) as probed:  # head="auto": the layer found on X's first sample
            return self._start_resolved(X, y, sample_weight, use_cache, allow_zero_weight, probed)

    def _start_resolved(self, X, y, sample_weight, use_cache, allow_zero_weight, probed):
        """:meth:`_start` once the head is known; ``probed`` is ``(name, net)`` for
        ``head="auto"`` (the layer found, checked to be called once, and the frozen copy it was
        found in), else None."""
        prior = self._prior()
        geometry = prior.geometry
        conv = geometry.is_conv
        if conv and (self.extractor is None or not self._supports_conv):
            raise ValueError(
                "A convolutional head needs an extractor that outputs (C_in, *spatial) features; "
                f"{type(self).__name__} "
                + ("has extractor=None" if self.extractor is None else "does not support one")
                + ". Pass the body as extractor, with LayerVariationalAdapter, "
                "LayerVariationalAdapterCV or GradientDescentAdapter."
            )
        device = resolve_device(self.device)
        X, y = self._validate_X(X, reset=True, y=y, y_max_ndim=geometry.ndim + 2 if conv else 2)
        n_samples = X.shape[0]
        s = check_sample_weight(sample_weight, n_samples, allow_all_zero=allow_zero_weight)
        if conv and y.ndim != geometry.ndim + 2:
            raise ValueError(
                f"A Conv{geometry.ndim}d head needs y of shape (n_samples, C_out, "
                f"{', '.join(['L', 'H, W'][geometry.ndim - 1 : geometry.ndim])}), got {y.shape}."
            )
        n_outputs = y.shape[1] if conv else (1 if y.ndim == 1 else y.shape[1])
        Y = y.reshape(n_samples, -1)
        self._check_prior(prior, n_outputs, X.shape[1] if self.extractor is None else None)
        fit_intercept = self._resolve_fit_intercept(prior)

        t0 = time.perf_counter()
        name = self._layer_name()
        if probed is not None:  # head="auto": the copy the layer was found (and checked) in
            copied = probed[1]
        elif self.extractor is not None:  # kept for the next fit, but not a named layer's
            copied = _frozen.frozen(self.extractor, device, keep=name is None)
        net = None if self.extractor is None else copied.net
        if name is not None:  # a named layer: its input is the features
            if probed is None:
                check_called_once(net, name, input_batch(X, slice(0, 1), device, floating_dtype(net)))
            net = copied.layer(name)
        digest = None if net is None else copied.digest(net)  # an earlier fit's, of the same copy
        cached = cached_extractor(net, X, self.cache if use_cache else False, digest, trusted=True)
        if cached is not None:
            copied.remember(net, cached.digest)
        batches = iter(self._features(net, X, cached=cached, use_cache=use_cache))
        first = next(batches)
        feature_dtype, feature_shape = first[2], tuple(first[3])
        geometry.check_features(feature_shape, n_outputs, y.shape[1:])
        if (
            not conv
            and name is not None
            and len(feature_shape) > 1
            and feature_shape[-1] == prior.n_features != first[1].shape[1]
        ):
            raise ValueError(
                f"The layer {name!r} is applied to every position of an input of shape "
                f"{feature_shape} per sample (a Linear over tokens or time steps); the update is for "
                "a layer applied once per sample. Name a layer that gets one feature vector per "
                "sample (after pooling), or split the network by hand into an extractor that pools "
                "and a head."
            )
        if not conv:
            self._check_prior(prior, n_outputs, first[1].shape[1])
        k, d = n_outputs, first[1].shape[1]
        spec = HeadSpec(
            prior=prior,
            W0=np.zeros((k, d)) if prior.W0 is None else prior.W0,
            b0=np.zeros(k) if prior.b0 is None else prior.b0,
            y_ndim=y.ndim,
            fit_intercept=fit_intercept,
            feature_dtype=feature_dtype,
            geometry=geometry,
            feature_shape=feature_shape,
            y_shape=tuple(y.shape[1:]),
        )
        batches = itertools.chain([first], batches)
        return Problem(X, Y, s, spec, net, batches, t0, cached)

    def _fit_block(self, p, Z, Y, s, alpha, alpha_body, max_iter, tol, warm_start=False):
        """Adapt a block head (``p.spec.geometry`` a :class:`BlockGeometry`) on the features ``Z``
        and targets ``Y`` by variable projection; returns the fitted spec and the last layer's
        :class:`Solution` for :meth:`_store`, and sets ``n_iter_`` and ``loss_curve_``. With
        ``warm_start``, the steps start from the previous block fit's earlier layers and damping
        (kept in ``_block_start``) when there is one."""
        spec = p.spec
        block = spec.geometry.block
        start = self.__dict__.get("_block_start") if warm_start else None
        now = (spec.geometry.signature(), block.body_params().size)
        if start is not None and (start[0], start[1].size) != now:
            raise ValueError(
                f"warm_start=True continues the previous fit's block ({start[0]}), but the head is now "
                f"{now[0]}; set warm_start=False to fit this head from its pretrained weights."
            )
        fit = fit_block(
            block,
            Z,
            Y,
            s,
            alpha,
            alpha_body,
            spec.fit_intercept,
            max_iter,
            tol,
            spec.feature_eps,
            start=None if start is None else start[1:],
        )
        fitted = BlockGeometry(fit.block)
        spec = dataclasses.replace(
            spec, geometry=fitted, prior=dataclasses.replace(spec.prior, geometry=fitted)
        )
        solver = f"variable projection ({fit.solver})" if fit.block.n_layers > 1 else "closed form"
        solution = fit.solution._replace(residue_sq=fit.objective0, solver=solver)
        # a block of one Linear is the one-layer fit: one closed-form solve
        self.n_iter_ = fit.n_iter if fit.block.n_layers > 1 else 1
        self.loss_curve_ = fit.loss_curve
        # fit.damping is None only when no step was ever tried (nor by the fit it continued)
        self._block_start = (spec.geometry.signature(), fit.block.body_params(), fit.damping or (None, None))
        return spec, solution

    def _features(self, net, X, desc="features", cached=None, use_cache=True):
        """The feature stream of X (:func:`feature_batches`), with a tqdm progress bar over
        batches when verbose."""
        if cached is None and use_cache and self.cache is not False:
            # predict: the fitted copy's digest, recomputed if it changed. A shared copy is
            # written by nobody (extractor_ gives users their own), but it runs code and reads
            # globals it shares with the user's module: its digest holds while its shallow
            # check says they are as they were
            trusted = (
                net is self.__dict__.get("_extractor")
                and self.__dict__.get("_extractor_shared", False)
                and _frozen.copy_unchanged(net)
            )
            cached = cached_extractor(net, X, self.cache, getattr(self, "_weights_digest", None), trusted)
            if cached is not None:
                self._weights_digest = cached.digest  # what net matches now (its tensors' identities)
        batches = feature_batches(net, X, self._forward_batch_size, cached)
        n_batches = -(-X.shape[0] // self._forward_batch_size)
        return self._progress(batches, n_batches if net is not None else None, desc)

    def _progress(self, iterable, total, desc):
        """``tqdm(iterable)`` when verbose > 0 and tqdm is installed (the "progress" extra)."""
        if not self.verbose or total is None:
            return iterable
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return iterable
        return tqdm(iterable, total=total, desc=f"{type(self).__name__} {desc}", leave=False)

    def _log(self, message):
        if self.verbose:
            print(f"[{type(self).__name__}] {message}")

    def _store(self, spec, X, net, digest, solution, targets=None):
        """Set the fitted attributes from a :class:`~skl_transfer._solvers.Solution`: the one
        step that ends every fit route. ``targets`` (:class:`~skl_transfer._diagnostics.TargetStats`)
        is given by a fit that saw all its data in one call, for the estimators with diagnostics."""
        dWt, db = solution.dWt, solution.db
        coef = spec.W0 + dWt.T
        intercept = spec.b0 + db
        if self._ridge_conventions(spec):
            # exactly Ridge's (scikit-learn 1.9): coef_ (d,) for y of shape (n,) or (n, 1), else
            # (k, d); intercept_ a numpy scalar for 1-D y, (k,) otherwise, and the float 0.0
            # when no intercept is fitted; float32 X gives float32 coef_ and intercept_ (solved
            # in float64, cast at the end)
            dtype = self.__dict__.get("_ridge_dtype") or np.float64
            squeeze = spec.y_ndim == 1 or spec.y_shape == (1,)

            def ridge_like(c, b, dtype):
                c = (c[0] if squeeze else c).astype(dtype)
                if not spec.fit_intercept:
                    return c, 0.0
                return c, (dtype(b[0]) if spec.y_ndim == 1 else b.astype(dtype))

            self.coef_, self.intercept_ = ridge_like(coef, intercept, dtype)
            # the update itself stays float64 (diagnostics_ reads it), in the same shapes
            self.delta_coef_, self.delta_intercept_ = ridge_like(dWt.T.copy(), db, np.float64)
        else:
            squeeze = spec.y_ndim == 1
            self.coef_ = coef[0] if squeeze else coef
            self.intercept_ = float(intercept[0]) if squeeze else intercept
            self.delta_coef_ = dWt.T[0] if squeeze else dWt.T.copy()
            self.delta_intercept_ = float(db[0]) if squeeze else db
        self.fit_intercept_ = spec.fit_intercept
        self.residue_norm_ = float(np.sqrt(solution.residue_sq))
        self.residual_norm_ = float(np.sqrt(solution.residual_sq))
        self._record_input(X)
        # the copy the fit ran on, shared with other fits of the same unchanged extractor
        # (_frozen): nothing here writes to it, and extractor_ gives a user a copy of their own
        on_cpu = net is None or module_device(net).type == "cpu"  # else moved (Module.to walks the tree)
        self._extractor = net if on_cpu else net.to("cpu")
        self._extractor_shared = _frozen.is_shared(net)
        self._extractor_on_device = None
        # a named layer: what to_module restores on its copy of the whole model
        self._export_state = export_state(self.extractor) if isinstance(net, LayerInput) else None
        self.head_name_ = net.name if isinstance(net, LayerInput) else None
        self._spec = spec
        # the copy's Digest, reused by predict's cache only while extractor_ still matches it
        self._weights_digest = digest

    @property
    def extractor_(self):
        """The frozen copy of ``extractor`` that the fit ran on (None without an extractor).

        It is on the CPU, in eval mode, with gradients off. Fits of the same unchanged
        extractor share one copy (a search's fits copy and hash it once); the first access
        gives this estimator a copy of its own, so that writing to it reaches no other
        estimator. ``predict`` and ``to_module`` then use that copy, edits included.
        """
        state = self.__dict__
        if "_extractor" not in state:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute 'extractor_'")
        if state["_extractor"] is not None and state.get("_extractor_shared"):
            self._extractor, self._extractor_shared = copy.deepcopy(state["_extractor"]), False
            self._extractor_on_device = None
        return state["_extractor"]

    @property
    def diagnostics_(self):
        """Only the closed-form ridge regressors have diagnostics (:class:`RidgeUpdateMixin`)."""
        check_is_fitted(self)
        raise AttributeError(
            f"{type(self).__name__} has no diagnostics_: they describe the closed-form ridge update of "
            "a regressor (LayerVariationalAdapter, LayerVariationalAdapterCV)."
        )

    def _runtime_extractor(self):
        """The fitted extractor on the requested device (cached, never pickled)."""
        if self._extractor is None:
            return None
        device = resolve_device(self.device)
        if device.type == "cpu":
            return self._extractor
        cached = getattr(self, "_extractor_on_device", None)
        # copied again when extractor_ was edited since (its tensors' versions, code, hooks)
        if cached is None or cached[0] != device or not _fingerprint.still_valid(cached[2], self._extractor):
            try:
                state = _fingerprint.fingerprint_state(self._extractor)
            except _fingerprint.Unkeyable:
                state = None  # cannot tell whether it changed: copied again for every call
            cached = (device, frozen_copy(self._extractor, device), state)
            self._extractor_on_device = cached
        return cached[1]

    # -- prediction and export -------------------------------------------------------

    def _ridge_conventions(self, spec):
        """Whether the fitted attributes follow ``Ridge``'s conventions: no extractor, no head
        (``head=None``: the estimator is ridge regression on X) and a regressor."""
        return self.extractor is None and spec.prior.W0 is None and self._ridge_update

    def _coef_2d(self):
        """``coef_`` as float64 (k, d) and ``intercept_`` as float64 (k,), whatever their stored
        shapes and dtype."""
        coef = np.atleast_2d(np.asarray(self.coef_, dtype=np.float64))
        intercept = np.broadcast_to(np.asarray(self.intercept_, dtype=np.float64), (coef.shape[0],))
        return coef, intercept.copy()

    def predict(self, X):
        """Predict with the adapted head.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor (features when ``extractor=None``).

        Returns
        -------
        y_pred : ndarray of shape (n_samples,), (n_samples, k) or (n_samples, C_out, *spatial)
            Predictions: (n_samples,) for a 1-D y, the conv output shape for a
            convolutional head.
        """
        check_is_fitted(self)
        spec = self._spec
        ridge = self._ridge_conventions(spec)
        # Ridge's predictions are float32 when both coef_ and X are (float64 otherwise)
        float32 = ridge and np.asarray(self.coef_).dtype == np.float32 and _is_float32(X)
        X, _ = self._validate_X(X, reset=False)
        coef, intercept = self._coef_2d()
        batches = self._features(self._runtime_extractor(), X, desc="predict")
        out = head_outputs(batches, X.shape[0], [(coef, intercept)], spec.geometry, spec.feature_shape)[0]
        if ridge and spec.y_shape == (1,):
            return out[:, 0].astype(np.float32 if float32 else np.float64)  # Ridge: (n,) for y (n, 1)
        out = out.reshape(X.shape[0], *spec.y_shape)
        return out.astype(np.float32) if float32 else out

    def to_module(self):
        """Return the adapted network as a torch module (CPU, eval mode, gradients off).

        Returns
        -------
        module : AdaptedNetwork
            A ``torch.nn.Module``: ``head(flatten(extractor(x)))`` with the adapted
            ``torch.nn.Linear`` head, or ``head(extractor(x))`` with the adapted
            ``Conv1d``/``Conv2d`` for a convolutional head (a real conv layer with the adapted
            kernel). Its output has shape (n_samples, k) (k = 1 for 1-D y), or the conv output
            shape, and equals ``predict`` up to the rounding of the head's dtype (float32 or
            wider). The extractor is a copy of ``extractor_``; without an extractor the module
            is the head alone. With a named layer (``head="fc"``): a deep copy of the whole
            model, of its own class, with that layer replaced by the adapted one (the layer's
            class and dtype), on the model's device and with its modules' training flags and
            parameters' ``requires_grad`` as they were at fit, so that the model's own forward
            and post-processing run unchanged; the layer's output equals ``predict``.
        """
        check_is_fitted(self)
        coef, intercept = self._coef_2d()
        spec = self._spec
        has_bias = spec.fit_intercept or spec.prior.b0 is not None
        dtype = torch.promote_types(torch.promote_types(spec.prior.dtype, spec.feature_dtype), torch.float32)
        if isinstance(self._extractor, LayerInput):  # the whole model, its layer replaced
            named = self._extractor
            return replace_layer(
                named.model, named.name, coef, intercept if has_bias else None, self._export_state
            )
        head = spec.geometry.layer(coef, intercept if has_bias else None, dtype)
        extractor = None if self._extractor is None else copy.deepcopy(self._extractor)
        return AdaptedNetwork(extractor, head).eval().requires_grad_(False)

    def __sklearn_is_fitted__(self):
        return hasattr(self, "coef_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.input_tags.allow_nan = False
        return tags

    def __setstate__(self, state):
        if "extractor_" in state:  # pickled before extractor_ became a property
            state = dict(state)
            state["_extractor"] = state.pop("extractor_")
        if "_extractor" in state:  # estimators unpickled together may share their copy
            state = {**state, "_extractor_shared": state["_extractor"] is not None}
        super().__setstate__(state)

    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: Python 3.11 returns self.__dict__ itself
        state.pop("_extractor_on_device", None)
        if "_weights_digest" in state:
            state["_weights_digest"] = None  # never trusted from a pickle: recomputed after loading
        return state


def _is_float32(X):
    """Whether X (numpy, a DataFrame of float32 columns, a tensor) is float32, as sklearn's
    ``check_array(X, dtype=[np.float64, np.float32])`` would keep it."""
    dtypes = getattr(X, "dtypes", None)
    if dtypes is not None and not hasattr(X, "dtype"):  # a DataFrame
        try:
            return len(dtypes) > 0 and all(np.dtype(t) == np.float32 for t in dtypes)
        except TypeError:
            return False
    dtype = getattr(X, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype == torch.float32
    return dtype is not None and np.dtype(dtype) == np.float32


class RidgeUpdateMixin:
    """What the estimators whose head is a closed-form ridge update of the residue of ``y``
    (``LayerVariationalAdapter`` and its CV) add to :class:`BaseAdapter`: ``solver_``, the kept
    moments (``partial_fit``, :meth:`drop_moments`) and ``diagnostics_``. Listed before
    ``BaseAdapter`` among the bases."""

    _ridge_update = True

    def _store(self, spec, X, net, digest, solution, targets=None):
        super()._store(spec, X, net, digest, solution)
        self.solver_ = solution.solver
        self._moments = solution.moments  # a primal fit's: partial_fit continues from them
        self._diagnostics = None
        # a fit that saw all its data in one call gives the targets' statistics; the update is
        # decomposed only if diagnostics_ is read (a dual fit's design is no larger than d x d)
        self._diag_state = None if targets is None else (targets, solution)

    @property
    def diagnostics_(self):
        """Transferal residue and data condition of the fit (:class:`Diagnostics`).

        Computed on first access, not during fit (one eigendecomposition of the d x d ``G``, or
        of the kernel for fewer rows than features) and kept, also through pickling;
        ``print(est.diagnostics_)`` shows a summary and ``est.diagnostics_.as_dict()`` gives the
        numbers. Available after ``fit`` (and a first ``partial_fit``); not after further
        ``partial_fit`` batches or a fit on a dask array (an ``AttributeError`` that says so).

        Notes
        -----
        All norms are weighted by ``sample_weight``. With the intercept fitted, features and
        residue are centred first. The squared residue ``||Q||^2`` splits into a constant
        offset (``bias_share``, removable by the bias), the part in the span of the centred
        features, and the part outside it (``outside_share``: what needs deeper layers); the
        last equals the residual at ``alpha = 0``. ``rank`` uses the solver's noise threshold;
        ``rank`` and ``condition_number`` come from the solver's own scale-invariant spectrum
        (the Gram matrix scaled to a unit diagonal). The regime is "interpolating" when
        ``rank = N - 1`` with the intercept (``rank = N`` without it): the training residue
        can then reach 0 at ``alpha = 0``; otherwise it is "least-squares". ``dof`` is the
        trace of the weighted hat matrix, ``sum_j e_j / (e_j + alpha)`` over the kept
        eigenvalues, plus 1 when the intercept is fitted (tested against a direct trace). For
        a convolutional head, N counts patch rows (samples x output positions). Every number
        is tested against a direct numpy computation.
        """
        check_is_fitted(self)
        diag = self.__dict__.get("_diagnostics")
        if diag is not None:
            return diag
        state, moments = self.__dict__.get("_diag_state"), self.__dict__.get("_moments")
        if self._spec.geometry.is_block:
            raise AttributeError(
                "diagnostics_ describe the one-layer update; a block head's fit reports loss_curve_, "
                "residue_norm_ (pretrained block) and residual_norm_ (adapted). For the diagnostics of "
                "its last layer alone, fit the block's last Linear as head."
            )
        if state is None or (moments is None and state[1].design is None):
            raise AttributeError(
                "diagnostics_ needs a fit that saw all its data in one call (fit, or the first "
                "partial_fit); after further partial_fit batches or a fit on a dask array the per-output "
                "statistics of y are not kept. Call fit on the data to get them."
            )
        targets, solution = state
        dWt = np.atleast_2d(self.delta_coef_).T
        db = np.atleast_1d(self.delta_intercept_)
        alpha, rtol = solution.alpha, solution.rtol
        if solution.design is not None:
            Z, Q, w = solution.design
            diag = _diagnostics.from_design(Z, Q, w, dWt, db, targets, alpha, self.fit_intercept_, rtol)
        else:
            diag = _diagnostics.from_moments(
                moments, dWt, db, self._spec.W0, targets, alpha, self.fit_intercept_, rtol
            )
        self._diag_state = None  # the features are no longer needed
        self._diagnostics = diag
        return diag

    def drop_moments(self):
        """Forget the sufficient statistics kept after a primal fit.

        A primal fit keeps the ``d x d`` moments of its features (32 MiB at d = 2048) so that
        ``partial_fit`` can continue it and ``diagnostics_`` can be computed on first access;
        they are pickled with the estimator. This computes ``diagnostics_`` (so that it stays
        readable) and drops them: predictions and ``to_module()`` are unchanged, ``partial_fit``
        can no longer continue this fit.

        Returns
        -------
        self : object
            The estimator, without its moments.
        """
        check_is_fitted(self)
        try:
            self.diagnostics_  # noqa: B018 - computed now, from the moments about to go
        except AttributeError:
            pass
        if self.__dict__.get("_moments") is not None:
            self._moments = None
            self._moments_dropped = True
        return self

    def __getstate__(self):
        state = super().__getstate__()
        pending = state.get("_diag_state")
        if pending is not None and pending[1].design is not None:
            # a dual fit keeps its training features until diagnostics_ is read; a pickle
            # carries the (small) diagnostics instead, never training rows
            state["_diagnostics"] = self.diagnostics_
            state["_diag_state"] = None
        return state


class AdapterRegressorMixin(RegressorMixin):
    """RegressorMixin whose ``score`` also takes a conv head's (n, C_out, *spatial) outputs."""

    def score(self, X, y, sample_weight=None):
        """Return the coefficient of determination R^2 of the predictions.

        A convolutional head's outputs are flattened per sample (every output position a
        column, averaged uniformly), as sklearn's metrics take at most 2-D targets.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor (features when ``extractor=None``).
        y : array-like of shape (n_samples,), (n_samples, k) or (n_samples, C_out, *spatial)
            True targets.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        score : float
            R^2 of ``predict(X)`` against ``y``.
        """
        pred = self.predict(X)  # once (RegressorMixin.score would predict again)
        if pred.ndim <= 2:
            return float(r2_score(y, pred, sample_weight=sample_weight))
        y = np.asarray(to_numpy(y))
        return float(
            r2_score(y.reshape(len(y), -1), pred.reshape(len(pred), -1), sample_weight=sample_weight)
        )
