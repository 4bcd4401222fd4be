"""Peak memory of the server and of one client, for the largest configurations.

Method: ``suite.driver.memory_round`` runs the round with the server, one probe client and
all other clients in three separate ``spawn``ed processes (messages as bytes through pipes,
the loop of ``secagg.simulate.run_round``). Each process imports everything and loads the
Numba kernels, resets its high-water mark (``/proc/self/clear_refs``), notes its resident
set as the baseline, builds its role and runs the round; the peak is the kernel's
high-water mark at the end: ``VmHWM`` from ``/proc/self/status``, the counter behind
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, read directly because ``ru_maxrss`` of a
``spawn``ed (fork + exec) process also holds the parent's size at the fork, which the reset
does not clear. "Role" = peak - baseline: what the server or the client itself needed (its
input, state, messages, SEAL's pools). Not tracemalloc: it misses native allocations.
"""

from __future__ import annotations

from typing import Any

import pytest

from suite import common
from suite.common import variant_id

PROF = common.profile()
MEM_VARIANTS = (("masked", "auto"), ("hybrid", "auto"), ("ckks", "none"))


@pytest.mark.benchmark(group="memory")
@pytest.mark.parametrize(("mode", "graph"), MEM_VARIANTS,
                         ids=[variant_id(m, g) for m, g in MEM_VARIANTS])  # fmt: skip
@pytest.mark.parametrize("size", PROF.memory, ids=lambda s: f"{s[0]}x{s[1]}")
def test_peak_memory(benchmark: Any, request: pytest.FixtureRequest, size: tuple[int, int],
                     mode: str, graph: str) -> None:  # fmt: skip
    from secagg.simulate import SimulationConfig
    from suite.driver import memory_round

    clients, dim = size
    cfg = SimulationConfig(
        clients=clients,
        dim=dim,
        mode=mode,
        neighbors="auto",
        dropout=PROF.round_dropout,
        drop_stage=PROF.drop_stage,
    )
    out: dict[str, Any] = benchmark.pedantic(memory_round, args=(cfg,), rounds=1, iterations=1)
    common.record(
        "memory",
        f"{variant_id(mode, graph)}/{clients}x{dim}",
        request.node.nodeid,
        mode=mode,
        graph=common.GRAPH_LABEL[graph],
        clients=clients,
        dim=dim,
        dropout=cfg.dropout,
        method="VmHWM (getrusage's high-water mark) per role process, reset after imports",
        **out,
    )
    benchmark.extra_info.update(
        server_peak_MiB=out["server_peak_MiB"], client_peak_MiB=out["client_peak_MiB"]
    )
    assert out["status"] == "completed" and out["probe_completed"], out.get("abort")
