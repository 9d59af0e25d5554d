"""Real data shipped with scikit-learn: adapt a digit classifier to a shifted domain.

A small CNN is pretrained on clean 8 x 8 digits (sklearn's bundled ``load_digits``; weights
cached in benchmarks/.cache). The target domain is the same digits with a shift: ``invert``
(ink and paper swapped), ``rotate`` (90 degrees) or ``blur``. The last layer (128 -> 10 logits)
is adapted with N labelled target images, N in 10..200, several seeds, and scored on held-out
target images (never trained on): pretrained network, LayerVariationalClassifier with the
squared loss (one-hot and margin target encodings) and with the log loss, and
GradientDescentClassifier (Adam, full batch).

    python benchmarks/digits_shift.py                  # about 4 minutes on 2 cores
    python benchmarks/digits_shift.py --quick          # fewer sizes and seeds
    python benchmarks/digits_shift.py --shift rotate
"""

from functools import partial

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import (
    digit_images,
    median_time,
    parser,
    pretrained_digits_cnn,
    save_figure,
    summarise,
    write_csv,
)
from scipy.ndimage import gaussian_filter

from skl_transfer import GradientDescentClassifier, LayerVariationalClassifier


def shifted(X, shift):
    if shift == "invert":
        return 1.0 - X
    if shift == "rotate":
        return np.rot90(X, k=1, axes=(2, 3)).copy()
    return gaussian_filter(X, sigma=(0, 0, 1.0, 1.0))  # blur


def target_domain(net, X, y, shift):
    """The target images shifted, their labels, the halves that fits draw from (``pool``) and
    that score them (``test``), and the pretrained network's accuracy on the clean and the
    shifted held-out halves (printed)."""
    Xt = shifted(X, shift)
    pool, test = np.arange(len(X))[: len(X) // 2], np.arange(len(X))[len(X) // 2 :]
    with torch.no_grad():
        acc_source = float((net(torch.as_tensor(X[test])).argmax(1).numpy() == y[test]).mean())
        acc_pre = float((net(torch.as_tensor(Xt[test])).argmax(1).numpy() == y[test]).mean())
    print(f"pretrained accuracy: {acc_source:.3f} on clean held-out digits, {acc_pre:.3f} on {shift} ones")
    return Xt, y, pool, test, acc_source, acc_pre


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--shift", choices=["invert", "rotate", "blur"], default="invert")
    args = cli.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    X, y = digit_images()
    split = np.random.default_rng(0).permutation(len(X))
    source, target = split[:900], split[900:]  # disjoint images for the two domains

    net = pretrained_digits_cnn(X[source], y[source], args.quick)
    body, head = net[:-1], net[-1]

    Xt, yt, pool, test, acc_source, acc_pre = target_domain(net, X[target], y[target], args.shift)

    sizes = [10, 200] if args.quick else [10, 20, 50, 100, 200]
    seeds = range(1 if args.quick else 3)
    rows = []
    for n in sizes:
        for seed in seeds:
            idx = np.random.default_rng(seed).choice(pool, size=n, replace=False)
            models = {
                "LVA squared, onehot (alpha=1)": LayerVariationalClassifier(body, head, alpha=1.0),
                "LVA squared, margin (alpha=1)": LayerVariationalClassifier(
                    body, head, alpha=1.0, encoding="margin"
                ),
                "LVA log (alpha=0.1)": LayerVariationalClassifier(
                    body, head, loss="log", alpha=0.1, max_iter=50
                ),
                "GD (Adam lr 1e-2, 300 epochs)": GradientDescentClassifier(
                    body, head, lr=1e-2, epochs=300, random_state=seed
                ),
            }
            for name, est in models.items():
                seconds, _ = median_time(partial(est.fit, Xt[idx], yt[idx]), 1, warmup=0)
                acc = float((est.predict(Xt[test]) == yt[test]).mean())
                rows.append(
                    dict(shift=args.shift, n=n, seed=seed, method=name, test_accuracy=acc, fit_s=seconds)
                )
            rows.append(
                dict(shift=args.shift, n=n, seed=seed, method="pretrained", test_accuracy=acc_pre, fit_s=None)
            )
    name = f"digits_{args.shift}" + ("_quick" if args.quick else "")
    path = write_csv(name, rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(
        f"held-out {args.shift} digits ({len(test)}), accuracy mean ± std over {len(seeds)} seeds; fit time"
    )
    summary = summarise(rows, "test_accuracy")
    for m in methods:
        cells = [f"N={n}: {summary[(n, m)]['mean']:.3f} ± {summary[(n, m)]['std']:.3f}" for n in sizes]
        t = summary[(sizes[-1], m)]["fit_s"]
        fit = "" if np.isnan(t) else f"   (median fit {t * 1e3:.1f} ms at N={sizes[-1]})"
        print(f"{m:<32} " + "  ".join(cells) + fit)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in methods:
        mean, std = ([summary[(n, m)][k] for n in sizes] for k in ("mean", "std"))
        style = "--" if m == "pretrained" else "-"
        ax.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, label=m, linestyle=style)
    ax.set_xscale("log")
    ax.set_xlabel("labelled target images N")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Digits, {args.shift} shift: adapting the last layer")
    ax.legend(fontsize=7)
    save_figure(fig, name, path)
    return summary


if __name__ == "__main__":
    main()
