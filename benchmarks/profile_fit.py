"""Where the time of one fit goes: a profile of ``LayerVariationalAdapter.fit`` by step.

The MLP body of ``bench_fit.py`` (64 -> d -> d, ReLU and Tanh, d = 512, bias-free head),
``alpha=1``, ``batch_size=1024``, N in {1000, 64000}, with the feature cache off (as
``bench_fit.py`` times it) and on (``cache=True``, a first fit: keying and storing every
row). Each fit runs --repeats times under ``cProfile`` after one warm-up; the steps are the
cumulative times of the functions that do them, divided by the number of fits:

* validation: ``_validate_X`` and ``check_sample_weight`` (X, y and weights checked);
* copy: ``frozen_copy`` (the private copy of the extractor);
* key: the extractor's digest and its determinism probe (``fingerprint``, ``_probe``) and the
  input rows' keys (``row_keys``);
* input: ``input_batch`` (rows of X to tensors);
* forward: ``forward`` (the extractor on each batch);
* finite check: ``check_finite`` on each batch of features;
* moments: ``MomentSums.add`` and ``.moments`` (float64 moments, batch by batch);
* solve: ``ridge_primal`` / ``ridge_dual``;
* store: ``_store`` (coefficients, the fitted attributes, diagnostics' inputs);
* other: the rest of ``fit`` (caching the rows, bookkeeping).

cProfile adds a few microseconds per Python call, so the Python-heavy steps (validation,
copy, key) read a little high. Writes ``results/profile_fit.csv`` and ``.png`` (or
``--label NAME`` in the file name, to profile another checkout with ``PYTHONPATH``).

    python benchmarks/profile_fit.py
    python benchmarks/profile_fit.py --quick      # N = 1000 only, d = 128
"""

import cProfile
import pstats

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import parser, save_figure, write_csv
from torch import nn

from skl_transfer import LayerVariationalAdapter, clear_cache

STEPS = {
    "validation": [("_base.py", "_validate_X"), ("_validation.py", "check_sample_weight")],
    "copy": [("_torch.py", "frozen_copy")],
    "key": [
        ("_fingerprint.py", "fingerprint"),
        ("_features.py", "_probe"),
        ("_cache.py", "row_keys"),
    ],
    "input": [("_torch.py", "input_batch")],
    "forward": [("_torch.py", "forward")],
    "finite check": [("_torch.py", "check_finite")],
    "moments": [("_moments.py", "add"), ("_moments.py", "moments")],
    "solve": [("_solvers.py", "ridge_primal"), ("_solvers.py", "ridge_dual")],
    "store": [("_base.py", "_store")],
}


def profile(fn, repeats):
    fn()  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeats):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    cum = {}
    for (path, _, name), (_, _, _, cumtime, _) in stats.items():
        if "skl_transfer" in path:
            key = (path.rsplit("/", 1)[-1], name)
            cum[key] = cum.get(key, 0.0) + cumtime
    total = sum(ct for (path, _, name), (*_, ct, _) in stats.items() if name == "fit" and "_adapter" in path)
    out = {step: sum(cum.get(f, 0.0) for f in funcs) / repeats for step, funcs in STEPS.items()}
    out["total"] = total / repeats
    out["other"] = out["total"] - sum(out[s] for s in STEPS)
    return out


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--label", default="")
    args = cli.parse_args(argv)
    sizes = [1000] if args.quick else [1000, 64000]
    d, n_in = (128, 32) if args.quick else (512, 64)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(n_in, d), nn.ReLU(), nn.Linear(d, d), nn.Tanh())
    head = nn.Linear(d, 1, bias=False)
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        X = rng.normal(size=(n, n_in)).astype(np.float32)
        y = np.tanh(X[:, 0]) + 0.1 * rng.normal(size=n)
        for cache in (False, True):

            def fit(X=X, y=y, cache=cache):
                clear_cache()  # a first fit every time: with the cache on, every row is keyed and stored
                return LayerVariationalAdapter(body, head, alpha=1.0, batch_size=1024, cache=cache).fit(X, y)

            steps = profile(fit, args.repeats)
            rows.append(dict(n=n, d=d, cache=cache, **{k: round(v, 6) for k, v in steps.items()}))
    names = [*STEPS, "other"]
    print(f"d = {d}, {torch.get_num_threads()} torch threads; ms per fit (cProfile, {args.repeats} fits)")
    print(f"{'N':>6} {'cache':>6} {'total':>8} " + " ".join(f"{s[:8]:>8}" for s in names))
    for r in rows:
        print(
            f"{r['n']:>6} {r['cache']!s:>6} {1000 * r['total']:8.1f} "
            + " ".join(f"{1000 * r[s]:8.1f}" for s in names)
        )
    label = f"_{args.label}" if args.label else ""
    name = ("profile_fit_quick" if args.quick else "profile_fit") + label
    path = write_csv(name, rows)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    left = np.zeros(len(rows))
    labels = [f"N={r['n']}, cache={r['cache']}" for r in rows]
    for s in names:
        share = np.array([max(r[s], 0.0) / r["total"] for r in rows])
        ax.barh(labels, share, left=left, label=s)
        left += share
    ax.set_xlabel("share of the fit's time")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    save_figure(fig, name, path)
    return rows


if __name__ == "__main__":
    main()
