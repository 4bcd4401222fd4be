"""Accuracy against epsilon on the demo's data: secure DP-FedAvg, central DP, FedAvg.

``python -m secagg.service.demo.dp_plot --out demo-out`` (``make demo-dp``) trains the demo's
model (:mod:`secagg.service.demo.model`) on the demo's data (breast_cancer, 8 non-IID sites,
:mod:`secagg.service.demo.data`) with the demo's dropout schedule
(:meth:`secagg.service.demo.DemoConfig.drop_schedule`: the last site silent every 4th round)
and writes ``dp_accuracy.png`` and ``dp_accuracy.json``. For each ``epsilon`` over the whole
run (``delta = 1e-5``):

* **secure DP-FedAvg**: every round each site's delta is clipped to L2 norm ``C`` and goes
  through the real distributed mechanism in process, :func:`secagg.dp.simulation.run_dp_aggregate`
  (calibrated by :func:`secagg.dp.calibration.calibrate` for the run, the masked round's
  ``n`` and threshold; rotation, conditional rounding, exact discrete Gaussian components
  from ChaCha20, removal of the survivors' excess components, decoding), with the round's
  actual survivors: exactly the sum the masked round releases (masks cancel mod ``2^b``).
  Each round is charged its ``rho`` for those survivors in a
  :class:`~secagg.dp.accountant.PrivacyLedger`;
* **central DP**: the same clipped site deltas, summed by a trusted curator that sees the
  pooled updates, plus continuous Gaussian noise ``N(0, sigma^2 I)`` with
  ``sigma = C / sqrt(2 rho)`` and ``rho`` from the same RDP accountant
  (:func:`secagg.dp.accountant.rho_for_epsilon`). This is the fair comparison: the same unit
  of privacy (one site's whole contribution per round, what DP-FedAvg protects), the same
  model, rounds, clipping and dropouts, and the same accountant, so the gap measures only
  what distributing the noise costs (integer scaling and rounding of ``Delta_2``, the ``tau``
  term, the excess noise left for dropouts). Example-level DP-SGD on the pooled data would
  protect a different unit (one record) and its epsilon would not be comparable;
* **FedAvg** (non-private, the demo's sample-weighted float FedAvg), and the same unweighted,
  clipped average with no noise (``epsilon = inf``) to show what clipping alone costs.

Both DP variants average with the public survivor count (``sum / s``), the DP-FedAvg
estimator of McMahan et al. (ICLR 2018) with server learning rate ``--server-lr``. The
central baseline's Gaussian comes from a seeded numpy ``Generator``: an evaluation only, no
deployment draws noise this way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["PlotConfig", "main", "plot", "run"]

F64 = npt.NDArray[np.float64]
Aggregate = Callable[[int, list[int], list[F64]], F64]
"""``(round, survivors, their deltas) -> mean update``."""


@dataclass(frozen=True)
class PlotConfig:
    """What ``dp_plot`` runs (the defaults: the demo's data, model and dropout schedule)."""

    epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    delta: float = 1e-5
    seeds: tuple[int, ...] = tuple(range(8))
    rounds: int = 30
    sites: int = 8
    dataset: str = "breast_cancer"
    dp_clip: float = 0.5
    server_lr: float = 1.0
    min_survivors: int | None = None
    workers: int = 2
    out: Path = Path("demo-out")
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _flat(state: dict[str, npt.NDArray[np.float32]]) -> F64:
    return np.concatenate([v.astype(np.float64).ravel() for v in state.values()])


def _unflat(
    vec: F64, like: dict[str, npt.NDArray[np.float32]]
) -> dict[str, npt.NDArray[np.float32]]:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.size].reshape(v.shape).astype(np.float32)
        i += v.size
    return out


def _train(
    split: Any,
    train: Any,
    seed: int,
    rounds: int,
    dropped: dict[int, int],
    aggregate: Aggregate,
    server_lr: float,
) -> float:
    """FedAvg with ``aggregate`` as the server's averaging; final test accuracy."""
    from secagg.service.demo.baselines import train_seed
    from secagg.service.demo.model import accuracy, build, get_state, set_state, train_local

    model = build(split.n_features, split.n_classes, train, seed)
    state = get_state(model)
    for r in range(1, rounds + 1):
        active = [s for s in range(len(split.sites)) if dropped.get(r) != s]
        g = _flat(state)
        deltas = []
        for s in active:
            x, y = split.sites[s]
            set_state(model, state)
            train_local(model, x, y, train, train_seed(seed, r, s))
            deltas.append(_flat(get_state(model)) - g)
        state = _unflat(g + server_lr * aggregate(r, active, deltas), state)
    set_state(model, state)
    return accuracy(model, split.x_test, split.y_test)


def _clipped_mean(clip: float) -> Aggregate:
    from secagg.dp.encoding import clip_l2

    def agg(_r: int, active: list[int], deltas: list[F64]) -> F64:
        total: F64 = np.sum([clip_l2(d, clip) for d in deltas], axis=0)
        return total / len(active)

    return agg


def _central(clip: float, rho: float, seed: int) -> Aggregate:
    from secagg.dp.encoding import clip_l2

    rng = np.random.default_rng([seed, 0xD9])  # evaluation baseline only (module docstring)
    sigma = clip / math.sqrt(2.0 * rho)

    def agg(_r: int, active: list[int], deltas: list[F64]) -> F64:
        total: F64 = np.sum([clip_l2(d, clip) for d in deltas], axis=0)
        noisy: F64 = total + rng.normal(0.0, sigma, total.shape)
        return noisy / len(active)

    return agg


def _secure(cal: Any, ledger: Any, stats: dict[str, list[float]]) -> Aggregate:
    from secagg.dp.simulation import run_dp_aggregate

    n = cal.plan.n_clients

    def agg(r: int, active: list[int], deltas: list[F64]) -> F64:
        inputs: list[F64] = [np.zeros(cal.dim) for _ in range(n)]
        for s, d in zip(active, deltas, strict=True):
            inputs[s] = d
        res = run_dp_aggregate(cal, inputs, active)
        rep = res.report
        ledger.charge(
            f"round-{r}",
            float(rep["rho_round"]),  # type: ignore[arg-type]
            contributors=len(active),
            released_variance=cal.plan.residual_variance(len(active)),
            honest_variance=cal.plan.honest_variance(len(active)),
        )
        stats["measured_std"].append(float(rep["measured_std"]))  # type: ignore[arg-type]
        stats["released_std"].append(float(rep["released_std"]))  # type: ignore[arg-type]
        return np.asarray(res.aggregate, dtype=np.float64) / len(active)

    return agg


def _min_survivors(cfg: PlotConfig, shamir_t: int) -> int:
    """The DP plan's ``t``: rounds with fewer contributors abort (clients refuse to reveal).

    Default ``n - 2``: two silent sites tolerated, twice what the demo's schedule needs;
    never below the masked round's Shamir threshold. A lower ``t`` adds noise components
    (levels ``t .. n``) and server work, not released noise.
    """
    t = cfg.sites - 2 if cfg.min_survivors is None else cfg.min_survivors
    if not shamir_t <= t <= cfg.sites - 1:
        raise ValueError(f"--min-survivors must be in [{shamir_t}, {cfg.sites - 1}], got {t}")
    return t


def _say(cfg: PlotConfig, text: str) -> None:
    if cfg.progress:
        print(text, file=sys.stderr, flush=True)


def _mean_std(xs: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "sem": statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
    }


@dataclass(frozen=True)
class _Setup:
    """What every seed shares: the demo's training, schedule, shape and calibrations."""

    train: Any
    alpha: float
    dropped: dict[int, int]
    dim: int
    shamir_t: int
    min_survivors: int
    calibrations: dict[float, Any]


def _setup(cfg: PlotConfig) -> _Setup:
    from secagg.dp.calibration import calibrate
    from secagg.params import make_params
    from secagg.service.demo import DemoConfig
    from secagg.service.demo.data import load_split
    from secagg.service.demo.model import TrainConfig, build, get_state

    demo = DemoConfig(sites=cfg.sites, rounds=cfg.rounds, dataset=cfg.dataset)
    train = TrainConfig(hidden=demo.hidden, epochs=demo.epochs, batch=demo.batch, lr=demo.lr)
    split = load_split(cfg.dataset, cfg.sites, seed=cfg.seeds[0], alpha=demo.alpha)
    dim = int(_flat(get_state(build(split.n_features, split.n_classes, train, 0))).size)
    shamir_t = make_params(cfg.sites, dim).threshold  # the masked round's t
    t = _min_survivors(cfg, shamir_t)
    cals = {
        eps: calibrate(
            eps,
            cfg.delta,
            cfg.rounds,
            n_clients=cfg.sites,
            min_survivors=t,
            dim=dim,
            clip=cfg.dp_clip,
        )
        for eps in cfg.epsilons
    }
    return _Setup(train, demo.alpha, demo.drop_schedule(), dim, shamir_t, t, cals)


def _run_seed(cfg: PlotConfig, su: _Setup, seed: int) -> dict[str, Any]:
    """Every method and epsilon for one seed (split, initial weights, local shuffles)."""
    from secagg.dp.accountant import PrivacyLedger, rho_for_epsilon
    from secagg.service.demo.baselines import plaintext_fedavg
    from secagg.service.demo.data import load_split

    split = load_split(cfg.dataset, cfg.sites, seed=seed, alpha=su.alpha)
    plain, _ = plaintext_fedavg(split, su.train, seed, cfg.rounds, su.dropped)
    out: dict[str, Any] = {
        "seed": seed,
        "fedavg": plain[-1],
        "clipped_no_noise": _train(
            split,
            su.train,
            seed,
            cfg.rounds,
            su.dropped,
            _clipped_mean(cfg.dp_clip),
            cfg.server_lr,
        ),
        "by_epsilon": {},
    }
    for k, eps in enumerate(cfg.epsilons):
        cal = su.calibrations[eps]
        ledger = PrivacyLedger(eps, cfg.delta)
        stats: dict[str, list[float]] = {"measured_std": [], "released_std": []}
        secure = _train(
            split,
            su.train,
            seed,
            cfg.rounds,
            su.dropped,
            _secure(cal, ledger, stats),
            cfg.server_lr,
        )
        rho = rho_for_epsilon(eps, cfg.delta, cfg.rounds)
        central = _train(
            split,
            su.train,
            seed,
            cfg.rounds,
            su.dropped,
            _central(cfg.dp_clip, rho, seed * 1009 + k),
            cfg.server_lr,
        )
        out["by_epsilon"][str(eps)] = {
            "secure": secure,
            "central": central,
            "secure_epsilon_spent_rdp": ledger.spent(),
            "secure_measured_std_sum": statistics.fmean(stats["measured_std"]),
        }
        _say(cfg, f"  seed {seed} epsilon {eps:g}: secure {secure:.4f}, central {central:.4f}")
    _say(cfg, f"  seed {seed}: FedAvg {out['fedavg']:.4f}, clipped {out['clipped_no_noise']:.4f}")
    return out


def _argv(cfg: PlotConfig, seeds: Sequence[int], partial: Path) -> list[str]:
    """The command line of a worker process for ``seeds`` (results as JSON, never pickle)."""
    argv = [
        sys.executable, "-m", "secagg.service.demo.dp_plot",
        "--out", str(cfg.out),
        "--epsilons", ",".join(repr(e) for e in cfg.epsilons),
        "--delta", repr(cfg.delta),
        "--seeds", ",".join(str(x) for x in seeds),
        "--rounds", str(cfg.rounds),
        "--sites", str(cfg.sites),
        "--dataset", cfg.dataset,
        "--dp-clip", repr(cfg.dp_clip),
        "--server-lr", repr(cfg.server_lr),
        "--workers", "1",
        "--partial", str(partial),
    ]  # fmt: skip
    if cfg.min_survivors is not None:
        argv += ["--min-survivors", str(cfg.min_survivors)]
    if not cfg.progress:
        argv.append("--no-progress")
    return argv


def _run_seeds(cfg: PlotConfig, su: _Setup) -> list[dict[str, Any]]:
    """Per-seed results, over ``cfg.workers`` processes (seeds are independent)."""
    import subprocess
    import tempfile

    workers = max(1, min(cfg.workers, len(cfg.seeds)))
    if workers == 1:
        return [_run_seed(cfg, su, seed) for seed in cfg.seeds]
    chunks = [list(cfg.seeds[i::workers]) for i in range(workers)]
    with tempfile.TemporaryDirectory(prefix="dp_plot-") as tmp:
        parts = [Path(tmp) / f"part-{i}.json" for i in range(workers)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(_argv(cfg, chunk, part), env=env)  # noqa: S603 - our own module
            for chunk, part in zip(chunks, parts, strict=True)
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"dp_plot workers failed with exit codes {codes}")
        results = [r for part in parts for r in json.loads(part.read_text())]
    order = {seed: i for i, seed in enumerate(cfg.seeds)}
    return sorted(results, key=lambda r: order[r["seed"]])


def run(cfg: PlotConfig) -> dict[str, Any]:
    """Train every method for every epsilon and seed; write the JSON and the PNG."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from secagg.dp.accountant import epsilon_pld, epsilon_rdp, rho_for_epsilon

    t0 = time.perf_counter()
    su = _setup(cfg)
    _say(
        cfg,
        f"dp_plot: {cfg.dataset}, {cfg.sites} sites, {cfg.rounds} rounds, {su.dim} parameters, "
        f"DP plan t={su.min_survivors} (masked round t={su.shamir_t}), site {cfg.sites} silent "
        f"in rounds {sorted(su.dropped)}; epsilons {list(cfg.epsilons)}, seeds "
        f"{list(cfg.seeds)} on {max(1, min(cfg.workers, len(cfg.seeds)))} processes",
    )
    per_seed = _run_seeds(cfg, su)
    rows = []
    for eps in cfg.epsilons:
        cal = su.calibrations[eps]
        rho = rho_for_epsilon(eps, cfg.delta, cfg.rounds)
        got = [r["by_epsilon"][str(eps)] for r in per_seed]
        sec = [g["secure"] for g in got]
        cen = [g["central"] for g in got]
        gaps = [100 * (c - x) for c, x in zip(cen, sec, strict=True)]
        rows.append(
            {
                "epsilon": eps,
                "secure_dp_fedavg": {**_mean_std(sec), "per_seed": sec},
                "central_dp": {**_mean_std(cen), "per_seed": cen},
                "gap_pp": statistics.fmean(gaps),
                "gap_pp_sem": _mean_std(gaps)["sem"],
                "secure_epsilon_spent_rdp": max(g["secure_epsilon_spent_rdp"] for g in got),
                "secure_rho_per_round_worst": cal.rho_per_round,
                "secure_target_std_sum": cal.target_std,
                "secure_measured_std_sum": statistics.fmean(
                    g["secure_measured_std_sum"] for g in got
                ),
                "secure_bits": cal.bits,
                "secure_components": cal.plan.components,
                "secure_gamma": cal.gamma,
                "secure_epsilon_pld": cal.epsilon_pld,
                "central_rho_per_round": rho,
                "central_sigma_sum": cfg.dp_clip / math.sqrt(2 * rho),
                "central_epsilon_rdp": epsilon_rdp(rho, cfg.delta, cfg.rounds),
                "central_epsilon_pld": epsilon_pld(rho, cfg.delta, cfg.rounds),
            }
        )
    fedavg = [r["fedavg"] for r in per_seed]
    clipped = [r["clipped_no_noise"] for r in per_seed]
    at2 = next((r for r in rows if r["epsilon"] == 2.0), None)
    summary: dict[str, Any] = {
        "config": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("out", "extra", "progress")},
            "out": str(cfg.out),
            "dim": su.dim,
            "min_survivors": su.min_survivors,
            "shamir_threshold": su.shamir_t,
            "drop_schedule": {"site": cfg.sites, "rounds": sorted(su.dropped)},
            "local_training": asdict(su.train),
        },
        "fedavg": {**_mean_std(fedavg), "per_seed": fedavg},
        "clipped_no_noise": {**_mean_std(clipped), "per_seed": clipped},
        "by_epsilon": rows,
        "gap_at_epsilon_2_pp": None if at2 is None else at2["gap_pp"],
        "gap_at_epsilon_2_pp_sem": None if at2 is None else at2["gap_pp_sem"],
        "accountant": "dp-accounting RDP (of record), delta over the whole run",
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    png = cfg.out / "dp_accuracy.png"
    why_not = plot(summary, png)
    summary["outputs"] = {
        "json": str(cfg.out / "dp_accuracy.json"),
        "plot": None if why_not else str(png),
    }
    summary["wall_seconds"] = time.perf_counter() - t0
    (cfg.out / "dp_accuracy.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def plot(summary: dict[str, Any], path: Path) -> str | None:
    """Accuracy against epsilon (log scale), mean and standard error over seeds; why not,
    if it cannot (no matplotlib)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "matplotlib is not installed"
    rows = summary["by_epsilon"]
    eps = [r["epsilon"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)
    for key, label, color, shift in [
        ("secure_dp_fedavg", "secure DP-FedAvg (distributed discrete Gaussian)", "C0", 0.97),
        ("central_dp", "central DP (Gaussian on the pooled update)", "C1", 1.03),
    ]:
        ax.errorbar(
            [e * shift for e in eps],
            [r[key]["mean"] for r in rows],
            yerr=[r[key]["sem"] for r in rows],
            marker="o",
            capsize=3,
            color=color,
            label=f"{label}, mean +- s.e.",
        )
    ax.axhline(summary["fedavg"]["mean"], color="k", ls="--", lw=1, label="FedAvg (no DP)")
    ax.axhline(
        summary["clipped_no_noise"]["mean"],
        color="0.5",
        ls=":",
        lw=1,
        label="clipped, unweighted, no noise",
    )
    c = summary["config"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel(f"epsilon over the whole run ({c['rounds']} rounds, delta {c['delta']:g})")
    ax.set_ylabel("test accuracy")
    gap = summary.get("gap_at_epsilon_2_pp")
    note = "" if gap is None else f"; gap to central at epsilon 2: {gap:+.1f} pp"
    ax.set_title(
        f"{c['dataset']}: {c['sites']} sites, site {c['sites']} drops in rounds "
        f"{c['drop_schedule']['rounds'][:3]}..., {len(c['seeds'])} seeds{note}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m secagg.service.demo.dp_plot``: 0 when the files were written."""
    d = PlotConfig()
    p = argparse.ArgumentParser(
        prog="python -m secagg.service.demo.dp_plot",
        description="Accuracy against epsilon: secure DP-FedAvg, central DP and FedAvg on the "
        "demo's data; writes dp_accuracy.png and dp_accuracy.json to --out.",
    )
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--epsilons", type=_floats, default=d.epsilons, help="comma-separated")
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--seeds", type=_ints, default=d.seeds, help="comma-separated")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--sites", type=int, default=d.sites)
    p.add_argument("--dataset", choices=["breast_cancer", "digits"], default=d.dataset)
    p.add_argument("--dp-clip", type=float, default=d.dp_clip, help="L2 clip of a site's delta")
    p.add_argument("--server-lr", type=float, default=d.server_lr)
    p.add_argument(
        "--min-survivors",
        type=int,
        default=None,
        help="the DP plan's t (default sites - 2; at least the masked round's threshold)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="processes (seeds split)")
    p.add_argument("--partial", type=Path, help=argparse.SUPPRESS)  # a worker's results file
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not (args.epsilons and args.seeds and args.rounds >= 1 and 3 <= args.sites <= 64):
        p.error("need epsilons, seeds, --rounds >= 1 and --sites in 3..64")
    cfg = PlotConfig(
        epsilons=args.epsilons,
        delta=args.delta,
        seeds=args.seeds,
        rounds=args.rounds,
        sites=args.sites,
        dataset=args.dataset,
        dp_clip=args.dp_clip,
        server_lr=args.server_lr,
        min_survivors=args.min_survivors,
        workers=args.workers,
        out=args.out,
        progress=not args.no_progress,
    )
    if args.partial is not None:  # a worker: its seeds' results, as JSON
        su = _setup(cfg)
        args.partial.write_text(json.dumps([_run_seed(cfg, su, seed) for seed in cfg.seeds]))
        return 0
    summary = run(cfg)
    gap = summary["gap_at_epsilon_2_pp"]
    lines = [f"{'epsilon':>7} {'secure DP-FedAvg':>17} {'central DP':>11} {'gap pp':>7}"]
    for r in summary["by_epsilon"]:
        lines.append(
            f"{r['epsilon']:>7g} {100 * r['secure_dp_fedavg']['mean']:>16.2f}% "
            f"{100 * r['central_dp']['mean']:>10.2f}% {r['gap_pp']:>+7.2f}"
        )
    lines.append(
        f"FedAvg (no DP) {100 * summary['fedavg']['mean']:.2f}%, clipped without noise "
        f"{100 * summary['clipped_no_noise']['mean']:.2f}%"
    )
    if gap is not None:
        lines.append(
            f"gap to central DP at epsilon 2: {gap:+.2f} pp (central minus secure, mean over "
            f"{len(cfg.seeds)} seeds, standard error {summary['gap_at_epsilon_2_pp_sem']:.2f})"
        )
    out = summary["outputs"]
    lines.append(
        f"wrote {out['json']}"
        + (f", {out['plot']}" if out["plot"] else " (no plot)")
        + f"; wall time {summary['wall_seconds']:.1f}s"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    # One Numba thread: the noise vectors here are 1,024 long, where a thread pool's start-up
    # costs more than it saves (7x slower on the shared 2-core box). Read when Numba loads;
    # set only for the command, never by main() in a host process (Numba refuses a change of
    # NUMBA_NUM_THREADS once its threads run).
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    sys.exit(main())
