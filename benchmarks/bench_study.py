"""A whole regularisation study at about the cost of one fit (the performance bar of the CV tools).

A convolutional extractor where the forward pass dominates: a 4-layer CNN (64-128-256
channels, about 40 M multiply-adds per image, global average pooling to d = 256 features;
small next to a ResNet-18, which needs about 560 M at this size) on 10,000 generated 32 x 32
images. Timed side by side in one run (medians of --repeats
rounds, each running the first four calls once in a shuffled order, so that a drift of this
shared machine's speed, which moves a 20 s fit by a third over minutes, falls on all of them
alike; before each timed call the feature cache is emptied, so every call pays its own forward
passes, and the machine left idle for a second, so that no call runs while the previous one's
worker threads still spin):

* ``one_fit``: ``LayerVariationalAdapter(alpha=1).fit`` (cache off): the unit;
* ``cv``: ``LayerVariationalAdapterCV`` over 30 alphas x 5 folds;
* ``grid_cached``: ``GridSearchCV(LayerVariationalAdapter(...), 30 alphas, cv=5)`` with the
  default in-memory feature cache (151 fits, each distinct image through the CNN once);
* ``grid_sklearn_only``: the same ``GridSearchCV`` over an estimator whose fit and predict
  do nothing (the training mean): sklearn's own work per fit (cloning, splitting the images,
  scoring, bookkeeping), the part of a search no estimator can save;
* ``grid_uncached``: the same search with ``cache=False`` over --uncached-alphas alphas only
  (every fit reruns the CNN), one run; its ratio is also scaled linearly to 30 alphas.

The CV and cached-search results are checked equal (alpha_ and mean scores to 1e-8).

    python benchmarks/bench_study.py            # n = 10000, repeats = 3 (about 9 minutes on 2 cores)
    python benchmarks/bench_study.py --quick    # n = 1000
"""

import time
from functools import partial

import matplotlib

matplotlib.use("Agg")
import numpy as np
import torch
from _common import barh_figure, interleaved_medians, median_time, parser, write_csv
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.model_selection import GridSearchCV, KFold
from torch import nn

from skl_transfer import LayerVariationalAdapter, LayerVariationalAdapterCV, clear_cache


def make_images(n, seed=0):
    """Sums of random Gaussian blobs, 1 x 32 x 32; the target is a smooth function of them."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(32), np.arange(32), indexing="ij"), -1).astype(np.float32)
    X = np.zeros((n, 1, 32, 32), dtype=np.float32)
    centres = rng.uniform(4, 28, size=(n, 3, 2)).astype(np.float32)
    widths = rng.uniform(1.5, 5, size=(n, 3)).astype(np.float32)
    for j in range(3):
        d2 = ((grid[None] - centres[:, j, None, None, :]) ** 2).sum(-1)
        X[:, 0] += np.exp(-d2 / (2 * widths[:, j, None, None] ** 2))
    y = widths.mean(1) + 0.1 * centres[:, :, 0].mean(1) + 0.05 * rng.normal(size=n)
    return X, y


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
        nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


class _Mean(RegressorMixin, BaseEstimator):
    """Predicts the training mean: a search over it times sklearn's own work per fit."""

    def __init__(self, alpha=1.0):
        self.alpha = alpha

    def fit(self, X, y):
        self.mean_ = float(np.mean(y))
        return self

    def predict(self, X):
        return np.full(len(X), self.mean_)


def _fresh():
    """Before each timed call: an empty feature cache (the call pays its own forward passes),
    then a pause in which the previous call's idle BLAS and OpenMP worker threads stop spinning
    (timed right after another method, a call shares the cores with them)."""
    clear_cache()
    time.sleep(1.0)


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--uncached-alphas", type=int, default=1)
    args = cli.parse_args(argv)
    # every timed call starts from an emptied feature cache: it pays for its own forward passes
    timed = partial(median_time, warmup=0, setup=clear_cache)
    n = 1000 if args.quick else 10000
    X, y = make_images(n)
    body, head = make_cnn(), nn.Linear(256, 1)
    alphas = np.logspace(-4, 3, 30)
    cv = KFold(5, shuffle=True, random_state=0)
    scoring = "neg_mean_squared_error"

    grid = {"alpha": list(alphas)}
    calls = {
        "fit": lambda: LayerVariationalAdapter(body, head, alpha=1.0, cache=False).fit(X, y),
        "cv": lambda: LayerVariationalAdapterCV(
            body, head, alphas=alphas, cv=cv, scoring=scoring, cache=False
        ).fit(X, y),
        "grid": lambda: GridSearchCV(LayerVariationalAdapter(body, head), grid, cv=cv, scoring=scoring).fit(
            X, y
        ),
        "sklearn_only": lambda: GridSearchCV(_Mean(), grid, cv=cv, scoring=scoring).fit(X, y),
    }
    timed_calls = interleaved_medians(calls, args.repeats, warmup=0, setup=_fresh)
    (t_fit, _), (t_cv, lcv), (t_grid, gs), (t_sk, _) = (
        timed_calls[k] for k in ("fit", "cv", "grid", "sklearn_only")
    )
    assert lcv.alpha_ == gs.best_params_["alpha"]
    np.testing.assert_allclose(
        lcv.cv_results_["mean_test_score"], gs.cv_results_["mean_test_score"], rtol=1e-8
    )
    few = {"alpha": list(alphas[:: len(alphas) // args.uncached_alphas][: args.uncached_alphas])}
    t_unc, _ = timed(
        lambda: GridSearchCV(
            LayerVariationalAdapter(body, head, cache=False), few, cv=cv, scoring=scoring
        ).fit(X, y),
        1,
    )
    n_few = len(few["alpha"])
    studies = [
        ("one fit (alpha=1)", 1, t_fit),
        ("LayerVariationalAdapterCV, 30 alphas x 5 folds", 151, t_cv),
        ("GridSearchCV, 30 alphas x 5 folds, default cache", 151, t_grid),
        ("  of which sklearn's own work (estimator doing nothing)", 151, t_sk),
        (f"GridSearchCV, {n_few} alphas x 5 folds, no cache (1 run)", 5 * n_few + 1, t_unc),
        ("  same, scaled to 30 alphas x 5 folds", 151, t_unc * 151 / (5 * n_few + 1)),
    ]
    rows = [dict(method=m, n_fits=k, fit_s=t, over_one_fit=t / t_fit) for m, k, t in studies]
    print(
        f"n = {n} images 32x32, d = 256 CNN features, {torch.get_num_threads()} torch threads, "
        f"medians of {args.repeats} runs"
    )
    for r in rows:
        print(f"{r['method']:<58} {r['fit_s']:>9.2f} s  {r['over_one_fit']:>7.2f} x one fit")
    name = "bench_study_quick" if args.quick else "bench_study"
    path = write_csv(name, rows)
    barh_figure(
        name, path, [r["method"] for r in rows], [r["over_one_fit"] for r in rows],
        "time / one fit (log scale)", f"A 30-alpha x 5-fold study, {n} images, d = 256", line=1.0,
    )  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
