"""Run-config keys of the server side: the admin connection and the round parameters.

Flower hands a ServerApp its run config (``[tool.flwr.app.config]`` of the app's
``pyproject.toml``, overridden by ``flwr run --run-config``) as TOML scalars or strings.
Every ``secagg-*`` key is parsed here, once, and a bad value is one
:class:`~secagg.errors.ConfigurationError` whose message starts with the key's name and says
what was expected and what was given; an unknown ``secagg-*`` key (a typo such as
``secagg-treshold``) is refused the same way instead of being silently ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from secagg.errors import ConfigurationError
from secagg.quantize import MAX_BITS
from secagg.server import StageTimeouts
from secagg.service.admin import AdminClient
from secagg.service.dpspec import DPSpec
from secagg.service.keyfile import read_identity
from secagg.service.tls import ClientTls

from ._common import flag
from ._common import flwr_strategy as _strategy
from .mod import MODES, NODE_KEYS
from .strategy import SecAggFedAvg

__all__ = [
    "DP_KEYS",
    "RUN_CONFIG_KEYS",
    "admin_from_run_config",
    "dp_from_run_config",
    "round_options_from_run_config",
    "strategy_from_run_config",
]

_STAGES = tuple(f.name for f in fields(StageTimeouts))
_STAGE_KEYS = {f"secagg-timeout-{s.replace('_', '-')}": s for s in _STAGES}

ADMIN_KEYS = frozenset(
    {
        "secagg-server",
        "secagg-operator-kit",
        "secagg-operator",
        "secagg-operator-key",
        "secagg-admin-token-file",
        "secagg-ca",
        "secagg-cert",
        "secagg-key",
        "secagg-server-name",
        "secagg-insecure-no-tls",
    }
)
ROUND_KEYS = frozenset(
    {
        "secagg-job",
        "secagg-mode",
        "secagg-clip",
        "secagg-bits",
        "secagg-max-weight",
        "secagg-neighbors",
        "secagg-threshold",
        "secagg-tolerate-dropout",
        "secagg-stage-timeout",
        "secagg-round-timeout",
        "secagg-ckks-server",
        *_STAGE_KEYS,
    }
)
DP_KEYS = frozenset(
    {
        "secagg-dp-epsilon",
        "secagg-dp-delta",
        "secagg-dp-rounds",
        "secagg-dp-clip",
        "secagg-dp-max-withholders",
    }
)
"""Distributed DP of every round (docs/dp.md): the budget the server calibrates and charges."""
RUN_CONFIG_KEYS = ADMIN_KEYS | ROUND_KEYS | DP_KEYS
"""Every ``secagg-*`` key the server side reads (docs/integrations.md lists them)."""


def _bad(key: str, expected: str, value: object) -> ConfigurationError:
    return ConfigurationError(f"run config {key}: expected {expected}, got {value!r}")


def _str(rc: Mapping[str, Any], key: str) -> str | None:
    value = rc.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _bad(key, "a string", value)
    return value


def _get(rc: Mapping[str, Any], key: str, default: Any) -> Any:
    """``rc[key]``, or ``default`` when absent or empty (an app's pyproject lists every key
    ``flwr run --run-config`` may override, with ``""`` for "unset")."""
    value = rc.get(key)
    return default if value is None or value == "" else value


def _int(rc: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = _get(rc, key, default)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _bad(key, f"an integer in {lo}..{hi}", rc[key]) from None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(key, f"an integer in {lo}..{hi}", _get(rc, key, default))
    return value


def _float(
    rc: Mapping[str, Any], key: str, default: float | None, what: str, ok: Any
) -> float | None:
    value = _get(rc, key, default)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _bad(key, what, rc[key]) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(key, what, value)
    number = float(value)
    if not math.isfinite(number) or not ok(number):
        raise _bad(key, what, _get(rc, key, default))
    return number


def _count(rc: Mapping[str, Any], key: str, words: tuple[str, ...]) -> str:
    value = _get(rc, key, "auto")
    text = str(value).strip().lower() if not isinstance(value, bool) else ""
    if text in words:
        return text
    if text.isdigit() and int(text) >= 1:
        return text
    raise _bad(key, f"{' or '.join(words)} or a positive integer", value)


def _positive(x: float) -> bool:
    return x > 0


def round_options_from_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`SecAggFedAvg` keywords the run config sets (validated).

    Keys: ``secagg-job`` (default ``flower``); ``secagg-mode`` (``masked``, ``hybrid`` or
    ``ckks``); ``secagg-clip`` (> 0, default 1.0); ``secagg-bits`` (1..32, default 16);
    ``secagg-max-weight`` (>= 1, default 65535: the largest ``num-examples``);
    ``secagg-neighbors`` (``auto``, ``all`` or the SecAgg+ degree k, not counting the client
    itself); ``secagg-threshold`` (``auto`` or the Shamir threshold t, counting the client's
    own share); ``secagg-tolerate-dropout`` (0 <= f < 1); ``secagg-stage-timeout`` (seconds,
    every stage) and ``secagg-timeout-<stage>`` (one stage: ``advertise-keys``,
    ``share-keys``, ``masked-input``, ``consistency``, ``unmasking``, ``encrypted-input``,
    ``reveal-nonces``); ``secagg-round-timeout`` (seconds the strategy waits for a round's
    end); ``secagg-ckks-server`` (the server's CKKS context file, required by ``hybrid`` and
    ``ckks``). Explicit ``neighbors``/``threshold`` below the security target are passed on:
    the server warns and every site's policy refuses them.

    Raises
    ------
    ConfigurationError
        A value of the wrong type or range, or an unknown ``secagg-*`` key; the message
        starts with ``run config KEY:``.
    """
    unknown = sorted(k for k in run_config if k.startswith("secagg-") and k not in RUN_CONFIG_KEYS)
    node_only = [k for k in unknown if k in NODE_KEYS]
    if node_only:
        raise ConfigurationError(
            f"run config {node_only[0]}: a node-config key (flower-supernode --node-config); "
            "nodes never take it from the run config"
        )
    if unknown:
        raise ConfigurationError(
            f"run config {unknown[0]}: not a secagg key "
            f"(known: {', '.join(sorted(RUN_CONFIG_KEYS))})"
        )
    mode = (_str(run_config, "secagg-mode") or "masked").strip().lower()
    if mode not in MODES:
        raise _bad("secagg-mode", " or ".join(MODES), run_config.get("secagg-mode"))
    opts: dict[str, Any] = {
        "job": _str(run_config, "secagg-job") or "flower",
        "mode": mode,
        "clip": _float(run_config, "secagg-clip", 1.0, "a positive number", _positive),
        "bits": _int(run_config, "secagg-bits", 16, 1, MAX_BITS),
        "max_weight": _int(run_config, "secagg-max-weight", 65535, 1, 1 << 32),
        "neighbors": _count(run_config, "secagg-neighbors", ("auto", "all")),
        "threshold": _count(run_config, "secagg-threshold", ("auto",)),
        "tolerate_dropout": _float(
            run_config,
            "secagg-tolerate-dropout",
            None,
            "a fraction in [0, 1)",
            lambda x: 0.0 <= x < 1.0,
        ),
        "round_timeout": _float(
            run_config, "secagg-round-timeout", 600.0, "a positive number of seconds", _positive
        ),
    }
    every = _float(
        run_config, "secagg-stage-timeout", None, "a positive number of seconds", _positive
    )
    stages = {}
    for key, stage in _STAGE_KEYS.items():
        seconds = _float(run_config, key, None, "a positive number of seconds", _positive)
        if seconds is not None:
            stages[stage] = seconds
    if every is not None or stages:
        base = StageTimeouts.uniform(every) if every is not None else StageTimeouts()
        opts["deadlines"] = StageTimeouts(**{s: stages.get(s, getattr(base, s)) for s in _STAGES})
    dp = dp_from_run_config(run_config)
    if dp is not None:
        opts["dp"] = dp
    ckks_server = _str(run_config, "secagg-ckks-server")
    if mode in ("hybrid", "ckks"):
        if ckks_server is None:
            raise ConfigurationError(
                f"run config secagg-ckks-server: a {mode} round needs the server's CKKS "
                "context file (fed.ckks-server from secagg keygen --ckks, or the server "
                "kit's ckks.ckks-server)"
            )
        try:
            opts["he_context"] = Path(ckks_server).read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"run config secagg-ckks-server: cannot read {ckks_server}: {exc.strerror}"
            ) from None
    return opts


def dp_from_run_config(run_config: Mapping[str, Any]) -> DPSpec | None:
    """The rounds' DP budget: ``secagg-dp-epsilon`` (> 0; enables DP), ``secagg-dp-delta``
    (default 1e-5), ``secagg-dp-rounds`` (rounds the budget covers, required with DP),
    ``secagg-dp-clip`` (default ``secagg-clip``), ``secagg-dp-max-withholders`` (default 0).

    Raises
    ------
    ConfigurationError
        Starting with ``run config KEY:``.
    """
    eps = _float(run_config, "secagg-dp-epsilon", None, "a positive number", _positive)
    others = [k for k in sorted(DP_KEYS) if _get(run_config, k, None) is not None]
    if eps is None:
        if others:
            raise ConfigurationError(f"run config {others[0]}: needs secagg-dp-epsilon")
        return None
    if _get(run_config, "secagg-dp-rounds", None) is None:
        raise ConfigurationError(
            "run config secagg-dp-rounds: needed with secagg-dp-epsilon (the rounds the "
            "budget covers)"
        )
    delta = _float(run_config, "secagg-dp-delta", 1e-5, "a number in (0, 1)", lambda x: 0 < x < 1)
    clip = _float(run_config, "secagg-dp-clip", None, "a positive number", _positive)
    if clip is None:
        clip = _float(run_config, "secagg-clip", 1.0, "a positive number", _positive)
    assert delta is not None and clip is not None
    return DPSpec(
        epsilon=eps,
        delta=delta,
        rounds=_int(run_config, "secagg-dp-rounds", 1, 1, 1 << 20),
        clip=clip,
        max_withholders=_int(run_config, "secagg-dp-max-withholders", 0, 0, 1 << 20),
    )


def admin_from_run_config(run_config: Mapping[str, Any]) -> AdminClient:
    """The admin connection the run config describes (TLS by default, mTLS with a cert).

    ``secagg-operator-kit`` (an operator kit from ``secagg provision``): the kit's CA,
    client certificate (mutual TLS), operator key and server address; ``secagg-server`` and
    ``secagg-server-name`` override the address and the name checked in the server
    certificate. Without a kit: ``secagg-server`` (``host:port``), ``secagg-ca`` (the
    server's CA), ``secagg-cert`` + ``secagg-key`` (client certificate for mutual TLS),
    ``secagg-server-name``; credentials from ``secagg-operator`` + ``secagg-operator-key``
    (signed calls) or the DEPRECATED shared token (``$SECAGG_ADMIN_TOKEN`` or
    ``secagg-admin-token-file``). ``secagg-insecure-no-tls=true`` (INSECURE, loopback
    tests) connects without a CA.

    Raises
    ------
    ConfigurationError
        Naming the key that is missing or wrong.
    """
    target = _str(run_config, "secagg-server")
    server_name = _str(run_config, "secagg-server-name")
    kit = _str(run_config, "secagg-operator-kit")
    if kit is not None:
        for name in ("secagg-ca", "secagg-cert", "secagg-key", "secagg-operator-key"):
            if _str(run_config, name) is not None:
                raise ConfigurationError(
                    f"run config {name}: comes from secagg-operator-kit; set one or the other"
                )
        return AdminClient.from_kit(kit, target=target, server_name=server_name)
    if target is None:
        raise ConfigurationError("run config secagg-server: the admin API's host:port is missing")
    ca, cert, key = (_str(run_config, k) for k in ("secagg-ca", "secagg-cert", "secagg-key"))
    if (cert is None) != (key is None):
        missing = "secagg-key" if key is None else "secagg-cert"
        raise ConfigurationError(
            f"run config {missing}: a client certificate and its key go together"
        )
    insecure = flag(run_config.get("secagg-insecure-no-tls"))
    if ca is None and not insecure:
        raise ConfigurationError(
            "run config secagg-ca: the server's CA is needed (TLS is the default); set "
            "secagg-insecure-no-tls=true only for loopback tests"
        )
    if ca is None and cert is not None:
        raise ConfigurationError("run config secagg-cert: mutual TLS needs secagg-ca too")
    tls = ClientTls(ca=ca, cert=cert, key=key, server_name=server_name) if ca else None
    operator_name, operator_key = (
        _str(run_config, "secagg-operator"),
        _str(run_config, "secagg-operator-key"),
    )
    if (operator_name is None) != (operator_key is None):
        missing = "secagg-operator-key" if operator_key is None else "secagg-operator"
        raise ConfigurationError(f"run config {missing}: an operator needs a name and a key")
    operator = (
        (operator_name, read_identity(operator_key))
        if operator_name is not None and operator_key is not None
        else None
    )
    token = os.environ.get("SECAGG_ADMIN_TOKEN", "")
    token_file = _str(run_config, "secagg-admin-token-file")
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigurationError(
                f"run config secagg-admin-token-file: cannot read {token_file}: {exc.strerror}"
            ) from None
    if operator is None and not token:
        raise ConfigurationError(
            "run config secagg-operator-kit: no admin credentials (give an operator kit, "
            "secagg-operator + secagg-operator-key, or $SECAGG_ADMIN_TOKEN / "
            "secagg-admin-token-file)"
        )
    return AdminClient(target, token, tls=tls, insecure_no_tls=insecure, operator=operator)


def strategy_from_run_config(run_config: Mapping[str, Any], **fedavg: Any) -> Any:
    """``SecAggFedAvg`` if the run config names a secagg server, else plain ``FedAvg``.

    Secure aggregation is on when ``secagg-server`` or ``secagg-operator-kit`` is set
    (non-empty). The admin connection comes from :func:`admin_from_run_config`, the round
    parameters from :func:`round_options_from_run_config` (both validate every key first);
    ``fedavg`` keywords go to FedAvg (sampling, record keys, metric aggregation) and may
    also override a round option (``deadlines=StageTimeouts(...)``).
    """
    if not _str(run_config, "secagg-server") and not _str(run_config, "secagg-operator-kit"):
        return _strategy.FedAvg(**fedavg)
    options = round_options_from_run_config(run_config)
    admin = admin_from_run_config(run_config)
    return SecAggFedAvg(admin, **{**options, **fedavg})
