"""Which pretrained extractor will transfer best? transferability() against LogME.

Nine small CNNs (widths 4 to 24 channels, pretrained for 10 or 80 full-batch Adam epochs, and
one left at its random initialisation) are pretrained on clean 8 x 8 digits (sklearn's bundled
``load_digits``, the first 900 images; one-hot targets, squared loss; weights cached in
benchmarks/.cache). The target task is the other 897 digits blurred (Gaussian, sigma = 1 pixel).
From N = 100 labelled target images (3 random draws), for each extractor:

* ``transferability(body, head, X, Y)``: leave-one-out MSE of the adapted last layer (32 -> 10),
  its score is minus that MSE; also the pretrained network's MSE (a naive score);
* LogME of the body's features for the one-hot targets (You et al., ICML 2021);
* the actual outcome: the adapted head (alpha chosen by leave-one-out on the N images; the
  estimator transferability() returns) scored on the held-out target images, MSE and accuracy.

Reported: Kendall's tau and Spearman's rho between each score and minus the held-out MSE, per
draw (CSV column ``seed``) and averaged. Timed, once per extractor and draw: each score
(``transferability_s``, ``logme_s``: LogME's includes the body's forward pass). Pretraining is
cached after the first run.

    python benchmarks/bench_transferability.py           # first run: 6 min (pretraining), then cached
    python benchmarks/bench_transferability.py --quick   # 4 extractors, 1 draw
"""

import time
from functools import partial

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import digit_images, digits_cnn, median_time, parser, pretrain, save_figure, write_csv
from scipy.ndimage import gaussian_filter
from scipy.stats import kendalltau, spearmanr

from skl_transfer import logme, transferability

ALPHAS = np.logspace(-3, 4, 15)


def logme_of_features(body, X, Y):
    """LogME of the body's features of X for the targets Y."""
    with torch.no_grad():
        return logme(body.eval()(torch.as_tensor(X)).numpy().astype(np.float64), Y)


def main(argv=None):
    cli = parser(__doc__, quick_help="4 extractors, 1 draw")
    cli.add_argument("--n", type=int, default=100, help="labelled target images")
    args = cli.parse_args(argv)
    torch.set_num_threads(2)

    X, y = digit_images()
    onehot = np.eye(10, dtype=np.float32)[y]
    Xs, Ys = X[:900], onehot[:900]
    Xt, Yt, labels = gaussian_filter(X[900:], sigma=(0, 0, 1.0, 1.0)), onehot[900:], y[900:]

    configs = [(4, 10), (4, 80), (8, 10), (8, 80), (16, 0), (16, 10), (16, 80), (24, 10), (24, 80)]
    draws = [0, 1, 2]
    if args.quick:
        configs, draws = [(4, 10), (8, 80), (16, 0), (16, 80)], [0]
    nets = {}
    t0 = time.perf_counter()
    for width, epochs in configs:
        net = digits_cnn(width, hidden=32)
        if epochs:
            net, _ = pretrain(net, Xs, Ys, epochs=epochs, lr=1e-2, name=f"transfer_digits_w{width}_e{epochs}")
        nets[(width, epochs)] = net.eval()
    print(f"pretrained {len(nets)} extractors on clean digits ({time.perf_counter() - t0:.1f} s)")

    rows = []
    for draw in draws:
        rng = np.random.default_rng(draw)
        order = rng.permutation(len(Xt))
        train, test = order[: args.n], order[args.n :]
        for (width, epochs), net in nets.items():
            body, head = net[:-1], net[-1]
            score = partial(transferability, body, head, Xt[train], Yt[train], alphas=ALPHAS)
            t_score, result = median_time(score, 1, warmup=0)
            t_logme, lm = median_time(partial(logme_of_features, body, Xt[train], Yt[train]), 1, warmup=0)
            pred = result.adapter.predict(Xt[test])
            rows.append(
                {
                    "seed": draw,
                    "extractor": f"w{width}-e{epochs}",
                    "width": width,
                    "epochs": epochs,
                    "transferability_loo_mse": result.adapted_mse,
                    "pretrained_mse": result.pretrained_mse,
                    "probe_loo_mse": result.probe_mse,
                    "alpha": result.alpha,
                    "rank": result.diagnostics.rank,
                    "span_share": result.diagnostics.span_share,
                    "logme": lm,
                    "test_mse": float(np.mean((pred - Yt[test]) ** 2)),
                    "test_accuracy": float(np.mean(pred.argmax(1) == labels[test])),
                    "transferability_s": t_score,
                    "logme_s": t_logme,
                }
            )

    scores = {
        "transferability (-LOO MSE)": lambda r: -r["transferability_loo_mse"],
        "LogME": lambda r: r["logme"],
        "pretrained (-MSE)": lambda r: -r["pretrained_mse"],
    }
    print(f"\nN = {args.n} blurred target digits, {len(nets)} extractors, {len(draws)} draws")
    print(f"{'extractor':>10} {'LOO MSE':>9} {'LogME':>8} {'pretr.':>8} {'test MSE':>9} {'test acc':>8}")
    for r in rows:
        if r["seed"] == draws[0]:
            print(
                f"{r['extractor']:>10} {r['transferability_loo_mse']:9.4f} {r['logme']:8.3f} "
                f"{r['pretrained_mse']:8.4f} {r['test_mse']:9.4f} {r['test_accuracy']:8.3f}"
            )
    print("\nrank correlation with the held-out outcome (-test MSE), mean over draws")
    summary = {}
    for name, score in scores.items():
        taus, rhos = [], []
        for draw in draws:
            rs = [r for r in rows if r["seed"] == draw]
            s, outcome = [score(r) for r in rs], [-r["test_mse"] for r in rs]
            taus.append(kendalltau(s, outcome).statistic)
            rhos.append(spearmanr(s, outcome).statistic)
        summary[name] = (float(np.mean(taus)), float(np.mean(rhos)))
        print(f"  {name:<28} Kendall tau {summary[name][0]:+.3f}   Spearman rho {summary[name][1]:+.3f}")
    t_tr = np.median([r["transferability_s"] for r in rows])
    t_lm = np.median([r["logme_s"] for r in rows])
    print(f"median time per extractor: transferability {t_tr:.3f} s, LogME {t_lm:.4f} s (features given)")

    name = "bench_transferability" + ("_quick" if args.quick else "")
    path = write_csv(name, rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    first = [r for r in rows if r["seed"] == draws[0]]
    for ax, (label, key) in zip(
        axes, [("transferability: LOO MSE", "transferability_loo_mse"), ("LogME", "logme")], strict=True
    ):
        ax.scatter([r[key] for r in first], [r["test_mse"] for r in first])
        for r in first:
            ax.annotate(r["extractor"], (r[key], r["test_mse"]), fontsize=7)
        tau = summary["transferability (-LOO MSE)" if key != "logme" else "LogME"][0]
        ax.set(xlabel=label, ylabel="held-out MSE after adaptation", title=f"{label} (mean tau {tau:+.2f})")
    save_figure(fig, name, path)
    return summary, rows


if __name__ == "__main__":
    main()
