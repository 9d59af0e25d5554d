"""scikit-learn's own Ridge tests, run against ``LayerVariationalAdapter(None, None)``.

The README says that without an extractor and with ``head=None`` the adapter is exactly
``sklearn.linear_model.Ridge``. This module takes the tests of the installed scikit-learn
(``sklearn/linear_model/tests/test_ridge.py``, shipped in the wheel), rebinds the module's
``Ridge`` to :class:`AdapterRidge`, a thin subclass of the adapter that accepts Ridge's
constructor arguments, and runs, through pytest's own parametrisation and fixtures, the tests
where plain Ridge with those arguments is the estimator under test, so that every future
scikit-learn release checks the claim again. It skips when the tests are not installed.

Selected (and why the others are not): the tests that fit ``Ridge(alpha, fit_intercept)`` on
dense float arrays and check its solution, shapes, dtypes and sample-weight semantics. Tests
parametrised over solvers run once, with ``solver="svd"`` (the adapter has one solver, so the
other solvers would repeat the same fit). Not selected: parametrisations over sparse
containers (the adapter takes dense features), ``positive=True`` (lbfgs), per-target alpha
arrays (``test_ridge_individual_penalties``, ``test_dtype_match_cholesky``), tests of private
solver functions (``_solve_cholesky``, ``_X_CenterStackOp``, ``_RidgeGCV``, ``ridge_regression``,
``test_solver_consistency``), of ``RidgeCV``/``RidgeClassifier`` (other estimators), of solver
convergence, ``max_iter`` and ``n_iter_``, and of the array API.
"""

import functools
from numbers import Integral

import numpy as np
import pytest

from skl_transfer import LayerVariationalAdapter

ridge_tests = pytest.importorskip(
    "sklearn.linear_model.tests.test_ridge", reason="scikit-learn's tests are not installed"
)

# the module's dataset fixture, collected here with its "long"/"wide" parametrisation
ols_ridge_dataset = ridge_tests.ols_ridge_dataset


@pytest.fixture
def global_random_seed():
    """scikit-learn's conftest fixture (its default seed), which this module does not load."""
    return 42


class AdapterRidge(LayerVariationalAdapter):
    """``LayerVariationalAdapter(None, None, alpha=alpha, fit_intercept=fit_intercept)`` with
    ``Ridge``'s constructor. ``solver``, ``tol``, ``max_iter``, ``copy_X`` and ``random_state``
    are accepted and ignored (the adapter has one exact solver); ``positive=True`` is refused.
    ``solver_`` reports the requested solver, as the Ridge tests expect (the adapter's own
    choice, primal or dual, is in ``adapter_solver_``)."""

    # Ridge's max_iter=None (its iterative solvers' default) is accepted and ignored too
    _parameter_constraints: dict = {
        **LayerVariationalAdapter._parameter_constraints,
        "max_iter": [None, Integral],
    }

    def __init__(
        self,
        alpha=1.0,
        *,
        fit_intercept=True,
        copy_X=True,
        max_iter=None,
        tol=1e-4,
        solver="auto",
        positive=False,
        random_state=None,
    ):
        super().__init__(None, None, alpha=alpha, fit_intercept=fit_intercept, cache=False)
        self.copy_X = copy_X
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver
        self.positive = positive
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None):
        if self.positive:
            raise NotImplementedError("LayerVariationalAdapter has no positive=True")
        super().fit(X, y, sample_weight=sample_weight)
        self.adapter_solver_ = self.solver_
        self.solver_ = self.solver
        return self


@pytest.fixture(autouse=True)
def _ridge_is_the_adapter(monkeypatch):
    monkeypatch.setattr(ridge_tests, "Ridge", AdapterRidge)


def _selected(name, **only):
    """The scikit-learn test ``name`` with its parametrisations restricted to the values in
    ``only`` (argument name -> allowed values); everything else (fixtures, marks) as there."""
    func = getattr(ridge_tests, name)

    @functools.wraps(func)  # pytest reads the signature (fixtures, parameters) through __wrapped__
    def test(*args, **kwargs):
        return func(*args, **kwargs)

    test.pytestmark = []
    for mark in reversed(getattr(func, "pytestmark", [])):
        if mark.name == "parametrize" and mark.args[0] in only:
            argnames, values = mark.args[:2]
            kwargs = dict(mark.kwargs)
            keep = [i for i, v in enumerate(values) if v in only[argnames]]
            assert keep, f"{name}: no parametrisation of {argnames} left"
            if isinstance(kwargs.get("ids"), (list, tuple)):
                kwargs["ids"] = [kwargs["ids"][i] for i in keep]
            test = pytest.mark.parametrize(argnames, [values[i] for i in keep], **kwargs)(test)
        else:
            test = pytest.mark.__getattr__(mark.name)(*mark.args, **mark.kwargs)(test)
    return test


SVD = {"solver": ["svd"]}
DENSE = {"sparse_container": [None], "X_container": [np.asarray]}

test_ridge_regression = _selected("test_ridge_regression", **SVD)
test_ridge_regression_hstacked_X = _selected("test_ridge_regression_hstacked_X", **SVD)
test_ridge_regression_vstacked_X = _selected("test_ridge_regression_vstacked_X", **SVD)
test_ridge_regression_unpenalized = _selected("test_ridge_regression_unpenalized", **SVD)
test_ridge_regression_unpenalized_hstacked_X = _selected(
    "test_ridge_regression_unpenalized_hstacked_X", **SVD
)
test_ridge_regression_unpenalized_vstacked_X = _selected(
    "test_ridge_regression_unpenalized_vstacked_X", **SVD
)
test_ridge_regression_sample_weights = _selected("test_ridge_regression_sample_weights", **SVD, **DENSE)
test_ridge_shapes_type = _selected("test_ridge_shapes_type")
test_ridge_intercept = _selected("test_ridge_intercept")
test_ridge_vs_lstsq = _selected("test_ridge_vs_lstsq")
test_regularization_limits_ridge = _selected("test_regularization_limits_ridge", **SVD, **DENSE)
test_raises_value_error_if_sample_weights_greater_than_1d = _selected(
    "test_raises_value_error_if_sample_weights_greater_than_1d"
)
test_dtype_match = _selected("test_dtype_match", **SVD)
test_ridge_sample_weight_consistency = _selected("test_ridge_sample_weight_consistency", **SVD, **DENSE)


def test_the_suite_runs_the_adapter():
    """The rebinding works: the module's Ridge is the adapter while these tests run."""
    assert ridge_tests.Ridge is AdapterRidge
    X, y = np.random.default_rng(0).normal(size=(10, 3)), np.arange(10.0)
    est = ridge_tests.Ridge(alpha=0.5).fit(X, y)
    assert isinstance(est, LayerVariationalAdapter) and est.adapter_solver_ == "primal"
