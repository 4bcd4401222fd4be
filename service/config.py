"""Server configuration: defaults, a TOML file, and environment variables.

Precedence: command-line flags over ``SECAGG_*`` environment variables over the file over
defaults. The admin token is never read from a flag (it would show in ``ps``): set
``SECAGG_ADMIN_TOKEN`` or ``admin_token_file``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from secagg.errors import ConfigurationError
from secagg.server import StageTimeouts
from secagg.service.serde import DEFAULT_CHUNK_BYTES
from secagg.service.tls import ServerTls

__all__ = ["ServerConfig", "is_loopback", "load_config", "read_token_file"]


def is_loopback(listen: str) -> bool:
    """Whether ``host:port`` binds a loopback address only (127.0.0.0/8, ::1, localhost)."""
    host = listen.rsplit(":", 1)[0].strip("[]").lower() if ":" in listen else listen.lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``secagg serve`` needs.

    Attributes
    ----------
    listen:
        ``host:port`` (port 0 picks a free one).
    store:
        SQLite file (``":memory:"`` for tests).
    admin_token:
        Bearer token of the admin API; ``None`` disables it.
    tls:
        Server certificate (and client CA for mutual TLS). ``None`` serves plaintext gRPC,
        allowed on a loopback address only, unless ``insecure_no_tls``.
    insecure_no_tls:
        INSECURE opt-in (``--insecure-no-tls``): serve plaintext gRPC on a non-loopback
        address (behind a TLS-terminating proxy on the same host, say).
    deadlines:
        Default stage deadlines of new rounds (a round may set its own).
    max_chunk_bytes:
        Largest chunk accepted or sent.
    workers:
        Threads running round work (message handling, unmasking).
    retain_seconds:
        How long a finished round stays in memory for clients fetching the result.
    clock_skew:
        Seconds a signed call's timestamp may differ from the server clock.
    hello_timeout:
        Seconds a ``Session`` stream may stay open without its first frame (``Hello``)
        before the server closes it (``DEADLINE_EXCEEDED``).
    disconnect_grace:
        Seconds a participant whose last ``Session`` stream closed has to reconnect (it
        then continues where it was); after that the round treats it as dropped at once
        instead of waiting out the stage deadline.
    max_streams_per_participant:
        Open ``Session`` streams one participant may hold in one round; more are refused
        (``RESOURCE_EXHAUSTED``). Two leave room for a reconnect while the server has not yet
        noticed that the old connection died.
    """

    listen: str = "127.0.0.1:50051"
    store: str = "secagg.db"
    admin_token: str | None = None
    tls: ServerTls | None = None
    insecure_no_tls: bool = False
    deadlines: StageTimeouts = field(default_factory=StageTimeouts)
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    workers: int = 4
    retain_seconds: float = 600.0
    clock_skew: float = 120.0
    hello_timeout: float = 10.0
    max_streams_per_participant: int = 2
    disconnect_grace: float = 3.0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    log_level: str = "info"
    log_format: str = "json"
    shutdown_grace: float = 10.0
    engine: str = "local"
    """Where group rounds of sharded rounds run: ``local`` (this process) or ``ray``
    (Ray actors; ``secagg[ray]``; docs/sharding.md, "Over gRPC")."""
    ray_workers: int = 2
    """``engine = "ray"``: aggregator actors per sharded round."""
    ray_address: str | None = None
    """``engine = "ray"``: an existing cluster (default: start a local one)."""

    def __post_init__(self) -> None:
        if not 1024 <= self.max_chunk_bytes <= 64 << 20:
            raise ConfigurationError("max_chunk_bytes must be in 1 KiB..64 MiB")
        if self.workers < 1:
            raise ConfigurationError("workers must be >= 1")
        if self.engine not in ("local", "ray") or self.ray_workers < 1:
            raise ConfigurationError(
                f"engine must be local or ray (got {self.engine!r}), ray_workers >= 1"
            )
        if self.tls is None and not self.insecure_no_tls and not is_loopback(self.listen):
            raise ConfigurationError(
                f"listening on {self.listen} without TLS: give --tls-cert/--tls-key "
                "(or [tls] in the config), or --insecure-no-tls to serve plaintext anyway"
            )
        if not self.hello_timeout > 0:
            raise ConfigurationError("hello_timeout must be > 0 seconds")
        if not 0 < self.disconnect_grace < float("inf"):
            raise ConfigurationError("disconnect_grace must be a positive number of seconds")
        if self.max_streams_per_participant < 1:
            raise ConfigurationError("max_streams_per_participant must be >= 1")


_TLS_KEYS = {"cert": "str", "key": "str", "client_ca": "str | None", "bind_names": "bool"}
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}


def read_token_file(path: str | Path) -> str:
    """The admin token in ``path`` (surrounding whitespace dropped; empty is an error)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the admin token file {path}: {exc.strerror}"
        ) from None
    if not token:
        raise ConfigurationError(f"the admin token file {path} is empty")
    return token


def _check_type(path: str | Path, key: str, value: Any, annotation: str) -> None:
    """Refuse ``key = value`` unless it has the field's type (``listen = 18460``, say)."""
    wanted = [t.strip() for t in annotation.split("|")]
    allowed = tuple(c for t in wanted for c in _PYTHON_TYPES.get(t, ()))
    if not allowed:
        return  # a structured field (tls, deadlines) is read from its own section
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        kinds = " or ".join(t for t in wanted if t != "None")
        raise ConfigurationError(
            f"{path}: {key} must be {'a' if kinds != 'int' else 'an'} {kinds}, got {value!r}"
        )


def _section(path: str | Path, name: str, raw: Any, keys: dict[str, str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{path}: [{name}] must be a table")
    unknown = set(raw) - set(keys)
    if unknown:
        raise ConfigurationError(
            f"{path}: unknown keys in [{name}]: {sorted(unknown)} (known: {sorted(keys)})"
        )
    for key, value in raw.items():
        _check_type(path, f"{name}.{key}", value, keys[key])
    return dict(raw)


def load_config(path: str | Path | None = None, **overrides: Any) -> ServerConfig:
    """Defaults, then the TOML file at ``path``, then ``SECAGG_*`` variables, then overrides.

    The file holds the fields of :class:`ServerConfig` at top level, plus ``[tls]``
    (``cert``, ``key``, ``client_ca``, ``bind_names``), ``[deadlines]`` (seconds per stage)
    and ``admin_token_file``; the override ``admin_token_file=`` (``--admin-token-file``)
    reads the token from a file. Every key is checked for its type, so a typo is one line.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read config {path}: {exc}") from exc
        known = {f.name for f in fields(ServerConfig)}
        token_file = raw.pop("admin_token_file", None)
        if token_file:
            values["admin_token"] = read_token_file(token_file)
        tls = raw.pop("tls", None)
        if tls:
            values["tls"] = ServerTls(**_section(path, "tls", tls, _TLS_KEYS))
        deadlines = raw.pop("deadlines", None)
        if deadlines:
            stages = {f.name: "float" for f in fields(StageTimeouts)}
            values["deadlines"] = replace(
                StageTimeouts(), **_section(path, "deadlines", deadlines, stages)
            )
        unknown = set(raw) - known
        if unknown:
            raise ConfigurationError(f"{path}: unknown config keys: {sorted(unknown)}")
        types = {f.name: str(f.type) for f in fields(ServerConfig)}
        for key, value in raw.items():
            _check_type(path, key, value, types[key])
        values.update(raw)
    env_token = os.environ.get("SECAGG_ADMIN_TOKEN")
    if env_token:
        values["admin_token"] = env_token
    if "SECAGG_STORE" in os.environ:
        values["store"] = os.environ["SECAGG_STORE"]
    token_path = overrides.pop("admin_token_file", None)
    if token_path is not None:
        values["admin_token"] = read_token_file(token_path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServerConfig(**values)
    except TypeError as exc:
        raise ConfigurationError(f"bad configuration: {exc}") from exc
