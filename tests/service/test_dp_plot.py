"""``python -m secagg.service.demo.dp_plot`` at toy size: it runs and writes its files.

The figures themselves (accuracy against epsilon) are in docs/dp.md with their command; here
only what holds at any size: the secure runs spent no more than their budget, the released
noise is the calibrated one, and the JSON and PNG are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("dp_accounting")

from secagg.service.demo import dp_plot


def test_toy_run_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--rounds", "2", "--epsilons", "2", "--seeds", "0"]
    assert dp_plot.main([*argv, "--workers", "1", "--no-progress"]) == 0
    doc = json.loads((tmp_path / "dp_accuracy.json").read_text())
    assert (tmp_path / "dp_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (row,) = doc["by_epsilon"]
    assert row["epsilon"] == 2.0
    assert row["secure_epsilon_spent_rdp"] <= 2.0
    assert row["central_epsilon_rdp"] <= 2.0
    for key in ("secure_dp_fedavg", "central_dp"):
        assert 0.0 <= row[key]["mean"] <= 1.0
    # 2 rounds x 530 parameters: the measured std of the released noise is within 10% of the
    # calibrated one (1,024 coordinates a round; 6 standard errors).
    assert row["secure_measured_std_sum"] == pytest.approx(row["secure_target_std_sum"], rel=0.1)
    assert doc["config"]["drop_schedule"]["rounds"] == [2]  # the demo's schedule
    assert doc["gap_at_epsilon_2_pp"] == pytest.approx(row["gap_pp"])
    out = capsys.readouterr().out
    assert "gap to central DP at epsilon 2" in out


def test_refuses_a_plan_threshold_below_the_masked_rounds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min-survivors must be in"):
        dp_plot.main(["--out", str(tmp_path), "--rounds", "1", "--min-survivors", "1"])
