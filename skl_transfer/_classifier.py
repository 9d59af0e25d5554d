"""LayerVariationalClassifier: the layer update for a pretrained head that outputs logits."""

from __future__ import annotations

import time
import warnings
from numbers import Integral, Real

import numpy as np
from scipy.stats import rankdata
from sklearn.base import ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import KFold, StratifiedKFold, check_cv
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d

from . import _solvers
from ._base import BaseAdapter
from ._block import is_block
from ._cv import check_alphas
from ._features import gather_design
from ._torch import to_numpy


class LogitsClassifierMixin:
    """Labels and predictions of an adapter whose head outputs logits (shared by the LVA and
    gradient-descent classifiers): label encoding against the head, decision_function,
    predict_proba, predict."""

    def _encode(self, y):
        y = column_or_1d(to_numpy(y), warn=True)
        if y.shape[0] == 0:
            raise ValueError("Found array with 0 sample(s) (shape=(0,)) while a minimum of 1 is required.")
        prior = self._prior()
        if prior.geometry.is_conv:
            raise ValueError(
                f"{type(self).__name__} adapts Linear heads; a conv head outputs maps, not logits."
            )
        if prior.W0 is None:
            # the classes are the labels seen; with a head, its outputs define them, and many
            # classes with few samples each are no sign of a regression target (no warning)
            check_classification_targets(y)
            classes, yidx = np.unique(y, return_inverse=True)
            if len(classes) < 2:
                raise ValueError(
                    f"{type(self).__name__} needs samples of at least 2 classes; got 1 class "
                    f"({classes[0]!r}). With head=None the classes are the labels seen in fit."
                )
            return classes, yidx
        k = prior.W0.shape[0]
        labels = np.unique(y)
        ok = np.issubdtype(labels.dtype, np.number) and np.all(labels == np.round(labels))
        if not ok or labels.min() < 0 or labels.max() >= k:
            raise ValueError(
                f"The head outputs logits of {k} classes, labelled 0..{k - 1}, but y holds "
                f"{labels[:10].tolist()}{'...' if len(labels) > 10 else ''}; map the labels to the "
                "head's output indices, or use head=None for a new label set."
            )
        return np.arange(k), y.astype(np.int64)

    _link = "softmax"  # how the head's logits are read: "softmax" (one class) or "sigmoid"

    def _encode_indicator(self, y):
        """A multi-label indicator matrix (n, k) of 0/1 against the head's k outputs."""
        Y = np.asarray(to_numpy(y))
        prior = self._prior()
        k = Y.shape[1] if prior.W0 is None else prior.W0.shape[0]
        if Y.shape[1] != k or not np.isin(Y, (0, 1)).all():
            raise ValueError(
                f"A 2-D y is a multi-label indicator matrix of 0/1 with one column per output of the "
                f"head ({k}); got shape {Y.shape}. Pass 1-D labels for one class per sample."
            )
        return np.arange(k), Y.astype(np.float64)

    def _encode_labels(self, y):
        """``(classes, onehot, multilabel)``: a 2-D y with ``link="sigmoid"`` is a multi-label
        indicator matrix, anything else labels one class per sample; ``onehot`` is (n, k) 0/1."""
        multilabel = self._link == "sigmoid" and np.ndim(to_numpy(y)) == 2
        classes, onehot = self._encode_indicator(y) if multilabel else self._encode_onehot(y)
        return classes, onehot, multilabel

    def _encode_onehot(self, y):
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None.")
        classes, yidx = self._encode(y)
        onehot = np.zeros((len(yidx), len(classes)))
        onehot[np.arange(len(yidx)), yidx] = 1.0
        return classes, onehot

    def decision_function(self, X):
        """Return the adapted head's logits.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor (features when ``extractor=None``).

        Returns
        -------
        scores : ndarray of shape (n_samples, k) or (n_samples,)
            The logits; for two classes the logit difference ``l_1 - l_0`` (not for two labels
            of a multi-label fit: one logit per label).
        """
        check_is_fitted(self)
        L = BaseAdapter.predict(self, X)
        binary = len(self.classes_) == 2 and not getattr(self, "multilabel_", False)
        return L[:, 1] - L[:, 0] if binary else L

    def predict_proba(self, X):
        """Return the class probabilities, the softmax of the logits.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor (features when ``extractor=None``).

        Returns
        -------
        proba : ndarray of shape (n_samples, k)
            Probability of each class, in the order of ``classes_``.
        """
        check_is_fitted(self)
        L = BaseAdapter.predict(self, X)
        return 1.0 / (1.0 + np.exp(-L)) if self._link == "sigmoid" else _solvers._softmax(L)

    def predict_log_proba(self, X):
        """Return the logarithm of the class probabilities.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor (features when ``extractor=None``).

        Returns
        -------
        log_proba : ndarray of shape (n_samples, k)
            ``log(predict_proba(X))``.
        """
        return np.log(self.predict_proba(X))

    def predict(self, X):
        """Predict the class of largest logit.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor (features when ``extractor=None``).

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
            Predicted labels, from ``classes_``.
        """
        check_is_fitted(self)
        L = BaseAdapter.predict(self, X)
        if getattr(self, "multilabel_", False):
            return (L > 0).astype(np.int64)  # each label whose sigmoid exceeds 1/2
        return self.classes_[np.argmax(L, axis=1)]


class LayerVariationalClassifier(LogitsClassifierMixin, ClassifierMixin, BaseAdapter):
    r"""Closed-form (or Newton) adaptation of a pretrained classification head.

    The head outputs logits ``l = z W^T + b`` over ``k`` classes; ``W0, b0`` are the
    pretrained ones. Two losses:

    * ``loss="squared"`` (the paper's framework): the layer update of
      :class:`LayerVariationalAdapter` toward *target logits* ``T``,
      :math:`\min \sum_i s_i \|z_i \Delta W^T + \Delta b - (T_i - l^0_i)\|^2 + \alpha \|\Delta W\|^2`,
      with ``T`` on the pretrained head's logit scale (a 0/1 one-hot target would pull every
      logit toward 0 and 1, far below the scale the head was trained to, and flatten
      predict_proba). ``encoding="onehot"`` (default):
      ``T_i = mean_j(l^0_ij) + margin (e_{y_i} - 1/k)``, a one-hot code scaled to the logit
      range and centred on each sample's mean pretrained logit (softmax ignores that shift,
      so no residue is spent on it); ``margin="auto"`` is the pretrained logits' own gap,
      ``k/(k-1)`` times the weighted mean over samples of ``max_j l^0_ij - mean_j l^0_ij``
      (at least ``log(9 (k - 1))``). ``encoding="margin"``: ``T`` is the pretrained logits,
      corrected only where the true class does not lead every other logit by ``margin``
      (the true logit raised and the others lowered by half the shortfall each), so samples
      the pretrained head already classifies with margin carry no residue;
      ``margin="auto"`` is ``log(9 (k - 1))``. On sklearn's digits (benchmarks/digits_shift.py)
      "margin" keeps more of a mildly shifted head with 10 samples, and "onehot" is far better
      from 50 samples on and under strong shifts (inverted, rotated digits), where the
      pretrained logits are confidently wrong and "margin" keeps their wrong ranking. With
      ``head=None`` both are ``margin (e_{y_i} - 1/k)`` up to a shift (a linear probe).
    * ``loss="log"``: multinomial log loss
      :math:`\sum_i s_i\,\mathrm{CE}(\mathrm{softmax}(l_i), y_i) + \alpha \|W - W_0\|_F^2`,
      by Newton steps from the pretrained head, each a closed-form solve of the
      ``k (d + 1)`` Hessian system, until no parameter moves by more than
      ``tol * (1 + max |parameter|)`` (at most ``max_iter`` steps).

    Parameters
    ----------
    extractor : torch.nn.Module or None, default=None
        Frozen body of the pretrained network, as in :class:`LayerVariationalAdapter`.
        None means X already holds the features (2-D).
    head : torch.nn.Linear, str, (coef, intercept) pair or None, default=None
        Pretrained head whose outputs are the logits of classes ``0 .. k-1``: with a head, y
        must hold integer labels in that range (other labels are refused with an error that
        says so). None: any labels are accepted, and the classes are those seen in fit (a
        linear probe). Convolutional heads are not taken (they output maps, not logits). A
        string names a ``Linear`` layer of ``extractor``, the whole model, as in
        :class:`LayerVariationalAdapter` (``"auto"``: the last one that its forward calls).
    alpha : float, default=1.0
        Penalty on ``||W - W0||_F^2``, >= 0.
    alpha_body : float, default=0.0
        Block heads only (an ``nn.Sequential`` of Linear layers and elementwise activations,
        adapted by variable projection as in :class:`LayerVariationalAdapter`, squared loss):
        penalty on the earlier layers' distance to their pretrained weights, >= 0.
    loss : {"squared", "log"}, default="squared"
        "squared": the closed-form update toward target logits; "log": the multinomial log
        loss, by Newton steps (see above); a Hessian larger than 32 MiB is never formed (its
        steps are solved by conjugate gradients on Hessian-vector products).
    link : {"softmax", "sigmoid"}, default="softmax"
        How the head's logits are read. "softmax": one class per sample. "sigmoid": each
        output on its own (multi-label heads, or per-bin confidences such as CREPE's); ``y``
        may then be a (n_samples, k) 0/1 indicator matrix (several labels per sample), and
        the squared loss's target for an output is its pretrained logit where that is
        already on the right side by ``margin`` (calibration survives), else ``+margin`` for
        a label and ``-margin`` for a non-label (``margin="auto"``: ``log 9``, a sigmoid of
        0.9; ``encoding`` is not used). ``predict_proba`` is then the sigmoid of each logit.
    encoding : {"onehot", "margin"}, default="onehot"
        Target logits of the squared loss (see above).
    margin : float or "auto", default="auto"
        Logit margin of the squared loss's targets. "auto": the pretrained head's logit gap
        with ``encoding="onehot"``, at least (and with "margin" or no head, exactly)
        ``log(9 (k - 1))``, the margin at which softmax gives the true class probability 0.9
        against ``k - 1`` equal rivals.
    max_iter : int, default=20
        Newton steps of the log loss, at most (a ``ConvergenceWarning`` when they run out);
        for a block head, outer Levenberg-Marquardt steps at most.
    tol : float, default=1e-8
        Newton stopping tolerance (relative parameter change); for a block head, the steps
        stop when one lowers the objective by at most ``tol`` times its value.
    fit_intercept : bool or "auto", default="auto"
        Whether to update the bias; "auto" follows the head, as in
        :class:`LayerVariationalAdapter`.
    batch_size : int, default=256
        Samples per forward pass of the extractor.
    device : str or torch.device, default="auto"
        Where the extractor runs: "auto" is cuda when available, else cpu.
    verbose : int, default=0
        Print the time of the forward pass and of the solve when > 0.
    cache : "auto", bool, str, os.PathLike or joblib.Memory, default="auto"
        Feature cache, as in :class:`LayerVariationalAdapter`.

    Attributes
    ----------
    classes_ : ndarray of shape (k,)
        ``0 .. k-1`` with a head; the sorted labels seen in fit without one.
    multilabel_ : bool
        Whether ``y`` was an indicator matrix (``link="sigmoid"``): ``predict`` then returns
        one 0/1 column per output.
    coef_ : ndarray of shape (k, d)
        Adapted logit weights (torch Linear layout, also for two classes).
    intercept_ : ndarray of shape (k,)
        Adapted logit biases.
    n_iter_ : int
        Newton steps taken (1, the one closed-form solve, for the squared loss; the accepted
        outer steps for a block head).
    loss_curve_ : ndarray
        Block heads only: the objective at the pretrained earlier layers and after each step.
    delta_coef_, delta_intercept_, residue_norm_, residual_norm_, fit_intercept_, extractor_ : object
        As in :class:`LayerVariationalAdapter` (for the log loss the residue norms are those of
        the squared loss's targets, a measure of what the pretrained head gets wrong).
    head_name_ : str or None
        The adapted layer's dotted name when ``head`` is a string (the layer found for
        ``"auto"``); None otherwise.

    See Also
    --------
    LayerVariationalAdapter : The same update for a head that outputs regression targets.
    GradientDescentClassifier : The head trained by gradient descent on the cross-entropy.

    Notes
    -----
    ``predict`` returns the class of largest logit, ``predict_proba`` the softmax of the
    logits and ``decision_function`` the logits (for two classes, the logit difference).

    The log loss's Newton steps each solve the ``k (d + 1)`` Hessian system by a Cholesky
    factorisation, the system made positive definite along the intercepts' common shift
    (which softmax ignores); an eigendecomposition is used only for ``alpha = 0``. A step
    moves no logit by more than 5 and is halved until the objective decreases enough
    (Armijo backtracking). The log loss matches ``LogisticRegression`` without a head and a
    direct L-BFGS minimisation with one (tested). Nearly separable data with few samples and
    a small alpha can stop at ``max_iter`` with a ``ConvergenceWarning``.

    The estimator passes scikit-learn's ``parametrize_with_checks``. Measured accuracies
    and fit times of the two losses and encodings on shifted digits are in
    ``benchmarks/README.md``.

    Examples
    --------
    >>> import numpy as np
    >>> from skl_transfer import LayerVariationalClassifier
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.normal(size=(60, 3))
    >>> y = (Z[:, 0] > 0).astype(int)  # labels 0 and 1, the head's output indices
    >>> W0 = np.array([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])  # a head that reads the wrong feature
    >>> clf = LayerVariationalClassifier(head=(W0, np.zeros(2)), alpha=1.0).fit(Z, y)
    >>> clf.predict_proba(Z[:2]).shape
    (2, 2)
    >>> bool(clf.score(Z, y) > 0.9)
    True
    """

    _parameter_constraints: dict = {
        **BaseAdapter._parameter_constraints,
        "alpha": [Interval(Real, 0, None, closed="left")],
        "loss": [StrOptions({"squared", "log"})],
        "encoding": [StrOptions({"onehot", "margin"})],
        "margin": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "link": [StrOptions({"softmax", "sigmoid"})],
        "alpha_body": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(
        self,
        extractor=None,
        head=None,
        *,
        alpha=1.0,
        alpha_body=0.0,
        loss="squared",
        link="softmax",
        encoding="onehot",
        margin="auto",
        max_iter=20,
        tol=1e-8,
        fit_intercept="auto",
        batch_size=256,
        device="auto",
        verbose=0,
        cache="auto",
    ):
        self.extractor = extractor
        self.head = head
        self.alpha = alpha
        self.alpha_body = alpha_body
        self.loss = loss
        self.link = link
        self.encoding = encoding
        self.margin = margin
        self.max_iter = max_iter
        self.tol = tol
        self.fit_intercept = fit_intercept
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.cache = cache

    _supports_block = True

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Adapt the head to labelled target-domain data.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor (features when ``extractor=None``).
        y : array-like of shape (n_samples,) or (n_samples, k)
            Class labels (``0 .. k-1`` with a head); with ``link="sigmoid"``, also a 0/1
            indicator matrix of several labels per sample.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples' losses.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        if is_block(self.head) and self.loss != "squared":
            raise ValueError(
                "A block head (an nn.Sequential) is adapted with loss='squared' (variable projection "
                "toward target logits); use loss='squared', or pass the block's last Linear as head "
                "for loss='log'."
            )
        if self.link == "sigmoid" and self.loss == "log":
            raise ValueError(
                "loss='log' is the multinomial (softmax) log loss; for a head read through sigmoids "
                "use loss='squared' with link='sigmoid'."
            )
        classes, onehot, multilabel, p, Z, s, L0, Q = self._logit_residue(X, y, sample_weight)
        spec = p.spec
        (n, k), t0 = L0.shape, time.perf_counter()
        self.__dict__.pop("loss_curve_", None)  # a block fit's, when head changed since
        if spec.geometry.is_block:
            spec, solution = self._fit_block(
                p, Z, L0 + Q, s, self.alpha, self.alpha_body, self.max_iter, self.tol
            )
        elif self.loss == "squared":
            self.n_iter_ = 1  # one closed-form solve
            solution = _solvers.solve(
                self.alpha, spec.fit_intercept, Z.shape, spec.feature_eps, design=(Z, Q, s)
            )
        else:
            absent = np.flatnonzero(s @ onehot <= 0) if spec.fit_intercept else []
            if len(absent):
                shown = ", ".join(map(str, classes[absent][:8])) + (", ..." if len(absent) > 8 else "")
                warnings.warn(
                    f"{len(absent)} of the {k} classes ({shown}) have no weight in y. With "
                    "loss='log' and a fitted intercept (not penalised), their logits fall without bound "
                    "relative to the others: the fit stops where max_iter or tol stop it, and predicts "
                    "those classes less and less. Pass fit_intercept=False to keep the pretrained "
                    "intercepts (the weights stay penalised toward the pretrained ones), or "
                    "loss='squared'.",
                    UserWarning,
                    stacklevel=2,
                )
            W, b, self.n_iter_, converged = _solvers.multinomial_newton(
                Z,
                onehot.argmax(axis=1),
                s,
                spec.W0,
                spec.b0,
                self.alpha,
                spec.fit_intercept,
                self.max_iter,
                self.tol,
            )
            if not converged:
                warnings.warn(
                    f"Newton's method did not converge in max_iter={self.max_iter} steps; "
                    "increase max_iter or alpha.",
                    ConvergenceWarning,
                    stacklevel=2,
                )
            dWt, db = (W - spec.W0).T, b - spec.b0
            R = Q - Z @ dWt - db
            solution = _solvers.Solution(
                dWt, db, float(s @ (Q * Q).sum(1)), float(s @ (R * R).sum(1)), "newton", self.alpha
            )
        self._log(
            f"{n} samples, {spec.d} features, {k} classes, {self.loss} loss: {time.perf_counter() - t0:.3f}s"
        )
        self._store(spec, p.X, p.net, p.digest, solution)
        self.classes_ = classes
        self.multilabel_ = multilabel
        return self

    @property
    def _link(self):
        return self.link

    def _logit_residue(self, X, y, sample_weight):
        """Encode y, run the extractor, and return
        ``(classes, onehot, multilabel, problem, Z, s, L0, Q)``: the (n, k) 0/1 labels, whether y
        was an indicator matrix, the features, weights, pretrained logits and the residue of the
        target logits."""
        with self._head_resolved(X):  # head="auto": the layer found on X's first sample
            classes, onehot, multilabel = self._encode_labels(y)
            p = self._start(X, onehot, sample_weight)  # validates X, weights, head size; first batch run
        spec = p.spec
        Z, _, s = gather_design(p.batches, p.Y, p.s, spec.geometry, spec.feature_shape)
        L0 = spec.geometry.outputs(Z, spec.feature_shape, spec.W0, spec.b0)  # the pretrained logits
        Q = self._target_logits(L0, onehot, s, pretrained=spec.prior.W0 is not None) - L0
        return classes, onehot, multilabel, p, Z, s, L0, Q

    def _target_logits(self, L0, onehot, s, pretrained):
        """Target logits of the squared loss (see the class docstring); ``onehot`` (n, k) holds
        each sample's label (several with a sigmoid link and a multi-label ``y``)."""
        n, k = L0.shape
        if self._link == "sigmoid":
            # each output on its own: a label's logit at least +margin, a non-label's at most
            # -margin; logits already on the right side by the margin are kept (the pretrained
            # scale, so that confidences stay calibrated where the head was right)
            margin = np.log(9.0) if self.margin == "auto" else float(self.margin)
            if not pretrained:
                return margin * (2.0 * onehot - 1.0)
            return np.where(onehot > 0, np.maximum(L0, margin), np.minimum(L0, -margin))
        yidx = onehot.argmax(axis=1)
        floor = np.log(9.0 * max(k - 1, 1))
        if self.encoding == "onehot":
            margin = self.margin
            if margin == "auto":
                gap = (L0.max(axis=1) - L0.mean(axis=1)) * k / max(k - 1, 1)
                margin = max(floor, float(s @ gap / s.sum())) if pretrained else floor
            return L0.mean(axis=1, keepdims=True) + margin * (onehot - 1.0 / k)
        margin = floor if self.margin == "auto" else float(self.margin)
        if not pretrained:
            return margin * (onehot - 0.5)
        rows = np.arange(n)
        true = L0[rows, yidx]
        rival = np.where(onehot.astype(bool), -np.inf, L0).max(axis=1)
        short = np.maximum(0.0, margin - (true - rival))
        T = L0 - short[:, None] / 2
        T[rows, yidx] = true + short / 2
        return T

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = False
        return tags


class LayerVariationalClassifierCV(LayerVariationalClassifier):
    """LayerVariationalClassifier (squared loss) with alpha chosen by cross-validation.

    The squared-loss update is ridge regression of the target logits' residue on the
    features, so, as ``RidgeClassifierCV`` does, every candidate alpha is scored from one
    decomposition of the features: exact leave-one-out (``cv=None``, the default, which needs
    no class to have several samples) or K-fold (a splitter, or an int: stratified when every
    class has at least that many samples and y is 1-D, else shuffled K-fold). The score is
    the (weighted) share of held-out samples whose largest logit is one of their labels (the
    accuracy, for one label per sample). The best alpha is refitted on all data.

    Parameters
    ----------
    extractor : torch.nn.Module or None, default=None
        Frozen body of the pretrained network, or the whole model with ``head`` naming its
        layer, as in :class:`LayerVariationalAdapter`.
    head : torch.nn.Linear, str, (coef, intercept) pair or None, default=None
        Pretrained head whose outputs are the logits, as in :class:`LayerVariationalClassifier`
        (a string names a layer of the model; ``"auto"``: the last ``Linear`` that forward calls).
    alphas : array-like of float, default=(0.1, 1.0, 10.0)
        Candidate penalties (> 0 for leave-one-out).
    cv : int, cross-validation generator, iterable or None, default=None
        None: exact leave-one-out; an int: that many folds; or a splitter.
    link : {"softmax", "sigmoid"}, default="softmax"
        How the head's logits are read, as in :class:`LayerVariationalClassifier`; with
        "sigmoid", ``y`` may be a 0/1 indicator matrix (several labels per sample).
    encoding : {"onehot", "margin"}, default="onehot"
        Target logits, as in :class:`LayerVariationalClassifier`.
    margin : float or "auto", default="auto"
        Logit margin of the targets, as in :class:`LayerVariationalClassifier`.
    fit_intercept : bool or "auto", default="auto"
        Whether to update the bias; "auto" follows the head.
    batch_size : int, default=256
        Samples per forward pass of the extractor.
    device : str or torch.device, default="auto"
        Where the extractor runs.
    verbose : int, default=0
        Print timings when > 0.
    cache : "auto", bool, str, os.PathLike or joblib.Memory, default="auto"
        Feature cache, as in :class:`LayerVariationalAdapter`.

    Attributes
    ----------
    alpha_ : float
        The chosen penalty.
    best_score_ : float
        Its mean held-out accuracy.
    cv_results_ : dict
        ``param_alpha``, ``mean_test_score`` and ``rank_test_score`` per candidate.
    classes_, coef_, intercept_, n_iter_, head_name_ : object
        As in :class:`LayerVariationalClassifier`, for the refit with ``alpha_``.

    See Also
    --------
    LayerVariationalClassifier : One alpha.
    LayerVariationalAdapterCV : The same search for a regressor.

    Examples
    --------
    >>> import numpy as np
    >>> from skl_transfer import LayerVariationalClassifierCV
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.normal(size=(60, 4))
    >>> y = (Z[:, 0] > 0).astype(int)
    >>> clf = LayerVariationalClassifierCV(head=(np.zeros((2, 4)), np.zeros(2)), alphas=[0.1, 10.0])
    >>> clf.fit(Z, y).alpha_ in (0.1, 10.0)
    True
    """

    _parameter_constraints: dict = {
        **{k: v for k, v in LayerVariationalClassifier._parameter_constraints.items()
           if k not in ("alpha", "loss", "max_iter", "tol")},
        "alphas": ["array-like"],
        "cv": ["cv_object"],
    }  # fmt: skip

    def __init__(
        self,
        extractor=None,
        head=None,
        *,
        alphas=(0.1, 1.0, 10.0),
        cv=None,
        link="softmax",
        encoding="onehot",
        margin="auto",
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
        self.link = link
        self.encoding = encoding
        self.margin = margin
        self.fit_intercept = fit_intercept
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.cache = cache

    loss = "squared"  # what the parent's methods read
    _supports_block = False  # a block's alpha is chosen by GridSearchCV

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None, groups=None):
        """Choose alpha by cross-validation and fit the update on all data with it.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor, or features (n_samples, d) when ``extractor=None``.
        y : array-like of shape (n_samples,) or (n_samples, k)
            Class labels; with ``link="sigmoid"``, also a 0/1 indicator matrix.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights, of the squared errors and of the held-out accuracies.
        groups : array-like of shape (n_samples,), default=None
            Group labels for a group splitter.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        alphas = check_alphas(self.alphas, self.cv)
        classes, onehot, multilabel, p, Z, s, L0, Q = self._logit_residue(X, y, sample_weight)
        spec = p.spec
        rtol = spec.rtol(len(Z))
        hits = np.zeros((len(alphas), len(Z)))

        def top_is_a_label(logits, rows):  # the held-out top output is one of the labels
            return onehot[rows, logits.argmax(axis=1)] > 0

        if self.cv is None:
            for j, Q_loo in _solvers.loo_path(Z, Q, s, alphas, spec.fit_intercept, rtol):
                hits[j] = top_is_a_label(Q_loo + L0, np.arange(len(Z)))
        else:
            yidx = onehot.argmax(axis=1)
            folds = list(self._splitter(yidx, multilabel).split(Z, yidx, groups))
            for f, j, Q_pred in _solvers.kfold_path(Z, Q, s, folds, alphas, spec.fit_intercept, rtol):
                test = folds[f][1]
                hits[j, test] = top_is_a_label(Q_pred + L0[test], test)
        mean = hits @ s / s.sum()
        best = int(np.argmax(mean))
        self.alpha_, self.best_score_ = float(alphas[best]), float(mean[best])
        self.cv_results_ = {
            "param_alpha": alphas.copy(),
            "mean_test_score": mean,
            "rank_test_score": rankdata(-mean, method="min").astype(np.int32),
        }
        solution = _solvers.solve(
            self.alpha_, spec.fit_intercept, Z.shape, spec.feature_eps, design=(Z, Q, s)
        )
        self.n_iter_ = 1
        self._store(spec, p.X, p.net, p.digest, solution)
        self.classes_ = classes
        self.multilabel_ = multilabel
        return self

    def _splitter(self, yidx, multilabel=False):
        """An int cv: stratified folds, or shuffled K-fold when a class has fewer samples
        than folds or y is multi-label (a splitter is used as given)."""
        if not isinstance(self.cv, Integral):
            return check_cv(self.cv)
        counts = np.bincount(yidx)
        rare = multilabel or counts[counts > 0].min() < self.cv
        return KFold(self.cv, shuffle=True, random_state=0) if rare else StratifiedKFold(self.cv)
