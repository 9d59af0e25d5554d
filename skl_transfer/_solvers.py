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

from typing import NamedTuple

import numpy as np
from scipy import linalg


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


def batch_moments(Z, Q, s):
    """Centred weighted moments of one batch (exact two-pass within the batch).

    Written with array operators only, so that it runs on numpy arrays and, unchanged,
    on float64 torch tensors on the extractor's device. A batch of zero total weight
    gives zero moments (and merges as the identity).
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
    """``A = V diag(e) V^T`` with the mask of eigenvalues above the noise threshold."""

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


def spectral(A, rtol=None):
    """Eigendecomposition of a symmetric positive semi-definite matrix, negative rounding clipped."""
    if rtol is None:
        rtol = gram_rtol(A.shape)
    e, V = linalg.eigh(A, check_finite=False)
    e = np.clip(e, 0.0, None)
    e_max = e[-1] if e.size else 0.0
    return Spectral(e, V, e > rtol * e_max if e_max > 0 else np.zeros(e.shape, dtype=bool))


# Cholesky is used when alpha >= CHOLESKY_MIN * trace(A) >= CHOLESKY_MIN * e_max: directions at
# the rounding-noise level (eigenvalue ~ eps * e_max, right-hand side ~ eps) then move the
# solution by at most eps / CHOLESKY_MIN ~ 1e-9 relative, the same as dropping them.
CHOLESKY_MIN = 1e-7


def solve_gram(A, R, alpha, rtol=None):
    """``X = (A + alpha I)^+ R`` for a symmetric positive semi-definite ``A``.

    Through ``A = V diag(e) V^T``: ``X = V diag(1 / (e + alpha)) V^T R`` over the eigenvalues
    above ``rtol * max(e)``, the others treated as zero; at ``alpha = 0`` this is
    ``pinv(A) R``, the minimum-norm solution, never inf or NaN. When alpha dominates the
    noise level (``alpha >= CHOLESKY_MIN * trace(A)``), a Cholesky solve of ``A + alpha I``
    gives the same result about 8 times faster.
    """
    if alpha > 0 and alpha >= CHOLESKY_MIN * np.trace(A):
        try:
            c = linalg.cho_factor(A + alpha * np.eye(A.shape[0]), lower=True, check_finite=False)
            return linalg.cho_solve(c, R, check_finite=False)
        except linalg.LinAlgError:  # pragma: no cover - alpha > 0 makes A + alpha I definite
            pass
    sp = spectral(A, rtol)
    return sp.V @ (sp.weights(alpha)[:, None] * (sp.V.T @ R))


def ridge_primal(moments, alpha, fit_intercept, rtol=None):
    """Ridge update from the d x d normal equations.

    ``dW^T = (G + alpha I)^{-1} B`` with centred moments and ``db = m_q - m_z dW^T``
    when the intercept is fitted; uncentred moments and ``db = 0`` otherwise.

    Returns ``(dWt, db, residual_sq)`` where ``residual_sq`` is the weighted
    squared residual ``qq - 2 tr(dW B) + tr(dW G dW^T)`` after the update. Computed from the
    moments, it is exact up to cancellation: about ``eps * qq`` in absolute terms, so a
    near-zero residual reads as 0.
    """
    if fit_intercept:
        G, B, qq = moments.G, moments.B, moments.qq
    else:
        G, B, qq = uncentred(moments)
    dWt = solve_gram(G, B, alpha, rtol)
    residual_sq = qq - 2.0 * np.vdot(dWt, B) + np.vdot(dWt, G @ dWt)
    db = moments.mean_q - moments.mean_z @ dWt if fit_intercept else np.zeros(B.shape[1])
    return dWt, db, max(float(residual_sq), 0.0)


def ridge_dual(Z, Q, s, alpha, fit_intercept, rtol=None):
    """Ridge update from the n x n kernel, for fewer samples than features.

    With ``A = diag(sqrt(s)) Z_c`` and ``R = diag(sqrt(s)) Q_c`` (centred by the weighted
    means when the intercept is fitted): ``dW^T = A^T (A A^T + alpha I)^{-1} R``, which
    equals ``(A^T A + alpha I)^{-1} A^T R``; at ``alpha = 0``, ``A^T pinv(A A^T) R = pinv(A) R``.

    Returns ``(dWt, db, residual_sq)`` like :func:`ridge_primal`.
    """
    S = s.sum()
    if fit_intercept:
        mean_z = s @ Z / S
        mean_q = s @ Q / S
        Zc, Qc = Z - mean_z, Q - mean_q
    else:
        Zc, Qc = Z, Q
    r = np.sqrt(s)[:, None]
    A, R = r * Zc, r * Qc
    K = A @ A.T
    c = solve_gram(K, R, alpha, rtol)
    dWt = A.T @ c
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


def moments_path(m, alphas, fit_intercept, rtol=None):
    """Ridge updates ``(dWt, db)`` from one set of moments for every alpha.

    One eigendecomposition of ``G``, then ``O(d^2 k)`` per alpha; equal to
    :func:`ridge_primal` at each alpha.
    """
    G, B = (m.G, m.B) if fit_intercept else uncentred(m)[:2]
    sp = spectral(G, rtol)
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
            if is_complement(train, test, n):
                m = subtract_moments(total, batch_moments(Zte, Q[test], s[test]))
            else:
                m = batch_moments(Z[train], Q[train], s[train])
            for j, (dWt, db) in enumerate(moments_path(m, alphas, fit_intercept, rtol)):
                yield fold, j, Zte @ dWt + db
        else:
            Ztr, Qtr, str_ = Z[train], Q[train], s[train]
            Zc, Qc, mean_z, mean_q = _centre(Ztr, Qtr, str_, fit_intercept)
            r = np.sqrt(str_)[:, None]
            A, R = r * Zc, r * Qc
            sp = spectral(A @ A.T, rtol)
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
        sp = spectral(A.T @ A, rtol)
        U = Zc @ sp.V  # fitted values are U diag(w) V^T B
        UtR = sp.V.T @ (A.T @ (r * Qc))
        U2s = (U * U) * s[:, None]
    else:
        A = r * Zc
        sp = spectral(A @ A.T, rtol)
        U = Zc @ (A.T @ sp.V)  # fitted values Z_c dW^T = Z_c A^T V diag(w) V^T R
        UtR = sp.V.T @ (r * Qc)
        U2s = sp.V * sp.V * sp.e
    for j, alpha in enumerate(alphas):
        w = sp.weights(alpha)
        fitted = U @ (w[:, None] * UtR)
        h = base + U2s @ w
        resid = (Qc - fitted) / (1.0 - h)[:, None]
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
    (about 10 times faster at k e = 1290). With ``alpha = 0`` (every shift of the k weight rows
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


def multinomial_newton(Z, yidx, s, W0, b0, alpha, fit_intercept, max_iter=20, tol=1e-8, rtol=None):
    """Penalised multinomial logistic regression by Newton's method, started at the prior.

    Minimises :func:`log_loss_objective`. With augmented rows ``x_i = [z_i, 1]`` (the 1 only
    when the intercept is fitted), class probabilities ``p_i`` and ``A_i = diag(p_i) - p_i p_i^T``,
    the Hessian is ``sum_i s_i A_i (x) x_i x_i^T + 2 alpha I`` (on W only) and each step solves
    it in closed form (pseudo-inverse: the softmax is invariant to a common shift of the
    logits, so the bias block is singular). A step moves no logit by more than
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
    converged, n_iter = False, 0
    while n_iter < max_iter:
        n_iter += 1
        W, b = split(theta)
        P = _softmax(Z @ W.T + b)
        G = ((P - Y) * s[:, None]).T @ X + 2 * alpha * pen * (theta - np.hstack([W0, b0[:, None]])[:, :e])
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
