"""Throughput and memory of the fit against the limits it cannot beat.

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
* ``srcnn``: the authors' SRCNN ('same' padding, conv head 32 -> 1, 5 x 5) on 8,192 patches of
  33 x 33: 8.9 million design rows of 800 (57 GiB if formed at once in float64; the authors'
  code needs 13 GiB), in a fresh subprocess: peak RSS growth of the fit. Target < 1 GiB.

Peak RSS growth is the process's own high-water mark (VmHWM, reset just before the fit).

    python benchmarks/throughput.py                # the CPU targets (about 15 minutes, 2 idle cores)
    python benchmarks/throughput.py --quick        # smaller sizes, a smoke test
    python benchmarks/throughput.py --device cuda  # the GPU targets (ResNet-50 at 224 x 224)

``--device`` runs :func:`device_checks` instead: fit throughput against forward-only throughput
(target >= 85%), the bytes copied device -> host during a fit, agreement with a float64 CPU
fit on the same features, and ``LayerVariationalAdapterCV`` over 30 alphas x 5 folds.

Writes benchmarks/results/throughput.csv and .png (``_quick`` with --quick), a row per case:
``ratio`` is the measure that ``target`` bounds (``lva_s / baseline_s``, or the peak RSS growth
over 1 GiB); ``--device`` writes throughput_<device type>.csv.
"""

import argparse
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import median_time, parser, peak_rss_growth_mib, run_fresh, save_figure, srcnn_paper, write_csv
from sklearn.linear_model import Ridge
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from skl_transfer import LayerVariationalAdapter, LayerVariationalAdapterCV


def shortcut(c_in, c_out, stride):
    """A residual block's skip connection: identity, or a strided 1 x 1 conv and BatchNorm."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = shortcut(c_in, c_out, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class Bottleneck(nn.Module):
    def __init__(self, c_in, width, stride):
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip
        self.skip = shortcut(c_in, c_out, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet50_body():
    """ResNet-50's layout (23.5 M parameters in the body, random weights): 2048 features."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            layers.append(Bottleneck(c, width, stride if i == 0 else 1))
            c = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers).eval()


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
                target=target, coef_rel_diff=None, peak_rss_growth_mib=None)  # fmt: skip


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
                coef_rel_diff=err, peak_rss_growth_mib=None)  # fmt: skip


class HostCopies(TorchDispatchMode):
    """Counts the bytes that torch copies from ``device_type`` to the host (``.cpu()``,
    ``.to("cpu")``, ``copy_`` into a CPU tensor, ``.item()``) while active."""

    def __init__(self, device_type):
        super().__init__()
        self.device_type, self.bytes, self.copies = device_type, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        pairs = []
        if func is torch.ops.aten.copy_.default:
            pairs = [(args[1], args[0])]
        elif args and isinstance(args[0], torch.Tensor):
            pairs = [(args[0], o) for o in (out if isinstance(out, tuple | list) else (out,))]
        for src, dst in pairs:
            if isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor):
                if src.device.type == self.device_type and dst.device.type == "cpu":
                    self.bytes += dst.numel() * dst.element_size()
                    self.copies += 1
            elif func is torch.ops.aten._local_scalar_dense.default and src.device.type == self.device_type:
                self.bytes += src.element_size()
                self.copies += 1
        return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_checks(device, n, size, batch, repeats):
    """The GPU targets on ``device`` (also runs on the CPU, small, as a test).

    ResNet-50 body (random weights) on n images of size x size already on the device, d = 2048:
    fit throughput / forward-only throughput (target >= 0.85); bytes copied device -> host
    during a fit (the features are n x 2048 floats: they must not be among them); agreement of
    the fit with a float64 CPU fit on the same features (brought to the host outside the fit);
    LayerVariationalAdapterCV over 30 alphas x 5 folds, timed and checked against the CPU.
    """
    device = torch.device(device)
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    body = resnet50_body().to(device)
    head = nn.Linear(2048, 10).to(device)
    X = torch.randn(n, 3, size, size, device=device)
    y = np.random.default_rng(0).normal(size=(n, 10))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device checks on {device} ({name}), ResNet-50 body, {n} images {size} x {size}, batch {batch}")

    def forward():
        forward_only(body, X, batch)
        _sync(device)

    est = LayerVariationalAdapter(body, head, alpha=1.0, cache=False, batch_size=batch, device=device)

    def fit():
        est.fit(X, y)
        _sync(device)

    t_forward, _ = median_time(forward, repeats)
    t_fit, _ = median_time(fit, repeats)
    share = t_forward / t_fit
    print(
        f"resnet50 forward {t_forward:.2f} s ({n / t_forward:.0f} images/s), fit {t_fit:.2f} s "
        f"({n / t_fit:.0f} images/s): fit throughput = {share:.1%} of forward-only (target >= 85%)"
    )
    with HostCopies(device.type) as copies:
        est.fit(X, y)
    feature_bytes = n * 2048 * 4
    if device.type != "cpu":
        print(
            f"device -> host during one fit: {copies.bytes / 2**20:.1f} MiB in {copies.copies} copies "
            f"(features: {feature_bytes / 2**20:.1f} MiB; d x d float64 moments: "
            f"{2048**2 * 8 / 2**20:.1f} MiB)"
        )
    with torch.inference_mode():  # the fit's batches: the same features
        Z = torch.cat([body(X[a : a + batch]) for a in range(0, n, batch)]).cpu().numpy()
    W0, b0 = head.weight.detach().cpu().numpy(), head.bias.detach().cpu().numpy()
    ref = LayerVariationalAdapter(head=(W0, b0), alpha=1.0, cache=False, device="cpu").fit(Z, y)
    diff = np.abs(est.coef_ - ref.coef_).max() / np.abs(ref.coef_).max()
    print(f"fit on {device} vs float64 CPU fit on the same features: max relative coef difference {diff:.1e}")
    alphas = np.logspace(-2, 4, 30)
    cv = LayerVariationalAdapterCV(
        body, head, alphas=alphas, cv=5, cache=False, batch_size=batch, device=device
    )
    t_cv, _ = median_time(lambda: (cv.fit(X, y), _sync(device)), 1, warmup=0)
    cv_ref = LayerVariationalAdapterCV(head=(W0, b0), alphas=alphas, cv=5, cache=False, device="cpu").fit(
        Z, y
    )
    cv_diff = np.abs(cv.coef_ - cv_ref.coef_).max() / np.abs(cv_ref.coef_).max()
    print(
        f"LayerVariationalAdapterCV 30 alphas x 5 folds: {t_cv:.2f} s ({t_cv / t_fit:.2f} x one fit), "
        f"alpha_ {cv.alpha_:g} (CPU on the same features: {cv_ref.alpha_:g}), coef difference {cv_diff:.1e}"
    )
    return dict(
        device=name, n=n, forward_s=t_forward, fit_s=t_fit, forward_over_fit=share,
        host_bytes=copies.bytes, feature_bytes=feature_bytes, coef_rel_diff=diff, cv_s=t_cv,
        cv_alpha=cv.alpha_, cv_alpha_cpu=cv_ref.alpha_, cv_coef_rel_diff=cv_diff,
    )  # fmt: skip


def _probe(kind, n):
    """Run in a fresh process (``--_probe``): one fit's peak RSS growth, printed as JSON."""
    if kind == "stream":  # fit on a generator of float32 feature batches (d = 1024), never all in memory
        d, batch = 1024, 8192
        rng = np.random.default_rng(0)
        w = rng.normal(size=d) / np.sqrt(d)
        est = LayerVariationalAdapter(head=(np.zeros(d), 0.0), alpha=1.0)

        def batches():  # made one at a time
            for start in range(0, n, batch):
                Z = rng.normal(size=(min(batch, n - start), d)).astype(np.float32)
                yield Z, Z @ w + rng.normal(size=len(Z))

        data, extra = batches(), {}
    else:  # the authors' SRCNN ('same' padding): n patches 33 x 33 -> n x 1089 rows of 800
        body, head = srcnn_paper()
        rng = np.random.default_rng(0)
        data = rng.random((n, 1, 33, 33), dtype=np.float32)
        extra = dict(y=rng.normal(size=(n, 1, 33, 33)).astype(np.float32))
        est = LayerVariationalAdapter(body, head, alpha=0.0, cache=False)
        w = None
    t0 = time.perf_counter()
    growth, _ = peak_rss_growth_mib(lambda: est.fit(data, **extra))
    out = dict(seconds=time.perf_counter() - t0, growth_mib=growth, n=int(est.n_samples_seen_))
    if w is not None:
        out["corr"] = float(np.corrcoef(est.coef_, w)[0, 1])
    print(json.dumps(out))


def memory(kind, n):
    res = run_fresh(__file__, "--_probe", kind, n)
    growth = res["growth_mib"]
    if kind == "stream":
        what = (
            f"stream  n={res['n']} d=1024 (float32 data {n * 1024 * 4 / 2**20:,.0f} MiB, never all in "
            f"memory), batches of 8192: {res['seconds']:.1f} s, corr(coef, w) {res['corr']:.4f}"
        )
    else:
        rows = n * 33 * 33
        what = (
            f"srcnn   n={n} patches 33 x 33, 'same' padding: {rows:,} design rows x 800 (all at once: "
            f"{rows * 800 * 8 / 2**30:.1f} GiB in float64), fit {res['seconds']:.1f} s"
        )
    print(f"{what}; peak RSS growth {growth:.0f} MiB (fresh process; target < 1024)")
    return dict(case=kind, n=n, d=800 if kind == "srcnn" else 1024, baseline_s=None,
                lva_s=res["seconds"], ratio=growth / 1024, target=1.0,
                coef_rel_diff=None, peak_rss_growth_mib=growth)  # fmt: skip


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--repeats", type=int, default=None)
    cli.add_argument(
        "--device",
        default=None,
        help="run the device checks (ResNet-50, 224 x 224) on this device instead, e.g. cuda",
    )
    cli.add_argument("--_probe", nargs=2, dest="probe", help=argparse.SUPPRESS)
    args = cli.parse_args(argv)
    if args.probe:
        return _probe(args.probe[0], int(args.probe[1]))
    repeats = args.repeats or (1 if args.quick else 3)
    if args.device is not None:
        n, size, batch = (16, 64, 8) if args.quick else (4096, 224, 256)
        row = device_checks(args.device, n, size, batch, repeats)
        write_csv(f"throughput_{torch.device(args.device).type}" + ("_quick" if args.quick else ""), [row])
        return [row]
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
    rows.append(memory("stream", 20000 if args.quick else 1_000_000))
    rows.append(memory("srcnn", 256 if args.quick else 8192))
    name = "throughput" + ("_quick" if args.quick else "")
    path = write_csv(name, rows)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [
        "fit / forward\n(ResNet-18)",
        "fit / forward\n(MLP)",
        "LVA / Ridge\n(solve)",
        "peak RSS / 1 GiB\n(1M stream)",
        "peak RSS / 1 GiB\n(SRCNN, 8192)",
    ]
    ax.bar(labels, [r["ratio"] for r in rows], color="tab:blue")
    ax.scatter(labels, [r["target"] for r in rows], color="tab:red", marker="_", s=900, label="target")
    ax.set_ylabel("ratio (lower is better)")
    ax.legend()
    save_figure(fig, name, path)
    return rows


if __name__ == "__main__":
    main()
