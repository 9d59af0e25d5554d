"""Gradient-descent fine-tuning of the head: the baseline the paper compares LVA with."""

from __future__ import annotations

import time
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import ClassifierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from . import _solvers
from ._base import AdapterRegressorMixin, BaseAdapter
from ._classifier import LogitsClassifierMixin
from ._features import gather_features, head_outputs
from ._torch import as_device_arrays, from_numpy, resolve_device, to_float64


class _GradientDescentBase(BaseAdapter):
    r"""Fine-tune a pretrained last layer by gradient descent on frozen features (MSE).

    The baseline of the paper: the same frozen extractor and head as
    :class:`LayerVariationalAdapter`, but the head is trained with torch autograd on

    .. math::

        \frac{1}{\sum_i s_i} \sum_i s_i \| z_i W^T + b - y_i \|^2
        + \lambda \| W - W_{ref} \|_F^2 ,

    with ``W_ref = W0`` (``decay_to="pretrained"``, L2-SP) or 0 (``decay_to="zero"``) and
    ``lambda = weight_decay``. Its minimiser is the closed-form update of
    :class:`LayerVariationalAdapter` with ``alpha = weight_decay * sum_i s_i`` (for
    ``decay_to="pretrained"``), which gradient descent approaches as it converges.

    The features are computed once (through the feature cache), not per epoch; only the head
    is trained, in float32 on ``device``. Shuffling and the validation split are seeded by
    ``random_state``, so fits are deterministic. Epochs are never selected on test data:
    with ``validation_fraction`` set, the epoch of lowest loss on a held-out part of the
    *training* data is kept.

    Parameters
    ----------
    extractor : torch.nn.Module or None, default=None
        Frozen body of the pretrained network, as in :class:`LayerVariationalAdapter`.
        None means X already holds the features (2-D).
    head : torch.nn.Linear, Conv1d, Conv2d, str, (coef, intercept) pair or None, default=None
        Pretrained last layer, the starting point of gradient descent, as in
        :class:`LayerVariationalAdapter` (None: zero weights; a string names a layer of the
        model passed as ``extractor``, or ``"auto"``).
    lr : float, default=1e-3
        Learning rate.
    epochs : int, default=100
        Passes over the training data.
    batch_size : int or None, default=None
        Samples per gradient step; None is full-batch gradient descent (the paper's setting
        for its time-series experiment). Forward passes run in batches of ``batch_size``
        (256 when None).
    optimizer : {"adam", "sgd"}, default="adam"
        ``torch.optim.Adam`` or plain ``torch.optim.SGD``.
    weight_decay : float, default=0.0
        ``lambda`` above.
    decay_to : {"pretrained", "zero"}, default="pretrained"
        Whether the penalty pulls the weights toward the pretrained head or toward zero.
    validation_fraction : float or None, default=None
        Fraction of the training samples held out to choose the best epoch (then the model
        of that epoch is kept). None trains for ``epochs`` and keeps the last.
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffling and the validation split.
    fit_intercept : bool or "auto", default="auto"
        Whether to train the bias; "auto" follows the head, as in
        :class:`LayerVariationalAdapter`.
    device : str or torch.device, default="auto"
        Where the extractor runs and the head is trained: "auto" is cuda when available,
        else cpu.
    verbose : int, default=0
        Print the training time when > 0, and show a progress bar over epochs (with tqdm,
        the ``progress`` extra).
    cache : "auto", bool, str, os.PathLike or joblib.Memory, default="auto"
        Feature cache, as in :class:`LayerVariationalAdapter`.

    Attributes
    ----------
    coef_, intercept_, delta_coef_, delta_intercept_, fit_intercept_, residue_norm_, residual_norm_ : object
        As in :class:`LayerVariationalAdapter`.
    head_name_ : str or None
        The dotted name of the trained layer when ``head`` is a string, as in
        :class:`LayerVariationalAdapter`.
    loss_curve_ : ndarray of shape (epochs,)
        Training objective (weighted mean loss plus the weight decay term) after each epoch.
        Full batch: exact, and free (epoch i's step computes it at the weights epoch i - 1
        left). Minibatches: the weight-averaged objective of the epoch's minibatches, each at
        the weights before its step, as scikit-learn's MLP reports it (no extra pass).
    validation_loss_curve_ : ndarray of shape (epochs,) or None
        Weighted mean squared error on the validation split after each epoch.
    best_epoch_ : int
        The epoch (1-based) whose weights were kept.
    fit_time_ : float
        Seconds spent in gradient descent (features excluded).

    See Also
    --------
    LayerVariationalAdapter : The minimiser of the same objective, in closed form.
    GradientDescentClassifier : The same baseline for a head that outputs logits.

    Notes
    -----
    Gradient descent converges to :class:`LayerVariationalAdapter` with
    ``alpha = weight_decay * sum_i s_i`` (tested). A convolutional head is trained with
    ``torch.nn.functional.conv1d``/``conv2d`` on the cached features. The estimator passes
    scikit-learn's ``parametrize_with_checks`` with one expected failure,
    ``check_sample_weight_equivalence_on_dense_data``: it trains in float32, so integer
    weights and repeated rows agree to float32 rounding, about 7e-8, not to the check's 1e-7
    relative.

    Examples
    --------
    >>> import numpy as np
    >>> from skl_transfer import GradientDescentAdapter, LayerVariationalAdapter
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.normal(size=(60, 3))
    >>> y = Z @ np.array([1.2, -2.0, 0.4]) + 0.3
    >>> head = (np.array([[1.0, -2.0, 0.5]]), 0.0)
    >>> gd = GradientDescentAdapter(head=head, lr=0.05, epochs=500, random_state=0).fit(Z, y)
    >>> lva = LayerVariationalAdapter(head=head, alpha=0.0).fit(Z, y)
    >>> bool(np.allclose(gd.coef_, lva.coef_, atol=1e-4))  # converged to the closed form
    True
    """

    _parameter_constraints: dict = {
        **BaseAdapter._parameter_constraints,
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "optimizer": [StrOptions({"adam", "sgd"})],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "decay_to": [StrOptions({"pretrained", "zero"})],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither"), None],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        extractor=None,
        head=None,
        *,
        lr=1e-3,
        epochs=100,
        batch_size=None,
        optimizer="adam",
        weight_decay=0.0,
        decay_to="pretrained",
        validation_fraction=None,
        random_state=None,
        fit_intercept="auto",
        device="auto",
        verbose=0,
        cache="auto",
    ):
        self.extractor = extractor
        self.head = head
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.decay_to = decay_to
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.fit_intercept = fit_intercept
        self.device = device
        self.verbose = verbose
        self.cache = cache

    _supports_conv = True

    @property
    def _forward_batch_size(self):
        return 256 if self.batch_size is None else self.batch_size

    @staticmethod
    def _sample_loss(L, Y):
        """Per-sample loss of outputs L against targets Y: the squared error."""
        return ((L - Y) ** 2).sum(1)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Train the head by gradient descent on the frozen features of X.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, *input_shape)
            Inputs of the extractor (features when ``extractor=None``).
        y : array-like of shape (n_samples,) or (n_samples, k)
            Targets on the head's output scale (the conv output shape for a conv head).
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples' squared errors.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        return self._fit_gd(X, y, sample_weight)

    def _fit_gd(self, X, y, sample_weight):
        p = self._start(X, y, sample_weight)
        spec = p.spec
        Z = gather_features(p.batches)  # once, not per epoch
        rng = check_random_state(self.random_state)
        n = p.n_samples
        train = np.arange(n)
        val = None
        if self.validation_fraction is not None:
            n_val = int(round(self.validation_fraction * n))
            if not 1 <= n_val < n:
                raise ValueError(
                    f"validation_fraction={self.validation_fraction} leaves {n_val} validation "
                    f"samples out of {n}; use a fraction that keeps at least one on each side."
                )
            perm = rng.permutation(n)
            val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        W, b, curves, best_epoch, seconds = self._descend(Z, p.Y, p.s, spec, train, val, rng)
        dWt, db = (W - spec.W0).T, b - spec.b0
        prior, adapted = head_outputs(
            [(slice(None), from_numpy(Z))],
            n,
            [(spec.W0, spec.b0), (W, b)],
            spec.geometry,
            spec.feature_shape,
        )
        Q, R = p.Y - prior, p.Y - adapted
        solution = _solvers.Solution(
            dWt, db, float(p.s @ (Q * Q).sum(1)), float(p.s @ (R * R).sum(1)), "gradient descent"
        )
        self._store(spec, p.X, p.net, p.digest, solution)
        self.loss_curve_, self.validation_loss_curve_ = curves
        self.best_epoch_ = best_epoch
        self.fit_time_ = seconds
        return self

    def _descend(self, Z, Y, s, spec, train, val, rng):
        device = resolve_device(self.device)
        Zt, Yt, st, W0t, b0t = as_device_arrays(device, Z, Y, s, spec.W0, spec.b0, dtype=torch.float32)
        W = torch.nn.Parameter(W0t.clone())
        b = torch.nn.Parameter(b0t.clone(), requires_grad=spec.fit_intercept)
        W_ref = W0t if self.decay_to == "pretrained" else torch.zeros_like(W)
        params = [W, b] if spec.fit_intercept else [W]
        opt = (torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD)(params, lr=self.lr)
        gen = torch.Generator().manual_seed(int(rng.randint(2**31 - 1)))
        train_t = from_numpy(train)
        step = len(train) if self.batch_size is None else self.batch_size

        def data_loss(idx):
            w = st[idx]
            L = spec.geometry.outputs(Zt[idx], spec.feature_shape, W, b)
            return (w @ self._sample_loss(L, Yt[idx])) / w.sum().clamp_min(1e-300)

        def objective(idx):
            return data_loss(idx) + self.weight_decay * ((W - W_ref) ** 2).sum()

        losses, val_losses = [], []
        best = (np.inf, 0, W.detach().clone(), b.detach().clone())
        t0 = time.perf_counter()
        full_batch = step >= len(train)
        for epoch in self._progress(range(self.epochs), self.epochs, "epochs"):
            order = train_t if full_batch else train_t[torch.randperm(len(train), generator=gen)]
            total = weight = 0.0
            for start in range(0, len(order), step):
                idx = order[start : start + step]
                opt.zero_grad()
                loss = objective(idx)
                loss.backward()
                opt.step()
                if full_batch:  # the objective at the weights the previous epoch left
                    if epoch > 0:
                        losses.append(loss.detach())
                else:
                    w = st[idx].sum()
                    total, weight = total + loss.detach() * w, weight + w
            if not full_batch:
                losses.append(total / weight)
            with torch.no_grad():
                if val is not None:
                    val_losses.append(float(data_loss(from_numpy(val))))
                    if val_losses[-1] < best[0]:
                        best = (val_losses[-1], epoch + 1, W.detach().clone(), b.detach().clone())
        if full_batch and self.epochs > 0:
            with torch.no_grad():
                losses.append(objective(train_t))  # after the last epoch
        losses = [float(v) for v in losses]
        seconds = time.perf_counter() - t0
        if val is None:
            best = (None, self.epochs, W.detach(), b.detach())
        self._log(f"{self.epochs} epochs in {seconds:.3f}s, kept epoch {best[1]}")
        curves = (np.array(losses), None if val is None else np.array(val_losses))
        return to_float64(best[2]), to_float64(best[3]), curves, best[1], seconds


class GradientDescentAdapter(AdapterRegressorMixin, _GradientDescentBase):
    __doc__ = _GradientDescentBase.__doc__


class GradientDescentClassifier(LogitsClassifierMixin, ClassifierMixin, _GradientDescentBase):
    """Fine-tune a pretrained logit head by gradient descent on frozen features (cross-entropy).

    The classification twin of :class:`GradientDescentAdapter` (same parameters): the head's
    logits are trained on the weighted mean cross-entropy plus
    ``weight_decay * ||W - W_ref||_F^2``. Labels follow :class:`LayerVariationalClassifier`:
    with a head, integer labels ``0 .. k-1`` (its outputs); with ``head=None``, any labels.

    Parameters
    ----------
    extractor : torch.nn.Module or None, default=None
        Frozen body of the pretrained network, as in :class:`LayerVariationalAdapter`.
        None means X already holds the features (2-D).
    head : torch.nn.Linear, str, (coef, intercept) pair or None, default=None
        Pretrained head whose outputs are the logits of classes ``0 .. k-1``, the starting
        point of gradient descent (a string names a layer of the model passed as
        ``extractor``, or ``"auto"``, as in :class:`LayerVariationalAdapter`). None: zero
        weights, and any labels (a linear probe).
    lr : float, default=1e-3
        Learning rate.
    epochs : int, default=100
        Passes over the training data.
    batch_size : int or None, default=None
        Samples per gradient step; None is full-batch gradient descent. Forward passes run
        in batches of ``batch_size`` (256 when None).
    optimizer : {"adam", "sgd"}, default="adam"
        ``torch.optim.Adam`` or plain ``torch.optim.SGD``.
    weight_decay : float, default=0.0
        Penalty ``weight_decay * ||W - W_ref||_F^2`` added to the mean cross-entropy.
    decay_to : {"pretrained", "zero"}, default="pretrained"
        ``W_ref``: the pretrained head's weights, or zero.
    validation_fraction : float or None, default=None
        Fraction of the training samples held out to choose the best epoch (then the model
        of that epoch is kept). None trains for ``epochs`` and keeps the last.
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffling and the validation split.
    link : {"softmax", "sigmoid"}, default="softmax"
        How the head's logits are read. "softmax": one class per sample, the multinomial
        cross-entropy. "sigmoid": each output on its own (multi-label heads, per-bin
        confidences such as CREPE's), the binary cross-entropy of each output summed over
        outputs; ``y`` may then be a (n_samples, k) 0/1 indicator matrix, as in
        :class:`LayerVariationalClassifier`, and ``predict_proba`` is the sigmoid of each logit.
    fit_intercept : bool or "auto", default="auto"
        Whether to train the bias; "auto" follows the head, as in
        :class:`LayerVariationalAdapter`.
    device : str or torch.device, default="auto"
        Where the extractor runs and the head is trained: "auto" is cuda when available,
        else cpu.
    verbose : int, default=0
        Print the training time when > 0, and show a progress bar over epochs (with tqdm,
        the ``progress`` extra).
    cache : "auto", bool, str, os.PathLike or joblib.Memory, default="auto"
        Feature cache, as in :class:`LayerVariationalAdapter`.

    Attributes
    ----------
    classes_ : ndarray of shape (k,)
        ``0 .. k-1`` with a head; the sorted labels seen in fit without one.
    coef_ : ndarray of shape (k, d)
        Trained logit weights (torch Linear layout).
    intercept_ : ndarray of shape (k,)
        Trained logit biases.
    multilabel_ : bool
        Whether ``y`` was an indicator matrix (``link="sigmoid"``).
    head_name_, loss_curve_, validation_loss_curve_, best_epoch_, fit_time_ : object
        As in :class:`GradientDescentAdapter` (losses are cross-entropies).

    See Also
    --------
    LayerVariationalClassifier : The closed-form (squared loss) or Newton (log loss) update.
    GradientDescentAdapter : The same baseline for regression targets.

    Notes
    -----
    It converges to :class:`LayerVariationalClassifier` with ``loss="log"`` and
    ``alpha = weight_decay * sum_i s_i`` (tested).

    Examples
    --------
    >>> import numpy as np
    >>> from skl_transfer import GradientDescentClassifier
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.normal(size=(60, 3))
    >>> y = (Z[:, 0] > 0).astype(int)
    >>> W0 = np.array([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    >>> clf = GradientDescentClassifier(head=(W0, np.zeros(2)), lr=0.1, random_state=0).fit(Z, y)
    >>> bool(clf.loss_curve_[-1] < clf.loss_curve_[0])
    True
    """

    _parameter_constraints: dict = {
        **_GradientDescentBase._parameter_constraints,
        "link": [StrOptions({"softmax", "sigmoid"})],
    }

    def __init__(
        self,
        extractor=None,
        head=None,
        *,
        lr=1e-3,
        epochs=100,
        batch_size=None,
        optimizer="adam",
        weight_decay=0.0,
        decay_to="pretrained",
        validation_fraction=None,
        random_state=None,
        link="softmax",
        fit_intercept="auto",
        device="auto",
        verbose=0,
        cache="auto",
    ):
        super().__init__(
            extractor,
            head,
            lr=lr,
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            weight_decay=weight_decay,
            decay_to=decay_to,
            validation_fraction=validation_fraction,
            random_state=random_state,
            fit_intercept=fit_intercept,
            device=device,
            verbose=verbose,
            cache=cache,
        )
        self.link = link

    @property
    def _link(self):
        return self.link

    def _sample_loss(self, L, Y):
        """Cross-entropy of logits L against one-hot (softmax) or 0/1 indicator (sigmoid) Y."""
        if self.link == "sigmoid":
            return torch.nn.functional.binary_cross_entropy_with_logits(L, Y, reduction="none").sum(1)
        return -(torch.log_softmax(L, dim=1) * Y).sum(1)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Train the logit head by gradient descent on the frozen features of X.

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
        with self._head_resolved(X):  # head="auto": the layer found on X's first sample
            classes, onehot, multilabel = self._encode_labels(y)
            self._fit_gd(X, onehot, sample_weight)
        self.classes_ = classes
        self.multilabel_ = multilabel
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = False
        return tags
