"""The demo's model and its local training, shared by the sites and the baselines.

Everything is seeded and single-threaded, so a site process and the in-process plaintext
FedAvg baseline compute bit-identical updates from the same global weights: the only
difference between plaintext and secure FedAvg is then the quantization of the deltas.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "State",
    "TrainConfig",
    "accuracy",
    "build",
    "get_state",
    "parameter_count",
    "set_state",
    "train_local",
]

State = dict[str, npt.NDArray[np.float32]]
"""A model's weights as numpy arrays (what the coordinator broadcasts)."""


def torch() -> Any:
    """The ``torch`` module, single-threaded (imported on first use)."""
    try:
        t = importlib.import_module("torch")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs PyTorch: pip install torch==2.13.0") from exc
    if t.get_num_threads() != 1:
        t.set_num_threads(1)
    return t


@dataclass(frozen=True)
class TrainConfig:
    """Local training: plain minibatch SGD."""

    hidden: int = 16
    epochs: int = 1
    batch: int = 16
    lr: float = 0.05
    arch: str = "mlp"
    """``"mlp"`` (one hidden layer of ``hidden`` units) or ``"cnn"`` (:func:`build`)."""


CNN_SIDE = 8
"""The CNN reads its features as one ``8 x 8`` channel (scikit-learn's digits)."""


def build(n_features: int, n_classes: int, cfg: TrainConfig, seed: int) -> Any:
    """The model of ``cfg.arch`` with seeded initial weights.

    ``mlp``: ``n_features -> hidden -> n_classes``. ``cnn`` (8x8 images): two 3x3
    convolutions (1 -> 16 -> 32 channels, ReLU), 2x2 max-pooling, then
    ``512 -> hidden -> n_classes``; with ``hidden = 192`` and 10 classes, 105,226 parameters.
    """
    t = torch()
    t.manual_seed(seed)
    nn = t.nn
    if cfg.arch == "cnn":
        if n_features != CNN_SIDE * CNN_SIDE:
            raise ValueError(f"the CNN reads 8x8 images, got {n_features} features")
        return nn.Sequential(
            nn.Unflatten(1, (1, CNN_SIDE, CNN_SIDE)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (CNN_SIDE // 2) ** 2, cfg.hidden),
            nn.ReLU(),
            nn.Linear(cfg.hidden, n_classes),
        )
    if cfg.arch != "mlp":
        raise ValueError(f"unknown architecture {cfg.arch!r} (mlp or cnn)")
    return t.nn.Sequential(
        t.nn.Linear(n_features, cfg.hidden),
        t.nn.ReLU(),
        t.nn.Linear(cfg.hidden, n_classes),
    )


def parameter_count(model: Any) -> int:
    """Trainable parameters of ``model`` (what every site sends each round)."""
    return sum(int(p.numel()) for p in model.parameters())


def get_state(model: Any) -> State:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_state(model: Any, state: State) -> None:
    t = torch()
    model.load_state_dict({k: t.from_numpy(np.array(v)) for k, v in state.items()})


def train_local(
    model: Any, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], cfg: TrainConfig, seed: int
) -> None:
    """``cfg.epochs`` passes of minibatch SGD over ``(x, y)``, shuffled by ``seed``."""
    t = torch()
    g = t.Generator().manual_seed(seed)
    xt, yt = t.from_numpy(x), t.from_numpy(y)
    opt = t.optim.SGD(model.parameters(), lr=cfg.lr)
    loss_fn = t.nn.CrossEntropyLoss()
    model.train()
    for _ in range(cfg.epochs):
        order = t.randperm(len(yt), generator=g)
        for i in range(0, len(order), cfg.batch):
            idx = order[i : i + cfg.batch]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()


def accuracy(model: Any, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float:
    t = torch()
    model.eval()
    with t.no_grad():
        pred = model(t.from_numpy(x)).argmax(dim=1).numpy()
    return float(np.mean(pred == y))
