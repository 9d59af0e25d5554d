"""diagnostics_: every number against a direct numpy / sklearn computation."""

import pickle

import numpy as np
import pytest
import torch
from conftest import make_body
from numpy.testing import assert_allclose
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Ridge
from torch import nn

from skl_transfer import (
    GradientDescentAdapter,
    LayerVariationalAdapter,
    LayerVariationalAdapterCV,
)


def oracle(Z, Y, s, W0, b0, alpha, fit_intercept):
    """Every diagnostic number, computed directly from the design (no skl_transfer code)."""
    Q = Y - Z @ W0.T - b0
    r = np.sqrt(s)[:, None]
    pos = s > 0
    ridge = Ridge(alpha=alpha, fit_intercept=fit_intercept, solver="svd").fit(Z, Q, sample_weight=s)
    after = Q - ridge.predict(Z).reshape(Q.shape)
    ybar = np.average(Y, axis=0, weights=s)
    out = {
        "residue_norm_per_output": np.sqrt(s @ Q**2),
        "residual_norm_per_output": np.sqrt(s @ after**2),
        "target_norm_per_output": np.sqrt(s @ (Y - ybar) ** 2),
    }
    for key in ("residue_norm", "residual_norm", "target_norm"):
        out[key] = np.sqrt(np.sum(out[key + "_per_output"] ** 2))
    # the weighted (centred) design; the constant column joins the span when the intercept is fitted
    A = r * (Z - np.average(Z, axis=0, weights=s)) if fit_intercept else r * Z
    aug = r * np.hstack([Z, np.ones((len(Z), 1))]) if fit_intercept else r * Z
    rank = np.linalg.matrix_rank(A[pos])
    sv = np.linalg.svd(A, compute_uv=False)
    out["rank"] = rank
    out["condition_number"] = sv[0] / sv[rank - 1]
    # the trace of the weighted hat matrix, the intercept's column unpenalised (it adds 1)
    pen = np.diag([1.0] * A.shape[1] + [0.0] * (aug.shape[1] - A.shape[1]))
    out["dof"] = np.trace(aug @ np.linalg.solve(aug.T @ aug + alpha * pen, aug.T))
    out["interpolating"] = np.linalg.matrix_rank(aug[pos]) == pos.sum()
    R = r * Q
    in_span = aug @ np.linalg.pinv(aug) @ R
    out["span_share_per_output"] = np.sum(in_span**2, 0) / np.sum(R**2, 0)
    out["span_share"] = np.sum(in_span**2) / np.sum(R**2)
    outside = R - aug @ np.linalg.lstsq(aug, R, rcond=None)[0]
    out["outside_share"] = np.sum(outside**2) / np.sum(R**2)
    Rc = r * (Q - np.average(Q, axis=0, weights=s)) if fit_intercept else R
    out["centred_span_share"] = np.sum((A @ np.linalg.pinv(A) @ Rc) ** 2) / np.sum(Rc**2)
    out["bias_share"] = (
        (s.sum() * np.sum(np.average(Q, axis=0, weights=s) ** 2) / np.sum(R**2)) if fit_intercept else 0.0
    )
    out["n_samples"] = out["n_rows"] = int(pos.sum())
    return out


def check_against_oracle(diag, expected, rtol=1e-7):
    for key, value in expected.items():
        got = getattr(diag, key)
        if isinstance(value, (bool, np.bool_, int, np.integer)):
            assert got == value, key
        else:
            assert_allclose(got, value, rtol=rtol, atol=1e-9, err_msg=key)


def problem(n, d, k=2, seed=0, weighted=False):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d)) + rng.normal(size=d)  # non-zero feature means
    W0 = rng.normal(size=(k, d))
    b0 = rng.normal(size=k)
    Y = Z @ (W0 + 0.5 * rng.normal(size=(k, d))).T + 1.0 + 0.3 * rng.normal(size=(n, k))
    s = rng.uniform(0.2, 3.0, size=n) if weighted else np.ones(n)
    if weighted:
        s[0] = 0.0  # a zero weight: that sample counts nowhere
    return Z, Y, s, W0, b0


@pytest.mark.parametrize("n, d", [(60, 6), (7, 15)], ids=["N>d primal", "N<d dual"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_adapter_diagnostics_match_direct_computation(n, d, weighted, fit_intercept, alpha):
    Z, Y, s, W0, b0 = problem(n, d, weighted=weighted)
    est = LayerVariationalAdapter(head=(W0, b0), alpha=alpha, fit_intercept=fit_intercept)
    est.fit(Z, Y, sample_weight=s)
    assert est.solver_ == ("primal" if n >= d else "dual")
    diag = est.diagnostics_
    expected = oracle(Z, Y, s, W0, b0, alpha, fit_intercept)
    check_against_oracle(diag, expected)
    assert diag.n_features == d and diag.n_outputs == 2 and diag.alpha == alpha
    assert diag.fit_intercept is fit_intercept
    assert diag.regime == ("interpolating" if expected["interpolating"] else "least-squares")
    assert_allclose(diag.weight, s.sum())
    # the regime is what the paper's data condition says: N <= d, full row rank -> zero residual at 0
    assert diag.interpolating == (n - (s == 0).sum() <= d)
    assert_allclose(diag.relative_residue, expected["residue_norm"] / expected["target_norm"])
    assert_allclose(diag.relative_residual, expected["residual_norm"] / expected["target_norm"], atol=1e-9)
    # the residue totals also agree with the estimator's own attributes
    assert_allclose(diag.residue_norm, est.residue_norm_, rtol=1e-10)


@pytest.mark.parametrize("n, d", [(40, 5), (6, 12)])
@pytest.mark.parametrize("weighted", [False, True])
def test_cv_diagnostics_at_the_chosen_alpha(n, d, weighted):
    Z, Y, s, W0, b0 = problem(n, d, k=1, seed=3, weighted=weighted)
    y = Y[:, 0]
    est = LayerVariationalAdapterCV(head=(W0[0], b0[0]), alphas=[0.01, 1.0, 30.0], cv=3).fit(
        Z, y, sample_weight=s
    )
    diag = est.diagnostics_
    check_against_oracle(diag, oracle(Z, Y, s, W0[:1], b0[:1], est.alpha_, True))
    assert diag.alpha == est.alpha_


def test_span_shares_add_up_and_outside_share_is_the_alpha0_residual():
    Z, Y, s, W0, b0 = problem(50, 4, seed=5, weighted=True)
    diag = LayerVariationalAdapter(head=(W0, b0), alpha=2.0).fit(Z, Y, sample_weight=s).diagnostics_
    at0 = LayerVariationalAdapter(head=(W0, b0), alpha=0.0).fit(Z, Y, sample_weight=s)
    assert_allclose(diag.span_share + diag.outside_share, 1.0)
    # the part outside the span is exactly what the unregularised update leaves (sklearn's lstsq)
    Q = Y - Z @ W0.T - b0
    Zi = np.hstack([Z, np.ones((50, 1))]) * np.sqrt(s)[:, None]
    coef = np.linalg.lstsq(Zi, Q * np.sqrt(s)[:, None], rcond=None)[0]
    left = np.sum((Q * np.sqrt(s)[:, None] - Zi @ coef) ** 2)
    assert_allclose(diag.outside_share * diag.residue_norm**2, left, rtol=1e-8)
    assert_allclose(at0.residual_norm_**2, left, rtol=1e-7)


def test_rank_deficient_features_use_the_solver_threshold():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(30, 3))
    Z = np.hstack([base, base[:, :2] * 2.0, base[:, :1] - base[:, 1:2]])  # rank 3 (centred), d = 6
    y = rng.normal(size=30)
    diag = LayerVariationalAdapter(head=(np.zeros(6), 0.0), alpha=0.1).fit(Z, y).diagnostics_
    Zc = Z - Z.mean(0)
    assert diag.rank == np.linalg.matrix_rank(Zc) == 3
    sv = np.linalg.svd(Zc, compute_uv=False)
    assert_allclose(diag.condition_number, sv[0] / sv[2])
    assert_allclose(diag.dof, 1 + np.sum(sv[:3] ** 2 / (sv[:3] ** 2 + 0.1)))  # + 1: the intercept
    assert not diag.interpolating


def test_duplicated_samples_are_not_interpolating():
    rng = np.random.default_rng(2)
    Z = rng.normal(size=(5, 10))
    Z = np.vstack([Z, Z[:2]])  # 7 samples, rank 5: the repeats have other targets
    y = rng.normal(size=7)
    diag = (
        LayerVariationalAdapter(head=(np.zeros(10), 0.0), alpha=0.0, fit_intercept=False)
        .fit(Z, y)
        .diagnostics_
    )
    assert diag.rank == np.linalg.matrix_rank(Z) == 5
    assert diag.n_rows == 7 and not diag.interpolating
    assert diag.outside_share > 0


def test_with_a_torch_extractor_and_linear_head():
    body = make_body(n_in=5, n_hidden=16)
    head = nn.Linear(16, 2, dtype=torch.float64)
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 5))
    Y = rng.normal(size=(40, 2))
    est = LayerVariationalAdapter(body, head, alpha=0.3).fit(X, Y)
    ref = make_body(n_in=5, n_hidden=16).eval()
    with torch.no_grad():
        Z = ref(torch.as_tensor(X)).numpy()
    W0, b0 = head.weight.detach().numpy(), head.bias.detach().numpy()
    check_against_oracle(est.diagnostics_, oracle(Z, Y, np.ones(40), W0, b0, 0.3, True), rtol=1e-6)


def test_conv_head_counts_patch_rows():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, dtype=torch.float64), nn.Tanh())
    head = nn.Conv2d(3, 2, 3, padding=1, dtype=torch.float64)
    X = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    Y = torch.randn(4, 2, 5, 5, dtype=torch.float64).numpy()
    for n_samples in (4, 1):  # 100 patch rows >= d = 27 (primal) and 25 < 27 (dual)
        est = LayerVariationalAdapter(body, head, alpha=0.5).fit(X[:n_samples], Y[:n_samples])
        with torch.no_grad():
            F = body(X[:n_samples])
        patches = torch.nn.functional.unfold(F, 3, padding=1).transpose(1, 2).reshape(-1, 27).numpy()
        rows = Y[:n_samples].reshape(n_samples, 2, -1).transpose(0, 2, 1).reshape(-1, 2)
        W0, b0 = head.weight.detach().reshape(2, -1).numpy(), head.bias.detach().numpy()
        diag = est.diagnostics_
        assert diag.n_samples == n_samples and diag.n_rows == 25 * n_samples
        check_against_oracle(
            diag,
            {**oracle(patches, rows, np.ones(len(rows)), W0, b0, 0.5, True), "n_samples": n_samples},
            rtol=1e-6,
        )


def test_partial_fit_first_batch_equals_fit_then_refuses():
    Z, Y, s, W0, b0 = problem(40, 5, seed=7)
    est = LayerVariationalAdapter(head=(W0, b0), alpha=0.2).partial_fit(Z, Y)
    check_against_oracle(est.diagnostics_, oracle(Z, Y, s, W0, b0, 0.2, True))
    est.partial_fit(Z[:10], Y[:10])
    with pytest.raises(AttributeError, match="partial_fit"):
        est.diagnostics_  # noqa: B018
    assert not hasattr(est, "diagnostics_")
    est.fit(Z, Y)  # a fit makes them available again
    check_against_oracle(est.diagnostics_, oracle(Z, Y, s, W0, b0, 0.2, True))


def test_unfitted_and_unsupported_estimators():
    with pytest.raises(NotFittedError):
        LayerVariationalAdapter().diagnostics_  # noqa: B018
    Z, Y, s, W0, b0 = problem(30, 3, k=1)
    gd = GradientDescentAdapter(head=(W0, b0), epochs=2).fit(Z, Y[:, 0])
    with pytest.raises(AttributeError, match="closed-form"):
        gd.diagnostics_  # noqa: B018


@pytest.mark.parametrize("n, d", [(50, 4), (5, 9)])
def test_report_survives_pickling(n, d):
    Z, Y, s, W0, b0 = problem(n, d, seed=8)
    expected = oracle(Z, Y, s, W0, b0, 1.0, True)
    est = LayerVariationalAdapter(head=(W0, b0)).fit(Z, Y)
    before = pickle.loads(pickle.dumps(est))  # pickled before the report was computed
    check_against_oracle(before.diagnostics_, expected)
    after = pickle.loads(pickle.dumps(est.diagnostics_))
    check_against_oracle(after, expected)
    assert repr(after) == repr(est.diagnostics_)


def test_repr_and_summary_are_readable():
    Z, Y, s, W0, b0 = problem(50, 4, seed=9)
    diag = LayerVariationalAdapter(head=(W0, b0), alpha=0.5).fit(Z, Y).diagnostics_
    text = diag.summary()
    assert f"{diag.residue_norm:.4g}" in text and f"{diag.residual_norm:.4g}" in text
    assert "least-squares regime" in text and "N = 50 samples, d = 4, k = 2" in text
    assert repr(diag).startswith("Diagnostics(residue") and "rank=4" in repr(diag)
    assert str(diag) == text
    row = diag.as_dict()
    assert row["rank"] == 4 and row["regime"] == "least-squares" and len(row["residue_norm_per_output"]) == 2


def test_constant_targets_give_nan_fractions_not_errors():
    Z = np.random.default_rng(0).normal(size=(20, 3))
    diag = LayerVariationalAdapter(head=(np.ones(3), 0.0)).fit(Z, np.full(20, 2.0)).diagnostics_
    assert diag.target_norm == 0.0 and np.isnan(diag.relative_residue)
    assert "nan" in diag.summary()
