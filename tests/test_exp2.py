"""Experiment 2 (speech enhancement on espeak-ng speech), run end to end in its quick mode."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_exp2_quick_runs_and_regularised_lva_helps(monkeypatch, capsys):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng)")
    try:
        from scipy.io import wavfile  # noqa: F401
        from scipy.signal import resample_poly  # noqa: F401
    except ImportError:
        pytest.skip("scipy's wav reading or resampling is unavailable")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("_common", None)
    import exp2_speech

    summary = exp2_speech.main(["--quick"])
    out = capsys.readouterr().out
    assert "spectral MSE" in out and "GD-tuned" in out
    n = exp2_speech.CONFIGS["quick"]["sizes"][-1]
    mse = {
        m: summary[(m, 0 if m in ("noisy", "pretrained") else n)]["spectral_mse"][0]
        for m in exp2_speech.METHODS
    }
    assert all(np.isfinite(v) for v in mse.values())
    # the target noises are new to the network: adapting its last layer (alpha by grouped CV)
    # lowers the held-out spectral error below the pretrained network's, and GD does too
    assert mse["LVA-CV"] < 0.9 * mse["pretrained"]
    assert mse["GD-tuned"] < mse["pretrained"]
    assert (BENCHMARKS / "results" / "exp2_speech_quick.csv").exists()
