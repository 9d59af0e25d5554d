"""scikit-learn API compliance, in one place."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skl_transfer import LayerVariationalAdapter


@parametrize_with_checks([LayerVariationalAdapter(), LayerVariationalAdapter(alpha=0.0, fit_intercept=False)])
def test_sklearn_compatible(estimator, check):
    check(estimator)
