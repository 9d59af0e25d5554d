"""Adapting the last two layers of a digit classifier to a shifted domain.

A small CNN with a hidden layer (conv, conv, pooling, Linear 128 -> 64, ReLU, Linear 64 -> 10;
``digits_cnn(hidden=64)``) is pretrained on clean 8 x 8 digits (sklearn's bundled
``load_digits``; weights cached in benchmarks/.cache). The target domain is the same digits
shifted as in digits_shift.py (``rotate`` by default). With N labelled target images, N in
10..200, several seeds, scored on held-out target images (never trained on):

* pretrained: the network as it is;
* LVA-1: ``LayerVariationalClassifier`` on the last layer only (squared loss, alpha=1);
* LVA-2: ``LayerVariationalClassifier`` on the block of the last two layers (variable
  projection: the last layer in closed form, the hidden one by Levenberg-Marquardt steps),
  alpha in {0.1, 1, 10} and alpha_body in {1, 100, 10^4} (``--quick``: {1, 10} and
  100) chosen by ``GridSearchCV`` (3 shuffled folds) on the N training images only,
  10 steps; the fit time includes the search;
* GD-1: ``GradientDescentClassifier`` on the last layer (Adam lr 1e-2, 300 full-batch epochs);
* GD-2: the same Adam on the cross-entropy of both layers (``fit_gd_block``), 300 epochs;
* GD-2 tuned: 500 epochs on 80 % of the training images, the epoch of lowest loss on the
  other 20 % kept.

    python benchmarks/digits_two_layers.py                  # about 4 minutes on 2 cores
    python benchmarks/digits_two_layers.py --quick          # fewer sizes and seeds
    python benchmarks/digits_two_layers.py --shift invert

One torch and BLAS thread by default (``--threads``), as in exp2_speech.py and exp3_deblur.py:
on 2 cores shared with another job, two threads made this script's quick mode 3 times slower
(160 s against 48 s; a 330 x 330 ``numpy.linalg.solve`` took 90 ms instead of 2 ms), and on
idle cores they gained little (LVA-2's fit on 200 images: 2.8 s against 3.1 s).
"""

from functools import partial

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import (
    digit_images,
    fit_gd_block,
    median_time,
    parser,
    pretrained_digits_cnn,
    save_figure,
    summarise,
    write_csv,
)
from digits_shift import target_domain
from sklearn.model_selection import GridSearchCV, KFold
from threadpoolctl import threadpool_limits
from torch import nn

from skl_transfer import GradientDescentClassifier, LayerVariationalClassifier

# alpha_body is measured against the Gauss-Newton matrix's mean diagonal, which grows with N
# (2e4 at N = 50, 2e5 at N = 200): 0.1 to 10 all act as 0 (measured: accuracies within 0.01)
GRID = {"alpha": [0.1, 1.0, 10.0], "alpha_body": [1.0, 1e2, 1e4]}
QUICK_GRID = {"alpha": [1.0, 10.0], "alpha_body": [1e2]}  # a smoke test in about 30 s
MAX_ITER = 10  # outer Levenberg-Marquardt steps of LVA-2, in the search and the refit
GD = dict(lr=1e-2, epochs=300)  # the GD settings of digits_shift.py
METHODS = ("pretrained", "LVA-1", "LVA-2", "GD-1", "GD-2", "GD-2 tuned")


def lva1(body, head, X, y):
    """LVA-1: the last layer in closed form; ``predict``."""
    return LayerVariationalClassifier(body, head, alpha=1.0).fit(X, y).predict


def gd1(body, head, X, y, seed):
    """GD-1: Adam on the last layer's cross-entropy; ``predict``."""
    return GradientDescentClassifier(body, head, random_state=seed, **GD).fit(X, y).predict


def lva2(body, block, X, y, seed, grid):
    """LVA-2: the search over ``grid`` on (X, y) only, refit on all of it; ``(predict, search)``."""
    search = GridSearchCV(
        LayerVariationalClassifier(body, block, max_iter=MAX_ITER, cache=True),
        grid,
        cv=KFold(3, shuffle=True, random_state=seed),  # a class may have fewer than 3 images
    )
    search.fit(X, y)
    return search.predict, search


def gd2(body, block, X, y, seed, **kw):
    """GD-2: Adam on the cross-entropy of the block's layers; ``(predict, trained block)``."""
    predict, trained = fit_gd_block(
        body, block, X, y.astype(np.int64), loss=nn.functional.cross_entropy, seed=seed, **kw
    )
    return (lambda X: predict(X).argmax(1)), trained


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--shift", choices=["invert", "rotate", "blur"], default="rotate")
    cli.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and BLAS threads, at most (default 1: see the docstring)",
    )
    args = cli.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), args.threads))
    with threadpool_limits(args.threads):  # numpy's BLAS: LVA-2's Levenberg-Marquardt systems
        return run(args)


def run(args):
    X, y = digit_images()
    split = np.random.default_rng(0).permutation(len(X))
    source, target = split[:900], split[900:]  # disjoint images for the two domains

    net = pretrained_digits_cnn(X[source], y[source], args.quick, hidden=64)
    body1, head1 = net[:-1], net[-1]  # one layer: Linear 64 -> 10
    body2, block2 = net[:-3], net[-3:]  # two: Linear 128 -> 64, ReLU, Linear 64 -> 10

    Xt, yt, pool, test, acc_source, acc_pre = target_domain(net, X[target], y[target], args.shift)

    sizes = [50, 200] if args.quick else [10, 20, 50, 100, 200]
    seeds = range(1 if args.quick else 3)
    grid = QUICK_GRID if args.quick else GRID
    rows = []
    for n in sizes:
        for seed in seeds:
            idx = np.random.default_rng(seed).choice(pool, size=n, replace=False)
            Xn, yn = Xt[idx], yt[idx]
            fits = {
                "LVA-1": partial(lva1, body1, head1, Xn, yn),
                "LVA-2": partial(lva2, body2, block2, Xn, yn, seed, grid),
                "GD-1": partial(gd1, body1, head1, Xn, yn, seed),
                "GD-2": partial(gd2, body2, block2, Xn, yn, seed, **GD),
                "GD-2 tuned": partial(
                    gd2, body2, block2, Xn, yn, seed, lr=GD["lr"], epochs=500, validation_fraction=0.2
                ),
            }
            rows.append(
                dict(shift=args.shift, n=n, seed=seed, method="pretrained", test_accuracy=acc_pre, fit_s=None)
                | dict(alpha=None, alpha_body=None, n_iter=None)
            )
            for name, fit in fits.items():
                seconds, out = median_time(fit, 1, warmup=0)
                predict = out[0] if isinstance(out, tuple) else out
                acc = float((predict(Xt[test]) == yt[test]).mean())
                row = dict(shift=args.shift, n=n, seed=seed, method=name, test_accuracy=acc, fit_s=seconds)
                row |= dict(alpha=None, alpha_body=None, n_iter=None)
                if name == "LVA-1":
                    row["alpha"] = 1.0
                if name == "LVA-2":
                    search = out[1]
                    row |= dict(
                        alpha=search.best_params_["alpha"],
                        alpha_body=search.best_params_["alpha_body"],
                        n_iter=search.best_estimator_.n_iter_,
                    )
                rows.append(row)
    name = f"digits_two_layers_{args.shift}" + ("_quick" if args.quick else "")
    path = write_csv(name, rows)
    print(
        f"held-out {args.shift} digits ({len(test)}), accuracy mean ± std over {len(seeds)} seeds;"
        " median fit time (s)"
    )
    summary = summarise(rows, "test_accuracy")
    print(f"{'N':>4} " + "".join(f"{m:>17}" for m in METHODS))
    for n in sizes:
        print(
            f"{n:>4} "
            + "".join(f"{summary[(n, m)]['mean']:>9.3f} ± {summary[(n, m)]['std']:.3f}" for m in METHODS)
        )
        times = [summary[(n, m)]["fit_s"] for m in METHODS]
        print(f"{'':>4} " + "".join(f"{'':>17}" if np.isnan(t) else f"{t:>16.3f}s" for t in times))
    chosen = [
        (r["n"], r["seed"], r["alpha"], r["alpha_body"], r["n_iter"]) for r in rows if r["method"] == "LVA-2"
    ]
    print("LVA-2 (N, seed, alpha, alpha_body, steps of the refit): " + ", ".join(map(str, chosen)))

    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(METHODS):
        mean, std = ([summary[(n, m)][k] for n in sizes] for k in ("mean", "std"))
        style = "--" if m == "pretrained" else "-"
        ax.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, label=m, linestyle=style, color=f"C{i}")
        if m != "pretrained":
            ax_t.plot(sizes, [summary[(n, m)]["fit_s"] for n in sizes], marker="o", label=m, color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("labelled target images N")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Digits, {args.shift} shift: adapting one or two layers")
    ax.legend(fontsize=7)
    ax_t.set_xscale("log")
    ax_t.set_yscale("log")
    ax_t.set_xlabel("labelled target images N")
    ax_t.set_ylabel("fit time (s, median over seeds)")
    settings = int(np.prod([len(v) for v in grid.values()]))
    ax_t.set_title(f"Fit time (LVA-2: with its 3-fold search over {settings} settings)")
    ax_t.legend(fontsize=7)
    save_figure(fig, name, path)
    return summary


if __name__ == "__main__":
    main()
