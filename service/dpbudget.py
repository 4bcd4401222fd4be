"""A site's own privacy ledger: the DP rounds it contributed to, counted by the site.

The server is the adversary: it can announce ``rounds = 3`` in every offer and open a fourth,
fifth... round. :func:`secagg.dp.policy.check_offer` checks each offer alone; this ledger
checks the *sequence*. Before a DP round sends anything the site computes, with the same
accountant as the server's ledger (:func:`secagg.dp.accountant.epsilon_rdp` over zCDP
``rho``), the epsilon its past rounds plus this round's worst case (the most ``rho`` over
every survivor count ``t .. n`` the round can finish with) would reach, and refuses
(:class:`~secagg.service.errors.SiteBudgetExhausted`) when that passes its policy's
``max_epsilon``, or when it already joined ``max_rounds`` rounds. The reservation (the
worst case) is written before the first message; when the round returns a result it is
replaced by the round's ``rho`` for the contributor count the site saw. A round that ended
without a result keeps its worst case (the server may have learnt the sum anyway).

The state is a JSON file (mode 0600, replaced atomically, ``flock``-ed across processes)
or, without a path, kept in memory for the life of the client. Rounds are counted under the
policy's ``expected_job`` when set, else all DP rounds of the site share one budget (``*``):
a server that names each round's job differently gains nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from secagg.dp.accountant import epsilon_rdp
from secagg.dp.calibration import round_rho
from secagg.dp.encoding import rounded_norm_bound_sq
from secagg.dp.policy import DPOffer, DPPolicy
from secagg.dp.rotation import padded_dim
from secagg.errors import ConfigurationError
from secagg.service.errors import SiteBudgetExhausted

__all__ = ["ANY_JOB", "STATE_FILE", "SiteBudget", "worst_rho"]

ANY_JOB = "*"
"""Key of the rounds of a site whose policy names no ``expected_job``."""
STATE_FILE = "dp_state.json"
"""File name of the state in a site kit's directory (``Client.from_kit``)."""
_VERSION = 1


def _rho(offer: DPOffer, survivors: int) -> float:
    d = padded_dim(offer.dim)
    delta2_sq = rounded_norm_bound_sq(offer.clip, offer.gamma, d, offer.beta)
    return round_rho(offer.plan, survivors, delta2_sq, d)


def worst_rho(offer: DPOffer) -> float:
    """The most ``rho`` the round can cost, over every survivor count ``t .. n``."""
    plan = offer.plan
    return max(_rho(offer, s) for s in range(plan.min_survivors, plan.n_clients + 1))


class SiteBudget:
    """The site's DP rounds, per job key, in ``path`` (JSON) or in memory (``path=None``)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._memory: dict[str, Any] = {"version": _VERSION, "jobs": {}}

    # -- state ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """The state, locked (thread and ``flock``), written back when the block succeeds."""
        with self._lock:
            if self.path is None:
                yield self._memory
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                state = self._read()
                yield state
                tmp = self.path.with_name(self.path.name + ".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(state, f, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.path)
            finally:
                os.close(lock)

    def _read(self) -> dict[str, Any]:
        assert self.path is not None
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {"version": _VERSION, "jobs": {}}
        try:
            state = json.loads(text)
            if state.get("version") != _VERSION or not isinstance(state.get("jobs"), dict):
                raise ValueError("unknown version or layout")
            for rounds in state["jobs"].values():
                for r in rounds:
                    float(r["rho"]), str(r["round_id"]), int(r["contributors"])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigurationError(f"DP state file {self.path} is malformed: {exc}") from None
        return dict(state)

    def rounds(self, job: str = ANY_JOB) -> list[dict[str, Any]]:
        """The rounds recorded under ``job``: ``round_id``, ``rho``, ``contributors`` (0 while
        only the worst case is reserved)."""
        with self._state() as state:
            return [dict(r) for r in state["jobs"].get(job, [])]

    def spent(self, policy: DPPolicy, job: str = ANY_JOB) -> float:
        """Epsilon (RDP, at the policy's ``delta``) of the rounds recorded under ``job``."""
        rhos = [float(r["rho"]) for r in self.rounds(job)]
        return epsilon_rdp(rhos, policy.delta) if rhos else 0.0

    # -- the two calls of the client --------------------------------------------------------

    def reserve(self, job: str, round_id: bytes, offer: DPOffer, policy: DPPolicy) -> float:
        """Before a DP round sends anything: refuse it, or record its worst case.

        Returns the epsilon the site reaches in that worst case. A round already recorded
        (a reconnect, a second call) is not counted twice.

        Raises
        ------
        SiteBudgetExhausted
            The site already joined ``policy.max_rounds`` rounds under ``job``, or the worst
            case would pass ``policy.max_epsilon``.
        """
        rid = round_id.hex()
        rho = worst_rho(offer)
        with self._state() as state:
            rounds: list[dict[str, Any]] = state["jobs"].setdefault(job, [])
            if any(r["round_id"] == rid for r in rounds):
                return epsilon_rdp([float(r["rho"]) for r in rounds], policy.delta)
            if len(rounds) >= policy.max_rounds:
                raise SiteBudgetExhausted(
                    f"this site already joined {len(rounds)} DP rounds of {job!r}, its policy's "
                    f"max_rounds {policy.max_rounds}: round {rid} refused, nothing sent"
                )
            eps = epsilon_rdp([float(r["rho"]) for r in rounds] + [rho], policy.delta)
            if eps > policy.max_epsilon:
                raise SiteBudgetExhausted(
                    f"round {rid} (worst case rho {rho:.4g}) would bring this site's epsilon "
                    f"for {job!r} to {eps:.4g} > its policy's {policy.max_epsilon:.4g} "
                    f"(delta {policy.delta:.3g}, {len(rounds)} rounds joined); nothing sent"
                )
            rounds.append({"round_id": rid, "rho": rho, "contributors": 0})
        return eps

    def settle(self, job: str, round_id: bytes, offer: DPOffer, contributors: int) -> float:
        """After the round's result: its ``rho`` for the ``contributors`` the site saw
        (never above the reserved worst case); returns it."""
        rid = round_id.hex()
        plan = offer.plan
        if not plan.min_survivors <= contributors <= plan.n_clients:
            raise ConfigurationError(
                f"{contributors} contributors outside [t={plan.min_survivors}, n={plan.n_clients}]"
            )
        rho = _rho(offer, contributors)
        with self._state() as state:
            for r in state["jobs"].get(job, []):
                if r["round_id"] == rid:
                    r["rho"] = min(float(r["rho"]), rho)
                    r["contributors"] = contributors
                    return float(r["rho"])
        raise ConfigurationError(f"round {rid} was not reserved in the DP state")
