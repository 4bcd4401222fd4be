"""The in-memory DP round that ``secagg simulate`` reports (secagg.dp.simulation).

Seeds here are fresh from ``secrets`` (as in production), so the statistical checks are not
deterministic: each is set at 3.89 standard errors (false-alarm rate about 1e-4), the decode
check at 15% relative on ``d' = 4096`` coordinates (over 10 standard errors).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

from secagg.dp.calibration import calibrate
from secagg.dp.encoding import clip_l2
from secagg.dp.simulation import run_dp_aggregate
from secagg.errors import ConfigurationError, ServerMisbehaviour


def test_report_fields_and_measured_std() -> None:
    n, dim = 10, 3000
    cal = calibrate(8.0, 1e-5, 1, n_clients=n, min_survivors=7, dim=dim, clip=1.0)
    rng = np.random.default_rng(3)  # test data only
    xs = [rng.normal(size=dim) * 0.02 for _ in range(n)]
    res = run_dp_aggregate(cal, xs, list(range(8)))
    rep = res.report
    json.dumps(rep)
    for key in ("mechanism", "epsilon", "delta", "target_std", "measured_std", "clip", "bits"):
        assert key in rep
    d = cal.padded_dim
    assert abs(float(rep["measured_std"]) / float(rep["released_std"]) - 1) <= 3.89 * math.sqrt(
        0.5 / d
    )
    assert float(rep["honest_std"]) >= float(rep["target_std"])
    want = sum(clip_l2(xs[i], 1.0) for i in range(8))
    err = float(np.sqrt(np.mean((res.aggregate - want) ** 2)))
    assert abs(err / float(rep["measured_std"]) - 1) < 0.15


def test_refuses_wrong_counts() -> None:
    cal = calibrate(8.0, 1e-5, 1, n_clients=10, min_survivors=7, dim=100, clip=1.0)
    with pytest.raises(ConfigurationError):
        run_dp_aggregate(cal, [np.zeros(100)] * 9, list(range(9)))
    with pytest.raises(ServerMisbehaviour):
        run_dp_aggregate(cal, [np.zeros(100)] * 10, list(range(6)))


def test_simulate_reports_dp_block() -> None:
    """``secagg simulate --dp-epsilon``: the report gains ``dp`` for the round's contributors."""
    from secagg.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(
        clients=10, dim=500, dropout=0.2, dp_epsilon=5.0, dp_rounds=3, dp_clip=1.0, seed=1
    )
    report = simulate(cfg)
    assert report["status"] == "completed"
    dp = report["dp"]
    assert dp["contributors"] == report["survivors"]
    assert dp["epsilon"] <= 5.0 and dp["rounds"] == 3 and dp["clip"] == 1.0
    assert dp["measured_std"] > 0 and dp["target_std"] > 0
    # From the masked round's own release: the plan's noise for the actual survivors
    # (d' = 512: the sample std has relative error ~3%; 30% is far outside it).
    assert dp["path"] == "masked-round"
    assert abs(dp["measured_std"] / dp["released_std"] - 1) < 0.3
    assert dp["released_std"] >= dp["target_std"]
    assert "dp" not in simulate(SimulationConfig(clients=5, dim=50, dropout=0.0))


def test_cli_simulate_dp_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from secagg.service.cli import main

    argv = ["simulate", "--clients", "8", "--dim", "300", "--dropout", "0.25", "--json"]
    dp_flags = ["--dp-epsilon", "4", "--dp-delta", "1e-6", "--rounds", "2", "--dp-clip", "0.5"]
    assert main([*argv, *dp_flags]) == 0
    dp = json.loads(capsys.readouterr().out)["dp"]
    assert dp["delta"] == 1e-6 and dp["rounds"] == 2 and dp["clip"] == 0.5
    assert dp["epsilon"] <= 4.0 and dp["path"] == "masked-round"
    # Not yet over gRPC: refused with the configuration exit code, not silently ignored.
    assert main([*argv, *dp_flags, "--transport", "grpc"]) != 0


def test_simulate_with_prepared_noise_reports_prepare_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--dp-prepare``: every client draws its noise before the round; with 20% dropout the
    server removes salt-keyed components, and the release still has the plan's noise."""
    from secagg.service.cli import main

    argv = ["simulate", "--clients", "10", "--dim", "500", "--dropout", "0.2", "--json"]
    dp_flags = ["--dp-epsilon", "5", "--rounds", "3", "--dp-clip", "1", "--dp-prepare"]
    assert main([*argv, *dp_flags]) == 0
    report = json.loads(capsys.readouterr().out)
    dp = report["dp"]
    assert report["status"] == "completed" and dp["prepared"] is True
    assert dp["prepare_seconds"] > 0
    assert abs(dp["measured_std"] / dp["released_std"] - 1) < 0.3  # as above: ~3% error
