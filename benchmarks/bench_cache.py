"""What the in-memory feature cache costs: fit time and memory, against ``cache=False``.

For each configuration (n samples, d features, input width, forward batch size), in one
process, side by side:

* ``off``: ``LayerVariationalAdapter(body, alpha=1, cache=False).fit(X, y)``;
* ``first``: the same fit with the default cache (``cache="auto"``), on an emptied cache (so
  the model is measured: the first batch and the estimator's work on it are timed against
  what the cache would do with those rows, and the model is cached only when that is at most
  ``AUTO_SHARE`` of computing them); ``first/off`` is its cost (the target: at most 1.5),
  in wall time and, less sensitive to other load on the machine, in this process's CPU time
  (``(cpu)``); ``cached``: in how many of the runs ``"auto"`` chose to cache;
* ``warm``: the same fit again (served from the cache when it chose to cache);
* ``on/off``: a first fit with ``cache=True`` (always cache: the extractor runs on every row,
  and the cache hashes X, reserves a slot per distinct row and stores every feature row);
* ``acct``: ``cache_info()["bytes"]`` after a ``cache=True`` first fit, against ``traced``,
  tracemalloc's growth of the process over that fit (the estimator deleted): what the cache
  really holds.

Times are medians of --repeats runs (more, up to 15, for fits of milliseconds, whose times
are noisier), ``off`` and ``first`` interleaved (the machine's load drifts). Extractor:
``Linear(n_in, 16) -> ReLU -> Linear(16, d)`` in float32, as cheap as an
extractor gets, so that the cache's own work shows. Not timed: data and network building.

    python benchmarks/bench_cache.py            # n up to 400,000, d up to 2048; a few minutes
    python benchmarks/bench_cache.py --quick    # small sizes, writes bench_cache_quick.csv/.png
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import parser, save_figure, write_csv
from torch import nn

from skl_transfer import LayerVariationalAdapter, cache_info, clear_cache

FULL = [  # (n, d, n_in, batch_size); 256 is the estimators' default batch size
    (1_000, 1, 4, 256),
    (20_000, 1, 4, 256),
    (400_000, 1, 4, 256),
    (400_000, 1, 4, 65_536),
    (1_000, 64, 4, 256),
    (20_000, 64, 4, 256),
    (100_000, 64, 4, 256),
    (100_000, 64, 4, 65_536),
    (1_000, 2_048, 4, 256),
    (4_000, 2_048, 4, 256),
    (1_000, 1, 512, 256),
    (20_000, 1, 512, 256),
    (20_000, 64, 512, 256),
    (4_000, 2_048, 512, 256),
]
QUICK = [(1_000, 1, 4, 256), (5_000, 1, 4, 256), (2_000, 64, 32, 256)]


def _body(n_in, d):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, d)).eval()


def measure(n, d, n_in, batch_size, repeats):
    body = _body(n_in, d)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, n_in)).astype(np.float32)
    y = rng.normal(size=n)

    def fit(cache):
        est = LayerVariationalAdapter(body, alpha=1.0, batch_size=batch_size, cache=cache)
        t0, c0 = time.perf_counter(), time.process_time()
        est.fit(X, y)
        return time.perf_counter() - t0, time.process_time() - c0

    fit(False)  # warm-up: torch, sklearn, the hashing keys of this input width
    clear_cache()
    fit(True)
    off, first, warm, on, cached = [], [], [], [], []
    started = time.perf_counter()
    # at least `repeats` runs, more (up to 15, within 5 s) for fits of milliseconds, whose times are noisier
    while len(off) < repeats or (len(off) < 15 and time.perf_counter() - started < 5.0):
        clear_cache()  # each timed fit starts from the same state: an emptied cache, collected
        gc.collect()
        off.append(fit(False))
        clear_cache()
        gc.collect()
        first.append(fit("auto"))
        warm.append(fit("auto"))
        cached.append(cache_info()["rows"] > 0)
        clear_cache()
        gc.collect()
        on.append(fit(True))
    clear_cache()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        est = LayerVariationalAdapter(body, alpha=1.0, batch_size=batch_size, cache=True).fit(X, y)
        del est
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    acct = cache_info()["bytes"]
    clear_cache()
    t_off, t_first, t_warm, t_on = (float(np.median([w for w, _ in t])) for t in (off, first, warm, on))
    c_off, c_first = (float(np.median([c for _, c in t])) for t in (off, first))
    return dict(
        n=n,
        d=d,
        n_in=n_in,
        batch_size=batch_size,
        off_s=t_off,
        first_s=t_first,
        first_over_off=t_first / t_off,
        cpu_first_over_off=c_first / c_off,
        cached=f"{sum(cached)}/{len(cached)}",
        warm_s=t_warm,
        on_over_off=t_on / t_off,
        feature_mib=n * d * 4 / 2**20,
        acct_mib=acct / 2**20,
        traced_mib=traced / 2**20,
        acct_over_traced=acct / traced if traced > 0 else float("nan"),
    )


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--repeats", type=int, default=None)
    args = cli.parse_args(argv)
    grid = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 3)
    print(f"{torch.get_num_threads()} torch threads; median of {repeats} runs; float32 MLP extractor")
    header = (
        f"{'n':>7} {'d':>5} {'n_in':>4} {'batch':>6} | {'off s':>7} {'first s':>7} {'first/off':>9} "
        f"{'(cpu)':>6} {'cached':>6} {'warm s':>7} {'on/off':>6} | {'feat MiB':>8} {'acct MiB':>8} "
        f"{'traced MiB':>10} {'acct/traced':>11}"
    )
    print(header)
    rows = []
    for n, d, n_in, batch in grid:
        r = measure(n, d, n_in, batch, repeats)
        rows.append(r)
        print(
            f"{n:>7} {d:>5} {n_in:>4} {batch:>6} | {r['off_s']:>7.3f} {r['first_s']:>7.3f} "
            f"{r['first_over_off']:>9.2f} {r['cpu_first_over_off']:>6.2f} {r['cached']:>6} "
            f"{r['warm_s']:>7.3f} {r['on_over_off']:>6.2f} | "
            f"{r['feature_mib']:>8.2f} "
            f"{r['acct_mib']:>8.2f} {r['traced_mib']:>10.2f} {r['acct_over_traced']:>11.3f}",
            flush=True,
        )
    name = "bench_cache_quick" if args.quick else "bench_cache"
    path = write_csv(name, rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"n={r['n']:,} d={r['d']} in={r['n_in']} b={r['batch_size']}" for r in rows]
    pos = np.arange(len(rows))
    auto_label = 'cache="auto" (default)'
    ax1.barh(pos - 0.2, [r["first_over_off"] for r in rows], 0.4, color="tab:blue", label=auto_label)
    ax1.barh(pos + 0.2, [r["on_over_off"] for r in rows], 0.4, color="tab:gray", label="cache=True")
    ax1.axvline(1.5, color="k", ls="--", lw=1, label="target 1.5")
    ax1.set_yticks(pos, labels, fontsize=7)
    ax1.set_xlabel("first fit time / cache=False")
    ax1.legend(fontsize=7)
    ax2.barh(pos, [r["acct_over_traced"] for r in rows], color="tab:green")
    for x in (0.9, 1.1):
        ax2.axvline(x, color="k", ls="--", lw=1)
    ax2.set_yticks(pos, [""] * len(rows))
    ax2.set_xlabel("cache_info bytes / tracemalloc growth (cache=True)")
    fig.suptitle("What the in-memory feature cache costs")
    save_figure(fig, name, path)
    return rows


if __name__ == "__main__":
    main()
