"""Fit time of LayerVariationalAdapter against the scripts a user would otherwise write.

Timed, per number of target samples N (medians of --repeats runs after one warm-up, all in
one process, side by side):

* ``lva``: ``LayerVariationalAdapter(body, head, alpha, cache=False).fit(X, y)``: private
  frozen copy, batched forward pass, moments merged on the torch side, one d x d solve (the
  feature cache is off, or repeated fits on the same data would be served from it).
* ``ridge_script``: the ten-line script: one forward pass under ``torch.no_grad`` of the whole
  X, features to numpy float64, residue, ``sklearn.linear_model.Ridge(alpha).fit`` on it.
* ``pinv_script`` (alpha = 0 only): the authors' approach, ``np.linalg.pinv`` of the N x d
  feature matrix (a full SVD).

Not timed: building data and networks. Both scripts also need the whole N x d float64 feature
matrix in memory, which the estimator never forms (its memory is O(d^2 + batch)).
All three give the same coefficients (checked here, to 1e-6 relative).

    python benchmarks/bench_fit.py            # N in 1000, 4000, 16000, 64000; d = 512
    python benchmarks/bench_fit.py --quick
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import median_time, parser, save_figure, write_csv
from sklearn.linear_model import Ridge
from torch import nn

from skl_transfer import LayerVariationalAdapter


def ridge_script(body, head, X, y, alpha):
    with torch.no_grad():
        Z = body.eval()(torch.as_tensor(X)).double().numpy()
    W0 = head.weight.detach().double().numpy()
    Q = y - Z @ W0[0]
    return Ridge(alpha=alpha, fit_intercept=False).fit(Z, Q).coef_ + W0[0]


def pinv_script(body, head, X, y):
    with torch.no_grad():
        Z = body.eval()(torch.as_tensor(X)).double().numpy()
    W0 = head.weight.detach().double().numpy()
    return W0[0] + np.linalg.pinv(Z) @ (y - Z @ W0[0])


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--repeats", type=int, default=5)
    args = cli.parse_args(argv)
    sizes = [1000, 4000] if args.quick else [1000, 4000, 16000, 64000]
    d, n_in = (128, 32) if args.quick else (512, 64)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(n_in, d), nn.ReLU(), nn.Linear(d, d), nn.Tanh())
    head = nn.Linear(d, 1, bias=False)  # the paper's bias-free last layer
    rng = np.random.default_rng(0)
    rows = []
    print(f"d = {d} features, {torch.get_num_threads()} torch threads; median of {args.repeats} runs")
    print(
        f"{'N':>7} {'alpha':>6} {'lva s':>9} {'ridge s':>9} {'pinv s':>9} {'ridge/lva':>10} {'pinv/lva':>9}"
    )
    for n in sizes:
        X = rng.normal(size=(n, n_in)).astype(np.float32)
        y = np.tanh(X[:, 0]) + 0.1 * rng.normal(size=n)
        for alpha in (0.0, 1.0):
            # cache off: every timed fit runs the extractor, as the scripts do
            lva = LayerVariationalAdapter(body, head, alpha=alpha, device="cpu", batch_size=1024, cache=False)
            t_lva, est = median_time(lambda X=X, y=y, lva=lva: lva.fit(X, y), args.repeats)
            t_ridge, coef_r = median_time(
                lambda X=X, y=y, alpha=alpha: ridge_script(body, head, X, y, alpha), args.repeats
            )
            np.testing.assert_allclose(est.coef_, coef_r, rtol=1e-6, atol=1e-6)
            t_pinv = None  # the pinv script solves alpha = 0 only
            if alpha == 0.0:
                t_pinv, coef_p = median_time(lambda X=X, y=y: pinv_script(body, head, X, y), args.repeats)
                np.testing.assert_allclose(est.coef_, coef_p, rtol=1e-6, atol=1e-6)
            rows.append(
                dict(
                    n=n,
                    d=d,
                    alpha=alpha,
                    lva_s=t_lva,
                    ridge_script_s=t_ridge,
                    pinv_script_s=t_pinv,
                    ridge_over_lva=t_ridge / t_lva,
                    pinv_over_lva=None if t_pinv is None else t_pinv / t_lva,
                )
            )
            r = rows[-1]
            pinv, pinv_over_lva = (np.nan, np.nan) if t_pinv is None else (t_pinv, r["pinv_over_lva"])
            print(
                f"{n:>7} {alpha:>6} {t_lva:>9.4f} {t_ridge:>9.4f} {pinv:>9.4f} "
                f"{r['ridge_over_lva']:>10.2f} {pinv_over_lva:>9.2f}"
            )
    name = "bench_fit_quick" if args.quick else "bench_fit"
    path = write_csv(name, rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("lva_s", "LayerVariationalAdapter"),
        ("ridge_script_s", "forward + Ridge script"),
        ("pinv_script_s", "forward + pinv script"),
    ):
        for alpha, style in ((0.0, "o-"), (1.0, "s--")):
            pts = [(r["n"], r[key]) for r in rows if r["alpha"] == alpha and r[key] is not None]
            if pts:
                ax.loglog(*zip(*pts, strict=True), style, label=f"{label}, alpha={alpha:g}")
    ax.set_xlabel("target samples N")
    ax.set_ylabel("fit time, s (median)")
    ax.set_title(f"Fit time, d = {d}")
    ax.legend(fontsize=7)
    save_figure(fig, name, path)
    return rows


if __name__ == "__main__":
    main()
