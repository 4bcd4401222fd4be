"""The ``secagg`` command line: serve, enroll, keygen, authority, audit, round, simulate."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from secagg.errors import ConfigurationError, InfeasibleParameters, SecAggError, StoreError

if TYPE_CHECKING:
    from secagg.service._gen.admin_pb2 import RoundStatus
    from secagg.service.admin import AdminClient

__all__ = ["main"]

EXIT_ABORTED = 3
EXIT_CONFIG = 2
EXIT_AUDIT = 4


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
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("transport (--transport grpc: a real server and clients on loopback)")
    g.add_argument("--transport", default="inprocess", choices=["inprocess", "grpc"])
    g.add_argument("--workers", default="threads", choices=["threads", "processes"])
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
    )
    if args.transport == "grpc":
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
    print("\n".join(lines))


def _add_remote(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server connection (admin token from $SECAGG_ADMIN_TOKEN)")
    g.add_argument("--server", help="host:port of a running server")
    g.add_argument("--ca", help="CA certificate of the server (PEM); enables TLS")
    g.add_argument("--cert", help="client certificate for mutual TLS (PEM)")
    g.add_argument("--key", help="client private key for mutual TLS (PEM)")
    g.add_argument("--server-name", help="name to check in the server certificate")
    g.add_argument("--admin-token-file", help="read the admin token from this file")
    g.add_argument(
        "--insecure-no-tls",
        action="store_true",
        help="INSECURE: talk to a non-loopback server without TLS (token sent in the clear)",
    )


def _admin(args: argparse.Namespace) -> AdminClient:
    from secagg.service.admin import AdminClient
    from secagg.service.tls import ClientTls

    token = os.environ.get("SECAGG_ADMIN_TOKEN", "")
    if args.admin_token_file:
        token = Path(args.admin_token_file).read_text().strip()
    if not token:
        raise ConfigurationError("set SECAGG_ADMIN_TOKEN or --admin-token-file")
    tls = None
    if args.ca or args.cert:
        tls = ClientTls(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
    return AdminClient(args.server, token, tls=tls, insecure_no_tls=args.insecure_no_tls)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the gRPC server (SIGTERM stops it gracefully)")
    p.add_argument("--config", help="TOML config file (see docs/operations.md)")
    p.add_argument("--listen", help="host:port (default 127.0.0.1:50051)")
    p.add_argument("--store", help="SQLite file (default secagg.db; $SECAGG_STORE)")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--client-ca", help="CA of client certificates: turns on mutual TLS")
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


def _run_serve(args: argparse.Namespace) -> int:
    from secagg.server import StageTimeouts
    from secagg.service.config import load_config
    from secagg.service.server import serve
    from secagg.service.tls import ServerTls

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
    )
    return serve(config)


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
    ck.add_argument("--dim", type=int, help="parameters per round")
    ck.add_argument("--bits", type=int, default=16)
    ck.add_argument("--max-weight", type=int, default=1)
    ck.add_argument(
        "--epoch", type=int, default=0, help="key epoch number (bump it when rotating the key)"
    )
    ck.add_argument(
        "--decryption-budget",
        type=int,
        default=32,
        help="decryptions each key holder may make under this key (1..64; docs/ckks.md)",
    )


def _run_keygen(args: argparse.Namespace) -> int:
    from secagg.service.keyfile import write_ckks_contexts, write_identity

    if args.ckks:
        from secagg.he_params import select_params

        if not args.clients or not args.dim:
            raise ConfigurationError("keygen --ckks needs --clients and --dim")
        he = select_params(args.clients, args.bits, args.dim, args.mode, args.max_weight)
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
        print(
            json.dumps(
                {
                    "he_params": he.describe(),
                    "key_epoch": {**epoch.describe(), "fingerprint": epoch.fingerprint.hex()},
                    "files": [str(secret), str(server), str(ckks.ledger_path_for(secret))],
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
    p.add_argument("--store", help="SQLite file to edit directly (default: secagg.db)")
    _add_remote(p)


def _run_enroll(args: argparse.Namespace) -> int:
    from secagg.service.keyfile import read_public_key

    rows: list[dict[str, object]]
    if args.server:
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

        store = Store(args.store or os.environ.get("SECAGG_STORE", "secagg.db"))
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
        raise ConfigurationError(f"no store at {path}")
    store = Store(path)
    try:
        entries = store.audit_entries()
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
    p = sub.add_parser("round", help="create, inspect or abort rounds on a running server")
    p.add_argument("action", choices=["create", "status", "abort"])
    p.add_argument("round_id", nargs="?", help="hex round id (status, abort)")
    p.add_argument("--job", help="federation or job name")
    p.add_argument("--participants", help="comma-separated enrolled names (ids 1..n in order)")
    p.add_argument("--dim", type=int)
    p.add_argument("--mode", default="masked", choices=["masked", "hybrid", "ckks", "plaintext"])
    p.add_argument("--he-context", help="ckks/hybrid: the server's CKKS context file (keygen)")
    p.add_argument("--publish-after", type=int, help="ckks: publish after K uploads (FedBuff)")
    p.add_argument("--bits", type=int, default=16)
    p.add_argument("--clip", type=float, default=8.0)
    p.add_argument("--max-weight", type=int, default=1)
    p.add_argument("--neighbors", default="auto")
    p.add_argument("--threshold", default="auto")
    p.add_argument(
        "--layout",
        default="",
        help="hex SHA-256 model-layout fingerprint (secagg.service.tensors.fingerprint);"
        " clients whose update has another layout refuse the round",
    )
    p.add_argument("--stage-timeout", type=float, help="seconds per stage (server default)")
    p.add_argument("--reason", default="", help="abort reason")
    p.add_argument("--wait", action="store_true", help="wait until the round ends")
    _add_remote(p)


def _run_round(args: argparse.Namespace) -> int:
    from secagg.server import StageTimeouts
    from secagg.service.coordinator import RoundSpec

    with _admin(args) as admin:
        if args.action == "create":
            spec = RoundSpec(
                job=_need(args.job, "--job"),
                participants=[n for n in _need(args.participants, "--participants").split(",")],
                dim=int(_need(str(args.dim or ""), "--dim")),
                mode=args.mode,
                bits=args.bits,
                clip=args.clip,
                max_weight=args.max_weight,
                neighbors=args.neighbors,
                threshold=args.threshold,
                deadlines=StageTimeouts.uniform(args.stage_timeout)
                if args.stage_timeout
                else StageTimeouts(0, 0, 0, 0, 0),
                he_context=Path(args.he_context).read_bytes() if args.he_context else None,
                publish_after=args.publish_after,
                layout=_layout_arg(args.layout),
            )
            st = admin.create_round(spec)
        else:
            rid = bytes.fromhex(_need(args.round_id, "round_id"))
            st = admin.abort(rid, args.reason) if args.action == "abort" else admin.status(rid)
        if args.wait:
            st = admin.wait(st.round_id)
    print(json.dumps(_status_dict(st)))
    return 0 if st.status != "aborted" else EXIT_ABORTED


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


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from secagg.service.demo import DESCRIPTION, add_arguments

    p = sub.add_parser(
        "demo", help="federated training end to end over loopback gRPC", description=DESCRIPTION
    )
    add_arguments(p)


def _run_demo(args: argparse.Namespace) -> int:
    from secagg.service.demo import run_args

    return run_args(args)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _run_demo,
    "simulate": _run_simulate,
    "serve": _run_serve,
    "keygen": _run_keygen,
    "enroll": _run_enroll,
    "audit": _run_audit,
    "round": _run_round,
    "authority": _run_authority,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="secagg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_serve(sub)
    _add_enroll(sub)
    _add_keygen(sub)
    _add_audit(sub)
    _add_round(sub)
    _add_authority(sub)
    _add_demo(sub)
    args = parser.parse_args(argv)
    run = _COMMANDS.get(args.command)
    if run is None:
        parser.error(f"unknown command {args.command}")
    try:
        return run(args)
    except (InfeasibleParameters, ConfigurationError) as exc:
        print(f"secagg: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SecAggError as exc:
        print(f"secagg: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
