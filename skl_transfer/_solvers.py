"""Pure numerical core of layer variational analysis (no torch, no sklearn).

Everything here works on float64 numpy arrays in the notation of the paper
(Tseng et al., ICLR 2023):

* ``Z`` (n, d): features of the frozen extractor, one row per sample;
* ``Q`` (n, k): transferal residue ``Y - (Z W0^T + b0)``;
* ``s`` (n,): non-negative sample weights;
* ``dWt`` (d, k): the update of the head, transposed (``dW^T``).

The update solves

.. math::

    \\min_{\\Delta W, \\Delta b} \\sum_i s_i \\| z_i \\Delta W^T + \\Delta b - q_i \\|^2
    + \\alpha \\| \\Delta W \\|_F^2 ,

with ``Delta b`` free (fitted) or fixed at zero. ``alpha = 0`` gives the minimum-norm
least-squares solution, ``pinv(Z) Q`` for a bias-free head (the paper's formula).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from scipy import linalg
from scipy.linalg import lapack
from threadpoolctl import ThreadpoolController


class Moments(NamedTuple):
    """Weighted sufficient statistics of a set of (z, q) rows.

    weight : float
        ``S = sum_i s_i``.
    mean_z : ndarray of shape (d,)
        ``m_z = sum_i s_i z_i / S``.
    mean_q : ndarray of shape (k,)
        ``m_q = sum_i s_i q_i / S``.
    G : ndarray of shape (d, d)
        ``sum_i s_i (z_i - m_z)(z_i - m_z)^T``.
    B : ndarray of shape (d, k)
        ``sum_i s_i (z_i - m_z)(q_i - m_q)^T``.
    qq : float
        ``sum_i s_i ||q_i - m_q||^2``.
    """

    weight: float
    mean_z: np.ndarray
    mean_q: np.ndarray
    G: np.ndarray
    B: np.ndarray
    qq: float

    @property
    def nbytes(self):
        """Bytes held by its arrays (an array viewing another counts that one, once)."""
        held = {}
        for a in (self.mean_z, self.mean_q, self.G, self.B):
            while isinstance(a.base, np.ndarray):
                a = a.base
            held[id(a)] = a.nbytes
        return sum(held.values())


def batch_moments(Z, Q, s):
    """Centred weighted moments of one batch of numpy rows (exact two-pass within the batch).

    Used for features held in memory (the classifier's and the CV estimator's design); the
    feature stream of an extractor is accumulated in place, on its device, by
    :func:`~skl_transfer._moments.accumulate_moments`. A batch of zero total weight gives zero
    moments (and merges as the identity).
    """
    S = float(s.sum())
    scale = S if S > 0 else 1.0
    mean_z = (s @ Z) / scale
    mean_q = (s @ Q) / scale
    r = s[:, None] ** 0.5
    A = (Z - mean_z) * r
    R = (Q - mean_q) * r
    # ``A.T @ A`` of one buffer: numpy computes it with a symmetric rank-k update (half the flops)
    return Moments(S, mean_z, mean_q, A.T @ A, A.T @ R, float((R * R).sum()))


def merge_moments(a, b):
    """Merge two sets of moments (Chan, Golub & LeVeque's pairwise update).

    With ``S = S_a + S_b`` and ``delta = m_b - m_a``: ``m = m_a + (S_b / S) delta`` and
    ``G = G_a + G_b + (S_a S_b / S) delta_z delta_z^T`` (likewise ``B`` and ``qq``).
    Array operators only, like :func:`batch_moments`.
    """
    if a.weight == 0.0:
        return b
    if b.weight == 0.0:
        return a
    S = a.weight + b.weight
    dz = b.mean_z - a.mean_z
    dq = b.mean_q - a.mean_q
    f = a.weight * b.weight / S
    return Moments(
        S,
        a.mean_z + (b.weight / S) * dz,
        a.mean_q + (b.weight / S) * dq,
        a.G + b.G + f * (dz[:, None] * dz[None, :]),
        a.B + b.B + f * (dz[:, None] * dq[None, :]),
        a.qq + b.qq + f * float(dq @ dq),
    )


def uncentred(m):
    """Moments about the origin: ``G + S m_z m_z^T``, ``B + S m_z m_q^T``, ``qq + S ||m_q||^2``."""
    S = m.weight
    return (
        m.G + S * np.outer(m.mean_z, m.mean_z),
        m.B + S * np.outer(m.mean_z, m.mean_q),
        m.qq + S * float(m.mean_q @ m.mean_q),
    )


def gram_rtol(shape, feature_eps=0.0):
    """Relative threshold below which eigenvalues of a Gram matrix are treated as zero.

    ``shape`` is the (n, d) shape of the feature matrix, ``feature_eps`` the machine epsilon
    of the dtype the features were computed in. Eigenvalues are squared singular values:
    float64 accumulation leaves noise of order ``max(n, d) * eps64 * e_max`` in them, and
    features rounded to ``feature_eps`` carry singular-value noise of order
    ``feature_eps * sigma_max``, that is eigenvalue noise of order ``feature_eps^2 * e_max``.
    The threshold is the larger of the two: feature directions weaker than
    ``sqrt(rtol) * sigma_max`` (about 1e-7 for float64 and float32 features, 1e-3 for
    float16) are treated as absent.
    """
    return max(max(shape) * np.finfo(np.float64).eps, feature_eps**2)


class Spectral(NamedTuple):
    """``A ~ V diag(e) V^T`` over the numerical range of ``A``, with the mask of usable eigenvalues.

    ``V`` has one column per eigenvalue kept by :func:`spectral` (at most ``A.shape[0]``)."""

    e: np.ndarray
    V: np.ndarray
    keep: np.ndarray

    def weights(self, alpha):
        """Diagonal of ``(A + alpha I)^{-1}`` in the eigenbasis, restricted to the kept
        eigenvalues (the pseudo-inverse at ``alpha = 0``). Directions at the noise level get
        weight 0 for every alpha, so the solution is continuous as alpha -> 0."""
        w = np.zeros_like(self.e)
        w[self.keep] = 1.0 / (self.e[self.keep] + alpha)
        return w


def zero_floor(diag_uncentred, rtol):
    """Per-column threshold below which a Gram diagonal entry is a zero variance.

    A column that is constant up to rounding keeps a centred variance of order
    ``eps^2`` times its uncentred second moment ``diag_uncentred``; equilibrated, it would
    look like a unit-scale direction of pure noise. Diagonal entries at most
    ``rtol^2 * diag_uncentred`` (``rtol`` from :func:`gram_rtol`, at least ``eps``) count as zero:
    the column gets coefficient 0.
    """
    return rtol**2 * np.asarray(diag_uncentred, dtype=np.float64)


def _active(A, floor):
    dg = np.diag(A)
    return np.flatnonzero(dg > (0.0 if floor is None else np.maximum(floor, 0.0)))


_LIMIT = {"controller": None, "depth": 0, "limiter": None}  # the one-BLAS-thread context's state
_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def one_blas_thread():
    """A context that runs BLAS and LAPACK on one thread (for small decompositions: OpenBLAS's
    threaded ``syevd`` and ``gesdd`` gain nothing below a few hundred rows and, with torch's
    threads still spinning after a forward pass, take two to three times longer).

    The limit is process-wide, so the contexts of several threads (GridSearchCV's threading
    backend) share one: the first to enter sets it and the last to leave restores the
    original, whatever their order. One ThreadpoolController is made on first use (making one
    scans the loaded libraries, which per call cost more than the eigendecomposition)."""
    with _LIMIT_LOCK:
        if _LIMIT["controller"] is None:
            _LIMIT["controller"] = ThreadpoolController()
        if _LIMIT["depth"] == 0:
            _LIMIT["limiter"] = _LIMIT["controller"].limit(limits=1, user_api="blas")
        _LIMIT["depth"] += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _LIMIT["depth"] -= 1
            if _LIMIT["depth"] == 0:
                _LIMIT["limiter"].restore_original_limits()
                _LIMIT["limiter"] = None


def _reset_limit_after_fork():
    global _LIMIT_LOCK
    _LIMIT_LOCK = threading.Lock()  # a fork while another thread held it leaves it held in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_limit_after_fork)


def gram(A, workers=1):
    """``A^T A`` (full, symmetric) of a C-ordered float64 array ``A`` of shape (n, D).

    With ``workers > 1``, the rows are split into that many blocks whose products (numpy's
    BLAS ``syrk`` for ``P^T P``, half a full product's flops) run at once in as many Python
    threads, each on one BLAS thread, and are summed: numpy releases the GIL in a product, and
    no BLAS worker thread is left spinning afterwards against torch's threads (which a
    threaded BLAS call does for a while, slowing the extractor's next forward pass by half
    on two cores; benchmarks/README.md, "Notes from development").
    """
    n = A.shape[0]
    workers = max(1, min(int(workers), n // 64))
    if workers == 1:
        return A.T @ A
    edges = np.linspace(0, n, workers + 1).astype(int)
    blocks = [A[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    with one_blas_thread(), ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda P: P.T @ P, blocks))
    out = parts[0]
    for P in parts[1:]:
        out += P
    return out


SMALL_DECOMPOSITION = 384  # spectral decompositions of at most this order run on one BLAS thread
# Cholesky factorisations of at most this order run on one BLAS thread: a few milliseconds,
# and no BLAS worker threads left spinning against the extractor's next forward pass
SMALL_CHOLESKY = 1024


def spectral(A, rtol=None, floor=None):
    """Scale-invariant eigendecomposition of a symmetric positive semi-definite Gram matrix.

    Two stages. (1) The matrix is equilibrated by its diagonal, ``At = D^{-1/2} A D^{-1/2}``
    (unit diagonal; entries of ``A`` round relative to ``sqrt(A_ii A_jj)``, so nothing is
    lost), and the eigenvalues of ``At`` below ``rtol * max`` are noise: the numerical null
    space is judged relative to each direction's own scale, not to the largest column.
    (2) On the kept directions, ``A ~ F F^T`` with ``F = D^{1/2} V_k E_k^{1/2}``; the singular
    value decomposition of ``F`` (never of ``F^T F``, which would square its condition) gives
    the eigenvectors of ``A`` on that range and eigenvalues accurate to about
    ``eps * sqrt(cond(A))`` relative. Columns whose diagonal is at most ``floor`` (zero
    variance, :func:`zero_floor`) are left out. The penalty stays ``alpha I`` in the original
    units, so one decomposition serves every alpha, and at ``alpha = 0`` the solution is the
    minimum-norm one in the original units (the null space is ``D^{-1/2}`` times that of ``At``).
    """
    n = A.shape[0]
    if rtol is None:
        rtol = gram_rtol(A.shape)
    idx = _active(A, floor)
    if idx.size == 0:
        return Spectral(np.zeros(0), np.zeros((n, 0)), np.zeros(0, dtype=bool))
    h = np.sqrt(np.diag(A)[idx])
    At = A[np.ix_(idx, idx)] / h[:, None] / h[None, :]
    with _small(idx.size, SMALL_DECOMPOSITION):
        E, V = linalg.eigh(At, check_finite=False)
        E = np.clip(E, 0.0, None)
        keep = E > rtol * E[-1] if E[-1] > 0 else np.zeros(E.shape, dtype=bool)
        F = h[:, None] * (V[:, keep] * np.sqrt(E[keep]))
        order = np.argsort(-h)  # rows in decreasing scale: Householder steps then keep the grading
        U, sig, _ = linalg.svd(F[order], full_matrices=False, check_finite=False)
    Vfull = np.zeros((n, sig.size))
    Vfull[idx[order]] = U
    e = sig**2
    return Spectral(e, Vfull, e > 0)


# Cholesky is used when the Gram matrix plus ``alpha I``, equilibrated to a unit diagonal, has a
# condition number (LAPACK's 1-norm estimate) of at most 1 / CHOLESKY_MIN: directions at the
# rounding-noise level (equilibrated eigenvalue ~ eps, right-hand side ~ eps) then move the
# solution by at most eps / CHOLESKY_MIN ~ 1e-9 relative, the same as dropping them, and the
# solution itself is accurate to about that. Otherwise the eigendecomposition drops the noise.
CHOLESKY_MIN = 1e-7
# With the data in memory, a problem whose equilibrated condition exceeds this (where Cholesky
# is not used) is solved from the data (:func:`ridge_from_data`), which does not square the
# condition number, instead of by the eigendecomposition.
COND_DATA = 1.0 / CHOLESKY_MIN
# In-memory fits through an extractor keep their design rows (by reference) for that re-solve
# while n_rows x d is at most this many float64 entries (128 MiB).
DATA_MAX_ENTRIES = 2**24


# The Gram matrices' rounding, relative to n * max(diag): at most about N * 1.1e-16 for N rows,
# so this holds up to 9e9 rows (the bound of _rcond_floor is valid for alpha above twice it).
GRAM_ROUNDING = 1e-6


def _rcond_floor(c2, alpha, anorm):
    """A lower bound on the reciprocal 1-norm condition number of the equilibrated
    ``H = C^{-1} (A + alpha I) C^{-1}`` (``c2``: the diagonal of ``C^2``, ``diag(A) + alpha``;
    ``anorm``: ``||H||_1``), or 0.

    ``lambda_min(H) >= (alpha - ||dA||) / max(c2)`` for a Gram matrix ``A`` that is positive
    semi-definite up to its rounding ``dA`` (bounded by :data:`GRAM_ROUNDING`), and
    ``||H^{-1}||_1 <= sqrt(n) / lambda_min(H)``. LAPACK's ``dpocon`` estimates ``||H^{-1}||_1``
    from below, so its estimate of the reciprocal condition number is at least this bound: a
    threshold this bound passes, the estimate passes too.
    """
    n, top = c2.size, float(c2.max())
    margin = n * top * GRAM_ROUNDING
    if not alpha > 2.0 * margin:
        return 0.0
    return (alpha - margin) / (top * anorm * np.sqrt(n))


def _equilibrated_cholesky(A, alpha, idx, need=None):
    """The Cholesky factor of ``(A + alpha I)`` on the indices ``idx``, scaled to a unit diagonal
    (a change of variables: the penalty stays ``alpha I``): ``(L, c, rcond)`` with ``c`` the
    scale and ``rcond`` LAPACK's reciprocal condition estimate, or None when it fails. With
    ``need`` (the caller's threshold on ``rcond``), when the bound of :func:`_rcond_floor`
    already reaches it, ``rcond`` is that bound and LAPACK's estimate is not computed (the
    caller decides as it would have: the estimate is at least the bound)."""
    c2 = np.diag(A)[idx] + alpha
    c = np.sqrt(c2)
    H = (A if idx.size == A.shape[0] else A[np.ix_(idx, idx)]) / c[:, None]
    H /= c[None, :]
    H[np.diag_indices_from(H)] = 1.0
    anorm = np.abs(H).sum(axis=0).max()
    with _small(idx.size):
        L, info = lapack.dpotrf(H, lower=0, clean=1)
        if info != 0:
            return None
        if need is not None:
            floor = _rcond_floor(c2, alpha, anorm)
            if floor >= need:
                return L, c, float(floor)
        rcond, info = lapack.dpocon(L, anorm)
    if info != 0 or not np.isfinite(rcond):  # pragma: no cover - LAPACK argument errors
        return None
    return L, c, float(rcond)


def _small(order, limit=SMALL_CHOLESKY):
    """One BLAS thread for the work on a matrix of order at most ``limit``; else no limit."""
    return one_blas_thread() if order <= limit else contextlib.nullcontext()


def _factor_solve(L, c, R):
    """``X`` from the factor of :func:`_equilibrated_cholesky`: ``(A + alpha I) X = R`` on its
    indices, ``R`` already restricted to them; None when LAPACK reports an error."""
    with _small(L.shape[0]):
        x, info = lapack.dpotrs(L, R / c[:, None], lower=0)
    return None if info != 0 else x / c[:, None]


def _scaled_cholesky(A, R, alpha, idx, need=None):
    """``(A + alpha I) X = R`` on the indices ``idx`` by :func:`_equilibrated_cholesky`
    (``need``: passed on). Returns ``(X, rcond)``; ``X`` is None when the factorisation fails."""
    factor = _equilibrated_cholesky(A, alpha, idx, need)
    if factor is None:
        return None, 0.0
    L, c, rcond = factor
    x = _factor_solve(L, c, R[idx])
    if x is None:  # pragma: no cover - LAPACK argument errors
        return None, 0.0
    return x, rcond


def solve_gram(A, R, alpha, rtol=None, floor=None, return_cond=False, fallback=True):
    """``X = (A + alpha I)^+ R`` for a symmetric positive semi-definite ``A``, scale-invariantly.

    Columns whose diagonal is at most ``floor`` (zero variance) get ``X = 0``. The others are
    solved by a Cholesky factorisation of ``A + alpha I`` equilibrated to a unit diagonal when
    its condition estimate is at most ``1 / CHOLESKY_MIN`` (the common case, alpha = 0
    included); otherwise through :func:`spectral`: eigenvalues of the equilibrated matrix below
    ``rtol * max`` are treated as zero, the rest solved exactly with the penalty ``alpha I``
    in the original units (at ``alpha = 0`` the minimum-norm solution, never inf or NaN).

    With ``return_cond``, also returns the condition estimate of the equilibrated
    ``A + alpha I`` (inf when Cholesky failed), which tells the caller whether solving from the
    data would be more accurate. ``fallback=False``: ``X`` is None instead of the
    eigendecomposition when Cholesky is not accurate enough (the caller has a better way).
    """
    X = np.zeros((A.shape[0],) + R.shape[1:])
    idx = _active(A, floor)
    cond = 1.0
    if idx.size:
        # (with return_cond, LAPACK's estimate itself; else a bound that settles the choice)
        x, rcond = _scaled_cholesky(A, R, alpha, idx, None if return_cond else CHOLESKY_MIN)
        cond = 1.0 / rcond if rcond > 0 else np.inf
        if x is not None and rcond >= CHOLESKY_MIN:
            X[idx] = x
        elif not fallback:
            X = None
        else:
            sp = spectral(A, rtol, floor)
            X = sp.V @ (sp.weights(alpha)[:, None] * (sp.V.T @ R))
    return (X, cond) if return_cond else X


def _design(Z, Q, s, fit_intercept):
    """Weighted (centred) design and residue: ``diag(sqrt(s)) Z_c``, ``diag(sqrt(s)) Q_c``, means."""
    Zc, Qc, mean_z, mean_q = _centre(Z, Q, s, fit_intercept)
    if bool(np.all(s == 1.0)):  # unit weights (the common case): no weighted copy
        return Zc, Qc, mean_z, mean_q
    r = np.sqrt(s)[:, None]
    return r * Zc, r * Qc, mean_z, mean_q


def _lifts(lift, tol, sv_max):
    """Whether a penalty of ``lift`` (in the equilibrated design's eigenvalue units) keeps
    directions at the noise level ``tol * sv_max`` (singular values) from moving the solution by
    more than about ``CHOLESKY_MIN`` relative: as :func:`solve_gram`'s rule for Cholesky."""
    return lift * CHOLESKY_MIN >= tol * sv_max**2


# A Cholesky factor of the equilibrated ``G + alpha I`` preconditions the refinement against the
# rows when LAPACK's reciprocal condition estimate is at least this many times ``d * rtol``:
# the estimate is of the 1-norm condition, within a factor d of the 2-norm one (and, in
# practice, within a few of the truth), so the smallest eigenvalue is then above the spectral
# threshold ``rtol`` and no direction is one that :func:`spectral` would drop.
CHOLESKY_PRECONDITION = 10.0


def _cholesky_correction(G, alpha, floor, rtol):
    """``g -> (G + alpha I)^{-1} g`` on the active columns (0 elsewhere) by a Cholesky factor
    of the equilibrated matrix, or None when the factorisation fails or the condition
    estimate is too close to the spectral threshold (see :data:`CHOLESKY_PRECONDITION`)."""
    idx = _active(G, floor)
    if idx.size == 0:
        return None
    if rtol is None:
        rtol = gram_rtol(G.shape)
    need = CHOLESKY_PRECONDITION * idx.size * rtol
    factor = _equilibrated_cholesky(G, alpha, idx, need)
    if factor is None or not factor[2] >= need:
        return None
    L, c, _ = factor

    def correct(g):
        x = np.zeros((G.shape[0],) + g.shape[1:])
        x[idx] = _factor_solve(L, c, g[idx])
        return x

    return correct


def _refined(A, R, alpha, G=None, rtol=None, floor=None, max_iter=50):
    """Ridge solution by iterative refinement of the normal equations against the rows (see
    :func:`ridge_from_data`); None when the spectrum drops a direction or it does not converge.

    The corrections are solved by a Cholesky factor of the equilibrated ``G + alpha I`` when
    its condition is safely above the spectral threshold (one factorisation: a tenth of a
    second at d = 2048), else by :func:`spectral` (an eigendecomposition and a singular value
    decomposition of order d: seconds at d = 2048). Both give the solution of the rows'
    least-squares problem to the attainable accuracy; they differ in cost only."""
    if G is None:
        G = A.T @ A
    correct = _cholesky_correction(G, alpha, floor, rtol)
    if correct is None:
        sp = spectral(G, rtol, floor)
        if sp.e.size < _active(G, floor).size or sp.e.size == 0:
            return None  # thresholded directions: a refinement would not reach them
        w = 1.0 / (sp.e + alpha)

        def correct(g):
            return sp.V @ (w[:, None] * (sp.V.T @ g))

    x = correct(A.T @ R)
    prev = np.inf
    for _ in range(max_iter):
        dx = correct(A.T @ (R - A @ x) - alpha * x)
        x += dx
        step, size = np.linalg.norm(dx), np.linalg.norm(x)
        if step <= 4 * np.finfo(np.float64).eps * size:
            return x
        if step > 0.5 * prev:  # stagnating: at the attainable accuracy, or diverging
            return x if step <= 1e-11 * size else None
        prev = step
    return None


def ridge_from_data(Z, Q, s, alpha, fit_intercept, tol=None, floor=None, rtol=None, G=None):
    """The ridge update solved from the design rows, without forming a Gram matrix.

    With ``A = diag(sqrt(s)) Z_c`` and ``R = diag(sqrt(s)) Q_c``, as the svd solver of
    ``Ridge`` works, so that the condition number is not squared:

    * ``n >= d``: iterative refinement first: starting from the Gram solution, each step
      computes the residual of the normal equations from the rows, ``A^T (R - A x) - alpha x``
      (so the attained accuracy is that of the data, not of the squared condition), and
      corrects ``x`` by the scale-invariant spectral solve (:func:`spectral` of ``G``, given or
      ``A^T A``; ``rtol`` its threshold). A few ``O(n d k)`` steps where the Gram matrix's
      condition is below about ``1 / eps``. When the spectrum drops directions or the steps do
      not converge, a Householder QR: the columns of ``A`` are equilibrated (``A D^{-1/2}``, an
      exact change of variables), the rows sorted by decreasing norm, and the least-squares problem
      ``[A D^{-1/2}; sqrt(alpha) D^{-1/2}] x = [R; 0]`` solved by Householder QR: a QR of ``A``,
      then of ``[R_A; sqrt(alpha) D^{-1/2}]`` (2d x d);
    * ``n < d``: the minimum-norm solution of ``[A, sqrt(alpha) I] w = R`` (whose first d
      entries are the ridge solution), by a QR of the transposed system with its rows
      equilibrated; at ``alpha = 0`` with rank-deficient rows, ``pinv(A) R`` from the singular
      values of ``A`` above ``tol`` times the largest.

    Returns ``dWt`` (d, k), or None when (``n >= d``) the equilibrated design is rank-deficient
    at the rounding level of the data (a singular value below ``tol`` times the largest, by default
    :func:`data_rtol`) and alpha does not lift those directions well above it: the thresholded
    Gram solution is then the one wanted. Columns whose squared norm is at most ``floor`` (zero
    variance) get 0.
    """
    n, d = Z.shape
    A, R, _, _ = _design(Z, Q, s, fit_intercept)
    if tol is None:
        tol = data_rtol((n, d))
    dWt = np.zeros((d, R.shape[1]))
    col = np.sqrt(np.einsum("ij,ij->j", A, A))
    idx = np.flatnonzero(col**2 > (0.0 if floor is None else np.maximum(floor, 0.0)))
    if idx.size == 0:
        return dWt
    h = col[idx]
    if n >= idx.size:
        x = _refined(A, R, alpha, G, rtol, floor)
        if x is not None:
            return x
        m, k = idx.size, R.shape[1]
        As = A[:, idx] / h
        order = np.argsort(-np.einsum("ij,ij->i", As, As), kind="stable")
        # R of the QR of [A_s, R] (Q never formed): its top-right block is Q^T R
        T = linalg.qr(np.hstack([As[order], R[order]]), mode="r", check_finite=False)[0]
        Ra, rhs = np.triu(T[:m, :m]), T[:m, m:]
        # unit columns: sigma_max of A_s is between 1 and sqrt(m); rank from the condition estimate
        rcond = lapack.dtrcon(Ra)[0] if np.all(np.diag(Ra) != 0) else 0.0
        full_rank = rcond > tol
        if alpha > 0:
            if not full_rank and not _lifts(alpha / h.max() ** 2, tol, np.sqrt(m)):
                return None  # alpha does not lift the noise directions: keep the thresholded solve
            aug = np.block([[Ra, rhs], [np.diag(np.sqrt(alpha) / h), np.zeros((m, k))]])
            Tb = linalg.qr(aug, mode="r", check_finite=False)[0]
            x = linalg.solve_triangular(Tb[:m, :m], Tb[:m, m:], check_finite=False)
        else:
            if not full_rank:
                return None
            x = linalg.solve_triangular(Ra, rhs, check_finite=False)
        dWt[idx] = x / h[:, None]
        return dWt
    # fewer rows than columns: the minimum norm solution of [A, sqrt(alpha) I] w = R
    A = A[:, idx]
    rn = np.sqrt(np.einsum("ij,ij->i", A, A))
    ok = rn > 0
    sv = linalg.svdvals(A[ok] / rn[ok, None], check_finite=False) if ok.any() else np.zeros(1)
    full_rank = ok.all() and sv[-1] > tol * sv[0]
    exact = 1 if fit_intercept else 0
    if alpha > 0 and not full_rank and ok.any():
        # Rows of zero norm (zero weight, or equal to the mean) constrain nothing: dropped.
        # Centring leaves the rows one exact null direction u = sqrt(s) (A^T u = 0), which R
        # shares (R^T u = 0), and alpha I keeps [A, sqrt(alpha) I] of full row rank: only a
        # further small singular value is rank deficiency at the data's rounding. What rounding
        # leaves of A^T u and R^T u (about eps times the rows) moves the solution by about
        # n eps^2 max|a_i|^2 / alpha relative: u is ignored while alpha keeps that small.
        if not exact or _lifts(alpha / rn[ok].max() ** 2, ok.sum() * np.finfo(np.float64).eps ** 2, 1.0):
            A, R, rn = A[ok], R[ok], rn[ok]
            full_rank = sv.size > exact and sv[sv.size - 1 - exact] > tol * sv[0]
    if not full_rank:
        if alpha == 0:
            # rank-deficient rows: the minimum-norm least-squares solution in the original
            # units, from the singular values of the design (thresholded at tol, never squared)
            dWt[idx] = np.linalg.lstsq(A, R, rcond=tol)[0]
            return dWt
        if not _lifts(alpha / rn.max() ** 2, tol, sv[0]):
            return None  # alpha does not lift the noise directions: keep the thresholded solve
    C = np.hstack([A, np.sqrt(alpha) * np.eye(A.shape[0])]) if alpha > 0 else A
    cn = np.sqrt(np.einsum("ij,ij->i", C, C))
    Qc, Rc = linalg.qr((C / cn[:, None]).T, mode="economic", check_finite=False)  # rows scaled: same w
    w = Qc @ linalg.solve_triangular(Rc, R / cn[:, None], trans="T", check_finite=False)
    dWt[idx] = w[: idx.size]
    return dWt


def data_rtol(shape, feature_eps=0.0):
    """Relative threshold on the singular values of the design itself (the data path).

    Singular values computed from the data carry noise of order ``max(n, d) * eps64``
    (accumulation) or ``eps_f`` (features rounded to the extractor's dtype) times the largest:
    the square root of the Gram matrix's threshold :func:`gram_rtol` for float32 and float16
    features, far below it for float64 ones.
    """
    return max(max(shape) * np.finfo(np.float64).eps, feature_eps)


def _check_finite_moments(G, B):
    if not (np.isfinite(G).all() and np.isfinite(B).all()):
        raise ValueError(
            "The weighted moments of the features overflowed (inf or NaN): sample_weight or the "
            "features are too large (near 1e308 when multiplied together). Divide sample_weight by "
            "its maximum (the solution is unchanged if alpha is divided by the same factor), or "
            "rescale the features."
        )


def primal_floor(moments, rtol):
    """:func:`zero_floor` of the primal Gram matrix from its moments (uncentred diagonal)."""
    if rtol is None:
        rtol = gram_rtol((1, moments.G.shape[0]))
    return zero_floor(np.diag(moments.G) + moments.weight * moments.mean_z**2, rtol)


def ridge_primal(moments, alpha, fit_intercept, rtol=None, data=None, data_tol=None):
    """Ridge update from the d x d normal equations.

    ``dW^T = (G + alpha I)^{-1} B`` with centred moments and ``db = m_q - m_z dW^T``
    when the intercept is fitted; uncentred moments and ``db = 0`` otherwise; solved by
    :func:`solve_gram` (equilibrated, scale-invariant). ``data``: the design rows ``(Z, Q, s)``
    these moments were computed from, when they are in memory; where the equilibrated system
    is ill-conditioned (condition estimate above ``COND_DATA``, where Cholesky is not used) the
    update is solved from them (:func:`ridge_from_data`, singular values threshold
    ``data_tol``), and by the thresholded eigendecomposition otherwise. ``data`` may be a
    callable returning them (or None), called only then.

    Returns ``(dWt, db, residual_sq)`` where ``residual_sq`` is the weighted
    squared residual ``qq - 2 tr(dW B) + tr(dW G dW^T)`` after the update. Computed from the
    moments, it is exact up to cancellation: about ``eps * qq`` in absolute terms, so a
    near-zero residual reads as 0 (computed from the rows when they were used).
    """
    if fit_intercept:
        G, B, qq = moments.G, moments.B, moments.qq
    else:
        G, B, qq = uncentred(moments)
    _check_finite_moments(G, B)
    floor = primal_floor(moments, rtol)
    dWt = solve_gram(G, B, alpha, rtol, floor, fallback=data is None)
    if dWt is None:  # ill-conditioned even equilibrated: from the rows, when they are in memory
        data = data() if callable(data) else data
        better = (
            None if data is None else ridge_from_data(*data, alpha, fit_intercept, data_tol, floor, rtol, G)
        )
        if better is not None:
            Z, Q, s = data
            dWt = better
            db = (s @ Q) / s.sum() - ((s @ Z) / s.sum()) @ dWt if fit_intercept else np.zeros(B.shape[1])
            res = Q - Z @ dWt - db
            return dWt, db, float(s @ (res * res).sum(1))
        dWt = solve_gram(G, B, alpha, rtol, floor)
    db = moments.mean_q - moments.mean_z @ dWt if fit_intercept else np.zeros(B.shape[1])
    with _small(G.shape[0]):
        residual_sq = qq - 2.0 * np.vdot(dWt, B) + np.vdot(dWt, G @ dWt)
    return dWt, db, max(float(residual_sq), 0.0)


class Solution(NamedTuple):
    """One solve of the layer update: what the estimators store and what diagnostics need.

    dWt : ndarray of shape (d, k)
        The update of the head's ``coef^T``.
    db : ndarray of shape (k,)
        The update of its intercept.
    residue_sq : float
        ``sum_i s_i ||q_i||^2``: the weighted squared residue before the update.
    residual_sq : float
        The same after the update.
    solver : str
        ``"primal"`` (``d x d`` normal equations), ``"dual"`` (``n x n`` kernel), or the name
        of an iterative method for updates that are not a ridge solve.
    alpha : float or None
        The penalty solved with.
    rtol : float or None
        The eigenvalue threshold of the solve (:func:`gram_rtol`).
    moments : Moments or None
        A primal solve's moments (what ``partial_fit`` continues and diagnostics decompose).
    design : tuple or None
        A dual solve's ``(Z, Q, s)`` (fewer rows than features, so no larger than ``d x d``).
    """

    dWt: np.ndarray
    db: np.ndarray
    residue_sq: float
    residual_sq: float
    solver: str
    alpha: float | None = None
    rtol: float | None = None
    moments: Moments | None = None
    design: tuple | None = None


def use_primal(shape):
    """Whether a design of ``shape = (n_rows, d)`` is solved in the primal (``d x d``) form:
    at least as many rows as features; the dual (``n_rows x n_rows`` kernel) otherwise."""
    return shape[0] >= shape[1]


def residue_sq(moments):
    """``sum_i s_i ||q_i||^2`` from the moments (the uncentred ``qq``)."""
    return moments.qq + moments.weight * float(moments.mean_q @ moments.mean_q)


def solve(alpha, fit_intercept, shape, feature_eps=0.0, *, moments=None, design=None):
    """The ridge update of the residue ``Q`` on the design rows ``Z``: the one solver entry.

    ``shape = (n_rows, d)`` is the design's shape and ``feature_eps`` the machine epsilon of
    the dtype the features were computed in (they set the thresholds :func:`gram_rtol` and
    :func:`data_rtol`). The data come as ``moments`` (:class:`Moments`, or a callable that
    computes them from a stream) and/or ``design`` (``(Z, Q, s)`` in memory, or a callable
    returning it, or None when the rows are not kept). Owns the choice of the solver: the
    primal form (:func:`ridge_primal`, from the moments, or from ``design``'s rows when the
    system is ill-conditioned) for at least as many rows as features or when only moments are
    given; the dual form (:func:`ridge_dual`) otherwise. Only what the chosen form needs is
    computed: a callable is called at most once. The residue before the update is summed over
    the rows when they are in memory, and taken from the moments otherwise.

    Returns
    -------
    Solution
    """
    rtol, data_tol = gram_rtol(shape, feature_eps), data_rtol(shape, feature_eps)
    if use_primal(shape) or design is None:
        rows = None if design is None or callable(design) else design  # in memory
        m = moments() if callable(moments) else moments
        if m is None:
            rows = design = design() if callable(design) else design
            m = batch_moments(*design)
        dWt, db, res = ridge_primal(m, alpha, fit_intercept, rtol, data=design, data_tol=data_tol)
        before = residue_sq(m) if rows is None else float(rows[2] @ (rows[1] * rows[1]).sum(1))
        return Solution(dWt, db, before, res, "primal", alpha, rtol, moments=m)
    Z, Q, s = design() if callable(design) else design
    dWt, db, res = ridge_dual(Z, Q, s, alpha, fit_intercept, rtol, data_tol=data_tol)
    return Solution(dWt, db, float(s @ (Q * Q).sum(1)), res, "dual", alpha, rtol, design=(Z, Q, s))


def dual_floor(Z, s, rtol):
    """:func:`zero_floor` of the kernel ``A A^T`` (per sample: the uncentred row norm)."""
    if rtol is None:
        rtol = gram_rtol(Z.shape)
    return zero_floor(s * np.einsum("ij,ij->i", Z, Z), rtol)


def ridge_dual(Z, Q, s, alpha, fit_intercept, rtol=None, data_tol=None):
    """Ridge update from the n x n kernel, for fewer samples than features.

    With ``A = diag(sqrt(s)) Z_c`` and ``R = diag(sqrt(s)) Q_c`` (centred by the weighted
    means when the intercept is fitted): ``dW^T = A^T (A A^T + alpha I)^{-1} R``, which
    equals ``(A^T A + alpha I)^{-1} A^T R``; at ``alpha = 0``, ``A^T pinv(A A^T) R = pinv(A) R``.
    The kernel is solved like the primal Gram matrix (equilibrated, :func:`solve_gram`); where
    it is ill-conditioned, from the rows (:func:`ridge_from_data`).

    Returns ``(dWt, db, residual_sq)`` like :func:`ridge_primal`.
    """
    A, R, mean_z, mean_q = _design(Z, Q, s, fit_intercept)
    K = A @ A.T
    _check_finite_moments(K, R)
    floor = dual_floor(Z, s, rtol)
    c = solve_gram(K, R, alpha, rtol, floor, fallback=False)
    dWt = None if c is None else A.T @ c
    if dWt is None:  # ill-conditioned even equilibrated: from the rows
        dWt = ridge_from_data(Z, Q, s, alpha, fit_intercept, data_tol)
    if dWt is None:
        dWt = A.T @ solve_gram(K, R, alpha, rtol, floor)
    residual = R - A @ dWt
    db = mean_q - mean_z @ dWt if fit_intercept else np.zeros(Q.shape[1])
    return dWt, db, float(np.vdot(residual, residual))


# -- many alphas and many folds at the cost of one decomposition each ---------------------


def subtract_moments(total, part):
    """Moments of the rows of ``total`` that are not in ``part`` (the inverse of a merge).

    With ``S_a = S - S_b``: ``m_a = (S m - S_b m_b) / S_a`` and
    ``G_a = G - G_b - (S_a S_b / S) (m_b - m_a)(m_b - m_a)^T`` (likewise ``B`` and ``qq``).
    """
    S = total.weight - part.weight
    if S <= 1e-12 * total.weight:
        d, k = total.B.shape
        return Moments(0.0, np.zeros(d), np.zeros(k), np.zeros((d, d)), np.zeros((d, k)), 0.0)
    mean_z = (total.weight * total.mean_z - part.weight * part.mean_z) / S
    mean_q = (total.weight * total.mean_q - part.weight * part.mean_q) / S
    dz = part.mean_z - mean_z
    dq = part.mean_q - mean_q
    f = S * part.weight / total.weight
    return Moments(
        S,
        mean_z,
        mean_q,
        total.G - part.G - f * np.outer(dz, dz),
        total.B - part.B - f * np.outer(dz, dq),
        total.qq - part.qq - f * float(dq @ dq),
    )


def _centre(Z, Q, s, fit_intercept):
    if not fit_intercept:
        return Z, Q, np.zeros(Z.shape[1]), np.zeros(Q.shape[1])
    S = s.sum()
    mean_z, mean_q = s @ Z / S, s @ Q / S
    return Z - mean_z, Q - mean_q, mean_z, mean_q


def moments_path(m, alphas, fit_intercept, rtol=None, floor=None):
    """Ridge updates ``(dWt, db)`` from one set of moments for every alpha.

    One (scale-invariant) eigendecomposition of ``G``, :func:`spectral`, then ``O(d^2 k)`` per
    alpha; equal to :func:`ridge_primal` at each alpha. ``floor``: a larger zero-variance
    threshold than :func:`primal_floor` (moments obtained by subtraction carry more noise).
    """
    G, B = (m.G, m.B) if fit_intercept else uncentred(m)[:2]
    base = primal_floor(m, rtol)
    sp = spectral(G, rtol, base if floor is None else np.maximum(base, floor))
    VtB = sp.V.T @ B
    for alpha in alphas:
        dWt = sp.V @ (sp.weights(alpha)[:, None] * VtB)
        yield dWt, (m.mean_q - m.mean_z @ dWt if fit_intercept else np.zeros(B.shape[1]))


def is_complement(train, test, n):
    """Whether ``train`` and ``test`` split ``range(n)`` exactly (K-fold does; ShuffleSplit
    with a ``train_size`` need not)."""
    return len(train) + len(test) == n and np.union1d(train, test).size == n


def fold_atoms(folds, n):
    """Group the samples by their role in every fold (unused / train / test).

    Returns ``(roles, labels)``: ``roles[a, f]`` is 0, 1 or 2 for the samples of atom ``a`` in
    fold ``f``, and ``labels[i]`` is sample i's atom. A fold's training moments are the merge
    of its training atoms' moments, so one pass over the data serves every fold of any
    splitter (K folds make K atoms).
    """
    roles = np.zeros((n, len(folds)), dtype=np.int8)
    for f, (train, test) in enumerate(folds):
        roles[train, f] = 1
        roles[test, f] = 2
    patterns, labels = np.unique(roles, axis=0, return_inverse=True)
    return patterns, labels.reshape(-1)


def kfold_path(Z, Q, s, folds, alphas, fit_intercept, rtol=None):
    """Held-out predictions of the residue for every fold and every alpha.

    Yields ``(fold, j, Q_pred)``: ``Q_pred`` (n_test, k) predicts ``Q[test]`` with the update
    fitted on ``train`` with ``alphas[j]``. Per fold: when ``n_train >= d``, the training
    moments (for K-fold: the whole-data moments minus the held-out ones, no pass over the
    training rows), one eigendecomposition of ``G``, then ``O(d^2 k + n_test d k)`` per alpha;
    otherwise the dual: one eigendecomposition of the ``n_train x n_train`` kernel.
    """
    total = batch_moments(Z, Q, s)
    n, d = Z.shape
    for fold, (train, test) in enumerate(folds):
        Zte = Z[test]
        if len(train) >= d:
            floor = None
            if is_complement(train, test, n):
                m = subtract_moments(total, batch_moments(Zte, Q[test], s[test]))
                # a difference rounds relative to the whole data's moments: a column constant
                # on the training rows keeps a variance of order eps times the total's
                tot = np.diag(total.G if fit_intercept else uncentred(total)[0])
                floor = (rtol if rtol is not None else gram_rtol(Z.shape)) * tot
            else:
                m = batch_moments(Z[train], Q[train], s[train])
            for j, (dWt, db) in enumerate(moments_path(m, alphas, fit_intercept, rtol, floor)):
                yield fold, j, Zte @ dWt + db
        else:
            Ztr, Qtr, str_ = Z[train], Q[train], s[train]
            Zc, Qc, mean_z, mean_q = _centre(Ztr, Qtr, str_, fit_intercept)
            r = np.sqrt(str_)[:, None]
            A, R = r * Zc, r * Qc
            sp = spectral(A @ A.T, rtol, dual_floor(Ztr, str_, rtol))
            WtR = sp.V.T @ R
            cross = (Zte - mean_z) @ A.T @ sp.V  # test rows against the training kernel basis
            for j, alpha in enumerate(alphas):
                yield fold, j, cross @ (sp.weights(alpha)[:, None] * WtR) + mean_q


def loo_path(Z, Q, s, alphas, fit_intercept, rtol=None):
    """Leave-one-out predictions of the residue for every alpha (all alphas > 0).

    Yields ``(j, Q_loo)`` where row i of ``Q_loo`` (n, k) is the prediction of ``q_i`` by the
    update fitted on all other rows. With the hat-matrix diagonal of the weighted problem,
    ``h_i = s_i (1/S + z_ci^T (G + alpha I)^{-1} z_ci)`` (the ``1/S`` term only with an
    intercept), the leave-one-out residual is ``r_i / (1 - h_i)`` (Sherman-Morrison).
    One eigendecomposition (of ``G``, or of the kernel when n < d), then ``O(n d k)`` per alpha.
    """
    n, d = Z.shape
    Zc, Qc, mean_z, mean_q = _centre(Z, Q, s, fit_intercept)
    r = np.sqrt(s)[:, None]
    base = s / s.sum() if fit_intercept else np.zeros(n)
    if n >= d:
        A = r * Zc
        sp = spectral(
            A.T @ A, rtol, zero_floor(s @ (Z * Z), rtol if rtol is not None else gram_rtol(Z.shape))
        )
        U = Zc @ sp.V  # fitted values are U diag(w) V^T B
        UtR = sp.V.T @ (A.T @ (r * Qc))
        U2s = (U * U) * s[:, None]
    else:
        yield from _loo_dual(Zc, Qc, Q, s, r, base, alphas, fit_intercept, rtol, dual_floor(Z, s, rtol))
        return
    for j, alpha in enumerate(alphas):
        w = sp.weights(alpha)
        fitted = U @ (w[:, None] * UtR)
        h = base + U2s @ w
        resid = (Qc - fitted) / (1.0 - h)[:, None]
        yield j, Q - resid


def _loo_dual(Zc, Qc, Q, s, r, base, alphas, fit_intercept, rtol, floor):
    """:func:`loo_path` for fewer rows than columns, without cancellation.

    Near interpolation (small alpha against the kernel's eigenvalues) the residual
    ``R - K (K + alpha I)^{-1} R`` and ``1 - h`` are both tiny differences of numbers near
    ``R`` and 1, and rounding leaves them about ``eps / (alpha / e)`` relative error (1e-5
    in the score at alpha = 1e-8 on unit-scale features). Both are computed as what they
    equal instead: ``alpha (K + alpha I)^{-1} R = V diag(alpha / (e + alpha)) V^T R`` plus
    ``R``'s part outside the kept directions, and ``1 - h`` as the same diagonal plus the
    complement's. When the kept directions span all the weighted rows but the one exact null
    direction of centring (``sqrt(s)``, which ``R`` shares), that complement is exactly 0.
    Rows of zero weight (no part of the fit) keep the direct formula.
    """
    A, R = r * Zc, r * Qc
    sp = spectral(A @ A.T, rtol, floor)
    V, e = sp.V[:, sp.keep], sp.e[sp.keep]
    VtR = V.T @ R
    pos = s > 0
    comp = R - V @ VtR  # R outside the kept directions: left as it is by every fit
    cdiag = 1.0 - np.einsum("ij,ij->i", V, V) - base
    if V.shape[1] == int(pos.sum()) - (1 if fit_intercept else 0):
        comp[pos] = 0.0  # only sqrt(s) is left out (or nothing): R has no part there
        cdiag[pos] = 0.0
    # zero-weight rows (none, usually): fitted values Z_c A^T V diag(w) V^T R
    U = None if pos.all() else Zc[~pos] @ (A.T @ V)
    rs = r[pos, 0]
    for j, alpha in enumerate(alphas):
        shrink = alpha / (e + alpha)
        resid = np.empty_like(Qc)
        resid_w = V[pos] @ (shrink[:, None] * VtR) + comp[pos]
        resid[pos] = resid_w / rs[:, None] / (V[pos] ** 2 @ shrink + cdiag[pos])[:, None]
        if U is not None:
            resid[~pos] = Qc[~pos] - U @ (VtR / (e + alpha)[:, None])
        yield j, Q - resid


# -- the log loss: Newton steps, each a closed-form solve ------------------------------


def _softmax(L):
    L = L - L.max(axis=1, keepdims=True)
    E = np.exp(L)
    return E / E.sum(axis=1, keepdims=True)


def log_loss_objective(Z, yidx, s, W, b, W0, alpha):
    """``sum_i s_i (logsumexp(l_i) - l_{i, y_i}) + alpha ||W - W0||_F^2`` with ``l = Z W^T + b``."""
    L = Z @ W.T + b
    m = L.max(axis=1)
    lse = m + np.log(np.exp(L - m[:, None]).sum(axis=1))
    return float(s @ (lse - L[np.arange(len(yidx)), yidx]) + alpha * np.sum((W - W0) ** 2))


MAX_LOGIT_STEP = 5.0  # largest change of any logit in one Newton step


def _newton_step(H, G, alpha, fit_intercept, d, rtol):
    """``-pinv(H) G`` for the multinomial Hessian ``H`` (k e x k e) and gradient ``G`` (k, e).

    With ``alpha > 0`` the only null direction of ``H`` is a common shift ``u`` of the k
    intercepts (the softmax ignores it; unpenalised), and ``G`` is orthogonal to it (each
    sample's ``p - y`` sums to 0). Then ``(H + mu u u^T)`` is positive definite with the same
    solution on ``u``'s complement, and a Cholesky solve replaces the eigendecomposition
    (the speed-up is in benchmarks/README.md). With ``alpha = 0`` (every shift of the k weight rows
    is null) or when Cholesky fails, the eigendecomposition gives the pseudo-inverse.
    """
    k, e = G.shape
    if alpha > 0:
        A = H.copy()
        if fit_intercept:
            u = np.zeros((k, e))
            u[:, d] = 1.0 / np.sqrt(k)
            u = u.ravel()
            A += (np.trace(H) / H.shape[0]) * np.outer(u, u)
        try:
            return -linalg.cho_solve(linalg.cho_factor(A, check_finite=False), G.ravel()).reshape(k, e)
        except linalg.LinAlgError:
            pass
    return -solve_gram(H, G.reshape(-1, 1), 0.0, rtol).reshape(k, e)


DENSE_HESSIAN_BYTES = 32 << 20  # larger multinomial Hessians are never formed (Newton-CG)


def _newton_cg_step(X, P, s, G, penalty, intercept, alpha, forcing=1e-10):
    """``-pinv(H) G`` by conjugate gradients on Hessian-vector products, never forming ``H``.

    For a direction ``V`` (k, e) with logit changes ``L = X V^T``,
    ``H V = (s * (P * L - P * rowsum(P * L)))^T X + penalty * V``: memory O(n k + k e).
    ``H`` is positive semi-definite; its null directions are the common shifts that the
    softmax ignores: of the intercepts (column ``intercept``) when ``alpha > 0``, of whole
    rows of ``V`` when ``alpha = 0``. ``G`` is orthogonal to them, and every direction is
    projected off them (rounding would let the iterates drift along them), so the iteration
    converges to the minimum-norm solution, as the dense pseudo-inverse does. It stops when
    the residual is below ``forcing`` times the gradient (an inexact Newton step: Dembo,
    Eisenstat and Steihaug's forcing term, which shrinks with the gradient, keeps the
    outer iteration superlinear).
    """
    k, e = G.shape

    def off_null(v):
        V = v.reshape(k, e)
        if alpha == 0:
            V -= V.mean(axis=0, keepdims=True)
        elif intercept is not None:
            V[:, intercept] -= V[:, intercept].mean()
        return v

    def hess(v):
        V = v.reshape(k, e)
        PL = P * (X @ V.T)
        return (((PL - P * PL.sum(axis=1, keepdims=True)) * s[:, None]).T @ X + penalty * V).ravel()

    g = off_null(-G.ravel())
    x = np.zeros_like(g)
    r = g.copy()
    p = r.copy()
    rr = float(r @ r)
    stop = (forcing * np.sqrt(rr)) ** 2
    for _ in range(10 * k * e):
        if rr <= stop:
            break
        Hp = hess(p)
        curv = float(p @ Hp)
        if curv <= 0:  # a null direction of H: the solution has no part along it
            break
        a = rr / curv
        x += a * p
        r = off_null(r - a * Hp)
        rr, rr_old = float(r @ r), rr
        p = r + (rr / rr_old) * p
    return off_null(x).reshape(k, e)


def multinomial_newton(Z, yidx, s, W0, b0, alpha, fit_intercept, max_iter=20, tol=1e-8, rtol=None):
    """Penalised multinomial logistic regression by Newton's method, started at the prior.

    Minimises :func:`log_loss_objective`. With augmented rows ``x_i = [z_i, 1]`` (the 1 only
    when the intercept is fitted), class probabilities ``p_i`` and ``A_i = diag(p_i) - p_i p_i^T``,
    the Hessian is ``sum_i s_i A_i (x) x_i x_i^T + 2 alpha I`` (on W only) and each step solves
    it in closed form (pseudo-inverse: the softmax is invariant to a common shift of the
    logits, so the bias block is singular) where it fits in :data:`DENSE_HESSIAN_BYTES`, else
    by conjugate gradients on Hessian-vector products (:func:`_newton_cg_step`, O(n k + k e)
    memory). A step moves no logit by more than
    ``MAX_LOGIT_STEP`` and is halved until the objective decreases enough (Armijo); a point
    that does not decrease the objective is never accepted. Stops, converged, when a step
    changes no parameter by more than ``tol * (1 + max |parameter|)``.

    Returns ``(W, b, n_iter, converged)``.
    """
    n, d = Z.shape
    k = W0.shape[0]
    X = np.hstack([Z, np.ones((n, 1))]) if fit_intercept else Z
    e = X.shape[1]
    theta = np.hstack([W0, b0[:, None]]) if fit_intercept else W0.copy()
    Y = np.zeros((n, k))
    Y[np.arange(n), yidx] = 1.0
    pen = np.zeros((k, e))
    pen[:, :d] = 1.0

    def split(t):
        return (t[:, :d], t[:, d]) if fit_intercept else (t, b0)

    obj = log_loss_objective(Z, yidx, s, *split(theta), W0, alpha)
    converged, n_iter, g_first = False, 0, None
    while n_iter < max_iter:
        n_iter += 1
        W, b = split(theta)
        P = _softmax(Z @ W.T + b)
        G = ((P - Y) * s[:, None]).T @ X + 2 * alpha * pen * (theta - np.hstack([W0, b0[:, None]])[:, :e])
        if (k * e) ** 2 * 8 <= DENSE_HESSIAN_BYTES:
            H = np.empty((k, e, k, e))
            for a in range(k):
                for c in range(a, k):
                    w = s * (P[:, a] * ((a == c) - P[:, c]))
                    block = (X * w[:, None]).T @ X
                    H[a, :, c, :] = block
                    H[c, :, a, :] = block.T
            H = H.reshape(k * e, k * e)
            H[np.diag_indices_from(H)] += 2 * alpha * pen.ravel()
            step = _newton_step(H, G, alpha, fit_intercept, d, rtol)
        else:  # the k e x k e Hessian would not fit: conjugate gradients on its products
            g_norm = float(np.linalg.norm(G))
            g_first = g_first or g_norm
            forcing = min(0.1, np.sqrt(g_norm / g_first)) if g_first > 0 else 0.1
            step = _newton_cg_step(X, P, s, G, 2 * alpha * pen, d if fit_intercept else None, alpha, forcing)
        # Saturated probabilities make the Hessian nearly singular and the full step huge:
        # cap the step so that no logit moves by more than MAX_LOGIT_STEP, then backtrack
        # (Armijo) without ever accepting a worse point.
        moved = np.abs(X @ step.T).max()
        if moved > MAX_LOGIT_STEP:
            step *= MAX_LOGIT_STEP / moved
        slope = float(np.vdot(G, step))
        t, accepted = 1.0, False
        while t >= 2.0**-30:
            new = theta + t * step
            new_obj = log_loss_objective(Z, yidx, s, *split(new), W0, alpha)
            if new_obj <= obj + 1e-4 * t * slope:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        change = np.abs(new - theta).max()
        theta, obj = new, new_obj
        if change <= tol * (1 + np.abs(theta).max()):
            converged = True
            break
    W, b = split(theta)
    return W, np.asarray(b, dtype=np.float64), n_iter, converged
