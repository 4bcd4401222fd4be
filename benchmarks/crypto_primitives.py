"""Per-call cost of the public-key primitives secagg uses, in this environment's pycryptodome.

``python benchmarks/crypto_primitives.py [--calls N]`` prints one line per operation. Used to
compare pycryptodome releases (docs/integrations.md: Flower's ``pycryptodome<4`` pin).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import Crypto

from secagg.keys import AgreementKey, IdentityKey, verify_signature


def _per_call(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    calls = parser.parse_args().calls
    a, b = AgreementKey(), AgreementKey()
    ident = IdentityKey()
    msg = bytes(100)
    sig = ident.sign(msg)
    rows = {
        "X25519 key generation": lambda: AgreementKey(),
        "X25519 agreement": lambda: a.agree(b.public),
        "Ed25519 sign": lambda: ident.sign(msg),
        "Ed25519 verify": lambda: verify_signature(ident.public, msg, sig),
    }
    print(f"pycryptodome {Crypto.__version__}, mean of {calls} calls")
    for name, fn in rows.items():
        print(f"{name:24s} {_per_call(fn, calls) * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
