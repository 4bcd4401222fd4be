"""Unmasking with lying holders (issue 11, item 4): the server's reconstruction time.

Every holder's revealed shares are checked against their dealers' signed commitments as
they arrive; a liar is dropped once and its shares are never used, so the reconstruction
stays one Lagrange basis per holder set plus one dot product per secret, with or without
liars. This measures the server's unmasking stage (every ``UnmaskShares`` through
``SecAggServer.receive``, and the finish that reconstructs and unmasks) with 0, 1 and 10%
of the holders revealing a wrong share of every peer, after one dropout (so the dropped
client's mask key is reconstructed too).

Run the table::

    python benchmarks/bench_unmask_blame.py [--clients 500] [--dim 1000] [--neighbors auto] \
        [--liars 0,1,50]

(``--clients 12`` is a tiny run), or ``pytest benchmarks/bench_unmask_blame.py
--benchmark-only -s -o python_files='bench_*.py'`` (tiny and n = 500 cases).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import numpy as np
import pytest
from suite.common import smoke

from secagg import shamir
from secagg.client import SecAggClient
from secagg.errors import SecAggError
from secagg.keys import IdentityKey
from secagg.messages import Message, UnmaskShares
from secagg.params import make_params
from secagg.server import SecAggServer, StageTimeouts

Outgoing = list[tuple[int, Message]]


def _lie(msg: Message) -> Message:
    """The same message with every revealed share off by one."""
    assert isinstance(msg, UnmaskShares)

    def bump(pairs: tuple[tuple[int, bytes], ...]) -> tuple[tuple[int, bytes], ...]:
        return tuple(
            (o, shamir.encode_share((shamir.decode_share(s) + 1) % shamir.PRIME)) for o, s in pairs
        )

    return dataclasses.replace(
        msg, seed_shares=bump(msg.seed_shares), key_shares=bump(msg.key_shares)
    )


def unmask_time(clients: int, dim: int, liars: int, neighbors: str = "auto") -> dict[str, Any]:
    """Run one round in memory and time the server's unmasking stage.

    Returns
    -------
    dict
        ``unmask_seconds`` (server side, wall), the round's status, contributors, the
        blamed liars and the shares the server received.
    """
    params = make_params(clients, dim, neighbors=neighbors)
    ids = list(range(1, clients + 1))
    identities = {c: IdentityKey() for c in ids}
    directory = {c: k.public for c, k in identities.items()}
    rng = np.random.default_rng(clients)
    server = SecAggServer(params, directory, timeouts=StageTimeouts.uniform(1e9))
    cl = {c: SecAggClient(c, identities[c], params, directory, rng.normal(0, 1, dim)) for c in ids}
    dropped = ids[-1]
    now = 0.0

    def to_server(replies: dict[int, list[Message]], skip: set[int]) -> Outgoing:
        out: Outgoing = []
        for cid, msgs in replies.items():
            if cid in skip:
                continue
            for m in msgs:
                try:
                    out += server.receive(cid, m.encode(), now)
                except SecAggError:
                    out += server.tick(now)
        return out

    def to_clients(out: Outgoing, skip: set[int]) -> dict[int, list[Message]]:
        replies: dict[int, list[Message]] = {}
        for cid, m in out:
            if cid not in skip:
                replies.setdefault(cid, []).extend(cl[cid].receive(m.encode(), now))
        return replies

    out = to_server({c: x.start(now) for c, x in cl.items()}, set())
    out = to_server(to_clients(out, set()), set())  # NonceReveal -> NonceReveals
    out = to_server(to_clients(out, set()), set())  # ShareKeys -> deliveries
    out = to_server(to_clients(out, set()), {dropped})  # masked inputs; one drops
    if not out:
        now = 2e9
        out = server.tick(now)
    out = to_server(to_clients(out, {dropped}), set())  # consistency signatures
    replies = to_clients(out, {dropped})  # UnmaskShares
    lying = sorted(replies)[:liars]
    for cid in lying:
        replies[cid] = [_lie(replies[cid][0])]
    n_shares = sum(
        len(m.seed_shares) + len(m.key_shares)
        for ms in replies.values()
        for m in ms
        if isinstance(m, UnmaskShares)
    )
    t0 = time.perf_counter()
    to_server(replies, set())
    seconds = time.perf_counter() - t0
    blamed = [c for c in lying if not server.records[c].active]
    return {
        "clients": clients,
        "neighbors": params.degree,
        "threshold": params.threshold,
        "liars": liars,
        "blamed": len(blamed),
        "shares": n_shares,
        "status": "completed" if server.result is not None else str(server.error),
        "unmask_seconds": round(seconds, 4),
    }


CASES = {
    "tiny-0": (12, 100, 0),
    "tiny-1": (12, 100, 1),
    "n500-0": (500, 1000, 0),
    "n500-1": (500, 1000, 1),
    "n500-10pct": (500, 1000, 50),
}


RUN = [c for c in CASES if c.startswith("tiny")] if smoke() else list(CASES)
"""The smoke run (``make bench-smoke``) takes the tiny cases only: n = 500 is ~14 minutes."""


@pytest.mark.parametrize("case", RUN)
def test_unmask_with_liars(benchmark: Any, case: str, machine: str) -> None:
    n, dim, liars = CASES[case]
    report: dict[str, Any] = benchmark.pedantic(
        unmask_time, args=(n, dim, liars), rounds=1, iterations=1
    )
    benchmark.extra_info.update(machine=machine, **report)
    print(f"\n{case}: {json.dumps(report)}")
    assert report["status"] == "completed" and report["blamed"] == liars


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--neighbors", default="auto")
    ap.add_argument("--liars", help="comma-separated liar counts (default: 0, 1, 10%%)")
    args = ap.parse_args()
    default = (0, 1, max(1, args.clients // 10))
    counts = [int(x) for x in args.liars.split(",")] if args.liars else default
    for liars in counts:
        print(json.dumps(unmask_time(args.clients, args.dim, liars, args.neighbors)), flush=True)


if __name__ == "__main__":
    main()
