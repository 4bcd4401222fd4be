"""The client SDK: join a round over gRPC and run the protocol core to get the aggregate.

>>> with Client("server:443", identity, tls=ClientTls(ca="ca.pem")) as client:
...     agg = client.aggregate(round_id, model.state_dict(), weight=n_samples)
...     model.load_state_dict(agg.mean)

All protocol work is :class:`secagg.client.SecAggClient`; this module moves its bytes,
authenticates each call (:mod:`secagg.service.auth`), checks the round against the
client's :class:`Policy`, and reconnects after transient transport errors while the round
can still use it (the server treats a resent message as the repeat it is).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import numpy.typing as npt

from secagg import ckks, graph
from secagg.client import ClientResult, SecAggClient
from secagg.directory import Authority
from secagg.dp.participants import PreparedNoise
from secagg.dp.policy import DPOffer, DPPolicy
from secagg.errors import (
    ConfigurationError,
    LayoutMismatch,
    PolicyViolation,
    ServerMisbehaviour,
)
from secagg.he_params import HEParams
from secagg.he_round import CkksClient
from secagg.keys import IdentityKey
from secagg.messages import Message
from secagg.params import ROUND_ID_BYTES, Mode
from secagg.policy import MIN_CONTRIBUTORS, ClientPolicy, check_layout
from secagg.service._gen import aggregation_pb2, aggregation_pb2_grpc
from secagg.service.auth import call_metadata
from secagg.service.dpbudget import ANY_JOB, SiteBudget
from secagg.service.errors import (
    JobAborted,
    JobTimeout,
    PolicyRefused,
    Unavailable,
    from_rpc_error,
)
from secagg.service.plaintext import PlaintextClient
from secagg.service.serde import (
    DEFAULT_CHUNK_BYTES,
    Assembler,
    JoinedRound,
    chunk_message,
    max_server_message_bytes,
    round_info_from_proto,
)
from secagg.service.servicer import GET_ROUND, SESSION, WATCH_ROUNDS
from secagg.service.tensors import Layout, flatten, unflatten
from secagg.service.tls import ClientTls, tls_failure
from secagg.service.trust import check_directory

__all__ = ["Aggregate", "Client", "Policy", "RetryPolicy", "TransferStats"]

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE})
"""Statuses worth a reconnect: the transport failed, not the request."""
GRPC_PREFIX = 5
"""Bytes gRPC puts before each message (compressed flag and length)."""


@dataclass(frozen=True)
class Policy:
    """What this client requires of a round before it sends anything.

    Attributes
    ----------
    expected_dim, expected_job:
        Refuse rounds of another size or job.
    min_clients, min_threshold, min_threshold_fraction:
        Refuse rounds with fewer invited clients, or a Shamir threshold below
        ``max(min_threshold, ceil(min_threshold_fraction * n))``: a low threshold lets few
        colluders unmask an input. These are floors on top of the core check below, which
        always requires ``2t > k + 1`` and the finder's targets.
    security_bits, failure_bits, dropout, corrupt, adversary, min_contributors, max_weight:
        The core :class:`secagg.policy.ClientPolicy` this policy delegates to (see
        :meth:`core`): the round's ``(n, k, t)`` must meet the same parameter finder the
        server uses, under *these* targets and assumptions, and no roster, survivor set or
        result may hold fewer than ``max(t, min_contributors)`` clients (3 at least).
    pinned_directory:
        Participant name -> Ed25519 key the client trusts independently of the server.
        When set, every directory entry must be pinned and match.
    authority:
        The federation authority's public key (``authority.pub`` from the enrolment kit, a
        path or a :class:`secagg.directory.Authority`). When set, every directory entry must
        carry the authority's signature over (federation, name, key) (:mod:`secagg.directory`).
    trust_server_directory:
        INSECURE opt-in: without ``authority`` or ``pinned_directory`` the client refuses
        every round unless this is set, since a server serving its own directory can add
        participants it controls and so reach the threshold (docs/threat-model.md).
    allow_insecure_plaintext:
        Join INSECURE plaintext benchmark rounds (never for real data).
    allowed_modes:
        Privacy modes this client joins. ``ckks`` is off by default: there the server plus
        any one key holder can decrypt every upload (docs/threat-model.md).
    dp:
        Distributed-DP requirement (:class:`secagg.dp.policy.DPPolicy`), passed to the core
        policy: a round without DP or with a weaker offer is refused before anything is sent.
        The client also keeps its own ledger of the DP rounds it joined
        (:mod:`secagg.service.dpbudget`) and refuses a round that would take it past
        ``dp.max_epsilon`` or ``dp.max_rounds`` whatever the server announces.
    dp_state:
        File of that ledger (JSON, 0600); ``None`` keeps it in memory for the client's life.
        :meth:`Client.from_kit` defaults it to ``dp_state.json`` in the kit directory.
    """

    expected_dim: int | None = None
    expected_job: str | None = None
    min_clients: int = MIN_CONTRIBUTORS
    min_threshold: int = 2
    min_threshold_fraction: float = 0.0
    pinned_directory: Mapping[str, bytes] | None = None
    authority: Authority | str | Path | None = None
    trust_server_directory: bool = False
    allow_insecure_plaintext: bool = False
    allowed_modes: frozenset[str] = frozenset({"masked", "hybrid"})
    security_bits: float = graph.SECURITY_BITS
    failure_bits: float = graph.FAILURE_BITS
    dropout: float = graph.DEFAULT_DROPOUT
    corrupt: float = graph.DEFAULT_CORRUPT
    adversary: graph.Adversary = "active"
    min_contributors: int = MIN_CONTRIBUTORS
    max_weight: int = 1 << 32
    dp: DPPolicy | None = None
    dp_state: str | Path | None = None

    def core(self) -> ClientPolicy:
        """The protocol core's policy with this policy's targets."""
        return _core_policy(self)

    def check(self, joined: JoinedRound, own_key: bytes) -> None:
        """Raise :class:`PolicyRefused` if the round breaks this policy."""
        p = joined.params
        if not joined.insecure_plaintext and p.mode.name.lower() not in self.allowed_modes:
            raise PolicyRefused(f"round mode {p.mode.name.lower()} is not allowed by the policy")
        if joined.insecure_plaintext and not self.allow_insecure_plaintext:
            raise PolicyRefused("the round is an INSECURE plaintext round")
        if self.expected_dim is not None and p.dim != self.expected_dim:
            raise PolicyRefused(
                f"the round aggregates {p.dim} values, expected {self.expected_dim}"
            )
        if self.expected_job is not None and joined.job != self.expected_job:
            raise PolicyRefused(f"the round belongs to job {joined.job!r}")
        if p.n_clients < self.min_clients:
            raise PolicyRefused(
                f"the round has {p.n_clients} clients, fewer than {self.min_clients}"
            )
        need = max(self.min_threshold, math.ceil(self.min_threshold_fraction * p.n_clients))
        if p.threshold < need and not joined.insecure_plaintext:
            raise PolicyRefused(f"the round's threshold t={p.threshold} is below {need}")
        if not joined.insecure_plaintext:
            try:
                self.core().check_params(p)
            except (PolicyViolation, ConfigurationError) as exc:
                raise PolicyRefused(f"the round breaks this client's policy: {exc}") from None
        if joined.directory.get(joined.client_id) != own_key:
            raise PolicyRefused("the directory does not list this client's identity key")
        check_directory(
            joined,
            pinned=self.pinned_directory,
            authority=self.authority,
            trust_server_directory=self.trust_server_directory,
            now=time.time(),
        )


def _core_policy(policy: Policy) -> ClientPolicy:
    try:
        return ClientPolicy(
            security_bits=policy.security_bits,
            failure_bits=policy.failure_bits,
            dropout=policy.dropout,
            corrupt=policy.corrupt,
            adversary=policy.adversary,
            min_contributors=policy.min_contributors,
            min_clients=max(policy.min_clients, policy.min_contributors),
            max_weight=policy.max_weight,
            expected_dim=policy.expected_dim,
            allowed_modes=frozenset(Mode.parse(m) for m in policy.allowed_modes),
            dp=policy.dp,
        )
    except ConfigurationError as exc:
        raise PolicyRefused(f"invalid client policy: {exc}") from None


@dataclass(frozen=True)
class RetryPolicy:
    """Reconnects after transient failures, with exponential backoff.

    ``budget`` is how long to keep trying without any progress; by default the round's
    longest stage deadline (after that the server has dropped this client anyway).
    """

    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    budget: float | None = None
    connect_budget: float = 30.0


@dataclass
class TransferStats:
    """Bytes this client moved: protocol messages (the core's own count) and gRPC messages."""

    protocol_sent: int = 0
    protocol_received: int = 0
    grpc_sent: int = 0
    grpc_received: int = 0
    reconnects: int = 0


class Aggregate:
    """A round's result, in the structure of the update that was sent.

    ``sum`` and ``mean`` are built on first access (each is a full copy of the model).

    Attributes
    ----------
    sum, mean:
        Weighted sum and weighted mean of the contributors' updates (shapes, dtypes and
        devices of the update).
    total_weight:
        Sum of the contributors' weights.
    contributors:
        Client ids whose updates are in the sum.
    sums:
        The exact integer lane sums the server published.
    """

    def __init__(self, round_id: bytes, result: ClientResult, layout: Layout) -> None:
        self.round_id = round_id
        self.total_weight = result.total_weight
        self.contributors = result.contributors
        self.sums = result.sums
        self._result = result
        self._layout = layout

    @functools.cached_property
    def sum(self) -> Any:
        return unflatten(self._result.weighted_sum, self._layout)

    @functools.cached_property
    def mean(self) -> Any:
        return unflatten(self._result.mean, self._layout)

    def __repr__(self) -> str:
        return (
            f"Aggregate(round_id={self.round_id.hex()}, contributors={len(self.contributors)}, "
            f"total_weight={self.total_weight})"
        )


def _round_id(value: bytes | str) -> bytes:
    return bytes.fromhex(value) if isinstance(value, str) else bytes(value)


class _DPPrep:
    """Noise for the next DP round, drawn in a background thread (docs/dp.md, "Speed").

    The Numba sampler releases the GIL, so training (or anything else) runs beside it. One
    slot: a new preparation discards the one before. :meth:`take` waits for the thread and
    hands the noise out once; an offer that differs gets ``None`` (the round then draws its
    noise itself) and the prepared noise is erased.
    """

    def __init__(self, offer: DPOffer, policy: DPPolicy | None) -> None:
        self.offer = offer
        self.noise: PreparedNoise | None = None
        self.error: Exception | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(
            target=self._run, args=(policy,), name="secagg-dp-prepare", daemon=True
        )
        self._thread.start()

    def _run(self, policy: DPPolicy | None) -> None:
        t0 = time.perf_counter()
        try:
            self.noise = PreparedNoise(self.offer, policy)
        except Exception as exc:  # reported through take(); the round draws its own
            self.error = exc
        self.seconds = time.perf_counter() - t0

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the noise is drawn (or failed) within ``timeout`` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def take(self, offer: DPOffer) -> PreparedNoise | None:
        self.wait()
        noise, self.noise = self.noise, None
        if noise is not None and offer != self.offer:
            noise.discard()
            return None
        return noise

    def discard(self) -> None:
        self.wait()
        if self.noise is not None:
            self.noise.discard()
            self.noise = None


class Client:
    """A participant's connection to a secagg server.

    Parameters
    ----------
    target:
        ``host:port`` of the server.
    identity:
        This participant's enrolled Ed25519 identity key.
    tls:
        Server trust anchor (and client certificate for mutual TLS). Required unless
        ``insecure_no_tls=True``.
    insecure_no_tls:
        INSECURE opt-in: connect without TLS (loopback tests and simulations only; the
        call signatures still authenticate, but everything travels readable and the
        server is not authenticated).
    policy:
        Checks applied to every round before joining it.
    retry:
        Reconnection behaviour.
    chunk_bytes:
        Largest chunk this client sends (capped by the server's limit) and accepts.
    """

    def __init__(
        self,
        target: str,
        identity: IdentityKey,
        *,
        tls: ClientTls | None = None,
        policy: Policy | None = None,
        retry: RetryPolicy | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        insecure_no_tls: bool = False,
    ) -> None:
        if tls is None and not insecure_no_tls:
            raise ConfigurationError(
                f"Client({target!r}) needs tls=ClientTls(ca=...) (the server's trust anchor); "
                "pass insecure_no_tls=True only for loopback tests"
            )
        self.identity = identity
        self.tls = tls
        self.policy = policy or Policy()
        self.retry = retry or RetryPolicy()
        self.chunk_bytes = chunk_bytes
        self.stats = TransferStats()
        self._dp_budget = SiteBudget(self.policy.dp_state)
        self._dp_prep: _DPPrep | None = None
        self._dp_offer: DPOffer | None = None
        opts = [
            ("grpc.max_receive_message_length", chunk_bytes + 64 * 1024),
            ("grpc.max_send_message_length", -1),
            *(tls.options() if tls else []),
            *options,
        ]
        if tls is not None:
            self._channel = grpc.secure_channel(target, tls.credentials(), options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._stub = aggregation_pb2_grpc.AggregationStub(self._channel)
        self.he_secret_path: Path | None = None
        """A key holder's CKKS secret context file (set by :meth:`from_kit`): ckks and
        hybrid rounds use it when no ``he_context`` is given, counting decryptions in the
        ledger beside it."""
        self._announced: dict[bytes, tuple[str, int]] = {}
        """Round id -> (job, index) of every round :meth:`rounds` yielded: :meth:`join`
        refuses such a round if the server then describes it as another job's."""

    @classmethod
    def from_kit(
        cls,
        kit_dir: str | Path,
        *,
        target: str | None = None,
        server_name: str | None = None,
        retry: RetryPolicy | None = None,
        **policy: Any,
    ) -> Client:
        """A site's client from its kit (``secagg provision``) in one call.

        Loads the identity key, the CA and mTLS certificate, the server address (``target``
        overrides it), the federation authority (every directory entry must carry its
        signature) and the kit's policy; ``policy`` keywords override the kit's
        :class:`Policy` fields. TLS and directory verification cannot be turned off here.
        """
        from secagg.service import kit as kf
        from secagg.service.keyfile import read_identity

        k = kf.load_kit(kit_dir, "site")
        for forbidden in ("authority", "trust_server_directory", "pinned_directory"):
            if forbidden in policy:
                raise ConfigurationError(f"Client.from_kit: {forbidden} comes from the kit")
        fields_ = {f.name for f in fields(Policy)}
        merged = {**k.policy, **policy}
        if set(merged) - fields_:
            raise ConfigurationError(f"unknown policy fields {sorted(set(merged) - fields_)}")
        if "allowed_modes" in merged:
            merged["allowed_modes"] = frozenset(merged["allowed_modes"])
        if merged.get("dp_state") is None:
            from secagg.service.dpbudget import STATE_FILE

            merged["dp_state"] = Path(kit_dir) / STATE_FILE
        tls = ClientTls(
            ca=k.path(kf.CA),
            cert=k.path(kf.CERT),
            key=k.path(kf.KEY),
            server_name=server_name or k.server_name,
        )
        client = cls(
            target or k.server,
            read_identity(k.path(kf.IDENTITY)),
            tls=tls,
            policy=Policy(authority=k.path(kf.AUTHORITY), **merged),
            retry=retry,
        )
        if k.key_holder:
            client.he_secret_path = k.path(kf.CKKS_SECRET)
        return client

    @property
    def dp_budget(self) -> SiteBudget:
        """This site's own ledger of the DP rounds it joined (:mod:`secagg.service.dpbudget`),
        in ``policy.dp_state`` (follows a policy replaced after construction)."""
        want = Path(self.policy.dp_state) if self.policy.dp_state is not None else None
        if self._dp_budget.path != want:
            self._dp_budget = SiteBudget(want)
        return self._dp_budget

    def prepare_dp(self, offer: DPOffer | None = None, *, wait: bool = False) -> None:
        """Draw the noise of the next DP round now, in a background thread.

        ``offer`` is the next round's DP offer (``RoundParams.dp``); by default that of the
        last DP round this client joined (a job's rounds share ``n``, ``t``, ``T``, ``dim``).
        It is checked against ``policy.dp`` when drawn; the next round uses the noise only
        if its own offer equals it (else the round draws in-round, and this one is erased).
        :meth:`aggregate` calls this after every DP round unless ``prepare_next=False``.
        ``wait=True`` returns after the noise is drawn.

        Raises
        ------
        ConfigurationError
            No offer given and no DP round joined yet.
        """
        offer = offer if offer is not None else self._dp_offer
        if offer is None:
            raise ConfigurationError("prepare_dp needs the next round's DP offer")
        if self._dp_prep is not None:
            self._dp_prep.discard()
        self._dp_prep = _DPPrep(offer, self.policy.dp)
        if wait:
            self._dp_prep.wait()

    @property
    def dp_prepare_seconds(self) -> float | None:
        """Seconds the last background noise preparation took (``None``: none finished)."""
        prep = self._dp_prep
        return prep.seconds if prep is not None and prep.wait(0) else None

    def _take_dp(self, offer: DPOffer) -> PreparedNoise | None:
        prep, self._dp_prep = self._dp_prep, None
        return None if prep is None else prep.take(offer)

    def close(self) -> None:
        if self._dp_prep is not None:
            self._dp_prep.discard()
            self._dp_prep = None
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def join(self, round_id: bytes | str) -> JoinedRound:
        """Fetch the round's parameters and directory and check them against the policy."""
        rid = _round_id(round_id)
        info = self._unary(
            lambda: self._stub.GetRound(
                aggregation_pb2.GetRoundRequest(round_id=rid),
                metadata=call_metadata(self.identity, GET_ROUND, rid),
                timeout=self.retry.connect_budget,
            )
        )
        return self._checked_round(info, rid)

    def _checked_round(self, info: aggregation_pb2.RoundInfo, rid: bytes) -> JoinedRound:
        """Decode a ``GetRound`` answer for round ``rid`` and check it against the policy
        (shared with :class:`secagg.service.aio_client.AsyncClient`)."""
        joined = round_info_from_proto(info)
        if joined.round_id != rid:
            raise ServerMisbehaviour("the server described another round")
        announced = self._announced.get(rid)
        if announced is not None and joined.job != announced[0]:
            raise PolicyRefused(
                f"the server announced round {rid.hex()} as round {announced[1]} of job "
                f"{announced[0]!r}, but describes it as a round of job {joined.job!r}"
            )
        self.policy.check(joined, self.identity.public)
        return joined

    def rounds(self, job: str, *, timeout: float | None = None) -> Iterator[str]:
        """Yield the id (hex) of each round of ``job`` this site participates in, as it
        opens; the round open when called comes first.

        >>> for round_id in client.rounds("fed"):
        ...     fedavg.step(model, num_samples=len(train_set), round_id=round_id)

        Stops when the job finishes. The server is not trusted with what it announces:
        every event must name ``job``, carry a well-formed round id and a round index
        above the last one yielded (a repeat of the same round after a reconnect is
        skipped), and :meth:`join` later refuses a yielded round that the server then
        describes as another job's; each round's parameters are checked against this
        client's policy at join, as any round's. A dropped stream is reopened, with
        backoff, for up to ``retry.connect_budget`` seconds of failures in a row.

        Parameters
        ----------
        timeout:
            Seconds to wait for the next round (``None``: as long as the job runs).

        Raises
        ------
        JobAborted
            The job was aborted; no further round will open.
        JobTimeout
            No round opened within ``timeout`` seconds.
        ServerMisbehaviour
            An event an honest server never sends.
        ServiceError
            The server refused the call (no such job: ``NotFound``; not a participant of
            it: ``PermissionDenied``).
        """
        last_index = -1
        yielded: dict[bytes, int] = {}
        retry = self.retry
        backoff = retry.initial_backoff
        failing_since: float | None = None
        wait_from = time.monotonic()
        while True:
            remaining = None if timeout is None else wait_from + timeout - time.monotonic()
            if remaining is not None and remaining <= 0:
                if failing_since is not None:
                    raise Unavailable(
                        f"UNAVAILABLE: the server stayed unreachable while waiting {timeout:g} s "
                        f"for a round of job {job!r}"
                    )
                raise JobTimeout(f"no round of job {job!r} opened within {timeout:g} s")
            call = self._stub.WatchRounds(
                aggregation_pb2.WatchRoundsRequest(job=job),
                metadata=call_metadata(self.identity, WATCH_ROUNDS),
                timeout=remaining,
            )
            try:
                for ev in call:
                    failing_since = None
                    backoff = retry.initial_backoff
                    kind = _job_event_kind(ev, job)
                    if kind == "finished":
                        return
                    if kind == "aborted":
                        raise JobAborted(job, ev.reason)
                    rid = bytes(ev.round_id)
                    if rid in yielded:
                        if yielded[rid] != ev.index:
                            raise ServerMisbehaviour(
                                f"round {rid.hex()} was announced as round {yielded[rid]} of "
                                f"job {job!r} and now as round {ev.index}"
                            )
                        continue  # the open round again, after a reconnect
                    if ev.index <= last_index:
                        raise ServerMisbehaviour(
                            f"job {job!r}: round {ev.index} announced after round {last_index}"
                        )
                    last_index = ev.index
                    yielded[rid] = ev.index
                    self._announced[rid] = (job, ev.index)
                    yield rid.hex()
                    wait_from = time.monotonic()
                # The stream ended without the job's end: reconnect.
                err: grpc.RpcError = _Unavailable("the server ended WatchRounds early")
            except grpc.RpcError as exc:
                err = exc
            finally:
                call.cancel()
            if (tls_err := tls_failure(err, self.tls)) is not None:
                raise tls_err from None
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
                continue  # the loop's check raises JobTimeout
            if failing_since is None:
                failing_since = time.monotonic()
            down = time.monotonic() - failing_since
            if err.code() not in TRANSIENT or down + backoff > retry.connect_budget:
                raise from_rpc_error(err) from None
            time.sleep(backoff)
            backoff = min(2 * backoff, retry.max_backoff)

    def aggregate(
        self,
        round_id: bytes | str,
        update: Any,
        weight: int = 1,
        *,
        rounding_key: bytes | None = None,
        he_context: HEContext | None = None,
        key_epoch: bytes | None = None,
        prepare_next: bool = True,
    ) -> Aggregate:
        """Contribute ``update`` to the round and return the aggregate.

        DP rounds: the round uses noise prepared by :meth:`prepare_dp` when its offer
        matches, and (``prepare_next``, the default) once it ends a background thread draws
        the noise for the next round with the same offer, overlapping the caller's training.

        ``update`` is a numpy array, a torch tensor (CPU or CUDA), or a dict of them (a
        ``state_dict``); its values must number the round's ``dim``. ``ckks`` and ``hybrid``
        rounds need ``he_context``, the key holders' CKKS context (``secagg keygen --ckks``):
        best the *path* of the secret context file, opened with
        :func:`secagg.ckks.open_secret_context` so that its decryption budget is counted in
        the ledger beside it (``PATH.ledger``) across rounds and processes. A loaded
        :class:`~secagg.ckks.SecretContext` keeps its own count for as long as it lives;
        raw ``bytes`` load a fresh context each call whose count lasts one round only (the
        budget is then not enforced across rounds: avoid it outside tests). ``key_epoch``
        is the round's key-epoch fingerprint when the caller knows it; a context of another
        epoch is refused before anything is sent (:class:`~secagg.errors.KeyEpochMismatch`).

        Raises
        ------
        PolicyRefused
            The round breaks this client's policy, or ``update``'s layout (names, shapes,
            dtypes, order) differs from the round's fingerprint (nothing was sent).
        RoundAborted
            The round ended without a result.
        ServerMisbehaviour
            The server sent something an honest server never sends.
        ServiceError
            The server refused a call (see :func:`secagg.service.errors.from_rpc_error`).
        """
        joined = self.join(round_id)
        vector, layout = flatten(update)
        try:
            check_layout(joined.params, layout.fingerprint)  # before anything is sent
        except LayoutMismatch as exc:
            raise PolicyRefused(str(exc)) from None
        result = self.participate(
            joined,
            vector,
            weight,
            rounding_key=rounding_key,
            he_context=he_context,
            key_epoch=key_epoch,
        )
        assert result is not None
        if prepare_next and joined.params.dp is not None and not joined.insecure_plaintext:
            self.prepare_dp(joined.params.dp)
        return Aggregate(joined.round_id, result, layout)

    def participate(
        self,
        joined: JoinedRound,
        vector: npt.ArrayLike,
        weight: int = 1,
        *,
        rounding_key: bytes | None = None,
        on_send: Callable[[Message], bool] | None = None,
        he_context: HEContext | None = None,
        key_epoch: bytes | None = None,
    ) -> ClientResult | None:
        """Run the protocol for a joined round with a flat ``vector``.

        ``on_send`` sees each message before it is sent; returning ``False`` makes the
        client go silent (it disconnects and returns ``None``), which simulations use to
        model dropouts.
        """
        if joined.groups > 1:  # a sharded round: the assignment first (docs/sharding.md)
            from secagg.service.sharded_client import participate_sharded

            return participate_sharded(
                self, joined, vector, weight, rounding_key=rounding_key, on_send=on_send,
                key_epoch=key_epoch, he_context=he_context,
            )  # fmt: skip
        core, dp_key = self._core(
            joined, vector, weight, rounding_key=rounding_key, he_context=he_context,
            key_epoch=key_epoch,
        )  # fmt: skip
        result = _Session(self, joined, core, on_send).run()
        self._settle(joined, dp_key, result)
        return result

    def _core(
        self,
        joined: JoinedRound,
        vector: npt.ArrayLike,
        weight: int,
        *,
        rounding_key: bytes | None,
        he_context: HEContext | None,
        key_epoch: bytes | None,
        group_round: bool = False,
    ) -> tuple[SecAggClient | PlaintextClient | CkksClient, str | None]:
        """The protocol core for an unsharded joined round, and the DP ledger key reserved
        for it (``None``: no DP round); shared with the asyncio driver. ``group_round``: a
        group round of a sharded round (:mod:`secagg.service.sharded_client`), whose
        encrypted sum the core refuses (:class:`~secagg.errors.GroupResultRefused`)."""
        core: SecAggClient | PlaintextClient | CkksClient
        p = joined.params
        secret: ckks.SecretContext | None = None
        if not joined.insecure_plaintext and p.mode is not Mode.MASKED:
            if he_context is None and self.he_secret_path is not None:
                he_context = ckks.open_secret_context(self.he_secret_path, p.he)
            if he_context is None:
                raise PolicyRefused(f"a {p.mode.name.lower()} round needs the CKKS key context")
            secret = secret_context(he_context, p.he)
        if joined.insecure_plaintext:
            core = PlaintextClient(
                joined.client_id, joined.params, vector, weight, rounding_key=rounding_key
            )
        elif p.mode is Mode.CKKS:
            assert secret is not None
            core = CkksClient(
                joined.client_id,
                self.identity,
                p,
                joined.directory,
                vector,
                weight,
                secret,
                rounding_key=rounding_key,
                policy=self.policy.core(),
                key_epoch=key_epoch,
                group_round=group_round,
            )
        else:
            prepared = None
            if p.dp is not None:
                self._dp_offer = p.dp
                prepared = self._take_dp(p.dp)
            try:
                core = SecAggClient(
                    joined.client_id,
                    self.identity,
                    joined.params,
                    joined.directory,
                    vector,
                    weight,
                    rounding_key=rounding_key,
                    he_context=secret,
                    policy=self.policy.core(),
                    key_epoch=key_epoch,
                    dp_prepared=prepared,
                    group_round=group_round,
                )
            except BaseException:
                if prepared is not None:
                    prepared.discard()
                raise
        offer, dp_key = p.dp, None
        if offer is not None and self.policy.dp is not None and not joined.insecure_plaintext:
            # The site's own count, whatever the server announces; before anything is sent.
            dp_key = self.policy.expected_job or ANY_JOB
            self.dp_budget.reserve(dp_key, joined.round_id, offer, self.policy.dp)
        return core, dp_key

    def _settle(self, joined: JoinedRound, dp_key: str | None, result: ClientResult | None) -> None:
        """Settle the DP ledger entry reserved by :meth:`_core` once the round ended."""
        offer = joined.params.dp
        if dp_key is not None and offer is not None and result is not None:
            self.dp_budget.settle(dp_key, joined.round_id, offer, len(result.contributors))

    def _unary(self, call: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + self.retry.connect_budget
        backoff = self.retry.initial_backoff
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                if (tls_err := tls_failure(err, self.tls)) is not None:
                    raise tls_err from None
                if err.code() not in TRANSIENT or time.monotonic() + backoff > deadline:
                    raise from_rpc_error(err) from None
                time.sleep(backoff)
                backoff = min(2 * backoff, self.retry.max_backoff)


JOB_EVENT_KINDS = frozenset({"round", "finished", "aborted"})


def _job_event_kind(ev: aggregation_pb2.JobEvent, job: str) -> str:
    """Check one ``WatchRounds`` event for ``job``; its kind."""
    if ev.job != job:
        raise ServerMisbehaviour(f"WatchRounds({job!r}) announced an event of job {ev.job!r}")
    if ev.kind not in JOB_EVENT_KINDS:
        raise ServerMisbehaviour(f"WatchRounds({job!r}) sent an unknown event {ev.kind[:40]!r}")
    if ev.kind == "round" and len(ev.round_id) != ROUND_ID_BYTES:
        raise ServerMisbehaviour(
            f"WatchRounds({job!r}) announced a round id of {len(ev.round_id)} bytes, "
            f"not {ROUND_ID_BYTES}"
        )
    return str(ev.kind)


HEContext: TypeAlias = "str | os.PathLike[str] | bytes | ckks.SecretContext"
"""What the SDK takes as the key holders' CKKS context: a file path (its budget persists in
``PATH.ledger``), a loaded context, or the file's bytes (budget for this call only)."""


def secret_context(he_context: HEContext, params: HEParams) -> ckks.SecretContext:
    """Load ``he_context`` for ``params``: a path through
    :func:`secagg.ckks.open_secret_context` (file ledger), bytes with a fresh in-memory
    count, a loaded context as it is."""
    if isinstance(he_context, ckks.SecretContext):
        return he_context
    if isinstance(he_context, bytes | bytearray):
        return ckks.load_secret_context(bytes(he_context), params)
    return ckks.open_secret_context(Path(he_context), params)


class _Session:
    """One participation: keeps what was sent and received across reconnects."""

    def __init__(
        self,
        client: Client,
        joined: JoinedRound,
        core: SecAggClient | PlaintextClient | CkksClient,
        on_send: Callable[[Message], bool] | None,
    ) -> None:
        self.client = client
        self.joined = joined
        self.core = core
        self.on_send = on_send
        self.sent: list[bytes] = []
        self.acked = 0
        self.received = 0
        self.chunk = min(client.chunk_bytes, joined.max_chunk_bytes)
        self.max_in = max_server_message_bytes(joined.params)
        self.queue: queue.SimpleQueue[aggregation_pb2.ClientFrame | None] = queue.SimpleQueue()
        self.last_progress = time.monotonic()
        d = joined.deadlines
        stages = [float(getattr(d, f.name)) for f in fields(d)]
        self.budget = client.retry.budget or max(stages)
        # hybrid: the result check and blame stages wait as long as unmasking each
        self.call_timeout = sum(stages) + 2 * float(d.unmasking) + 60.0

    def run(self) -> ClientResult | None:
        if not self._accept(self.core.start(time.monotonic())):
            return None
        retry = self.client.retry
        backoff = retry.initial_backoff
        while True:
            self.queue = queue.SimpleQueue()
            self.opening_frames()
            rid = self.joined.round_id
            call = self.client._stub.Session(
                iter(self.queue.get, None),
                metadata=call_metadata(self.client.identity, SESSION, rid),
                timeout=self.call_timeout,
            )
            try:
                result = self._pump(call)
                self.queue.put(None)
                with contextlib.suppress(grpc.RpcError):
                    for _ in call:  # the server closes the stream once it has sent all
                        pass
                return result
            except _Silent:
                return None
            except grpc.RpcError as err:
                if (tls_err := tls_failure(err, self.client.tls)) is not None:
                    raise tls_err from None
                stalled = time.monotonic() - self.last_progress
                if err.code() not in TRANSIENT or stalled + backoff > self.budget:
                    raise from_rpc_error(err) from None
            finally:
                self.queue.put(None)
                call.cancel()
            self.client.stats.reconnects += 1
            time.sleep(backoff)
            backoff = min(2 * backoff, retry.max_backoff)

    def _pump(self, call: Iterator[aggregation_pb2.ServerFrame]) -> ClientResult:
        asm = self.assembler()
        for frame in call:
            data = self._message(frame, asm)
            if data is None:
                continue
            result = self._replied(self.core.receive(data, time.monotonic()))
            if result is not None:
                return result
        raise _Unavailable("the server ended the session before the round did")

    # The steps of one attempt, shared with the asyncio driver (service/aio_client.py),
    # which runs the same checks and the same core on its own transport.

    def opening_frames(self) -> None:
        """Queue an attempt's first frames: Hello (resuming after the messages received so
        far), then every message the server has not acknowledged."""
        self._put(
            aggregation_pb2.ClientFrame(
                hello=aggregation_pb2.Hello(
                    resume_from=self.received, max_chunk_bytes=self.client.chunk_bytes
                )
            )
        )
        for seq in range(self.acked, len(self.sent)):
            self._put_message(seq)

    def assembler(self) -> Assembler:
        """A fresh reassembler of the server's chunks (one per attempt)."""
        return Assembler(self.client.chunk_bytes, self.max_in)

    def _message(self, frame: aggregation_pb2.ServerFrame, asm: Assembler) -> bytes | None:
        """Account one server frame; the server message it completes, in order, or ``None``."""
        stats = self.client.stats
        self.last_progress = time.monotonic()
        stats.grpc_received += frame.ByteSize() + GRPC_PREFIX
        if frame.WhichOneof("kind") == "ack":
            self.acked = max(self.acked, frame.ack.seq + 1)
            return None
        got = asm.add(frame.chunk)
        if got is None:
            return None
        seq, data = got
        if seq != self.received:
            raise ServerMisbehaviour(f"server message {seq} arrived out of order")
        self.received += 1
        stats.protocol_received += len(data)
        return bytes(data)

    def _replied(self, replies: list[Message]) -> ClientResult | None:
        """Send the core's replies (``_Silent`` if ``on_send`` refuses one); the result once
        the core is done."""
        if not self._accept(replies):
            raise _Silent
        if self.core.done:
            assert self.core.result is not None
            return self.core.result
        return None

    def _accept(self, messages: list[Message]) -> bool:
        for m in messages:
            if self.on_send is not None and not self.on_send(m):
                return False
            data = m.encode()
            self.sent.append(data)
            self.client.stats.protocol_sent += len(data)
            self._put_message(len(self.sent) - 1)
        return True

    def _put_message(self, seq: int) -> None:
        for chunk in chunk_message(seq, self.sent[seq], self.chunk):
            self._put(aggregation_pb2.ClientFrame(chunk=chunk))

    def _put(self, frame: aggregation_pb2.ClientFrame) -> None:
        self.client.stats.grpc_sent += frame.ByteSize() + GRPC_PREFIX
        self.emit(frame)

    def emit(self, frame: aggregation_pb2.ClientFrame) -> None:
        """Hand one frame to the open call's request stream."""
        self.queue.put(frame)


class _Silent(Exception):
    """The ``on_send`` hook asked the client to go silent."""


class _Unavailable(grpc.RpcError):  # type: ignore[misc]
    """An UNAVAILABLE error raised locally: a session that ended too early is retried."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details
