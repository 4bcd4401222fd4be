"""An in-memory client/server pair, stepped one protocol stage at a time (like h11's)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from secagg import ckks
from secagg.client import SecAggClient, decrypt_lane_sums
from secagg.errors import SecAggError
from secagg.keys import IdentityKey
from secagg.messages import Message, NonceReveal
from secagg.params import make_params
from secagg.policy import ClientPolicy
from secagg.quantize import lane_values
from secagg.server import SecAggServer, StageTimeouts

Outgoing = list[tuple[int, Message]]

TEST_POLICY = ClientPolicy(dropout=0.0, corrupt=0.0)
"""A deliberately weaker client policy for tests about something other than parameter
choice (explicit small graphs): it assumes no corrupt client and no dropout when checking
``(n, k, t)``; ``2t > k + 1`` and ``min_contributors = 3`` still hold."""


class Harness:
    """N clients and a server; the test decides who answers at each stage.

    ``auto_reveal`` (default) folds the reveal_nonces stage into the delivery of the roster:
    :meth:`to_clients` then returns the ShareKeys replies, so a test that steps stage by
    stage sees advertise -> share -> masked -> ... as before the stage existed. Tests of the
    reveal stage itself pass ``auto_reveal=False``.
    """

    def __init__(
        self,
        n: int,
        dim: int = 16,
        *,
        weights: bool = False,
        mode: str = "masked",
        auto_reveal: bool = True,
        policy: ClientPolicy | None = None,
        **kw: Any,
    ) -> None:
        self.auto_reveal = auto_reveal
        self.params = make_params(n, dim, max_weight=1000 if weights else 1, mode=mode, **kw)
        self.he_secret: ckks.SecretContext | None = None
        he_server: ckks.ServerContext | None = None
        if mode != "masked":
            he = self.params.he
            secret = ckks.make_secret_context(he)
            self.he_secret = ckks.load_secret_context(secret, he)
            he_server = ckks.load_server_context(ckks.make_public_context(secret), he)
        rng = np.random.default_rng(n * 1000 + dim)
        self.ids = list(range(1, n + 1))
        self.identities = {c: IdentityKey() for c in self.ids}
        self.directory = {c: k.public for c, k in self.identities.items()}
        self.xs = {c: rng.normal(0, 1, dim) for c in self.ids}
        self.ws = {c: (int(rng.integers(1, 1000)) if weights else 1) for c in self.ids}
        self.rounding = {c: secrets.token_bytes(32) for c in self.ids}
        self.now = 0.0
        self.server = SecAggServer(
            self.params,
            self.directory,
            timeouts=StageTimeouts.uniform(10.0),
            now=0.0,
            he_context=he_server,
        )
        self.clients = {
            c: SecAggClient(
                c,
                self.identities[c],
                self.params,
                self.directory,
                self.xs[c],
                self.ws[c],
                rounding_key=self.rounding[c],
                he_context=None if self.he_secret is None else self.he_secret.key_holder(),
                policy=policy,
            )
            for c in self.ids
        }
        self.errors: list[SecAggError] = []

    def start(self) -> dict[int, list[Message]]:
        return {c: cl.start(self.now) for c, cl in self.clients.items()}

    def to_server(self, replies: dict[int, list[Message]], skip: Iterable[int] = ()) -> Outgoing:
        """Send the replies of every client not in ``skip``; collect server output."""
        skipped = set(skip)
        out: Outgoing = []
        for cid, msgs in replies.items():
            if cid in skipped:
                continue
            for m in msgs:
                try:
                    out += self.server.receive(cid, m.encode(), self.now)
                except SecAggError as exc:
                    self.errors.append(exc)
                    out += self.server.tick(self.now)
        return out

    def expire(self) -> Outgoing:
        """Jump the clock past the stage deadline."""
        deadline = self.server.deadline
        assert deadline is not None
        self.now = deadline
        return self.server.tick(self.now)

    def to_clients(
        self,
        out: Outgoing,
        skip: Iterable[int] = (),
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> dict[int, list[Message]]:
        skipped = set(skip)
        replies: dict[int, list[Message]] = {}
        for cid, m in out:
            if cid in skipped:
                continue
            if tamper is not None:
                m = tamper(cid, m)
            try:
                replies.setdefault(cid, []).extend(self.clients[cid].receive(m.encode(), self.now))
            except SecAggError as exc:
                self.errors.append(exc)
        if self.auto_reveal and any(
            isinstance(m, NonceReveal) for msgs in replies.values() for m in msgs
        ):
            return self.to_clients(self.stage(replies), skip=skipped, tamper=tamper)
        return replies

    def stage(self, replies: dict[int, list[Message]], silent: Iterable[int] = ()) -> Outgoing:
        """Deliver one stage's replies (minus ``silent`` clients), expiring if needed."""
        silent = set(silent)
        out = self.to_server(replies, skip=silent)
        if not out and not self.server.done:
            out = self.expire()
        return out

    def run(self, drops: dict[str, set[int]] | None = None) -> None:
        """Run every stage; ``drops`` maps stage name to the clients silent in it."""
        drops = drops or {}
        gone: set[int] = set()
        replies = self.start()
        # hybrid rounds go on: the key holders' verdict on the result, then any blame step
        for stage in ("advertise", "share", "masked", "consistency", "unmask", "verdict", "blame"):
            gone |= drops.get(stage, set())
            out = self.stage(replies, silent=gone)
            replies = self.to_clients(out, skip=gone)
            if self.server.done:
                break

    def expected_sums(self, contributors: Iterable[int]) -> np.ndarray[Any, Any]:
        spec = self.params.quant
        total = np.zeros(spec.values(self.params.dim), dtype=np.uint64)
        for c in contributors:
            total += lane_values(self.xs[c], self.ws[c], spec, self.rounding[c])
        return total

    def result_sums(self) -> np.ndarray[Any, Any]:
        """The aggregate as the server has it, decrypted by a key holder in HE modes."""
        res = self.server.result
        assert res is not None, self.server.error
        if res.sums is not None:
            return res.sums
        assert res.ciphertexts is not None and self.he_secret is not None
        return decrypt_lane_sums(self.he_secret, self.params, res.ciphertexts)
