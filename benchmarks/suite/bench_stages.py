"""Rounds broken down by stage: server seconds, client median seconds and bytes per stage.

``suite.driver.staged_round`` runs the loop of ``secagg.simulate.run_round`` on bytes and
charges each call to the stage of the message it handles (a client's work on receiving the
roster is its share-keys stage; the server's reconstruction runs inside the unmask stage).
"""

from __future__ import annotations

from typing import Any

import pytest

from suite import common
from suite.common import VARIANTS, variant_id

PROF = common.profile()


@pytest.mark.parametrize(("mode", "graph"), VARIANTS, ids=[variant_id(m, g) for m, g in VARIANTS])
def test_stages(benchmark: Any, request: pytest.FixtureRequest, mode: str, graph: str) -> None:
    from secagg.simulate import SimulationConfig
    from suite.driver import staged_round

    clients, dim = PROF.stage
    cfg = SimulationConfig(
        clients=clients,
        dim=dim,
        mode=mode,
        neighbors="auto" if graph == "none" else graph,
        dropout=PROF.round_dropout,
        drop_stage=PROF.drop_stage,
    )
    benchmark.group = f"stage: {clients} clients x {dim} params"
    out: dict[str, Any] = benchmark.pedantic(staged_round, args=(cfg,), rounds=1, iterations=1)
    common.record(
        "stages",
        f"{variant_id(mode, graph)}/{clients}x{dim}",
        request.node.nodeid,
        mode=mode,
        graph=common.GRAPH_LABEL[graph],
        clients=clients,
        dim=dim,
        dropout=cfg.dropout,
        **out,
    )
    benchmark.extra_info.update(status=out["status"], stages=out["stages"])
    assert out["status"] == "completed" and out["exact"], out.get("abort")
