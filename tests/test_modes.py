"""ckks and hybrid rounds: exact aggregates, dropouts, bad ciphertexts, what a key holder sees."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from secagg import ckks
from secagg.errors import (
    ConfigurationError,
    InvalidSignature,
    LateMessage,
    MalformedMessage,
    RoundAborted,
)
from secagg.he_round import CkksClient, CkksServer
from secagg.keys import IdentityKey
from secagg.messages import EncryptedInput, EncryptedResult, encrypted_input_payload
from secagg.params import make_params
from secagg.rounds.base import Stage
from secagg.simulate import SimulationConfig, simulate
from tests.helpers import Harness
from tests.test_protocol import STAGES, assert_exact


@pytest.mark.parametrize("stage", [None, *STAGES])
def test_hybrid_exact_with_dropouts_at_every_stage(stage: str | None) -> None:
    h = Harness(8, 40, mode="hybrid", neighbors="all", weights=True)
    drop = {3, 6}
    h.run(drops={stage: drop} if stage else None)
    contributors = set(h.ids) - drop if stage in STAGES[:3] else set(h.ids)
    assert_exact(h, contributors)
    res = h.server.result
    assert res is not None and res.sums is None and res.ciphertexts  # the server sees nothing


def test_hybrid_server_refuses_bad_ciphertexts_and_round_continues() -> None:
    h = Harness(7, 30, mode="hybrid", neighbors="all")
    out = h.stage(h.start())
    out = h.stage(h.to_clients(out))
    replies = h.to_clients(out)
    good = replies[2][0]
    assert isinstance(good, EncryptedInput)
    # A malicious client signs garbage itself: the ciphertext checks must catch it.
    cts = (good.ciphertexts[0][:-10], *good.ciphertexts[1:])
    sig = h.identities[2].sign(encrypted_input_payload(good.session_id, 2, cts))
    replies[2] = [dataclasses.replace(good, ciphertexts=cts, signature=sig)]
    other = replies[4][0]
    assert isinstance(other, EncryptedInput)
    replies[4] = [dataclasses.replace(other, signature=bytes(64))]
    out = h.stage(replies)
    kinds = {type(e) for e in h.errors}
    assert MalformedMessage in kinds and InvalidSignature in kinds
    assert not h.server.records[2].active and not h.server.records[4].active
    for _ in range(3):  # consistency, unmasking, the key holders' verdict on the result
        out = h.stage(h.to_clients(out))
    assert_exact(h, set(h.ids) - {2, 4})


def test_hybrid_upload_decrypted_alone_looks_uniform() -> None:
    """A key holder who obtains one peer's ciphertexts sees masked slots: uniform mod 2^m."""
    h = Harness(4, 4000, mode="hybrid", neighbors="all")
    out = h.stage(h.start())
    out = h.stage(h.to_clients(out))
    replies = h.to_clients(out)
    upload = replies[1][0]
    assert isinstance(upload, EncryptedInput)
    assert h.he_secret is not None
    he = h.params.he
    slots = ckks.decrypt(h.he_secret, upload.ciphertexts, he.n_slots)
    m = ckks.mask_modulus_bits(he)
    assert int(slots.max()) < 1 << m
    # Top 4 bits and bottom 4 bits: 16 bins each, uniform under masking (the plain values
    # are concentrated around the middle of the quantization range).
    for bins in ((slots >> np.uint64(m - 4)), slots & np.uint64(15)):
        assert chi_square(bins) < CHI2_15_P1E4
    plain = h.expected_sums([1])
    assert chi_square(plain >> np.uint64(h.params.quant.lane_bits - 4)) > 10 * CHI2_15_P1E4


CHI2_15_P1E4 = 44.26
"""Upper 10^-4 quantile of the chi-square distribution with 15 degrees of freedom."""


def chi_square(bins: np.ndarray) -> float:
    """Pearson's statistic of 16-bin counts against the uniform distribution."""
    counts = np.bincount(bins.astype(np.int64), minlength=16)
    expected = counts.sum() / 16
    return float(((counts - expected) ** 2 / expected).sum())


def _ckks_round(
    n: int, dim: int, publish_after: int | None = None
) -> tuple[CkksServer, dict[int, CkksClient], dict[int, np.ndarray], ckks.SecretContext]:
    params = make_params(n, dim, mode="ckks", max_weight=50)
    he = params.he
    secret_bytes = ckks.make_secret_context(he)
    secret = ckks.load_secret_context(secret_bytes, he)
    server_ctx = ckks.load_server_context(ckks.make_public_context(secret_bytes), he)
    ids = {c: IdentityKey() for c in range(1, n + 1)}
    directory = {c: k.public for c, k in ids.items()}
    rng = np.random.default_rng(7)
    xs = {c: rng.normal(0, 1, dim) for c in ids}
    server = CkksServer(params, directory, server_ctx, timeout=5.0, publish_after=publish_after)
    clients = {
        c: CkksClient(c, ids[c], params, directory, xs[c], c, secret) for c in ids
    }  # weights = ids
    return server, clients, xs, secret


def test_ckks_round_exact_and_deadline_dropouts() -> None:
    server, clients, xs, _ = _ckks_round(6, 500)
    out = []
    for c in (1, 2, 3, 5):
        out += server.receive(c, clients[c].start()[0].encode(), 0.0)
    assert out == [] and not server.done
    out = server.tick(5.0)  # deadline: 4 and 6 never submitted
    assert server.stage is Stage.COMPLETED
    for c, msg in out:
        assert isinstance(msg, EncryptedResult)
        clients[c].receive(msg.encode())
    res = clients[1].result
    assert res is not None and res.contributors == (1, 2, 3, 5)
    assert res.total_weight == 1 + 2 + 3 + 5
    expected = sum(c * xs[c] for c in (1, 2, 3, 5))
    step = 1.0 / make_params(6, 500, mode="ckks").quant.scale
    assert np.max(np.abs(res.weighted_sum - expected)) <= step * res.total_weight
    assert server.records[4].dropped_stage is Stage.ENCRYPTED_INPUT


def test_ckks_async_publishes_after_k_and_refuses_late() -> None:
    server, clients, _, _ = _ckks_round(6, 100, publish_after=3)
    out = []
    for c in (4, 2, 6):
        out += server.receive(c, clients[c].start()[0].encode(), 0.0)
    assert server.done and {c for c, _ in out} == {2, 4, 6}
    with pytest.raises(LateMessage):
        server.receive(1, clients[1].start()[0].encode(), 0.1)


def test_ckks_refuses_garbage_and_aborts_below_threshold() -> None:
    server, clients, _, _ = _ckks_round(4, 100)
    msg = clients[1].start()[0]
    assert isinstance(msg, EncryptedInput)
    flipped = bytearray(msg.ciphertexts[0])
    flipped[len(flipped) // 2] ^= 0xFF
    bad = dataclasses.replace(msg, ciphertexts=(bytes(flipped), *msg.ciphertexts[1:]))
    with pytest.raises(InvalidSignature):  # the signature covers every ciphertext
        server.receive(1, bad.encode(), 0.0)
    server.tick(10.0)
    assert isinstance(server.error, RoundAborted)
    assert server.error.stage == "encrypted_input"


def test_mode_configuration_errors() -> None:
    params = make_params(4, 10, mode="hybrid")
    ids = {c: IdentityKey() for c in range(1, 5)}
    directory = {c: k.public for c, k in ids.items()}
    from secagg.server import SecAggServer

    with pytest.raises(ConfigurationError):
        SecAggServer(params, directory)  # no CKKS context
    with pytest.raises(ConfigurationError):
        make_params(4, 10).he  # noqa: B018 -- masked rounds have no CKKS parameters


@pytest.mark.parametrize("mode", ["ckks", "hybrid"])
def test_simulate_reports_exact_he_rounds(mode: str) -> None:
    r = simulate(SimulationConfig(mode=mode, clients=8, dim=300, dropout=0.25, seed=2))
    assert r["status"] == "completed" and r["exact"], r
    assert r["he"]["ciphertexts_per_client"] >= 1
