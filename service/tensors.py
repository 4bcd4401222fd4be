"""Flatten updates (numpy arrays, torch tensors, device arrays, dicts of them) into one
vector and back.

**Canonical order.** A dict's leaves are laid out in sorted key order at every level
(whatever order the dict was built in), so two sites holding the same model flatten it the
same way. :attr:`Layout.fingerprint` is the SHA-256 over every leaf's path, shape and dtype
in that order; a round that carries a fingerprint (``RoundParams.layout``) refuses an update
whose layout differs (:func:`secagg.policy.check_layout`) instead of silently adding
unrelated parameters of the same total length. :func:`unflatten` returns dicts in the
update's own key order. Torch is imported only when a tensor is seen.

**CUDA updates stay on the device.** When every leaf is a torch tensor on one CUDA device,
the flat vector is built there (a view of a lone float32/float64 tensor, else one
``torch.cat`` on the device) and handed to the protocol core, whose CUDA kernels read it
through ``__cuda_array_interface__``: no host copy of the update is made. A lone Numba
device array (or any other ``__cuda_array_interface__`` object) passes through the same
way. Anything else (host data, or leaves on different devices) is flattened into one
float64 host vector. Leaves come back from :func:`unflatten` on the device they came from.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from secagg import kernels
from secagg.errors import InputError

__all__ = ["Layout", "fingerprint", "flatten", "unflatten"]

_NUMPY = "numpy"
_CUDA_ARRAY = "cuda-array"  # a non-torch device array (Numba, CuPy, ...)


@dataclass(frozen=True)
class _Leaf:
    shape: tuple[int, ...]
    dtype: Any
    device: str  # _NUMPY, _CUDA_ARRAY, or a torch device ("cpu", "cuda:0")


@dataclass(frozen=True)
class Layout:
    """Where each leaf sits in the flat vector; ``tree`` mirrors the update's structure.

    ``on_device`` says whether the flat vector was left on a CUDA device; ``fingerprint``
    is the layout's SHA-256 (:func:`fingerprint`), what ``RoundParams.layout`` carries.
    """

    tree: Any
    size: int
    on_device: bool = False
    fingerprint: bytes = b""


_FINGERPRINT_DOMAIN = b"secagg/v1/layout"


def fingerprint(update: Any) -> bytes:
    """SHA-256 of ``update``'s layout: for every leaf in canonical (sorted-key) order, its
    key path, shape and dtype name, each length-prefixed. Device and values do not count.

    >>> fingerprint({"w": np.zeros((2, 3), np.float32)}).hex()[:8]  # doctest: +SKIP
    """
    leaves: list[Any] = []
    paths: list[tuple[str, ...]] = []
    _leaves(update, leaves, (), paths)
    return _digest(paths, [(tuple(int(d) for d in x.shape), _dtype_name(x.dtype)) for x in leaves])


def _digest(paths: list[tuple[str, ...]], specs: list[tuple[tuple[int, ...], str]]) -> bytes:
    h = hashlib.sha256(_FINGERPRINT_DOMAIN)
    h.update(struct.pack(">I", len(paths)))
    for path, (shape, dtype) in zip(paths, specs, strict=True):
        h.update(struct.pack(">I", len(path)))
        for name in path:
            raw = name.encode()
            h.update(struct.pack(">I", len(raw)) + raw)
        h.update(struct.pack(">I", len(shape)) + struct.pack(f">{len(shape)}Q", *shape))
        raw = dtype.encode()
        h.update(struct.pack(">I", len(raw)) + raw)
    return h.digest()


def _is_torch(x: object) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _leaves(
    node: Any,
    out: list[Any],
    path: tuple[str, ...] = (),
    paths: list[tuple[str, ...]] | None = None,
) -> Any:
    """The tree of ``node`` with each leaf replaced by its index in ``out``; leaves are
    appended in canonical order (sorted keys), the tree keeps ``node``'s own key order."""
    if isinstance(node, Mapping):
        names = {str(k): k for k in node}
        if len(names) != len(node):
            raise InputError("two keys of the update have the same name")
        index = {names[name]: _leaves(node[names[name]], out, (*path, name), paths)
                 for name in sorted(names)}  # fmt: skip
        return {k: index[k] for k in node}
    out.append(node.detach() if _is_torch(node) else node)
    if paths is not None:
        paths.append(path)
    return len(out) - 1


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _device_vector(leaves: list[Any]) -> Any | None:
    """The flat device vector of ``leaves``, or ``None`` when they are not all on one device."""
    if not leaves:
        return None
    if all(_is_torch(t) and t.is_cuda for t in leaves):
        if len({t.device for t in leaves}) != 1:
            return None
        flat = [t.reshape(-1) for t in leaves]
        if len(flat) == 1 and _dtype_name(flat[0].dtype) in ("float32", "float64"):
            return flat[0]  # a view: not even a device copy
        if all(_dtype_name(t.dtype) == "float32" for t in flat):
            return _torch().cat(flat)
        # float64 is exact for every float16/bfloat16/float32 value (and rounds int64 as
        # numpy's host path does), so both paths quantize the same numbers.
        return _torch().cat([t.double() for t in flat])
    x = leaves[0]
    if len(leaves) == 1 and not _is_torch(x) and kernels.is_device_array(x):
        if _dtype_name(x.dtype) not in ("float32", "float64"):
            return None  # the kernels read float32/float64 only
        if len(x.shape) == 1:
            return x
        try:
            return x.reshape(-1)
        except Exception:  # a strided device array that cannot be viewed flat
            return None
    return None


def _torch() -> Any:
    import torch  # only reached when the update held tensors

    return torch


def _host_leaf(x: Any) -> tuple[npt.NDArray[np.float64], _Leaf]:
    if _is_torch(x):
        arr = x.to("cpu").double().numpy() if x.is_floating_point() else x.to("cpu").numpy()
        return np.asarray(arr, dtype=np.float64).reshape(-1), _leaf_of(x)
    if kernels.is_device_array(x):
        host = kernels.to_host(x)
        return np.asarray(host, dtype=np.float64).reshape(-1), _Leaf(
            host.shape, host.dtype, _CUDA_ARRAY
        )
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"cannot aggregate values of dtype {arr.dtype}")
    flat = np.asarray(arr, dtype=np.float64).reshape(-1)  # no copy for float64 input
    return flat, _Leaf(arr.shape, arr.dtype, _NUMPY)


def _leaf_of(x: Any) -> _Leaf:
    if _is_torch(x):
        return _Leaf(tuple(x.shape), x.dtype, str(x.device))
    return _Leaf(tuple(x.shape), np.dtype(_dtype_name(x.dtype)), _CUDA_ARRAY)


def flatten(update: Any) -> tuple[Any, Layout]:
    """One vector holding every value of ``update``, and how to undo it.

    The vector is a float64 numpy array, or a float32/float64 CUDA vector when ``update``
    lives on one CUDA device (see the module docstring).

    Raises
    ------
    InputError
        A leaf whose values are not real numbers.
    """
    leaves: list[Any] = []
    paths: list[tuple[str, ...]] = []
    index = _leaves(update, leaves, (), paths)
    fp = _digest(paths, [(tuple(int(d) for d in x.shape), _dtype_name(x.dtype)) for x in leaves])
    on_device = _device_vector(leaves)
    if on_device is not None:
        specs = [(_leaf_of(x), int(np.prod(x.shape, dtype=np.int64))) for x in leaves]
        tree = _fill(index, _offsets(specs))
        return on_device, Layout(tree, int(on_device.shape[0]), on_device=True, fingerprint=fp)
    parts = [_host_leaf(x) for x in leaves]
    tree = _fill(index, _offsets([(leaf, flat.size) for flat, leaf in parts]))
    flats = [flat for flat, _ in parts]
    vec = flats[0] if len(flats) == 1 else np.concatenate(flats) if flats else np.zeros(0)
    return vec, Layout(tree, int(vec.size), fingerprint=fp)


def _offsets(specs: list[tuple[_Leaf, int]]) -> list[tuple[_Leaf, int, int]]:
    out, pos = [], 0
    for leaf, n in specs:
        out.append((leaf, n, pos))
        pos += n
    return out


def _fill(index: Any, specs: list[tuple[_Leaf, int, int]]) -> Any:
    if isinstance(index, dict):
        return {k: _fill(v, specs) for k, v in index.items()}
    return specs[index]


def unflatten(vec: npt.NDArray[np.float64], layout: Layout) -> Any:
    """Rebuild the update's structure from ``vec``, with each leaf's shape, dtype and device."""
    if vec.size != layout.size:
        raise InputError(f"vector has {vec.size} values, the layout {layout.size}")

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        leaf, n, pos = node
        piece = vec[pos : pos + n].reshape(leaf.shape)
        if leaf.device == _NUMPY:
            return piece.astype(leaf.dtype)
        if leaf.device == _CUDA_ARRAY:
            from numba import cuda

            return cuda.to_device(np.ascontiguousarray(piece.astype(leaf.dtype)))
        return (
            _torch()
            .from_numpy(np.ascontiguousarray(piece))
            .to(dtype=leaf.dtype, device=leaf.device)
        )

    return walk(layout.tree)
