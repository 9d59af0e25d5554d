"""Transferal residue diagnostics and the data condition of a fitted layer update (pure numpy).

Notation of the paper (Tseng et al., ICLR 2023) and of :mod:`._solvers`: design rows ``Z``
(n_rows, d) (the features, or a convolutional head's patches), residue rows
``Q = T - (Z W0^T + b0)`` (n_rows, k) for target rows ``T``, row weights ``s`` (a sample's
weight repeated over its patches). Everything is weighted: with ``A = diag(sqrt(s)) Z_c`` and
``R = diag(sqrt(s)) Q_c``, where ``_c`` means centred by the weighted means when the intercept is
fitted and uncentred otherwise, the solver decomposes ``G = A^T A`` (or ``K = A A^T``).

* Residue ``||Q||_s^2 = sum_i s_i ||q_i||^2`` before the update; residual
  ``||Q - Z dW^T - db||_s^2`` after it; both per output and relative to
  ``||T - mean_s(T)||_s``.
* Data condition: the numerical rank of ``A`` (the solver's scale-invariant spectrum,
  :func:`._solvers.spectral`: eigenvalues of ``G`` equilibrated by its diagonal above
  ``rtol * max``, :func:`._solvers.gram_rtol`), its condition number over that rank, and the
  effective degrees of freedom ``sum_j e_j / (e_j + alpha)`` of the weights, plus 1 for a
  fitted intercept (the trace of the hat matrix).
* Span decomposition of the residue: with the intercept fitted,
  ``||Q||_s^2 = S ||m_q||^2 + ||P_A R||^2 + ||(I - P_A) R||^2``: the weighted mean (a bias change
  removes it), the part in the span of the centred features (a weight change removes it), and the
  rest, which no last-layer update can remove (the residual at ``alpha = 0``). Without an
  intercept, the mean part is 0 and ``A`` holds the uncentred features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _solvers


class TargetStats:
    """Weighted per-output statistics of the target rows (picklable, tiny).

    n_samples : samples with a positive weight; n_rows : their design rows;
    weight : sum of the row weights; mean : (k,) weighted means; centred_sq : (k,)
    ``sum_rows s (t - mean)^2``.
    """

    __slots__ = ("n_samples", "n_rows", "weight", "mean", "centred_sq", "n_total")

    def __init__(self, Y, s, rows_per_sample=1):
        """``Y`` (n, k * L): the targets of n samples, output channel-major (L positions per
        channel for a convolutional head, L = 1 otherwise); ``s`` (n,) sample weights."""
        n = Y.shape[0]
        Y3 = Y.reshape(n, -1, rows_per_sample)  # (n, k, L)
        S = float(s.sum()) * rows_per_sample
        mean = np.einsum("i,ikl->k", s, Y3) / S if S > 0 else np.zeros(Y3.shape[1])
        self.n_total = n
        self.n_samples = int(np.count_nonzero(s > 0))
        self.n_rows = self.n_samples * rows_per_sample
        self.weight = S
        self.mean = mean
        self.centred_sq = np.einsum("i,ikl->k", s, (Y3 - mean[None, :, None]) ** 2)


@dataclass(frozen=True, repr=False, eq=False)
class Diagnostics:
    """Transferal residue and data condition of a fitted last-layer update.

    All norms are weighted, ``||M||_s = sqrt(sum_i s_i ||m_i||^2)`` over design rows (samples,
    or a convolutional head's output positions); squared shares add up to 1.

    Attributes
    ----------
    n_samples : int
        Samples with a positive weight.
    n_rows : int
        Their design rows: ``n_samples`` for a linear head, ``n_samples x output positions``
        for a convolutional one. This is the N of the data condition.
    n_features : int
        d, the columns of the design (features, or ``C_in x prod(kernel)`` patch values).
    n_outputs : int
        k, outputs of the head (output channels of a convolution).
    fit_intercept : bool
        Whether the bias was updated (the features are then centred before everything below).
    alpha : float
        The penalty the update was solved with.
    weight : float
        ``S``, the sum of the row weights.
    rank : int
        Numerical rank of the (centred, weighted) design, by the solver's rule: eigenvalues of
        ``G`` equilibrated by its diagonal above ``rtol`` times the largest (columns of zero
        variance left out).
    rtol : float
        That threshold.
    condition_number : float
        ``sigma_max / sigma_min`` of the design over its numerical rank (nan for rank 0).
    dof : float
        Effective degrees of freedom, the trace of the (weighted) hat matrix:
        ``sum_j e_j / (e_j + alpha)`` over the kept eigenvalues (equal to ``rank`` at
        ``alpha = 0``), plus 1 when the intercept is fitted.
    interpolating : bool
        ``rank == n_rows - fit_intercept``: the features (with the constant when the intercept
        is fitted) span every residue vector, so at ``alpha = 0`` the training residual is 0.
        Otherwise the fit is in the least-squares regime.
    residue_norm, residual_norm : float
        ``||Q||_s`` before the update and ``||Q - Z dW^T - db||_s`` after it.
    target_norm : float
        ``||T - mean_s(T)||_s``, the scale of the targets.
    residue_norm_per_output, residual_norm_per_output, target_norm_per_output : ndarray (k,)
        The same, output by output.
    bias_share : float
        ``S ||m_q||^2 / ||Q||_s^2``, the share of the squared residue that is a constant offset
        (removable by the bias; 0 when the intercept is not fitted).
    span_share : float
        Share of the squared residue in the span of the target features (with the constant
        column when the intercept is fitted, so ``bias_share`` is included): what any last-layer
        update can explain.
    outside_share : float
        ``1 - span_share``: what no last-layer update can explain (needs deeper layers); equal
        to ``(min residual at alpha = 0)^2 / residue_norm^2``.
    centred_span_share : float
        ``||P_A R||^2 / ||R||^2``: the share of the centred residue in the span of the centred
        features (the uncentred ones without an intercept).
    span_share_per_output : ndarray (k,)
        ``span_share`` output by output.
    """

    n_samples: int
    n_rows: int
    n_features: int
    n_outputs: int
    fit_intercept: bool
    alpha: float
    weight: float
    rank: int
    rtol: float
    condition_number: float
    dof: float
    interpolating: bool
    residue_norm: float
    residual_norm: float
    target_norm: float
    residue_norm_per_output: np.ndarray = field(repr=False)
    residual_norm_per_output: np.ndarray = field(repr=False)
    target_norm_per_output: np.ndarray = field(repr=False)
    bias_share: float
    span_share: float
    outside_share: float
    centred_span_share: float
    span_share_per_output: np.ndarray = field(repr=False)

    @property
    def regime(self):
        """ "interpolating" or "least-squares" (see ``interpolating``)."""
        return "interpolating" if self.interpolating else "least-squares"

    @property
    def relative_residue(self):
        """``residue_norm / target_norm`` (nan for constant targets)."""
        return _ratio(self.residue_norm, self.target_norm)

    @property
    def relative_residual(self):
        """``residual_norm / target_norm``; ``1 - relative_residual**2`` is the training R^2."""
        return _ratio(self.residual_norm, self.target_norm)

    def as_dict(self):
        """The numbers as a flat dict (arrays as lists), e.g. for a DataFrame row or JSON."""
        out = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            out[name] = v.tolist() if isinstance(v, np.ndarray) else v
        out.update(
            regime=self.regime,
            relative_residue=self.relative_residue,
            relative_residual=self.relative_residual,
        )
        return out

    def summary(self):
        """A readable multi-line report."""
        rows = "rows (output positions)" if self.n_rows != self.n_samples else "samples"
        lines = [
            "Transferal residue (training data, weighted)",
            f"  before update  {self.residue_norm:.4g}  ({_pct(self.relative_residue)} of ||y - mean y||)",
            f"  after update   {self.residual_norm:.4g}  ({_pct(self.relative_residual)} of ||y - mean y||)",
            "  share of the squared residue",
            f"    in the span of the target features  {_pct(self.span_share)}"
            + (f"  (constant offset {_pct(self.bias_share)})" if self.fit_intercept else ""),
            f"    outside it (needs deeper layers)    {_pct(self.outside_share)}",
            "Data condition",
            f"  N = {self.n_rows} {rows}"
            + (f" from {self.n_samples} samples" if self.n_rows != self.n_samples else "")
            + f", d = {self.n_features}, k = {self.n_outputs}",
            f"  rank {self.rank} ({'centred, ' if self.fit_intercept else ''}rtol {self.rtol:.1e}): "
            f"{self.regime} regime",
            f"  condition number {self.condition_number:.3g}, effective dof {self.dof:.4g} "
            f"at alpha = {self.alpha:g}",
        ]
        if self.n_outputs > 1:
            lines.append("Per output: residue before -> after (span share)")
            for j in range(self.n_outputs):
                lines.append(
                    f"  {j:>3}  {self.residue_norm_per_output[j]:.4g} -> "
                    f"{self.residual_norm_per_output[j]:.4g}  ({_pct(self.span_share_per_output[j])})"
                )
        return "\n".join(lines)

    def __repr__(self):
        return (
            f"Diagnostics(residue {self.residue_norm:.4g} -> {self.residual_norm:.4g} "
            f"({_pct(self.relative_residue)} -> {_pct(self.relative_residual)} of ||y - mean y||), "
            f"span share {_pct(self.span_share)}, N={self.n_rows}, d={self.n_features}, "
            f"rank={self.rank}, {self.regime}, cond={self.condition_number:.3g}, "
            f"dof={self.dof:.4g} at alpha={self.alpha:g})"
        )

    def __str__(self):
        return self.summary()


def _ratio(a, b):
    return float(a / b) if b > 0 else float("nan")


def _pct(x):
    return "nan" if not np.isfinite(x) else f"{100 * x:.1f}%"


def _share(part, total):
    part, total = np.asarray(part, dtype=float), np.asarray(total, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.clip(part / np.where(total > 0, total, 1.0), 0.0, 1.0), np.nan)


def _assemble(
    *,
    e,
    keep,
    in_span,
    moments,
    qq_c,
    resid_sq,
    targets,
    alpha,
    fit_intercept,
    rtol,
    n_samples,
    n_rows,
):
    """Build :class:`Diagnostics` from the spectrum and per-output squared norms.

    ``in_span`` (k,): ``||P_A R_j||^2``; ``qq_c`` (k,): ``||R_j||^2`` (centred when the intercept is
    fitted); ``resid_sq`` (k,): the residual after the update; ``targets``: centred per-output
    target squares (k,).
    """
    d, k = moments.B.shape
    mean_sq = moments.weight * moments.mean_q**2 if fit_intercept else np.zeros(k)
    # without an intercept the moments are taken about the origin: R holds the mean part
    residue_sq = qq_c + mean_sq if fit_intercept else qq_c
    ek = e[keep]
    rank = int(keep.sum())
    total = float(residue_sq.sum())
    explained = in_span + mean_sq
    return Diagnostics(
        n_samples=int(n_samples),
        n_rows=int(n_rows),
        n_features=int(d),
        n_outputs=int(k),
        fit_intercept=bool(fit_intercept),
        alpha=float(alpha),
        weight=float(moments.weight),
        rank=rank,
        rtol=float(rtol),
        condition_number=float(np.sqrt(ek.max() / ek.min())) if rank else float("nan"),
        dof=(float(np.sum(ek / (ek + alpha))) if rank else 0.0) + int(fit_intercept),
        interpolating=rank == n_rows - int(fit_intercept),
        residue_norm=float(np.sqrt(total)),
        residual_norm=float(np.sqrt(max(float(resid_sq.sum()), 0.0))),
        target_norm=float(np.sqrt(targets.sum())),
        residue_norm_per_output=np.sqrt(residue_sq),
        residual_norm_per_output=np.sqrt(np.clip(resid_sq, 0.0, None)),
        target_norm_per_output=np.sqrt(targets),
        bias_share=float(_share(mean_sq.sum(), total)),
        span_share=float(_share(explained.sum(), total)),
        outside_share=float(1.0 - _share(explained.sum(), total)) if total > 0 else float("nan"),
        centred_span_share=float(_share(in_span.sum(), qq_c.sum())),
        span_share_per_output=_share(explained, residue_sq),
    )


def from_moments(moments, dWt, db, W0, targets, alpha, fit_intercept, rtol):
    """Diagnostics of a primal fit, from its moments (:class:`._solvers.Moments`).

    ``targets`` (:class:`TargetStats`) gives the per-output squares the moments lack (they hold
    only the trace of ``Q_c^T S Q_c``): with ``Z_c^T S T_c = B + G W0^T``,
    ``||Q_c,j||^2 = ||T_c,j||^2 - 2 (W0 B)_jj - (W0 G W0^T)_jj``, exact up to cancellation of
    order ``eps * ||T_c,j||^2``. ``dWt`` (d, k) and ``db`` (k,) are the update.
    """
    m = moments
    qq_c = targets.centred_sq - 2.0 * np.einsum("jd,dj->j", W0, m.B) - np.einsum("jd,de,je->j", W0, m.G, W0)
    qq_c = np.clip(qq_c, 0.0, None)
    # after: ||Q_c - Z_c dW^T||^2 + S ||m_q - m_z dW^T - db||^2, exactly what the update leaves
    offset = m.mean_q - m.mean_z @ dWt - db
    resid_sq = qq_c - 2.0 * np.einsum("dj,dj->j", dWt, m.B) + np.einsum("dj,de,ej->j", dWt, m.G, dWt)
    resid_sq = resid_sq + m.weight * offset**2
    if fit_intercept:
        G, B = m.G, m.B
    else:
        G, B, _ = _solvers.uncentred(m)
        qq_c = qq_c + m.weight * m.mean_q**2
    sp = _solvers.spectral(G, rtol, _solvers.primal_floor(m, rtol))  # the solver's own spectrum
    e, keep = sp.e, sp.keep
    VtB = sp.V[:, keep].T @ B
    in_span = np.sum(VtB**2 / e[keep][:, None], axis=0)  # diag(B^T G^+ B)
    return _assemble(
        e=e,
        keep=keep,
        in_span=np.minimum(in_span, qq_c),
        moments=m,
        qq_c=qq_c,
        resid_sq=resid_sq,
        targets=targets.centred_sq,
        alpha=alpha,
        fit_intercept=fit_intercept,
        rtol=rtol,
        n_samples=targets.n_samples,
        n_rows=targets.n_rows,
    )


def from_design(Z, Q, s, dWt, db, targets, alpha, fit_intercept, rtol):
    """Diagnostics from the design rows ``Z`` (n_rows, d), residue rows ``Q`` and row weights
    ``s`` directly (every number exact), through the ``n_rows x n_rows`` kernel (for
    ``n_rows < d``, the dual solver's case)."""
    m = _solvers.batch_moments(Z, Q, s)._replace(G=np.zeros((0, 0)))  # G unused: the kernel replaces it
    if fit_intercept:
        Zc, Qc = Z - m.mean_z, Q - m.mean_q
    else:
        Zc, Qc = Z, Q
    r = np.sqrt(s)[:, None]
    A, R = r * Zc, r * Qc
    qq_c = np.sum(R * R, axis=0)
    resid = r * (Q - Z @ dWt - db)
    sp = _solvers.spectral(A @ A.T, rtol, _solvers.dual_floor(Z, s, rtol))
    e, keep = sp.e, sp.keep
    in_span = np.sum((sp.V[:, keep].T @ R) ** 2, axis=0)
    return _assemble(
        e=e,
        keep=keep,
        in_span=np.minimum(in_span, qq_c),
        moments=m._replace(B=np.zeros((Z.shape[1], Q.shape[1]))),
        qq_c=qq_c,
        resid_sq=np.sum(resid * resid, axis=0),
        targets=targets.centred_sq,
        alpha=alpha,
        fit_intercept=fit_intercept,
        rtol=rtol,
        n_samples=targets.n_samples,
        n_rows=targets.n_rows,
    )
