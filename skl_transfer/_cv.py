"""LayerVariationalAdapterCV: the layer update with alpha chosen by cross-validation."""

from __future__ import annotations

import functools
import time
from inspect import signature

import numpy as np
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, RegressorMixin, _fit_context
from sklearn.metrics import check_scoring, get_scorer_names
from sklearn.model_selection import check_cv
from sklearn.utils._param_validation import StrOptions

from . import _solvers
from ._base import AdapterRegressorMixin, BaseAdapter, RidgeUpdateMixin, _is_float32
from ._features import cached_extractor, gather_features, head_outputs


class _FixedPredictions(RegressorMixin, BaseEstimator):
    """A stand-in regressor whose predict returns given predictions, for sklearn scorers."""

    def __init__(self, predictions=None):
        self.predictions = predictions

    def fit(self, X=None, y=None):  # pragma: no cover - never fitted, only scored
        return self

    def predict(self, X):
        return self.predictions

    def __sklearn_is_fitted__(self):
        return True


def _as_y(Y, spec):
    """Rows of targets or predictions as scorers see them: 1-D for a 1-D y, else 2-D (a conv
    head's outputs flattened per sample: sklearn's metrics take at most 2-D targets)."""
    return Y[:, 0] if spec.y_ndim == 1 else Y


def _fast_r2(y, pred, w):
    """``r2_score(y, pred, sample_weight=w)`` (outputs averaged uniformly) computed directly, or
    None where sklearn's special cases apply (fewer than 2 samples, a constant output)."""
    if y.shape[0] < 2 or (w is not None and not w.sum() > 0):
        return None
    y2, p2 = y.reshape(len(y), -1), pred.reshape(len(pred), -1)
    w = np.ones(len(y2)) if w is None else w
    residual = w @ (y2 - p2) ** 2
    total = w @ (y2 - (w @ y2) / w.sum()) ** 2
    if not np.all(total > 0):
        return None
    return float(np.mean(1.0 - residual / total))


def _fast_neg_mse(y, pred, w):
    """``-mean_squared_error(y, pred, sample_weight=w)`` (outputs averaged uniformly), or None
    for weights that sum to 0 (sklearn's own error then)."""
    if w is not None and not w.sum() > 0:
        return None
    y2, p2 = y.reshape(len(y), -1), pred.reshape(len(pred), -1)
    return -float(np.mean(np.average((y2 - p2) ** 2, axis=0, weights=w)))


# scorers of regression metrics computed without sklearn's scorer machinery, which per call costs
# more than the metric (a 30-alpha x 5-fold search calls it 150 times); checked against sklearn's
_FAST_SCORES = {None: _fast_r2, "r2": _fast_r2, "neg_mean_squared_error": _fast_neg_mse}


def check_alphas(alphas, cv):
    """``alphas`` as a float64 array; errors for an empty, non-finite or negative list, and for
    alpha = 0 with leave-one-out (``cv=None``)."""
    given, alphas = alphas, np.asarray(alphas, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or not np.isfinite(alphas).all():
        raise ValueError(f"alphas must be a non-empty 1-D list of finite floats, got {given!r}.")
    if (alphas < 0).any():
        raise ValueError(f"alphas must be >= 0, got {alphas.min():g}; the penalty cannot be negative.")
    if cv is None and (alphas == 0).any():
        raise ValueError(
            "alpha = 0 is not allowed with cv=None: leave-one-out needs a penalty when the "
            "features can fit every training point. Use alphas > 0, or cv=5 to include 0."
        )
    return alphas


def _accepts_sample_weight(scorer):
    """Whether a scorer takes sample_weight (the test GridSearchCV applies before passing it)."""
    if hasattr(scorer, "_accept_sample_weight"):
        return scorer._accept_sample_weight()
    return "sample_weight" in signature(scorer).parameters


class LayerVariationalAdapterCV(RidgeUpdateMixin, AdapterRegressorMixin, BaseAdapter):
    r"""Layer variational adaptation with alpha chosen by cross-validation, at about one fit.

    The same update as :class:`LayerVariationalAdapter`,

    .. math::

        \min_{\Delta W, \Delta b} \sum_i s_i \| z_i \Delta W^T + \Delta b - q_i \|^2
        + \alpha \| \Delta W \|_F^2 ,

    for every alpha in ``alphas``; the best alpha by cross-validation is refitted on all
    the data. The extractor runs once; every fold's normal equations are the whole-data
    moments minus the held-out part, each fold costs one eigendecomposition, and every
    further alpha costs ``O(d^2)`` or less (the ``n x n`` kernel replaces ``G`` when a fold has
    fewer training samples than features).

    Parameters
    ----------
    extractor : torch.nn.Module or None, default=None
        Frozen body of the pretrained network (see :class:`LayerVariationalAdapter`).
    head : torch.nn.Linear, Conv1d, Conv2d, str, (coef, intercept) pair or None, default=None
        Pretrained last layer (see :class:`LayerVariationalAdapter`; a convolution needs
        K-fold, see Notes). A string names a layer of ``extractor``, the whole model
        (``"auto"``: the last ``Linear``/``Conv`` layer that its forward calls).
    alphas : array-like of float, default=(0.1, 1.0, 10.0)
        Candidate penalties, >= 0 (> 0 for leave-one-out, ``cv=None``).
    cv : int, cross-validation generator, iterable or None, default=None
        None: efficient leave-one-out over all alphas. An int or a splitter: K-fold, with
        the splits of :func:`sklearn.model_selection.check_cv` (``KFold`` for an int).
    scoring : str, callable or None, default=None
        How a candidate is scored (greater is better). None: with ``cv=None`` the negative
        weighted mean squared leave-one-out error ``-sum_i s_i ||y_i - y_loo_i||^2 / sum_i s_i``
        (the mean over samples and outputs for unit weights); with K-fold, R^2 on each
        held-out fold, as ``GridSearchCV`` would do. A scorer name or callable is applied
        to the held-out predictions of each fold (to all leave-one-out predictions at once
        with ``cv=None``, as ``RidgeCV`` does).
    fit_intercept : bool or "auto", default="auto"
        As in :class:`LayerVariationalAdapter`.
    batch_size : int, default=256
        Samples per forward pass.
    device : str or torch.device, default="auto"
        Where the extractor runs.
    verbose : int, default=0
        Print the time of the forward pass, the search and the refit when > 0.
    cache : "auto", bool, str, os.PathLike or joblib.Memory, default="auto"
        Feature cache, as in :class:`LayerVariationalAdapter`.

    Attributes
    ----------
    alpha_ : float
        The chosen alpha (the first of the best-scoring ones).
    best_score_ : float
        Its mean cross-validated score.
    cv_results_ : dict of ndarrays
        ``"param_alpha"`` and ``"params"``, ``"mean_test_score"``, ``"rank_test_score"``,
        and with K-fold ``"std_test_score"`` and ``"split{i}_test_score"``, in the layout of
        ``GridSearchCV.cv_results_``.
    coef_, intercept_, delta_coef_, delta_intercept_ : ndarray or float
        As in :class:`LayerVariationalAdapter`, refitted on all data with ``alpha_``.
    fit_intercept_, residue_norm_, residual_norm_ : bool, float, float
        As in :class:`LayerVariationalAdapter`, for the refit.
    extractor_, head_name_, input_shape_, n_features_in_ : torch.nn.Module, str, tuple, int
        As in :class:`LayerVariationalAdapter`.
    solver_ : {"primal", "dual"}
        Solver of the refit.

    See Also
    --------
    LayerVariationalAdapter : The update at one given alpha.
    sklearn.linear_model.RidgeCV : The same search with a zero prior and no extractor.

    Notes
    -----
    The features of all samples are held in memory (n_samples x d float64), once.
    Equals ``GridSearchCV(LayerVariationalAdapter(...), {"alpha": alphas}, cv=cv,
    scoring=scoring)`` on the same splits (tested to 1e-8), and brute-force leave-one-out
    with ``cv=None``. Sample weights weight the fits, and the held-out scores when the scorer
    accepts them, as ``GridSearchCV.fit(X, y, sample_weight=...)`` does in current
    scikit-learn. With ``head=None`` and no extractor the estimator is ``RidgeCV``, with its
    output conventions (see :class:`LayerVariationalAdapter`).

    Leave-one-out (``cv=None``, alphas > 0) uses the hat-matrix formula: after the one
    decomposition each alpha costs ``O(n d k)``, the price of n leave-one-out residuals. The
    leave-one-out and K-fold paths use the same scaled, thresholded spectrum as the single
    fit, so each alpha equals :class:`LayerVariationalAdapter` wherever that uses Cholesky or
    the eigendecomposition (tested against brute-force ``Ridge``).

    A convolutional head takes K-fold splitters (``cv=5``, any splitter); leave-one-out is
    refused, as a sample is many patch rows. One pass accumulates the patch moments of each
    group of samples sharing a role in every fold, each fold costs one eigendecomposition,
    and its held-out outputs are computed from features read again through the feature cache
    (tested against K-fold ``Ridge`` on unfolded patches). Its outputs are flattened per
    sample for any scorer.

    Examples
    --------
    >>> import numpy as np
    >>> from skl_transfer import LayerVariationalAdapterCV
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.normal(size=(60, 4))
    >>> y = Z @ np.array([1.0, 0.0, -1.0, 2.0]) + 0.1 * rng.normal(size=60)
    >>> cv = LayerVariationalAdapterCV(head=(np.zeros(4), 0.0), alphas=[0.01, 1.0, 100.0]).fit(Z, y)
    >>> float(cv.alpha_)
    0.01
    """

    _parameter_constraints: dict = {
        **BaseAdapter._parameter_constraints,
        "alphas": ["array-like"],
        "cv": ["cv_object"],
        "scoring": [StrOptions(set(get_scorer_names())), callable, None],
    }

    def __init__(
        self,
        extractor=None,
        head=None,
        *,
        alphas=(0.1, 1.0, 10.0),
        cv=None,
        scoring=None,
        fit_intercept="auto",
        batch_size=256,
        device="auto",
        verbose=0,
        cache="auto",
    ):
        self.extractor = extractor
        self.head = head
        self.alphas = alphas
        self.cv = cv
        self.scoring = scoring
        self.fit_intercept = fit_intercept
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.cache = cache

    def _check_alphas(self):
        return check_alphas(self.alphas, self.cv)

    _supports_conv = True

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None, groups=None):
        """Choose alpha by cross-validation and fit the update on all data with it.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor, or features (n_samples, d) when ``extractor=None``.
        y : array-like of shape (n_samples,) or (n_samples, k)
            Targets on the head's output scale.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the squared errors in every fit.
        groups : array-like of shape (n_samples,), default=None
            Group labels for a group splitter (``cv=GroupKFold(...)``).

        Returns
        -------
        self : object
            Fitted estimator.
        """
        alphas = self._check_alphas()
        # head=None without an extractor is RidgeCV: float32 X gives float32 coef_, as there
        self._ridge_dtype = (
            np.float32 if self.extractor is None and self.head is None and _is_float32(X) else None
        )
        with self._head_resolved(X):  # head="auto": the layer found on X's first sample
            conv = self._prior().geometry.is_conv
            if conv and self.cv is None:
                raise ValueError(
                    "Leave-one-out (cv=None) is not available for a convolutional head, whose samples "
                    "are many patch rows each; pass cv=5 (or any splitter) for K-fold."
                )
            p = self._start(X, y, sample_weight)
        if self.cv is None and p.n_samples < 2:
            raise ValueError(
                "Leave-one-out (cv=None) cannot score a fit on 1 sample; pass at least 2 samples."
            )
        search = self._search_conv if conv else self._search
        mean, results, refit = search(p, alphas, sample_weight, groups)
        best = int(np.argmax(mean))
        self.alpha_ = float(alphas[best])
        self.best_score_ = float(mean[best])
        self.cv_results_ = {
            "param_alpha": alphas.copy(),
            "params": [{"alpha": float(a)} for a in alphas],
            "mean_test_score": mean,
            "rank_test_score": rankdata(-mean, method="min").astype(np.int32),
            **results,
        }
        t2 = time.perf_counter()
        solution = refit(self.alpha_)
        self._log(
            f"{p.n_samples} samples, {p.spec.d} features, {len(alphas)} alphas: search until "
            f"{t2 - p.t0:.3f}s, {solution.solver} refit {time.perf_counter() - t2:.3f}s"
        )
        self._store(p.spec, p.X, p.net, p.digest, solution, p.targets)
        return self

    def _folds(self, p, groups):
        return list(check_cv(self.cv).split(p.X, _as_y(p.Y, p.spec), groups))

    def _fold_scores(self, folds, alphas, predictions, p, sample_weight):
        """Score ``predictions`` (yielding ``(fold, j, Y_pred)``) like GridSearchCV would."""
        scorer = check_scoring(_FixedPredictions(), self.scoring)
        weigh = sample_weight is not None and _accepts_sample_weight(scorer)
        scores = np.empty((len(folds), len(alphas)))
        y = _as_y(p.Y, p.spec)
        fast = _FAST_SCORES.get(self.scoring) if isinstance(self.scoring, (str, type(None))) else None
        for fold, j, pred in self._progress(predictions, len(folds) * len(alphas), "folds x alphas"):
            test = folds[fold][1]
            w = p.s[test] if weigh else None
            pred = _as_y(pred, p.spec)
            score = None if fast is None else fast(y[test], pred, w)
            if score is None:
                kwargs = {} if w is None else {"sample_weight": w}
                score = scorer(_FixedPredictions(pred), p.X[test], y[test], **kwargs)
            scores[fold, j] = score
        results = {f"split{i}_test_score": scores[i] for i in range(len(folds))}
        results["std_test_score"] = scores.std(axis=0)
        return scores.mean(axis=0), results

    def _search(self, p, alphas, sample_weight, groups):
        """A linear head: all features in memory, leave-one-out or K-fold paths."""
        spec = p.spec
        Z = gather_features(p.batches)
        prior_out = Z @ spec.W0.T + spec.b0
        Q = p.Y - prior_out
        rtol = spec.rtol(p.n_samples)
        if self.cv is None:
            scorer = None if self.scoring is None else check_scoring(_FixedPredictions(), self.scoring)
            weigh = scorer is not None and sample_weight is not None and _accepts_sample_weight(scorer)
            kwargs = {"sample_weight": p.s} if weigh else {}
            y2d = _as_y(p.Y, spec)
            mean = np.empty(len(alphas))
            for j, Q_loo in _solvers.loo_path(Z, Q, p.s, alphas, spec.fit_intercept, rtol):
                Y_loo = Q_loo + prior_out
                if scorer is None:
                    err = ((p.Y - Y_loo) ** 2).mean(axis=1)
                    mean[j] = -float(p.s @ err / p.s.sum())
                else:
                    mean[j] = scorer(_FixedPredictions(_as_y(Y_loo, spec)), p.X, y2d, **kwargs)
            results = {}
        else:
            folds = self._folds(p, groups)
            path = _solvers.kfold_path(Z, Q, p.s, folds, alphas, spec.fit_intercept, rtol)
            predictions = ((f, j, Q_pred + prior_out[folds[f][1]]) for f, j, Q_pred in path)
            mean, results = self._fold_scores(folds, alphas, predictions, p, sample_weight)

        def refit(alpha):
            return _solvers.solve(alpha, spec.fit_intercept, p.shape, spec.feature_eps, design=(Z, Q, p.s))

        return mean, results, refit

    def _search_conv(self, p, alphas, sample_weight, groups):
        """A convolutional head: K-fold from per-atom patch moments (one pass, never all
        patches in memory); each fold's held-out features are read again (through the cache)
        to predict its outputs."""
        spec = p.spec
        folds = self._folds(p, groups)
        roles, labels = _solvers.fold_atoms(folds, p.n_samples)
        atoms = p.moments(labels=labels)
        per = spec.rows_per_sample

        def merged(members):
            return functools.reduce(
                _solvers.merge_moments, [atoms[a] for a in members], atoms[0]._replace(weight=0.0)
            )

        def predictions():
            for f, (train, test) in enumerate(folds):
                m = merged(np.flatnonzero(roles[:, f] == 1))
                path = _solvers.moments_path(m, alphas, spec.fit_intercept, spec.rtol(len(train) * per))
                heads = [(spec.W0 + dWt.T, spec.b0 + db) for dWt, db in path]
                Xte = p.X[test]
                cached = cached_extractor(p.net, Xte, self.cache, p.digest, trusted=True)  # this fit's copy
                batches = self._features(p.net, Xte, cached=cached)
                outs = head_outputs(batches, len(test), heads, spec.geometry, spec.feature_shape)
                for j, out in enumerate(outs):
                    yield f, j, out

        mean, results = self._fold_scores(folds, alphas, predictions(), p, sample_weight)

        def refit(alpha):
            total = merged(range(len(atoms)))
            return _solvers.solve(alpha, spec.fit_intercept, p.shape, spec.feature_eps, moments=total)

        return mean, results, refit
