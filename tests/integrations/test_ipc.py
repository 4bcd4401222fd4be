"""The demo's pickle-free control channel."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import MalformedMessage
from secagg.service.demo import ipc


def test_roundtrip_keeps_types_keys_and_arrays() -> None:
    msg = {
        "status": "ok",
        "n": 3,
        "x": 0.5,
        "key": b"\x00\xff",
        "none": None,
        7: [1, (2, 3)],
        "state": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)},
    }
    out = ipc.loads(ipc.dumps(msg))
    assert out["key"] == b"\x00\xff" and out[7] == [1, [2, 3]] and out["none"] is None
    assert out["state"]["w"].dtype == np.float32 and out["state"]["w"].shape == (2, 3)
    assert np.array_equal(out["state"]["w"], msg["state"]["w"])  # type: ignore[index]


def test_refuses_objects_it_would_have_to_pickle() -> None:
    with pytest.raises(TypeError):
        ipc.dumps({"f": lambda: 1})
    with pytest.raises(TypeError):
        ipc.dumps(np.array([object()]))


@pytest.mark.parametrize("cut", [0, 3, 10, -1])
def test_truncated_or_garbage_input_is_malformed(cut: int) -> None:
    data = ipc.dumps({"a": np.zeros(4)})
    with pytest.raises(MalformedMessage):
        ipc.loads(data[:cut] if cut else b"\xff\xff\xff\x7fjunk")
