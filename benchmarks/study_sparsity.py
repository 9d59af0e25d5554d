"""Sparsity study: target test error against the number of target samples, several alphas.

The paper's experiment 1 network (Tseng et al., ICLR 2023), pretrained on the source domain (weights
cached in benchmarks/.cache), is adapted with LayerVariationalAdapter at several alphas and
with LayerVariationalAdapterCV (alpha by leave-one-out) on N target samples drawn from one
half of the 2000 target points, and scored on the other half (held out, never trained on).
Several seeds per N; the table gives the mean and standard deviation of the held-out mean
squared error. (Gradient-descent fine-tuning of the same layer joins this study when the
library's GD baseline lands.)

    python benchmarks/study_sparsity.py            # N in 8..1000, 10 seeds (about 30 s)
    python benchmarks/study_sparsity.py --quick    # fewer sizes and seeds, 500 pretraining epochs
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import parser, predict_torch, pretrain, save_figure, summarise, timeseries_setup, write_csv

from skl_transfer import LayerVariationalAdapter, LayerVariationalAdapterCV

ALPHAS = [0.0, 1e-3, 1e-1, 10.0, 1000.0]


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    sizes = [8, 32, 128] if args.quick else [8, 16, 32, 64, 128, 256, 512, 1000]
    seeds = range(3 if args.quick else 10)

    t, x, t_new, x_new, net = timeseries_setup()
    epochs = 500 if args.quick else 5000
    net, _ = pretrain(net, t, x, epochs=epochs, name=None if args.quick else "exp1_pretrained")
    body, head = net[:-1], net[-1]
    split = np.random.default_rng(12345).permutation(len(t_new))
    pool, test = split[:1000], split[1000:]
    mse_pre = float(np.mean((predict_torch(net, t_new[test]) - x_new[test]) ** 2))

    rows = []
    for n in sizes:
        for seed in seeds:
            idx = np.random.default_rng(seed).choice(pool, size=n, replace=False)
            fits = {f"LVA alpha={a:g}": LayerVariationalAdapter(body, head, alpha=a) for a in ALPHAS}
            fits["LVA-CV (LOO, 21 alphas)"] = LayerVariationalAdapterCV(
                body, head, alphas=np.logspace(-6, 4, 21)
            )
            for name, est in fits.items():
                est.fit(t_new[idx], x_new[idx])
                err = float(np.mean((est.predict(t_new[test]).ravel() - x_new[test].ravel()) ** 2))
                rows.append(dict(n=n, seed=seed, method=name, test_mse=err))
            rows.append(dict(n=n, seed=seed, method="pretrained", test_mse=mse_pre))
    name = "study_sparsity_quick" if args.quick else "study_sparsity"
    path = write_csv(name, rows)

    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"held-out target MSE (1000 points), mean ± std over {len(seeds)} seeds")
    print(f"{'N':>5} " + " ".join(f"{m[:22]:>24}" for m in methods))
    summary = summarise(rows, "test_mse")
    for n in sizes:
        cells = [f"{summary[(n, m)]['mean']:>13.4f} ± {summary[(n, m)]['std']:<8.4f}" for m in methods]
        print(f"{n:>5} " + " ".join(f"{c:>24}" for c in cells))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in methods:
        mean, std = (np.array([summary[(n, m)][k] for n in sizes]) for k in ("mean", "std"))
        ax.plot(sizes, mean, "k--" if m == "pretrained" else "o-", label=m)
        ax.fill_between(sizes, np.maximum(mean - std, 1e-3), mean + std, alpha=0.15)  # log axis
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("target training samples N")
    ax.set_ylabel("held-out target MSE")
    ax.set_title("Sparsity study, experiment 1 (mean ± std over seeds)")
    ax.legend(fontsize=7)
    save_figure(fig, name, path)
    return summary


if __name__ == "__main__":
    main()
