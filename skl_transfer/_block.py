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
built from the block's structure, never the Jacobian) otherwise, and by conjugate gradients
on Jacobian-vector products when neither matrix fits :data:`SYSTEM_MAX_ENTRIES`.

The Jacobian's structure: with ``A_l`` the input of layer l, ``D_l`` the derivative of the
activation after it and ``Delta_l[i, j]`` the sensitivity of output j of sample i to layer l's
pre-activation (``Delta_{L-2}[i, j] = W_L[j] * D_{L-2}[i]``, then backwards through
``W_l``), the row (i, j) of the Jacobian holds ``sqrt(s_i) Delta_l[i, j] (x) [A_l[i], 1]`` for
every earlier layer l, so that ``J v``, ``J^T x`` and the tangent kernel
``K = sum_l (Delta_l Delta_l^T) * (A_l A_l^T + 1)`` cost O(N k m) each, O((N k)^2 m) for K.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from . import _solvers
from ._heads import LinearGeometry, Prior, _finite_layer, make_linear
from ._torch import from_numpy, to_float64

SYSTEM_MAX_ENTRIES = 1 << 27  # a primal P x P or dual Nk x Nk system of at most 1 GiB (float64)
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
    with threadpool_limits(1, user_api="blas"):
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
        ) / max(P, 1)
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
            K = np.zeros((N * k, N * k))
            for l, Delta in enumerate(Deltas):
                Dl = Delta.reshape(N * k, -1)
                K += (Dl @ Dl.T) * self.input_kernel(pt, l)

            def Q(X):  # (N k,) -> (I - Pi) per output, flattened
                return self.project_off(B, Minv, X.reshape(N, k)).ravel()

            Kr = K.reshape(N, k * N * k)  # (I - Pi) on every column of K, output by output
            QK = (Kr - B @ (Minv @ (B.T @ Kr))).reshape(N * k, N * k)

            QJg = Q(self.jvp(pt, Deltas, g).ravel())
            diag = np.diag_indices_from(QK)
            QK_diag = QK[diag].copy()

            def solve(c):
                # (c I + J^T Q J)^{-1} = (I - J^T (c I + Q K)^{-1} Q J) / c; the LU overwrites a
                # copy of c I + Q K (QK itself is kept for the next damping)
                A = QK.copy()
                A[diag] = QK_diag + c
                x = scipy.linalg.lu_solve(
                    scipy.linalg.lu_factor(A, overwrite_a=True, check_finite=False), QJg
                )
                return -(g - self.vjp(pt, Deltas, x.reshape(N, k))) / c, "dual"

            return g, solve, scale

        def G_times(v):
            return self.vjp(pt, Deltas, self.project_off(B, Minv, self.jvp(pt, Deltas, v)))

        def solve(c):
            return _cg(lambda v: G_times(v) + c * v, -g), "cg"

        return g, solve, scale


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


def fit_block(block, Z, Y, s, alpha, alpha_body, fit_intercept, max_iter, tol, feature_eps=0.0, form=None):
    """Minimise phi (module docstring) from the pretrained block by Levenberg-Marquardt steps
    (``form``: the step's system, see :meth:`_Problem.step_system`)."""
    A0 = block_input(block, Z)
    if A0.ndim != 2 or A0.shape[1] != block.d_in:
        raise ValueError(
            f"The block's first Linear takes {block.d_in} inputs, but the features after the modules "
            f"before it have shape {A0.shape[1:]}; pass the block that belongs to these features."
        )
    prob = _Problem(block, A0, Y, s, alpha, alpha_body, fit_intercept, feature_eps)
    H0 = hidden(block, A0)[0][-1]
    R0 = H0 @ prob.W0.T + prob.b0 - Y
    objective0 = float(s @ (R0 * R0).sum(axis=1))
    pt = prob.point(prob.theta0)
    curve, n_iter, solver = [pt.objective], 0, "closed form"
    mu = nu = None
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
    fitted = block.with_body(pt.theta)
    return BlockFit(fitted, prob.solution(pt), np.array(curve), n_iter, solver, objective0)


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
