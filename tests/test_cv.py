"""LayerVariationalAdapterCV against brute force: GridSearchCV and explicit leave-one-out."""

import numpy as np
import pytest
import torch
from conftest import CountingModule, make_body, make_head
from numpy.testing import assert_allclose
from sklearn.model_selection import GridSearchCV, KFold, LeaveOneOut, ShuffleSplit

from skl_transfer import LayerVariationalAdapter, LayerVariationalAdapterCV

ALPHAS = [0.0, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]


def _data(n, k=1, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    y = np.sin(X @ rng.normal(size=(5, k))) + 0.3 * rng.normal(size=(n, k))
    return X, (y[:, 0] if k == 1 else y)


@pytest.mark.parametrize("n, k", [(120, 1), (120, 2), (12, 1)])  # primal folds; dual folds (d = 16)
@pytest.mark.parametrize("scoring", ["neg_mean_squared_error", None])
def test_kfold_equals_grid_search(n, k, scoring):
    body, head = make_body(), make_head(n_out=k)
    X, y = _data(n, k)
    cv = KFold(5, shuffle=True, random_state=0)
    est = LayerVariationalAdapterCV(body, head, alphas=ALPHAS, cv=cv, scoring=scoring).fit(X, y)
    grid = GridSearchCV(LayerVariationalAdapter(body, head), {"alpha": ALPHAS}, cv=cv, scoring=scoring).fit(
        X, y
    )
    res = grid.cv_results_
    assert_allclose(est.cv_results_["mean_test_score"], res["mean_test_score"], rtol=1e-8)
    for i in range(5):
        assert_allclose(est.cv_results_[f"split{i}_test_score"], res[f"split{i}_test_score"], rtol=1e-8)
    assert_allclose(est.cv_results_["std_test_score"], res["std_test_score"], rtol=1e-6, atol=1e-12)
    assert est.alpha_ == grid.best_params_["alpha"]
    assert_allclose(est.best_score_, grid.best_score_, rtol=1e-8)
    assert list(est.cv_results_["rank_test_score"]) == list(res["rank_test_score"])
    # the refit is LayerVariationalAdapter with alpha_
    ref = LayerVariationalAdapter(body, head, alpha=est.alpha_).fit(X, y)
    assert_allclose(est.coef_, ref.coef_, rtol=1e-8, atol=1e-10)
    assert_allclose(est.predict(X), ref.predict(X), rtol=1e-8, atol=1e-10)


def test_kfold_with_sample_weight_equals_grid_search():
    body, head = make_body(), make_head()
    X, y = _data(100)
    sw = np.random.default_rng(3).uniform(0.0, 2.0, 100)
    cv = KFold(5, shuffle=True, random_state=0)
    est = LayerVariationalAdapterCV(body, head, alphas=ALPHAS, cv=cv, scoring="neg_mean_squared_error")
    est.fit(X, y, sample_weight=sw)
    grid = GridSearchCV(
        LayerVariationalAdapter(body, head), {"alpha": ALPHAS}, cv=cv, scoring="neg_mean_squared_error"
    ).fit(X, y, sample_weight=sw)
    assert_allclose(est.cv_results_["mean_test_score"], grid.cv_results_["mean_test_score"], rtol=1e-8)
    assert est.alpha_ == grid.best_params_["alpha"]


@pytest.mark.parametrize("n", [40, 10])  # primal (n >= d = 16) and dual
@pytest.mark.parametrize("weighted", [False, True])
def test_leave_one_out_equals_brute_force(n, weighted):
    body, head = make_body(), make_head()
    X, y = _data(n)
    sw = np.random.default_rng(4).uniform(0.2, 2.0, n) if weighted else np.ones(n)
    alphas = ALPHAS[1:]
    est = LayerVariationalAdapterCV(body, head, alphas=alphas).fit(
        X, y, sample_weight=sw if weighted else None
    )
    brute = []
    for alpha in alphas:
        err = np.empty(n)
        for train, test in LeaveOneOut().split(X):
            fit = LayerVariationalAdapter(body, head, alpha=alpha).fit(
                X[train], y[train], sample_weight=sw[train]
            )
            err[test] = (y[test] - fit.predict(X[test])) ** 2
        brute.append(-np.sum(sw * err) / np.sum(sw))
    assert_allclose(est.cv_results_["mean_test_score"], brute, rtol=1e-8)
    assert est.alpha_ == alphas[int(np.argmax(brute))]


def test_leave_one_out_with_a_scorer_uses_all_predictions_at_once():
    body, head = make_body(), make_head()
    X, y = _data(30)
    est = LayerVariationalAdapterCV(body, head, alphas=[0.1, 1.0], scoring="r2").fit(X, y)
    from sklearn.metrics import r2_score

    for j, alpha in enumerate([0.1, 1.0]):
        pred = np.empty(30)
        for train, test in LeaveOneOut().split(X):
            pred[test] = (
                LayerVariationalAdapter(body, head, alpha=alpha).fit(X[train], y[train]).predict(X[test])
            )
        assert_allclose(est.cv_results_["mean_test_score"][j], r2_score(y, pred), rtol=1e-8)


def test_the_extractor_runs_once_per_sample():
    body = CountingModule(make_body())
    X, y = _data(90)
    LayerVariationalAdapterCV(body, make_head(), alphas=np.logspace(-3, 3, 30), cv=5).fit(X, y)
    assert body.rows_seen == 92  # +2: the determinism probe (first sample alone, twice)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alphas=[1.0, -1.0]), "alphas must be >= 0"),
        (dict(alphas=[0.0, 1.0]), "alpha = 0 is not allowed with cv=None"),
        (dict(alphas=[]), "non-empty"),
    ],
)
def test_bad_alphas(kwargs, match):
    X, y = _data(20)
    with pytest.raises(ValueError, match=match):
        LayerVariationalAdapterCV(**kwargs).fit(X, y)


def test_cv_to_module_and_pickle():
    import pickle

    body, head = make_body().float(), make_head().float()
    X, y = _data(60)
    est = LayerVariationalAdapterCV(body, head, alphas=[0.1, 1.0, 10.0], cv=3).fit(X, y)
    again = pickle.loads(pickle.dumps(est))
    assert_allclose(again.predict(X), est.predict(X))
    out = est.to_module()(torch.as_tensor(X, dtype=torch.float32)).double().numpy()[:, 0]
    assert_allclose(out, est.predict(X), rtol=1e-5, atol=1e-5)


def test_verbose_shows_progress_bars(capsys):
    pytest.importorskip("tqdm")
    X, y = _data(60)
    LayerVariationalAdapterCV(make_body(), make_head(), cv=3, verbose=1, batch_size=8).fit(X, y)
    err = capsys.readouterr().err
    assert "LayerVariationalAdapterCV features" in err and "folds x alphas" in err


def test_scorers_get_inputs_and_weights_like_grid_search():
    from sklearn.metrics import make_scorer, mean_squared_error

    def x_weighted(estimator, X, y, sample_weight=None):  # a scorer that reads X
        pred = estimator.predict(X)
        return -np.average((pred - y) ** 2 * (1 + X[:, 0] ** 2), weights=sample_weight)

    body, head = make_body(), make_head()
    X, y = _data(80)
    sw = np.random.default_rng(6).uniform(0.0, 2.0, 80)
    cv = KFold(4, shuffle=True, random_state=0)
    for scoring in (x_weighted, make_scorer(mean_squared_error, greater_is_better=False)):
        est = LayerVariationalAdapterCV(body, head, alphas=ALPHAS, cv=cv, scoring=scoring).fit(
            X, y, sample_weight=sw
        )
        grid = GridSearchCV(LayerVariationalAdapter(body, head), {"alpha": ALPHAS}, cv=cv, scoring=scoring)
        grid.fit(X, y, sample_weight=sw)
        assert_allclose(est.cv_results_["mean_test_score"], grid.cv_results_["mean_test_score"], rtol=1e-8)
    # leave-one-out with a scorer: weighted like the default leave-one-out score
    loo = LayerVariationalAdapterCV(body, head, alphas=[0.1, 1.0], scoring="neg_mean_squared_error")
    loo.fit(X, y, sample_weight=sw)
    default = LayerVariationalAdapterCV(body, head, alphas=[0.1, 1.0]).fit(X, y, sample_weight=sw)
    assert_allclose(loo.cv_results_["mean_test_score"], default.cv_results_["mean_test_score"], rtol=1e-10)


def test_splitter_whose_train_is_not_the_complement_of_test_equals_grid_search():
    # ShuffleSplit with a train_size leaves samples out of both sides: training moments
    # cannot be the total minus the held-out part.
    rng = np.random.default_rng(5)
    Z = rng.normal(size=(60, 5))
    y = Z @ rng.normal(size=5) + rng.normal(size=60)
    cv = ShuffleSplit(n_splits=3, test_size=0.2, train_size=0.5, random_state=0)
    alphas = [0.1, 1.0, 10.0]
    est = LayerVariationalAdapterCV(alphas=alphas, cv=cv, scoring="neg_mean_squared_error").fit(Z, y)
    grid = GridSearchCV(
        LayerVariationalAdapter(), {"alpha": alphas}, cv=cv, scoring="neg_mean_squared_error"
    ).fit(Z, y)
    assert_allclose(est.cv_results_["mean_test_score"], grid.cv_results_["mean_test_score"], rtol=1e-10)


def test_fast_regression_scores_equal_sklearns():
    """The CV's direct R^2 and negative MSE equal sklearn's metrics (1-D and 2-D targets, with
    and without weights); sklearn's special cases (a constant output, one sample) fall back."""
    from sklearn.metrics import mean_squared_error, r2_score

    from skl_transfer._cv import _fast_neg_mse, _fast_r2

    rng = np.random.default_rng(0)
    for shape in [(40,), (40, 3)]:
        y, pred, w = rng.normal(size=shape), rng.normal(size=shape), rng.uniform(0.1, 2, 40)
        for weights in (None, w):
            ref = r2_score(y, pred, sample_weight=weights)
            assert np.isclose(_fast_r2(y, pred, weights), ref, rtol=1e-12)
            ref = -mean_squared_error(y, pred, sample_weight=weights)
            assert np.isclose(_fast_neg_mse(y, pred, weights), ref, rtol=1e-12)
    constant = np.ones((10, 2))
    constant[:, 1] = rng.normal(size=10)
    assert _fast_r2(constant, rng.normal(size=(10, 2)), None) is None
    assert _fast_r2(np.ones(1), np.zeros(1), None) is None
    assert _fast_neg_mse(np.ones(3), np.zeros(3), np.zeros(3)) is None


def test_leave_one_out_near_interpolation_equals_brute_force():
    # fewer rows than features and alphas far below the kernel's eigenvalues: the fits nearly
    # interpolate, and the residual and 1 - h were differences of numbers near R and 1 (the
    # score was 1e-5 off at alpha = 1e-8)
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import LeaveOneOut

    rng = np.random.default_rng(0)
    n, d = 30, 80
    Z = np.tanh(rng.normal(size=(n, 8)) @ rng.normal(size=(8, d))) + 0.01 * rng.normal(size=(n, d))
    y = Z[:, :3].sum(1) + 0.1 * rng.normal(size=n)
    sw = rng.uniform(0.5, 2.0, n)
    alphas = [1e-8, 1e-6, 1e-3, 1.0]
    for weights in (None, sw):
        est = LayerVariationalAdapterCV(alphas=alphas, cv=None, scoring="neg_mean_squared_error")
        est.fit(Z, y, sample_weight=weights)
        brute = []
        for a in alphas:
            errs = []
            for tr, te in LeaveOneOut().split(Z):
                w = None if weights is None else weights[tr]
                errs.append(
                    (
                        Ridge(alpha=a, solver="svd").fit(Z[tr], y[tr], sample_weight=w).predict(Z[te])[0]
                        - y[te][0]
                    )
                    ** 2
                )
            brute.append(-np.average(errs, weights=weights))  # held-out errors weighted as fitted
        assert_allclose(est.cv_results_["mean_test_score"], brute, rtol=1e-9)
