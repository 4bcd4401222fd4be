"""Flower: aggregate a Flower app's training rounds through a secagg server (``secagg[flower]``).

Written against Flower's Message API (``flwr>=1.20``: ``ServerApp`` + ``Strategy.start``,
``ClientApp`` with mods). Two pieces:

* :class:`SecAggFedAvg`, a drop-in for ``flwr.serverapp.strategy.FedAvg``. For every Flower
  round it creates a secagg round (admin API) over the sampled nodes and puts its id in the
  train config; it then adopts the aggregate the clients return, after checking that they
  agree with each other and with the digest the secagg server published.
* :class:`SecAggMod`, a client mod. Around the user's train function it sends
  ``trained - global`` weighted by ``num-examples`` through
  :meth:`Client.aggregate <secagg.service.client.Client.aggregate>` and replies with
  ``global + weighted mean`` instead of the site's own arrays: the Flower server (and
  SuperLink) never see an individual update, only the aggregate every participant gets.

Switching an app over is a config change: :func:`strategy_from_run_config` returns
:class:`SecAggFedAvg` when the run config names a secagg server and plain ``FedAvg``
otherwise, and the mod passes every message through untouched unless the strategy asked for
secure aggregation. See ``docs/integrations.md``.

Nodes are matched to enrolled participants by identity key: the strategy asks unknown nodes
(message type ``query.secagg_identity``, answered by the handler :meth:`SecAggMod.register`
installs) and looks the key up in the server's participant list; pass ``names=`` to map
node ids yourself (required for legacy ``client_fn`` apps, which cannot register queries).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from secagg.errors import ConfigurationError, SecAggError
from secagg.server import StageTimeouts
from secagg.service.admin import AdminClient
from secagg.service.client import Client, Policy
from secagg.service.coordinator import RoundSpec
from secagg.service.keyfile import read_identity
from secagg.service.tls import ClientTls

__all__ = [
    "IDENTITY_QUERY",
    "ROUND_ID_KEY",
    "SECAGG_RECORD",
    "SecAggFedAvg",
    "SecAggMod",
    "SecAggRound",
    "connect_from_config",
    "strategy_from_run_config",
]

log = logging.getLogger("secagg.service.integrations.flower")


def _flwr(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "secagg.service.integrations.flower needs Flower: pip install 'secagg[flower]'"
        ) from exc


_app = _flwr("flwr.app")
_strategy = _flwr("flwr.serverapp.strategy")

if TYPE_CHECKING:
    _FedAvg = object
else:
    _FedAvg = _strategy.FedAvg

IDENTITY_QUERY = "query.secagg_identity"
"""Message type the strategy sends to learn a node's identity key."""
ROUND_ID_KEY = "secagg-round-id"
"""Train-config entry carrying the secagg round id (hex)."""
SECAGG_RECORD = "secagg"
"""ConfigRecord of a reply: round id, aggregate digest, contributor count, identity key."""
ERROR_CODE = 2
"""``flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION``."""


def _fingerprint(arrays: Any) -> str:
    h = hashlib.sha256()
    for key in arrays:
        a = np.ascontiguousarray(arrays[key].numpy())
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _sums_digest(sums: np.ndarray[Any, Any]) -> str:
    return hashlib.sha256(np.asarray(sums).astype("<u8").tobytes()).hexdigest()


@dataclass(frozen=True)
class SecAggRound:
    """What one Flower training round did in secagg (:attr:`SecAggFedAvg.rounds`)."""

    server_round: int
    round_id: bytes
    status: str
    nodes: tuple[int, ...]
    contributors: tuple[int, ...]
    dropouts: tuple[str, ...]
    agreeing_replies: int
    replies: int


class SecAggFedAvg(_FedAvg):
    """FedAvg whose train rounds are aggregated by a secagg server.

    Parameters
    ----------
    admin:
        Admin connection to the secagg server (creates rounds, reads their status).
    job:
        secagg job name of the rounds (one running round per job).
    mode:
        Privacy mode of the rounds: ``masked`` (default), ``ckks`` or ``hybrid`` where the
        server offers them.
    clip, bits:
        Quantization: every delta value is clipped to ``[-clip, clip]`` and sent with
        ``bits`` bits, so the mean is exact to ``2 * clip / (2**bits - 1)``.
    max_weight:
        Largest ``num-examples`` a client may report (the weight lane's range).
    deadlines, neighbors, threshold, tolerate_dropout:
        Passed to :class:`~secagg.service.coordinator.RoundSpec`.
    names:
        Flower node id -> enrolled participant name; unknown nodes are asked for their
        identity key (see the module docstring).
    round_timeout:
        Seconds to wait for the secagg round to end after the replies arrived.
    **fedavg:
        Arguments of ``flwr.serverapp.strategy.FedAvg`` (sampling, record keys, metric
        aggregation).
    """

    if TYPE_CHECKING:  # set by FedAvg.__init__
        arrayrecord_key: str
        configrecord_key: str
        weighted_by_key: str
        train_metrics_aggr_fn: Callable[[list[Any], str], Any]

        def _check_and_log_replies(
            self, replies: list[Any], is_train: bool, validate: bool = True
        ) -> tuple[list[Any], list[Any]]: ...

    def __init__(
        self,
        admin: AdminClient,
        *,
        job: str = "flower",
        mode: str = "masked",
        clip: float = 1.0,
        bits: int = 16,
        max_weight: int = 65535,
        deadlines: StageTimeouts | None = None,
        neighbors: str = "auto",
        threshold: str = "auto",
        tolerate_dropout: float | None = None,
        names: Mapping[int, str] | None = None,
        round_timeout: float = 600.0,
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        self.admin = admin
        self.job = job
        self.mode = mode
        self.clip = clip
        self.bits = bits
        self.max_weight = max_weight
        self.deadlines = deadlines or StageTimeouts()
        self.neighbors = neighbors
        self.threshold = threshold
        self.tolerate_dropout = tolerate_dropout
        self.names: dict[int, str] = dict(names or {})
        self.round_timeout = round_timeout
        self.rounds: list[SecAggRound] = []
        self._pending: dict[int, tuple[bytes, tuple[int, ...]]] = {}

    @property
    def _base(self) -> Any:
        return cast(Any, super())

    def summary(self) -> None:
        """Log the configuration (FedAvg's, then secagg's)."""
        self._base.summary()
        log.info(
            "secagg: job %s, mode %s, clip %g, %d bits, max weight %d",
            self.job,
            self.mode,
            self.clip,
            self.bits,
            self.max_weight,
        )

    def configure_train(
        self, server_round: int, arrays: Any, config: Any, grid: Any
    ) -> Iterable[Any]:
        """FedAvg's train messages, restricted to enrolled nodes, with a fresh round id."""
        messages = list(self._base.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        names = self.participant_names(grid, [int(m.metadata.dst_node_id) for m in messages])
        kept = sorted(
            (m for m in messages if int(m.metadata.dst_node_id) in names),
            key=lambda m: int(m.metadata.dst_node_id),
        )
        for m in messages:
            if int(m.metadata.dst_node_id) not in names:
                log.warning(
                    "node %d is not an enrolled secagg participant; not sampled",
                    m.metadata.dst_node_id,
                )
        if len(kept) < 2:
            raise SecAggError(f"round {server_round}: fewer than 2 enrolled nodes sampled")
        nodes = tuple(int(m.metadata.dst_node_id) for m in kept)
        spec = RoundSpec(
            job=self.job,
            participants=[names[n] for n in nodes],
            dim=sum(int(np.prod(a.shape)) for a in arrays.values()),
            mode=self.mode,
            bits=self.bits,
            clip=self.clip,
            max_weight=self.max_weight,
            neighbors=self.neighbors,
            threshold=self.threshold,
            deadlines=self.deadlines,
            tolerate_dropout=self.tolerate_dropout,
        )
        rid = bytes(self.admin.create_round(spec).round_id)
        self._pending[server_round] = (rid, nodes)
        for m in kept:
            m.content[self.configrecord_key][ROUND_ID_KEY] = rid.hex()
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        """Adopt the aggregate the clients agree on and the secagg server vouches for."""
        pending = self._pending.pop(server_round, None)
        if pending is None:
            return cast(tuple[Any, Any], self._base.aggregate_train(server_round, replies))
        rid, nodes = pending
        valid, _errors = self._check_and_log_replies(list(replies), is_train=True)
        status = self.admin.wait(rid, timeout=self.round_timeout)
        agreeing: list[Any] = []
        if status.status == "completed":
            groups: dict[str, list[Any]] = {}
            for msg in valid:
                rec = msg.content.config_records.get(SECAGG_RECORD)
                if (
                    rec is None
                    or rec.get("round-id") != rid.hex()
                    or rec.get("aggregate-sha256") != status.aggregate_sha256
                ):
                    log.warning("node %d replied with another aggregate", msg.metadata.src_node_id)
                    continue
                arrays = msg.content[self.arrayrecord_key]
                groups.setdefault(_fingerprint(arrays), []).append(msg)
            if groups:
                agreeing = max(groups.values(), key=len)
            if len(groups) > 1:
                log.warning(
                    "round %d: clients returned %d different aggregates; adopting "
                    "the one %d of them agree on",
                    server_round,
                    len(groups),
                    len(agreeing),
                )
        self.rounds.append(
            SecAggRound(
                server_round=server_round,
                round_id=rid,
                status=status.status,
                nodes=nodes,
                contributors=tuple(nodes[c - 1] for c in status.contributors),
                dropouts=tuple(f"{d.name}@{d.stage}" for d in status.dropouts),
                agreeing_replies=len(agreeing),
                replies=len(valid),
            )
        )
        if not agreeing:
            log.warning(
                "round %d: no usable aggregate (secagg round %s %s: %s)",
                server_round,
                rid.hex(),
                status.status,
                status.abort_reason,
            )
            return None, None
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        metrics["secagg-contributors"] = len(status.contributors)
        metrics["secagg-dropouts"] = len(status.dropouts)
        return agreeing[0].content[self.arrayrecord_key], metrics

    def participant_names(self, grid: Any, nodes: Iterable[int]) -> dict[int, str]:
        """Enrolled names of ``nodes`` (asking the unknown ones for their identity key)."""
        unknown = [n for n in nodes if n not in self.names]
        if unknown:
            queries = [
                _app.Message(_app.RecordDict(), dst_node_id=n, message_type=IDENTITY_QUERY)
                for n in unknown
            ]
            by_key = {
                bytes(p.identity_key).hex(): p.name
                for p in self.admin.participants()
                if not p.revoked_at
            }
            for reply in grid.send_and_receive(queries, timeout=self.round_timeout):
                if reply.has_error():
                    continue
                rec = reply.content.config_records.get(SECAGG_RECORD)
                name = by_key.get(str(rec.get("identity-key", ""))) if rec is not None else None
                if name is not None:
                    self.names[int(reply.metadata.src_node_id)] = name
        return {n: self.names[n] for n in nodes if n in self.names}


def connect_from_config(context: Any) -> Client:
    """A :class:`Client` from a node's Flower config (the default of :class:`SecAggMod`).

    Keys, looked up in ``context.node_config`` then ``context.run_config``:
    ``secagg-server`` (``host:port``), ``secagg-identity`` (key file from
    ``secagg keygen``), ``secagg-ca`` (server CA) with optional ``secagg-cert`` /
    ``secagg-key`` for mutual TLS, and ``secagg-authority`` (the federation's
    ``authority.pub`` from the enrolment kit: every directory entry must be signed by it).
    INSECURE opt-ins, loopback tests only: ``secagg-insecure-no-tls=true`` (no CA),
    ``secagg-trust-server-directory=true`` (no authority).
    """

    def get(key: str) -> str | None:
        for source in (context.node_config, context.run_config):
            if key in source and source[key] != "":
                return str(source[key])
        return None

    target, identity = get("secagg-server"), get("secagg-identity")
    if not target or not identity:
        raise SecAggError("node config needs secagg-server and secagg-identity")
    ca, cert, key = get("secagg-ca"), get("secagg-cert"), get("secagg-key")
    tls = ClientTls(ca=ca, cert=cert, key=key) if ca else None
    insecure = _flag(get("secagg-insecure-no-tls"))
    if tls is None and not insecure:
        raise ConfigurationError(
            "node config needs secagg-ca (the server's CA); set secagg-insecure-no-tls=true "
            "only for loopback tests"
        )
    policy = Policy(
        authority=get("secagg-authority"),
        trust_server_directory=_flag(get("secagg-trust-server-directory")),
    )
    return Client(target, read_identity(identity), tls=tls, policy=policy, insecure_no_tls=insecure)


def _flag(value: str | None) -> bool:
    """A boolean node/run config value ("true"/"1"/"yes"; anything else is false)."""
    return value is not None and value.strip().lower() in {"true", "1", "yes"}


HE_CONTEXT_KEY = "secagg-ckks-secret"
"""Node config key of the secret CKKS context file's path (ckks and hybrid rounds)."""


class SecAggMod:
    """Client mod: replaces a train reply's arrays with the securely aggregated model.

    Parameters
    ----------
    connect:
        Builds this node's :class:`Client` from its Flower ``Context``
        (default :func:`connect_from_config`). Called per round; the client is closed after.
    policy:
        If given, replaces the policy of the clients ``connect`` returns.
    arrayrecord_key, configrecord_key, weighted_by_key:
        As in the strategy (FedAvg's defaults).
    he_context:
        ``ckks``/``hybrid`` rounds: the path of this node's secret CKKS context file
        (``secagg keygen --ckks``); by default the node config's ``secagg-ckks-secret``.
        Opened per round with :func:`secagg.ckks.open_secret_context`, so its decryption
        budget persists in the ledger beside it.
    """

    def __init__(
        self,
        connect: Callable[[Any], Client] = connect_from_config,
        *,
        policy: Policy | None = None,
        he_context: str | os.PathLike[str] | None = None,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        weighted_by_key: str = "num-examples",
    ) -> None:
        self.connect = connect
        self.policy = policy
        self.he_context = he_context
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.weighted_by_key = weighted_by_key

    def register(self, app: Any) -> None:
        """Install the ``query.secagg_identity`` handler on a ``ClientApp``."""
        app.query(IDENTITY_QUERY.split(".", 1)[1])(self.identity)

    def identity(self, msg: Any, context: Any) -> Any:
        """Reply with this node's public identity key (never the private one)."""
        client = self.connect(context)
        try:
            key = client.identity.public.hex()
        finally:
            client.close()
        content = _app.RecordDict({SECAGG_RECORD: _app.ConfigRecord({"identity-key": key})})
        return _app.Message(content, reply_to=msg)

    def __call__(self, msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
        round_hex = self._round_of(msg)
        if round_hex is None:
            return call_next(msg, context)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            return self._aggregate(msg, reply, context, bytes.fromhex(round_hex))
        except (SecAggError, KeyError, ValueError) as exc:
            reason = f"secure aggregation failed: {type(exc).__name__}: {exc}"
            log.warning("%s", reason)
            return _app.Message(_app.Error(code=ERROR_CODE, reason=reason), reply_to=msg)

    def _round_of(self, msg: Any) -> str | None:
        if msg.metadata.message_type.split(".")[0] != "train":
            return None
        config = msg.content.config_records.get(self.configrecord_key)
        value = None if config is None else config.get(ROUND_ID_KEY)
        return str(value) if value else None

    def _he_context(self, context: Any) -> str | os.PathLike[str] | None:
        if self.he_context is not None:
            return self.he_context
        for source in (context.node_config, context.run_config):
            value = source.get(HE_CONTEXT_KEY, "")
            if value != "":
                return str(value)
        return None

    def _aggregate(self, msg: Any, reply: Any, context: Any, round_id: bytes) -> Any:
        start = msg.content[self.arrayrecord_key]
        content = reply.content
        trained = (
            content[self.arrayrecord_key]
            if self.arrayrecord_key in content.array_records
            else next(iter(content.array_records.values()))
        )
        if list(trained.keys()) != list(start.keys()):
            raise ValueError("the trained arrays do not match the global arrays")
        metric_key, metrics = next(iter(content.metric_records.items()))
        weight = float(metrics[self.weighted_by_key])
        if weight != int(weight) or weight < 1:
            raise ValueError(f"{self.weighted_by_key} must be a positive integer, got {weight}")
        base = {k: start[k].numpy() for k in start}
        update = {
            k: trained[k].numpy().astype(np.float64) - base[k].astype(np.float64) for k in base
        }
        client = self.connect(context)
        if self.policy is not None:
            client.policy = self.policy
        try:
            agg = client.aggregate(
                round_id, update, weight=int(weight), he_context=self._he_context(context)
            )
        finally:
            client.close()
        averaged = {
            k: _app.Array(np.asarray(b.astype(np.float64) + agg.mean[k]).astype(b.dtype))
            for k, b in base.items()
        }
        record = _app.ConfigRecord(
            {
                "round-id": round_id.hex(),
                "aggregate-sha256": _sums_digest(agg.sums),
                "contributors": len(agg.contributors),
                "total-weight": int(agg.total_weight),
            }
        )
        out = _app.RecordDict(
            {
                self.arrayrecord_key: _app.ArrayRecord(averaged),
                metric_key: metrics,
                SECAGG_RECORD: record,
            }
        )
        return _app.Message(out, reply_to=msg)


def strategy_from_run_config(run_config: Mapping[str, Any], **fedavg: Any) -> Any:
    """``SecAggFedAvg`` if the run config names a secagg server, else plain ``FedAvg``.

    Run-config keys: ``secagg-server`` (``host:port`` of the admin API; empty or absent
    means plain FedAvg), ``secagg-mode``, ``secagg-clip``, ``secagg-bits``,
    ``secagg-max-weight``, ``secagg-job``, ``secagg-ca`` (required unless
    ``secagg-insecure-no-tls=true``, loopback tests only). The admin token comes from
    ``$SECAGG_ADMIN_TOKEN`` or the file named by ``secagg-admin-token-file``.
    """
    target = str(run_config.get("secagg-server", "") or "")
    if not target:
        return _strategy.FedAvg(**fedavg)
    token = os.environ.get("SECAGG_ADMIN_TOKEN", "")
    token_file = str(run_config.get("secagg-admin-token-file", "") or "")
    if token_file:
        token = Path(token_file).read_text().strip()
    if not token:
        raise SecAggError("set SECAGG_ADMIN_TOKEN or secagg-admin-token-file")
    ca = str(run_config.get("secagg-ca", "") or "")
    insecure = _flag(str(run_config.get("secagg-insecure-no-tls", "") or ""))
    if not ca and not insecure:
        raise ConfigurationError(
            "run config needs secagg-ca (the server's CA); set secagg-insecure-no-tls=true "
            "only for loopback tests"
        )
    admin = AdminClient(
        target, token, tls=ClientTls(ca=ca) if ca else None, insecure_no_tls=insecure
    )
    return SecAggFedAvg(
        admin,
        job=str(run_config.get("secagg-job", "flower")),
        mode=str(run_config.get("secagg-mode", "masked")),
        clip=float(run_config.get("secagg-clip", 1.0)),
        bits=int(run_config.get("secagg-bits", 16)),
        max_weight=int(run_config.get("secagg-max-weight", 65535)),
        **fedavg,
    )
