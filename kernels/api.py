"""Public bulk-math API with backend dispatch: reference, Numba CPU or CUDA.

Dispatch (``SECAGG_KERNELS``, read on every call; see :mod:`secagg.kernels.config`):

* ``auto`` (default): a device array (anything with ``__cuda_array_interface__``, such as a
  torch CUDA tensor or a Numba device array, taken zero-copy) runs the CUDA kernels and
  gets a Numba device array back; host data runs the CPU backend (Numba kernels for
  quantizing, packing and unpacking, OpenSSL's ChaCha20 for the mask streams,
  :mod:`secagg.kernels.openssl`), or the reference
  when the vector packs into fewer than :data:`~secagg.kernels.config.SMALL_WORDS` words.
* ``cpu`` / ``reference``: that backend; device inputs are copied to the host and the
  result copied back, so the result is still a device array.
* ``cuda``: the CUDA kernels; host inputs are copied over and the result comes back as a
  numpy array.

Every backend gives the same bits as :mod:`secagg.kernels.reference` and raises the same
errors for the same bad inputs (:class:`~secagg.errors.InputError` for a bad vector or
weight, :class:`~secagg.errors.ConfigurationError` for a bad key or an over-long stream);
:class:`~secagg.errors.KernelError` is for what only this layer refuses (an unsupported
device array, ``cuda`` forced without a device, a bad ``SECAGG_KERNELS``).

The Numba backends are imported and compiled on first use (and cached on disk).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from secagg.errors import ConfigurationError, InputError, KernelError
from secagg.kernels import config
from secagg.kernels import reference as _reference
from secagg.prg import MAX_STREAM_BYTES, Purpose, StreamMask, nonce_for
from secagg.quantize import QuantSpec
from secagg.quantize import dequantize as _dequantize_reference
from secagg.quantize import unpack as _unpack_reference

__all__ = [
    "add_masks",
    "check_device_vector",
    "dequantize",
    "is_device_array",
    "keystream",
    "mask_vector",
    "to_host",
    "unpack",
]

_BLOCK = 64  # bytes per ChaCha20 block (RFC 8439 section 2.3)


# --- backend plumbing ---------------------------------------------------------------------


def is_device_array(x: object) -> bool:
    """Whether ``x`` lives on a CUDA device (``__cuda_array_interface__``, or a simulator array).

    Never imports ``numba.cuda``.
    """
    if isinstance(x, np.ndarray):
        return False
    return hasattr(x, "__cuda_array_interface__") or (
        hasattr(x, "copy_to_host") and hasattr(x, "shape") and hasattr(x, "dtype")
    )


def _cpu() -> Any:
    return importlib.import_module("secagg.kernels.cpu")


def _cuda() -> Any:
    if not config.cuda_available():
        raise KernelError("the CUDA backend needs numba-cuda and a CUDA device")
    return importlib.import_module("secagg.kernels.cuda")


def _openssl() -> Any:
    return importlib.import_module("secagg.kernels.openssl")


def _chacha() -> Any:
    return importlib.import_module("secagg.kernels.chacha")


def _numba_cuda() -> Any:
    return importlib.import_module("numba.cuda")


def _as_device(x: Any) -> Any:
    """A Numba device array viewing ``x`` (zero copy)."""
    if config.simulator():
        return x
    cuda = _numba_cuda()
    if isinstance(x, cuda.devicearray.DeviceNDArray):
        return x
    return cuda.as_cuda_array(x)


def _to_host(x: Any) -> npt.NDArray[Any]:
    return np.asarray(_as_device(x).copy_to_host())


def _to_device(a: npt.NDArray[Any]) -> Any:
    return _numba_cuda().to_device(np.ascontiguousarray(a))


def _host_u64(x: Any, device: bool) -> npt.NDArray[np.uint64]:
    """Packed words or lane sums on the host (one copy from a device)."""
    return _to_host(x) if device else np.asarray(x, dtype=np.uint64)


def _device_u64(x: Any, device: bool) -> Any:
    """Packed words or lane sums as a Numba device array (one copy from the host)."""
    return _as_device(x) if device else _to_device(np.asarray(x, dtype=np.uint64))


def _choose(device: bool, n_words: int) -> config.Backend:
    """The backend for one call: ``cpu``, ``cuda`` or ``reference``."""
    forced = config.backend()
    if forced != "auto":
        return forced
    if device:
        return "cuda"
    return "reference" if n_words < config.SMALL_WORDS else "cpu"


def _check_weight(weight: int, spec: QuantSpec) -> None:
    """The checks of :func:`secagg.quantize.encode`, same messages."""
    if not isinstance(weight, (int, np.integer)) or isinstance(weight, bool):
        raise InputError(f"weight must be an integer, got {type(weight).__name__}")
    if not 1 <= int(weight) <= spec.max_weight:
        raise InputError(f"weight must be in 1..{spec.max_weight}, got {weight}")


def _host_vector(x: npt.ArrayLike) -> npt.NDArray[np.floating]:
    """``x`` as a flat float32/float64 array, checked as :func:`secagg.quantize.quantize` does."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise InputError(f"expected a flat vector, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"expected a real-valued vector, got dtype {arr.dtype}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)  # as the reference: exact for float16, rounds int64
    return np.ascontiguousarray(arr)


def _device_vector(x: Any) -> Any:
    """``x`` as a Numba device array after the reference's shape checks."""
    shape, dtype = tuple(x.shape), np.dtype(str(x.dtype).replace("torch.", ""))
    if len(shape) != 1:
        raise InputError(f"expected a flat vector, got shape {shape}")
    if dtype not in (np.float32, np.float64):
        raise KernelError(f"device vectors must be float32 or float64, got {dtype}")
    return _as_device(x)


def to_host(x: Any) -> npt.NDArray[Any]:
    """``x`` as a numpy array: device arrays are copied to the host once, host data is not."""
    return _to_host(x) if is_device_array(x) else np.asarray(x)


def check_device_vector(x: Any) -> int:
    """Check a device update as :func:`mask_vector` would, before a round starts; its length.

    The NaN scan runs where the data is (a CUDA kernel; one flag word comes back).

    Raises
    ------
    InputError
        ``x`` is not flat, or holds NaN.
    KernelError
        ``x`` is not a float32/float64 device array, or ``SECAGG_KERNELS`` is invalid.
    """
    dev = _device_vector(x)
    n = int(dev.shape[0])
    if _choose(True, n) == "cuda":
        nan = _cuda().has_nan(dev)
    else:
        nan = bool(np.isnan(_to_host(dev)).any())
    if nan:
        raise InputError("input holds NaN")
    return n


def _check_stream(nbytes: int) -> None:
    if nbytes > MAX_STREAM_BYTES:
        raise ConfigurationError("keystream request outside the 2^32 - 1 block counter space")


# --- public API ---------------------------------------------------------------------------


def mask_vector(
    x: npt.ArrayLike,
    weight: int,
    spec: QuantSpec,
    rounding_key: bytes,
    masks: Sequence[StreamMask],
) -> Any:
    """Quantize, weight, pack and mask one update in one pass.

    Same result, bit for bit, as :func:`secagg.kernels.reference.mask_vector`:
    ``encode(x, weight, spec, rounding_key) + sum(sign * PRG(key, purpose)) mod 2^64``.

    Parameters
    ----------
    x:
        The update: a flat real vector on the host, or a float32/float64 device array.
    weight:
        The client's weight, ``1 .. spec.max_weight``.
    spec:
        Quantization and packing parameters.
    rounding_key:
        32-byte key of the stochastic-rounding stream (purpose ``ROUNDING``).
    masks:
        Self and pairwise masks to add (``sign > 0``) or subtract.

    Returns
    -------
    ``spec.words(len(x))`` uint64 words: a numpy array for host input, a Numba device array
    for device input.

    Raises
    ------
    InputError
        Bad weight, shape or dtype, or NaN in ``x``.
    ConfigurationError
        A key that is not 32 bytes, or a vector too long for one ChaCha20 stream.
    KernelError
        Unsupported device array, or ``SECAGG_KERNELS`` invalid / ``cuda`` without a device.
    """
    _check_weight(weight, spec)
    device = is_device_array(x)
    if device:
        dev_x = _device_vector(x)
        host_x = None
        dim = int(dev_x.shape[0])
    else:
        dev_x = None
        host_x = _host_vector(x)
        dim = int(host_x.size)
    n_words = spec.words(dim)
    backend = _choose(device, n_words)

    def on_host() -> npt.NDArray[np.floating]:
        return _to_host(dev_x) if host_x is None else host_x

    if backend == "reference":
        out = _reference.mask_vector(on_host(), weight, spec, rounding_key, masks)
        return _to_device(out) if device else out

    chacha = _chacha()
    try:
        rkey = chacha.key_words(rounding_key)
        keys, nonces, signs = chacha.mask_params(masks)
    except ConfigurationError:
        # The reference reports NaN before it looks at any key.
        if host_x is not None and np.isnan(host_x).any():
            raise InputError("input holds NaN") from None
        raise
    _check_stream(4 * dim)
    _check_stream(8 * n_words)
    rnonce = chacha.nonce_words(nonce_for(Purpose.ROUNDING))
    args = (
        dim, int(weight), spec.weighted, spec.lanes_per_word, spec.lane_bits,
        float(spec.clip), spec.scale, spec.max_level, rkey, rnonce, keys, nonces, signs, n_words,
    )  # fmt: skip

    if backend == "cpu":
        # Numba quantizes, rounds and packs; OpenSSL's ChaCha20 expands the masks.
        none = (np.empty((0, 8), np.uint32), np.empty((0, 3), np.uint32), np.empty(0, np.int64))
        out, nan = _cpu().mask_vector(on_host(), *args[:10], *none, n_words)
        if nan:
            raise InputError("input holds NaN")
        _openssl().add_masks(out, masks)
        return _to_device(out) if device else out

    cuda = _cuda()
    dout, nan = cuda.mask_vector(dev_x if host_x is None else _to_device(host_x), *args)
    if nan:
        raise InputError("input holds NaN")
    return dout if device else dout.copy_to_host()


def add_masks(acc: Any, masks: Sequence[StreamMask]) -> None:
    """In place: ``acc += sum(sign * PRG(key, purpose)) mod 2^64`` over ``acc.size`` words.

    Server-side fused unmask: all streams are generated block by block and summed straight
    into ``acc`` (a 1-D uint64 numpy array or device array). Same bits as
    :func:`secagg.kernels.reference.add_masks`.

    Raises
    ------
    ConfigurationError
        A key that is not 32 bytes, or ``acc`` too long for one ChaCha20 stream.
    KernelError
        ``acc`` not a writable 1-D uint64 array.
    """
    device = is_device_array(acc)
    if device:
        if len(acc.shape) != 1 or np.dtype(str(acc.dtype).replace("torch.", "")) != np.uint64:
            raise KernelError("device accumulators must be 1-D uint64 arrays")
        n = int(acc.shape[0])
    else:
        if not isinstance(acc, np.ndarray) or acc.dtype != np.uint64 or acc.ndim != 1:
            raise KernelError("the accumulator must be a 1-D uint64 numpy array")
        if not acc.flags.writeable:
            raise KernelError("the accumulator is read-only")
        n = acc.size
    backend = _choose(device, n)
    if backend == "reference":
        if device:
            host = _to_host(acc)
            _reference.add_masks(host, masks)
            _as_device(acc).copy_to_device(host)
        else:
            _reference.add_masks(acc, masks)
        return

    keys, nonces, signs = _chacha().mask_params(masks)
    _check_stream(8 * n)
    if backend == "cpu":
        if device:
            host = _to_host(acc)
            _openssl().add_masks(host, masks)
            _as_device(acc).copy_to_device(host)
        else:
            _openssl().add_masks(acc, masks)
        return

    cuda = _cuda()
    if device:
        cuda.add_masks(_as_device(acc), keys, nonces, signs)
    else:
        dacc = _to_device(acc)
        cuda.add_masks(dacc, keys, nonces, signs)
        acc[:] = dacc.copy_to_host()


def keystream(key: bytes, nonce: bytes, nbytes: int, offset: int = 0) -> bytes:
    """``nbytes`` of ChaCha20 keystream (RFC 8439) from byte ``offset``.

    ``nonce`` is the full 12-byte RFC 8439 nonce (for secagg streams,
    :func:`secagg.prg.nonce_for`); the block counter starts at 0, so ``offset = 64 * c``
    starts at block counter ``c``. Any ``offset`` and ``nbytes`` are allowed.

    Raises
    ------
    ConfigurationError
        Key not 32 bytes, nonce not 12 bytes, negative sizes, or past the 2^32-block counter.
    """
    chacha = _chacha()
    kw = chacha.key_words(key)
    nw = chacha.nonce_words(nonce)
    chacha.check_range(offset, nbytes)
    first = offset // _BLOCK
    count = -(-(offset + nbytes) // _BLOCK) - first
    backend = _choose(False, count * 8)
    if backend == "reference" or nbytes == 0:
        from Crypto.Cipher import ChaCha20

        cipher = ChaCha20.new(key=bytes(key), nonce=bytes(nonce))
        if offset:
            cipher.seek(offset)
        out = cipher.encrypt(bytes(nbytes))
        assert isinstance(out, bytes)
        return out
    if backend == "cpu":
        words = _cpu().keystream_words(kw, nw, first, count)
    else:
        words = _cuda().keystream_words(kw, nw, first, count).copy_to_host()
    start = offset - first * _BLOCK
    return bytes(words.view(np.uint8)[start : start + nbytes])


def unpack(words: Any, spec: QuantSpec, count: int) -> Any:
    """Inverse of packing: the first ``count`` lane values of ``words`` (uint64).

    Same values as :func:`secagg.quantize.unpack`; a device array in gives a device array out.

    Raises
    ------
    ConfigurationError
        ``count`` negative or more than ``words`` can hold.
    """
    device = is_device_array(words)
    w = int(words.shape[0]) if device else int(np.asarray(words).size)
    per = spec.lanes_per_word
    if count < 0 or count > w * per:
        raise ConfigurationError(f"{w} words hold at most {w * per} values, asked for {count}")
    backend = _choose(device, w)
    if backend == "reference":
        out = _unpack_reference(_host_u64(words, device), spec, count)
        return _to_device(out) if device else out
    if backend == "cpu":
        out = _cpu().unpack(_host_u64(words, device), per, spec.lane_bits, count)
        return _to_device(out) if device else out
    dout = _cuda().unpack(_device_u64(words, device), spec.lane_bits, count)
    return dout if device else dout.copy_to_host()


def dequantize(sums: Any, spec: QuantSpec, contributors: int, dim: int) -> tuple[Any, int]:
    """Lane sums to the weighted sum of the inputs, and the total weight.

    Same values, bit for bit, as :func:`secagg.quantize.dequantize`
    (``sums[:dim] / scale - total * clip``); a device array in gives a device array out.

    Raises
    ------
    ConfigurationError
        ``sums`` holds fewer than ``spec.values(dim)`` lane sums.
    """
    device = is_device_array(sums)
    n = int(sums.shape[0]) if device else int(np.asarray(sums).size)
    need = spec.values(dim) if dim >= 0 else -1
    if need < 0 or n < need:
        raise ConfigurationError(f"{n} lane sums; dequantizing {dim} values needs {need}")
    backend = _choose(device, -(-dim // spec.lanes_per_word))
    if backend == "reference":
        out, total = _dequantize_reference(_host_u64(sums, device), spec, contributors, dim)
        return (_to_device(out) if device else out), total
    total = int(sums[dim]) if spec.weighted else contributors
    offset = float(total) * spec.clip
    if backend == "cpu":
        out = _cpu().dequantize(_host_u64(sums, device), dim, spec.scale, offset)
        return (_to_device(out) if device else out), total
    dout = _cuda().dequantize(_device_u64(sums, device), dim, spec.scale, offset)
    return (dout if device else dout.copy_to_host()), total
