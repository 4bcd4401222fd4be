"""Per-call cost of the primitives secagg uses: ours (OpenSSL through ``cryptography``, the
hot path of :mod:`secagg.keys` and :func:`secagg.prg.derive_key`) beside pycryptodome's.

``python benchmarks/crypto_primitives.py [--calls N]`` prints one line per operation. Used to
compare pycryptodome releases (docs/integrations.md: Flower's ``pycryptodome<4`` pin) and to
justify the OpenSSL hot path (docs/protocol.md, "Crypto suite").
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import Crypto
import cryptography
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.DH import import_x25519_private_key, import_x25519_public_key, key_agreement
from Crypto.Protocol.KDF import HKDF
from Crypto.Signature import eddsa

from secagg.keys import AgreementKey, IdentityKey, aead_encrypt, verify_signature
from secagg.prg import Purpose, derive_key


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
    key, bundle = bytes(range(32)), bytes(66)
    pa = import_x25519_private_key(a.private_bytes)
    pe = eddsa.import_private_key(ident.private_bytes)
    pe_pub = pe.public_key()

    def pyc_gcm() -> object:
        cipher = AES.new(key, AES.MODE_GCM, nonce=bytes(12), mac_len=16)
        cipher.update(b"ad")
        return cipher.encrypt_and_digest(bundle)

    rows: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "X25519 key generation": (
            lambda: AgreementKey(),
            lambda: import_x25519_private_key(bytes(32)).public_key(),
        ),
        "X25519 agreement": (
            lambda: a.agree(b.public),
            lambda: key_agreement(
                static_priv=pa, static_pub=import_x25519_public_key(b.public), kdf=lambda z: z
            ),
        ),
        "Ed25519 sign": (lambda: ident.sign(msg), lambda: eddsa.new(pe, "rfc8032").sign(msg)),
        "Ed25519 verify": (
            lambda: verify_signature(ident.public, msg, sig),
            lambda: eddsa.new(pe_pub, "rfc8032").verify(msg, sig),
        ),
        "AES-256-GCM, 66 B": (lambda: aead_encrypt(key, bundle, b"ad"), pyc_gcm),
        "HKDF-SHA256, 32 B": (
            lambda: derive_key(key, key, Purpose.PAIR_MASK, 1, 2),
            lambda: HKDF(key, 32, key, SHA256, context=b"secagg/v1/pair-mask"),
        ),
    }
    print(
        f"ours: cryptography {cryptography.__version__} (OpenSSL); "
        f"pycryptodome {Crypto.__version__}; mean of {calls} calls"
    )
    print(f"{'':24s} {'ours':>9s} {'pycryptodome':>13s}")
    for name, (ours, theirs) in rows.items():
        o, t = _per_call(ours, calls), _per_call(theirs, calls)
        print(f"{name:24s} {o * 1e3:6.3f} ms {t * 1e3:10.3f} ms  ({t / o:4.1f}x)")


if __name__ == "__main__":
    main()
