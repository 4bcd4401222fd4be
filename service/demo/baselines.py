"""In-process baselines: centralized training and plaintext (float) FedAvg."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from secagg.service.demo.data import Split
from secagg.service.demo.model import (
    State,
    TrainConfig,
    accuracy,
    build,
    get_state,
    set_state,
    train_local,
)

__all__ = ["centralized", "fedavg_round", "plaintext_fedavg", "train_seed"]


def train_seed(seed: int, round_no: int, site: int) -> int:
    """Seed of one site's local training in one round (the same in every method)."""
    return (seed * 1_000_003 + round_no * 1_009 + site) % 2**31


def centralized(split: Split, cfg: TrainConfig, seed: int, epochs: int) -> list[float]:
    """Train on the pooled training set; test accuracy after each epoch."""
    model = build(split.n_features, split.n_classes, cfg, seed)
    out = []
    for e in range(epochs):
        train_local(
            model,
            split.x_train,
            split.y_train,
            TrainConfig(**{**vars(cfg), "epochs": 1}),
            train_seed(seed, e + 1, 0),
        )
        out.append(accuracy(model, split.x_test, split.y_test))
    return out


def fedavg_round(
    split: Split,
    cfg: TrainConfig,
    global_state: State,
    round_no: int,
    seed: int,
    active: list[int],
) -> State:
    """One plaintext FedAvg round over the ``active`` sites, as the secure rounds compute it:
    float32 deltas, their sample-weighted mean in float64, added back in float32."""
    model = build(split.n_features, split.n_classes, cfg, seed)
    total = 0
    acc = {k: np.zeros(v.shape, np.float64) for k, v in global_state.items()}
    for s in active:
        x, y = split.sites[s]
        set_state(model, global_state)
        train_local(model, x, y, cfg, train_seed(seed, round_no, s))
        local = get_state(model)
        for k in acc:
            acc[k] += len(y) * (local[k] - global_state[k]).astype(np.float64)
        total += len(y)
    return {k: global_state[k] + (acc[k] / total).astype(np.float32) for k in acc}


def plaintext_fedavg(
    split: Split,
    cfg: TrainConfig,
    seed: int,
    rounds: int,
    dropped: Mapping[int, int],
    on_round: Callable[[int, float], None] | None = None,
) -> tuple[list[float], State]:
    """Float FedAvg with the same drop schedule: test accuracy after each round, and the
    final global weights."""
    model = build(split.n_features, split.n_classes, cfg, seed)
    state = get_state(model)
    out = []
    for r in range(1, rounds + 1):
        active = [s for s in range(len(split.sites)) if dropped.get(r) != s]
        state = fedavg_round(split, cfg, state, r, seed, active)
        set_state(model, state)
        out.append(accuracy(model, split.x_test, split.y_test))
        if on_round is not None:
            on_round(r, out[-1])
    return out, state
