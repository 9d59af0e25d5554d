"""The public API's docstrings pass numpydoc validation, and their examples run.

Every name in ``skl_transfer.__all__`` is checked, and for classes every public method and
property defined in this package (methods inherited from scikit-learn, such as ``get_params``
or the generated ``set_fit_request``, are scikit-learn's to document).
"""

import doctest
import inspect

import pytest

import skl_transfer

# Checks skipped everywhere. RT02 asks for a Returns entry without a name ("object", not
# "self : object"); like scikit-learn, we name what is returned.
IGNORED = {"RT02"}

# Checks skipped for methods and properties, as scikit-learn does: the class docstring holds the
# extended summary (ES01), the See Also section (SA01) and the examples (EX01) of its methods.
IGNORED_IN_MEMBERS = {"ES01", "SA01", "EX01"}


def _public_api():
    """``(import path, object, is_member)`` of every documented public object."""
    for name in sorted(skl_transfer.__all__):
        if name.startswith("__"):
            continue  # __version__
        obj = getattr(skl_transfer, name)
        yield f"skl_transfer.{name}", obj, False
        if not inspect.isclass(obj):
            continue
        for attr in sorted(dir(obj)):
            if attr.startswith("_"):
                continue
            member = inspect.getattr_static(obj, attr)
            func = getattr(member, "fget", member)  # a property's getter
            func = getattr(func, "__func__", func)  # a staticmethod's or classmethod's function
            if getattr(func, "__module__", "").startswith("skl_transfer"):
                yield f"skl_transfer.{name}.{attr}", member, True


PUBLIC = list(_public_api())


def test_the_public_api_is_found():
    paths = [path for path, _, _ in PUBLIC]
    assert "skl_transfer.LayerVariationalAdapter.fit" in paths
    assert "skl_transfer.LayerVariationalAdapter.diagnostics_" in paths
    assert "skl_transfer.GradientDescentClassifier.predict_proba" in paths
    assert not any(path.endswith(("get_params", "set_fit_request")) for path in paths)


@pytest.mark.parametrize("path, obj, is_member", PUBLIC, ids=[path for path, _, _ in PUBLIC])
def test_docstring_passes_numpydoc_validation(path, obj, is_member):
    numpydoc_validation = pytest.importorskip("numpydoc.validate")  # the "test" extra
    result = numpydoc_validation.validate(path)
    ignored = IGNORED | (IGNORED_IN_MEMBERS if is_member else set())
    errors = [(code, message) for code, message in result["errors"] if code not in ignored]
    assert not errors, f"{path}:\n" + "\n".join(f"  {code}: {message}" for code, message in errors)


@pytest.mark.parametrize("path, obj, is_member", PUBLIC, ids=[path for path, _, _ in PUBLIC])
def test_docstring_examples_run(path, obj, is_member):
    tests = doctest.DocTestFinder(recurse=False).find(obj, path, module=False, globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{path}: {runner.failures} of {runner.tries} examples failed (see above)"
