"""LayerVariationalClassifierCV: alpha by cross-validation at about the cost of one fit,
against brute force (a LayerVariationalClassifier refitted per held-out split)."""

import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.model_selection import KFold
from sklearn.utils.estimator_checks import parametrize_with_checks

from skl_transfer import LayerVariationalClassifier, LayerVariationalClassifierCV

ALPHAS = [0.01, 0.3, 3.0, 30.0]


def _data(n=50, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d))
    W0, b0 = rng.normal(size=(k, d)), 0.1 * rng.normal(size=k)
    y = (Z @ W0.T + b0 + rng.normal(size=(n, k))).argmax(1)  # the head is right, noisily
    return Z, y, (W0 + 0.5 * rng.normal(size=(k, d)), b0)


def _brute(Z, y, head, s, splits, **kw):
    """Weighted held-out accuracy per alpha, refitting the single-alpha classifier."""
    hits = np.zeros((len(ALPHAS), len(y)))
    for j, alpha in enumerate(ALPHAS):
        for train, test in splits:
            clf = LayerVariationalClassifier(None, head, alpha=alpha, **kw)
            clf.fit(Z[train], y[train], sample_weight=s[train])
            hits[j, test] = clf.predict(Z[test]) == y[test]
    return hits @ s / s.sum()


@pytest.mark.parametrize("cv", [None, KFold(5, shuffle=True, random_state=1)])
@pytest.mark.parametrize(
    "encoding, link", [("onehot", "softmax"), ("margin", "softmax"), ("onehot", "sigmoid")]
)
def test_scores_equal_brute_force(cv, encoding, link):
    Z, y, head = _data()
    s = np.random.default_rng(3).uniform(0.5, 2.0, len(y))
    n = len(y)
    splits = (
        [(np.delete(np.arange(n), i), np.array([i])) for i in range(n)] if cv is None else list(cv.split(Z))
    )
    # a fixed margin: the targets of a sample do not depend on the others (margin="auto" does)
    kw = dict(encoding=encoding, margin=2.0, link=link)
    est = LayerVariationalClassifierCV(None, head, alphas=ALPHAS, cv=cv, **kw).fit(Z, y, sample_weight=s)
    ref = _brute(Z, y, head, s, splits, **kw)
    assert_allclose(est.cv_results_["mean_test_score"], ref, rtol=0, atol=1e-12)
    assert est.alpha_ == ALPHAS[int(np.argmax(ref))]
    refit = LayerVariationalClassifier(None, head, alpha=est.alpha_, **kw).fit(Z, y, sample_weight=s)
    assert_allclose(est.coef_, refit.coef_, rtol=1e-12, atol=1e-12)
    assert_allclose(est.intercept_, refit.intercept_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cv", [None, 4])
def test_multilabel_scores_equal_brute_force(cv):
    # sigmoid link, indicator y (a sample's label and its neighbour, as in CREPE's pitch bins):
    # the score is the weighted share of held-out samples whose top logit is one of their labels
    Z, y, head = _data(k=5)
    Y = np.zeros((len(y), 5), dtype=int)
    Y[np.arange(len(y)), y] = 1
    Y[np.arange(len(y)), (y + 1) % 5] = 1
    s = np.random.default_rng(3).uniform(0.5, 2.0, len(y))
    n = len(y)
    splits = (
        [(np.delete(np.arange(n), i), np.array([i])) for i in range(n)]
        if cv is None
        else list(KFold(cv, shuffle=True, random_state=0).split(Z))  # rare: shuffled K-fold
    )
    kw = dict(link="sigmoid", margin=2.0)
    est = LayerVariationalClassifierCV(None, head, alphas=ALPHAS, cv=cv, **kw).fit(Z, Y, sample_weight=s)
    hits = np.zeros((len(ALPHAS), n))
    for j, alpha in enumerate(ALPHAS):
        for train, test in splits:
            clf = LayerVariationalClassifier(None, head, alpha=alpha, **kw)
            clf.fit(Z[train], Y[train], sample_weight=s[train])
            top = clf.decision_function(Z[test]).argmax(axis=1)
            hits[j, test] = Y[test, top] > 0
    ref = hits @ s / s.sum()
    assert_allclose(est.cv_results_["mean_test_score"], ref, rtol=0, atol=1e-12)
    assert est.alpha_ == ALPHAS[int(np.argmax(ref))] and est.multilabel_
    refit = LayerVariationalClassifier(None, head, alpha=est.alpha_, **kw).fit(Z, Y, sample_weight=s)
    assert_allclose(est.coef_, refit.coef_, rtol=1e-12, atol=1e-12)
    assert_allclose(est.predict(Z), refit.predict(Z))


def test_rare_classes_and_no_regression_warning():
    # 40 classes, 50 samples: most classes have one sample or none; the head defines them
    rng = np.random.default_rng(4)
    k, d = 40, 8
    W0, b0 = rng.normal(size=(k, d)), np.zeros(k)
    Z = rng.normal(size=(50, d))
    y = (Z @ W0.T).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could represent a regression problem"
        for cv in (None, 5):
            est = LayerVariationalClassifierCV(None, (W0, b0), alphas=[0.1, 1.0], cv=cv).fit(Z, y)
            assert est.classes_.tolist() == list(range(k)) and 0.0 <= est.best_score_ <= 1.0
        LayerVariationalClassifier(None, (W0, b0)).fit(Z, y)


def test_loo_needs_positive_alphas():
    Z, y, head = _data()
    with pytest.raises(ValueError, match="alpha = 0 is not allowed with cv=None"):
        LayerVariationalClassifierCV(None, head, alphas=[0.0, 1.0]).fit(Z, y)


@parametrize_with_checks([LayerVariationalClassifierCV(), LayerVariationalClassifierCV(cv=3)])
def test_sklearn_compatible(estimator, check):
    check(estimator)
