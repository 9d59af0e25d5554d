"""Known-answer tests of the pure maths in skl_transfer._solvers (numpy oracles only)."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from skl_transfer import _solvers


def _data(n, d, k, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d)) + rng.normal(size=d)
    Q = rng.normal(size=(n, k)) + Z @ rng.normal(size=(d, k))
    s = rng.uniform(0.2, 3.0, size=n)
    return Z, Q, s


def _direct_ridge(Z, Q, s, alpha, fit_intercept):
    """Oracle: the augmented least-squares system solved by numpy's lstsq."""
    n, d = Z.shape
    r = np.sqrt(s)[:, None]
    if fit_intercept:
        Za = np.hstack([Z, np.ones((n, 1))])
        pen = np.hstack([np.sqrt(alpha) * np.eye(d), np.zeros((d, 1))])
    else:
        Za, pen = Z, np.sqrt(alpha) * np.eye(Z.shape[1])
    A = np.vstack([r * Za, pen])
    b = np.vstack([r * Q, np.zeros((d, Q.shape[1]))])
    sol = np.linalg.lstsq(A, b, rcond=None)[0]
    return (sol[:d], sol[d] if fit_intercept else np.zeros(Q.shape[1]))


def test_merge_equals_moments_of_concatenation():
    Z, Q, s = _data(300, 7, 3)
    whole = _solvers.batch_moments(Z, Q, s)
    merged = _solvers.batch_moments(Z[:1], Q[:1], s[:1])
    for lo in range(1, 300, 37):
        hi = min(lo + 37, 300)
        merged = _solvers.merge_moments(merged, _solvers.batch_moments(Z[lo:hi], Q[lo:hi], s[lo:hi]))
    for a, b in zip(whole, merged, strict=True):
        assert_allclose(a, b, rtol=1e-12, atol=1e-10)
    # and the centred moments are what numpy says they are
    mz = np.average(Z, axis=0, weights=s)
    assert_allclose(whole.G, (Z - mz).T @ ((Z - mz) * s[:, None]), rtol=1e-12)


def test_merge_with_zero_weight_batch_is_identity():
    Z, Q, s = _data(20, 3, 2)
    m = _solvers.batch_moments(Z, Q, s)
    empty = _solvers.batch_moments(Z[:4], Q[:4], np.zeros(4))
    for a, b in zip(m, _solvers.merge_moments(m, empty), strict=True):
        assert_allclose(a, b)
    for a, b in zip(m, _solvers.merge_moments(empty, m), strict=True):
        assert_allclose(a, b)


@pytest.mark.parametrize("mode", ["torch", "syrk_each", "syrk_held", "syrk_held_one_thread", "syrk_chunks"])
@pytest.mark.parametrize("weights", ["varied", "equal", "equal_per_batch", "with_zero_batch"])
def test_streaming_moment_sums_equal_direct_centred_products(mode, weights):
    """The in-place accumulator (torch's blocked upper triangle, or BLAS syrk per batch, on
    all the rows held at once, or on chunks of them; rank-1 mean corrections) gives numpy's
    weighted centred products, for uneven batch sizes."""
    torch = pytest.importorskip("torch")
    from skl_transfer._moments import MomentSums

    Z, Q, s = _data(613, 300, 3, seed=4)
    Z += 50.0  # a large common offset: the per-batch centring must keep the digits
    edges = [0, 1, 100, 250, 251, 500, 613]
    if weights == "equal":
        s = np.full(613, 2.5)
    elif weights == "equal_per_batch":  # held rows of batches with other common factors
        s = np.repeat([0.5, 2.5, 1.0, 4.0, 0.7, 3.0], np.diff(edges))
    elif weights == "with_zero_batch":
        s[100:250] = 0.0
    threads = torch.get_num_threads()
    # blas=True (features passed in) multiplies each batch at once; on one torch thread the
    # rows are held as on two
    torch.set_num_threads(1 if mode == "syrk_held_one_thread" else max(2, threads))
    try:
        held = {"syrk_held": 613, "syrk_held_one_thread": 613, "syrk_chunks": 260}.get(mode, 0)
        acc = MomentSums(300, 3, "cpu", blas=mode == "syrk_each", rows=613 if mode == "syrk_each" else held,
                         syrk=mode != "torch")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert (acc._syrk is not None) == (mode != "torch")
    assert acc._cap == held
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        acc.add(*(torch.as_tensor(a[lo:hi]) for a in (Z, Q, s)))
    m = acc.moments()
    mz, mq = np.average(Z, axis=0, weights=s), np.average(Q, axis=0, weights=s)
    Zc, Qc = Z - mz, Q - mq
    assert m.weight == pytest.approx(s.sum(), rel=1e-14)
    assert_allclose(m.mean_z, mz, rtol=1e-13)
    assert_allclose(m.mean_q, mq, rtol=1e-12, atol=1e-12)
    assert_allclose(m.G, (Zc * s[:, None]).T @ Zc, rtol=1e-11, atol=1e-9)
    assert_allclose(m.G, m.G.T, rtol=0, atol=0)  # exactly symmetric
    assert_allclose(m.B, (Zc * s[:, None]).T @ Qc, rtol=1e-11, atol=1e-8)
    assert m.qq == pytest.approx(float(s @ (Qc**2).sum(1)), rel=1e-12)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("alpha", [0.3, 10.0])
@pytest.mark.parametrize("n, d", [(200, 6), (5, 12)])
def test_primal_and_dual_equal_direct_least_squares(n, d, alpha, fit_intercept):
    Z, Q, s = _data(n, d, 2)
    dWt_ref, db_ref = _direct_ridge(Z, Q, s, alpha, fit_intercept)
    p = _solvers.ridge_primal(_solvers.batch_moments(Z, Q, s), alpha, fit_intercept)
    q = _solvers.ridge_dual(Z, Q, s, alpha, fit_intercept)
    for dWt, db, res in (p, q):
        assert_allclose(dWt, dWt_ref, rtol=1e-9, atol=1e-11)
        assert_allclose(db, db_ref, rtol=1e-9, atol=1e-11)
        R = Q - Z @ dWt_ref - db_ref
        assert_allclose(res, np.sum(s[:, None] * R**2), rtol=1e-7)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_alpha_zero_is_pinv_for_rank_deficient_features(fit_intercept):
    rng = np.random.default_rng(3)
    for n, d in [(40, 10), (6, 10)]:
        Z = rng.normal(size=(n, d))
        Z[:, 3] = Z[:, 1] * 2.0  # a duplicated direction
        Z[:, 7] = 0.0  # a dead unit
        Q = rng.normal(size=(n, 2))
        s = np.ones(n)
        Zc, Qc = (Z - Z.mean(0), Q - Q.mean(0)) if fit_intercept else (Z, Q)
        ref = np.linalg.pinv(Zc) @ Qc
        p = _solvers.ridge_primal(_solvers.batch_moments(Z, Q, s), 0.0, fit_intercept)[0]
        q = _solvers.ridge_dual(Z, Q, s, 0.0, fit_intercept)[0]
        for dWt in (p, q):
            assert np.isfinite(dWt).all()
            assert_allclose(dWt, ref, rtol=1e-7, atol=1e-8)


def test_solve_gram_all_zero_matrix_gives_zero():
    out = _solvers.solve_gram(np.zeros((3, 3)), np.ones((3, 2)), 0.0, 1e-12)
    assert_allclose(out, 0.0)


def _brute_force(Z, Q, s, train, alpha, fit_intercept):
    """Oracle on the training rows: the augmented least-squares solve, or at alpha = 0 with an
    intercept, numpy's pinv of the weighted, centred features (the minimum-norm dW with a free,
    unpenalised bias, which lstsq on the augmented system would not give when n < d)."""
    Z, Q, s = Z[train], Q[train], s[train]
    if alpha == 0 and fit_intercept:
        mz, mq = np.average(Z, axis=0, weights=s), np.average(Q, axis=0, weights=s)
        r = np.sqrt(s)[:, None]
        dWt = np.linalg.pinv(r * (Z - mz)) @ (r * (Q - mq))
        return dWt, mq - mz @ dWt
    return _direct_ridge(Z, Q, s, alpha, fit_intercept)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_subtract_moments_inverts_merge(fit_intercept):
    Z, Q, s = _data(90, 5, 2)
    a = _solvers.batch_moments(Z[:60], Q[:60], s[:60])
    b = _solvers.batch_moments(Z[60:], Q[60:], s[60:])
    back = _solvers.subtract_moments(_solvers.merge_moments(a, b), b)
    for x, y in zip(a, back, strict=True):
        assert_allclose(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("n, d", [(60, 6), (9, 14)])  # primal folds, dual folds
def test_kfold_path_equals_brute_force(n, d, fit_intercept):
    Z, Q, s = _data(n, d, 2, seed=4)
    s[1] = 0.0
    folds = [(np.setdiff1d(np.arange(n), te), te) for te in np.array_split(np.arange(n), 3)]
    alphas = [0.0, 0.05, 3.0]
    seen = 0
    for fold, j, pred in _solvers.kfold_path(Z, Q, s, folds, alphas, fit_intercept):
        train, test = folds[fold]
        dWt, db = _brute_force(Z, Q, s, train, alphas[j], fit_intercept)
        assert_allclose(pred, Z[test] @ dWt + db, rtol=1e-7, atol=1e-8)
        seen += 1
    assert seen == 9


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("n, d", [(40, 6), (8, 12)])
def test_loo_path_equals_brute_force(n, d, fit_intercept):
    Z, Q, s = _data(n, d, 2, seed=5)
    s[2] = 0.0  # a zero-weight sample: its own removal changes nothing
    alphas = [0.1, 2.0]
    loo = dict(_solvers.loo_path(Z, Q, s, alphas, fit_intercept))
    for j, alpha in enumerate(alphas):
        for i in range(n):
            dWt, db = _brute_force(Z, Q, s, np.arange(n) != i, alpha, fit_intercept)
            assert_allclose(loo[j][i], Z[i] @ dWt + db, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("n", [5, 200, 1001])
def test_gram_of_row_blocks_in_threads_equals_the_product(n, workers):
    """``gram`` (row blocks multiplied in parallel threads on one BLAS thread each, summed)
    gives numpy's ``A^T A`` of the whole array, and leaves BLAS's thread count as it was."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})

    A = np.random.default_rng(n).normal(size=(n, 37)) + 3.0
    before = blas_threads()
    G = _solvers.gram(A, workers)
    assert blas_threads() == before
    ref = np.einsum("ni,nj->ij", A, A)  # no BLAS: an independent sum of products
    assert_allclose(G, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    assert_allclose(G, G.T, rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 1e-11])
@pytest.mark.parametrize("cond, preconditioner", [(3e4, "cholesky"), (1e6, "spectral")])
def test_refinement_against_the_rows_equals_least_squares(cond, preconditioner, alpha, monkeypatch):
    """An ill-conditioned design (Cholesky of the moments not trusted): the update refined
    against the rows equals numpy's lstsq on the augmented rows, whether the corrections come
    from a Cholesky factor (condition well above the spectral threshold) or from the spectral
    decomposition (closer to it)."""
    rng = np.random.default_rng(3)
    n, d = 400, 30
    U, _ = np.linalg.qr(rng.normal(size=(n, d)))
    V, _ = np.linalg.qr(rng.normal(size=(d, d)))
    Z = (U * np.geomspace(1.0, 1.0 / cond, d)) @ V.T * 3.0
    Q = Z @ rng.normal(size=(d, 2)) + 0.01 * rng.normal(size=(n, 2))
    s = np.ones(n)
    used = []
    real_spectral = _solvers.spectral
    monkeypatch.setattr(
        _solvers, "spectral", lambda *a, **k: used.append("spectral") or real_spectral(*a, **k)
    )
    m = _solvers.batch_moments(Z, Q, s)
    G = _solvers.uncentred(m)[0]
    assert _solvers.solve_gram(G, G[:, :2], alpha, fallback=False) is None  # the data path
    dWt, _, _ = _solvers.ridge_primal(m, alpha, False, data=(Z, Q, s))
    assert ("spectral" in used) == (preconditioner == "spectral")
    A = np.vstack([Z, np.sqrt(alpha) * np.eye(d)])
    ref = np.linalg.lstsq(A, np.vstack([Q, np.zeros((d, 2))]), rcond=None)[0]
    assert_allclose(dWt, ref, rtol=0, atol=1e-13 * cond * np.abs(ref).max())


def _gram_problems():
    """Gram matrices of random features at several scales, ranks and alphas (rank-deficient and
    badly scaled ones included), with the equilibrated matrix of each."""
    rng = np.random.default_rng(7)
    for n_rows, d, scale, rank, big in [
        (50, 20, 1.0, 20, 1.0),
        (400, 60, 1e3, 60, 1.0),
        (400, 60, 1.0, 60, 1e3),
        (30, 40, 1.0, 30, 1e3),
        (200, 50, 1e-4, 10, 1e3),
    ]:
        Z = rng.normal(size=(n_rows, rank)) @ rng.normal(size=(rank, d)) * scale
        Z[:, 0] *= big  # in some, one column far larger than the others
        A = Z.T @ Z
        for alpha in (1e-12, 1e-6, 1e-3, 1.0, 1e3):
            c2 = np.diag(A) + alpha
            H = (A + alpha * np.eye(d)) / np.sqrt(np.outer(c2, c2))
            yield A, alpha, c2, H


def test_the_condition_floor_is_below_the_true_and_the_estimated_reciprocal_condition():
    """The bound that lets a Cholesky solve skip LAPACK's condition estimate: never above the
    true reciprocal 1-norm condition number (numpy's inverse) nor above dpocon's estimate."""
    from scipy.linalg import lapack

    met = 0
    for _, alpha, c2, H in _gram_problems():
        anorm = np.abs(H).sum(axis=0).max()
        floor = _solvers._rcond_floor(c2, alpha, anorm)
        true = 1.0 / (anorm * np.abs(np.linalg.inv(H)).sum(axis=0).max())
        L, info = lapack.dpotrf(H, lower=0, clean=1)
        assert info == 0
        estimate = lapack.dpocon(L, anorm)[0]
        assert floor <= true * (1 + 1e-9) and floor <= estimate * (1 + 1e-9), (alpha, floor, true, estimate)
        met += floor >= _solvers.CHOLESKY_MIN
    assert met >= 3  # the bound does settle some of them


def test_solving_with_the_condition_floor_is_the_solve_with_lapacks_estimate():
    """The same choice of method and the same bits as with the estimate computed."""
    rng = np.random.default_rng(8)
    for A, alpha, _, _ in _gram_problems():
        R = rng.normal(size=(A.shape[0], 2))
        idx = np.arange(A.shape[0])
        x_est, rcond_est = _solvers._scaled_cholesky(A, R, alpha, idx)
        x_floor, rcond_floor = _solvers._scaled_cholesky(A, R, alpha, idx, need=_solvers.CHOLESKY_MIN)
        assert (rcond_floor >= _solvers.CHOLESKY_MIN) == (rcond_est >= _solvers.CHOLESKY_MIN)
        np.testing.assert_array_equal(x_floor, x_est)
        X, cond = _solvers.solve_gram(A, R, alpha, return_cond=True)
        np.testing.assert_array_equal(_solvers.solve_gram(A, R, alpha), X)
