"""``LayerVariationalClassifier(loss="log")`` on heads with many classes: time and peak memory.

The multinomial Hessian of a ``k``-class head on ``d`` features has ``(k (d + 1))^2`` entries:
63.8 GiB for CREPE's 360 pitch bins on d = 256, 33 TB for a 1000-class ImageNet head on
d = 2048. Where it would exceed 32 MiB each Newton step is solved by conjugate gradients on
Hessian-vector products instead (memory O(k d + n k)). Per configuration, one fit on
synthetic features (a perturbed pretrained head relabels them, so the prior is close but
wrong; every class has samples, since the unpenalised bias of a class without any falls
without bound): fit seconds, Newton steps, the peak of numpy/Python allocations during the fit
(``tracemalloc``), the dense Hessian's size for comparison, and training accuracy before
and after.

    python benchmarks/bench_log_loss.py            # k = 360 (d = 256, n = 2000) and 1000 (d = 2048, n = 5000)
    python benchmarks/bench_log_loss.py --quick    # small sizes, both Newton paths
"""

from __future__ import annotations

import time
import tracemalloc

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _common import parser, save_figure, write_csv

from skl_transfer import LayerVariationalClassifier

FULL = [(360, 256, 2000), (1000, 2048, 5000)]  # (k, d, n)
QUICK = [(10, 16, 300), (60, 64, 400)]


def measure(k, d, n, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d)) / np.sqrt(d)
    W_true = rng.normal(size=(k, d)) * 3.0
    y = (Z @ W_true.T + rng.gumbel(size=(n, k))).argmax(axis=1)
    # every class present: the bias is not penalised, so an absent class's would fall forever
    y[rng.choice(n, k, replace=False)] = np.arange(k)
    W0 = W_true + rng.normal(size=(k, d)) * 2.0  # the pretrained head: close, but wrong
    b0 = np.zeros(k)
    clf = LayerVariationalClassifier(None, (W0, b0), loss="log", alpha=1.0, max_iter=30, tol=1e-6)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        clf.fit(Z, y)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    before = float(((Z @ W0.T + b0).argmax(1) == y).mean())
    return dict(
        k=k, d=d, n=n, fit_s=seconds, n_iter=clf.n_iter_, peak_mib=peak / 2**20,
        dense_hessian_mib=(k * (d + 1)) ** 2 * 8 / 2**20,
        pretrained_accuracy=before, adapted_accuracy=float(clf.score(Z, y)),
    )  # fmt: skip


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    grid = QUICK if args.quick else FULL
    print(
        f"{'k':>5} {'d':>5} {'n':>5} | {'fit s':>7} {'steps':>5} {'peak MiB':>9} {'dense H MiB':>12} "
        "| acc before/after"
    )
    rows = []
    for k, d, n in grid:
        r = measure(k, d, n)
        rows.append(r)
        print(
            f"{k:>5} {d:>5} {n:>5} | {r['fit_s']:>7.2f} {r['n_iter']:>5} {r['peak_mib']:>9.1f} "
            f"{r['dense_hessian_mib']:>12.1f} | {r['pretrained_accuracy']:.3f} / {r['adapted_accuracy']:.3f}",
            flush=True,
        )
    name = "bench_log_loss_quick" if args.quick else "bench_log_loss"
    path = write_csv(name, rows)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"k={r['k']} d={r['d']} n={r['n']}" for r in rows]
    pos = np.arange(len(rows))
    ax.barh(pos - 0.2, [r["peak_mib"] for r in rows], 0.4, label="peak allocations during fit")
    ax.barh(pos + 0.2, [r["dense_hessian_mib"] for r in rows], 0.4, label="a dense Hessian would need")
    ax.set_xscale("log")
    ax.set_yticks(pos, labels, fontsize=8)
    ax.set_xlabel("MiB")
    ax.legend(fontsize=7)
    fig.suptitle('loss="log" on many-class heads: memory')
    save_figure(fig, name, path)
    return rows


if __name__ == "__main__":
    main()
