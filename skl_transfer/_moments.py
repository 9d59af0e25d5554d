"""The streaming-moments engine: weighted moments of design and residue rows, batch by batch,
in place on the features' device (never more of the design matrix than CHUNK_BYTES)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from . import _solvers
from ._heads import LINEAR
from ._torch import as_device_arrays, from_numpy, to_numpy

# Design rows held for one BLAS ``syrk`` on the CPU (float64 bytes): a fit's whole design
# when it fits, so that torch's and BLAS's thread pools take turns once per chunk, not once
# per batch (see MomentSums).
CHUNK_BYTES = 2**28


class MomentSums:
    """Running weighted moments of design and residue rows, on the features' device.

    The same moments as merging :func:`~skl_transfer._solvers.batch_moments` of every batch
    with :func:`~skl_transfer._solvers.merge_moments` (each batch centred on its own mean,
    Chan, Golub & LeVeque's pairwise update), computed in place: one ``d x d`` float64
    accumulator, never a new one per batch. Each batch's centred rows
    ``A = diag(sqrt(s / c)) [Z - m_z, Q - m_q]`` (one product holds ``G``, ``B`` and ``qq``)
    add ``c A^T A`` to the upper triangle, and the rank-1 correction of the means to the whole.

    On the CPU the product is BLAS ``syrk`` (half a full product's flops; torch has none),
    added to a Fortran-ordered accumulator that ``G`` views. The centred rows of consecutive
    batches are held in one buffer of up to ``rows`` rows (at most :data:`CHUNK_BYTES`) and
    multiplied together by :func:`~skl_transfer._solvers.gram`: row blocks in parallel Python
    threads, each on one BLAS thread. A threaded BLAS call leaves its worker threads spinning
    for a while, and torch's idle threads spin too: when the two libraries alternate batch by
    batch, each slows the other by half on two cores; held rows make them take turns once per
    chunk (once per fit when the design fits), with no BLAS thread spinning afterwards; one
    product of the held rows, and the merges' rank-1 corrections summed as one more, leave
    ``G`` exactly symmetric without a final symmetrisation (on one torch thread too). With
    ``blas=True`` (features that no torch extractor computes) or ``rows=0``, each batch goes
    to ``syrk`` at once, in place, into the upper triangle.
    On another device the product stays there: ``addmm_`` block row by block row into the
    upper triangle (about 9/16 of a full product's flops with 8 blocks); ``syrk=False`` chooses
    that on the CPU too.
    """

    def __init__(self, d, k, device, blas=False, rows=0, syrk=None):
        f64 = dict(dtype=torch.float64, device=device)
        D = d + k  # rows [z, q]: one product gives G, B and qq (the trace of the q block)
        self.d, self.weight = d, 0.0
        self.mean = torch.zeros(D, **f64)
        self._syrk, self._A, self._used, self._scale = None, None, 0, None
        self._corrections = []  # held rows: sqrt(f) delta of each merge, added at the end
        self._cap = 0  # rows held before a product; 0: every batch at once
        if syrk is None:
            syrk = torch.device(device).type == "cpu"
        if syrk:
            self._G = np.zeros((D, D), order="F")
            self._syrk = linalg.get_blas_funcs("syrk", (self._G,))
            self.G = from_numpy(self._G)  # a view: updated in place by syrk and torch alike
            self._workers = torch.get_num_threads()
            if not blas:
                self._cap = min(int(rows), CHUNK_BYTES // (8 * D))
        else:
            self.G = torch.zeros(D, D, **f64)  # upper triangle only until moments()
        edges = np.linspace(0, D, max(1, min(8, D // 128)) + 1).astype(int)
        self.blocks = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def _rows(self, n, device):
        """A view of ``n`` free rows of the buffer (the held rows multiplied out first when
        they do not fit)."""
        if self._used + n > max(self._cap, n):
            self._flush()
        size = max(self._cap, n)
        if self._A is None or self._A.shape[0] < size:  # reused: a fresh array costs page faults
            self._A = torch.empty(size, self.G.shape[0], dtype=torch.float64, device=device)
        A = self._A[self._used : self._used + n]
        self._used += n
        return A

    def _flush(self):
        """``G += c A^T A`` for the held rows ``A``: both triangles when rows are held
        (``_cap > 0``), else the upper one."""
        if self._used == 0:
            return
        A, scale = self._A[: self._used], self._scale
        self._used, self._scale = 0, None
        if self._syrk is not None and self._cap == 0:  # in place; to_numpy(A).T is Fortran-ordered
            out = self._syrk(scale, to_numpy(A).T, beta=1.0, c=self._G, trans=0, lower=0, overwrite_c=1)
            if out is not self._G:  # pragma: no cover - f2py copies only a non-Fortran array
                self._G[...] = out
            return
        if self._syrk is not None:  # held rows: row blocks in parallel, each on one BLAS thread
            P = _solvers.gram(to_numpy(A), self._workers)  # both triangles, exactly symmetric
            if scale != 1.0:
                P *= scale
            self._G += P.T  # P.T: Fortran-ordered like _G, so the sum streams through memory
            return
        for a, b in self.blocks:
            self.G[a:b, a:].addmm_(A[:, a:b].T, A[:, a:], alpha=scale)

    def add(self, Z, Q, s):
        """Add a batch: float64 tensors ``Z`` (b, d), ``Q`` (b, k), ``s`` (b,) (not modified)."""
        S_b = float(s.sum())
        if S_b <= 0.0:
            return self
        n, d = Z.shape
        mean = torch.cat([s @ Z, s @ Q]) / S_b
        if n > 1:  # one row centred on its own mean is zero: nothing to multiply
            A = self._rows(n, Z.device)
            torch.sub(Z, mean[:d], out=A[:, :d])
            torch.sub(Q, mean[d:], out=A[:, d:])
            if self._scale is None:
                self._scale = float(s.max())  # the held rows' common factor c (> 0)
            if bool(s.min() != s.max()) or float(s[0]) != self._scale:
                A.mul_((s / self._scale).sqrt()[:, None])
            if self._cap == 0:
                self._flush()
        S = self.weight + S_b
        delta = mean - self.mean
        f = self.weight * S_b / S
        if f > 0.0 and self._cap > 0:  # held rows: all corrections in one symmetric product
            self._corrections.append(delta * f**0.5)
        elif f > 0.0:
            self.G.addr_(delta, delta, alpha=f)
        self.mean.add_(delta, alpha=S_b / S)
        self.weight = S
        return self

    def moments(self):
        """The accumulated moments as numpy :class:`~skl_transfer._solvers.Moments`."""
        self._flush()
        self._A = None
        if self._corrections:  # sum_b f_b delta_b delta_b^T as one product: exactly symmetric
            C = to_numpy(torch.stack(self._corrections))
            with _solvers.one_blas_thread():  # small: no BLAS worker left spinning
                self._G += (C.T @ C).T
            self._corrections = []
        G = to_numpy(self.G)
        if self._cap == 0:  # each batch's product filled the upper triangle only
            G = np.triu(G)
            G += np.triu(G, 1).T
        # else (held rows) every term added was exactly symmetric
        mean, d = to_numpy(self.mean), self.d
        # G is symmetric and Fortran-ordered: its transpose's blocks are copied row by row
        return _solvers.Moments(
            self.weight, mean[:d].copy(), mean[d:].copy(), G[:d, :d].T.copy(), G[d:, :d].T.copy(),
            float(np.trace(G[d:, d:])),
        )  # fmt: skip


def accumulate_moments(
    batches, Y, s, W0, b0, geometry=LINEAR, feature_shape=(), labels=None, residue=None, blas=False
):
    """Moments of the design rows and residue rows ``Q = targets - rows W0^T - b0``, merged
    batch by batch, returned as numpy.

    ``geometry`` turns a batch of features into design rows (a linear head: the features;
    a conv head: their patches) and a batch of targets into target rows; None is linear.
    Memory is O(d^2 + batch + held rows): the rows held for one product are at most
    :data:`CHUNK_BYTES`, so a design larger than that is never formed whole. With ``labels``
    (one non-negative int per sample), returns one set of moments per label
    ``0 .. labels.max()`` instead (zero moments for a label without samples), still in one pass.
    ``residue`` (a :class:`PerturbResidue`, or None) gives each batch's residue ``Q`` per
    sample, which then replaces ``targets - h(Z)``; ``Y`` is not read. ``blas``: the features
    come from no torch extractor (see :class:`MomentSums`).
    """
    n_groups = 1 if labels is None else int(labels.max()) + 1
    groups = [None] * n_groups
    device = None
    with torch.inference_mode():
        for sl, Z, *_ in batches:
            if device is None:
                device = Z.device
                Yt, st, W0t, b0t = as_device_arrays(device, Y, s, W0, b0)
            Yb = Yt[sl] if residue is None else residue(sl, Z)
            sb = st[sl]
            present = [0] if labels is None else np.unique(labels[sl])
            for g in present:
                if labels is None:
                    Zg, Yg, sg = Z, Yb, sb
                else:
                    idx = from_numpy(np.flatnonzero(labels[sl] == g)).to(device)
                    Zg, Yg, sg = Z[idx], Yb[idx], sb[idx]
                for rows, targets, w in _design_chunks(Zg, Yg, sg, geometry, feature_shape):
                    Q = targets if residue is not None else targets - rows @ W0t.T - b0t
                    if groups[g] is None:  # one group: its whole design may be held for syrk
                        held = len(s) if labels is None and not geometry.is_conv else 0
                        groups[g] = MomentSums(W0.shape[1], W0.shape[0], device, blas, held)
                    groups[g].add(rows, Q, w)
    k, d = W0.shape
    out = [
        _solvers.Moments(0.0, np.zeros(d), np.zeros(k), np.zeros((d, d)), np.zeros((d, k)), 0.0)
        if m is None
        else m.moments()
        for m in groups
    ]
    return out[0] if labels is None else out


ROW_BUDGET = 4096  # design rows (patches) formed at once for a conv head (~4 copies live)


def _design_chunks(Z, Y, w, geometry, feature_shape):
    """Yield (design rows, target rows, row weights) for a batch, in chunks of samples whose
    patches number at most ROW_BUDGET (one sample at least): a conv head's patches are never
    all materialised, only about ROW_BUDGET x C_in * prod(kernel) floats at a time."""
    if not geometry.is_conv:
        yield Z, Y, w
        return
    per = geometry.rows_per_sample(feature_shape)
    step = max(1, ROW_BUDGET // per)
    for i in range(0, Z.shape[0], step):
        rows = geometry.design(Z[i : i + step], feature_shape)
        yield rows, geometry.targets(Y[i : i + step], feature_shape), w[i : i + step].repeat_interleave(per)
