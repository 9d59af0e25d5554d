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
    Zc = Z - mean_z
    Qc = Q - mean_q
    sZc = Zc * s[:, None]
    return Moments(S, mean_z, mean_q, sZc.T @ Zc, sZc.T @ Qc, float(s @ (Qc * Qc).sum(1)))


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


def _default_rtol(shape):
    # Eigenvalues of a Gram matrix are squared singular values; entries carry float64
    # rounding of order eps * trace, so eigenvalues below max(n, d) * eps * e_max are noise.
    return max(shape) * np.finfo(np.float64).eps


def solve_gram(A, R, alpha, rtol):
    """Solve ``(A + alpha I) X = R`` for a symmetric positive semi-definite ``A``.

    ``alpha > 0``: Cholesky (eigendecomposition if rounding makes it fail).
    ``alpha = 0``: ``X = pinv(A) R`` through ``A = V diag(e) V^T``, eigenvalues
    ``e <= rtol * max(e)`` treated as zero (minimum-norm solution, never inf or NaN).

    """
    n = A.shape[0]
    if alpha > 0:
        try:
            c = linalg.cho_factor(A + alpha * np.eye(n), lower=True, check_finite=False)
            return linalg.cho_solve(c, R, check_finite=False)
        except linalg.LinAlgError:
            pass
    e, V = linalg.eigh(A, check_finite=False)
    e_max = e[-1] if n else 0.0
    keep = e > rtol * e_max if e_max > 0 else np.zeros(n, dtype=bool)
    inv = np.zeros_like(e)
    if alpha > 0:
        inv = 1.0 / (np.clip(e, 0.0, None) + alpha)
    else:
        inv[keep] = 1.0 / e[keep]
    return V @ (inv[:, None] * (V.T @ R))


def ridge_primal(moments, alpha, fit_intercept, rtol=None):
    """Ridge update from the d x d normal equations.

    ``dW^T = (G + alpha I)^{-1} B`` with centred moments and ``db = m_q - m_z dW^T``
    when the intercept is fitted; uncentred moments and ``db = 0`` otherwise.

    Returns ``(dWt, db, residual_sq)`` where ``residual_sq`` is the weighted
    squared residual ``qq - 2 tr(dW B) + tr(dW G dW^T)`` after the update.
    """
    if fit_intercept:
        G, B, qq = moments.G, moments.B, moments.qq
    else:
        G, B, qq = uncentred(moments)
    if rtol is None:
        rtol = _default_rtol(G.shape)
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
    if rtol is None:
        rtol = _default_rtol(Z.shape)
    c = solve_gram(K, R, alpha, rtol)
    dWt = A.T @ c
    residual = R - A @ dWt
    db = mean_q - mean_z @ dWt if fit_intercept else np.zeros(Q.shape[1])
    return dWt, db, float(np.vdot(residual, residual))
