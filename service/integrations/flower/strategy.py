"""The server side: :class:`SecAggFedAvg`, a FedAvg whose train rounds secagg aggregates."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from secagg.errors import ConfigurationError, SecAggError
from secagg.server import StageTimeouts
from secagg.service.admin import AdminClient
from secagg.service.coordinator import RoundSpec
from secagg.service.dpspec import DPSpec

from ._common import IDENTITY_QUERY, ROUND_ID_KEY, SECAGG_RECORD, fingerprint, log
from ._common import flwr_app as _app
from ._common import flwr_strategy as _strategy

__all__ = ["SecAggFedAvg", "SecAggRound"]

if TYPE_CHECKING:
    _FedAvg = object
else:
    _FedAvg = _strategy.FedAvg


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
    he_context:
        ``ckks`` / ``hybrid``: the server's CKKS context (``fed.ckks-server`` from
        ``secagg keygen --ckks``, or the server kit's ``ckks.ckks-server``): parameters and
        key epoch, no key of any kind. It is made for one round shape (mode, number of
        participants, ``dim``, ``bits``, ``max_weight``), so every Flower round must sample
        that many nodes.
    dp:
        Distributed DP of every round (:class:`~secagg.service.dpspec.DPSpec`; run config
        ``secagg-dp-*``): the server calibrates each round's noise for its ``n`` and
        threshold and charges it to the ledger of ``job``; the rounds are unweighted (each
        site's clipped update counts once).
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
        he_context: bytes | None = None,
        dp: DPSpec | None = None,
        **fedavg: Any,
    ) -> None:
        if mode in ("ckks", "hybrid") and not he_context:
            raise ConfigurationError(
                f"a {mode} round needs the server's CKKS context (he_context=, run config "
                "secagg-ckks-server)"
            )
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
        self.he_context = he_context
        self.dp = dp
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
            he_context=self.he_context if self.mode in ("ckks", "hybrid") else None,
            dp=self.dp,
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
            # masked: the server publishes the digest of the lane sums, which every client
            # recomputes. ckks/hybrid: it publishes the digest of the *encrypted* sum (it never
            # sees the plaintext), so the replies are held to each other and to the contributor
            # count instead.
            digest = status.aggregate_sha256 if self.mode == "masked" else None
            for msg in valid:
                rec = msg.content.config_records.get(SECAGG_RECORD)
                if (
                    rec is None
                    or rec.get("round-id") != rid.hex()
                    or (digest is not None and rec.get("aggregate-sha256") != digest)
                    or rec.get("contributors") != len(status.contributors)
                ):
                    log.warning("node %d replied with another aggregate", msg.metadata.src_node_id)
                    continue
                arrays = msg.content[self.arrayrecord_key]
                groups.setdefault(fingerprint(arrays), []).append(msg)
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
