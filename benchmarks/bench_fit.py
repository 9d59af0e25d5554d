"""Fit time of LayerVariationalAdapter against the scripts a user would otherwise write.

Timed, per feature size d, number of threads and number of target samples N (medians of
--repeats runs after one warm-up, all in one process, side by side; each method's runs back
to back, as a user runs one of them. Interleaved in a shuffled order, the fit at d = 512,
N = 1000, 2 threads took 0.124 s instead of 0.053 s: right after a script's threaded numpy
BLAS calls, OpenBLAS's workers spin on and slow the fit's torch forward pass, so such a ratio
measures the two methods' interference):

* ``lva``: ``LayerVariationalAdapter(body, head, alpha, cache=False).fit(X, y)``: private
  frozen copy, batched forward pass, moments, one d x d solve (the feature cache is off, or
  repeated fits on the same data would be served from it).
* ``ridge_script``: the ten-line script: one forward pass under ``torch.no_grad`` of the whole
  X, features to numpy float64, residue, ``sklearn.linear_model.Ridge(alpha).fit`` on it.
* ``pinv_script`` (alpha = 0 only; at d = 2048 only where N < d, as its full SVD of the
  N x d features takes minutes at larger N): the authors' approach, ``np.linalg.pinv``.

Threads: ``torch.set_num_threads(t)`` and ``threadpoolctl.threadpool_limits(t)`` for every
method alike (numpy's BLAS included). Not timed: building data and networks. Both scripts
need the whole N x d float64 feature matrix in memory; the estimator holds at most 256 MiB
of design rows at a time (``_moments.CHUNK_BYTES``) plus O(d^2).

Coefficients, checked for every row: ``script_rel_diff`` is the largest difference from the
Ridge script's (pinv's for alpha = 0 and N < d, where Ridge's alpha = 0 is not the
minimum-norm solution), relative to the largest coefficient, which must be below 1e-8. The
fit's batches (``batch_size=1024``) give the script's features bit for bit (float32 matrix
products round a row alike in any batch of 8 rows or more); ``same_features_rel_diff``
compares with the script on the features recomputed in the fit's batches, which tells a
difference in the solve from one in the features.

    python benchmarks/bench_fit.py            # d in 512, 2048; 2 and 1 threads; N 1000 .. 64000
    python benchmarks/bench_fit.py --dims 512 --threads 2
    python benchmarks/bench_fit.py --quick
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import median_time, parser, save_figure, write_csv
from sklearn.linear_model import Ridge
from threadpoolctl import threadpool_limits
from torch import nn

from skl_transfer import LayerVariationalAdapter


def features(body, X, batch_size=None):
    """The script's features (one forward pass of all of X), or with ``batch_size`` the
    fit's (its batches)."""
    with torch.no_grad():
        Xt = torch.as_tensor(X)
        if batch_size is None:
            return body.eval()(Xt).double().numpy()
        parts = [body.eval()(Xt[i : i + batch_size]) for i in range(0, len(X), batch_size)]
        return torch.cat(parts).double().numpy()


def ridge_on(Z, head, y, alpha):
    W0 = head.weight.detach().double().numpy()
    Q = y - Z @ W0[0]
    return Ridge(alpha=alpha, fit_intercept=False).fit(Z, Q).coef_ + W0[0]


def pinv_on(Z, head, y):
    W0 = head.weight.detach().double().numpy()
    return W0[0] + np.linalg.pinv(Z) @ (y - Z @ W0[0])


def ridge_script(body, head, X, y, alpha):
    return ridge_on(features(body, X), head, y, alpha)


def pinv_script(body, head, X, y):
    return pinv_on(features(body, X), head, y)


def rel_diff(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


BATCH = 1024


def bench(d, n_in, sizes, threads, repeats, rows):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(n_in, d), nn.ReLU(), nn.Linear(d, d), nn.Tanh())
    head = nn.Linear(d, 1, bias=False)  # the paper's bias-free last layer
    rng = np.random.default_rng(0)
    print(f"\nd = {d} features, {threads} thread(s) (torch and BLAS); median of {repeats} runs")
    print(
        f"{'N':>7} {'alpha':>6} {'lva s':>9} {'ridge s':>9} {'pinv s':>9} {'ridge/lva':>10} "
        f"{'pinv/lva':>9} {'coef vs script':>15} {'same features':>14}"
    )
    for n in sizes:
        X = rng.normal(size=(n, n_in)).astype(np.float32)
        y = np.tanh(X[:, 0]) + 0.1 * rng.normal(size=n)
        for alpha in (0.0, 1.0):
            lva = LayerVariationalAdapter(
                body, head, alpha=alpha, device="cpu", batch_size=BATCH, cache=False
            )
            t_lva, est = median_time(lambda X=X, y=y, lva=lva: lva.fit(X, y), repeats)
            t_ridge, coef_r = median_time(
                lambda X=X, y=y, alpha=alpha: ridge_script(body, head, X, y, alpha), repeats
            )
            t_pinv, coef_p = None, None
            if alpha == 0.0 and (d <= 512 or n < d):
                t_pinv, coef_p = median_time(lambda X=X, y=y: pinv_script(body, head, X, y), repeats)
            Zfit = features(body, X, BATCH)
            if alpha == 0.0 and n < d:  # underdetermined: the minimum-norm solution is pinv's
                script, same = coef_p, pinv_on(Zfit, head, y)
            else:
                script, same = coef_r, ridge_on(Zfit, head, y, alpha)
            row = dict(
                d=d,
                threads=threads,
                n=n,
                alpha=alpha,
                lva_s=t_lva,
                ridge_script_s=t_ridge,
                pinv_script_s=t_pinv,
                ridge_over_lva=t_ridge / t_lva,
                pinv_over_lva=None if t_pinv is None else t_pinv / t_lva,
                script_rel_diff=rel_diff(est.coef_, script),
                same_features_rel_diff=rel_diff(est.coef_, same),
            )
            rows.append(row)
            pinv, pinv_over_lva = (np.nan, np.nan) if t_pinv is None else (t_pinv, row["pinv_over_lva"])
            print(
                f"{n:>7} {alpha:>6} {t_lva:>9.4f} {t_ridge:>9.4f} {pinv:>9.4f} "
                f"{row['ridge_over_lva']:>10.2f} {pinv_over_lva:>9.2f} {row['script_rel_diff']:>15.1e} "
                f"{row['same_features_rel_diff']:>14.1e}",
                flush=True,
            )
            assert row["same_features_rel_diff"] < 1e-8 and row["script_rel_diff"] < 1e-8, row


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--repeats", type=int, default=5)
    cli.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    cli.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = cli.parse_args(argv)
    sizes = [1000, 4000] if args.quick else [1000, 4000, 16000, 64000]
    dims = [128] if args.quick else args.dims
    rows = []
    before = torch.get_num_threads()
    try:
        for d in dims:
            n_in = 32 if args.quick else 64
            for t in args.threads:
                torch.set_num_threads(t)
                with threadpool_limits(t):
                    bench(d, n_in, sizes, t, args.repeats, rows)
    finally:
        torch.set_num_threads(before)
    name = "bench_fit_quick" if args.quick else "bench_fit"
    path = write_csv(name, rows)
    keys = sorted({(r["d"], r["threads"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, (d, t) in zip(axes[0], keys, strict=True):
        for key, label in (
            ("lva_s", "LayerVariationalAdapter"),
            ("ridge_script_s", "forward + Ridge script"),
            ("pinv_script_s", "forward + pinv script"),
        ):
            for alpha, style in ((0.0, "o-"), (1.0, "s--")):
                pts = [
                    (r["n"], r[key])
                    for r in rows
                    if (r["d"], r["threads"], r["alpha"]) == (d, t, alpha) and r[key] is not None
                ]
                if pts:
                    ax.loglog(*zip(*pts, strict=True), style, label=f"{label}, alpha={alpha:g}")
        ax.set_xlabel("target samples N")
        ax.set_ylabel("fit time, s (median)")
        ax.set_title(f"d = {d}, {t} thread(s)")
    axes[0][0].legend(fontsize=6)
    save_figure(fig, name, path)
    return rows


if __name__ == "__main__":
    main()
