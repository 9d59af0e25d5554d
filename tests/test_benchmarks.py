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


def test_digits_quick_adapts_a_classifier_to_inverted_digits(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("_common", None)
    import digits_shift

    summary = digits_shift.main(["--quick"])
    assert "accuracy mean" in capsys.readouterr().out
    accuracy = {method: acc for (n, method), (acc, _, _) in summary.items() if n == 200}
    pretrained = accuracy["pretrained"]
    assert pretrained < 0.3  # inverted digits defeat the clean-digit network
    assert accuracy["LVA squared, onehot (alpha=1)"] > pretrained + 0.5
    assert accuracy["LVA log (alpha=0.1)"] > pretrained + 0.5
    gd = accuracy["GD (Adam lr 1e-2, 300 epochs)"]
    assert accuracy["LVA squared, onehot (alpha=1)"] >= gd - 0.02  # the paper's claim, in direction


def test_device_checks_of_the_throughput_script_run_on_cpu(monkeypatch, capsys):
    """The GPU check (issue 7) is one prepared script: its small CPU run must work end to end,
    and the fit must equal a float64 fit on the same features, searched alpha included."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("_common", None)
    import throughput

    (row,) = throughput.main(["--device", "cpu", "--quick"])
    assert "fit throughput" in capsys.readouterr().out
    assert row["coef_diff"] < 1e-8 and row["cv_coef_diff"] < 1e-8
    assert row["cv_alpha"] == row["cv_alpha_cpu"]
