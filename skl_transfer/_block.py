r"""Adapting the last L layers: variable projection with the closed-form layer update inside.

A block head is an ``nn.Sequential`` of ``Linear`` layers with elementwise activations between
them, ending in a ``Linear``. Its output is linear in the last layer, so fitting the block is a
separable least-squares problem (Golub and Pereyra 1973): for the earlier layers' parameters
``theta`` (weights and biases of layers 1 .. L-1, flattened), the last layer is eliminated by
the library's ridge solve on the block's hidden features ``H(theta)``,

.. math::
    \phi(\theta) = \min_{W, b} \sum_i s_i \|h_i(\theta) W^T + b - y_i\|^2
    + \alpha \|W - W_0\|_F^2 + \alpha_{body} \|\theta - \theta_0\|^2 ,

and ``phi`` is minimised by Levenberg-Marquardt steps from the pretrained ``theta_0`` with
Kaufman's Jacobian (1975): the Jacobian of the block's outputs with respect to ``theta`` at
the current last layer, projected off what the last layer can still fit. With ridge, that
projection of the augmented least-squares problem gives the Gauss-Newton matrix

.. math::
    G = \sum_j J_j^T (I - \Pi) J_j, \qquad
    \Pi = S^{1/2} \tilde H M^+ \tilde H^T S^{1/2}, \quad M = \tilde H^T S \tilde H + \alpha E,

(``J_j`` the weighted Jacobian of output j, ``H~ = [H, 1]`` with the unpenalised intercept,
``E`` the identity on the weights and 0 on the intercept), and the gradient is exact:
``g = sum_j J_j^T r_j + alpha_body (theta - theta_0)``. A step solves
``(G + (alpha_body + mu) I) delta = -g`` and is accepted only if ``phi`` decreases; the damping
``mu`` adapts itself (Nielsen's rule). The step's system is solved in the primal form (the
``P x P`` matrix ``G``, built from row blocks of the Jacobian) when there are no more
parameters ``P`` than output rows ``N k``, in the dual form (the ``N k x N k`` tangent kernel,
built from the block's structure, never the Jacobian, projected on both sides by
``(I - Pi)^{1/2}`` so that one Cholesky factorisation solves it) otherwise, and by conjugate
gradients on Jacobian-vector products when neither matrix fits :data:`SYSTEM_MAX_ENTRIES`.
When the first layer's input has numerical rank below its width, that layer's weight is
solved in the input's row space (:func:`fit_block`).

The Jacobian's structure: with ``A_l`` the input of layer l, ``D_l`` the derivative of the
activation after it and ``Delta_l[i, j]`` the sensitivity of output j of sample i to layer l's
pre-activation (``Delta_{L-2}[i, j] = W_L[j] * D_{L-2}[i]``, then backwards through
``W_l``), the row (i, j) of the Jacobian holds ``sqrt(s_i) Delta_l[i, j] (x) [A_l[i], 1]`` for
every earlier layer l, so that ``J v``, ``J^T x`` and the tangent kernel
``K = sum_l (Delta_l Delta_l^T) * (A_l A_l^T + 1)`` cost O(N k m) each, O((N k)^2 m) for K.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import nn

from . import _solvers
from ._heads import LinearGeometry, Prior, _finite_layer, make_linear
from ._torch import from_numpy, to_float64

SYSTEM_MAX_ENTRIES = 1 << 27  # a primal P x P or dual Nk x Nk system of at most 1 GiB (float64)
ROW_SPACE_MAX_FLOPS = 1 << 33  # the SVD of the block's input (N x d) that finds its row space
CHUNK_ENTRIES = 1 << 22  # rows of the Jacobian built at a time: at most 32 MiB
TAU = 1.0  # the first damping, relative to the mean diagonal of G (a cautious first step)
_MAX_REJECTED = 40  # damping increases in a row before the iteration stops (no decrease left)


def is_block(head):
    """Whether ``head`` is a block (an ``nn.Sequential``) rather than one layer."""
    return isinstance(head, nn.Sequential)


@dataclass
class Block:
    """A block head as float64 arrays: ``weights[l]`` (m_{l+1}, m_l) and ``biases[l]`` (or None)
    of its Linear layers, ``acts[l]`` the modules after Linear l (before the next), ``pre`` the
    modules before the first Linear, and a copy of the user's block to export from."""

    weights: list
    biases: list
    acts: list
    pre: list
    dtype: torch.dtype
    template: nn.Sequential
    positions: list  # index of each Linear in the Sequential

    @property
    def n_layers(self):
        return len(self.weights)

    @property
    def d_in(self):
        return self.weights[0].shape[1]

    @property
    def n_outputs(self):
        return self.weights[-1].shape[0]

    def body_params(self):
        """``theta``: the earlier layers' weights and biases, flattened (layer by layer)."""
        parts = []
        for W, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            parts.append(W.ravel())
            if b is not None:
                parts.append(b)
        return np.concatenate(parts) if parts else np.zeros(0)

    def unpack(self, theta):
        """``theta`` -> lists of the earlier layers' weights and biases."""
        Ws, bs, at = [], [], 0
        for W, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            Ws.append(theta[at : at + W.size].reshape(W.shape))
            at += W.size
            if b is None:
                bs.append(None)
            else:
                bs.append(theta[at : at + b.size])
                at += b.size
        return Ws, bs

    def with_body(self, theta):
        """A copy of this block with the earlier layers set from ``theta``."""
        Ws, bs = self.unpack(theta)
        return Block(
            [*Ws, self.weights[-1]], [*bs, self.biases[-1]], self.acts, self.pre, self.dtype,
            self.template, self.positions,
        )  # fmt: skip


def _is_elementwise(modules, width):
    """Whether the composition of ``modules`` acts elementwise (its Jacobian at a random point
    is diagonal: a random vector's vjp is the diagonal times the vector)."""
    if not modules:
        return True
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, width, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, width, generator=gen, dtype=torch.float64)
    try:
        with torch.enable_grad():
            a = u
            for m in modules:
                a = m(a)
            if a.shape != u.shape:
                return False
            (along_w,) = torch.autograd.grad(a, u, w, retain_graph=True)
            (diag,) = torch.autograd.grad(a, u, torch.ones_like(a))
    except RuntimeError:  # a module torch cannot differentiate is not usable
        return False
    return torch.allclose(along_w, diag * w, rtol=1e-6, atol=1e-9)


def parse_block(head):
    """Read an ``nn.Sequential`` block head into a :class:`Block` (copies; the head itself is
    never modified), or raise a TypeError/ValueError that names what to change."""
    mods = list(head)
    name = type(head).__name__
    if not mods or not isinstance(mods[-1], nn.Linear):
        raise TypeError(
            f"A block head ({name} of {[type(m).__name__ for m in mods]}) must end in a torch.nn.Linear; "
            "pass the Sequential from a Linear layer to the network's last Linear (e.g. net[-3:])."
        )
    weights, biases, acts, pre, positions, current = [], [], [], [], [], []
    dtype = mods[-1].weight.dtype
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            if nn.parameter.is_lazy(m.weight):
                raise TypeError(f"Layer {i} of the block is not initialised yet; run one forward pass first.")
            W = to_float64(m.weight).copy()
            b = None if m.bias is None else to_float64(m.bias).copy()
            W, b = _finite_layer(m, W, b)
            if weights and W.shape[1] != weights[-1].shape[0]:
                raise ValueError(
                    f"Layer {i} of the block takes {W.shape[1]} inputs but the Linear before it "
                    f"outputs {weights[-1].shape[0]}."
                )
            if weights:
                acts.append(current)
            else:
                pre.extend(current)
            current = []
            weights.append(W)
            biases.append(b)
            positions.append(i)
            continue
        if (
            isinstance(m, nn.Sequential)
            or any(True for _ in m.parameters())
            or any(True for _ in m.buffers())
        ):
            raise TypeError(
                f"Layer {i} of the block ({type(m).__name__}) is not a Linear layer or a parameter-free "
                "elementwise activation; a block adapts Linear layers with activations such as ReLU, "
                "Tanh or GELU between them. Keep other layers in the extractor (or flatten nested "
                "Sequentials)."
            )
        current.append(copy.deepcopy(m).double().eval())
    for i, group in enumerate(acts):
        if not _is_elementwise(group, weights[i].shape[0]):
            raise ValueError(
                f"The modules {[type(m).__name__ for m in group]} after Linear layer {positions[i]} of "
                "the block do not act elementwise; only elementwise activations can sit between the "
                "adapted layers. Keep the layers before them in the extractor."
            )
    template = copy.deepcopy(head).cpu().eval().requires_grad_(False)
    return Block(weights, biases, acts, pre, dtype, template, positions)


def _apply(modules, U, derivative=False):
    """The modules on U (float64 numpy), and their elementwise derivative there."""
    if not modules:
        return (U, np.ones_like(U)) if derivative else U
    u = from_numpy(U).requires_grad_(derivative)
    with torch.set_grad_enabled(derivative):
        a = u
        for m in modules:
            a = m(a)
        if not derivative:
            return a.detach().numpy()
        (d,) = torch.autograd.grad(a.sum(), u)
    return a.detach().numpy(), d.numpy()


def block_input(block, Z):
    """The modules before the first Linear applied to the features (frozen: not adapted)."""
    return _apply(block.pre, np.asarray(Z, dtype=np.float64))


def hidden(block, A0, derivative=False):
    """Inputs ``A_l`` of every Linear of the block (``A[-1] = H``, the last layer's features)
    and the activations' derivatives ``D_l`` after each earlier layer."""
    A, D = [A0], []
    for W, b, acts in zip(block.weights[:-1], block.biases[:-1], block.acts, strict=True):
        U = A[-1] @ W.T
        if b is not None:
            U += b
        if derivative:
            a, d = _apply(acts, U, True)
            D.append(d)
        else:
            a = _apply(acts, U)
        A.append(a)
    return A, D


def _pinv_psd(M):
    """``M^+`` of a small symmetric positive semi-definite matrix, scaled to a unit diagonal:
    by Cholesky when it is well conditioned, else by an eigendecomposition with directions below
    1e-12 of the largest eigenvalue dropped (the minimum-norm solution at alpha = 0). The
    eigendecomposition runs on one BLAS thread: OpenBLAS's threaded ``syevd`` takes 50 times
    longer on a 65 x 65 matrix than one thread does."""
    scale = np.sqrt(np.maximum(np.diag(M), np.finfo(float).tiny))
    Ms = M / np.outer(scale, scale)
    try:
        L = np.linalg.cholesky(Ms)
        if np.diag(L).min() ** 2 > 1e-12 * np.diag(L).max() ** 2:
            Linv = scipy.linalg.solve_triangular(L, np.eye(len(M)), lower=True)
            return (Linv.T @ Linv) / np.outer(scale, scale)
    except np.linalg.LinAlgError:
        pass
    with _solvers.one_blas_thread():
        w, V = np.linalg.eigh(Ms)
    keep = w > max(w[-1], 0.0) * 1e-12
    V = V[:, keep] / scale[:, None]
    return (V / w[keep]) @ V.T


@dataclass
class _Point:
    """The block at ``theta``: features, last layer, residuals, objective, and the pieces of
    the projection ``Pi = B Minv B^T`` (``B = S^{1/2} [H, 1]``, ``Minv = M^+``)."""

    theta: np.ndarray
    A: list
    D: list
    W: np.ndarray  # the last layer (k, m)
    b: np.ndarray  # (k,)
    R: np.ndarray  # sqrt(s) * (outputs - Y), (N, k)
    objective: float
    B: np.ndarray
    Minv: np.ndarray


class _Problem:
    """phi and its Gauss-Newton model (see the module docstring)."""

    def __init__(self, block, A0, Y, s, alpha, alpha_body, fit_intercept, feature_eps):
        self.block, self.A0, self.Y, self.s = block, A0, Y, s
        self.sqrt_s = np.sqrt(s)
        self.alpha, self.alpha_body, self.fit_intercept = alpha, alpha_body, fit_intercept
        self.feature_eps = feature_eps
        self.W0 = block.weights[-1]
        self.b0 = np.zeros(block.n_outputs) if block.biases[-1] is None else block.biases[-1]
        self.theta0 = block.body_params()
        self.SY = self.sqrt_s[:, None] * Y
        self._input_kernel0 = None
        self.n_params = self.theta0.size  # parameters the damping's scale averages over

    def point(self, theta):
        """The block at ``theta`` with its last layer solved: the ridge normal equations
        ``M [W, b]^T = B^T S^{1/2} Y + alpha [W0, 0]^T``, by one eigendecomposition of ``M``
        scaled to a unit diagonal (directions below 1e-12 of its largest eigenvalue dropped:
        the minimum-norm solution at alpha = 0), which the step's projection reuses."""
        A, D = hidden(self.block.with_body(theta), self.A0, derivative=True)
        H = A[-1]
        m = H.shape[1]
        B = self.sqrt_s[:, None] * (np.hstack([H, np.ones((len(H), 1))]) if self.fit_intercept else H)
        M = B.T @ B
        M[np.arange(m), np.arange(m)] += self.alpha
        Minv = _pinv_psd(M)
        rhs = B.T @ self.SY
        rhs[:m] += self.alpha * self.W0.T
        coef = Minv @ rhs  # (m [+ 1], k)
        W = coef[:m].T
        b = coef[m] if self.fit_intercept else self.b0
        R = B[:, :m] @ W.T + self.sqrt_s[:, None] * b - self.SY
        objective = (
            float((R * R).sum())
            + self.alpha * float(((W - self.W0) ** 2).sum())
            + self.alpha_body * float(((theta - self.theta0) ** 2).sum())
        )
        return _Point(theta, A, D, W, b, R, objective, B, Minv)

    def solution(self, pt):
        """The last layer at ``pt`` by the library's ridge solve (what a one-layer fit on the
        block's final features gives: equilibrated Cholesky, or the data when ill-conditioned)."""
        H = pt.A[-1]
        Q = self.Y - H @ self.W0.T - self.b0
        return _solvers.solve(
            self.alpha, self.fit_intercept, H.shape, self.feature_eps, design=(H, Q, self.s)
        )

    # -- the Jacobian's structure ------------------------------------------------------
    def sensitivities(self, pt):
        """``Delta_l`` (N, k, m_{l+1}) for every earlier layer l, times sqrt(s)."""
        Ws = self.block.unpack(pt.theta)[0]
        delta = pt.W[None, :, :] * pt.D[-1][:, None, :]
        out = [delta]
        for l in range(len(Ws) - 1, 0, -1):
            delta = (delta @ Ws[l]) * pt.D[l - 1][:, None, :]
            out.append(delta)
        return [self.sqrt_s[:, None, None] * d for d in out[::-1]]

    def _has_bias(self, l):
        return self.block.biases[l] is not None

    def input_kernel(self, pt, l):
        """``A_l A_l^T + 1`` (the 1 when layer l has a bias), expanded to the (i, j) rows of
        k outputs; the first layer's input (the features) never changes, so its kernel is
        computed once per fit."""
        if l == 0 and self._input_kernel0 is not None:
            return self._input_kernel0
        KA = pt.A[l] @ pt.A[l].T + (1.0 if self._has_bias(l) else 0.0)
        k = self.Y.shape[1]
        if k > 1:
            KA = np.repeat(np.repeat(KA, k, axis=0), k, axis=1)
        if l == 0:
            self._input_kernel0 = KA
        return KA

    def jvp(self, pt, Deltas, v):
        """``J v`` as (N, k)."""
        Ws, bs = self.block.unpack(v)
        out = 0.0
        for l, Delta in enumerate(Deltas):
            T = pt.A[l] @ Ws[l].T
            if bs[l] is not None:
                T += bs[l]
            out = out + (Delta * T[:, None, :]).sum(axis=2)
        return out

    def vjp(self, pt, Deltas, X):
        """``J^T x`` for x of shape (N, k), as a theta-shaped vector."""
        parts = []
        for l, Delta in enumerate(Deltas):
            E = (X[:, :, None] * Delta).sum(axis=1)
            parts.append((E.T @ pt.A[l]).ravel())
            if self._has_bias(l):
                parts.append(E.sum(axis=0))
        return np.concatenate(parts)

    def jacobian_rows(self, pt, Deltas, rows):
        """Rows (i, j), i in ``rows`` (a slice), of the weighted Jacobian: (n_rows * k, P)."""
        n = Deltas[0].shape[0]
        k = Deltas[0].shape[1]
        blocks = []
        for l, Delta in enumerate(Deltas):
            A = pt.A[l][rows]
            blocks.append((Delta[:, :, :, None] * A[:, None, None, :]).reshape(n * k, -1))
            if self._has_bias(l):
                blocks.append(Delta.reshape(n * k, -1))
        return np.concatenate(blocks, axis=1)

    @staticmethod
    def root_projection(pt):
        """``(I - Pi)^{1/2} = I - U diag(e) U^T``: U (N, r) orthonormal and e in [0, 1], from a
        thin QR ``B = U R`` and the eigendecomposition of ``R M^+ R^T`` (``Pi``'s nonzero
        eigenvalues, in [0, 1]); the r x r eigendecomposition on one BLAS thread."""
        U, R = scipy.linalg.qr(pt.B, mode="economic", check_finite=False)
        with _solvers.one_blas_thread():
            lam, V = np.linalg.eigh(R @ pt.Minv @ R.T)
        return U @ V, 1.0 - np.sqrt(1.0 - np.clip(lam, 0.0, 1.0))

    @staticmethod
    def project_off(B, Minv, X):
        """``(I - Pi) X`` for X of shape (N, k) (each output's column)."""
        return X - B @ (Minv @ (B.T @ X))

    def step_system(self, pt, form=None):
        """What a step needs at ``pt``: the gradient, a solver of the damped system and the
        damping's scale (the mean diagonal of ``J^T J``). ``form`` forces "primal", "dual" or "cg"
        (the three solve the same system; None chooses by shape)."""
        P = pt.theta.size
        N, k = pt.R.shape
        Deltas = self.sensitivities(pt)
        B, Minv = pt.B, pt.Minv
        g = self.vjp(pt, Deltas, pt.R) + self.alpha_body * (pt.theta - self.theta0)
        # the damping's scale: the mean diagonal of J^T J (the same whatever the form)
        scale = sum(
            float((D * D).sum(axis=(1, 2)) @ ((pt.A[l] ** 2).sum(axis=1) + self._has_bias(l)))
            for l, D in enumerate(Deltas)
        ) / max(self.n_params, 1)
        if form is None:
            if P <= N * k and P * P <= SYSTEM_MAX_ENTRIES:
                form = "primal"
            elif (N * k) ** 2 <= SYSTEM_MAX_ENTRIES:
                form = "dual"
            else:
                form = "cg"
        if form == "primal":
            G = np.zeros((P, P))
            chunk = max(1, CHUNK_ENTRIES // max(1, k * P))
            V = np.zeros((k, B.shape[1], P))
            for start in range(0, N, chunk):
                rows = slice(start, min(N, start + chunk))
                Jc = self.jacobian_rows(pt, [d[rows] for d in Deltas], rows)
                G += Jc.T @ Jc
                Jc = Jc.reshape(rows.stop - rows.start, k, P)
                for j in range(k):
                    V[j] += B[rows].T @ Jc[:, j, :]
            for j in range(k):
                G -= V[j].T @ (Minv @ V[j])
            G = (G + G.T) / 2

            def solve(c):
                return np.linalg.solve(G + c * np.eye(P), -g), "primal"

            return g, solve, scale
        if form == "dual":
            # (c I + J^T Q J)^{-1} = (I - Jq^T (c I + Kq)^{-1} Jq) / c with Jq = Q^{1/2} J and the
            # projected kernel Kq = Q^{1/2} K Q^{1/2}, symmetric: one Cholesky per damping
            K = None
            for l, Delta in enumerate(Deltas):
                Dl = Delta.reshape(N * k, -1)
                Kl = Dl @ Dl.T
                Kl *= self.input_kernel(pt, l)
                if K is None:
                    K = Kl
                else:
                    K += Kl
            U, e = self.root_projection(pt)
            Kq = _two_sided_low_rank(K, U, e, N, k)  # Fortran order, lower triangle
            del K

            def sqrt_q(X):  # (N, k) -> Q^{1/2} X
                return X - U @ (e[:, None] * (U.T @ X))

            Jqg = sqrt_q(self.jvp(pt, Deltas, g)).ravel()
            diag = np.diag_indices_from(Kq)
            Kq_diag = Kq[diag].copy()

            def solve(c):
                A = Kq.copy(order="F")
                A[diag] = Kq_diag + c
                try:
                    factor = scipy.linalg.cho_factor(A, lower=True, overwrite_a=True, check_finite=False)
                    x = scipy.linalg.cho_solve(factor, Jqg, check_finite=False)
                except np.linalg.LinAlgError:  # c below the rounding of Kq: not numerically definite
                    A = Kq.copy(order="F")
                    A[diag] = Kq_diag + c
                    x = scipy.linalg.solve(
                        A, Jqg, lower=True, assume_a="sym", overwrite_a=True, check_finite=False
                    )
                return -(g - self.vjp(pt, Deltas, sqrt_q(x.reshape(N, k)))) / c, "dual"

            return g, solve, scale

        def G_times(v):
            return self.vjp(pt, Deltas, self.project_off(B, Minv, self.jvp(pt, Deltas, v)))

        def solve(c):
            return _cg(lambda v: G_times(v) + c * v, -g), "cg"

        return g, solve, scale


def _two_sided_low_rank(K, U, e, N, k):
    """``Q K Q`` with ``Q = I - U diag(e) U^T`` acting on the sample index of both sides of a
    symmetric K of shape (N k, N k), rows and columns ordered (sample, output); U is (N, r).
    Returned Fortran-ordered, overwriting K, with (at least) its lower triangle correct. With
    ``Uk = U (x) I_k`` and ``E = diag(e) (x) I_k``: ``K - Uk C^T - C Uk^T`` where
    ``C^T = E Uk^T K - E (Uk^T K Uk) E Uk^T / 2``, as many flops as one side of the projection:
    for k = 1 one BLAS ``syr2k`` on the lower triangle."""
    r = U.shape[1]
    UtK = (U.T @ K.reshape(N, k * N * k)).reshape(r, k, N, k)  # Uk^T K, rows (a, j)
    UtKU = np.tensordot(UtK, U, axes=(2, 0)).transpose(0, 1, 3, 2)  # (r, k, r, k)
    inner = (e[:, None, None, None] * UtKU * e[None, None, :, None]).reshape(r * k, r, k)
    half = (inner.transpose(0, 2, 1) @ U.T).reshape(r, k, k, N).transpose(0, 1, 3, 2)
    Ct = e[:, None, None, None] * UtK - 0.5 * half
    F = K.T  # K's memory in Fortran order (K is symmetric)
    if k == 1:
        return scipy.linalg.blas.dsyr2k(-1.0, U, Ct.reshape(r, N).T, beta=1.0, c=F, lower=1, overwrite_c=1)
    Xt = (U @ Ct.reshape(r, k * N * k)).reshape(N * k, N * k)
    F -= Xt
    F -= Xt.T
    return F


def _cg(matvec, rhs, rtol=1e-10, max_iter=None):
    """Conjugate gradients for a symmetric positive definite operator."""
    x = np.zeros_like(rhs)
    r = rhs.copy()
    p = r.copy()
    rs = r @ r
    stop = (rtol * np.linalg.norm(rhs)) ** 2
    for _ in range(max_iter or 10 * len(rhs)):
        if rs <= stop:
            break
        Ap = matvec(p)
        a = rs / (p @ Ap)
        x += a * p
        r -= a * Ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


@dataclass
class BlockFit:
    """The result of :func:`fit_block`."""

    block: Block  # the adapted earlier layers (the last layer as pretrained)
    solution: object  # the last layer's ridge Solution at the final features
    loss_curve: np.ndarray  # the objective phi at the start and after each accepted step
    n_iter: int  # accepted steps
    solver: str
    objective0: float  # the pretrained block's weighted squared error (no penalty)
    damping: tuple | None  # (mu, nu) after the last step, for a warm start; None if no step tried


def row_space(A0, feature_eps=0.0):
    """An orthonormal basis V (d, rho) of the row space of the block's input ``A0`` (N, d) when
    its numerical rank rho is below d: singular values above ``data_rtol`` of the largest, the
    one-layer solver's rule (``max(N, d)`` float64 epsilons, or the features' own rounding
    ``feature_eps`` when they were computed in a lower precision). None when A0 has full
    column rank, or when its SVD would cost more than :data:`ROW_SPACE_MAX_FLOPS`."""
    N, d = A0.shape
    if min(N, d) == 0 or N * d * min(N, d) > ROW_SPACE_MAX_FLOPS:
        return None
    _, sv, Vt = scipy.linalg.svd(A0, full_matrices=False, check_finite=False)
    rank = int((sv > sv[0] * _solvers.data_rtol(A0.shape, feature_eps)).sum()) if sv[0] > 0 else 0
    return Vt[:rank].T if rank < d else None


def _reduced(block, V, ref):
    """``block`` with its first Linear restricted to the row space V of its input: weight
    ``W_1 V`` (m, rho); ``ref`` (the block the steps start from) fixes the directions outside,
    which the outputs on these features do not see."""
    return dataclasses.replace(block, weights=[ref.weights[0] @ V, *block.weights[1:]])


def fit_block(
    block,
    Z,
    Y,
    s,
    alpha,
    alpha_body,
    fit_intercept,
    max_iter,
    tol,
    feature_eps=0.0,
    form=None,
    start=None,
    reduce=True,
):
    """Minimise phi (module docstring) by Levenberg-Marquardt steps from the pretrained block, or
    from ``start = (theta, (mu, nu))`` (a previous fit's earlier layers and damping: a warm start;
    phi's penalty still pulls toward the pretrained block). ``form``: the step's system, see
    :meth:`_Problem.step_system`.

    When the features ``A0`` reaching the first Linear have numerical rank rho below their
    width d (fewer samples than features, or features of low rank), its weight only acts on the
    outputs through the row space V of A0: the steps solve the same problem for ``W_1 V``
    (m x rho instead of m x d parameters, features ``A0 V``), which gives the same iterates as
    the full parametrisation: its gradient and Gauss-Newton matrix vanish outside the row
    space, so no step moves there (unless a warm start lies outside it with alpha_body > 0,
    whose pull would move it: then the full parametrisation is kept). ``reduce=False`` keeps
    the full parametrisation (for tests)."""
    A0 = block_input(block, Z)
    if A0.ndim != 2 or A0.shape[1] != block.d_in:
        raise ValueError(
            f"The block's first Linear takes {block.d_in} inputs, but the features after the modules "
            f"before it have shape {A0.shape[1:]}; pass the block that belongs to these features."
        )
    ref = block if start is None else block.with_body(start[0])  # where the steps start
    V = row_space(A0, feature_eps) if reduce and block.n_layers > 1 else None
    if V is not None and alpha_body > 0:  # a start with a part outside the row space: alpha_body moves it
        change = ref.weights[0] - block.weights[0]
        if np.linalg.norm(change - change @ V @ V.T) > 1e-10 * np.linalg.norm(change):
            V = None
    if V is None:
        solved, A_solved, theta = block, A0, ref.body_params()
    else:
        solved, A_solved, theta = _reduced(block, V, block), A0 @ V, _reduced(ref, V, ref).body_params()
    prob = _Problem(solved, A_solved, Y, s, alpha, alpha_body, fit_intercept, feature_eps)
    prob.n_params = block.body_params().size
    R0 = hidden(block, A0)[0][-1] @ prob.W0.T + prob.b0 - Y  # the pretrained block's residual
    objective0 = float(s @ (R0 * R0).sum(axis=1))
    mu, nu = (None, None) if start is None else start[1]
    pt = prob.point(theta)
    curve, n_iter, solver = [pt.objective], 0, "closed form"
    while prob.theta0.size and n_iter < max_iter:
        g, solve, scale = prob.step_system(pt, form)
        if mu is None:
            mu, nu = TAU * max(scale, np.finfo(float).tiny), 2.0
        for _ in range(_MAX_REJECTED):
            delta, solver = solve(alpha_body + mu)
            trial = prob.point(pt.theta + delta)
            predicted = float(-g @ delta + mu * delta @ delta)
            if trial.objective < pt.objective and predicted > 0:
                rho = (pt.objective - trial.objective) / predicted
                mu *= max(1 / 3, 1 - (2 * rho - 1) ** 3)
                nu = 2.0
                break
            mu *= nu
            nu *= 2.0
        else:
            break  # no step decreases phi: a stationary point at this precision
        decrease = pt.objective - trial.objective
        pt = trial
        n_iter += 1
        curve.append(pt.objective)
        if decrease <= tol * pt.objective:
            break
    fitted = prob.block.with_body(pt.theta)
    if V is not None:  # back to the full first layer: the start's weights outside the row space
        W1 = ref.weights[0] + (fitted.weights[0] - ref.weights[0] @ V) @ V.T
        fitted = dataclasses.replace(fitted, weights=[W1, *fitted.weights[1:]])
    damping = None if mu is None else (mu, nu)
    return BlockFit(fitted, prob.solution(pt), np.array(curve), n_iter, solver, objective0, damping)


class BlockGeometry(LinearGeometry):
    """A block head's geometry: the last layer is linear in the block's hidden features, so
    predictions are ``H(Z) coef^T + intercept`` with the adapted earlier layers, and the
    exported layer is the whole block."""

    is_block = True

    def __init__(self, block):
        self.block = block

    @property
    def n_features(self):
        """Inputs the block takes (None when modules before its first Linear may reshape)."""
        return None if self.block.pre else self.block.d_in

    @property
    def n_layers(self):
        return self.block.n_layers

    def signature(self):
        return "block:" + ",".join(str(W.shape) for W in self.block.weights)

    def outputs(self, Z, feature_shape, coef, intercept):
        H = hidden(self.block, block_input(self.block, Z))[0][-1]
        return H @ coef.T + intercept

    def layer(self, coef, intercept, dtype):
        """The user's block (a copy) with the adapted weights, in the block's dtype."""
        out = copy.deepcopy(self.block.template)
        Ws = [*self.block.weights[:-1], coef]
        bs = [*self.block.biases[:-1], intercept]
        for pos, W, b in zip(self.block.positions, Ws, bs, strict=True):
            new = make_linear(W, b, out[pos].weight.dtype)
            out[pos].weight.data = new.weight.data
            if out[pos].bias is not None and b is not None:
                out[pos].bias.data = new.bias.data
            elif b is not None:  # an intercept fitted where the layer had none
                out[pos].bias = nn.Parameter(new.bias.data, requires_grad=False)
        return out.eval().requires_grad_(False)


def block_prior(head):
    """A block head as a :class:`Prior`: its last layer's weights, with the block's geometry."""
    block = parse_block(head)
    return Prior(block.weights[-1], block.biases[-1], block.dtype, BlockGeometry(block))
