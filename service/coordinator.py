"""All rounds of one server: creation, lookup, shutdown, and recovery after a restart."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from secagg import ckks
from secagg.errors import ConfigurationError
from secagg.he_round import CkksServer
from secagg.params import PROTOCOL_VERSION, Mode, RoundParams, make_params
from secagg.quantize import FEDAVG_MAX_WEIGHT
from secagg.server import SecAggServer, StageTimeouts
from secagg.service.dpspec import DPSpec
from secagg.service.errors import AlreadyExists, NotFound, PermissionDenied
from secagg.service.logs import event
from secagg.service.metrics import Metrics
from secagg.service.plaintext import PlaintextServer
from secagg.service.rounds import RoundCore, RoundRunner
from secagg.service.serde import deadlines_dict
from secagg.service.store import ABORTED, Member, Store

if TYPE_CHECKING:
    from secagg.service.jobs import JobScheduler
    from secagg.service.privacy import JobLedger

__all__ = ["CRYPTO_SUITE", "Coordinator", "JobSpec", "RoundSpec"]

log = logging.getLogger("secagg.service.coordinator")

CRYPTO_SUITE = {
    "identity_signature": "Ed25519 (RFC 8032)",
    "key_agreement": "X25519 (RFC 7748)",
    "share_encryption": "AES-256-GCM",
    "kdf": "HKDF-SHA256 (RFC 5869)",
    "prg": "ChaCha20 (RFC 8439)",
    "secret_sharing": "Shamir",
}
"""Primitives of the masked protocol, recorded in every round's audit entry."""

RESTART_REASON = "the server restarted while the round was running"


@dataclass(frozen=True)
class RoundSpec:
    """An operator's request for a round (``CreateRound``)."""

    job: str
    participants: Sequence[str]
    dim: int
    mode: str = "masked"
    bits: int = 16
    clip: float = 8.0
    max_weight: int = 1
    neighbors: str = "auto"
    threshold: str = "auto"
    deadlines: StageTimeouts = field(default_factory=StageTimeouts)
    tolerate_dropout: float | None = None
    tolerate_corrupt: float | None = None
    he_context: bytes | None = field(default=None, repr=False)
    """``ckks`` / ``hybrid``: the server's CKKS context (no key of any kind)."""
    publish_after: int | None = None
    """``ckks``: publish after this many uploads (FedBuff-style); ``None`` waits for all."""
    layout: bytes = b""
    """Model-layout fingerprint (:func:`secagg.service.tensors.fingerprint`), or ``b""``."""
    dp: DPSpec | None = None
    """Distributed DP: the budget the round is calibrated for (for its own ``n`` and ``t``)
    and charged to in the ledger of ``job`` (:mod:`secagg.service.privacy`). DP rounds are
    unweighted (``max_weight`` 1)."""

    groups: int = 0
    """Sharded round (docs/sharding.md, "Over gRPC"): ``G > 1`` groups, each its own
    group round; 0 or 1: one ordinary round."""
    on_group_abort: str = "publish"
    """Sharded rounds: ``publish`` the completed groups' sum when a group aborts (never
    below the minimum contributors) or ``abort`` the round."""

    def __post_init__(self) -> None:
        if self.dp is not None and not isinstance(self.dp, DPSpec):
            object.__setattr__(self, "dp", DPSpec.from_json(self.dp, clip=self.clip))


_ROUND_FIELDS = (
    "participants",
    "dim",
    "mode",
    "bits",
    "clip",
    "max_weight",
    "neighbors",
    "threshold",
    "tolerate_dropout",
    "tolerate_corrupt",
    "publish_after",
)


@dataclass(frozen=True)
class JobSpec:
    """An operator's request for a job (``CreateJob``): the shape of every round, how many
    rounds, and how often. Everything :class:`RoundSpec` has, plus ``rounds``, ``every``
    and ``dp``; the rounds belong to job ``name`` (``job`` is accepted as its alias).

    Attributes
    ----------
    rounds:
        Rounds to open, whatever each one's outcome (``None``: until aborted).
    every:
        Seconds between round openings (``None``: the next round opens as soon as the
        previous one ended; a round that outlasts ``every`` delays the next one).
    dp:
        Distributed-DP budget of the whole job (:class:`~secagg.service.dpspec.DPSpec`, or
        its JSON object: ``rounds`` defaults to the job's, ``clip`` to the round's); each
        round is calibrated for it, admitted against and charged to the job's ledger.
    """

    name: str = ""
    participants: Sequence[str] = ()
    dim: int = 0
    mode: str = "masked"
    bits: int = 16
    clip: float = 8.0
    max_weight: int = FEDAVG_MAX_WEIGHT
    neighbors: str = "auto"
    threshold: str = "auto"
    deadlines: StageTimeouts = field(default_factory=StageTimeouts)
    tolerate_dropout: float | None = None
    tolerate_corrupt: float | None = None
    he_context: bytes | None = field(default=None, repr=False)
    publish_after: int | None = None
    layout: bytes = b""
    rounds: int | None = None
    every: float | None = None
    dp: DPSpec | Mapping[str, Any] | None = None
    job: str = ""
    groups: int = 0
    """Sharded rounds of ``groups`` groups (:attr:`RoundSpec.groups`)."""
    on_group_abort: str = "publish"

    def __post_init__(self) -> None:
        if self.name and self.job and self.name != self.job:
            raise ConfigurationError(f"JobSpec(name={self.name!r}, job={self.job!r}) disagree")
        object.__setattr__(self, "name", self.name or self.job)
        object.__setattr__(self, "job", self.name)
        object.__setattr__(self, "participants", tuple(self.participants))
        if not self.name:
            raise ConfigurationError("a job needs a name")
        if self.rounds is not None and (isinstance(self.rounds, bool) or self.rounds < 1):
            raise ConfigurationError(f"a job runs at least 1 round, got rounds={self.rounds}")
        if self.every is not None and not 0 < self.every < float("inf"):
            raise ConfigurationError(f"every must be > 0 seconds, got {self.every}")
        if self.dp is not None:
            object.__setattr__(
                self, "dp", DPSpec.from_json(self.dp, rounds=self.rounds, clip=self.clip)
            )

    @property
    def dp_spec(self) -> DPSpec | None:
        """``dp`` as its typed form (``__post_init__`` parsed it)."""
        return self.dp if isinstance(self.dp, DPSpec) else None

    def round_spec(self) -> RoundSpec:
        """The spec of each of the job's rounds (with the job's ``dp``)."""
        extra: dict[str, Any] = {}
        if self.dp_spec is not None:
            extra["dp"] = self.dp_spec
        return RoundSpec(
            job=self.name,
            deadlines=self.deadlines,
            he_context=self.he_context,
            layout=self.layout,
            groups=self.groups,
            on_group_abort=self.on_group_abort,
            **{k: getattr(self, k) for k in _ROUND_FIELDS},
            **extra,
        )

    def to_json(self) -> dict[str, Any]:
        """The spec as the ``jobs`` table stores it (bytes as hex)."""
        doc: dict[str, Any] = {k: getattr(self, k) for k in _ROUND_FIELDS}
        doc["participants"] = list(self.participants)
        doc.update(
            name=self.name,
            deadlines=deadlines_dict(self.deadlines),
            he_context=self.he_context.hex() if self.he_context else None,
            layout=self.layout.hex(),
            rounds=self.rounds,
            every=self.every,
            dp=self.dp_spec.to_json() if self.dp_spec is not None else None,
        )
        if self.groups > 1:  # sharded jobs only: older specs stay as they were
            doc.update(groups=self.groups, on_group_abort=self.on_group_abort)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> JobSpec:
        try:
            he = doc.get("he_context")
            return cls(
                name=str(doc["name"]),
                deadlines=StageTimeouts(**doc["deadlines"]),
                he_context=bytes.fromhex(he) if he else None,
                layout=bytes.fromhex(doc.get("layout", "")),
                rounds=doc.get("rounds"),
                every=doc.get("every"),
                dp=doc.get("dp"),
                groups=int(doc.get("groups", 0)),
                on_group_abort=str(doc.get("on_group_abort", "publish")),
                **{k: doc[k] for k in _ROUND_FIELDS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"malformed job spec in the store: {exc}") from None


HE_SUITE = {
    "homomorphic_encryption": "CKKS (Microsoft SEAL via TenSEAL), symmetric, seeded",
}
"""Added to the audit entry of ckks and hybrid rounds (with the chosen parameters)."""


class Coordinator:
    """Creates and finds rounds; at most one running round per job."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        pool: Executor,
        *,
        retain_seconds: float = 600.0,
        disconnect_grace: float = 3.0,
    ) -> None:
        self.store = store
        self._grace = disconnect_grace
        self.metrics = metrics
        self._pool = pool
        self._retain = retain_seconds
        self._rounds: dict[bytes, RoundRunner] = {}
        self._create_lock = asyncio.Lock()
        self._charges: dict[str, asyncio.Task[None]] = {}
        """Job -> the DP charge of its last round, awaited before its next round is admitted."""
        from secagg.service.jobs import JobScheduler

        self.group_engine = "local"
        """Where group rounds of sharded rounds run: ``local`` or ``ray``."""
        self.ray_workers = 2
        self.ray_address: str | None = None
        self.jobs: JobScheduler = JobScheduler(self)
        """The jobs: their rounds opened one after another (:mod:`secagg.service.jobs`)."""

    def recover(self) -> list[bytes]:
        """Mark rounds the previous process left running as aborted (in the audit log)."""
        ids = self.store.abort_interrupted(RESTART_REASON)
        for rid in ids:
            event(log, logging.WARNING, "round aborted by restart", round=rid.hex())
            self.metrics.rounds.labels("aborted").inc()
        return ids

    def runner(self, round_id: bytes) -> RoundRunner:
        r = self._rounds.get(round_id)
        if r is None:
            rec = self.store.round(round_id)
            if rec is None:
                raise NotFound(f"no round {round_id.hex()}")
            raise NotFound(f"round {round_id.hex()} is {rec.status} and no longer served")
        return r

    def runners(self) -> list[RoundRunner]:
        return list(self._rounds.values())

    async def create(
        self, spec: RoundSpec, *, operator: str | None = None, job_index: int | None = None
    ) -> RoundRunner:
        """Validate ``spec``, record the round and open it (``operator``, who asked for
        it, is named in the ``round_created`` audit entry). ``job_index`` makes it round
        ``job_index`` of the job ``spec.job`` (:mod:`secagg.service.jobs`); without it a
        job's name is refused (its rounds are the server's to open).

        The round *opens* when it is recorded: its first stage's deadline counts from then,
        not from before the work of creating it (an HE context to load, a store write).

        Raises
        ------
        NotFound, PermissionDenied
            A participant that is not enrolled, or revoked.
        AlreadyExists
            The job already has a running round.
        ConfigurationError, InfeasibleParameters
            Parameters the core refuses.
        """
        if spec.groups > 1:  # sharded: this server is the front door (service/sharded.py)
            from secagg.service.sharded import create_sharded

            return await create_sharded(self, spec, operator=operator, job_index=job_index)
        mode = spec.mode.lower()
        if mode != "plaintext":
            Mode.parse(mode)  # a bad name raises ConfigurationError
        if mode in ("ckks", "hybrid") and not spec.he_context:
            raise ConfigurationError(f"a {mode} round needs the server's CKKS context")
        if not spec.job:
            raise ConfigurationError("a round needs a job name")
        if len(set(spec.participants)) != len(spec.participants):
            raise ConfigurationError("a participant is named twice")
        loop = asyncio.get_running_loop()
        async with self._create_lock:
            self._evict()
            members = await loop.run_in_executor(self._pool, self._members, spec.participants)
            job = await loop.run_in_executor(self._pool, self.store.job, spec.job)
            if job_index is None and job is not None:
                raise AlreadyExists(
                    f"{spec.job!r} is a job (secagg job create): the server opens its rounds; "
                    "give this round another --job"
                )
            if await loop.run_in_executor(self._pool, self.store.running_job, spec.job):
                raise AlreadyExists(f"job {spec.job!r} already has a running round")
            params = await loop.run_in_executor(self._pool, self._params, spec, len(members))
            dp_audit: dict[str, object] | None = None
            if spec.dp is not None:
                pending = self._charges.get(spec.job)
                if pending is not None:  # the previous round's charge comes first
                    await asyncio.shield(pending)
                dp_audit = await loop.run_in_executor(self._pool, self._admit, spec, params)
            # Stages left at their default deadline grow with the round (n, n * dim).
            spec = replace(spec, deadlines=spec.deadlines.for_round(len(members), params.dim))
            directory = {m.client_id: m.public_key for m in members}
            he_ctx = None
            if mode in ("ckks", "hybrid"):
                he_ctx = await loop.run_in_executor(self._pool, self._he_context, spec, params)
            body = self._audit_body(spec, params, members, mode == "plaintext")
            if operator is not None:
                body["operator"] = operator
            if job_index is not None:
                body["job_index"] = job_index
            if dp_audit is not None:
                body["dp"] = dp_audit
            await loop.run_in_executor(
                self._pool,
                lambda: self.store.create_round(
                    params.round_id,
                    spec.job,
                    params.encode(),
                    mode == "plaintext",
                    deadlines_dict(spec.deadlines),
                    members,
                    body,
                    job_index,
                ),
            )
            try:  # the round opens now: its first deadline counts from here
                core = self._core(mode, spec, params, directory, he_ctx, time.monotonic())
            except Exception as exc:  # recorded as aborted: the log shows it never ran
                reason = f"the round could not open: {type(exc).__name__}: {exc}"
                outcome = {"status": ABORTED, "stage": "open", "reason": reason}
                await loop.run_in_executor(
                    self._pool, self.store.finish_round, params.round_id, ABORTED, outcome
                )
                raise
            runner = RoundRunner(
                round_id=params.round_id,
                job=spec.job,
                params=params,
                members=members,
                core=core,
                plaintext=mode == "plaintext",
                deadlines=spec.deadlines,
                store=self.store,
                metrics=self.metrics,
                loop=loop,
                pool=self._pool,
                disconnect_grace=self._grace,
            )
            runner.job_index = job_index
            self._rounds[params.round_id] = runner
            runner.start()
            if spec.dp is not None:
                task = loop.create_task(self._charge(runner, spec))
                self._charges[spec.job] = task
                task.add_done_callback(functools.partial(self._charged, spec.job))
        event(
            log,
            logging.INFO,
            "round created",
            round=params.round_id.hex(),
            job=spec.job,
            clients=len(members),
            dim=spec.dim,
            mode=mode,
        )
        return runner

    def _members(self, names: Sequence[str]) -> list[Member]:
        members = []
        for cid, name in enumerate(names, start=1):
            p = self.store.participant(name)
            if p is None:
                raise NotFound(f"participant {name!r} is not enrolled")
            if p.revoked:
                raise PermissionDenied(f"participant {name!r} is revoked")
            members.append(Member(cid, name, p.public_key, self.store.signed_entry(name)))
        return members

    @staticmethod
    def _he_context(spec: RoundSpec, params: RoundParams) -> ckks.ServerContext:
        """The round's CKKS context; refused if it carries any key."""
        assert spec.he_context is not None
        return ckks.load_server_context(spec.he_context, params.he)

    @staticmethod
    def _core(
        mode: str,
        spec: RoundSpec,
        params: RoundParams,
        directory: dict[int, bytes],
        ctx: ckks.ServerContext | None,
        now: float,
    ) -> RoundCore:
        """The sans-I/O server of one round, its first stage starting at ``now``."""
        if mode == "plaintext":
            return PlaintextServer(params, directory, timeouts=spec.deadlines, now=now)
        if mode == "masked":
            return SecAggServer(params, directory, timeouts=spec.deadlines, now=now)
        assert ctx is not None
        if params.mode is Mode.CKKS:
            return CkksServer(
                params,
                directory,
                ctx,
                timeout=spec.deadlines.encrypted_input,
                now=now,
                publish_after=spec.publish_after,
            )
        return SecAggServer(params, directory, timeouts=spec.deadlines, now=now, he_context=ctx)

    @staticmethod
    def _params(spec: RoundSpec, n: int) -> RoundParams:
        """The round's parameters; with ``spec.dp`` the DP offer calibrated for this
        round's ``n`` and threshold (:meth:`secagg.service.dpspec.DPSpec.offer`)."""
        mode = spec.mode.lower()
        if spec.dp is not None and mode not in ("masked", "hybrid"):
            raise ConfigurationError(
                f"distributed DP runs in masked and hybrid rounds only, not {mode} (docs/dp.md)"
            )
        params = make_params(
            n,
            spec.dim,
            mode=Mode.MASKED if mode == "plaintext" else Mode.parse(mode),
            clip=spec.dp.clip if spec.dp is not None else spec.clip,
            bits=spec.bits,
            max_weight=1 if spec.dp is not None else spec.max_weight,
            neighbors=spec.neighbors,
            threshold=spec.threshold,
            dropout=spec.tolerate_dropout,
            corrupt=spec.tolerate_corrupt,
            layout=spec.layout,
        )
        if spec.dp is None:
            return params
        offer = spec.dp.offer(params.n_clients, params.threshold, params.dim)
        params = replace(params, dp=offer)
        if params.mode is Mode.HYBRID:
            _ = params.he  # fail early when no CKKS parameter set fits the DP shape
        return params

    def _ledger(self, spec: RoundSpec) -> JobLedger:
        """The ledger of ``spec.job`` with the round's budget (created on first use)."""
        from secagg.service.privacy import JobLedger

        assert spec.dp is not None
        return JobLedger(
            self.store,
            spec.job,
            epsilon=spec.dp.epsilon,
            delta=spec.dp.delta,
            sampling_rate=spec.dp.sampling_rate,
        )

    def _admit(self, spec: RoundSpec, params: RoundParams) -> dict[str, object]:
        """Admit a DP round against its job's ledger, worst case ``n`` contributors; the
        figures for the ``round_created`` audit entry.

        Raises
        ------
        BudgetExhausted
            The round's worst case would take the job past its budget.
        """
        assert spec.dp is not None and params.dp is not None
        ledger = self._ledger(spec)
        offer = params.dp
        eps = ledger.admit(offer, worst_case_contributors=params.n_clients)
        return {
            **spec.dp.to_json(),
            "gamma": offer.gamma,
            "beta": offer.beta,
            "lane_bits": offer.bits,
            "target_variance": offer.plan.target_variance,
            "components": offer.plan.components,
            "worst_case_epsilon_after": eps,
            "spent_before": ledger.spent(),
        }

    def _charged(self, job: str, task: asyncio.Task[None]) -> None:
        if self._charges.get(job) is task:
            del self._charges[job]

    async def _charge(self, runner: RoundRunner, spec: RoundSpec) -> None:
        """When the DP round ends with a result, charge it with its real contributors."""
        await runner.finished.wait()
        result = runner.core.result
        offer = runner.params.dp
        if result is None or offer is None:
            return  # nothing was released
        contributors = len(result.contributors)
        loop = asyncio.get_running_loop()
        try:
            row = await loop.run_in_executor(
                self._pool,
                lambda: self._ledger(spec).charge(runner.round_id, offer, contributors),
            )
        except Exception:  # the round ran; the failure to record it must be seen
            log.exception("round %s: its DP charge failed", runner.round_id.hex())
            return
        event(
            log,
            logging.INFO,
            "dp round charged",
            round=runner.round_id.hex(),
            job=spec.job,
            contributors=contributors,
            rho=row.rho,
            epsilon=row.epsilon_rdp,
            left=row.budget_left,
        )

    @staticmethod
    def _audit_body(
        spec: RoundSpec, params: RoundParams, members: Sequence[Member], plaintext: bool
    ) -> dict[str, object]:
        q = params.quant
        return {
            "job": spec.job,
            "protocol_version": PROTOCOL_VERSION,
            "mode": "plaintext" if plaintext else params.mode.name.lower(),
            "insecure_plaintext": plaintext,
            "params": params.encode().hex(),
            "params_sha256": params.digest().hex(),
            "dim": params.dim,
            "bits": q.bits,
            "clip": q.clip,
            "max_weight": q.max_weight,
            "n_clients": params.n_clients,
            "degree": params.degree,
            "threshold": params.threshold,
            "crypto": {} if plaintext else Coordinator._crypto(params),
            "deadlines": deadlines_dict(spec.deadlines),
            "participants": [
                {"client_id": m.client_id, "name": m.name, "identity_key": m.public_key.hex()}
                for m in members
            ],
            "warnings": list(params.warnings),
        }

    @staticmethod
    def _crypto(params: RoundParams) -> dict[str, object]:
        if params.mode is Mode.MASKED:
            return dict(CRYPTO_SUITE)
        he = params.he
        suite: dict[str, object] = {} if params.mode is Mode.CKKS else dict(CRYPTO_SUITE)
        suite.update(
            HE_SUITE,
            poly_modulus_degree=he.poly_modulus_degree,
            coeff_mod_bit_sizes=list(he.coeff_mod_bit_sizes),
            scale_bits=he.scale_bits,
            lanes_per_slot=he.lanes_per_slot,
            lane_bits=he.lane_bits,
        )
        return suite

    def _evict(self) -> None:
        """Forget rounds that ended more than ``retain_seconds`` ago."""
        now = time.monotonic()
        for rid, r in list(self._rounds.items()):
            if r.ended_at is not None and now - r.ended_at > self._retain:
                del self._rounds[rid]

    async def abort_all(self, reason: str) -> None:
        """Abort every running round (shutdown); each abort is recorded."""
        await self.jobs.stop()
        for r in self.runners():
            if not r.core.done:
                await r.abort(reason)
        for r in self.runners():
            await r.close()
