"""Flattening updates: numpy arrays, dicts of them, torch tensors when torch is installed."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import InputError
from secagg.service.tensors import fingerprint, flatten, unflatten


def test_numpy_dict_round_trip() -> None:
    update = {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "conv.bias": np.array([1.5, -2.5], dtype=np.float64),
        "nested": {"scale": np.array(3, dtype=np.int64)},
    }
    vec, layout = flatten(update)
    assert vec.dtype == np.float64 and vec.size == 24 + 2 + 1 == layout.size
    back = unflatten(vec, layout)
    assert list(back) == list(update)
    for k in ("conv.weight", "conv.bias"):
        assert back[k].shape == update[k].shape and back[k].dtype == update[k].dtype
        assert np.array_equal(back[k], update[k])
    assert back["nested"]["scale"].dtype == np.int64 and int(back["nested"]["scale"]) == 3


def test_bad_inputs() -> None:
    with pytest.raises(InputError):
        flatten(np.array(["a"]))
    _, layout = flatten(np.zeros(3))
    with pytest.raises(InputError):
        unflatten(np.zeros(4), layout)


def test_torch_tensors_keep_dtype_and_device() -> None:
    torch = pytest.importorskip("torch")
    update = {"w": torch.ones(2, 3, dtype=torch.float16), "b": torch.zeros(3, dtype=torch.bfloat16)}
    if torch.cuda.is_available():
        update["c"] = torch.ones(4, device="cuda")
    vec, layout = flatten(update)
    back = unflatten(vec * 2, layout)
    for k, v in update.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype and back[k].device == v.device
    assert torch.allclose(back["w"].float(), torch.full((2, 3), 2.0))


def test_flattening_is_canonical_and_fingerprinted() -> None:
    """Layout attack (issue 11, item 7): two sites with the same keys built in another
    order used to flatten differently, so the aggregate silently summed unrelated
    parameters. Flattening is now in sorted-key order at every level; the fingerprint
    covers names, shapes, dtypes and order. Failed before the fix (state_dict order)."""
    a = {"w": np.arange(6.0).reshape(2, 3), "b": np.array([10.0, 20.0])}
    b = {"b": np.array([10.0, 20.0]), "w": np.arange(6.0).reshape(2, 3)}
    (va, la), (vb, lb) = flatten(a), flatten(b)
    assert np.array_equal(va, vb) and la.fingerprint == lb.fingerprint == fingerprint(a)
    assert list(unflatten(vb, lb)) == ["b", "w"]  # each site gets its own key order back
    # Same total length, another layout: every difference changes the fingerprint.
    others = [
        {"w": np.zeros((3, 2)), "b": np.zeros(2)},  # shape
        {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2)},  # dtype
        {"v": np.zeros((2, 3)), "b": np.zeros(2)},  # name
        {"w": np.zeros(8)},  # architecture
        {"m": {"w": np.zeros((2, 3)), "b": np.zeros(2)}},  # nesting
    ]
    fps = {la.fingerprint} | {flatten(o)[1].fingerprint for o in others}
    assert len(fps) == len(others) + 1 and all(len(f) == 32 for f in fps)
