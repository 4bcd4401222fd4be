"""Scaling curves: one round per point, every mode, full graph and SecAgg+ graph.

Against clients (dim fixed), parameters (clients fixed) and dropout. Each point is one
``secagg.simulate.simulate`` round (the code path of ``secagg simulate --json``): all
clients and the server in one process with a fake clock, every message through its byte
encoding. ``seconds.wall`` runs every client one after another, so it grows with the
number of clients even where a deployment's clients would work in parallel; a round's
critical path is about ``client_median + server``.

Dropped clients (10% unless the dropout axis says otherwise) stop before sending their
masked input, the costliest case for the server (it reconstructs their mask keys and
removes their pairwise masks).
"""

from __future__ import annotations

from typing import Any

import pytest

from suite import common
from suite.common import VARIANTS, variant_id

PROF = common.profile()


def _run(benchmark: Any, request: pytest.FixtureRequest, suite: str, key: str, cfg: Any,
         **labels: Any) -> dict[str, Any]:  # fmt: skip
    from secagg.simulate import simulate

    report: dict[str, Any] = benchmark.pedantic(simulate, args=(cfg,), rounds=1, iterations=1)
    row = common.record(
        suite,
        key,
        request.node.nodeid,
        mode=cfg.mode,
        graph=common.GRAPH_LABEL[labels.pop("graph")],
        clients=cfg.clients,
        dim=cfg.dim,
        dropout=cfg.dropout,
        drop_stage=cfg.drop_stage,
        bits=cfg.bits,
        neighbors=report["neighbors"],
        threshold=report["threshold"],
        status=report["status"],
        exact=report["exact"],
        survivors=report["survivors"],
        wall_s=report["seconds"]["wall"],
        server_s=report["seconds"]["server"],
        client_median_s=report["seconds"]["client_median"],
        upload_B=report["bytes"]["upload_per_client"],
        download_B=report["bytes"]["download_per_client"],
        raw_f32_B=report["bytes"]["raw_float32_per_client"],
        ciphertexts=report.get("he", {}).get("ciphertexts_per_client"),
        abort=report.get("abort"),
        **labels,
    )
    benchmark.extra_info.update({k: row[k] for k in ("status", "server_s", "upload_B")})
    assert report["status"] == "completed", report.get("abort")
    assert report["exact"], "aggregate differs from the sum of the quantized inputs"
    return row


def _cfg(mode: str, graph: str, clients: int, dim: int, dropout: float) -> Any:
    from secagg.simulate import SimulationConfig

    return SimulationConfig(
        clients=clients,
        dim=dim,
        mode=mode,
        neighbors="auto" if graph == "none" else graph,
        dropout=dropout,
        drop_stage=PROF.drop_stage,
        seed=0,
    )


VAR_IDS = [variant_id(m, g) for m, g in VARIANTS]


@pytest.mark.benchmark(group="round: clients")
@pytest.mark.parametrize("clients", PROF.clients)
@pytest.mark.parametrize(("mode", "graph"), VARIANTS, ids=VAR_IDS)
def test_clients(benchmark: Any, request: pytest.FixtureRequest, mode: str, graph: str,
                 clients: int) -> None:  # fmt: skip
    cfg = _cfg(mode, graph, clients, PROF.clients_dim, PROF.round_dropout)
    _run(benchmark, request, "clients", f"{variant_id(mode, graph)}/{clients}", cfg, graph=graph)


@pytest.mark.benchmark(group="round: parameters")
@pytest.mark.parametrize("dim", PROF.dims)
@pytest.mark.parametrize(("mode", "graph"), VARIANTS, ids=VAR_IDS)
def test_params(benchmark: Any, request: pytest.FixtureRequest, mode: str, graph: str,
                dim: int) -> None:  # fmt: skip
    cfg = _cfg(mode, graph, PROF.dims_clients, dim, PROF.round_dropout)
    _run(benchmark, request, "params", f"{variant_id(mode, graph)}/{dim}", cfg, graph=graph)


@pytest.mark.benchmark(group="round: dropout")
@pytest.mark.parametrize("dropout", PROF.dropouts)
@pytest.mark.parametrize(("mode", "graph"), VARIANTS, ids=VAR_IDS)
def test_dropout(benchmark: Any, request: pytest.FixtureRequest, mode: str, graph: str,
                 dropout: float) -> None:  # fmt: skip
    cfg = _cfg(mode, graph, PROF.dropout_clients, PROF.dropout_dim, dropout)
    _run(benchmark, request, "dropout", f"{variant_id(mode, graph)}/{dropout}", cfg, graph=graph)
