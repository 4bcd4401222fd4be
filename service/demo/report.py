"""The demo's output: a progress bar while it runs, then a table, a PNG and a JSON summary."""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Progress", "format_overhead", "format_table", "plot_accuracy"]


class Progress:
    """A progress bar on ``stream``: redrawn in place on a terminal, milestones otherwise."""

    WIDTH = 30

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self._label = ""
        self._total = 1
        self._t0 = 0.0
        self._shown = -1

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._t0, self._shown = label, max(total, 1), time.monotonic(), -1
        self.update(0)

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        quarter = 4 * done // self._total
        if not self.tty and quarter == self._shown:
            return
        self._shown = quarter
        fill = self.WIDTH * done // self._total
        bar = "#" * fill + "." * (self.WIDTH - fill)
        line = (
            f"{self._label:<24} [{bar}] {done:>3}/{self._total} "
            f"{time.monotonic() - self._t0:6.1f}s {note}"
        )
        self.stream.write(("\r\x1b[K" + line) if self.tty else line + "\n")
        self.stream.flush()

    def finish(self, note: str = "") -> None:
        if not self.enabled:
            return
        self._shown = -1
        self.update(self._total, note)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _pct(x: float) -> str:
    return f"{100 * x:6.2f}%"


def _kib(x: float | None) -> str:
    return "" if x is None else f"{x / 1024:.1f}"


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def format_table(summary: dict[str, Any]) -> str:
    """The final table: accuracy, time and bytes per round of every method."""
    methods = summary["methods"]
    head = (
        f"{'method':<34} {'final acc':>9} {'vs plain':>9} {'s/round':>8} "
        f"{'s/drop rnd':>10} {'KiB up/site':>11} {'KiB down/site':>13}"
    )
    lines = [head, "-" * len(head)]
    c = methods["centralized"]
    lines.append(
        f"{'centralized (pooled data)':<34} {_pct(c['final_accuracy']):>9} {'':>9} "
        f"{c['seconds_per_epoch']:8.3f}"
    )
    f = methods["fedavg"]
    lines.append(
        f"{'plaintext FedAvg (float, no secagg)':<34} {_pct(f['final_accuracy']):>9} {'':>9} "
        f"{f['seconds_per_round']:8.3f} {'':>10} {_kib(f['bytes_up']) + '*':>11} "
        f"{_kib(f['bytes_down']) + '*':>13}"
    )
    for mode in summary["config"]["modes"]:
        m = methods[mode]
        label = f"secure FedAvg: {mode}" + (" (INSECURE)" if mode == "plaintext" else "")
        if not m["available"]:
            lines.append(f"{label:<34} not available ({m['reason']})")
            continue
        delta = 100 * (m["final_accuracy"] - f["final_accuracy"])
        drop = m["seconds_per_round_with_drop"]
        lines.append(
            f"{label:<34} {_pct(m['final_accuracy']):>9} {delta:+7.2f}pp "
            f"{m['seconds_per_round']:8.3f} {'' if drop is None else f'{drop:10.3f}':>10} "
            f"{_kib(m['bytes_up']):>11} {_kib(m['bytes_down']):>13}"
        )
    diffs = [
        f"{mode} {methods[mode]['max_weight_diff_vs_plaintext']:.2e}"
        for mode in summary["config"]["modes"]
        if methods[mode]["available"]
    ]
    if diffs:
        cfg = summary["config"]
        step = 2 * cfg["clip"] / (2 ** cfg["bits"] - 1)
        lines.append(
            f"final weights vs plaintext FedAvg, max |diff|: {', '.join(diffs)} "
            f"(one quantization step of the deltas: {step:.2e})"
        )
    lines.append(
        "* plaintext FedAvg: the raw float32 update a site would send and receive; secure "
        "rows: gRPC bytes measured per site."
    )
    lines.append(
        "s/round: wall time of a round without a dropout (local training + aggregation); "
        "s/drop rnd: rounds where a site went silent (the server drops it once its connection "
        "has been closed for the disconnect grace)."
    )
    return "\n".join(lines)


def format_overhead(summary: dict[str, Any]) -> str:
    """What secure aggregation costs over plaintext FedAvg, per round and per site."""
    lines = []
    for mode, o in summary.get("overhead", {}).items():
        lines.append(
            f"secure overhead ({mode}) vs plaintext FedAvg: a site spends "
            f"{o['site_secagg_seconds_per_round']:.2f}s per round in secure aggregation "
            f"(local training {o['site_train_seconds_per_round']:.2f}s; plaintext FedAvg's "
            f"exchange costs nothing in process), round wall time {o['seconds_per_round']:.2f}s; "
            f"{_kib(o['bytes_up_per_site'])} KiB up / {_kib(o['bytes_down_per_site'])} KiB "
            f"down per site per round vs {_kib(o['plaintext_bytes_per_site'])} KiB of raw "
            f"float32 ({o['bytes_up_ratio']:.2f}x up)"
        )
    return "\n".join(lines)


def plot_accuracy(summary: dict[str, Any], path: Path) -> str | None:
    """Test accuracy per round of every method (PNG); returns why not, if it cannot."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "matplotlib is not installed"
    methods = summary["methods"]
    rounds = summary["config"]["rounds"]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    xs = list(range(1, rounds + 1))
    for r in summary["drop_schedule"]["rounds"]:
        ax.axvspan(r - 0.5, r + 0.5, color="0.92", lw=0)
    ax.axhline(
        methods["centralized"]["final_accuracy"],
        color="k",
        ls="--",
        lw=1,
        label="centralized (final)",
    )
    ax.plot(
        xs, methods["fedavg"]["accuracy"], color="0.3", lw=2.5, alpha=0.6, label="plaintext FedAvg"
    )
    styles = {"masked": "C0", "ckks": "C1", "hybrid": "C2", "plaintext": "C3"}
    for mode in summary["config"]["modes"]:
        m = methods[mode]
        if m["available"]:
            ax.plot(
                xs,
                m["accuracy"],
                color=styles.get(mode, "C4"),
                lw=1.2,
                marker=".",
                label=f"secure FedAvg ({mode})",
            )
    d = summary["dataset"]
    ax.set_title(
        f"{d['name']}: {len(d['sites'])} sites (non-IID), "
        f"{summary['drop_schedule']['site']} drops in shaded rounds"
    )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
