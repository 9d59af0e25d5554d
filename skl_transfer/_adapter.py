"""LayerVariationalAdapter: the analytic, regularised update of a pretrained last layer."""

from __future__ import annotations

import time
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, StrOptions

from . import _solvers
from ._base import AdapterRegressorMixin, BaseAdapter, RidgeUpdateMixin
from ._block import BlockGeometry, is_block
from ._dask import dask_moments, is_dask_array
from ._features import gather_design
from ._layers import is_auto
from ._moments import accumulate_moments
from ._perturb import PerturbResidue
from ._torch import host_bits, is_tensor, to_numpy
from ._validation import check_sample_weight, native_byte_order


# The moments of a perturb fit and the squared norms of its residue's terms (one cache entry):
# the Moments fields first, so that the cache sizes it like any moments entry.
class _PerturbMoments(NamedTuple):
    """A perturb fit's moments with its residue terms' squared norms: one moments-cache entry."""

    moments: _solvers.Moments
    terms_sq: dict

    @property
    def nbytes(self):
        return self.moments.nbytes + _DICT_ITEM_BYTES * len(self.terms_sq)


_DICT_ITEM_BYTES = 150  # a dict item with a float value, as tracemalloc measures it


def _is_batch_iterable(X):
    """A DataLoader, iterator or other iterable that is not array-like: a stream of batches."""
    if isinstance(X, torch.utils.data.DataLoader) or hasattr(X, "__next__"):
        return True
    if isinstance(X, (np.ndarray, torch.Tensor, list, tuple, str, bytes)) or is_dask_array(X):
        return False
    return hasattr(X, "__iter__") and not hasattr(X, "__array__") and not hasattr(X, "shape")


class LayerVariationalAdapter(RidgeUpdateMixin, AdapterRegressorMixin, BaseAdapter):
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
    adapted head sees on the target domain. If the extractor is affine,
    ``F(x~) = F(x) + J_F dx`` exactly, and the two methods give the same update.

    Parameters
    ----------
    extractor : torch.nn.Module or None, default=None
        Frozen body of the pretrained network, mapping a batch of inputs to features of
        any shape (flattened per sample). It is deep-copied, put in eval mode and run
        under ``torch.inference_mode``; the module passed in is never modified.
        None means X already holds the features (2-D).
    head : torch.nn.Linear, Conv1d, Conv2d, nn.Sequential, str, (coef, intercept) pair or None, default=None
        Pretrained last layer (a convolution: see Notes), or a block of the last layers: an
        ``nn.Sequential`` of ``Linear`` layers with elementwise activations between them,
        ending in a ``Linear`` (e.g. ``net[-3:]``), adapted by variable projection (see
        Notes; the earlier layers by Levenberg-Marquardt steps, the last in closed form). A
        pair holds ``coef`` of shape (k, d) or (d,) and ``intercept`` as an array of shape
        (k,), a float, or None. None is
        a zero prior: the estimator is then ridge regression on the features (without an
        extractor, exactly ``sklearn.linear_model.Ridge``). A string names a ``Linear`` or
        ``Conv`` layer of ``extractor``, which is then the whole model (a dotted path as
        ``model.get_submodule`` takes: ``"fc"``, ``"classifier.3"``, ``"head.classifier"``):
        the features are that layer's input and the targets live in its output space. The
        private copy of the model runs up to the layer's first call and computes nothing
        after it, whatever the model returns (tensor, tuple, dict, ``ModelOutput``) or does
        before or after the layer; a layer that forward calls more than once, or never, is
        refused. ``to_module()`` then returns the whole model with that layer replaced.
        ``"auto"`` names the last ``Linear``, ``Conv1d`` or ``Conv2d`` layer that forward
        calls (in call order, found on the first sample of X), reported in ``head_name_``.
    alpha : float, default=1.0
        Penalty on ``||coef_ - W_0||_F^2``, used as written (not squared). Must be >= 0.
    alpha_body : float, default=0.0
        Block heads only: penalty ``alpha_body * ||theta - theta_0||^2`` pulling the earlier
        layers' weights and biases toward their pretrained values (>= 0).
    max_iter : int, default=10
        Block heads only: outer Levenberg-Marquardt steps at most.
    tol : float, default=1e-6
        Block heads only: the steps stop when one lowers the objective by at most ``tol``
        times its value.
    warm_start : bool, default=False
        Block heads only: when True, ``fit`` starts from the earlier layers and the damping
        of the previous block fit (the penalty ``alpha_body`` still pulls toward the
        pretrained weights) and takes up to ``max_iter`` more steps; ``n_iter_`` and
        ``loss_curve_`` describe this call's steps. On the same data and parameters, a fit
        with ``max_iter=3`` followed by one with ``max_iter=7`` ends where one fit with
        ``max_iter=10`` ends (unless ``tol`` stopped the first), so a validation score can
        be read along one path of steps (GridSearchCV clones its estimator, so it refits
        from the start instead). A previous fit of a block of other shapes is an error.
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
        Print the time of the forward pass and of the solve when > 0, and show progress bars
        over batches (with tqdm, the ``progress`` extra).
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
    head_name_ : str or None
        The dotted name of the adapted layer of the model when ``head`` is a string (the
        layer found for ``"auto"``); None for a module, a pair or no head.
    n_samples_seen_ : int
        Number of samples the update was computed from (summed over ``partial_fit`` calls).
    n_iter_ : int
        1 (one closed-form solve); for a block head, the accepted outer steps (1 for a block
        of one Linear, a closed-form solve).
    loss_curve_ : ndarray of shape (n_iter_ + 1,)
        Block heads only: the objective (weighted squared error plus both penalties) at the
        pretrained earlier layers and after each accepted step; it never increases.
    input_shape_ : tuple
        Per-sample shape of X seen in fit.
    n_features_in_ : int
        Number of columns of X, when X is 2-D.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Column names of X, when X is a DataFrame with string column names (with or without
        an extractor); ``predict`` refuses renamed or reordered columns.

    See Also
    --------
    LayerVariationalAdapterCV : The same update with alpha chosen by cross-validation.
    sklearn.linear_model.Ridge : The same solve with a zero prior and no extractor.

    Notes
    -----
    **How it computes.** Features are cast to float64 on the extractor's device and every
    solve is in float64, whatever the network's dtype (float16 and bfloat16 extractors
    included). With ``n_samples >= d`` (``solver_ == "primal"``) the weighted means and
    co-moments of (Z, Q) are accumulated batch by batch on the extractor's device, each batch
    centred on its own mean and merged with the Chan-Golub-LeVeque correction, in place into
    one ``d x d`` float64 accumulator. Only the upper triangle of ``Z^T Z`` is formed. On the
    CPU, BLAS ``syrk``: the centred float64 rows of consecutive batches are held (at most
    256 MiB, the whole design when it fits) and multiplied by row blocks in parallel threads,
    each on one BLAS thread, so that no BLAS worker thread is left spinning against torch's
    during the next forward pass; with features you pass yourself, each batch goes to
    ``syrk`` at once. On another device, block rows of ``addmm_`` there. Memory
    is O(d^2 + min(N d, 256 MiB)) beyond a batch, and the N x d feature matrix is never
    stored whole when it is larger. With ``n_samples < d`` (``"dual"``) the
    ``n x n`` kernel ``A A^T`` of the weighted, centred features is used instead.

    The Gram matrix (or kernel) is scaled to a unit diagonal before it is factorised,
    ``D^{-1/2} (G + alpha I) D^{-1/2}``: a change of variables only (the penalty stays
    ``alpha ||dW||^2`` in your units). Every entry of a Gram matrix is rounded relative to
    ``sqrt(G_ii G_jj)``, so nothing is lost, and a feature counts by its correlation with the
    others, not by its scale: columns scaled from 1e-8 to 1e8 give ``Ridge``'s solution to
    1e-10 at every alpha > 0 (tested against ``Ridge(solver="cholesky")`` and 100-digit
    arithmetic). Columns of zero variance get coefficient 0, as in ``Ridge``. One Cholesky
    factorisation of the scaled ``G + alpha I`` (``alpha = 0`` included) serves when LAPACK's
    condition estimate is at most 1e7, the common case. Otherwise:

    - with the features in memory (``head=None`` or a ``(coef, intercept)`` head; an
      extractor fit whose design has at most 2^24 entries, 128 MiB, kept by reference while
      the moments are accumulated; every dual fit; the CV estimator's refit; the classifier's
      squared loss), the update is solved from the data, as ``Ridge``'s svd solver does, so
      that the condition number is not squared: iterative refinement against the rows, then
      if needed a Householder QR of the scaled, weighted, centred design stacked on
      ``sqrt(alpha) D^{-1/2}``. Features offset by 1e4-1e6 without an intercept, or weights
      spanning 1e-6..1e6, then match the exact ridge solution (100-digit arithmetic) to 1e-8
      or better, where the Gram-based solve was 1e-7 to 1e-3 off. Only ill-conditioned fits
      pay for it (a QR of the design);
    - otherwise (streamed fits: an iterable of batches, ``partial_fit``, dask arrays,
      ``method="perturb"``, extractor fits above the size bound; and the alpha paths of
      :class:`LayerVariationalAdapterCV`) the scaled matrix is eigendecomposed; eigenvalues
      below ``rtol`` times the largest are noise and treated as zero for every alpha,
      ``rtol = max(max(n, d) * eps64, eps_f**2)`` (``eps_f``: the machine epsilon of the
      extractor's dtype). The solution is continuous as alpha goes to 0, rank-deficient
      features give the minimum-norm solution in your units at ``alpha = 0`` (not inf or
      NaN), and a float16 extractor's rounding is not fitted.

    What the streamed paths guarantee: the moments are float64 sums with rounding of order
    ``eps`` relative to each entry's own scale (batches centred on their own means, so large
    feature means do not cancel); the solve is scale-invariant like the in-memory one, with
    relative error about ``eps * kappa``, ``kappa`` the condition number of the scaled
    ``G + alpha I``: below 1e-9 whenever ``kappa <= 1e7`` (then identical to the in-memory
    path), but up to 1e-7..1e-3 where the in-memory path goes to the data, e.g. features
    offset by 1e4-1e6 with ``fit_intercept=False``. Fit the intercept (centring removes
    offsets) or fit in memory if that matters; ``diagnostics_.condition_number`` tells the
    conditioning. ``residual_norm_`` comes from the moments in the primal path, exact up to
    cancellation of order ``eps * residue_norm_**2``; in the dual path, and whenever the data
    path solved the fit, it is computed directly from the rows. Sample weights whose sum
    overflows float64 (e.g. 1e308 each), and moments that overflow, are refused with a
    ``ValueError`` that names the fix (divide the weights by their maximum and alpha by the
    same factor: the solution is unchanged, tested).

    **Data that does not fit in memory.** ``fit`` on an iterable of batches (a
    ``DataLoader``) streams each batch once through the extractor into the moments and solves
    once after the last, equal to the in-memory fit to 1e-10 (tested with a counting
    extractor). ``partial_fit`` merges the moments of each batch into the running ones
    (Chan-Golub-LeVeque, never raw sums) and re-solves, so the model after the last batch
    equals ``fit`` on all the data; memory does not grow with the number of batches. ``fit``
    on a dask array (X chunked along samples, ``y`` and ``sample_weight`` numpy or dask)
    computes each block's moments on the dask workers and merges them (the ``dask`` extra).

    **Input checks.** Bad input (NaN/inf, mismatched rows or columns, a wrong head, negative
    or mis-sized sample weights, a negative alpha, ``y=None``) raises a ``ValueError`` or
    ``TypeError`` that names the value and the fix, before the extractor runs. What only the
    extractor can tell is reported after its first batch (``batch_size`` samples), not after
    the whole pass: an X it rejects (a ``ValueError`` chained to torch's error) and a head
    whose ``in_features`` differs from its output size. Integer X into a floating extractor
    is named as such, with the fix (``X.astype(np.float32)``; integers are passed unchanged
    to extractors that take indices, such as an ``nn.Embedding``); complex features are
    refused (return ``torch.view_as_real(z)`` or ``z.abs()``), as are a per-sample feature
    shape that changes between batches, a torch head with NaN or infinite weights, and
    devices that cannot run the extractor (``device="meta"``, a backend this torch lacks),
    each before any solve. Big-endian arrays are converted to native byte order. Inputs are
    copied batch by batch before the forward pass, so even an in-place first layer cannot
    write into your arrays; BatchNorm and Dropout behave as at inference.

    **Output conventions.** With ``head=None`` and no extractor the estimator *is*
    ``Ridge``, with its conventions (scikit-learn 1.9), tested attribute by attribute and by
    scikit-learn's own ``test_ridge.py``: for y of shape (n,), ``coef_`` has shape (d,),
    ``intercept_`` is a numpy scalar and ``predict`` gives (n,); for y of shape (n, 1),
    ``coef_`` (d,), ``intercept_`` an array (1,), ``predict`` (n,); for y of shape (n, k),
    ``coef_`` (k, d), ``intercept_`` (k,), ``predict`` (n, k); ``intercept_`` is ``0.0``
    with ``fit_intercept=False``. Float32 X gives float32 ``coef_``, ``intercept_`` and
    predictions (solved in float64, cast at the end), as ``Ridge``; ``delta_coef_`` and
    ``delta_intercept_`` stay float64. Two-dimensional sample weights are refused with
    scikit-learn's own message. With a head or an extractor the outputs are the head's,
    whatever the input dtype: float64; ``coef_`` (k, d) (torch Linear layout), ``intercept_``
    (k,) and ``predict`` (n, k) for a 2-D y, also for k = 1; for 1-D y ``coef_`` (d,),
    ``intercept_`` a float and ``predict`` (n,).

    **Convolutional heads.** A ``Conv1d``/``Conv2d`` head (any kernel size, stride, padding,
    dilation; ``groups=1``; zero padding) is a linear map of unfolded input patches, so the
    same solve applies with one design row per sample and output position
    (``C_in * prod(kernel)`` columns) and the output channels as targets. y has the head's
    output shape ``(n_samples, C_out, *spatial)``; ``coef_`` keeps the flattened
    ``(C_out, C_in * prod(kernel))`` layout; ``predict`` returns the conv output shape and
    ``to_module()`` a real conv layer with the adapted kernel. The normal equations are
    accumulated in chunks of at most 4096 patch rows, so the patches are never all in memory.
    ``score`` is R^2 over the outputs flattened per sample; scikit-learn's named metrics
    (``"neg_mean_squared_error"``, ...) reject targets of more than 2 dimensions, so
    ``GridSearchCV`` over a conv head needs the default scoring or a callable scorer, while
    :class:`LayerVariationalAdapterCV` flattens for any scorer.

    **Pickles.** A pickle carries the adapted layer, the frozen copy of the extractor (its
    weights, not training data) and, after a primal fit, the ``d x d`` moments of the
    features (32 MiB at d = 2048), kept so that ``partial_fit`` can continue and
    ``diagnostics_`` can be computed. No training rows: a dual fit (n < d) computes its
    diagnostics when pickled instead of keeping its features (tested: no feature or input row
    is in the pickle's bytes). :meth:`drop_moments` computes ``diagnostics_`` and drops the
    moments.

    **The feature cache.** Plain sklearn tools call ``fit`` and ``predict`` many times on
    subsets of the same data. With the cache on, across a whole ``GridSearchCV``,
    ``cross_validate`` or ``learning_curve`` (all folds, all candidates, train and test sides
    and the final refit) the extractor runs on each distinct sample at most once per process,
    plus twice on the first sample alone for a model it has not seen yet (the determinism probe,
    :class:`CacheKeyWarning`; tested by counting the rows the extractor sees), and the
    moments of a training set are computed once for all candidates of a fold. The default,
    ``cache="auto"``, does this for every extractor that is worth it: hashing, indexing and
    storing a row costs about as much as running a small MLP on it, so for such an extractor
    a cache would make every fit slower. The first fit of a model in a process therefore
    measures the extractor's time on the first batch plus the estimator's work on those
    features, against the time the cache's own work takes on the same rows (hashing, sorting
    the keys, copying the rows, scaled to the whole of what the cache does). The model is
    cached from then on, that first batch included, only when the cache costs at most 30 % of
    computing the rows (``skl_transfer._cache.AUTO_SHARE``); otherwise that fit and every
    later fit of the model in the process run exactly as with ``cache=False``, without the
    determinism probe. :func:`clear_cache` forgets these choices. Concurrent threads fitting
    a model that is not yet measured wait for the first one to choose, so each row is still
    computed once. Choices are made from timings, so a model close to the threshold may be
    cached in one process and not in another. A cached feature is bitwise the one the
    extractor computed for that row, so a fit from the cache is identical to an uncached fit
    with the same batching (tested exactly); but float32 kernels can round a row's features
    differently in different batches (last bits, about 1e-7 relative), so a cached fit or
    search, whose rows were computed in other batches, agrees with an uncached one to that
    rounding, not bitwise (an ill-conditioned fit, alpha = 0 on few samples, magnifies it).
    With ``"auto"`` the choice, hence those last bits, can vary between runs; pass
    ``cache=True`` or ``cache=False`` for bitwise-reproducible results. ``cache="auto"``
    means the mode: name a directory called ``auto`` as ``"./auto"``; a directory is always
    used. ``partial_fit``, iterable and dask fits see each sample once and do not use the
    cache. What the keys cover and what they do not see: :class:`CacheKeyWarning`; memory:
    :func:`set_cache_limit`; a directory shared by processes, and who may write it:
    :class:`CacheDirectoryError`. What the cache costs is measured in ``benchmarks/README.md``.

    **method="perturb"** costs one forward pass of X (the target features, cached like
    those of "exact") and one forward-mode pass of X_source (about two to three forward
    passes; not cached, as it depends on the pair). The paper's code builds ``J_f`` by
    forward finite differences, one network evaluation per input coordinate and sample. For
    an affine extractor it equals ``method="exact"`` (tested, and against central finite
    differences to 1e-4). The source arrays are sample-aligned fit metadata: with metadata
    routing enabled and ``set_fit_request(X_source=True, y_source=True)``, ``Pipeline``,
    ``GridSearchCV`` and ``cross_validate`` pass them on and split them with X; but a
    Pipeline transforms X only: with preprocessing steps before the adapter, put the
    preprocessing in the extractor instead, so that X and X_source see the same map.
    ``partial_fit`` takes the same arguments; dask arrays, iterables of batches and
    :class:`LayerVariationalAdapterCV` do not support ``method="perturb"`` (clear errors).
    Missing, unpaired or mis-shaped source arrays, and source arrays given to
    ``method="exact"``, are refused with a ``ValueError``.

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

    With a torch network: its body as the extractor, its last layer as the head.

    >>> import torch
    >>> body = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU())
    >>> head = torch.nn.Linear(8, 1)
    >>> X = rng.normal(size=(40, 3)).astype(np.float32)
    >>> adapter = LayerVariationalAdapter(body, head, alpha=1.0).fit(X, X.sum(axis=1))
    >>> adapter.predict(X[:2]).shape, adapter.solver_
    ((2,), 'primal')
    >>> adapter.to_module()(torch.from_numpy(X[:2])).shape  # the adapted network
    torch.Size([2, 1])
    """

    _parameter_constraints: dict = {
        **BaseAdapter._parameter_constraints,
        "alpha": [Interval(Real, 0, None, closed="left")],
        "method": [StrOptions({"exact", "perturb"})],
        "alpha_body": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "warm_start": ["boolean"],
    }

    def __init__(
        self,
        extractor=None,
        head=None,
        *,
        alpha=1.0,
        alpha_body=0.0,
        max_iter=10,
        tol=1e-6,
        warm_start=False,
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
        self.alpha_body = alpha_body
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.method = method
        self.fit_intercept = fit_intercept
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.cache = cache

    _supports_conv = True
    _supports_block = True

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
        if is_block(self.head) and (_is_batch_iterable(X) or is_dask_array(X) or self.method != "exact"):
            raise ValueError(
                "A block head is fitted from arrays held in memory with method='exact'; pass X as an "
                "array or tensor (a DataLoader or dask array streams one layer's moments only), or "
                "adapt the block's last Linear alone."
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
        if isinstance(spec.geometry, BlockGeometry):
            Z, Y, s = gather_design(p.batches, p.Y, p.s, spec.geometry, spec.feature_shape)
            spec, solution = self._fit_block(
                p, Z, Y, s, self.alpha, self.alpha_body, self.max_iter, self.tol, self.warm_start
            )
            self._log(f"{p.n_samples} samples, {spec.geometry.n_layers} layers, {solution.solver}: "
                      f"{self.n_iter_} steps, {time.perf_counter() - p.t0:.3f}s")  # fmt: skip
            self._store(spec, p.X, p.net, p.digest, solution)
            self.n_samples_seen_ = p.n_samples
            self._moments_method = self.method
            self._set_terms(None)
            return self
        self.n_iter_ = 1  # one closed-form solve
        self.__dict__.pop("loss_curve_", None)  # a block fit's, when head changed since
        self.__dict__.pop("_block_start", None)
        residue = None
        if perturb:
            X_source, Y_source = self._check_source(p.X, p.Y, spec, X_source, y_source)
            residue = PerturbResidue(
                p.net, p.X, X_source, p.Y, Y_source, p.s, spec.W0, spec.b0, spec.geometry, spec.feature_shape
            )
        # The design rows stay available for the solver (features: X itself; an extractor's:
        # the batches, kept by reference while n_rows x d fits DATA_MAX_ENTRIES), so that an
        # ill-conditioned primal problem can be re-solved from them; a perturb residue is
        # streamed once (its terms are summed as it goes): the dual solve gathers it.
        small = p.shape[0] * spec.d <= _solvers.DATA_MAX_ENTRIES
        tapped, streamed = [], []
        if small and residue is None and p.net is not None:

            def tap(batches):
                for batch in batches:
                    tapped.append(batch)
                    yield batch

            p.batches = tap(p.batches)

        def moments():
            streamed.append(True)
            return self._primal_moments(p, residue)

        def design():
            if streamed and (residue is not None or not small):
                return None
            if p.net is None and residue is None:
                return p.X, p.Y - p.X @ spec.W0.T - spec.b0, p.s
            # moments from the cache leave the stream unread: read it now (cached rows)
            Z, T, w = gather_design(
                iter(tapped or p.batches), p.Y, p.s, spec.geometry, spec.feature_shape, residue
            )
            return Z, (T if residue is not None else T - Z @ spec.W0.T - spec.b0), w

        solution = _solvers.solve(
            self.alpha, spec.fit_intercept, p.shape, spec.feature_eps, moments=moments, design=design
        )
        tapped.clear()
        self._log(
            f"{p.n_samples} samples, {spec.d} features, {solution.solver} solve: "
            f"features{' and jvp' if perturb else ''} and solve {time.perf_counter() - p.t0:.3f}s"
        )
        self._store(spec, p.X, p.net, p.digest, solution, p.targets)
        self.n_samples_seen_ = p.n_samples
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
            entry = moments if residue is None else _PerturbMoments(moments, dict(residue.terms_sq))
            if key is not None:
                p.cached.put_moments(key, entry)
        if residue is None:
            return entry
        residue.terms_sq.update(entry.terms_sq)
        return entry.moments

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
        solution = _solvers.solve(
            self.alpha,
            spec.fit_intercept,
            (n * spec.rows_per_sample, spec.d),
            spec.feature_eps,
            moments=moments,
        )
        self._store(spec, X, p.net, p.digest, solution)
        self.n_samples_seen_ = n
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
        stream = None
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                raise TypeError(
                    "Each batch of an iterable X must be a tuple (X, y) or (X, y, sample_weight), "
                    f"got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                    + "."
                )
            Xb, yb, *swb = batch
            first = stream is None
            stream = self._accumulate(Xb, yb, swb[0] if swb else None, None, None, stream)
            if first:
                self._record_input(stream.X)  # later batches are checked against the first
        if stream is None:
            raise ValueError("The iterable X yielded no batches; pass at least one (X, y) batch.")
        self._finish(stream)
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
        self._finish(self._accumulate(X, y, sample_weight, X_source, y_source, self._stream()))
        return self

    def _stream(self):
        """The running state of a ``partial_fit`` sequence, or None before its first batch."""
        moments = self.__dict__.get("_moments")
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
        if moments is None:
            return None
        if getattr(self, "_moments_method", "exact") != self.method:
            raise ValueError(
                f"method changed to {self.method!r} between calls; the moments so far hold the "
                f"residue of method={self._moments_method!r}. Call fit (or partial_fit on a clone) "
                "to start again."
            )
        return _Stream(
            self._spec, self._extractor, self._runtime_extractor(), self._weights_digest, moments,
            self.n_samples_seen_, getattr(self, "_terms_sq", None), None, None,
        )  # fmt: skip

    def _accumulate(self, X, y, sample_weight, X_source, y_source, stream):
        """Merge a batch's moments into ``stream`` (a :class:`_Stream`, or None for the first
        batch, which sets the fit up as ``fit`` does); returns the new state. Batches are seen
        once: the feature cache, which would only fill memory, is not used."""
        perturb = self._uses_source(X_source, y_source)
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None; "
                "pass the batch's targets."
            )
        if is_block(self.head):
            raise ValueError(
                "partial_fit streams the moments of one layer's update; a block head is adapted "
                "from all its data at once: call fit on all batches together."
            )
        if stream is None:
            p = self._start(X, y, sample_weight, use_cache=False, allow_zero_weight=True)
            spec, X, Y, s, batches = p.spec, p.X, p.Y, p.s, p.batches
            stream = _Stream(spec, p.net, p.net, p.digest, None, 0, None, p.targets, X)
        else:
            spec = stream.spec
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
            if not is_auto(self.head):  # ("auto" names the layer found at the first call)
                prior = self._prior()
                if not all(
                    (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
                    for a, b in ((prior.W0, spec.prior.W0), (prior.b0, spec.prior.b0))
                ):
                    raise ValueError(
                        "head changed between partial_fit calls; the moments so far hold the "
                        "residue of the earlier head. Call fit (or partial_fit on a clone) to start "
                        "again with this head."
                    )
            s = check_sample_weight(sample_weight, X.shape[0], allow_all_zero=True)
            batches = self._features(stream.runtime, X, use_cache=False)
        residue = None
        if perturb:
            X_source, Y_source = self._check_source(X, Y, spec, X_source, y_source)
            residue = PerturbResidue(
                stream.runtime,
                X,
                X_source,
                Y,
                Y_source,
                s,
                spec.W0,
                spec.b0,
                spec.geometry,
                spec.feature_shape,
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
            blas=stream.runtime is None,
        )
        moments = m if stream.moments is None else _solvers.merge_moments(stream.moments, m)
        if not moments.weight > 0:
            raise ValueError(
                "All samples seen so far by partial_fit have zero sample_weight; the update "
                "needs at least one positively weighted sample."
            )
        terms_sq = None
        if residue is not None:
            terms_sq = residue.terms_sq
            if stream.terms_sq is not None:
                terms_sq = {name: stream.terms_sq[name] + v for name, v in terms_sq.items()}
        first = stream.moments is None
        return stream._replace(
            moments=moments,
            n_seen=stream.n_seen + X.shape[0],
            terms_sq=terms_sq,
            targets=stream.targets if first else None,  # diagnostics: a fit that saw all in one call
            X=X,
        )

    def _finish(self, stream):
        """Solve the moments of a ``partial_fit`` sequence or a streamed fit, and store."""
        spec = stream.spec
        solution = _solvers.solve(
            self.alpha,
            spec.fit_intercept,
            (stream.n_seen * spec.rows_per_sample, spec.d),
            spec.feature_eps,
            moments=stream.moments,
        )
        self._store(spec, stream.X, stream.net, stream.digest, solution, stream.targets)
        self.n_samples_seen_ = stream.n_seen
        self._moments_method = self.method
        self._set_terms(stream.terms_sq)


class _Stream(NamedTuple):
    """The running state of a sequence of batches (``partial_fit``, a streamed ``fit``)."""

    spec: object  # HeadSpec
    net: object  # the frozen extractor to store (None without one)
    runtime: object  # the extractor on the compute device
    digest: object
    moments: object  # merged Moments so far, or None before the first batch
    n_seen: int
    terms_sq: dict | None  # method="perturb": the residue terms' squared norms so far
    targets: object  # TargetStats of the first batch (diagnostics_ after a single batch)
    X: object  # the last batch (its input shape is recorded)
