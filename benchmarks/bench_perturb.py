"""J_f(x) dx for method="perturb": forward-mode autodiff against the paper's finite differences.

The first-order residue of ``LayerVariationalAdapter(method="perturb")`` needs, for each pair
of a source patch x and a target patch x~ = x + dx, the product J_f(x) dx of the network's
Jacobian with the shift. Network: the SRCNN of the paper's deblurring experiment (Tseng et al.):
conv 1 -> 32 (9 x 9), three conv 32 -> 32 (5 x 5) each followed by ReLU and BatchNorm, and the
head conv 32 -> 1 (5 x 5, no bias), 'same' padding as in the authors' code (a 33 x 33 patch
gives a 33 x 33 output: n = 1089 input pixels per patch), random weights, eval mode, float32.
Pairs: 33 x 33 patches of scikit-image's ``camera`` (Y / 255), bicubic-blurred at scale 3
(source x) and at scale 6 (target x~), as in the paper's experiment.

Timed, for N patches (medians of --repeats runs, one run at N = 256; the jvp after a warm-up;
in one process):

* ``jvp``: the library's path, written out with torch's public API as ``fit(..., X_source=...)``
  computes it: one ``torch.func.jvp`` of the body per batch of 256 patches (under no_grad,
  along dx = x~ - x formed in the inputs' dtype), then the head on the tangent in float64. The
  public ``fit`` also runs the target forward pass, accumulates the 800 x 800 patch moments
  and solves, the same work whichever way J_f(x) dx is computed, so only the product is timed.
* ``finite differences``: the authors' approach, forward differences with h = 1e-3,
  ``J_f(x) dx ~ sum_j (f(x + h e_j) - f(x)) / h * dx_j``, in a Python loop over the n input
  pixels, one forward pass of the N patches per pixel (N * n patch evaluations). The full loop
  takes hours on 2 cores, so only --pixels pixels are run (timed, with f(x) once) and the time
  is extrapolated linearly to all 1089: every pixel costs one identical forward pass.

Agreement: on the timed pixels, the jvp along dx restricted to those pixels equals the finite
differences' partial sum; their relative difference ||jvp - fd|| / ||fd|| is checked against
5e-2 in float32 (forward differences with h = 1e-3 carry a rounding error ~ eps32 / h: the
difference is the finite differences' error, not the jvp's: at the smallest N both float32
products are also compared with the float64 finite differences) and, at the smallest N,
against 1e-6 with the network in float64 (h = 1e-7).
Not timed: data, network, the agreement runs.

    python benchmarks/bench_perturb.py            # N in 16, 64, 256; under 5 minutes on 2 cores
    python benchmarks/bench_perturb.py --quick    # N in 4, 16, writes *_quick.csv/.png
"""

from __future__ import annotations

import copy
import warnings

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import skimage.data
import torch
from _common import blur, median_time, parser, save_figure, srcnn_paper, write_csv
from torch import nn
from torch.nn import functional as F

PATCH, H_FD, BATCH = 33, 1e-3, 256
TOL32, TOL64 = 5e-2, 1e-6


def pairs(n, seed=0):
    """n random 33 x 33 positions of camera: (source x at scale 3, target x~ at scale 6, sharp)."""
    img = skimage.data.camera().astype(np.float64) / 255.0
    b3, b6 = blur(img, 3), blur(img, 6)
    rng = np.random.default_rng(seed)
    r = rng.integers(0, img.shape[0] - PATCH, n)
    c = rng.integers(0, img.shape[1] - PATCH, n)

    def cut(a):
        return np.stack([a[i : i + PATCH, j : j + PATCH] for i, j in zip(r, c, strict=True)])[:, None]

    return cut(b3).astype(np.float32), cut(b6).astype(np.float32), cut(img).astype(np.float32)


def jvp_library(body, head, X_src, X_tgt, dtype=torch.float32):
    """J_f(x) dx by the library's forward-mode path: (N, 1089) float64."""
    W0 = head.weight.detach().double()
    out = []
    for start in range(0, len(X_src), BATCH):
        xs = torch.as_tensor(X_src[start : start + BATCH])
        dx = torch.as_tensor(X_tgt[start : start + BATCH]) - xs
        with torch.no_grad(), warnings.catch_warnings():
            # torch's first jvp imports its decompositions through the deprecated torch.jit.script
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
            _, dF = torch.func.jvp(body, (xs.to(dtype),), (dx.to(dtype),))
        tangent = F.conv2d(dF.double(), W0, padding=head.padding)
        out.append(tangent.flatten(1))
    return torch.cat(out).numpy()


def jvp_finite_differences(net, X_src, X_tgt, pixels, h=H_FD):
    """The authors' forward differences over the given input pixels: (N, 1089) partial sums."""
    x = torch.as_tensor(X_src)
    dx = (torch.as_tensor(X_tgt) - x).flatten(1)
    flat = x.flatten(1)
    with torch.no_grad():
        f0 = net(x).flatten(1)
        total = torch.zeros_like(f0)
        for j in pixels:
            xp = flat.clone()
            xp[:, j] += h
            total += (net(xp.reshape(x.shape)).flatten(1) - f0) / h * dx[:, j : j + 1]
    return total.double().numpy()


def rel_diff(a, b):
    """||a - b|| / ||b|| over all patches and output pixels."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--pixels", type=int, default=8, help="pixels of the finite-difference loop timed")
    args = cli.parse_args(argv)
    sizes = [4, 16] if args.quick else [16, 64, 256]
    n_pixels = PATCH * PATCH
    pixels = np.linspace(0, n_pixels - 1, args.pixels + 2).astype(int)[1:-1]  # spread over the patch
    mask = np.zeros(n_pixels, np.float32)
    mask[pixels] = 1.0

    body, head = srcnn_paper()
    net = nn.Sequential(body, head)
    print(
        f"SRCNN, {n_pixels} input pixels per patch, float32, {torch.get_num_threads()} torch threads; "
        f"finite differences timed on {len(pixels)} pixels and extrapolated to {n_pixels}"
    )
    rows = []
    for n in sizes:
        X_src, X_tgt, _ = pairs(n)
        repeats = args.repeats if n <= 64 else 1
        t_jvp, _ = median_time(
            lambda X_src=X_src, X_tgt=X_tgt: jvp_library(body, head, X_src, X_tgt), repeats
        )
        t_sub, fd = median_time(
            lambda X_src=X_src, X_tgt=X_tgt: jvp_finite_differences(net, X_src, X_tgt, pixels),
            repeats,
            warmup=0,
        )
        t_fd = t_sub * n_pixels / len(pixels)  # f(x), run once, is within t_sub: a slight over-estimate

        # agreement on the timed pixels: the jvp along dx restricted to them
        X_masked = X_src + (X_tgt - X_src) * mask.reshape(1, 1, PATCH, PATCH)
        jvp32 = jvp_library(body, head, X_src, X_masked)
        agree32 = rel_diff(jvp32, fd)
        assert agree32 < TOL32, f"jvp and finite differences differ by {agree32:.2e} (float32)"
        row = {
            "n": n,
            "pixels_timed": len(pixels),
            "fd_timed_s": round(t_sub, 3),
            "fd_extrapolated_s": round(t_fd, 1),
            "jvp_s": round(t_jvp, 3),
            "fd_over_jvp": round(t_fd / t_jvp, 1),
            "float32_rel_diff": f"{agree32:.1e}",
            "float64_rel_diff": None,  # at the smallest N only
            "jvp32_fd64_rel_diff": None,
            "fd32_fd64_rel_diff": None,
        }
        if n == sizes[0]:
            body64, head64 = copy.deepcopy(body).double(), copy.deepcopy(head).double()
            X_src64, X_masked64 = X_src.astype(np.float64), X_masked.astype(np.float64)
            fd64 = jvp_finite_differences(nn.Sequential(body64, head64), X_src64, X_masked64, pixels, h=1e-7)
            agree64 = rel_diff(jvp_library(body64, head64, X_src64, X_masked64, torch.float64), fd64)
            assert agree64 < TOL64, f"jvp and finite differences differ by {agree64:.2e} (float64)"
            row["float64_rel_diff"] = f"{agree64:.1e}"
            # which float32 product is off: each against the float64 reference
            row["jvp32_fd64_rel_diff"] = f"{rel_diff(jvp32, fd64):.1e}"
            row["fd32_fd64_rel_diff"] = f"{rel_diff(fd, fd64):.1e}"
            print(
                f"float32 products against the float64 finite differences: jvp {row['jvp32_fd64_rel_diff']}, "
                f"finite differences (h = {H_FD:g}) {row['fd32_fd64_rel_diff']}"
            )
        rows.append(row)
        print(
            f"N={n:4d}  jvp {t_jvp:7.3f} s   finite differences {t_fd:8.1f} s "
            f"({t_sub:.2f} s for {len(pixels)} pixels)   ratio {t_fd / t_jvp:6.1f}   "
            f"rel diff {agree32:.1e} (float32)"
            + (f", {row['float64_rel_diff']} (float64)" if row["float64_rel_diff"] else "")
        )

    name = "bench_perturb_quick" if args.quick else "bench_perturb"
    csv_path = write_csv(name, rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in rows]
    ax.loglog(ns, [r["fd_extrapolated_s"] for r in rows], "o--", label="finite differences (extrapolated)")
    ax.loglog(ns, [r["jvp_s"] for r in rows], "o-", label="forward-mode jvp (library)")
    for r in rows:
        ax.annotate(
            f"x{r['fd_over_jvp']:.0f}", (r["n"], r["jvp_s"]), textcoords="offset points", xytext=(4, 6)
        )
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("patches N (33 x 33)")
    ax.set_ylabel("seconds")
    ax.set_title("J_f(x) dx on the SRCNN, 2 CPU cores")
    ax.legend()
    save_figure(fig, name, csv_path)


if __name__ == "__main__":
    main()
