"""The client side: :class:`SecAggMod`, a ClientApp mod that sends a node's update through
secagg and replies with the aggregate, and :func:`connect_from_config`.

Everything that decides whom a node trusts (its identity, the CA, the federation authority,
the modes it joins, the INSECURE opt-ins, the CKKS secret) comes from the node's own
``node_config`` (``flower-supernode --node-config``), never from the run config: the run
config is written by whoever submits the run and reaches every node through the SuperLink,
which is on the server's side of the threat model. Only ``secagg-server`` (an address; the
node's CA still authenticates whatever answers) may come from the run config.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from secagg.dp.policy import DPPolicy
from secagg.errors import ConfigurationError, SecAggError
from secagg.service.client import Client, Policy
from secagg.service.keyfile import read_identity
from secagg.service.tls import ClientTls

from ._common import ERROR_CODE, IDENTITY_QUERY, ROUND_ID_KEY, SECAGG_RECORD, flag, log, sums_digest
from ._common import flwr_app as _app

__all__ = [
    "HE_CONTEXT_KEY",
    "NODE_KEYS",
    "SITE_KIT_KEY",
    "SecAggMod",
    "connect_from_config",
    "dp_policy_from_config",
]

HE_CONTEXT_KEY = "secagg-ckks-secret"
"""Node config key of the secret CKKS context file's path (ckks and hybrid rounds)."""
SITE_KIT_KEY = "secagg-site-kit"
"""Node config key of the site's kit directory (``secagg provision``)."""
MODES = ("masked", "hybrid", "ckks")

NODE_KEYS = frozenset(
    {
        "secagg-identity",
        "secagg-ca",
        "secagg-cert",
        "secagg-key",
        "secagg-server-name",
        "secagg-authority",
        "secagg-allowed-modes",
        "secagg-insecure-no-tls",
        "secagg-trust-server-directory",
        HE_CONTEXT_KEY,
        SITE_KIT_KEY,
        "secagg-dp-max-epsilon",
        "secagg-dp-delta",
        "secagg-dp-max-rounds",
        "secagg-dp-max-clip",
        "secagg-dp-min-withholders",
        "secagg-dp-state",
    }
)
"""Keys read from the node config only: a run config that sets one is ignored (logged)."""


def _node(context: Any, key: str) -> str | None:
    value = context.node_config.get(key, "")
    if value == "" or value is None:
        if context.run_config.get(key, "") not in ("", None):
            log.warning("run config sets %s; ignored (only the node config may set it)", key)
        return None
    return str(value)


def _target(context: Any) -> str | None:
    for source in (context.node_config, context.run_config):
        value = source.get("secagg-server", "")
        if value not in ("", None):
            return str(value)
    return None


def allowed_modes(value: str | None) -> frozenset[str] | None:
    """``secagg-allowed-modes`` ("masked,hybrid") as a set, or ``None`` when unset.

    Raises
    ------
    ConfigurationError
        Naming the key and the unknown mode.
    """
    if value is None:
        return None
    modes = frozenset(m.strip().lower() for m in value.split(",") if m.strip())
    bad = sorted(modes - set(MODES))
    if bad or not modes:
        raise ConfigurationError(
            f"node config secagg-allowed-modes: {value!r} is not a comma list of {', '.join(MODES)}"
        )
    return modes


def _node_number(context: Any, key: str, default: float | None, ok: Any, what: str) -> float | None:
    text = _node(context, key)
    if text is None:
        return default
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigurationError(f"node config {key}: expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise ConfigurationError(f"node config {key}: expected {what}, got {text!r}")
    return value


def _node_int(context: Any, key: str, default: int | None) -> int | None:
    value = _node_number(context, key, default, lambda x: x >= 0 and x == int(x), "an integer >= 0")
    return None if value is None else int(value)


def dp_policy_from_config(context: Any) -> tuple[DPPolicy | None, str | None]:
    """The site's DP requirement (node config only) and its state file.

    ``secagg-dp-max-epsilon`` (> 0; enables it), ``secagg-dp-delta`` (default 1e-5),
    ``secagg-dp-max-rounds`` (required), ``secagg-dp-max-clip`` (required),
    ``secagg-dp-min-withholders`` (default 0), ``secagg-dp-state`` (the site's own ledger
    file; required without a site kit, whose directory holds it by default: the client is
    rebuilt every round, so a ledger in memory would forget the rounds).

    Raises
    ------
    ConfigurationError
        Starting with ``node config KEY:``.
    """
    state = _node(context, "secagg-dp-state")
    eps = _node_number(context, "secagg-dp-max-epsilon", None, lambda x: x > 0, "a number > 0")
    if eps is None:
        for key in ("secagg-dp-max-rounds", "secagg-dp-max-clip", "secagg-dp-delta"):
            if _node(context, key) is not None:
                raise ConfigurationError(f"node config {key}: needs secagg-dp-max-epsilon")
        return None, state
    rounds = _node_int(context, "secagg-dp-max-rounds", None)
    clip = _node_number(context, "secagg-dp-max-clip", None, lambda x: x > 0, "a number > 0")
    for key, value in (("secagg-dp-max-rounds", rounds), ("secagg-dp-max-clip", clip)):
        if value is None or value == 0:
            raise ConfigurationError(f"node config {key}: needed with secagg-dp-max-epsilon")
    delta = _node_number(
        context, "secagg-dp-delta", 1e-5, lambda x: 0 < x < 1, "a number in (0, 1)"
    )
    assert rounds is not None and clip is not None and delta is not None
    policy = DPPolicy(
        max_epsilon=eps,
        delta=delta,
        max_rounds=rounds,
        max_clip=clip,
        min_withholders=_node_int(context, "secagg-dp-min-withholders", 0) or 0,
    )
    return policy, state


def connect_from_config(context: Any) -> Client:
    """A :class:`Client` from a node's Flower config (the default of :class:`SecAggMod`).

    With ``secagg-site-kit`` (the site's kit from ``secagg provision``) the client comes from
    :meth:`Client.from_kit`: identity, CA and mTLS certificate, authority, the kit's policy
    and, on key holders, the CKKS secret context. The node config's ``secagg-server``
    overrides the kit's address and ``secagg-allowed-modes`` its modes.

    Otherwise, keys of ``context.node_config``: ``secagg-identity`` (key file from
    ``secagg keygen``), ``secagg-ca`` (server CA) with optional ``secagg-cert`` /
    ``secagg-key`` for mutual TLS and ``secagg-server-name``, ``secagg-authority`` (the
    federation's ``authority.pub``: every directory entry must be signed by it),
    ``secagg-allowed-modes`` (default ``masked,hybrid``); ``secagg-server`` (``host:port``)
    from the node config, else the run config. INSECURE opt-ins, loopback tests only:
    ``secagg-insecure-no-tls=true`` (no CA), ``secagg-trust-server-directory=true`` (no
    authority). See the module docstring for why the run config cannot set these.
    """
    modes = allowed_modes(_node(context, "secagg-allowed-modes"))
    dp, dp_state = dp_policy_from_config(context)
    kit = _node(context, SITE_KIT_KEY)
    if kit is not None:  # the kit's address unless the node itself names another
        extra: dict[str, Any] = {} if modes is None else {"allowed_modes": sorted(modes)}
        if dp is not None:
            extra["dp"] = dp
        if dp_state is not None:
            extra["dp_state"] = dp_state
        own = context.node_config.get("secagg-server", "")
        return Client.from_kit(
            kit,
            target=str(own) if own else None,
            server_name=_node(context, "secagg-server-name"),
            **extra,
        )
    target = _target(context)
    identity = _node(context, "secagg-identity")
    if not target or not identity:
        raise ConfigurationError(
            "node config needs secagg-site-kit, or secagg-server and secagg-identity"
        )
    ca, cert, key = (_node(context, k) for k in ("secagg-ca", "secagg-cert", "secagg-key"))
    tls = ClientTls(ca=ca, cert=cert, key=key, server_name=_node(context, "secagg-server-name"))
    insecure = flag(_node(context, "secagg-insecure-no-tls"))
    if not ca and not insecure:
        raise ConfigurationError(
            "node config needs secagg-ca (the server's CA); set secagg-insecure-no-tls=true "
            "only for loopback tests"
        )
    fields: dict[str, Any] = {} if modes is None else {"allowed_modes": modes}
    if dp is not None:
        if dp_state is None:
            raise ConfigurationError(
                "node config secagg-dp-state: a DP policy needs the site's ledger file "
                "(the client is rebuilt every round; a site kit keeps it by default)"
            )
        fields.update(dp=dp, dp_state=dp_state)
    policy = Policy(
        authority=_node(context, "secagg-authority"),
        trust_server_directory=flag(_node(context, "secagg-trust-server-directory")),
        **fields,
    )
    return Client(
        target,
        read_identity(identity),
        tls=tls if ca else None,
        policy=policy,
        insecure_no_tls=insecure and not ca,
    )


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
        (``secagg keygen --ckks``); by default the node config's ``secagg-ckks-secret``, or
        a key holder's site kit (``secagg-site-kit``).
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
        return _node(context, HE_CONTEXT_KEY)

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
            if client.join(round_id).params.dp is not None:
                weight = 1  # DP rounds sum clipped updates unweighted
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
                "aggregate-sha256": sums_digest(agg.sums),
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
