"""CKKS parameter selection: security limits, noise budget, lane layout, refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest

from secagg.errors import ConfigurationError, InfeasibleParameters
from secagg.he_params import (
    HE_STANDARD_MAX_LOG_Q,
    ROUNDING_TOLERANCE,
    HEParams,
    max_value_bits,
    noise_bound,
    noise_sigma,
    select_params,
)


def test_standard_table_is_the_he_standard() -> None:
    assert HE_STANDARD_MAX_LOG_Q == {
        1024: 27,
        2048: 54,
        4096: 109,
        8192: 218,
        16384: 438,
        32768: 881,
    }


@pytest.mark.parametrize(("mode", "goal"), [("ckks", 16.0), ("hybrid", 32.0)])
def test_goals_at_a_million_parameters(mode: str, goal: float) -> None:
    p = select_params(100, 8, 10**6, mode)  # type: ignore[arg-type]
    assert p.lane_bits == 15  # 8 bits + ceil(log2 100)
    assert p.lanes_per_slot == 2
    assert p.bytes_per_parameter <= goal / 3.9  # 4 B/param: both parts of a slot, seeded
    assert sum(p.coeff_mod_bit_sizes) <= HE_STANDARD_MAX_LOG_Q[p.poly_modulus_degree]
    assert p.noise_bound <= ROUNDING_TOLERANCE
    assert p.slot_sum_bits <= p.value_bits
    if mode == "hybrid":
        # masked per slot: 2 * 15 + ceil(log2 101) = 37 bits; per-lane masking would need 44
        assert p.mask_bits == 30 and p.carry_bits == 7 and p.slot_sum_bits == 37


@pytest.mark.parametrize("mode", ["ckks", "hybrid"])
@pytest.mark.parametrize("n", [1, 2, 3, 100, 1000, 5000])
@pytest.mark.parametrize("bits", [1, 4, 8, 12, 16])
def test_selected_sets_are_safe_and_exact(mode: str, n: int, bits: int) -> None:
    headroom = math.ceil(math.log2(n)) if n > 1 else 0
    needed = bits + headroom + (math.ceil(math.log2(n + 1)) if mode == "hybrid" else 0)
    try:
        p = select_params(n, bits, 12345, mode)  # type: ignore[arg-type]
    except InfeasibleParameters as exc:
        best = max(
            max_value_bits(deg, (min(60, logq),), s, n)
            for deg, logq in HE_STANDARD_MAX_LOG_Q.items()
            for s in range(1, 60)
        )
        assert needed > best
        assert f"needs {needed} exact bits" in str(exc)
        return
    assert sum(p.coeff_mod_bit_sizes) <= HE_STANDARD_MAX_LOG_Q[p.poly_modulus_degree]
    assert p.lane_bits == bits + headroom
    assert p.lanes_per_slot >= 1
    # every lane sum stays in its lane, and the slot sum in the exact bits
    assert n * p.max_lane_value < 1 << p.lane_bits
    if mode == "hybrid":  # n masked slot values and one addend, each below 2^mask_bits
        assert (n + 1) * ((1 << p.mask_bits) - 1) < 1 << p.value_bits
    else:
        assert p.slot_value_bits <= p.value_bits
    assert noise_bound(p.poly_modulus_degree, p.scale_bits, n, p.value_bits) <= 0.25
    # sqrt(2) 2^value_bits Delta < q/2 with q >= 2^(bits - 1)
    assert p.value_bits + p.scale_bits + 1.5 <= p.coeff_mod_bit_sizes[0] - 1


def test_weighted_layout_matches_quantize() -> None:
    p = select_params(10, 8, 1000, "ckks", max_weight=255)
    assert p.weight_bits == 8 and p.lane_bits == 8 + 8 + 4
    assert p.n_values == 1001
    assert p.max_lane_value == 255 * 255


def test_security_limit_refused_with_citation() -> None:
    with pytest.raises(InfeasibleParameters, match=r"HomomorphicEncryption\.org"):
        HEParams("ckks", 2, 4, 10, 1, 1024, (30,), 10, 1)
    with pytest.raises(InfeasibleParameters, match=r"218"):
        HEParams("ckks", 2, 4, 10, 1, 8192, (60, 60, 60, 60), 20, 1)
    with pytest.raises(InfeasibleParameters, match=r"poly_modulus_degree"):
        HEParams("ckks", 2, 4, 10, 1, 3000, (30,), 10, 1)
    with pytest.raises(ConfigurationError, match=r"2\.\.60 bits"):
        HEParams("ckks", 2, 4, 10, 1, 8192, (61,), 10, 1)


def test_noise_overflowing_scale_refused() -> None:
    good = select_params(100, 8, 1000, "ckks")
    with pytest.raises(InfeasibleParameters, match=r"noise bound"):
        dataclasses.replace(good, scale_bits=8)


def test_lane_overflow_refused() -> None:
    good = select_params(100, 8, 1000, "hybrid")
    with pytest.raises(InfeasibleParameters, match=r"exact bits per slot"):
        dataclasses.replace(good, lanes_per_slot=good.lanes_per_slot + 1)


def test_infeasible_combinations_have_clear_messages() -> None:
    with pytest.raises(InfeasibleParameters, match=r"needs 67 exact bits.*lower bits"):
        select_params(100, 32, 10, "hybrid", max_weight=2**20)
    with pytest.raises(InfeasibleParameters, match=r"100000 additions"):
        select_params(100_000, 16, 10, "hybrid")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 8, 10, "ckks"), "n_clients"),
        ((2, 33, 10, "ckks"), "bits"),
        ((2, 8, 0, "ckks"), "dim"),
        ((2, 8, 10, "masked"), "mode"),
    ],
)
def test_bad_arguments(args: tuple[int, int, int, str], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        select_params(*args)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_weight"):
        select_params(2, 8, 10, "ckks", max_weight=0)


def test_noise_model_numbers() -> None:
    # sigma^2 = N/2 (n (10.5 + 1/12) + 1/12); measured 0.0157 / Delta for N=8192, n=100
    assert noise_sigma(8192, 100) / 2**17 == pytest.approx(0.01588, rel=1e-3)
    assert max_value_bits(8192, (60,), 17, 100) == 40
    assert max_value_bits(4096, (60,), 16, 100) == 41
    assert max_value_bits(1024, (27,), 26, 100) == 0


def test_sizes_and_json_roundtrip() -> None:
    p = select_params(100, 8, 10**6, "hybrid")
    lo, hi = p.ciphertext_bytes_range(seeded=True)
    assert lo < 8 * p.poly_modulus_degree < p.nominal_ciphertext_bytes(seeded=True) <= hi
    flo, fhi = p.ciphertext_bytes_range(seeded=False)
    assert hi < flo and fhi > 16 * p.poly_modulus_degree
    assert HEParams.from_json(p.to_json()) == p
    with pytest.raises(ConfigurationError):
        HEParams.from_json(b"{not json")
    with pytest.raises(ConfigurationError):
        HEParams.from_json(b'{"mode": "ckks"}')
