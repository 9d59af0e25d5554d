"""Experiment 1 (the paper's time series), run end to end in its quick mode.

The paper's claim, in direction only: at the paper's GD budget (Adam, lr 1e-3, 12000 full-batch
epochs on the last layer), the closed-form update reaches a target error no worse than gradient
descent's, at a small fraction of its fit time.
"""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_exp1_quick_lva_beats_gd_at_the_papers_budget(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("_common", None)
    import exp1_timeseries

    out = exp1_timeseries.main(["--quick"])
    printed = capsys.readouterr().out
    assert "the paper's setting" in printed and "GD/LVA" in printed
    assert (BENCHMARKS / "results" / "exp1_timeseries_quick.csv").exists()
    assert (BENCHMARKS / "results" / "exp1_timeseries_quick.png").exists()

    held, paper = out["heldout"], out["paper"]
    n_all = max(out["sizes"])
    assert held[(n_all, "GD")]["count"] == held[(n_all, "LVA")]["count"] >= 2
    # all the training half, scored on the held-out half: LVA's error <= GD's (mean over seeds)
    assert held[(n_all, "LVA")]["mean"] <= held[(n_all, "GD")]["mean"]
    # the paper's setting (adapt and score on all 2000 target points)
    assert paper["LVA"]["mean"] <= paper["GD"]["mean"]
    # and at a fraction of the time: LVA fit < GD fit / 20
    assert held[(n_all, "LVA")]["time"] < held[(n_all, "GD")]["time"] / 20
    assert paper["LVA"]["time"] < paper["GD"]["time"] / 20
