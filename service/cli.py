"""The ``secagg`` command line: serve, enroll, keygen, authority, audit, round, job,
simulate, provision, operator, site, privacy."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from secagg.errors import ConfigurationError, SecAggError, StoreError

# Exit statuses: defined once, in secagg.service.errors.EXIT_CODES (docs/operations.md).
EXIT_CONFIG, EXIT_ABORTED, EXIT_AUDIT = 2, 3, 4

if TYPE_CHECKING:
    from secagg.service._gen.admin_pb2 import JobStatus, RoundStatus
    from secagg.service.admin import AdminClient
    from secagg.simulate import SimulationConfig

__all__ = ["DEFAULT_MAX_WEIGHT", "main"]

DEFAULT_MAX_WEIGHT = 65535  # secagg.quantize.FEDAVG_MAX_WEIGHT (a test checks they agree)
"""Default ``--max-weight`` of ``round create`` and ``keygen --ckks``: FedAvg weights are
sample counts (``fedavg.step(num_samples=...)``), so up to 65535 samples per site fit; it
costs 16 bits of lane per value. The client policy accepts up to 2^32 (``Policy.max_weight``).
"""


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from secagg.simulate import DROP_STAGES

    p = sub.add_parser("simulate", help="run one whole round in process with a fake clock")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--dim", type=int, default=10_000)
    p.add_argument("--dropout", type=float, default=0.1, help="fraction of clients that drop")
    p.add_argument("--drop-stage", default="random", choices=[*list(DROP_STAGES)[1:], "random"])
    p.add_argument("--mode", default="masked", choices=["masked", "ckks", "hybrid"])
    p.add_argument("--bits", type=int, default=16)
    p.add_argument("--clip", type=float, default=8.0)
    p.add_argument("--max-weight", type=int, default=1)
    p.add_argument("--neighbors", default="auto", help="auto, all, or a degree k")
    p.add_argument("--threshold", default="auto", help="auto or t")
    p.add_argument(
        "--tolerate-dropout",
        type=float,
        default=None,
        help="dropout fraction the auto parameters are chosen for",
    )
    p.add_argument(
        "--tolerate-corrupt",
        type=float,
        default=None,
        help="corrupt-client fraction the auto parameters are chosen for",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the test data and dropouts")
    p.add_argument(
        "--spoil",
        type=lambda v: tuple(int(c) for c in v.split(",") if c),
        default=(),
        help="hybrid: comma-separated client ids that upload out-of-range ciphertexts",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    e = p.add_argument_group("sharded rounds (docs/sharding.md; --engine ray needs secagg[ray])")
    e.add_argument(
        "--engine",
        default=None,
        choices=["local", "ray"],
        help="run a sharded round: groups in this process (local) or on Ray actors (ray)",
    )
    e.add_argument("--groups", type=int, default=None, help="number of groups (default 1)")
    e.add_argument("--ray-address", default=None, help="attach to this Ray cluster")
    e.add_argument("--ray-workers", type=int, default=2, help="aggregator actors (default 2)")
    e.add_argument(
        "--on-group-abort",
        default="publish",
        choices=["publish", "abort"],
        help="job policy when a group aborts: publish the others' sum or abort the round",
    )
    e.add_argument(
        "--kill-worker",
        type=int,
        default=None,
        help="fault drill: ray.kill this worker after its first steps (local: fail this group)",
    )
    d = p.add_argument_group("distributed DP (docs/dp.md; needs secagg[dp])")
    d.add_argument("--dp-epsilon", type=float, default=None, help="target epsilon (enables DP)")
    d.add_argument("--dp-delta", type=float, default=1e-5)
    d.add_argument("--rounds", type=int, default=1, help="rounds the DP budget covers")
    d.add_argument("--dp-clip", type=float, default=None, help="L2 clip norm (default: --clip)")
    d.add_argument(
        "--dp-prepare",
        action="store_true",
        help="clients draw their noise before the round (dp.prepare_seconds; docs/dp.md Speed)",
    )
    g = p.add_argument_group("transport (--transport grpc: a real server and clients on loopback)")
    g.add_argument("--transport", default="inprocess", choices=["inprocess", "grpc"])
    g.add_argument(
        "--workers",
        default="threads",
        choices=["threads", "processes", "async"],
        help="clients as threads here, threads of worker processes, or asyncio coroutines "
        "of worker processes (async: for hundreds of clients; docs/benchmarks.md)",
    )
    g.add_argument("--processes", type=int, default=None, help="worker processes (default: cores)")
    g.add_argument("--stage-timeout", type=float, default=None, help="seconds per stage")
    g.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="INSECURE baseline: send inputs unmasked (benchmarks only)",
    )


def _run_simulate(args: argparse.Namespace) -> int:
    from secagg.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(
        clients=args.clients,
        dim=args.dim,
        dropout=args.dropout,
        drop_stage=args.drop_stage,
        mode=args.mode,
        bits=args.bits,
        clip=args.clip,
        neighbors=args.neighbors,
        threshold=args.threshold,
        seed=args.seed,
        max_weight=args.max_weight,
        tolerated_dropout=args.tolerate_dropout,
        tolerated_corrupt=args.tolerate_corrupt,
        dp_epsilon=args.dp_epsilon,
        dp_delta=args.dp_delta,
        dp_rounds=args.rounds,
        dp_clip=args.dp_clip,
        dp_prepare=args.dp_prepare,
        spoil=args.spoil,
    )
    if args.engine is not None or args.groups is not None or args.kill_worker is not None:
        report = _run_sharded(args, cfg)
    elif args.dp_epsilon is not None and args.transport != "inprocess":
        raise ConfigurationError("--dp-epsilon runs with --transport inprocess only (for now)")
    elif args.spoil and args.transport != "inprocess":
        raise ConfigurationError("--spoil runs in process only (--transport inprocess)")
    elif args.transport == "grpc":
        from secagg.server import StageTimeouts
        from secagg.service.loopback import simulate_grpc

        timeouts = StageTimeouts.uniform(args.stage_timeout) if args.stage_timeout else None
        report = simulate_grpc(
            cfg,
            workers=args.workers,
            processes=args.processes,
            deadlines=timeouts,
            plaintext=args.insecure_plaintext,
            progress=not args.json,
        )
    elif args.insecure_plaintext:
        raise ConfigurationError("--insecure-plaintext needs --transport grpc")
    else:
        report = simulate(cfg)
    for w in report.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    else:
        _print_report(report)
    return 0 if report["status"] == "completed" else EXIT_ABORTED


def _run_sharded(args: argparse.Namespace, cfg: SimulationConfig) -> dict[str, Any]:
    """``simulate --engine local|ray --groups G``: one sharded round (docs/sharding.md)."""
    from secagg.simulate_sharded import GroupEngine, LocalEngine, simulate_sharded

    if args.engine is None:
        raise ConfigurationError("--groups and --kill-worker need --engine local or ray")
    if args.transport != "inprocess" or args.insecure_plaintext:
        raise ConfigurationError(
            "--engine runs the groups in process or on Ray, not over --transport grpc"
        )
    engine: GroupEngine
    kill = {} if args.kill_worker is None else {args.kill_worker: 2}
    if args.engine == "ray":
        from secagg.service.ray_engine import RayEngine

        engine = RayEngine(n_workers=args.ray_workers, address=args.ray_address, kill=kill)
    else:
        if args.ray_address is not None:
            raise ConfigurationError("--ray-address needs --engine ray")
        engine = LocalEngine(
            fail=frozenset() if args.kill_worker is None else frozenset({args.kill_worker})
        )
    return simulate_sharded(cfg, args.groups or 1, engine, on_group_abort=args.on_group_abort)


def _print_report(r: dict[str, object]) -> None:
    lines = [
        f"mode {r['mode']}: {r['clients']} clients x {r['dim']} parameters, "
        f"k={r['neighbors']} neighbours, t={r['threshold']}",
        f"status: {r['status']}",
    ]
    if r["status"] == "completed":
        lines.append(
            f"survivors {r['survivors']}, exact={r['exact']}, max |error| {r['max_abs_error']:.3g}"
        )
    else:
        lines.append(f"aborted: {r['abort']}")
    lines.append(f"seconds: {r['seconds']}")
    if "stage_seconds" in r:
        lines.append(f"stage seconds: {r['stage_seconds']}")
    lines.append(f"bytes: {r['bytes']}")
    for g in r.get("groups", []) or []:  # type: ignore[attr-defined]
        lines.append(
            f"group {g['group']}: {g['size']} clients, {g['survivors']} survivors,"
            f" {g['status']}" + (f" ({g['reason']})" if "reason" in g else "")
        )
    print("\n".join(lines))


def _add_remote(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server connection (admin token from $SECAGG_ADMIN_TOKEN)")
    g.add_argument("--server", help="host:port of a running server (default $SECAGG_SERVER)")
    g.add_argument("--ca", help="CA certificate of the server (PEM); enables TLS")
    g.add_argument("--cert", help="client certificate for mutual TLS (PEM)")
    g.add_argument("--key", help="client private key for mutual TLS (PEM)")
    g.add_argument("--server-name", help="name to check in the server certificate")
    g.add_argument(
        "--operator-kit",
        help="operator kit (secagg provision): sign calls with its key, use its TLS files "
        "and server address ($SECAGG_OPERATOR_KIT)",
    )
    g.add_argument("--admin-token-file", help="DEPRECATED shared admin token, read from this file")
    g.add_argument(
        "--insecure-no-tls",
        action="store_true",
        help="INSECURE: talk to a non-loopback server without TLS (token sent in the clear)",
    )


def _admin(args: argparse.Namespace) -> AdminClient:
    from secagg.service.admin import AdminClient
    from secagg.service.config import read_token_file
    from secagg.service.tls import ClientTls

    kit = args.operator_kit or os.environ.get("SECAGG_OPERATOR_KIT")
    if kit:  # the kit names the server; --server overrides it
        return AdminClient.from_kit(kit, target=args.server, server_name=args.server_name)
    server = _server(args)
    token = os.environ.get("SECAGG_ADMIN_TOKEN", "")
    if args.admin_token_file:
        token = read_token_file(args.admin_token_file)
    if not token:
        raise ConfigurationError(
            "no admin token: set $SECAGG_ADMIN_TOKEN or --admin-token-file "
            "(the server's token: serve --admin-token-file or admin_token_file in its config)"
        )
    tls = None
    if args.ca or args.cert or args.key:
        tls = ClientTls(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
    return AdminClient(server, token, tls=tls, insecure_no_tls=args.insecure_no_tls)


def _server(args: argparse.Namespace) -> str:
    server: str = args.server or os.environ.get("SECAGG_SERVER", "")
    if not server:
        raise ConfigurationError("no server: give --server host:port (or set $SECAGG_SERVER)")
    if ":" not in server:
        raise ConfigurationError(f"--server must be host:port, got {server!r}")
    return server


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the gRPC server (SIGTERM stops it gracefully)")
    p.add_argument("--config", help="TOML config file (see docs/operations.md)")
    p.add_argument(
        "--kit",
        help="the server kit of `secagg provision` (its server.toml, TLS files and store; "
        "paths in it are relative to the kit)",
    )
    p.add_argument("--listen", help="host:port (default 127.0.0.1:50051)")
    p.add_argument("--store", help="SQLite file (default secagg.db; $SECAGG_STORE)")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--client-ca", help="CA of client certificates: turns on mutual TLS")
    p.add_argument(
        "--admin-token-file",
        help="file holding the admin API's bearer token (or $SECAGG_ADMIN_TOKEN); "
        "without one the admin API is off",
    )
    p.add_argument(
        "--insecure-no-tls",
        action="store_true",
        default=None,
        help="INSECURE: serve plaintext gRPC on a non-loopback address (refused otherwise)",
    )
    p.add_argument(
        "--no-cert-binding",
        action="store_true",
        help="with mutual TLS, do not require the certificate CN to be the participant name",
    )
    p.add_argument("--stage-timeout", type=float, help="default seconds per stage")
    p.add_argument("--workers", type=int, help="threads for round work (default 4)")
    p.add_argument("--max-chunk-bytes", type=int, help="largest chunk (default 1 MiB)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-addr", help="address of the metrics endpoint (default 127.0.0.1)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["json", "text"])
    p.add_argument("--shutdown-grace", type=float, help="seconds rounds get to finish on SIGTERM")
    p.add_argument(
        "--disconnect-grace",
        type=float,
        help="seconds a participant whose stream closed has to reconnect before it counts as "
        "dropped (default 3)",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        help="where group rounds of sharded rounds run (default local; ray: secagg[ray])",
    )
    p.add_argument("--ray-workers", type=int, help="--engine ray: actors per sharded round (2)")
    p.add_argument("--ray-address", help="--engine ray: an existing Ray cluster")


def _run_serve(args: argparse.Namespace) -> int:
    from secagg.server import StageTimeouts
    from secagg.service.config import load_config
    from secagg.service.server import serve
    from secagg.service.tls import ServerTls

    if args.kit:
        _enter_server_kit(args)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigurationError("--tls-cert and --tls-key go together")
        tls = ServerTls(
            args.tls_cert, args.tls_key, args.client_ca, bind_names=not args.no_cert_binding
        )
    elif args.client_ca:
        raise ConfigurationError("--client-ca needs --tls-cert and --tls-key")
    config = load_config(
        args.config,
        listen=args.listen,
        store=args.store,
        tls=tls,
        insecure_no_tls=args.insecure_no_tls,
        deadlines=StageTimeouts.uniform(args.stage_timeout) if args.stage_timeout else None,
        workers=args.workers,
        max_chunk_bytes=args.max_chunk_bytes,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        disconnect_grace=args.disconnect_grace,
        log_level=args.log_level,
        log_format=args.log_format,
        shutdown_grace=args.shutdown_grace,
        admin_token_file=args.admin_token_file,
        engine=args.engine,
        ray_workers=args.ray_workers,
        ray_address=args.ray_address,
    )
    if config.engine == "ray":
        from secagg.service.ray_engine import import_ray

        import_ray()  # without Ray: exit 2 with the one line that fixes it
    return serve(config)


def _enter_server_kit(args: argparse.Namespace) -> None:
    """``serve --kit DIR``: run from the kit, whose ``server.toml`` names files relative to
    it; path flags given beside ``--kit`` stay relative to where the command was run."""
    from secagg.service import kit as kf

    if args.config:
        raise ConfigurationError("give --kit or --config, not both (a kit has its server.toml)")
    kit = kf.load_kit(args.kit, "server")
    config = kit.path(kf.SERVER_CONFIG)
    for flag in ("store", "tls_cert", "tls_key", "client_ca", "admin_token_file"):
        value = getattr(args, flag)
        if value:
            setattr(args, flag, os.path.abspath(value))
    if "SECAGG_STORE" in os.environ:
        os.environ["SECAGG_STORE"] = os.path.abspath(os.environ["SECAGG_STORE"])
    os.chdir(kit.root)
    args.config = config.name


def _add_keygen(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "keygen",
        help="write an Ed25519 identity key file (mode 0600), or with --ckks the CKKS contexts",
    )
    p.add_argument("--out", required=True, help="key file to write; the public key goes to OUT.pub")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    ck = p.add_argument_group(
        "CKKS (--ckks): OUT.ckks-secret for the key holders, OUT.ckks-server for the server"
    )
    ck.add_argument("--ckks", action="store_true", help="write CKKS contexts, not an identity")
    ck.add_argument(
        "--mode",
        choices=["ckks", "hybrid"],
        default="hybrid",
        help="hybrid: key holders see only sums; ckks: the server is trusted not to pass one "
        "upload off as the sum and not to collude with any key holder (docs/threat-model.md)",
    )
    ck.add_argument("--clients", type=int, help="participants per round")
    ck.add_argument(
        "--groups",
        type=int,
        default=1,
        help="sharded rounds of G groups: CKKS sized for the groups' total (docs/sharding.md)",
    )
    ck.add_argument("--dim", type=int, help="parameters per round")
    ck.add_argument("--bits", type=int, default=16)
    ck.add_argument(
        "--max-weight",
        type=int,
        default=DEFAULT_MAX_WEIGHT,
        help=f"largest FedAvg weight (sample count) per site (default {DEFAULT_MAX_WEIGHT})",
    )
    ck.add_argument(
        "--epoch", type=int, default=0, help="key epoch number (bump it when rotating the key)"
    )
    ck.add_argument(
        "--decryption-budget",
        type=int,
        default=32,
        help="decryptions each key holder may make under this key (1..64; docs/ckks.md)",
    )
    ck.add_argument(
        "--threshold",
        default="auto",
        type=_threshold,
        help="with --dp-*: the rounds' threshold (auto or t; the DP lanes depend on it)",
    )
    ck.add_argument("--clip", type=float, default=8.0, help="with --dp-*: --dp-clip's default")
    _add_dp_flags(p)


def _run_keygen(args: argparse.Namespace) -> int:
    from secagg.service.keyfile import write_ckks_contexts, write_identity

    if args.ckks:
        from secagg.he_params import select_params

        if not args.clients or not args.dim:
            raise ConfigurationError("keygen --ckks needs --clients and --dim")
        dp = _dp_arg(args)
        if dp is not None:  # the DP shape: d' lanes of the offer's bits, unweighted
            he = _dp_he_params(args, dp)
        else:
            n_he = _he_clients(args.mode, args.clients, args.groups)
            he = select_params(n_he, args.bits, args.dim, args.mode, args.max_weight)
        from secagg import ckks

        budget = args.decryption_budget
        if not 1 <= budget <= ckks.MAX_DECRYPTION_BUDGET:
            raise ConfigurationError(
                f"--decryption-budget must be in 1..{ckks.MAX_DECRYPTION_BUDGET}, got {budget}"
            )
        secret, server = write_ckks_contexts(
            args.out, he, force=args.force, epoch=args.epoch, decryption_budget=budget
        )
        epoch = ckks.load_server_context(server.read_bytes(), he).epoch
        shape = {
            "mode": args.mode,
            "clients": args.clients,
            "dim": args.dim,
            "bits": args.bits,
            "max_weight": 1 if dp is not None else args.max_weight,
        }
        if dp is not None:
            shape.update(dp=dp.to_json(), threshold=args.threshold)
        if args.groups > 1:
            if dp is not None:
                raise ConfigurationError("--groups: distributed DP runs in single rounds only")
            shape["groups"] = args.groups
        sidecar = _he_shape_path(server)
        sidecar.write_text(json.dumps(shape) + "\n")
        print(
            json.dumps(
                {
                    "he_params": he.describe(),
                    "key_epoch": {**epoch.describe(), "fingerprint": epoch.fingerprint.hex()},
                    "files": [
                        str(secret),
                        str(server),
                        str(ckks.ledger_path_for(secret)),
                        str(sidecar),
                    ],
                }
            )
        )
        return 0
    key = write_identity(args.out, force=args.force)
    print(json.dumps({"public_key": key.public.hex(), "files": [args.out, f"{args.out}.pub"]}))
    return 0


def _add_enroll(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("enroll", help="enrol, revoke or list participants")
    p.add_argument("name", nargs="?", help="participant name")
    p.add_argument("--public-key", help="hex Ed25519 public key, or a .pub / identity file")
    p.add_argument(
        "--entry",
        help="the site's signed directory entry (file from `secagg authority sign`); "
        "without --public-key it replaces the entry of an enrolled participant",
    )
    p.add_argument("--revoke", action="store_true", help="revoke the participant instead")
    p.add_argument("--list", action="store_true", help="list participants")
    p.add_argument("--store", help="the server's SQLite file, to edit directly (or $SECAGG_STORE)")
    _add_remote(p)


def _run_enroll(args: argparse.Namespace) -> int:
    from secagg.service.keyfile import read_public_key

    rows: list[dict[str, object]]
    if _is_remote(args):
        with _admin(args) as admin:
            if args.list:
                recs = admin.participants()
            elif args.revoke:
                recs = [admin.revoke(_need(args.name, "name"))]
            elif args.entry and not args.public_key:
                recs = [admin.set_signed_entry(_need(args.name, "name"), _entry(args))]
            else:
                key = read_public_key(_need(args.public_key, "--public-key"))
                recs = [admin.enroll(_need(args.name, "name"), key, _entry(args))]
            rows = [
                {"name": r.name, "public_key": r.identity_key.hex(), "revoked": r.revoked_at > 0}
                for r in recs
            ]
    else:
        from secagg.service.store import Store

        store = Store(_local_store(args))
        try:
            if args.list:
                local = store.participants()
            elif args.revoke:
                local = [store.revoke(_need(args.name, "name"))]
            elif args.entry and not args.public_key:
                local = [store.set_signed_entry(_need(args.name, "name"), _entry(args))]
            else:
                key = read_public_key(_need(args.public_key, "--public-key"))
                local = [store.enroll(_need(args.name, "name"), key, _entry(args))]
        finally:
            store.close()
        rows = [
            {"name": r.name, "public_key": r.public_key.hex(), "revoked": r.revoked} for r in local
        ]
    for row in rows:
        print(json.dumps(row))
    return 0


def _is_remote(args: argparse.Namespace) -> bool:
    """Through a running server (``--server``, an operator kit, or their variables when no
    ``--store`` is given) or on the store file directly."""
    remote = args.server or args.operator_kit
    if remote and args.store:
        raise ConfigurationError("give --server (through the running server) or --store, not both")
    env_remote = os.environ.get("SECAGG_SERVER") or os.environ.get("SECAGG_OPERATOR_KIT")
    return bool(remote or (not args.store and env_remote))


def _local_store(args: argparse.Namespace) -> str:
    """The store file to edit directly: ``--store`` or ``$SECAGG_STORE``, never a default
    (a ``./secagg.db`` the server never reads)."""
    path: str | None = args.store or os.environ.get("SECAGG_STORE")
    if not path:
        raise ConfigurationError(
            f"where? give --store PATH (the server's store file) or --server host:port "
            f"(a running server) to `secagg {args.command}`"
        )
    return path


def _entry(args: argparse.Namespace) -> bytes:
    from secagg.service.authority import read_entry

    return read_entry(args.entry) if args.entry else b""


def _add_authority(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "authority",
        help="the federation authority (offline, never on the server): init, sign entries",
    )
    cmds = p.add_subparsers(dest="authority_command", required=True)
    init = cmds.add_parser(
        "init", help="write DIR/authority.key (0600, keep offline) and DIR/authority.pub (kits)"
    )
    init.add_argument("--out", required=True, help="directory to write the two files into")
    init.add_argument("--federation", required=True, help="federation name the entries bind")
    init.add_argument("--force", action="store_true", help="overwrite an existing key")
    sign = cmds.add_parser("sign", help="sign one site's directory entry (hex, to --out)")
    sign.add_argument("name", help="the site's participant name")
    sign.add_argument(
        "--key", required=True, help="authority.key (authority.pub must sit beside it)"
    )
    sign.add_argument(
        "--public-key", required=True, help="the site's identity: hex, .pub or identity file"
    )
    sign.add_argument("--out", required=True, help="entry file to write")
    sign.add_argument("--epoch", type=int, default=0, help="enrolment epoch (default 0)")
    sign.add_argument(
        "--not-after", type=int, default=0, help="expiry, Unix seconds (default: none)"
    )


def _run_authority(args: argparse.Namespace) -> int:
    from secagg.service.authority import init_authority, sign_site
    from secagg.service.keyfile import read_public_key

    if args.authority_command == "init":
        pub = init_authority(args.out, args.federation, force=args.force)
        files = [str(Path(args.out) / "authority.key"), str(pub)]
        print(json.dumps({"federation": args.federation, "files": files}))
        return 0
    key = read_public_key(args.public_key)
    entry = sign_site(args.key, args.name, key, epoch=args.epoch, not_after=args.not_after)
    Path(args.out).write_text(entry.encode().hex() + "\n")
    row = {"federation": entry.federation, "name": entry.name, "public_key": key.hex()}
    print(json.dumps({**row, "epoch": entry.epoch, "not_after": entry.not_after, "file": args.out}))
    return 0


def _need(value: str | None, what: str) -> str:
    if not value:
        raise ConfigurationError(f"{what} is required")
    return value


def _add_audit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="print the audit log and verify its hash chain")
    p.add_argument("--store", help="SQLite file (default: secagg.db)")
    p.add_argument("--round", help="show only this round (hex id); the whole chain is verified")
    p.add_argument("--expect-head", help="fail unless the chain ends at this hash")
    p.add_argument("--json", action="store_true", help="one JSON object per entry")


def _run_audit(args: argparse.Namespace) -> int:
    from secagg.service.audit import format_entry
    from secagg.service.store import Store

    path = args.store or os.environ.get("SECAGG_STORE", "secagg.db")
    if not Path(path).exists():
        raise ConfigurationError(f"no store at {path} (give --store or $SECAGG_STORE)")
    store = Store(path)
    try:
        entries = store.audit_entries()
        if args.round:
            want = _round_id_arg(args.round).hex()
            if not any(e.round_id == want for e in entries):
                from secagg.service.errors import NotFound

                raise NotFound(f"no audit entries for round {want} in {path}")
            args.round = want
        for e in entries:
            if args.round and e.round_id != args.round:
                continue
            if args.json:
                print(json.dumps({**asdict(e), "body": e.data}))
            else:
                print(format_entry(e))
        try:
            head = store.verify_audit(args.expect_head)
        except StoreError as exc:
            print(f"secagg: audit chain INVALID: {exc}", file=sys.stderr)
            return EXIT_AUDIT
    finally:
        store.close()
    print(f"audit chain OK: {len(entries)} entries, head {head}", file=sys.stderr)
    return 0


def _add_round(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("round", help="create, inspect, list or abort rounds on a running server")
    p.add_argument("action", choices=["create", "status", "abort", "list"])
    p.add_argument("round_id", nargs="?", help="hex round id (status, abort)")
    p.add_argument("--job", help="federation or job name (list: only this job's rounds)")
    _add_round_shape(p)
    p.add_argument("--reason", default="", help="abort reason")
    p.add_argument("--wait", action="store_true", help="wait until the round ends")
    _add_remote(p)


def _add_round_shape(p: argparse.ArgumentParser) -> None:
    """The flags that shape a round (``round create``, ``job create``)."""
    p.add_argument("--participants", help="comma-separated enrolled names (ids 1..n in order)")
    p.add_argument("--dim", type=int)
    p.add_argument("--mode", default="masked", choices=["masked", "hybrid", "ckks", "plaintext"])
    p.add_argument("--he-context", help="ckks/hybrid: the server's CKKS context file (keygen)")
    p.add_argument("--publish-after", type=int, help="ckks: publish after K uploads (FedBuff)")
    p.add_argument("--bits", type=int, help="bits per value (default 16; ckks/hybrid: keygen's)")
    p.add_argument("--clip", type=float, default=8.0)
    p.add_argument(
        "--max-weight",
        type=int,
        help=f"largest FedAvg weight (sample count) per site (default {DEFAULT_MAX_WEIGHT}; "
        "ckks/hybrid: keygen's)",
    )
    p.add_argument("--neighbors", default="auto", type=_neighbors, help="auto, all or a degree")
    p.add_argument("--threshold", default="auto", type=_threshold, help="auto or t")
    p.add_argument(
        "--layout",
        default="",
        help="hex SHA-256 model-layout fingerprint (secagg.service.tensors.fingerprint);"
        " clients whose update has another layout refuse the round",
    )
    p.add_argument("--stage-timeout", type=float, help="seconds per stage (server default)")
    p.add_argument(
        "--groups",
        type=int,
        default=0,
        help="sharded round: G > 1 groups, assigned by commit-reveal, one group round each "
        "(masked, hybrid, ckks: keygen --ckks --groups G; docs/sharding.md, 'Over gRPC')",
    )
    p.add_argument(
        "--on-group-abort",
        choices=["publish", "abort"],
        default="publish",
        help="sharded round: when a group aborts, publish the others' sum (never below the "
        "minimum contributors) or abort the round",
    )
    _add_dp_flags(p)


def _add_dp_flags(p: argparse.ArgumentParser) -> None:
    """``--dp-*`` (``round create``, ``job create``, ``keygen --ckks``)."""
    g = p.add_argument_group("distributed differential privacy (docs/dp.md)")
    g.add_argument("--dp-epsilon", type=float, help="DP: the job's epsilon (enables DP)")
    g.add_argument("--dp-delta", type=float, help="DP: the job's delta (default 1e-5)")
    g.add_argument(
        "--dp-rounds", type=int, help="DP: rounds the budget is split over (job: --rounds)"
    )
    g.add_argument("--dp-clip", type=float, help="DP: L2 clip norm (default --clip)")
    g.add_argument(
        "--dp-max-withholders", type=int, help="DP: contributors counted as adding no noise"
    )


_DP_FLAGS = ("epsilon", "delta", "rounds", "clip", "max_withholders")


def _dp_arg(args: argparse.Namespace, *, rounds: int | None = None) -> Any:
    """The DP spec of ``--dp-*`` (or ``job create --dp JSON``), or ``None``."""
    from secagg.service.dpspec import DPSpec

    given = {k: getattr(args, f"dp_{k}") for k in _DP_FLAGS if getattr(args, f"dp_{k}") is not None}
    doc: dict[str, Any] | None = None
    if getattr(args, "dp", None):
        if given:
            raise ConfigurationError("give --dp JSON or the --dp-* flags, not both")
        try:
            doc = json.loads(args.dp)
        except ValueError as exc:
            raise ConfigurationError(f"--dp must be a JSON object: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigurationError("--dp must be a JSON object")
    elif given:
        if "epsilon" not in given:
            raise ConfigurationError("--dp-* flags need --dp-epsilon")
        if "rounds" not in given and rounds is None:
            raise ConfigurationError("--dp-epsilon needs --dp-rounds (the rounds of the budget)")
        doc = given
    if doc is None:
        return None
    return DPSpec.from_json(doc, rounds=rounds, clip=args.clip)


def _round_shape(args: argparse.Namespace) -> dict[str, Any]:
    """RoundSpec / JobSpec keywords from the round-shape flags (``job`` left out)."""
    from secagg.server import StageTimeouts

    participants = [n.strip() for n in _need(args.participants, "--participants").split(",")]
    dim = int(_need(str(args.dim or ""), "--dim"))
    he_context = _read_file(args.he_context, "--he-context") if args.he_context else None
    bits, max_weight = args.bits, args.max_weight
    if args.he_context:
        bits, max_weight = _he_shape(args, len(participants), dim)
    if args.stage_timeout is not None and not 0 <= args.stage_timeout < float("inf"):
        raise ConfigurationError(f"--stage-timeout must be >= 0 seconds, got {args.stage_timeout}")
    return {
        "participants": participants,
        "dim": dim,
        "mode": args.mode,
        "bits": 16 if bits is None else bits,
        "clip": args.clip,
        "max_weight": DEFAULT_MAX_WEIGHT if max_weight is None else max_weight,
        "neighbors": args.neighbors,
        "threshold": args.threshold,
        "deadlines": StageTimeouts.uniform(args.stage_timeout)
        if args.stage_timeout
        else StageTimeouts(0, 0, 0, 0, 0),
        "he_context": he_context,
        "publish_after": args.publish_after,
        "layout": _layout_arg(args.layout),
        "groups": args.groups,
        "on_group_abort": args.on_group_abort,
    }


def _run_round(args: argparse.Namespace) -> int:
    from secagg.service.coordinator import RoundSpec

    spec = None
    rid = b""
    if args.action == "list":
        with _admin(args) as admin:
            print(json.dumps([_round_row(st) for st in admin.rounds(args.job or None)]))
        return 0
    if args.action == "create":
        spec = RoundSpec(job=_need(args.job, "--job"), dp=_dp_arg(args), **_round_shape(args))
    else:
        rid = _round_id_arg(_need(args.round_id, "round_id"))
    with _admin(args) as admin:
        if spec is not None:
            st = admin.create_round(spec)
        else:
            st = admin.abort(rid, args.reason) if args.action == "abort" else admin.status(rid)
        if args.wait:
            st = admin.wait(st.round_id)
    print(json.dumps(_status_dict(st)))
    if args.action == "abort" and not args.wait:
        return 0  # the abort the operator asked for happened
    return 0 if st.status != "aborted" else EXIT_ABORTED


def _round_row(st: RoundStatus) -> dict[str, object]:
    """One ``round list`` entry."""
    return {
        "round_id": st.round_id.hex(),
        "job": st.job,
        "index": st.job_index if st.in_job else None,
        "mode": st.mode,
        "status": st.status,
        "stage": st.stage,
        "opened_at": st.opened_at,
        "finished_at": st.finished_at or None,
        "survivors": len(st.contributors),
    }


def _add_job(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "job",
        help="jobs on a running server: rounds the server opens one after another",
        description="create: a job of fixed participants and round shape whose rounds the "
        "server opens itself (sites follow it with Client.rounds(job)); status, list, abort, "
        "pause (the running round ends, no new one opens), resume.",
    )
    p.add_argument("action", choices=["create", "status", "list", "abort", "pause", "resume"])
    p.add_argument("name", nargs="?", help="job name (all but list)")
    p.add_argument("--rounds", type=_positive_int, help="rounds to run (default: until aborted)")
    p.add_argument(
        "--every",
        type=_positive_seconds,
        help="seconds between round openings (default: the next round opens when the "
        "previous one ended)",
    )
    p.add_argument(
        "--dp",
        help='distributed DP budget as a JSON object {"epsilon", "delta", "rounds", "clip", '
        '"max_withholders", "max_excess", "sampling_rate"} (or the --dp-* flags)',
    )
    _add_round_shape(p)
    p.add_argument("--reason", default="", help="abort reason")
    p.add_argument("--wait", action="store_true", help="status: wait until the job ends")
    p.add_argument(
        "--timeout", type=_positive_seconds, default=3600.0, help="--wait: at most this long"
    )
    _add_remote(p)


def _run_job(args: argparse.Namespace) -> int:
    from secagg.service.coordinator import JobSpec

    if args.action == "list":
        with _admin(args) as admin:
            print(json.dumps([_job_dict(st) for st in admin.jobs()]))
        return 0
    name = _need(args.name, "a job name")
    if args.action == "create":
        dp = _dp_arg(args, rounds=args.rounds)
        spec = JobSpec(name=name, rounds=args.rounds, every=args.every, dp=dp, **_round_shape(args))
    with _admin(args) as admin:
        if args.action == "create":
            st = admin.create_job(spec)
        elif args.action == "abort":
            st = admin.abort_job(name, args.reason)
        elif args.action == "pause":
            st = admin.pause_job(name)
        elif args.action == "resume":
            st = admin.resume_job(name)
        else:
            st = admin.wait_job(name, args.timeout) if args.wait else admin.job(name)
    print(json.dumps(_job_dict(st)))
    if args.action == "status" and st.status == "aborted":
        return EXIT_ABORTED
    return 0


def _job_dict(st: JobStatus) -> dict[str, object]:
    return {
        "name": st.name,
        "status": st.status,
        "rounds_total": st.rounds_total or None,
        "rounds_done": st.rounds_done,
        "rounds_completed": st.rounds_completed,
        "rounds_aborted": st.rounds_aborted,
        "next_index": st.next_index,
        "current_round": st.current_round.hex() or None,
        "every": st.every or None,
        "participants": list(st.participants),
        "mode": st.mode,
        "dim": st.dim,
        "created_at": st.created_at,
        "created_by": st.created_by,
        "ended_at": st.ended_at or None,
        "reason": st.reason or None,
    }


def _positive_int(value: str) -> int:
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if 0 < seconds < float("inf"):
        return seconds
    raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {value!r}")


def _neighbors(value: str) -> str:
    if value in ("auto", "all") or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"must be auto, all or a degree k >= 1, got {value!r}")


def _threshold(value: str) -> str:
    if value == "auto" or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"must be auto or a threshold t >= 1, got {value!r}")


def _round_id_arg(value: str) -> bytes:
    from secagg.params import ROUND_ID_BYTES

    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != ROUND_ID_BYTES:
        raise ConfigurationError(
            f"a round id is {2 * ROUND_ID_BYTES} hex digits (from `round create`), got {value!r}"
        )
    return raw


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None


def _dp_he_params(args: argparse.Namespace, dp: Any) -> Any:
    """The CKKS parameters of a hybrid DP round of this shape (as the server computes them)."""
    from secagg.service.coordinator import Coordinator, RoundSpec

    if args.mode != "hybrid":
        raise ConfigurationError("keygen --ckks --dp-*: distributed DP runs in hybrid rounds only")
    names = [f"p{i}" for i in range(args.clients)]
    spec = RoundSpec("keygen", names, args.dim, mode="hybrid", threshold=args.threshold, dp=dp)
    return Coordinator._params(spec, args.clients).he


def _he_shape_path(server_context: Path | str) -> Path:
    """``PREFIX.ckks-params.json`` beside ``PREFIX.ckks-server``: the shape keygen made it for."""
    p = Path(server_context)
    stem = p.name[: -len(".ckks-server")] if p.name.endswith(".ckks-server") else p.name
    return p.with_name(stem + ".ckks-params.json")


def _he_clients(mode: str, clients: int, groups: int | None) -> int:
    """Summands the CKKS parameters hold: ``clients``, or in a sharded round of ``groups``
    groups :func:`secagg.groups.sharded_he_clients` (the total plus hybrid's per-group
    plaintexts)."""
    from secagg.groups import sharded_he_clients
    from secagg.params import Mode

    if not groups or groups <= 1:
        return clients
    return sharded_he_clients(Mode.parse(mode), clients, groups)


def _check_context_fits(
    args: argparse.Namespace, clients: int, dim: int, bits: int, max_weight: int
) -> None:
    from secagg import ckks
    from secagg.he_params import select_params

    n_he = _he_clients(args.mode, clients, getattr(args, "groups", None))
    he = select_params(n_he, bits, dim, args.mode, max_weight)
    try:
        ckks.load_server_context(_read_file(args.he_context, "--he-context"), he)
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"{args.he_context} does not fit a {args.mode} round of {clients} clients, "
            f"dim {dim}, bits {bits}, max_weight {max_weight} ({exc}): pass the --bits/"
            "--max-weight it was made with (keygen --ckks, or provisioning's [ckks] table)"
        ) from None


def _he_shape(args: argparse.Namespace, clients: int, dim: int) -> tuple[int | None, int | None]:
    """bits and max_weight for a ckks/hybrid round: keygen's, and the round must match them."""
    side = _he_shape_path(args.he_context)
    if not side.exists():  # a context from elsewhere (provisioning): check it fits here
        bits = 16 if args.bits is None else args.bits
        weight = DEFAULT_MAX_WEIGHT if args.max_weight is None else args.max_weight
        _check_context_fits(args, clients, dim, bits, weight)
        return bits, weight
    try:
        shape = json.loads(side.read_text())
        made = {k: shape[k] for k in ("mode", "clients", "dim", "bits", "max_weight")}
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{side}: malformed ({exc})") from None
    dp = _dp_arg(args, rounds=getattr(args, "rounds", None))
    made_dp = shape.get("dp")
    if (dp is None) != (made_dp is None):
        raise ConfigurationError(
            f"{args.he_context} was made {'with' if made_dp else 'without'} DP and the round "
            f"has {'DP' if dp else 'none'}: rerun `secagg keygen --ckks` with the round's --dp-*"
        )
    if dp is not None:
        asked_dp = {"dp": dp.to_json(), "threshold": args.threshold, "dim": dim, "clients": clients}
        had = {k: shape.get(k) for k in asked_dp}
        diff = [f"{k} {asked_dp[k]} (keygen: {had[k]})" for k in asked_dp if asked_dp[k] != had[k]]
        if diff:
            raise ConfigurationError(
                f"{args.he_context} was made for another DP round shape: {', '.join(diff)}; "
                "rerun `secagg keygen --ckks` with this round's --clients/--dim/--threshold/--dp-*"
            )
        return int(made["bits"]), 1
    asked = {
        "mode": args.mode,
        "clients": clients,
        "dim": dim,
        "bits": made["bits"] if args.bits is None else args.bits,
        "max_weight": made["max_weight"] if args.max_weight is None else args.max_weight,
        "groups": max(1, getattr(args, "groups", None) or 1),
    }
    made["groups"] = shape.get("groups", 1)
    diff = [f"{k} {asked[k]} (keygen: {made[k]})" for k in made if asked[k] != made[k]]
    if diff:
        raise ConfigurationError(
            f"{args.he_context} was made for another round shape: {', '.join(diff)}; "
            "rerun `secagg keygen --ckks` with this round's --mode/--clients/--dim/--bits/"
            "--max-weight/--groups, or create the round with keygen's"
        )
    return int(made["bits"]), int(made["max_weight"])


def _layout_arg(value: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b"?"
    if len(raw) not in (0, 32):
        raise ConfigurationError(f"--layout must be 64 hex digits, got {value!r}")
    return raw


def _status_dict(st: RoundStatus) -> dict[str, object]:
    return {
        "round_id": st.round_id.hex(),
        "job": st.job,
        "status": st.status,
        "stage": st.stage,
        "insecure_plaintext": st.insecure_plaintext,
        "participants": {e.client_id: e.name for e in st.directory},
        "dropouts": [
            {"client_id": d.client_id, "name": d.name, "stage": d.stage, "reason": d.reason}
            for d in st.dropouts
        ],
        "contributors": list(st.contributors),
        "abort": {"stage": st.abort_stage, "reason": st.abort_reason} if st.abort_reason else None,
        "aggregate_sha256": st.aggregate_sha256 or None,
        "stage_seconds": dict(st.stage_seconds),
    }


def _add_provision(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "provision",
        help="write a federation's startup kits (CA, server, authority, operators, sites)",
        description="Write the kits of every site and operator in FEDERATION (a TOML file, "
        "docs/operations.md) not yet under --out; never overwrites a file.",
    )
    p.add_argument("federation", help="federation file (TOML)")
    p.add_argument("--out", required=True, help="kits directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--add-site", metavar="NAME", help="write only this site's kit")
    g.add_argument("--add-operator", metavar="NAME", help="write only this operator's kit")


def _run_provision(args: argparse.Namespace) -> int:
    from secagg.service.provision import add_operator_kit, add_site, load_federation, provision

    fed = load_federation(args.federation)
    if args.add_site:
        files = add_site(fed, args.out, args.add_site)
    elif args.add_operator:
        files = add_operator_kit(fed, args.out, args.add_operator)
    else:
        files = provision(fed, args.out)
    print(json.dumps({"federation": fed.name, "files": [str(f) for f in files]}))
    return 0


def _add_operator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "operator", help="operators of the admin API (on the server's store): add, list, revoke"
    )
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("name", nargs="?", help="operator name (its certificate's common name)")
    p.add_argument("--public-key", help="add: hex, .pub or key file (operator kit)")
    p.add_argument("--store", help="the server's SQLite file (or $SECAGG_STORE)")


def _run_operator(args: argparse.Namespace) -> int:
    from secagg.service.keyfile import read_public_key
    from secagg.service.store import Store

    store = Store(_local_store(args))
    try:
        if args.action == "list":
            recs = store.operators()
        elif args.action == "add":
            key = read_public_key(_need(args.public_key, "--public-key"))
            recs = [store.add_operator(_need(args.name, "name"), key)]
        else:
            recs = [store.revoke_operator(_need(args.name, "name"))]
    finally:
        store.close()
    for r in recs:
        print(json.dumps({"name": r.name, "public_key": r.public_key.hex(), "revoked": r.revoked}))
    return 0


def _add_site(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("site", help="sites (on the server's store): rotate a site's key")
    p.add_argument("action", choices=["rotate"])
    p.add_argument("name", help="the site's participant name (kept)")
    p.add_argument("--public-key", required=True, help="the new identity: hex, .pub or key file")
    p.add_argument("--entry", help="signed entry for the new key (secagg authority sign)")
    p.add_argument("--store", help="the server's SQLite file, to edit directly (or $SECAGG_STORE)")
    _add_remote(p)


def _run_site(args: argparse.Namespace) -> int:
    from secagg.service.keyfile import read_public_key
    from secagg.service.store import Store

    key = read_public_key(args.public_key)
    if _is_remote(args):
        with _admin(args) as admin:
            rec = admin.rotate(args.name, key, _entry(args))
        row = {"name": rec.name, "public_key": rec.identity_key.hex(), "revoked": False}
    else:
        store = Store(_local_store(args))
        try:
            r = store.rotate(args.name, key, _entry(args))
        finally:
            store.close()
        row = {"name": r.name, "public_key": r.public_key.hex(), "revoked": r.revoked}
    print(json.dumps(row))
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from secagg.service.demo import DESCRIPTION, add_arguments

    p = sub.add_parser(
        "demo", help="federated training end to end over loopback gRPC", description=DESCRIPTION
    )
    add_arguments(p)


def _run_demo(args: argparse.Namespace) -> int:
    from secagg.service.demo import run_args

    return run_args(args)


# -- secagg privacy (service/privacy.py; docs/dp.md, "Ledger in the service") ---------------


def _add_privacy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("privacy", help="print a job's DP ledger (rounds, rho, epsilon spent)")
    p.add_argument("--job", required=True, help="the job whose ledger to print")
    p.add_argument("--store", help="SQLite file (default: secagg.db; $SECAGG_STORE)")
    p.add_argument("--json", action="store_true", help="one JSON object")


def _cmd_privacy(args: argparse.Namespace) -> int:
    from secagg.service.privacy import JobLedger
    from secagg.service.store import Store

    path = args.store or os.environ.get("SECAGG_STORE", "secagg.db")
    if not Path(path).exists():
        raise ConfigurationError(f"no store at {path} (give --store or $SECAGG_STORE)")
    store = Store(path)
    try:
        doc = JobLedger(store, args.job).as_dict()
    finally:
        store.close()
    if args.json:
        print(json.dumps(doc))
        return 0
    q = "" if doc["rigorous"] else f", sampling rate {doc['sampling_rate']} (Gaussian view)"
    print(
        f"job {doc['job']}: budget epsilon {doc['epsilon_budget']:g} at delta "
        f"{doc['delta']:.3g}{q}; {doc['rounds_charged']} rounds, spent {doc['epsilon_spent']:.4f}"
        f" (RDP), {doc['epsilon_pld']:.4f} (PLD), left {doc['budget_left']:.4f}"
    )
    head = f"{'round':<34} {'contrib':>7} {'target std':>10} {'rho':>10} "
    print(head + f"{'eps (RDP)':>10} {'eps (PLD)':>10} {'left':>9}")
    for r in doc["rounds"]:
        print(
            f"{r['round_id']:<34} {r['contributor_count']:>7} {r['target_std']:>10.4g} "
            f"{r['rho']:>10.4g} {r['epsilon_rdp']:>10.4f} {r['epsilon_pld']:>10.4f} "
            f"{r['budget_left']:>9.4f}"
        )
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _run_demo,
    "simulate": _run_simulate,
    "serve": _run_serve,
    "keygen": _run_keygen,
    "enroll": _run_enroll,
    "audit": _run_audit,
    "round": _run_round,
    "job": _run_job,
    "authority": _run_authority,
    "provision": _run_provision,
    "operator": _run_operator,
    "site": _run_site,
    "privacy": _cmd_privacy,
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``secagg round: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] not in (["serve"], ["demo"]) and "grpc" not in sys.modules:
        # gRPC's own log lines would break the one-line errors of the client commands (the
        # error names the reason); serve keeps them and logs them as JSON (service.logs).
        # Read when gRPC loads, so it is set before anything imports grpc.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from secagg.service.errors import exit_code_for

    parser: argparse.ArgumentParser = _Parser(prog="secagg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_serve(sub)
    _add_enroll(sub)
    _add_keygen(sub)
    _add_audit(sub)
    _add_round(sub)
    _add_job(sub)
    _add_authority(sub)
    _add_provision(sub)
    _add_operator(sub)
    _add_site(sub)
    _add_privacy(sub)
    _add_demo(sub)
    args = parser.parse_args(argv)
    run = _COMMANDS.get(args.command)
    if run is None:
        parser.error(f"unknown command {args.command}")
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (SecAggError, OSError) as exc:
        print(f"secagg: {_one_line(exc)}", file=sys.stderr)
        return exit_code_for(exc)
    except Exception as exc:  # a bug: one line, the traceback with SECAGG_DEBUG=1
        if os.environ.get("SECAGG_DEBUG"):
            raise
        print(f"secagg: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line: configuration errors as they are, others with
    their class name; an ``OSError`` names the file."""
    if isinstance(exc, OSError) and not isinstance(exc, SecAggError):
        where = f" {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror or exc}:{where}" if where else str(exc.strerror or exc)
    elif isinstance(exc, ConfigurationError) and type(exc).__module__ == "secagg.errors":
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
