"""Group rounds on Ray actors: one ``AggregatorWorker`` actor per worker, groups spread
over them (``pip install 'secagg[ray]'``).

Each actor holds the sans-I/O :class:`secagg.simulate_sharded.GroupRound` of its groups (a
:class:`~secagg.server.SecAggServer` and, in simulation, that group's simulated clients).
Only ``bytes``, ``int`` and ``str`` cross the actor boundary: the group spec and outcome
are our own byte encodings, and Ray frames those values with its own serializer; no object
of ours is pickled. Ray ships the actor's *code* by module reference (this module is
importable on every node of the cluster).

The coordinator keeps one step call per group in flight and resubmits as each returns
(:func:`ray.wait`), so groups on different actors advance in parallel; a step delivers a
few batches of messages, so a killed actor (:func:`ray.kill`, a crash, a lost node) is seen
between stages: its groups are recorded as aborted with Ray's error, and the round goes on.
Ray is imported here only, lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from secagg.errors import ConfigurationError

__all__ = ["AggregatorWorker", "EngineUnavailable", "RayEngine", "import_ray"]

STEP_BATCHES = 2
"""Message batches one remote ``step`` call delivers (about one stage)."""


class EngineUnavailable(ConfigurationError):
    """``--engine ray`` without Ray installed (exit status 2, like every configuration error)."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`EngineUnavailable` with the one line that fixes it."""
    try:
        import ray
    except ImportError:
        raise EngineUnavailable(
            "--engine ray needs Ray: pip install 'secagg[ray]' (or use --engine local)"
        ) from None
    return ray


class AggregatorWorker:
    """The actor's body: group rounds keyed by group index; bytes in, bytes out."""

    def __init__(self) -> None:
        from secagg.simulate_sharded import GroupRound

        self._cls = GroupRound
        self.rounds: dict[int, GroupRound] = {}

    def open(self, group: int, spec: bytes) -> int:
        self.rounds[group] = self._cls(spec)
        return group

    def step(self, group: int, batches: int) -> bool:
        return self.rounds[group].step(batches)

    def outcome(self, group: int) -> bytes:
        return self.rounds.pop(group).outcome()

    def pid(self) -> int:
        import os

        return os.getpid()


@dataclass
class RayEngine:
    """Run groups on ``n_workers`` Ray actors (round-robin), on a local cluster started
    here (``ray.init(num_cpus=..., include_dashboard=False)``) or the one at ``address``.

    ``kill`` maps a worker index to the number of step rounds after which the coordinator
    kills it with :func:`ray.kill` (a fault drill: the round must survive it)."""

    n_workers: int = 2
    address: str | None = None
    num_cpus: int | None = None
    kill: Mapping[int, int] = field(default_factory=dict)
    name: str = "ray"

    @property
    def workers(self) -> int:
        return self.n_workers

    def _init(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=self.num_cpus or self.n_workers,
                    include_dashboard=False,
                    log_to_driver=False,
                )
        return ray

    def run_groups(self, specs: Mapping[int, bytes]) -> dict[int, bytes | str]:
        if self.n_workers < 1:
            raise ConfigurationError(f"workers must be at least 1, got {self.n_workers}")
        ray = self._init()
        actor_cls = ray.remote(num_cpus=1, max_restarts=0)(AggregatorWorker)
        actors = [actor_cls.remote() for _ in range(self.n_workers)]
        home = {g: actors[k % self.n_workers] for k, g in enumerate(sorted(specs))}
        where = {g: k % self.n_workers for k, g in enumerate(sorted(specs))}
        out: dict[int, bytes | str] = {}
        try:
            opened = {home[g].open.remote(g, specs[g]): g for g in specs}
            inflight: dict[Any, int] = {}
            for ref, g in opened.items():
                if self._settle(ray, ref, g, out):
                    inflight[home[g].step.remote(g, STEP_BATCHES)] = g
            steps = 0
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                ref = ready[0]
                g = inflight.pop(ref)
                steps += 1
                for w, after in self.kill.items():
                    if steps == after and 0 <= w < len(actors):
                        ray.kill(actors[w], no_restart=True)
                try:
                    done = bool(ray.get(ref))
                except ray.exceptions.RayError as exc:
                    out[g] = _reason(exc, where[g])
                    continue
                if done:
                    try:
                        out[g] = bytes(ray.get(home[g].outcome.remote(g)))
                    except ray.exceptions.RayError as exc:
                        out[g] = _reason(exc, where[g])
                else:
                    inflight[home[g].step.remote(g, STEP_BATCHES)] = g
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
        return out

    @staticmethod
    def _settle(ray: Any, ref: Any, g: int, out: dict[int, bytes | str]) -> bool:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            out[g] = _reason(exc, -1)
            return False
        return True


def _reason(exc: BaseException, worker: int) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__} on worker {worker}: {first}"[:500]
