"""Throughput and memory of the fit against the limits it cannot beat (issue 7, CPU part).

Measured side by side in one run (medians of --repeats runs after a warm-up):

* ``resnet``: a ResNet-18-sized CNN (BasicBlocks [2, 2, 2, 2], 64..512 channels, random
  weights: nothing is downloaded) on 2,000 RGB images of 64 x 64, d = 512, batch 256:
  ``LayerVariationalAdapter(...).fit`` (cache off) against the forward pass alone (same
  data, same batch size, under ``torch.inference_mode``, output discarded). Target <= 1.3.
* ``mlp``: an MLP extractor 1024 -> 2048 -> 2048 -> 2048 (d = 2048) on 20,000 samples, where the
  d x d moments and solve are a large share. Target <= 1.5.
* ``solve``: the solve alone on precomputed float64 features (20,000 x 1024, 10 outputs) against
  ``sklearn.linear_model.Ridge(solver="auto")`` fitted on the residue, coefficients equal to 1e-8.
* ``stream``: ``fit`` on a generator of batches (the DataLoader input path) over 1,000,000
  samples of d = 1024 features made batch by batch (never all in memory), in a fresh
  subprocess: peak RSS growth of the whole fit. Target < 1 GiB.

    python benchmarks/throughput.py            # about 10 minutes on 2 idle cores
    python benchmarks/throughput.py --quick    # smaller sizes, a smoke test

Writes benchmarks/results/throughput.csv and .png (``_quick`` with --quick).
"""

import argparse
import subprocess
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import median_time, save_figure, write_csv
from sklearn.linear_model import Ridge
from torch import nn

from skl_transfer import LayerVariationalAdapter


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


def resnet18_body():
    """ResNet-18's layout (11.2 M parameters in the body): 512 features after global pooling."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c = 64
    for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(c, width, stride), BasicBlock(width, width, 1)]
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers).eval()


def mlp_body(d_in, width):
    layers = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def forward_only(body, X, batch_size):
    with torch.inference_mode():
        for start in range(0, len(X), batch_size):
            body(X[start : start + batch_size])


def fit_vs_forward(name, body, X, k, batch_size, repeats, target):
    torch.manual_seed(1)
    head = nn.Linear(body(X[:2]).shape[1], k)
    y = np.random.default_rng(0).normal(size=(len(X), k))
    est = LayerVariationalAdapter(body, head, alpha=1.0, cache=False, batch_size=batch_size)
    t_forward, _ = median_time(lambda: forward_only(body, X, batch_size), repeats)
    t_fit, _ = median_time(lambda: est.fit(X, y), repeats)
    ratio = t_fit / t_forward
    print(
        f"{name:<7} n={len(X)} d={est.coef_.shape[1]}: forward {t_forward:.2f} s, fit {t_fit:.2f} s, "
        f"ratio {ratio:.3f} (target <= {target})"
    )
    return dict(case=name, n=len(X), d=est.coef_.shape[1], baseline_s=t_forward, lva_s=t_fit, ratio=ratio,
                target=target, extra="")  # fmt: skip


def solve_vs_ridge(n, d, k, repeats):
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    W0, b0 = rng.normal(size=(k, d)) / np.sqrt(d), rng.normal(size=k)
    y = Z @ rng.normal(size=(d, k)) / np.sqrt(d) + rng.normal(size=(n, k))
    alpha = 10.0
    est = LayerVariationalAdapter(head=(W0, b0), alpha=alpha, cache=False, batch_size=4096)

    def ridge():
        return Ridge(alpha=alpha, solver="auto").fit(Z, y - Z @ W0.T - b0)

    t_ridge, r = median_time(ridge, repeats)
    t_lva, _ = median_time(lambda: est.fit(Z, y), repeats)
    err = np.abs(est.coef_ - (W0 + r.coef_)).max() / np.abs(W0 + r.coef_).max()
    print(
        f"solve   n={n} d={d} k={k}: Ridge(solver='auto') {t_ridge:.3f} s, LVA {t_lva:.3f} s, "
        f"Ridge/LVA {t_ridge / t_lva:.2f}x, max relative coefficient difference {err:.1e}"
    )
    return dict(case="solve", n=n, d=d, baseline_s=t_ridge, lva_s=t_lva, ratio=t_lva / t_ridge, target=1.0,
                extra=f"max rel coef diff {err:.1e}")  # fmt: skip


STREAM = textwrap.dedent(
    """
    import resource, sys, time, numpy as np
    from skl_transfer import LayerVariationalAdapter
    n, d, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    w = rng.normal(size=d) / np.sqrt(d)
    est = LayerVariationalAdapter(head=(np.zeros(d), 0.0), alpha=1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    def batches():  # made one at a time, never all in memory
        for start in range(0, n, batch):
            Z = rng.normal(size=(min(batch, n - start), d)).astype(np.float32)
            yield Z, Z @ w + rng.normal(size=len(Z))

    t0 = time.perf_counter()
    est.fit(batches())  # the iterable input path: moments streamed, one solve at the end
    seconds = time.perf_counter() - t0
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(seconds, growth, est.n_samples_seen_, np.corrcoef(est.coef_, w)[0, 1])
    """
)


def stream(n, d, batch):
    out = subprocess.run([sys.executable, "-c", STREAM, str(n), str(d), str(batch)], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    seconds, growth, seen, corr = float(out[0]), float(out[1]), int(out[2]), float(out[3])
    data_mb = n * d * 4 / 2**20
    print(
        f"stream  n={seen} d={d} (float32 data {data_mb:,.0f} MB, never all in memory), batches of "
        f"{batch}: {seconds:.1f} s, peak RSS growth {growth:.0f} MB (target < 1024); corr(coef, w) {corr:.4f}"
    )
    return dict(case="stream", n=seen, d=d, baseline_s=float("nan"), lva_s=seconds, ratio=growth / 1024,
                target=1.0, extra=f"peak RSS growth {growth:.0f} MB")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    rows = []
    n_img = 200 if args.quick else 2000
    X = torch.randn(n_img, 3, 64, 64)
    rows.append(fit_vs_forward("resnet", resnet18_body(), X, 10, 256, repeats, 1.3))
    n_mlp = 2000 if args.quick else 20000
    X = torch.randn(n_mlp, 1024)
    rows.append(fit_vs_forward("mlp", mlp_body(1024, 2048), X, 10, 1024, repeats, 1.5))
    rows.append(solve_vs_ridge(2000 if args.quick else 20000, 1024, 10, repeats))
    rows.append(stream(20000 if args.quick else 1_000_000, 1024, 8192))
    name = "throughput" + ("_quick" if args.quick else "")
    path = write_csv(name, rows)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [
        "fit / forward\n(ResNet-18)",
        "fit / forward\n(MLP)",
        "LVA / Ridge\n(solve)",
        "peak RSS / 1 GiB\n(1M stream)",
    ]
    ax.bar(labels, [r["ratio"] for r in rows], color="tab:blue")
    ax.scatter(labels, [r["target"] for r in rows], color="tab:red", marker="_", s=900, label="target")
    ax.set_ylabel("ratio (lower is better)")
    ax.legend()
    save_figure(fig, name, path)
    return rows


if __name__ == "__main__":
    main()
