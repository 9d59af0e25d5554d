"""Experiment 1 of the paper: closed-form layer update against gradient-descent fine-tuning.

The paper's time-series experiment (Tseng et al., ICLR 2023; data, network and seed 937 from
``_common.timeseries_setup``): a 1-64-64-1 ReLU network pretrained on x = sin(5 pi t) (5000
full-batch Adam epochs, weights cached in benchmarks/.cache) is adapted to the shifted, amplified,
noisy target domain by re-fitting its last layer (a bias-free Linear 64 -> 1) on the frozen
features of the body, with

- ``LVA``: LayerVariationalAdapter(alpha=0), the paper's formula W0 + (pinv(Z) Q)^T;
- ``LVA-CV``: LayerVariationalAdapterCV, alpha chosen by leave-one-out on the training data
  among 30 values in [1e-6, 1e3];
- ``GD``: GradientDescentAdapter with the paper's settings (Adam, lr 1e-3, 12000 full-batch
  epochs, the last epoch kept);
- ``GD-tuned``: the same 12000 full-batch epochs at lr 1e-2, keeping the epoch of lowest loss on
  20 % of the *training* samples held out (never the test data);
- the last two layers (``net[2:]``: Linear 64 -> 64, ReLU, Linear 64 -> 1, on the body
  ``net[:2]``): ``LVA-2``, LayerVariationalAdapter with that block as head (variable
  projection), alpha in {1e-3, 1e-2, 0.1} and max_iter in {3, 10} chosen by GridSearchCV on one
  validation split of 20 % of the training points (the body's features cached for the search;
  the fit time is the whole search); ``GD-2``, full-batch Adam on both layers with the paper's
  settings (lr 1e-3, 12000 epochs, features computed once); ``GD-2-tuned``, lr 1e-2 and the
  epoch of lowest loss on 20 % of the training points;
- ``floor``: ``E[x~ | t~]`` computed from the generating process, the best any predictor can
  reach on average (the target's noise), for reference;
- ``skorch`` (when installed): ``skorch.NeuralNetRegressor`` training a copy of the same head on
  the body's features (computed once), Adam lr 1e-3, 12000 full-batch epochs, no internal
  split: the tool a user would pick today. Mathematically it is the GD baseline (its errors
  equal GD's to float32 rounding; the script prints the largest difference), and its epochs are
  slow (about 7 minutes for 12000 on one core), so it runs in the paper's setting only.

Two measures:

1. Held-out (the sparsity sweep): per seed, the 2000 target points are split at random into a
   training half and a test half; each method adapts on the first N points of the training half
   (nested subsets, N = 8 ... 1000) and is scored by the mean squared error on the 1000 test
   points. Mean ± std over seeds; the figure shows medians and quartiles.
2. The paper's setting: adapt on all 2000 target points and report the sum of squared errors on
   the same points (the paper: about 1900 pretrained, 850 GD, 640 LVA).

Fit times are wall times of ``fit`` with the feature cache off (``cache=False``: every fit runs
the body), LVA's the median of 3 fits. Torch and numpy's BLAS run on one thread
(``--threads``): these problems are too small to gain from intra-op threads, and on a busy
machine extra threads make each small op much slower. Writes benchmarks/results/exp1_timeseries.csv and .png.

    python benchmarks/exp1_timeseries.py              # N in 8..1000, 3 seeds (about 12 minutes)
    python benchmarks/exp1_timeseries.py --no-skorch  # the same without skorch's (slow) fit
    python benchmarks/exp1_timeseries.py --seeds 5    # more seeds (about 2 more minutes each)
    python benchmarks/exp1_timeseries.py --quick      # N in {32, 1000}, 2 seeds, no GD-tuned and
                                                      # no skorch, two layers at N = 32, one seed;
                                                      # writes *_quick.csv/png

Both modes use the paper's network pretrained for 5000 epochs (the cached weights when present:
with fewer pretraining epochs the features differ and so does the comparison) and keep the
paper's GD budget of 12000 epochs.
"""

import importlib.util
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import (
    fit_gd_block,
    fit_skorch,
    median_time,
    parser,
    predict_torch,
    pretrain,
    save_figure,
    sse,
    summarise,
    timeseries_floor,
    timeseries_setup,
    write_csv,
)
from sklearn.model_selection import GridSearchCV, ShuffleSplit
from threadpoolctl import threadpool_limits

from skl_transfer import GradientDescentAdapter, LayerVariationalAdapter, LayerVariationalAdapterCV

PAPER_GD = dict(lr=1e-3, epochs=12000, batch_size=None)  # the paper's GD baseline
TUNED_GD = dict(lr=1e-2, epochs=12000, batch_size=None, validation_fraction=0.2)
ALPHAS = np.logspace(-6, 3, 30)
# the last two layers: alpha and max_iter chosen on a validation split of the training points
LVA2_GRID = {"alpha": [1e-3, 1e-2, 1e-1], "max_iter": [3, 10]}
METHODS = ["pretrained", "LVA", "LVA-CV", "GD", "GD-tuned", "skorch", "LVA-2", "GD-2", "GD-2-tuned"]
TWO_LAYERS = ["LVA-2", "GD-2", "GD-2-tuned"]


def lva(body, head, seed):
    return LayerVariationalAdapter(body, head, alpha=0.0, cache=False)


def lva_cv(body, head, seed):
    return LayerVariationalAdapterCV(body, head, alphas=ALPHAS, cache=False)


def gd(body, head, seed):
    return GradientDescentAdapter(body, head, **PAPER_GD, random_state=seed, cache=False)


def gd_tuned(body, head, seed):
    return GradientDescentAdapter(body, head, **TUNED_GD, random_state=seed, cache=False)


def lva2(body, block, seed):
    """LVA on the last two layers, alpha and max_iter chosen on 20 % of the training points
    (one split, as GD-tuned's validation split; the body's features cached for the search)."""
    est = LayerVariationalAdapter(body, block, cache=True)
    return GridSearchCV(est, LVA2_GRID, cv=ShuffleSplit(1, test_size=0.2, random_state=seed))


def run_two_layers(name, net, seed, X, y, repeats=3):
    """A method on the last two layers of ``net`` (Linear 64 -> 64, ReLU, Linear 64 -> 1)."""
    body, block = net[:2], net[2:]
    if name == "LVA-2":
        seconds, search = median_time(lambda: lva2(body, block, seed).fit(X, y), repeats, 1)
        best = search.best_estimator_
        return best.predict, seconds, {"alpha": best.alpha, "max_iter": best.max_iter}
    kw = dict(PAPER_GD if name == "GD-2" else TUNED_GD)
    kw.pop("batch_size")
    seconds, (predict, _) = median_time(lambda: fit_gd_block(body, block, X, y, seed=seed, **kw), 1, warmup=0)
    return predict, seconds, {}


def run_method(name, body, head, seed, X, y):
    """Fit one method on (X, y); returns (predict, wall seconds of fit, extra CSV fields)."""
    if name == "skorch":  # full batch, the paper's GD optimiser
        seconds, (net, features) = median_time(
            lambda: fit_skorch(body, head, X, y, lr=PAPER_GD["lr"], epochs=PAPER_GD["epochs"]), 1, warmup=0
        )
        return (lambda X: net.predict(features(X))), seconds, {}
    make = {"LVA": lva, "LVA-CV": lva_cv, "GD": gd, "GD-tuned": gd_tuned}[name]
    # LVA is cheap: the median of 5 timed fits after a warm-up fit (robust to a stall of a busy
    # machine); GD is timed once
    repeats, warmup = (5, 1) if name.startswith("LVA") else (1, 0)
    seconds, est = median_time(lambda: make(body, head, seed).fit(X, y), repeats, warmup)
    extra = {}
    if name == "LVA-CV":
        extra["alpha"] = est.alpha_
    if name.startswith("GD"):
        extra["best_epoch"] = est.best_epoch_
        extra["descent_s"] = est.fit_time_
    return est.predict, seconds, extra


def fmt_err(s):
    return f"{s['mean']:.3g} ± {s['std']:.2g}" if s["count"] > 1 else f"{s['mean']:.3g}"


def fmt_time(seconds):
    return "" if np.isnan(seconds) else f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def main(argv=None):
    cli = parser(__doc__, quick_help="N in {32, 1000}, 2 seeds, no GD-tuned, no skorch")
    cli.add_argument("--no-skorch", action="store_true", help="skip skorch even when installed")
    cli.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    cli.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = cli.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with threadpool_limits(args.threads, user_api="blas"):  # numpy's BLAS as torch
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    t_start, cpu_start = time.perf_counter(), time.process_time()
    sizes = [32, 1000] if args.quick else [8, 32, 128, 512, 1000]
    seeds = range(args.seeds or (2 if args.quick else 3))
    methods = ["LVA", "LVA-CV", "GD"] + ([] if args.quick else ["GD-tuned"])
    # the last two layers: LVA-2 and GD-2 at N = 32 only in --quick (GD-2's 12000 epochs)
    two_layer_methods = ["LVA-2", "GD-2"] + ([] if args.quick else ["GD-2-tuned"])
    two_layer_sizes = [32] if args.quick else sizes
    two_layer_seeds, repeats = (seeds[:1], 1) if args.quick else (seeds, 3)
    has_skorch = importlib.util.find_spec("skorch") is not None
    if args.quick:
        print("GD-tuned and skorch: not run in --quick mode")
    elif args.no_skorch:
        print("skorch: skipped (--no-skorch)")
    elif not has_skorch:
        print("skorch: not installed, skipped (pip install skorch to compare with it)")

    t, x, t_new, x_new, net = timeseries_setup()
    t0 = time.perf_counter()
    net, cached = pretrain(net, t, x, epochs=5000, name="exp1_pretrained")
    how = "loaded from benchmarks/.cache" if cached else "5000 full-batch Adam epochs"
    print(f"pretrained on the source domain ({how}, {time.perf_counter() - t0:.1f} s)")
    body, head = net[:-1], net[-1]
    run_skorch = has_skorch and not (args.quick or args.no_skorch)
    # warm-up, so that no timed fit pays torch's first-call costs
    lva(body, head, 0).fit(t_new[:64], x_new[:64])
    GradientDescentAdapter(body, head, epochs=5, cache=False).fit(t_new[:64], x_new[:64])

    rows = []
    floor_predict = timeseries_floor  # E[x~ | t~]: the best any predictor can do

    def record(setting, n, seed, method, score, seconds=None, extra=None):
        """One row; ``score``: {"test_mse": ...} (held out) or {"sse": ...} (the paper's setting)."""
        row = dict(setting=setting, n=n, seed=seed, method=method, test_mse=None, sse=None, fit_s=seconds)
        row.update(score, alpha=None, best_epoch=None, descent_s=None, max_iter=None)
        row.update(extra or {})
        rows.append(row)

    # 1. held out: adapt on N points of a random training half, score on the other half
    n_all = len(t_new) // 2
    for seed in seeds:
        perm = np.random.default_rng(seed).permutation(len(t_new))
        pool, test = perm[:n_all], perm[n_all:]

        def mse(pred):
            return float(np.mean((np.ravel(pred) - x_new[test].ravel()) ** 2))  # noqa: B023

        pre = mse(predict_torch(net, t_new[test]))
        record("held-out", 0, seed, "floor", {"test_mse": mse(floor_predict(t_new[test]))})
        for n in sizes:
            idx = pool[:n]
            record("held-out", n, seed, "pretrained", {"test_mse": pre})
            for m in methods:
                predict, seconds, extra = run_method(m, body, head, seed, t_new[idx], x_new[idx])
                record("held-out", n, seed, m, {"test_mse": mse(predict(t_new[test]))}, seconds, extra)
            for m in two_layer_methods if n in two_layer_sizes and seed in two_layer_seeds else []:
                predict, seconds, extra = run_two_layers(m, net, seed, t_new[idx], x_new[idx], repeats)
                record("held-out", n, seed, m, {"test_mse": mse(predict(t_new[test]))}, seconds, extra)
            print(f"  seed {seed}, N = {n:4d}: done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # 2. the paper's setting: adapt on all 2000 target points, SSE on the same points
    n_paper = len(t_new)
    record("paper", n_paper, 0, "pretrained", {"sse": sse(x_new, predict_torch(net, t_new))})
    for m in ["LVA", "LVA-CV", "GD"] + (["skorch"] if run_skorch else []):
        predict, seconds, extra = run_method(m, body, head, 0, t_new, x_new)
        record("paper", n_paper, 0, m, {"sse": sse(x_new, predict(t_new))}, seconds, extra)
    if not args.quick:
        for m in ["LVA-2", "GD-2"]:
            predict, seconds, extra = run_two_layers(m, net, 0, t_new, x_new)
            record("paper", n_paper, 0, m, {"sse": sse(x_new, predict(t_new))}, seconds, extra)
    record("paper", n_paper, 0, "floor", {"sse": sse(x_new, floor_predict(t_new))})

    name = "exp1_timeseries_quick" if args.quick else "exp1_timeseries"
    path = write_csv(name, rows)
    held = summarise([r for r in rows if r["setting"] == "held-out"], "test_mse")
    floor = held.pop((0, "floor"))
    paper = summarise([r for r in rows if r["setting"] == "paper"], "sse")
    shown = [m for m in METHODS if any((n, m) in held for n in sizes)]

    w = 20
    print(
        f"\nheld-out target MSE (1000 test points), mean ± std over {len(seeds)} seeds; "
        f"N = {n_all} is the whole training half"
    )
    print(f"{'N':>5}" + "".join(f"{m:>{w}}" for m in shown))
    for n in sizes:
        print(f"{n:>5}" + "".join(f"{fmt_err(held[(n, m)]) if (n, m) in held else '':>{w}}" for m in shown))
    print(
        f"floor: E[x~ | t~] from the generating process, {fmt_err(floor)} (no predictor does better "
        "on average)"
    )
    print("\nfit wall time, median over seeds (cache off; LVA: median of 3 fits); GD/LVA = ratio")
    timed = [m for m in shown if m != "pretrained"]
    print(f"{'N':>5}" + "".join(f"{m:>{w - 6}}" for m in timed) + f"{'GD/LVA':>{w - 6}}")
    for n in sizes:
        cells = [fmt_time(held[(n, m)]["fit_s"]) if (n, m) in held else "" for m in timed]
        ratio = held[(n, "GD")]["fit_s"] / held[(n, "LVA")]["fit_s"]
        print(f"{n:>5}" + "".join(f"{c:>{w - 6}}" for c in cells) + f"{ratio:>{w - 7}.0f}x")
    for n in sizes:
        if (n, "GD-2") in held:
            ratio = held[(n, "GD-2")]["fit_s"] / held[(n, "LVA-2")]["fit_s"]
            print(f"N = {n}: GD-2/LVA-2 fit time {ratio:.0f}x (LVA-2: its whole search, 6 fits and a refit)")
    print(f"\nthe paper's setting: adapt on all {n_paper} target points, SSE on the same points")
    print(f"{'method':<12}{'SSE':>10}{'fit time':>12}")
    for m in METHODS:
        if (n_paper, m) in paper:
            s = paper[(n_paper, m)]
            print(f"{m:<12}{s['mean']:>10.1f}{fmt_time(s['fit_s']):>12}")
    ratio = paper[(n_paper, "GD")]["fit_s"] / paper[(n_paper, "LVA")]["fit_s"]
    print(f"GD/LVA fit time: {ratio:.0f}x")
    if (n_paper, "GD-2") in paper:
        ratio = paper[(n_paper, "GD-2")]["fit_s"] / paper[(n_paper, "LVA-2")]["fit_s"]
        print(f"GD-2/LVA-2 fit time: {ratio:.0f}x")
    print(
        f"floor: {paper[(n_paper, 'floor')]['mean']:.1f}, the SSE of E[x~ | t~] on these points; a lower SSE "
        "fits their noise (the points are also the training points)"
    )
    if run_skorch:  # the paper's setting only
        gaps = [
            abs(a["sse"] - b["sse"]) / b["sse"]
            for a in rows
            if a["method"] == "skorch"
            for b in rows
            if b["method"] == "GD" and (b["setting"], b["n"], b["seed"]) == (a["setting"], a["n"], a["seed"])
        ]
        print(f"skorch vs GD (same optimiser): largest relative difference of the error {max(gaps):.1e}")
    alphas = [r["alpha"] for r in rows if r["method"] == "LVA-CV" and r["setting"] == "held-out"]
    print(f"LVA-CV chose alpha in [{min(alphas):.2g}, {max(alphas):.2g}]")

    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"pretrained": "k--", "LVA": "o-", "LVA-CV": "s-", "GD": "^-", "GD-tuned": "v-", "skorch": "x",
              "LVA-2": "D-", "GD-2": "P-", "GD-2-tuned": "X-"}  # fmt: skip
    for m in shown:
        ns = [n for n in sizes if (n, m) in held]
        med = np.array([held[(n, m)]["median"] for n in ns])
        (line,) = ax.plot(ns, med, styles[m], label=m)
        if m != "pretrained":
            lo, hi = (np.array([held[(n, m)][q] for n in ns]) for q in ("q1", "q3"))
            ax.fill_between(ns, lo, hi, color=line.get_color(), alpha=0.15)
            times = [held[(n, m)]["fit_s"] for n in ns]
            ax_t.plot(ns, times, styles[m], color=line.get_color(), label=m)
    for a in (ax, ax_t):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("target training samples N")
    ax.axhline(floor["mean"], color="grey", linestyle=":", label="floor E[x~|t~]")
    ax.set_ylabel("held-out target MSE (median, quartiles)")
    ax.set_title(f"Experiment 1: test error over {len(seeds)} seeds")
    ax_t.set_ylabel("fit wall time (s), median")
    ax_t.set_title("Fit time (GD: 12000 full-batch epochs)")
    ax.legend(fontsize=8)
    ax_t.legend(fontsize=8)
    save_figure(fig, name, path)
    plt.close(fig)
    cpu = time.process_time() - cpu_start  # on a shared machine, the CPU time is the steadier figure
    print(f"total {time.perf_counter() - t_start:.0f} s wall, {cpu:.0f} s CPU")
    paper = {m: paper[(n_paper, m)] for m in [*METHODS, "floor"] if (n_paper, m) in paper}
    return dict(sizes=sizes, heldout=held, paper=paper, floor=floor)


if __name__ == "__main__":
    main()
