"""Experiment 2 of the paper without the DNS corpus: speech enhancement, last layer adapted to new noises.

Tseng et al. (ICLR 2023) pretrain a DDAE speech enhancer on DNS-Challenge speech in one set of
noises and adapt its last layer to unseen noises. The DNS corpus is not available offline, so
here the clean speech is synthesised by espeak-ng (Debian package ``espeak-ng``): 60 English
sentences written for this script, read by 8 voices (English accents and variants, and the
German and French voices reading the same English text), at 3 speaking rates, resampled from
22050 Hz to 16 kHz. Utterances are generated once and cached in benchmarks/.cache/.

- Source domain: white, pink and brown noise at -5, 0, 5 and 10 dB SNR.
- Target domain, unlike them: sirens (frequency-swept harmonic tones), bells (struck, decaying
  partials) and babble (sums of 4 to 7 other utterances whose sentences are held out of the
  clean set), at -1 and 1 dB SNR. All noise is generated with numpy, seeded.
- Features: log1p |STFT| (hann window, n_fft 512 = 257 bins, hop 256). The model maps a noisy
  log-magnitude frame (with ``--context`` neighbouring frames on each side, default 0 as in the
  paper) to the clean log-magnitude frame: DDAE 257 -> 4 x 512 (LeakyReLU) -> 257, bias-free last
  layer, pretrained on the source domain with Adam (lr 1e-3, minibatches of 256 frames; weights
  cached in benchmarks/.cache/, so a rerun skips pretraining).
- Adaptation of the last layer only (body = net[:-1], head = net[-1]) with N target utterances,
  N in 10, 30, 100 (3 seeds: which utterances and which noise realisations), drawn from a pool of
  120 training utterances; every estimator is fitted with its feature cache off, so each fit
  time includes its own forward pass:
  LVA (alpha = 0, the paper's formula); LVA-CV (alpha in logspace(-3, 4, 20) by 5-fold
  GroupKFold by utterance, scored by the spectral MSE); GD (Adam lr 1e-3, minibatches of 256
  frames, 30 epochs); GD-tuned (the same, up to 60 epochs, keeping the epoch with the lowest loss
  on a random 20 % of the training frames: validation_fraction=0.2; never test data).
- Metrics on 24 held-out test utterances (sentences and babble talkers unseen in adaptation):
  spectral MSE of the log magnitudes, STOI (pystoi) and wideband PESQ (pesq) of waveforms
  rebuilt from the noisy phase and the enhanced magnitude (expm1); a metric whose package is
  missing is reported as not measured.

One thread by default (``--threads``): on a machine shared with other jobs, two BLAS threads
per process oversubscribe the cores and their spin-waits made a 512 x 512 eigendecomposition 60
times slower (7.7 s against 0.12 s) and a DDAE training step 20 times slower than one thread.

    python benchmarks/exp2_speech.py            # about 8 min of CPU from scratch, 7 with the cache
    python benchmarks/exp2_speech.py --quick    # a few utterances, 2 seeds, short pretraining (~1 min)

(CPU time of the one thread; on a machine shared with other jobs the wall time is longer.)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from math import gcd
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import CACHE, cached_weights, median_time, parser, save_figure, summarise, write_csv
from sklearn.model_selection import GroupKFold
from threadpoolctl import threadpool_limits
from torch import nn

from skl_transfer import GradientDescentAdapter, LayerVariationalAdapter, LayerVariationalAdapterCV

FS = 16000
N_FFT, HOP = 512, 256
SPEECH_RMS = 0.05

# espeak-ng voices; "de" and "fr" read the English sentences with their own phonology (accented).
VOICES = ["en-us", "en", "en+f3", "en+m3", "en-gb-scotland", "en-us+f2", "de", "fr"]
RATES = [150, 170, 190]  # words per minute, cycled over (sentence, voice)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A large size in stockings is hard to sell.",
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "Four hours of steady work faced us.",
    "The train to Boston leaves at seven fifteen tomorrow morning.",
    "Do you know whether the museum is open on Mondays?",
    "My grandmother planted forty tulips along the garden fence.",
    "Turn left at the second traffic light and keep going straight.",
    "Nobody expected the orchestra to play so loudly at the end.",
    "How many kilometres is it from here to the nearest village?",
    "The weather report promised sunshine, but it rained all afternoon.",
    "Seventeen students submitted their essays before the deadline.",
    "Would you like some tea, or would you prefer a glass of water?",
    "The old lighthouse keeper wrote letters to his daughter every week.",
    "Our flight was delayed because of heavy fog over the airport.",
    "She painted the kitchen walls a pale shade of yellow.",
    "The committee will announce its decision next Thursday.",
    "Heavy trucks rumbled across the narrow wooden bridge.",
    "I can never remember where I left my reading glasses.",
    "The scientist measured the temperature every thirty minutes.",
    "A flock of geese flew south over the quiet harbour.",
    "Please speak a little more slowly, the line is very bad.",
    "The baker sold out of fresh bread before nine o'clock.",
    "Can you believe the price of apples has doubled this year?",
    "The children built a snowman with a carrot for a nose.",
    "His brother repairs bicycles in a small shop downtown.",
    "We watched the fireworks from the roof of the library.",
    "The recipe calls for two eggs, a cup of flour and some butter.",
    "After the storm, the river rose almost to the top of the bank.",
    "The mechanic said the engine needs a new water pump.",
    "Every morning the neighbours walk their dogs in the park.",
    "The painting was sold at auction for an enormous sum.",
    "Why did the meeting start twenty minutes late again?",
    "The farmer drove his tractor slowly down the muddy lane.",
    "Thank you for your patience while we fix the problem.",
    "The choir practised the same song for three hours.",
    "A cold wind blew through the empty streets of the town.",
    "The nurse checked the patient's pulse and blood pressure.",
    "Lightning struck the tall oak tree behind the school.",
    "Remember to switch off the lights when you leave the room.",
    "The fisherman mended his nets on the sunny pier.",
    "Our teacher read us a story about a clever little mouse.",
    "The museum displays ancient coins and colourful pottery.",
    "Is there a pharmacy near the central railway station?",
    "The soup tasted much better the second day.",
    "The engineer explained how the bridge carries its load.",
    "Mountain climbers must carry enough water and warm clothes.",
    "The package arrived three days earlier than expected.",
    "Two hundred people gathered in the square to hear the band.",
    "She whispered the answer so that nobody else could hear.",
    "The gardener trimmed the hedges into perfect green cubes.",
    "Which of these roads leads to the castle on the hill?",
    "The last bus home leaves the station just after midnight.",
]

CONFIGS = {
    # default: 8 voices x 60 sentences. Sentences 52..59 are babble only, 44..51 test only.
    "default": dict(
        n_voices=8, n_sentences=60, n_babble_sentences=8, n_test_sentences=8, n_test=24,
        n_pool=120, n_source=200, sizes=(10, 30, 100), seeds=3, width=512,
        pretrain_epochs=12, gd_epochs=30, gd_tuned_lr=1e-3, gd_tuned_epochs=60,
    ),
    "quick": dict(
        n_voices=3, n_sentences=18, n_babble_sentences=3, n_test_sentences=3, n_test=6,
        n_pool=12, n_source=24, sizes=(3, 10), seeds=2, width=512,
        pretrain_epochs=8, gd_epochs=10, gd_tuned_lr=1e-3, gd_tuned_epochs=20,
    ),
}  # fmt: skip

SOURCE_NOISES, SOURCE_SNRS = ("white", "pink", "brown"), (-5.0, 0.0, 5.0, 10.0)
TARGET_NOISES, TARGET_SNRS = ("siren", "bells", "babble"), (-1.0, 1.0)
METHODS = ("noisy", "pretrained", "LVA", "LVA-CV", "GD", "GD-tuned")
ALPHAS = np.logspace(-3, 4, 20)


# ----------------------------------------------------------------------------- clean speech
def _key(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def speak(text, voice, rate, workdir):
    """One utterance from espeak-ng at 22050 Hz, resampled to 16 kHz, float64, unit-free."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    path = Path(workdir) / "u.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(path), "-v", voice, "-s", str(rate), text],
        check=True,
        capture_output=True,
    )
    sr, x = wavfile.read(path)
    x = x.astype(np.float64) / 32768.0
    g = gcd(FS, sr)
    x = resample_poly(x, FS // g, sr // g)
    nz = np.flatnonzero(np.abs(x) > 1e-3)  # trim espeak's leading/trailing silence
    x = x[max(nz[0] - 800, 0) : nz[-1] + 800]
    return x * (SPEECH_RMS / np.sqrt(np.mean(x**2)))


def clean_corpus(voices, sentences):
    """{(sentence index, voice index): waveform}, generated once and cached as one .npz."""
    spec = dict(voices=voices, sentences=sentences, rates=RATES, fs=FS, rms=SPEECH_RMS, v=1)
    path = CACHE / f"exp2_speech_clean_{_key(spec)}.npz"
    pairs = [(s, v) for s in range(len(sentences)) for v in range(len(voices))]
    if path.exists():
        with np.load(path) as data:  # read each array once: indexing an NpzFile re-reads it
            audio, lengths = data["audio"], data["lengths"]
        ends = np.cumsum(lengths)
        return {p: audio[e - n : e] for p, n, e in zip(pairs, lengths, ends, strict=True)}
    if shutil.which("espeak-ng") is None:
        sys.exit(
            "exp2_speech needs espeak-ng to synthesise its clean speech; install the Debian package "
            "'espeak-ng' (sudo apt-get install espeak-ng) and run again."
        )
    t0 = time.perf_counter()
    corpus = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s, v in pairs:
            rate = RATES[(s + v) % len(RATES)]
            corpus[(s, v)] = speak(sentences[s], voices[v], rate, tmp)
    lengths = np.array([len(corpus[p]) for p in pairs])
    CACHE.mkdir(exist_ok=True)
    np.savez(path, audio=np.concatenate([corpus[p] for p in pairs]).astype(np.float32), lengths=lengths)
    print(
        f"synthesised {len(pairs)} utterances with espeak-ng ({time.perf_counter() - t0:.1f} s, "
        f"{lengths.sum() / FS / 60:.1f} min of speech), cached in {path}"
    )
    return {p: corpus[p].astype(np.float32) for p in pairs}


# ----------------------------------------------------------------------------- noises
def colored(rng, n, exponent):
    """Gaussian noise with power spectrum 1/f**exponent (0 white, 1 pink, 2 brown), above 20 Hz."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / FS), 20.0)
    return np.fft.irfft(spec * f ** (-exponent / 2), n)


def siren(rng, n):
    """A siren: a harmonic tone swept up and down (wail: sinusoidal sweep; yelp: sawtooth chirps)."""
    t = np.arange(n) / FS
    f_lo = rng.uniform(450, 900)
    f_hi = f_lo * rng.uniform(1.4, 2.2)
    rate = rng.uniform(0.15, 0.6) if rng.random() < 0.5 else rng.uniform(2.0, 5.0)
    if rng.random() < 0.5:
        sweep = 0.5 * (1 - np.cos(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    else:
        sweep = (rate * t + rng.random()) % 1.0
    phase = 2 * np.pi * np.cumsum(f_lo + (f_hi - f_lo) * sweep) / FS
    return np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase) + 0.1 * np.sin(4 * phase)


def bells(rng, n):
    """Struck bells and chimes: exponentially decaying partials, a new strike every 0.2 to 0.9 s."""
    x = np.zeros(n)
    start = int(rng.uniform(0, 0.3) * FS)
    ratios = np.array([1.0, 2.0, 2.4, 3.0, 4.2, 5.4])  # harmonic plus bell-like partials
    while start < n:
        f0, tau = rng.uniform(300, 1400), rng.uniform(0.25, 1.2)
        m = min(n - start, int(4 * tau * FS))
        t = np.arange(m) / FS
        for k, r in enumerate(ratios):
            f = f0 * r * (1 + rng.uniform(-0.01, 0.01))
            if f < FS / 2:
                amp = rng.uniform(0.4, 1.0) / (k + 1)
                x[start : start + m] += (
                    amp
                    * np.exp(-t * (k + 1) ** 0.5 / tau)
                    * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
                )
        start += int(rng.uniform(0.2, 0.9) * FS)
    return x


def babble(rng, n, talkers):
    """4 to 7 other utterances, each looped from a random offset, summed."""
    x = np.zeros(n)
    for i in rng.choice(len(talkers), size=min(len(talkers), rng.integers(4, 8)), replace=False):
        u = np.roll(talkers[i], rng.integers(len(talkers[i])))
        x += np.resize(u, n) * rng.uniform(0.6, 1.0)
    return x


def noise(kind, rng, n, talkers):
    if kind in ("white", "pink", "brown"):
        return colored(rng, n, {"white": 0, "pink": 1, "brown": 2}[kind])
    if kind == "siren":
        return siren(rng, n)
    if kind == "bells":
        return bells(rng, n)
    return babble(rng, n, talkers)


def mix(clean, kind, snr, rng, talkers):
    v = noise(kind, rng, len(clean), talkers)
    v *= np.sqrt(np.mean(clean**2) / (np.mean(v**2) * 10 ** (snr / 10)))
    return (clean + v).astype(np.float32)


# ----------------------------------------------------------------------------- features
WINDOW = torch.hann_window(N_FFT)


def stft(x):
    """Complex STFT, shape (frames, 257)."""
    return torch.stft(torch.as_tensor(x), N_FFT, HOP, window=WINDOW, return_complex=True).T


def logmag(x):
    return torch.log1p(stft(x).abs()).numpy()


def with_context(L, context):
    """Stack each frame with `context` neighbours on each side (edges repeated): (T, 257 (2c + 1))."""
    if context == 0:
        return L
    P = np.pad(L, ((context, context), (0, 0)), mode="edge")
    return np.concatenate([P[i : i + len(L)] for i in range(2 * context + 1)], axis=1)


def resynthesise(noisy, L_hat):
    """Waveform from the enhanced log magnitude and the noisy phase."""
    S = stft(noisy)
    mag = torch.expm1(torch.as_tensor(L_hat, dtype=torch.float32).clamp_min(0))
    spec = torch.polar(mag, torch.angle(S))
    return torch.istft(spec.T, N_FFT, HOP, window=WINDOW, length=len(noisy)).numpy()


def frames(pairs, context):
    """(noisy input frames, clean target frames, utterance index of each frame)."""
    X, Y, g = [], [], []
    for i, (clean, noisy) in enumerate(pairs):
        L = logmag(noisy)
        X.append(with_context(L, context))
        Y.append(logmag(clean))
        g.append(np.full(len(L), i))
    return np.concatenate(X), np.concatenate(Y), np.concatenate(g)


# ----------------------------------------------------------------------------- model
def ddae(n_in, width, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(4):
        layers += [nn.Linear(n_in if i == 0 else width, width), nn.LeakyReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 257, bias=False))


def pretrain_ddae(X, Y, *, width, epochs, batch_size=256, name=None):
    """Minibatch Adam (lr 1e-3) on the MSE; weights cached under benchmarks/.cache/<name>.pt."""

    def train(net):
        Xt, Yt = torch.as_tensor(X), torch.as_tensor(Y)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        net.train()
        for epoch in range(epochs):
            total = 0.0
            for idx in torch.randperm(len(Xt), generator=gen).split(batch_size):
                opt.zero_grad()
                loss = nn.functional.mse_loss(net(Xt[idx]), Yt[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            print(f"  pretraining epoch {epoch + 1}/{epochs}: source MSE {total / len(Xt):.4f}", flush=True)

    net, loaded = cached_weights(ddae(X.shape[1], width), name, train)
    return net.eval(), loaded


# ----------------------------------------------------------------------------- metrics
def metric_functions():
    """{name: f(clean, enhanced) or None when its package is missing}."""
    out = {"stoi": None, "pesq": None}
    try:
        from pystoi import stoi

        out["stoi"] = lambda c, e: float(stoi(c, e, FS, extended=False))
    except ImportError:
        pass
    try:
        from pesq import pesq

        def _pesq(c, e):
            try:
                return float(pesq(FS, c, e, "wb"))
            except Exception:  # pesq raises on utterances it finds silent
                return np.nan

        out["pesq"] = _pesq
    except ImportError:
        pass
    return out


def evaluate(L_hat, test, metrics, resynthesis=True):
    """Spectral MSE over all test frames, and mean STOI / PESQ over test utterances.

    Without resynthesis (the noisy baseline) STOI and PESQ are those of the noisy waveform.
    """
    X_test, Y_test, g_test, pairs = test
    row = {"test_spectral_mse": float(np.mean((L_hat - Y_test) ** 2))}
    for name, fn in metrics.items():
        if fn is None:  # not measured: its package is missing
            row[f"test_{name}"] = None
            continue
        scores = []
        for i, (clean, noisy) in enumerate(pairs):
            enhanced = resynthesise(noisy, L_hat[g_test == i]) if resynthesis else noisy
            scores.append(fn(clean.astype(np.float64), enhanced.astype(np.float64)))
        row[f"test_{name}"] = float(np.nanmean(scores))
    return row


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--context", type=int, default=0, help="context frames on each side (default 0)")
    cli.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads (default 1: see the docstring)"
    )
    args = cli.parse_args(argv)
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        return run(args)


def run(args):
    cfg = CONFIGS["quick" if args.quick else "default"]
    t_start = time.perf_counter()

    voices, sentences = VOICES[: cfg["n_voices"]], SENTENCES[: cfg["n_sentences"]]
    corpus = clean_corpus(voices, sentences)
    n_s, n_v = len(sentences), len(voices)
    n_train_s = n_s - cfg["n_babble_sentences"] - cfg["n_test_sentences"]
    babble_s = range(n_s - cfg["n_babble_sentences"], n_s)
    test_s = range(n_train_s, n_train_s + cfg["n_test_sentences"])
    print(
        f"clean speech: espeak-ng, {n_s} sentences x {n_v} voices ({', '.join(voices)}), "
        f"rates {RATES} wpm, 16 kHz; babble from sentences {babble_s.start}..{babble_s.stop - 1} only, "
        f"test sentences {test_s.start}..{test_s.stop - 1} only"
    )

    # babble talkers: held out of the clean set; the test babble uses other talkers than training
    babble_pairs = [(s, v) for s in babble_s for v in range(n_v)]
    half = len(babble_pairs) // 2
    talkers_train = [corpus[p] for p in babble_pairs[:half]]
    talkers_test = [corpus[p] for p in babble_pairs[half:]]

    rng = np.random.default_rng(0)
    train_pairs = [(s, v) for s in range(n_train_s) for v in range(n_v)]
    order = rng.permutation(len(train_pairs))
    pool = [train_pairs[i] for i in order[: cfg["n_pool"]]]
    source = [train_pairs[i] for i in order[cfg["n_pool"] : cfg["n_pool"] + cfg["n_source"]]]
    test_candidates = [(s, v) for s in test_s for v in range(n_v)]
    test_ids = [test_candidates[i] for i in rng.permutation(len(test_candidates))[: cfg["n_test"]]]

    def mixed(ids, conditions, seed, talkers):
        """(clean, noisy) pairs, utterance i in conditions[i % len(conditions)]."""
        rng = np.random.default_rng(seed)
        return [
            (corpus[p], mix(corpus[p], *conditions[i % len(conditions)], rng, talkers))
            for i, p in enumerate(ids)
        ]

    # source domain: each utterance in one (noise, SNR) condition, cycling through all twelve
    src_pairs = mixed(source, [(k, snr) for k in SOURCE_NOISES for snr in SOURCE_SNRS], 1, None)
    X_src, Y_src, _ = frames(src_pairs, args.context)

    # target test set: fixed, every (noise, SNR) condition equally often
    test_pairs = mixed(test_ids, [(k, snr) for snr in TARGET_SNRS for k in TARGET_NOISES], 2, talkers_test)
    X_test, Y_test, g_test = frames(test_pairs, args.context)
    test = (X_test, Y_test, g_test, test_pairs)

    # pretraining
    name = None
    if not args.quick:
        name = "exp2_ddae_" + _key(
            dict(corpus=[voices, sentences, RATES], source=source, width=cfg["width"],
                 epochs=cfg["pretrain_epochs"], context=args.context, v=1)
        )  # fmt: skip
    t0 = time.perf_counter()
    net, cached = pretrain_ddae(X_src, Y_src, width=cfg["width"], epochs=cfg["pretrain_epochs"], name=name)
    with torch.no_grad():
        src_mse = float(nn.functional.mse_loss(net(torch.as_tensor(X_src)), torch.as_tensor(Y_src)))
        L_pre = net(torch.as_tensor(X_test)).numpy()
    print(
        f"DDAE {X_src.shape[1]} -> 4 x {cfg['width']} (LeakyReLU) -> 257, bias-free last layer: "
        + ("loaded from the cache" if cached else f"pretrained, {cfg['pretrain_epochs']} epochs")
        + f" ({time.perf_counter() - t0:.1f} s) on {len(source)} source utterances "
        f"({len(X_src)} frames; white/pink/brown at {list(SOURCE_SNRS)} dB); source MSE {src_mse:.4f}"
    )
    body, head = net[:-1], net[-1]

    metrics = metric_functions()
    missing = [m for m, f in metrics.items() if f is None]
    if missing:
        print(f"not measured (package missing): {', '.join(missing)} (pip install pystoi pesq)")
    baseline = {
        "noisy": evaluate(
            X_test[:, args.context * 257 : (args.context + 1) * 257], test, metrics, resynthesis=False
        ),
        "pretrained": evaluate(L_pre, test, metrics),
    }
    print(
        f"target test set: {len(test_pairs)} utterances ({len(X_test)} frames), "
        f"siren/bells/babble at {list(TARGET_SNRS)} dB"
    )

    rows = []
    for m in ("noisy", "pretrained"):
        rows.append(dict(n=0, seed=None, method=m, n_frames=0, **baseline[m], fit_s=None, alpha=None,
                         best_epoch=None))  # fmt: skip

    pool_ids = np.arange(len(pool))
    for n in cfg["sizes"]:
        for seed in range(cfg["seeds"]):
            rs = np.random.default_rng(100 + seed)
            chosen = rs.choice(pool_ids, size=n, replace=False)
            pairs = []
            for i in chosen:
                kind = TARGET_NOISES[rs.integers(len(TARGET_NOISES))]
                snr = TARGET_SNRS[rs.integers(len(TARGET_SNRS))]
                clean = corpus[pool[i]]
                pairs.append((clean, mix(clean, kind, snr, rs, talkers_train)))
            X, Y, groups = frames(pairs, args.context)
            estimators = {
                "LVA": (LayerVariationalAdapter(body, head, alpha=0.0, cache=False), {}),
                "LVA-CV": (
                    LayerVariationalAdapterCV(
                        body, head, alphas=ALPHAS, cv=GroupKFold(n_splits=min(5, n)),
                        scoring="neg_mean_squared_error", cache=False,
                    ),
                    {"groups": groups},
                ),
                "GD": (
                    GradientDescentAdapter(body, head, lr=1e-3, epochs=cfg["gd_epochs"], batch_size=256,
                                           random_state=seed, cache=False),
                    {},
                ),
                "GD-tuned": (
                    GradientDescentAdapter(body, head, lr=cfg["gd_tuned_lr"], epochs=cfg["gd_tuned_epochs"],
                                           batch_size=256, validation_fraction=0.2, random_state=seed,
                                           cache=False),
                    {},
                ),
            }  # fmt: skip
            for m, (est, kw) in estimators.items():
                seconds, _ = median_time(partial(est.fit, X, Y, **kw), 1, warmup=0)
                row = evaluate(est.predict(X_test), test, metrics)
                rows.append(
                    dict(n=n, seed=seed, method=m, n_frames=len(X), **row, fit_s=seconds,
                         alpha=getattr(est, "alpha_", getattr(est, "alpha", None)),
                         best_epoch=getattr(est, "best_epoch_", None))
                )  # fmt: skip
            print(
                f"  N = {n} utterances ({len(X)} frames), seed {seed}: "
                + ", ".join(
                    f"{r['method']} {r['test_spectral_mse']:.4f} ({r['fit_s']:.2f} s)" for r in rows[-4:]
                )
                + f"; CV alpha {rows[-3]['alpha']:.3g}, GD-tuned epoch {rows[-1]['best_epoch']}",
                flush=True,
            )

    out = "exp2_speech" + ("_quick" if args.quick else "")
    path = write_csv(out, rows)
    summary = {k: summarise(rows, k) for k in ("test_spectral_mse", "test_stoi", "test_pesq", "fit_s")}
    report(summary, cfg, metrics)
    plot(summary, cfg, out, path)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    return summary


def report(summary, cfg, metrics):
    """Print the table of ``summary``: ``{column: {(n, method): statistics over seeds}}``."""
    print(
        f"\ntarget-domain test metrics, mean ± std over {cfg['seeds']} seeds (spectral MSE of log1p|STFT|: "
        "lower is better; STOI, PESQ-WB: higher is better); fit time: median, feature cache off"
    )
    head = (
        f"{'N utts':>6} {'method':<11} {'spectral MSE':>17} {'STOI':>15} {'PESQ-WB':>15} "
        f"{'fit time':>10} {'/ LVA':>7}"
    )
    print(head)
    print("-" * len(head))

    def cells(key, spread=True):
        """The three metrics' cells of row ``key``: mean (± std), or n/a where not measured."""
        out = []
        for k, fmt, width in (
            ("test_spectral_mse", ".4f", 17),
            ("test_stoi", ".3f", 15),
            ("test_pesq", ".3f", 15),
        ):
            s = summary[k][key]
            text = f"{s['mean']:{fmt}}" + (f" ± {s['std']:{fmt}}" if spread else "")
            out.append(f"{'n/a' if np.isnan(s['mean']) else text:>{width}}")
        return " ".join(out)

    for m in ("noisy", "pretrained"):
        print(f"{'-':>6} {m:<11} {cells((0, m), spread=False)}")
    for n in cfg["sizes"]:
        lva = summary["fit_s"][(n, "LVA")]["median"]
        for m in METHODS[2:]:
            t = summary["fit_s"][(n, m)]["median"]
            print(f"{n:>6} {m:<11} {cells((n, m))} {t:>9.2f}s {t / lva:>7.1f}")
    missing = [k for k, f in metrics.items() if f is None]
    if missing:
        print(f"not measured: {', '.join(missing)} (package not installed)")


def plot(summary, cfg, name, csv_path):
    sizes = list(cfg["sizes"])
    panels = [("test_spectral_mse", "spectral MSE (log1p|STFT|)"), ("test_stoi", "STOI"),
              ("test_pesq", "PESQ (wideband)"), ("fit_s", "fit time (s)")]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    colors = dict(zip(METHODS, ["0.5", "k", "C0", "C1", "C2", "C3"], strict=True))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for m in METHODS:
            if m in ("noisy", "pretrained"):
                if key != "fit_s" and not np.isnan(summary[key][(0, m)]["mean"]):
                    ax.axhline(summary[key][(0, m)]["mean"], color=colors[m], ls="--", label=m)
                continue
            mean = [summary[key][(n, m)]["mean"] for n in sizes]
            std = [summary[key][(n, m)]["std"] for n in sizes]
            ax.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, color=colors[m], label=m)
        ax.set_xscale("log")
        if key in ("fit_s", "test_spectral_mse"):
            ax.set_yscale("log")
        ax.set_xlabel("target training utterances N")
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Experiment 2 (espeak-ng speech): DDAE last layer adapted to siren / bells / babble noise")
    save_figure(fig, name, csv_path)


if __name__ == "__main__":
    main()
