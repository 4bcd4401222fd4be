"""The ``secagg`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from secagg.errors import ConfigurationError, InfeasibleParameters, SecAggError

__all__ = ["main"]

EXIT_ABORTED = 3
EXIT_CONFIG = 2


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
    lines.append(f"bytes: {r['bytes']}")
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="secagg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate":
            return _run_simulate(args)
    except (InfeasibleParameters, ConfigurationError) as exc:
        print(f"secagg: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SecAggError as exc:
        print(f"secagg: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
