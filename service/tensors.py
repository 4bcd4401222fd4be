"""Flatten updates (numpy arrays, torch tensors, dicts of them) into one vector and back.

A dict is laid out in its own key order (a model's ``state_dict`` order), so every client
of a round must send the same keys in the same order with the same shapes. Torch is
imported only when a tensor is seen; CUDA tensors come back on their device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from secagg.errors import InputError

__all__ = ["Layout", "flatten", "unflatten"]


@dataclass(frozen=True)
class _Leaf:
    shape: tuple[int, ...]
    dtype: Any
    torch_device: str | None  # None for numpy


@dataclass(frozen=True)
class Layout:
    """Where each leaf sits in the flat vector; ``tree`` mirrors the update's structure."""

    tree: Any
    size: int


def _is_torch(x: object) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _leaf_array(x: Any) -> tuple[npt.NDArray[np.float64], _Leaf]:
    if _is_torch(x):
        t = x.detach()
        arr = t.to("cpu").double().numpy() if t.is_floating_point() else t.to("cpu").numpy()
        return np.asarray(arr, dtype=np.float64).reshape(-1), _Leaf(
            tuple(t.shape), t.dtype, str(t.device)
        )
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"cannot aggregate values of dtype {arr.dtype}")
    flat = np.asarray(arr, dtype=np.float64).reshape(-1)  # no copy for float64 input
    return flat, _Leaf(arr.shape, arr.dtype, None)


def flatten(update: Any) -> tuple[npt.NDArray[np.float64], Layout]:
    """One float64 vector holding every value of ``update``, and how to undo it."""
    parts: list[npt.NDArray[np.float64]] = []

    def walk(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: walk(v) for k, v in node.items()}
        flat, leaf = _leaf_array(node)
        parts.append(flat)
        return (leaf, flat.size)

    tree = walk(update)
    vec = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0)
    return vec, Layout(tree, int(vec.size))


def unflatten(vec: npt.NDArray[np.float64], layout: Layout) -> Any:
    """Rebuild the update's structure from ``vec``, with each leaf's shape, dtype and device."""
    if vec.size != layout.size:
        raise InputError(f"vector has {vec.size} values, the layout {layout.size}")
    pos = 0

    def walk(node: Any) -> Any:
        nonlocal pos
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        leaf, n = node
        piece = vec[pos : pos + n].reshape(leaf.shape)
        pos += n
        if leaf.torch_device is None:
            return piece.astype(leaf.dtype)
        import torch  # only reached when the update held tensors

        return torch.from_numpy(np.ascontiguousarray(piece)).to(
            dtype=leaf.dtype, device=leaf.torch_device
        )

    return walk(layout.tree)
