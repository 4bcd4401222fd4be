"""Flattening updates: numpy arrays, dicts of them, torch tensors when torch is installed."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import InputError
from secagg.service.tensors import flatten, unflatten


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
