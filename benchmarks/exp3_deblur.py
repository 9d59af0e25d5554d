"""Experiment 3 of the paper (Tseng et al., ICLR 2023): deblurring with SRCNN.

An SRCNN is pretrained to undo a bicubic blur of scale 3 on source images, then its last conv
layer (32 -> 1, 5 x 5, no bias) is adapted to a blur of scale 6 with N target patches of
33 x 33 and scored by PSNR against the *sharp* held-out images (the authors' notebook measures
PSNR against the blurred input; this script does not).

Data: images shipped with scikit-image, in three disjoint sets (``IMAGES``): source images for
pretraining (scale 3), target training images (scale 6, the N patches are drawn from them) and
held-out target test images (scale 6). Each image is converted to the Y channel of YCbCr
(``skimage.color.rgb2ycbcr``, ITU-R BT.601, Y in [16, 235]) divided by 255 and cropped to a
multiple of 6; "blur" is ``skimage.transform.resize`` with ``order=3`` (bicubic) down by s
with anti-aliasing (the convention of MATLAB's and PIL's bicubic ``imresize``, which the
super-resolution literature and the authors' code use) and back up.

Network: conv 1 -> 32 (9 x 9), three conv 32 -> 32 (5 x 5), each followed by ReLU and
BatchNorm (the authors' order), and the head conv 32 -> 1 (5 x 5, bias-free). All convolutions
are 'valid' (no padding, as in the original SRCNN): a 33 x 33 input patch gives a 9 x 9 output
and the target is the sharp patch's centre (12 pixels cropped on each side); whole images
lose 12 pixels on each side, and PSNR is measured on that interior. The network predicts the
*detail* (sharp minus blurred), and the output image is blurred + network(blurred): a global
residual connection, with the head initialised to zero, so the pretrained network starts at
the blurred input. (Without it, a plain SRCNN needs far more steps than a CPU budget
allows: after 300 Adam steps on 64 x 64 crops it was still 7 dB below its own input.) The
head's targets y are therefore sharp - blurred, of the head's output shape (n, 1, 9, 9).

Pretraining: 300 Adam steps (lr 1e-3 decayed linearly to 0), each on 16 fresh random 64 x 64
crops of the source images at scale 3 (larger crops than 33 x 33 give more output pixels per
step; the network is fully convolutional), cached in benchmarks/.cache/exp3_srcnn.pt.
Adaptation is done with the network in eval mode (BatchNorm uses its running statistics).

Adaptation, for each N and seed (the N patches are the first N of 4096 random patches drawn
per seed from the target training images, so the sets are nested; the same for every method):

- LVA (alpha=0): ``LayerVariationalAdapter(alpha=0)``, the paper's formula;
- LVA-CV: ``LayerVariationalAdapterCV`` with alpha chosen by 5-fold CV on the N patches
  among 0 and 1, 10, ..., 1e7 (``ALPHAS``);
- GD: ``GradientDescentAdapter`` with the paper's settings (Adam, lr 1e-4, batch 1, 50 epochs)
  for N <= 256; for N >= 1024 the batch is N // 32 (32 at N = 1024, 128 at N = 4096; still
  50 epochs at lr 1e-4, so 1600 Adam steps), to fit a CPU budget;
- GD-tuned: the same, keeping the epoch of lowest loss on 20 % of the N patches held out
  (``validation_fraction=0.2``; never the test images);
- skorch (optional: ``pip install skorch``): ``NeuralNetRegressor`` training a copy of the head
  on the frozen body's features (computed once, in the timed region), same optimiser, lr,
  batch size and epochs as GD.

PSNR: the adapted network's output on each whole held-out image (blurred + head(body(blurred)),
clipped to [0, 1]) against the sharp image, on the interior 12 pixels in from each edge, averaged
over the images. Every timed fit starts from an empty feature cache, so each method pays for
its own forward pass. torch and BLAS run one thread by default (``--threads``): on a shared
machine a second thread made GD's tiny per-sample steps 20 times slower (OpenMP
synchronisation), which would time the machine's load rather than the methods. The peak memory
of the LVA fit at the largest N is measured in a fresh subprocess.

    python benchmarks/exp3_deblur.py           # about 13 minutes on one core (pretraining cached)
    python benchmarks/exp3_deblur.py --quick   # a small version, writes *_quick.csv/.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import skimage.data
import torch
from _common import (
    blur,
    cached_weights,
    fit_skorch,
    median_time,
    parser,
    peak_rss_growth_mib,
    run_fresh,
    save_figure,
    srcnn,
    summarise,
    write_csv,
)
from skimage.color import gray2rgb, rgb2ycbcr
from threadpoolctl import threadpool_limits
from torch import nn
from torch.nn import functional as F

from skl_transfer import (
    GradientDescentAdapter,
    LayerVariationalAdapter,
    LayerVariationalAdapterCV,
    clear_cache,
)

IMAGES = {
    "source": ("astronaut", "brick", "grass", "page", "immunohistochemistry"),
    "target_train": ("coffee", "rocket", "moon", "gravel", "text"),
    "target_test": ("camera", "chelsea", "coins", "clock"),
}
SOURCE_SCALE, TARGET_SCALE = 3, 6
PATCH = 33
CROP = 12  # 'valid' convolutions: (9 - 1) / 2 + 3 * (5 - 1) / 2 + (5 - 1) / 2 pixels per side
ALPHAS = np.concatenate([[0.0], np.logspace(0, 7, 8)])
GD_LR, GD_EPOCHS = 1e-4, 50  # the paper's GD settings (with batch 1, capped for large N in main)
METHODS = ("LVA (alpha=0)", "LVA-CV", "GD", "GD-tuned", "skorch")


def load_y(name):
    """Y channel of an image shipped with scikit-image, / 255, cropped to a multiple of 6."""
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = gray2rgb(img)
    y = rgb2ycbcr(img[..., :3])[..., 0] / 255.0
    h, w = (np.array(y.shape) // 6) * 6
    return y[:h, :w].astype(np.float32)


def residual_srcnn(seed=0):
    """The 'valid' SRCNN, its head initialised to zero (residual learning: it starts at the
    blurred input), as one Sequential."""
    body, head = srcnn(seed)
    nn.init.zeros_(head.weight)
    return nn.Sequential(*body, head)


def patches(pairs, n, rng, size=PATCH):
    """n random (blurred patch, detail target) pairs from (blurred, sharp) images: inputs
    (n, 1, size, size) and targets sharp - blurred on the centre, (n, 1, size - 24, size - 24)."""
    counts = np.array([(b.shape[0] - size + 1) * (b.shape[1] - size + 1) for b, _ in pairs])
    which = rng.choice(len(pairs), size=n, p=counts / counts.sum())
    X = np.empty((n, 1, size, size), np.float32)
    Y = np.empty((n, 1, size - 2 * CROP, size - 2 * CROP), np.float32)
    inner = slice(CROP, size - CROP)
    for i, k in enumerate(which):
        b, s = pairs[k]
        r, c = rng.integers(b.shape[0] - size + 1), rng.integers(b.shape[1] - size + 1)
        X[i, 0] = b[r : r + size, c : c + size]
        Y[i, 0] = s[r : r + size, c : c + size][inner, inner] - X[i, 0, inner, inner]
    return X, Y


def pretrain_srcnn(pairs, *, steps, batch, crop, name):
    """Adam (lr 1e-3 decayed linearly to 0) on random crops of the source images (fresh crops
    every step); cached under benchmarks/.cache/."""

    def train(net):
        rng = np.random.default_rng(0)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)  # linear decay to 0
        net.train()
        for _ in range(steps):
            X, Y = patches(pairs, batch, rng, size=crop)
            opt.zero_grad()
            F.mse_loss(net(torch.as_tensor(X)), torch.as_tensor(Y)).backward()
            opt.step()
            schedule.step()

    net, loaded = cached_weights(residual_srcnn(), name, train)
    return net.eval(), loaded


def psnr(pred, sharp):
    return float(10 * np.log10(1.0 / np.mean((np.clip(pred, 0, 1) - sharp) ** 2)))


class TestSet:
    """Held-out images: body features computed once; any head is then one cheap convolution
    (in float32, the network's dtype: torch's float64 convolution is 20 times slower, and the
    PSNR moves by less than 1e-5 dB)."""

    def __init__(self, body, pairs):
        self.items = []
        with torch.no_grad():
            for b, s in pairs:
                feats = body(torch.as_tensor(b)[None, None])
                inner = (slice(CROP, -CROP), slice(CROP, -CROP))
                self.items.append((feats, b[inner].astype(np.float64), s[inner].astype(np.float64)))

    def outputs(self, weight):
        w = torch.as_tensor(np.asarray(weight, dtype=np.float32)).reshape(1, 32, 5, 5)
        with torch.no_grad():
            return [b + F.conv2d(feats, w)[0, 0].double().numpy() for feats, b, _ in self.items]

    def psnr(self, weight):
        return float(
            np.mean([psnr(out, s) for out, (_, _, s) in zip(self.outputs(weight), self.items, strict=True)])
        )

    def psnr_input(self):
        return float(np.mean([psnr(b, s) for _, b, s in self.items]))


def make_adapters(body, head, seed, gd_batch, epochs):
    gd = dict(lr=GD_LR, epochs=epochs, batch_size=gd_batch, random_state=seed)
    return {
        "LVA (alpha=0)": LayerVariationalAdapter(body, head, alpha=0.0),
        "LVA-CV": LayerVariationalAdapterCV(body, head, alphas=ALPHAS, cv=5),
        "GD": GradientDescentAdapter(body, head, **gd),
        "GD-tuned": GradientDescentAdapter(body, head, validation_fraction=0.2, **gd),
    }


def _memory_probe(directory):
    """Run in a fresh process: peak RSS growth of one LVA fit (feature cache off)."""
    data = np.load(Path(directory) / "data.npz")
    X, y = data["X"], data["y"]
    net = residual_srcnn()
    net.load_state_dict(torch.load(Path(directory) / "net.pt"))
    net.eval()
    t0 = time.perf_counter()
    grown, _ = peak_rss_growth_mib(
        lambda: LayerVariationalAdapter(net[:-1], net[-1], alpha=0.0, cache=False).fit(X, y)
    )
    print(json.dumps(dict(grown_mib=grown, seconds=time.perf_counter() - t0)))


def measure_memory(net, X, y, threads):
    with tempfile.TemporaryDirectory() as directory:
        np.savez(Path(directory) / "data.npz", X=X, y=y)
        torch.save(net.state_dict(), Path(directory) / "net.pt")
        return run_fresh(__file__, "--threads", threads, "--_memory-probe", directory)


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and BLAS threads (default 1: on a shared machine a second thread slowed GD's "
        "tiny steps 20-fold and an 800 x 800 eigh 50-fold)",
    )
    cli.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    args = cli.parse_args(argv)
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # BLAS too (numpy/scipy's eigh); oversubscription is costly here
    if args.memory_probe:
        return _memory_probe(args.memory_probe)
    t_start = time.perf_counter()
    quick = args.quick
    sizes = [100, 200] if quick else [64, 256, 1024, 4096]
    seeds = range(1 if quick else 3)
    epochs = 2 if quick else GD_EPOCHS

    images = {k: [load_y(name) for name in v] for k, v in IMAGES.items()}
    if quick:  # centre crops of the test images: the point is to run, not to measure
        images["target_test"] = [
            y[(y.shape[0] - 128) // 2 :][:128, (y.shape[1] - 128) // 2 :][:, :128]
            for y in images["target_test"]
        ]
    source = [(blur(y, SOURCE_SCALE), y) for y in images["source"]]
    target_train = [(blur(y, TARGET_SCALE), y) for y in images["target_train"]]
    target_test = [(blur(y, TARGET_SCALE), y) for y in images["target_test"]]

    t0 = time.perf_counter()
    steps, batch, crop = (20, 8, 33) if quick else (300, 16, 64)
    net, cached = pretrain_srcnn(
        source, steps=steps, batch=batch, crop=crop, name=None if quick else "exp3_srcnn"
    )
    how = "loaded from benchmarks/.cache/" if cached else f"{time.perf_counter() - t0:.1f} s"
    print(
        f"SRCNN pretrained at scale {SOURCE_SCALE} on {len(source)} source images "
        f"({steps} Adam steps, batch {batch} of {crop} x {crop} crops, lr 1e-3 decayed to 0; {how})"
    )
    body, head = net[:-1], net[-1]
    W0 = head.weight.detach().double().numpy()

    test = TestSet(body, target_test)
    source_test = TestSet(body, [(blur(y, SOURCE_SCALE), y) for y in images["target_test"]])
    psnr_in, psnr_pre = test.psnr_input(), test.psnr(W0)
    print(
        f"held-out images at scale {SOURCE_SCALE}: blurred {source_test.psnr_input():.2f} dB, "
        f"pretrained {source_test.psnr(W0):.2f} dB; at scale {TARGET_SCALE}: blurred "
        f"{psnr_in:.2f} dB, pretrained {psnr_pre:.2f} dB"
    )

    try:
        import skorch  # noqa: F401

        has_skorch = True
    except ImportError:
        has_skorch = False
        print("skorch is not installed (pip install skorch): its column is skipped")
    methods = [m for m in METHODS if has_skorch or m != "skorch"]

    rows, weights = [], {}
    pool = {seed: patches(target_train, max(sizes), np.random.default_rng(100 + seed)) for seed in seeds}
    for n in sizes:
        # the paper's batch 1 up to N = 256; above, N // 32 (1600 Adam steps in 50 epochs) for CPU time
        gd_batch = 16 if quick else (1 if n <= 256 else n // 32)
        for seed in seeds:
            X, y = pool[seed][0][:n], pool[seed][1][:n]
            blank = dict(fit_s=None, alpha=None, batch_size=None, epochs=None, best_epoch=None)
            rows.append(dict(n=n, seed=seed, method="blurred input", test_psnr_db=psnr_in, **blank))
            rows.append(dict(n=n, seed=seed, method="pretrained", test_psnr_db=psnr_pre, **blank))
            adapters = make_adapters(body, head, seed, gd_batch, epochs)
            for name in methods:
                if name == "skorch":
                    fit = partial(fit_skorch, body, head, X, y, lr=GD_LR, epochs=epochs, batch_size=gd_batch,
                                  shuffle=True, seed=seed)  # fmt: skip
                else:
                    fit = partial(adapters[name].fit, X, y)
                # every method pays for its own forward pass: the feature cache is emptied first
                seconds, fitted = median_time(fit, 1, warmup=0, setup=clear_cache)
                coef = (
                    fitted[0].module_.weight.detach().double().numpy() if name == "skorch" else fitted.coef_
                )
                row = dict(n=n, seed=seed, method=name, test_psnr_db=test.psnr(coef), **blank)
                row["fit_s"] = seconds
                if name == "LVA-CV":
                    row["alpha"] = adapters[name].alpha_
                elif name != "LVA (alpha=0)":
                    row.update(batch_size=gd_batch, epochs=epochs)
                    if name == "GD-tuned":
                        row["best_epoch"] = adapters[name].best_epoch_
                weights[(n, seed, name)] = coef
                rows.append(row)
            print(
                f"N={n:5d} seed {seed}: "
                + ", ".join(f"{r['method']} {r['test_psnr_db']:.2f} dB" for r in rows[-len(methods) :]),
                flush=True,
            )

    n_mem = max(sizes)
    X, y = pool[0][0][:n_mem], pool[0][1][:n_mem]
    mem = measure_memory(net, X, y, args.threads)
    rows_all = n_mem * (PATCH - 2 * CROP) ** 2
    unfolded = rows_all * 800 * 8 / 2**30
    paper = n_mem * PATCH**2 * 800 * 4 / 2**30  # 'same' padding, float32: the authors' setting

    name = "exp3_deblur" + ("_quick" if quick else "")
    path = write_csv(name, rows)
    table = summarise(rows, "test_psnr_db")
    cols = ["blurred input", "pretrained", *methods]
    print(
        f"\nPSNR (dB) on {len(target_test)} held-out images at scale {TARGET_SCALE} against the sharp "
        f"image, mean ± std over {len(seeds)} seeds"
    )
    print(f"{'N':>5} " + " ".join(f"{c:>15}" for c in cols))
    for n in sizes:
        cells = [f"{table[(n, c)]['mean']:>8.2f} ± {table[(n, c)]['std']:4.2f}" for c in cols]
        print(f"{n:5d} " + " ".join(cells))
    print(
        f"\nfit wall time (s, median over seeds, {args.threads} torch thread(s), own forward pass "
        "included) and GD / LVA"
    )
    print(f"{'N':>5} " + " ".join(f"{m:>14}" for m in methods) + f" {'GD/LVA':>8}")
    for n in sizes:
        ratio = table[(n, "GD")]["fit_s"] / table[(n, "LVA (alpha=0)")]["fit_s"]
        print(f"{n:5d} " + " ".join(f"{table[(n, m)]['fit_s']:14.2f}" for m in methods) + f" {ratio:8.2f}")
    alphas = {
        n: sorted({f"alpha={r['alpha']:g}" for r in rows if r["n"] == n and r["method"] == "LVA-CV"})
        for n in sizes
    }
    epochs_kept = {
        n: [str(r["best_epoch"]) for r in rows if r["n"] == n and r["method"] == "GD-tuned"] for n in sizes
    }
    print(f"LVA-CV chose {alphas}; GD-tuned kept epochs {epochs_kept}")
    print(
        f"\nLVA fit at N = {n_mem} ({rows_all} patch rows x 800): peak RSS growth "
        f"{mem['grown_mib']:.0f} MiB (fresh process, feature cache off, fit {mem['seconds']:.1f} s); "
        f"all unfolded patches would take {unfolded:.2f} GiB in float64 "
        f"(the authors' 'same'-padded 33 x 33 outputs in float32: {paper:.1f} GiB)"
    )

    fig = plt.figure(figsize=(11, 6.5))
    grid = fig.add_gridspec(2, 5, height_ratios=[1.4, 1])
    ax = fig.add_subplot(grid[0, :])
    for m in methods:
        mean, std = ([table[(n, m)][k] for n in sizes] for k in ("mean", "std"))
        ax.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, label=m)
    ax.axhline(psnr_pre, color="k", linestyle="--", label="pretrained (scale 3)")
    ax.axhline(psnr_in, color="grey", linestyle=":", label="blurred input")
    # zoom on the methods that keep within a few dB of the input; say where the others are
    top = max(v["mean"] + v["std"] for v in table.values())
    bottom = psnr_in - 2.0
    ax.set_ylim(bottom, top + 0.25)
    off = [
        f"{m} {table[(n, m)]['mean']:.1f} dB at N={n}"
        for m in methods
        for n in sizes
        if table[(n, m)]["mean"] < bottom
    ]
    if off:
        ax.text(0.01, 0.02, "below the axis: " + "; ".join(off), transform=ax.transAxes, fontsize=7)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel(f"target patches N ({PATCH} x {PATCH}, scale {TARGET_SCALE})")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title(f"SRCNN pretrained at scale {SOURCE_SCALE}, last conv layer adapted to scale {TARGET_SCALE}")
    ax.legend(fontsize=7, ncol=2, loc="best")
    n_show = max(sizes)
    crops = [
        ("sharp", test.items[0][2]),
        ("blurred", test.items[0][1]),
        ("pretrained", test.outputs(W0)[0]),
        (f"LVA-CV, N={n_show}", test.outputs(weights[(n_show, 0, "LVA-CV")])[0]),
        (f"GD, N={n_show}", test.outputs(weights[(n_show, 0, "GD")])[0]),
    ]
    h, w = crops[0][1].shape
    half = min(48, h // 2, w // 2)
    box = (slice(h // 2 - half, h // 2 + half), slice(w // 2 - half, w // 2 + half))
    for i, (title, img) in enumerate(crops):
        a = fig.add_subplot(grid[1, i])
        a.imshow(np.clip(img[box], 0, 1), cmap="gray", vmin=0, vmax=1)
        a.set_title(title, fontsize=8)
        a.axis("off")
    save_figure(fig, name, path)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    return table, mem


if __name__ == "__main__":
    main()
