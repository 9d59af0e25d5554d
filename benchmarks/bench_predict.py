"""Predict time of a fitted LayerVariationalAdapter against the bare forward pass plus the head.

The MLP body of bench_fit.py (64 inputs, d = 512 features), fitted on 1,000 samples, predicts
1,000 rows (--rows). Timed side by side in one process, the calls interleaved in a shuffled
order each round (medians of --repeats rounds after two warm-up rounds, so that all see the same
machine and none always runs after the same call):

* ``predict_cache_off`` / ``predict_cache_auto``: ``est.predict(X)`` of an adapter fitted
  with ``cache=False`` / the default ``cache="auto"`` (which measures the MLP as too cheap to
  cache): validation, the fitted copy's forward pass (batches of ``batch_size=256``),
  features to float64, the head in float64;
* ``predict_batch_1024``: the same with ``batch_size=1024`` (one forward pass of the 1,000
  rows, as the bare script's);
* ``bare``: what a user would write with the adapted weights: ``body(X) @ W.T + b`` under
  ``torch.no_grad`` in the body's float32, to numpy;
* ``bare_float64_head``: the same forward pass, the head applied in float64 as ``predict``
  does (its predictions are the float64 head's, not float32's).

Predictions agree with the float64-head script to 1e-12 relative (asserted): float32 matrix
products round a row alike in any batch of 8 rows or more, so ``predict``'s features are the
script's bit for bit.

    python benchmarks/bench_predict.py
    python benchmarks/bench_predict.py --quick
"""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import torch
from _common import barh_figure, interleaved_medians, parser, write_csv
from torch import nn

from skl_transfer import LayerVariationalAdapter


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--repeats", type=int, default=41)
    cli.add_argument("--rows", type=int, default=1000)
    args = cli.parse_args(argv)
    repeats = 5 if args.quick else args.repeats
    torch.manual_seed(0)
    n_in, d = 64, 512
    body = nn.Sequential(nn.Linear(n_in, d), nn.ReLU(), nn.Linear(d, d), nn.Tanh())
    head = nn.Linear(d, 1, bias=False)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, n_in)).astype(np.float32)
    y = np.tanh(X[:, 0]) + 0.1 * rng.normal(size=1000)
    Xp = rng.normal(size=(args.rows, n_in)).astype(np.float32)
    fitted = {c: LayerVariationalAdapter(body, head, alpha=1.0, cache=c).fit(X, y) for c in (False, "auto")}
    fitted[1024] = LayerVariationalAdapter(body, head, alpha=1.0, cache=False, batch_size=1024).fit(X, y)
    coef = fitted[False].coef_
    W32, W64 = torch.as_tensor(coef, dtype=torch.float32), torch.as_tensor(coef, dtype=torch.float64)

    def bare():
        with torch.no_grad():
            return (body(torch.from_numpy(Xp)) @ W32).numpy()

    def bare64():
        with torch.no_grad():
            return (body(torch.from_numpy(Xp)).double() @ W64).numpy()

    calls = {
        "predict_cache_off": lambda: fitted[False].predict(Xp),
        "predict_cache_auto": lambda: fitted["auto"].predict(Xp),
        "predict_batch_1024": lambda: fitted[1024].predict(Xp),
        "bare": bare,
        "bare_float64_head": bare64,
    }
    med = {k: t for k, (t, _) in interleaved_medians(calls, repeats, warmup=2, seed=1).items()}
    ref = bare64()
    for c, est in fitted.items():
        diff = np.abs(est.predict(Xp) - ref) / np.abs(ref).max()
        assert diff.max() < 1e-12, (c, diff.max())
    threads = torch.get_num_threads()
    print(f"predict on {args.rows} rows, MLP d = {d}, {threads} threads, medians of {repeats}")
    rows = []
    for k, t in med.items():
        ratio, ratio64 = t / med["bare"], t / med["bare_float64_head"]
        print(f"{k:>20} {t * 1e3:8.2f} ms {ratio:6.2f} x bare {ratio64:6.2f} x bare_float64_head")
        rows.append(
            {"method": k, "n": args.rows, "d": d, "predict_s": t, "predict_s_over_bare_s": ratio,
             "predict_s_over_bare_float64_head_s": ratio64}
        )  # fmt: skip
    name = "bench_predict_quick" if args.quick else "bench_predict"
    path = write_csv(name, rows)
    barh_figure(
        name, path, list(med), [r["predict_s_over_bare_s"] for r in rows], "time / bare forward + head",
        f"predict, {args.rows} rows, d = {d}", line=1.2,
    )  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
