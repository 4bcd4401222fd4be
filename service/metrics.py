"""Prometheus metrics of one server (own registry, so several servers can share a process).

Counters export ``*_total`` only: the ``*_created`` timestamp series that prometheus_client
adds by default read like counts on a dashboard, so they are turned off.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)")
_SSL_ERROR = re.compile(r"(SSL_ERROR_[A-Z_]+)")

__all__ = ["Metrics"]

_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Counters and histograms the service updates; ``serve_http`` exposes them."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
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
        self.tls_failures = Counter(
            "secagg_tls_handshake_failures",
            "TLS handshakes the server refused or lost, by OpenSSL reason",
            ["reason"],
            registry=r,
        )

    def count_tls_line(self, line: str) -> None:
        """Count one failed handshake if ``line`` (a gRPC core log line) reports one."""
        if "Handshake failed" in line or "handshake failed" in line:
            m = _SSL_REASON.search(line) or _SSL_ERROR.search(line)
            reason = m.group(1) if m else "unknown"
            self.tls_failures.labels(reason).inc()

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Expose ``/metrics`` on ``addr:port``; returns the HTTP server (``.shutdown()``)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
