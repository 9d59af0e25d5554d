"""Experiment 3 (deblurring with SRCNN, benchmarks/exp3_deblur.py) end to end in its quick mode."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_exp3_quick_runs_and_lva_fits_in_memory(monkeypatch, capsys):
    pytest.importorskip("skimage")  # a benchmark extra, not a test dependency
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("_common", None)
    import exp3_deblur

    table, mem = exp3_deblur.main(["--quick"])
    out = capsys.readouterr().out
    assert "PSNR (dB)" in out and "peak RSS growth" in out
    # the held-out PSNR is finite for every method, and the LVA fit's patches are never all held
    assert all(abs(mean) < 100 for mean, _, _ in table.values())
    assert mem["grown_mib"] < 1024
