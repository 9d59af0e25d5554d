"""Helpers shared by the benchmark scripts: data builders, networks, pretraining cache, timing, output.

Benchmarks import only the public API of skl_transfer; what they share lives here, once.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"  # gitignored: pretrained weights


def timeseries_setup(seed=937):
    """Experiment 1 of the paper (Tseng et al., ICLR 2023): data and the untrained network.

    Returns ``t, x, t_new, x_new, net``: source (t, x) and target (t~, x~), float32 arrays of
    shape (2000, 1), with t = arange(-1, 1, 0.001) + 0.0005, x = sin(5 pi t),
    t~ = t + 0.05 N(1.5, 0.8) and x~ = r x + 0.03 U(-1, 1), r = arange(1, 1.8, 0.0004); and
    the 1 -> 64 (no bias, ReLU) -> 64 (bias, ReLU) -> 1 (no bias) network. As in the authors'
    scripts, one generator seeded with 937 draws the data and then the initial weights.
    The global torch random state is left as it was.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        t = torch.arange(-1, 1, 0.001).reshape(-1, 1) + 0.0005
        x = torch.sin(5 * torch.pi * t)
        n = t.shape[0]
        dt = 0.05 * torch.normal(1.5, 0.8, size=(n, 1))
        dx = 0.03 * (2 * torch.rand(size=(n, 1)) - 1)
        r = torch.arange(1, 1.8, 0.0004).reshape(-1, 1)
        net = nn.Sequential(
            nn.Linear(1, 64, bias=False),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 1, bias=False),
        )
    return t.numpy(), x.numpy(), (t + dt).numpy(), (r * x + dx).numpy(), net


def pretrain(net, X, y, *, epochs, lr=1e-3, loss=nn.functional.mse_loss, name=None):
    """Full-batch Adam on ``loss`` (MSE by default); weights cached under benchmarks/.cache/<name>.pt."""
    path = None if name is None else CACHE / f"{name}.pt"
    if path is not None and path.exists():
        net.load_state_dict(torch.load(path))
        return net, True
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss(net(X), y).backward()
        opt.step()
    if path is not None:
        CACHE.mkdir(exist_ok=True)
        torch.save(net.state_dict(), path)
    return net, False


def predict_torch(net, X):
    with torch.no_grad():
        return net.eval()(torch.as_tensor(X)).numpy()


def sse(y_true, y_pred):
    return float(np.sum((np.reshape(y_true, -1) - np.reshape(y_pred, -1)) ** 2))


def median_time(fn, repeats=5, warmup=1):
    """Median wall time of fn() over repeats, after warm-up calls; returns (seconds, last result)."""
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def write_csv(name, rows):
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_figure(fig, name, csv_path):
    """Write ``fig`` to benchmarks/results/<name>.png and say where both outputs went."""
    fig.tight_layout()
    png = RESULTS / f"{name}.png"
    fig.savefig(png, dpi=120)
    print(f"wrote {csv_path} and {png}")


def srcnn_paper(seed=0):
    """Body and head of the SRCNN of the authors' code ('same' padding: a 33 x 33 patch gives
    33 x 33 outputs; random weights and BatchNorm statistics, eval mode)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 32, 9, padding=4)]
    for _ in range(3):
        layers += [nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.BatchNorm2d(32)]
    body = nn.Sequential(*layers)
    for m in body:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(32, generator=g))
            m.running_var.copy_(0.5 + torch.rand(32, generator=g))
    head = nn.Conv2d(32, 1, 5, padding=2, bias=False)
    return body.eval().requires_grad_(False), head.eval().requires_grad_(False)


def _status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def peak_rss_growth_mib(fn):
    """``(peak RSS growth in MiB while fn() runs, fn())``, from this process's own high-water mark.

    The mark (VmHWM) is reset to the current RSS just before ``fn`` (Linux ``clear_refs``), so
    nothing the process held before counts. ``getrusage``'s ``ru_maxrss`` is no substitute: a
    process started by fork + exec inherits its parent's, so a small child of a large parent
    would report no growth at all.
    """
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_mib("VmRSS")
    out = fn()
    return _status_mib("VmHWM") - before, out


def run_fresh(script, *args):
    """Run ``python script *args`` in a fresh process; its last stdout line, parsed as JSON.

    Memory probes run this way, so that nothing the calling process holds counts.
    """
    cmd = [sys.executable, str(Path(script).resolve()), *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
