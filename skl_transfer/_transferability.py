"""How well will last-layer adaptation transfer? Held-out estimates before committing, and LogME."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._cv import LayerVariationalAdapterCV
from ._diagnostics import Diagnostics, _pct, _ratio
from ._heads import as_prior
from ._layers import LayerInput, named_layer
from ._torch import to_numpy

DEFAULT_ALPHAS = tuple(np.logspace(-3, 4, 15))


@dataclass(frozen=True, repr=False, eq=False)
class Transferability:
    """Held-out errors of last-layer adaptation on a target task, and its data condition.

    Attributes
    ----------
    pretrained_mse : float
        Weighted mean squared error of the pretrained network on the target data (over samples
        and outputs); it learns nothing from them, so this is also its held-out error.
    adapted_mse : float
        Cross-validated mean squared error of the adapted head at the chosen alpha
        (leave-one-out with ``cv=None``; with K-fold, the mean over folds of each fold's MSE).
    probe_mse : float
        The same for a ridge probe on the same features with a zero prior (``head=None``):
        what the features give without the pretrained head.
    alpha, probe_alpha : float
        The penalties chosen by cross-validation for the adapted head and for the probe.
    target_mse : float
        The weighted variance of y (mean over outputs): the error of predicting the mean.
    diagnostics : Diagnostics
        Residue and data condition of the adapted head refitted on all the data at ``alpha``.
    adapter : LayerVariationalAdapterCV
        That fitted estimator (use it directly instead of fitting again).
    """

    pretrained_mse: float
    adapted_mse: float
    probe_mse: float
    alpha: float
    probe_alpha: float
    target_mse: float
    cv: str
    diagnostics: Diagnostics = field(repr=False)
    adapter: object = field(repr=False)

    @property
    def ratio_to_pretrained(self):
        """``adapted_mse / pretrained_mse``: below 1, adapting the last layer helps."""
        return _ratio(self.adapted_mse, self.pretrained_mse)

    @property
    def ratio_to_probe(self):
        """``adapted_mse / probe_mse``: below 1, the pretrained head is a useful prior."""
        return _ratio(self.adapted_mse, self.probe_mse)

    @property
    def r2(self):
        """Held-out R^2 of the adapted head, ``1 - adapted_mse / target_mse`` (higher transfers better)."""
        return 1.0 - _ratio(self.adapted_mse, self.target_mse)

    def as_dict(self):
        """The numbers (and the data condition) as a flat dict."""
        out = {name: getattr(self, name) for name in ("pretrained_mse", "adapted_mse", "probe_mse")}
        out.update(
            alpha=self.alpha,
            probe_alpha=self.probe_alpha,
            target_mse=self.target_mse,
            cv=self.cv,
            ratio_to_pretrained=self.ratio_to_pretrained,
            ratio_to_probe=self.ratio_to_probe,
            r2=self.r2,
        )
        d = self.diagnostics
        out.update(
            n_rows=d.n_rows,
            n_features=d.n_features,
            rank=d.rank,
            regime=d.regime,
            condition_number=d.condition_number,
            dof=d.dof,
            span_share=d.span_share,
        )
        return out

    def summary(self):
        d = self.diagnostics
        return "\n".join(
            [
                f"Transferability ({self.cv} mean squared error)",
                f"  pretrained head               {self.pretrained_mse:.4g}",
                f"  adapted head                  {self.adapted_mse:.4g}  (alpha {self.alpha:.3g}; "
                f"x{self.ratio_to_pretrained:.3f} of pretrained, x{self.ratio_to_probe:.3f} of probe)",
                f"  zero-prior ridge probe        {self.probe_mse:.4g}  (alpha {self.probe_alpha:.3g})",
                f"  predicting the mean           {self.target_mse:.4g}  "
                f"(adapted held-out R^2 {self.r2:.3f})",
                f"Data condition: N = {d.n_rows}, d = {d.n_features}, rank {d.rank} ({d.regime}), "
                f"condition number {d.condition_number:.3g}, dof {d.dof:.4g}; "
                f"span share of the residue {_pct(d.span_share)}",
            ]
        )

    def __repr__(self):
        return (
            f"Transferability({self.cv}: pretrained {self.pretrained_mse:.4g}, adapted "
            f"{self.adapted_mse:.4g} (alpha={self.alpha:.3g}), probe {self.probe_mse:.4g}; "
            f"ratio to pretrained {self.ratio_to_pretrained:.3f}, to probe {self.ratio_to_probe:.3f}; "
            f"N={self.diagnostics.n_rows}, d={self.diagnostics.n_features}, rank={self.diagnostics.rank}, "
            f"{self.diagnostics.regime})"
        )

    def __str__(self):
        return self.summary()


def _zero_head(head):
    """The same layer with zero weights and a zero bias (a ridge probe from scratch)."""
    prior = as_prior(head)
    if prior.geometry.is_conv:  # Conv1d / Conv2d: same geometry, zero weights, with a bias
        return prior.geometry.layer(np.zeros_like(prior.W0), np.zeros(prior.W0.shape[0]), head.weight.dtype)
    return np.zeros_like(prior.W0), np.zeros(prior.W0.shape[0])


def transferability(
    extractor,
    head,
    X,
    y,
    *,
    alphas=DEFAULT_ALPHAS,
    cv=None,
    sample_weight=None,
    fit_intercept="auto",
    batch_size=256,
    device="auto",
    cache="auto",
):
    """Estimate how well adapting the last layer will transfer to the target data ``(X, y)``.

    Cross-validates (leave-one-out by default, at about the cost of one fit) three predictors of
    y on the target data: the pretrained network ``head(extractor(X))``, its last layer adapted by
    layer variational analysis (:class:`LayerVariationalAdapterCV`, alpha chosen among
    ``alphas``), and a ridge probe on the same features with a zero prior (``head=None``, the
    intercept fitted). Their held-out mean squared errors, the ratios between them and the data
    condition of the adapted fit (:class:`Diagnostics`) say whether adaptation helps, whether
    the pretrained head is a useful prior, and how far the features are from interpolating.

    Parameters
    ----------
    extractor : torch.nn.Module or None
        Frozen body of the pretrained network (None: X holds the features), or the whole model
        when ``head`` names its layer.
    head : torch.nn.Linear, Conv1d, Conv2d, str or (coef, intercept) pair
        The pretrained last layer. A string names a layer of ``extractor``, the whole model,
        as in :class:`LayerVariationalAdapter` (``"fc"``, or ``"auto"``: the last ``Linear``
        or ``Conv`` layer that its forward calls); the features are that layer's input.
    X : array-like or torch.Tensor of shape (n_samples, *input_shape)
        Target-domain inputs of the extractor (features when ``extractor=None``).
    y : array-like of shape (n_samples,) or (n_samples, k)
        Target-domain targets on the head's output scale.
    alphas : array-like of float, default=np.logspace(-3, 4, 15)
        Candidate penalties (> 0 for leave-one-out).
    cv : int, cross-validation generator, iterable or None, default=None
        None: exact leave-one-out (linear heads); an int or a splitter: K-fold, scored by the
        mean squared error of each fold (needed for convolutional heads).
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weights of the samples, in the fits and in the errors.
    fit_intercept : bool or "auto", default="auto"
        Whether the adapted head updates its bias, as in :class:`LayerVariationalAdapter`
        (the probe always fits its intercept).
    batch_size : int, default=256
        Samples per forward pass.
    device : str or torch.device, default="auto"
        Where the extractor runs: "auto" is cuda when available, else cpu.
    cache : "auto", bool, str, os.PathLike or joblib.Memory, default="auto"
        Feature cache, as in :class:`LayerVariationalAdapter`.

    Returns
    -------
    result : Transferability
        The numbers, with a readable ``repr`` and ``summary()``: ``pretrained_mse``,
        ``adapted_mse``, ``probe_mse``, ``ratio_to_pretrained``, ``ratio_to_probe``, ``r2``,
        ``alpha``, ``probe_alpha``, ``target_mse``, ``diagnostics`` (the data condition,
        :class:`Diagnostics`) and ``adapter`` (the fitted
        :class:`LayerVariationalAdapterCV`, to use instead of fitting again).

    See Also
    --------
    logme : LogME, a transferability score of the features alone.
    LayerVariationalAdapterCV : The adapted head with alpha chosen by cross-validation.

    Notes
    -----
    The extractor runs once when the feature cache holds the model (``cache=True``, or the
    default ``"auto"`` for an extractor worth caching): the probe's fit reads the features
    cached by the first. All errors are means over samples and outputs (weighted by
    ``sample_weight``), as the negative of :class:`LayerVariationalAdapterCV`'s default
    leave-one-out score.

    Examples
    --------
    >>> import numpy as np
    >>> from skl_transfer import transferability
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.normal(size=(80, 4))
    >>> y = Z @ np.array([1.0, 2.0, 0.0, -1.0]) + 0.1 * rng.normal(size=80)
    >>> t = transferability(None, (np.array([1.0, 1.5, 0.0, -1.0]), 0.0), Z, y)
    >>> bool(t.adapted_mse < t.pretrained_mse)
    True
    """
    if head is None:
        raise ValueError(
            "transferability needs the pretrained head (torch.nn.Linear, Conv1d/Conv2d or a "
            "(coef, intercept) pair); with no head there is nothing to transfer: use "
            "LayerVariationalAdapterCV(extractor, None) for a ridge probe."
        )
    scoring = None if cv is None else "neg_mean_squared_error"
    common = dict(alphas=alphas, cv=cv, scoring=scoring, batch_size=batch_size, device=device, cache=cache)
    adapted = LayerVariationalAdapterCV(extractor, head, fit_intercept=fit_intercept, **common)
    adapted.fit(X, y, sample_weight=sample_weight)
    if adapted.head_name_ is not None:  # a named layer: the probe reads the same layer input
        layer = named_layer(extractor, adapted.head_name_)
        probe = LayerVariationalAdapterCV(
            LayerInput(extractor, adapted.head_name_), _zero_head(layer), fit_intercept=True, **common
        )
    else:
        probe = LayerVariationalAdapterCV(extractor, _zero_head(head), fit_intercept=True, **common)
    probe.fit(X, y, sample_weight=sample_weight)
    d = adapted.diagnostics_
    per_value = d.weight * d.n_outputs  # squared norms over rows and outputs -> mean
    return Transferability(
        pretrained_mse=d.residue_norm**2 / per_value,
        adapted_mse=-adapted.best_score_,
        probe_mse=-probe.best_score_,
        alpha=adapted.alpha_,
        probe_alpha=probe.alpha_,
        target_mse=d.target_norm**2 / per_value,
        cv="leave-one-out" if cv is None else f"{_n_splits(cv)}-fold",
        diagnostics=d,
        adapter=adapted,
    )


def _n_splits(cv):
    if isinstance(cv, int):
        return cv
    return cv.get_n_splits() if hasattr(cv, "get_n_splits") else len(list(cv))


# -- LogME (You et al., ICML 2021) ------------------------------------------------------------


def logme(features, y, *, max_iter=100, tol=1e-6):
    r"""LogME: the log maximum evidence of Bayesian linear regression of y on the features.

    For each column ``y`` of the targets (one-hot columns for labels), the model
    ``y = F w + e`` with ``w ~ N(0, alpha^{-1} I)`` and ``e ~ N(0, beta^{-1} I)`` has evidence

    .. math::

        \log p(y | \alpha, \beta) = \frac{D}{2} \log\alpha + \frac{n}{2}\log\beta
        - \frac{\beta}{2}\|F m - y\|^2 - \frac{\alpha}{2}\|m\|^2 - \frac12 \log|\alpha I + \beta F^T F|
        - \frac{n}{2}\log 2\pi ,

    with ``m = beta (alpha I + beta F^T F)^{-1} F^T y``; alpha and beta are set by MacKay's
    fixed-point updates ``alpha = gamma / ||m||^2``, ``beta = (n - gamma) / ||F m - y||^2``,
    ``gamma = sum_i beta sigma_i / (alpha + beta sigma_i)``, all through one SVD of ``F``. The
    score is the maximised evidence divided by n, averaged over the columns of y. Features are
    used as given (no centring), as in the paper.

    Parameters
    ----------
    features : array-like or torch.Tensor of shape (n_samples, D)
        Features of the target samples (e.g. the extractor's outputs).
    y : array-like of shape (n_samples,) or (n_samples, k)
        Targets, one column per output (one-hot columns for class labels).
    max_iter : int, default=100
        Fixed-point updates per column, at most.
    tol : float, default=1e-6
        Stop when ``alpha / beta`` changes by less than ``tol`` relative.

    Returns
    -------
    score : float
        Higher means the features explain y better.

    See Also
    --------
    transferability : Held-out errors of the adapted head, the pretrained one and a probe.

    Notes
    -----
    Written from the paper and tested against the evidence computed by
    ``scipy.stats.multivariate_normal``.

    References
    ----------
    K. You, Y. Liu, J. Wang, M. Long. "LogME: Practical Assessment of Pre-trained Models for
    Transfer Learning", ICML 2021.

    Examples
    --------
    >>> import numpy as np
    >>> from skl_transfer import logme
    >>> rng = np.random.default_rng(0)
    >>> F = rng.normal(size=(100, 5))
    >>> y = F @ np.arange(5.0) + 0.1 * rng.normal(size=100)
    >>> bool(logme(F, y) > logme(F, rng.normal(size=100)))  # features that explain y score higher
    True
    """
    F = np.asarray(to_numpy(features), dtype=np.float64)
    Y = np.asarray(to_numpy(y), dtype=np.float64)
    if F.ndim != 2 or Y.ndim not in (1, 2) or Y.shape[0] != F.shape[0]:
        raise ValueError(
            "logme needs features of shape (n, D) and y of shape (n,) or (n, k); "
            f"got {F.shape} and {Y.shape}."
        )
    if not (np.isfinite(F).all() and np.isfinite(Y).all()):
        raise ValueError("features and y must be finite.")
    Y = Y.reshape(F.shape[0], -1)
    U, sv, _ = np.linalg.svd(F, full_matrices=False)
    sigma = sv**2
    scores = [_logme_column(U, sigma, F.shape[1], Y[:, j], max_iter, tol)[0] for j in range(Y.shape[1])]
    return float(np.mean(scores))


def _logme_column(U, sigma, D, y, max_iter=100, tol=1e-6):
    """Maximised evidence per sample of one target column; returns ``(evidence / n, alpha, beta)``."""
    n = y.shape[0]
    x2 = (U.T @ y) ** 2
    yy = float(y @ y)
    res_x2 = max(yy - float(x2.sum()), 0.0)  # the part of y outside the span of F
    floor = np.finfo(np.float64).eps * max(yy, np.finfo(np.float64).tiny)
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        t = alpha / beta
        gamma = float(np.sum(sigma / (sigma + t)))
        m2 = float(np.sum(sigma * x2 / (sigma + t) ** 2))
        res2 = float(np.sum(x2 * (t / (sigma + t)) ** 2)) + res_x2
        alpha, beta = gamma / max(m2, floor), (n - gamma) / max(res2, floor)
        if abs(alpha / beta - t) <= tol * t:
            break
    return logme_evidence(sigma, x2, res_x2, n, D, alpha, beta) / n, alpha, beta


def logme_evidence(sigma, x2, res_x2, n, D, alpha, beta):
    """``log p(y | alpha, beta)`` of Bayesian linear regression from the SVD of the features:
    ``sigma`` the squared singular values, ``x2 = (U^T y)^2``, ``res_x2 = ||y||^2 - sum(x2)``."""
    t = alpha / beta
    m2 = float(np.sum(sigma * x2 / (sigma + t) ** 2))
    res2 = float(np.sum(x2 * (t / (sigma + t)) ** 2)) + res_x2
    # log|alpha I + beta F^T F| over all D eigenvalues (D - len(sigma) of them are 0)
    logdet = float(np.sum(np.log(alpha + beta * sigma))) + (D - sigma.size) * np.log(alpha)
    return (
        D / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - beta / 2 * res2
        - alpha / 2 * m2
        - logdet / 2
        - n / 2 * np.log(2 * np.pi)
    )
