"""link="sigmoid": heads read through a sigmoid per output (multi-label, CREPE-style bins)."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.linear_model import Ridge

from skl_transfer import LayerVariationalClassifier


def _problem(n=80, d=6, k=5, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d))
    W0, b0 = 2.0 * rng.normal(size=(k, d)), rng.normal(size=k) - 2.0
    return rng, Z, W0, b0


@pytest.mark.parametrize("margin", ["auto", 1.5])
def test_single_label_equals_ridge_on_sigmoid_targets(margin):
    rng, Z, W0, b0 = _problem()
    y = rng.integers(0, 5, len(Z))
    s = rng.uniform(0.5, 2.0, len(Z))
    est = LayerVariationalClassifier(None, (W0, b0), alpha=0.7, link="sigmoid", margin=margin)
    est.fit(Z, y, sample_weight=s)
    m = np.log(9.0) if margin == "auto" else margin
    L0 = Z @ W0.T + b0
    label = np.eye(5)[y] > 0
    T = L0.copy()  # written out: a label's logit >= m, a non-label's <= -m, others kept
    for i, j in zip(*np.nonzero(label), strict=True):
        T[i, j] = max(T[i, j], m)
    for i, j in zip(*np.nonzero(~label), strict=True):
        T[i, j] = min(T[i, j], -m)
    ridge = Ridge(alpha=0.7).fit(Z, T - L0, sample_weight=s)
    assert_allclose(est.coef_, W0 + ridge.coef_, rtol=1e-10, atol=1e-10)
    assert_allclose(est.intercept_, b0 + ridge.intercept_, rtol=1e-10, atol=1e-10)
    L = Z @ est.coef_.T + est.intercept_
    assert_allclose(est.predict_proba(Z), 1 / (1 + np.exp(-L)), rtol=1e-12)
    assert_array_equal(est.predict(Z), L.argmax(1))
    assert not est.multilabel_


def test_multilabel_indicator_y():
    rng, Z, W0, b0 = _problem(seed=1)
    Y = (Z @ W0.T + b0 + rng.normal(size=(len(Z), 5)) > 0).astype(int)
    est = LayerVariationalClassifier(None, (W0, b0), alpha=0.3, link="sigmoid").fit(Z, Y)
    L0 = Z @ W0.T + b0
    m = np.log(9.0)
    T = np.where(Y > 0, np.maximum(L0, m), np.minimum(L0, -m))
    ridge = Ridge(alpha=0.3).fit(Z, T - L0)
    assert_allclose(est.coef_, W0 + ridge.coef_, rtol=1e-10, atol=1e-10)
    pred = est.predict(Z)
    assert est.multilabel_ and pred.shape == Y.shape
    assert_array_equal(pred, (Z @ est.coef_.T + est.intercept_ > 0).astype(int))
    with pytest.raises(ValueError, match="indicator matrix of 0/1"):
        LayerVariationalClassifier(None, (W0, b0), link="sigmoid").fit(Z, Y[:, :3])
    with pytest.raises(ValueError, match="use loss='squared' with link='sigmoid'"):
        LayerVariationalClassifier(None, (W0, b0), link="sigmoid", loss="log").fit(Z, Y)


def test_confidence_calibration_survives_where_softmax_targets_collapse_it():
    """CREPE's decoding calls a frame voiced when its peak sigmoid confidence is >= 0.21.
    A 60-bin head, confident on its source domain; the target domain shifts the features.
    Adapted with sigmoid targets, the voiced share stays near the pretrained one; softmax
    targets (centred on the mean logit) pull every logit towards it and the peak sigmoid
    confidence collapses."""
    rng = np.random.default_rng(2)
    k, d, n = 60, 16, 400
    W0 = rng.normal(size=(k, d))
    b0 = np.full(k, -6.0)
    Z = rng.normal(size=(n, d)) * 1.5
    y = (Z @ W0.T).argmax(1)
    Z_target = Z + 0.5 * rng.normal(size=(n, d))  # the shifted domain, same labels

    def voiced(est_or_head):
        L = Z_target @ est_or_head[0].T + est_or_head[1]
        return float((1 / (1 + np.exp(-L))).max(1).__ge__(0.21).mean())

    before = voiced((W0, b0))
    sig = LayerVariationalClassifier(None, (W0, b0), alpha=1.0, link="sigmoid").fit(Z_target, y)
    soft = LayerVariationalClassifier(None, (W0, b0), alpha=1.0).fit(Z_target, y)
    after_sig = voiced((sig.coef_, sig.intercept_))
    after_soft = voiced((soft.coef_, soft.intercept_))
    assert before > 0.5
    assert abs(after_sig - before) < 0.2
    assert after_soft < before - 0.2  # the failure the sigmoid link fixes
    assert sig.score(Z_target, y) >= soft.score(Z_target, y) - 0.05


def test_two_labels_keep_one_logit_each():
    # a multi-label fit of two labels is not a binary one: decision_function is (n, 2), the
    # head's logits (it was l1 - l0), as predict and predict_proba are
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    Z = rng.normal(size=(60, 3))
    Y = np.c_[Z[:, 0] > 0, Z[:, 1] > 0].astype(int)
    W0 = rng.normal(size=(2, 3))
    clf = LayerVariationalClassifier(head=(W0, np.zeros(2)), link="sigmoid").fit(Z, Y)
    scores = clf.decision_function(Z)
    assert scores.shape == (60, 2) == clf.predict_proba(Z).shape
    assert_allclose(scores, Z @ clf.coef_.T + clf.intercept_, rtol=1e-12)
    assert_allclose(clf.predict_proba(Z), 1.0 / (1.0 + np.exp(-scores)), rtol=1e-12)
    roc_auc_score(Y, scores)  # sklearn's multi-label metrics take it
