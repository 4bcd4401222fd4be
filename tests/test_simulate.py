"""The simulation's dropout semantics, as public functions (the benchmark drivers use them)."""

from __future__ import annotations

import random

import pytest

from secagg.messages import (
    AdvertiseKeys,
    AggregateResult,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedInput,
    MaskedInput,
    NonceReveal,
    NonceReveals,
    Roster,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from secagg.rounds.base import Stage
from secagg.simulate import DROP_STAGES, SimulationConfig, schedule, withheld_from, withholds

SENT = [AdvertiseKeys, NonceReveal, ShareKeys, MaskedInput, ConsistencySignature, UnmaskShares]
"""Client messages in the order of the stages they are sent in (index = stage)."""
ANSWERED = [Roster, NonceReveals, ShareDelivery, ConsistencyRequest, UnmaskRequest]
"""Server messages; the client's answer to ``ANSWERED[i]`` is ``SENT[i + 1]``."""


@pytest.mark.parametrize("name", list(DROP_STAGES))
def test_a_dropped_client_sends_nothing_from_its_stage_on(name: str) -> None:
    drop = DROP_STAGES[name]
    at = list(DROP_STAGES).index(name)
    assert [withholds(drop, m.TYPE) for m in SENT] == [i >= at for i in range(len(SENT))]
    assert withholds(drop, EncryptedInput.TYPE) == withholds(drop, MaskedInput.TYPE)
    assert not any(withholds(None, m.TYPE) for m in SENT)


@pytest.mark.parametrize("name", list(DROP_STAGES))
def test_a_dropped_client_reads_only_what_it_would_still_answer(name: str) -> None:
    """It still receives the message its withheld reply answers (it drops while working on
    it), and nothing after; the final result reaches only clients that never dropped."""
    drop = DROP_STAGES[name]
    at = list(DROP_STAGES).index(name)
    got = [not withheld_from(drop, m.TYPE) for m in ANSWERED]
    assert got == [i + 1 <= at for i in range(len(ANSWERED))]
    assert withheld_from(drop, AggregateResult.TYPE)
    assert not withheld_from(None, AggregateResult.TYPE)


def test_schedule_drops_the_configured_share() -> None:
    cfg = SimulationConfig(clients=20, dropout=0.25, drop_stage="masked")
    plan = schedule(cfg, list(range(1, 21)), random.Random(0))
    assert len(plan) == 5 and set(plan.values()) == {Stage.MASKED_INPUT}
