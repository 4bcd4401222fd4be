"""``SECAGG_MASK_THREADS`` and the copy-free decode of the published aggregate (issue 14).

The thread knob changes how the masking-layer CPU kernels are scheduled, never their bits;
the aggregate's words are a read-only view of an immutable encoding and a private copy of
anything the caller could still change.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from secagg import kernels
from secagg.errors import KernelError
from secagg.kernels import config, cpu
from secagg.kernels import reference as ref
from secagg.messages import AggregateResult, decode_message
from secagg.prg import Purpose, StreamMask
from secagg.quantize import QuantSpec
from secagg.quantize import dequantize as np_dequantize
from secagg.quantize import unpack as np_unpack

SPEC = QuantSpec(clip=2.0, bits=16, n_clients=100, max_weight=3)
RID, SID = bytes(range(16)), bytes(range(32))


def _masks() -> list[StreamMask]:
    return [
        StreamMask(bytes([i + 1]) * 32, Purpose.PAIR_MASK, 1 - 2 * (i % 2)) for i in range(5)
    ] + [StreamMask(bytes([9]) * 32, Purpose.SELF_MASK, 1)]


def test_thread_knob_changes_no_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CPU kernel of the masking layer gives the reference's bits on one thread, on all
    of Numba's threads (``0``) and on more than there are (capped)."""
    monkeypatch.setenv(config.ENV_VAR, "cpu")
    x = np.random.default_rng(3).normal(scale=2.5, size=9_000)  # several 2,032-word chunks
    want = ref.mask_vector(x, 2, SPEC, bytes(32), _masks())
    words = np.random.default_rng(4).integers(0, 1 << 64, size=4_500, dtype=np.uint64)
    count = 4_500 * SPEC.lanes_per_word - 1
    sums = np_unpack(words, SPEC, count)
    for value in ("1", "0", "64"):
        monkeypatch.setenv(config.MASK_THREADS_VAR, value)
        got = kernels.mask_vector(x, 2, SPEC, bytes(32), _masks())
        assert np.array_equal(got, want)
        acc = want.copy()
        kernels.add_masks(acc, _masks())
        back = want.copy()
        ref.add_masks(back, _masks())
        assert np.array_equal(acc, back)
        assert np.array_equal(kernels.unpack(words, SPEC, count), sums)
        out, total = kernels.dequantize(sums, SPEC, 7, count - 1)
        ref_out, ref_total = np_dequantize(sums, SPEC, 7, count - 1)
        assert total == ref_total and out.tobytes() == ref_out.tobytes()
        assert kernels.keystream(bytes(32), bytes(12), 70_000) == ref_keystream(70_000)


def ref_keystream(n: int) -> bytes:
    from Crypto.Cipher import ChaCha20

    out = ChaCha20.new(key=bytes(32), nonce=bytes(12)).encrypt(bytes(n))
    assert isinstance(out, bytes)
    return out


def test_launch_sets_and_restores_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a launch the regions run on the asked-for count; the caller's count is back
    afterwards (a DP pass or user code that set its own is not disturbed)."""
    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    before = numba.get_num_threads()
    monkeypatch.delenv(config.MASK_THREADS_VAR, raising=False)
    assert config.mask_threads() == 1
    with cpu.launch():
        assert numba.get_num_threads() == 1
    monkeypatch.setenv(config.MASK_THREADS_VAR, "0")
    with cpu.launch():
        assert numba.get_num_threads() == before
    monkeypatch.setenv(config.MASK_THREADS_VAR, str(most + 5))
    with cpu.launch():
        assert numba.get_num_threads() == most
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("value", ["two", "-1", "1.5"])
def test_bad_thread_knob_is_kernel_error(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_VAR, "cpu")
    monkeypatch.setenv(config.MASK_THREADS_VAR, value)
    with pytest.raises(KernelError, match="SECAGG_MASK_THREADS"):
        kernels.unpack(np.zeros(100, np.uint64), SPEC, 10)


def test_aggregate_words_view_immutable_bytes() -> None:
    """A ``bytes`` encoding is viewed, not copied (the 8 MB copy and its page faults at
    ``10^6`` values), and the view is read-only."""
    words = np.arange(1, 2_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    data = AggregateResult(RID, 0, SID, (1, 2), words).encode()
    msg = decode_message(data)
    assert isinstance(msg, AggregateResult)
    assert np.array_equal(msg.words, words) and msg.words.dtype == np.uint64
    assert not msg.words.flags.writeable and not msg.words.flags.owndata
    with pytest.raises(ValueError):
        msg.words[0] = 0


def test_aggregate_words_copied_from_mutable_buffer() -> None:
    """A caller that decodes from a buffer it later reuses (a ``bytearray`` filled by a
    socket) cannot change an aggregate already decoded: those words are a private copy.
    A view there would let the next message rewrite the last result."""
    words = np.arange(7, dtype=np.uint64)
    buf = bytearray(AggregateResult(RID, 0, SID, (1, 2), words).encode())
    msg = decode_message(memoryview(buf))
    assert isinstance(msg, AggregateResult)
    buf[-8:] = bytes(8 * [0xFF])
    assert np.array_equal(msg.words, words)
    assert msg.words.flags.writeable


def test_round_exact_on_either_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole simulated round (clients decode the read-only aggregate view) is exact on one
    thread and on all of them."""
    from secagg.simulate import SimulationConfig, simulate

    monkeypatch.setenv(config.ENV_VAR, "cpu")
    for value in ("1", "0"):
        monkeypatch.setenv(config.MASK_THREADS_VAR, value)
        report = simulate(SimulationConfig(clients=5, dim=3_000, dropout=0.0, seed=1))
        assert report["status"] == "completed" and report["exact"]


@pytest.mark.parametrize("layout", ["contiguous", "strided", "big-endian", "read-only view"])
def test_word_messages_encode_the_same_bytes_without_a_copy(layout: str) -> None:
    """The packed words go into the encoding as a view of the array (one 8 d / P byte copy
    fewer per upload); every layout of the array still gives the little-endian bytes the
    codec always wrote, and decodes back to the same words."""
    from secagg.messages import MaskedInput

    base = np.arange(1, 41, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
    words = {
        "contiguous": base,
        "strided": base[::2],
        "big-endian": base.astype(">u8"),
        "read-only view": np.frombuffer(base.tobytes(), dtype="<u8"),
    }[layout]
    want = np.ascontiguousarray(words, dtype="<u8").tobytes()
    for msg in (MaskedInput(RID, 3, SID, words), AggregateResult(RID, 0, SID, (1, 2), words)):
        data = msg.encode()
        assert data.endswith(want)
        back = decode_message(data)
        assert isinstance(back, MaskedInput | AggregateResult)
        assert np.array_equal(back.words, words)
