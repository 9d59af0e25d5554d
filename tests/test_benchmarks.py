"""The README's demo, run end to end in its quick mode."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_demo_quick_runs_and_adaptation_helps(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("_common", None)
    import demo_timeseries

    rows = dict((name, (paper, held)) for name, paper, held in demo_timeseries.main(["--quick"]))
    out = capsys.readouterr().out
    assert "LVA fit time" in out
    # the paper's claim, in direction: the analytic update lowers the target error
    assert rows["LVA (alpha=0)"][0] < 0.7 * rows["pretrained"][0]
    assert rows["LVA (alpha=0)"][1] < 0.8 * rows["pretrained"][1]
