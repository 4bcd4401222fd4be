"""Prometheus metrics of one server (own registry, so several servers can share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]

_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Counters and histograms the service updates; ``serve_http`` exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter(
            "secagg_rounds",
            "Rounds by outcome (created, completed, aborted)",
            ["status"],
            registry=r,
        )
        self.rounds_active = Gauge("secagg_rounds_active", "Rounds in progress", registry=r)
        self.stage_seconds = Histogram(
            "secagg_stage_seconds",
            "Wall time of each protocol stage",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.round_seconds = Histogram(
            "secagg_round_seconds", "Wall time of whole rounds", buckets=_STAGE_BUCKETS, registry=r
        )
        self.dropouts = Counter(
            "secagg_dropouts",
            "Clients dropped, by the stage they were dropped in",
            ["stage"],
            registry=r,
        )
        self.bytes = Counter(
            "secagg_bytes",
            "Protocol message bytes, by direction (in, out)",
            ["direction"],
            registry=r,
        )
        self.messages = Counter(
            "secagg_messages", "Protocol messages received, by result", ["result"], registry=r
        )
        self.rpcs = Counter("secagg_rpcs", "Finished RPCs", ["method", "code"], registry=r)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Expose ``/metrics`` on ``addr:port``; returns the HTTP server (``.shutdown()``)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
