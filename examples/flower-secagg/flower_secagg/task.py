"""The model and the data: softmax regression on synthetic, non-IID data (numpy only).

Every site draws its own shard from a fixed generator, so the app runs offline and the
same way every time. The data is not secret material, so numpy's seeded ``Generator`` is
fine here; nothing of secagg's uses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FEATURES = 8
CLASSES = 3
_TRUE_W = np.random.default_rng(2024).normal(size=(FEATURES, CLASSES))
"""The labelling rule every shard follows (the model the federation should find)."""


def initial_arrays() -> dict[str, np.ndarray[Any, Any]]:
    """The global model before round 1: zeros, float32 (27 values)."""
    return {
        "w": np.zeros((FEATURES, CLASSES), np.float32),
        "b": np.zeros(CLASSES, np.float32),
    }


def load_data(partition_id: int, num_partitions: int) -> tuple[Any, Any, Any, Any]:
    """Site ``partition_id``'s train and test shards: its own region of input space and its
    own size (non-IID, so FedAvg's weighting by ``num-examples`` matters)."""
    rng = np.random.default_rng(1000 + partition_id)
    n = 40 + 20 * partition_id
    centre = np.zeros(FEATURES)
    centre[partition_id % FEATURES] = 1.5
    x = rng.normal(loc=centre, size=(n + 20, FEATURES))
    y = np.argmax(x @ _TRUE_W + 0.3 * rng.normal(size=(n + 20, CLASSES)), axis=1)
    return x[:n], y[:n], x[n:], y[n:]


def _softmax(z: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray[Any, Any] = e / e.sum(axis=1, keepdims=True)
    return out


def train(
    w: np.ndarray[Any, Any], b: np.ndarray[Any, Any], x: Any, y: Any, epochs: int, lr: float
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], float]:
    """Full-batch gradient descent on the cross-entropy; returns the new weights and the loss."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    onehot = np.eye(CLASSES)[y]
    loss = 0.0
    for _ in range(epochs):
        p = _softmax(x @ w + b)
        loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
        grad = (p - onehot) / len(y)
        w -= lr * x.T @ grad
        b -= lr * grad.sum(axis=0)
    return w.astype(np.float32), b.astype(np.float32), loss


def evaluate(w: Any, b: Any, x: Any, y: Any) -> tuple[float, float]:
    """Cross-entropy and accuracy on a shard."""
    p = _softmax(x @ w.astype(np.float64) + b.astype(np.float64))
    loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
    return loss, float(np.mean(np.argmax(p, axis=1) == y))
