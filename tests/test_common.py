"""scikit-learn API compliance, in one place."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skl_transfer import LayerVariationalAdapter, LayerVariationalAdapterCV


@parametrize_with_checks(
    [
        LayerVariationalAdapter(),
        LayerVariationalAdapter(alpha=0.0, fit_intercept=False),
        LayerVariationalAdapterCV(),
        LayerVariationalAdapterCV(alphas=[0.0, 1.0], cv=3),
    ]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
