"""In-process simulation of one round: N clients and a server wired in memory, fake clock.

Like h11's ``ConnectionPair``: every message goes through its byte encoding, so the
simulation exercises the codec and counts the bytes each client sends and receives.
Dropped clients simply stop answering at their scheduled stage; the fake clock then jumps
to the stage deadline, as a real server's timer would fire.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secagg import ckks, graph
from secagg.client import SecAggClient, decrypt_lane_sums
from secagg.errors import RoundAborted, SecAggError
from secagg.he_params import HEParams
from secagg.he_round import CkksClient, CkksServer
from secagg.keys import IdentityKey, random_seed
from secagg.messages import SEND_ORDER, EncryptedInput, Message, encrypted_input_payload
from secagg.params import Mode, RoundParams, make_params
from secagg.policy import ClientPolicy
from secagg.quantize import dequantize, lane_values
from secagg.rounds.base import Stage
from secagg.server import SecAggServer, StageTimeouts

__all__ = [
    "DROP_STAGES",
    "RANDOM_DROP_STAGES",
    "SimulationConfig",
    "run_round",
    "schedule",
    "simulate",
    "simulation_inputs",
    "withheld_from",
    "withholds",
]

DROP_STAGES: dict[str, Stage] = {
    "advertise": Stage.ADVERTISE_KEYS,
    "reveal": Stage.REVEAL_NONCES,
    "share": Stage.SHARE_KEYS,
    "masked": Stage.MASKED_INPUT,
    "consistency": Stage.CONSISTENCY,
    "unmask": Stage.UNMASKING,
}
"""``--drop-stage`` names: the stage whose message a dropped client never sends. A client
that drops in ``reveal`` aborts the round (the reveal set must be the whole roster)."""
RANDOM_DROP_STAGES = ("share", "masked", "consistency", "unmask")
"""What ``--drop-stage random`` picks from: the stages whose dropouts the round tolerates."""

_ORDER = {s: i for i, s in enumerate(DROP_STAGES.values())}
_SENT_IN = SEND_ORDER
"""Client message type -> index of the stage it is sent in."""
_ANSWERED_IN = {16: 1, 23: 2, 17: 3, 18: 4, 19: 5}
"""Server message type -> index of the stage whose client message answers it (else: final)."""


def withholds(drop: Stage | None, msg_type: int) -> bool:
    """Whether a client scheduled to drop before ``drop`` withholds a message it would send.

    ``msg_type`` is the client message's ``TYPE`` (byte 5 of its encoding); ``drop`` is the
    client's entry in a :func:`schedule` plan (``None``: it never drops). A dropped client
    sends nothing from its drop stage on.
    """
    return drop is not None and _SENT_IN[msg_type] >= _ORDER[drop]


def withheld_from(drop: Stage | None, msg_type: int) -> bool:
    """Whether a client scheduled to drop before ``drop`` is already gone when the server
    sends it a message of type ``msg_type`` (so it neither reads nor answers it)."""
    return drop is not None and _ANSWERED_IN.get(msg_type, len(_ORDER)) > _ORDER[drop]


@dataclass
class SimulationConfig:
    """Options of ``secagg simulate``."""

    clients: int = 20
    dim: int = 1000
    dropout: float = 0.1
    drop_stage: str = "random"
    mode: str = "masked"
    bits: int = 16
    clip: float = 8.0
    neighbors: str = "auto"
    threshold: str = "auto"
    seed: int = 0
    max_weight: int = 1
    tolerated_dropout: float | None = None
    tolerated_corrupt: float | None = None
    policy: ClientPolicy | None = None
    """The simulated clients' policy; by default the secure one with the tolerated
    fractions above (explicit ``neighbors``/``threshold`` that miss it are refused)."""
    dp_epsilon: float | None = None
    """Target epsilon of distributed DP over ``dp_rounds`` (None: no DP report)."""
    dp_delta: float = 1e-5
    dp_rounds: int = 1
    dp_clip: float | None = None
    """L2 clip norm of the DP pipeline (default: ``clip``)."""
    dp_prepare: bool = False
    """Each client draws its noise before the round (``PreparedNoise``, docs/dp.md "Speed"):
    ``seconds.client_median`` is then the in-round time and ``dp.prepare_seconds`` the
    median time ahead of the round."""
    spoil: tuple[int, ...] = ()
    """hybrid: clients that upload signed ciphertexts of out-of-range slots (a malicious
    client), so the round runs its blame step and aborts naming them."""


@dataclass
class _Tally:
    up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    client_seconds: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    server_seconds: float = 0.0


def schedule(cfg: SimulationConfig, ids: list[int], rng: random.Random) -> dict[int, Stage]:
    """Which clients drop, and before sending which stage's message."""
    n_drop = round(cfg.dropout * len(ids))
    if not 0 <= n_drop <= len(ids):
        raise SecAggError(f"dropout must be in [0, 1], got {cfg.dropout}")
    dropped = rng.sample(ids, n_drop)
    names = list(RANDOM_DROP_STAGES)
    plan: dict[int, Stage] = {}
    for cid in dropped:
        name = rng.choice(names) if cfg.drop_stage == "random" else cfg.drop_stage
        if name not in DROP_STAGES:
            raise SecAggError(f"unknown drop stage {name!r}")
        plan[cid] = DROP_STAGES[name]
    return plan


def run_round(
    params: RoundParams,
    inputs: dict[int, np.ndarray[Any, Any]],
    weights: dict[int, int],
    drop_plan: dict[int, Stage],
    *,
    timeout: float = 10.0,
    he_secret: ckks.SecretContext | None = None,
    he_server: ckks.ServerContext | None = None,
    policy: ClientPolicy | None = None,
    spoil: tuple[int, ...] = (),
    dp_prepared: Mapping[int, Any] | None = None,
) -> tuple[SecAggServer | CkksServer, _Tally, dict[int, bytes]]:
    """Run one round in memory; returns the server, byte/time tallies and rounding keys.

    ``drop_plan`` maps a client to the stage whose message it never sends; every client
    checks the round against ``policy`` (the secure default when ``None``). Clients in
    ``spoil`` (hybrid) replace their upload with :func:`spoiled_upload`. ``dp_prepared``:
    client -> its :class:`secagg.dp.participants.PreparedNoise` (DP noise drawn before).
    """
    dp_prepared = dp_prepared or {}
    tally = _Tally()
    errors: list[SecAggError] = []
    identities = {cid: IdentityKey() for cid in inputs}
    directory = {cid: k.public for cid, k in identities.items()}
    rounding = {cid: random_seed() for cid in inputs}
    now = 0.0
    server: SecAggServer | CkksServer
    clients: dict[int, SecAggClient | CkksClient]
    if params.mode is Mode.CKKS:
        assert he_secret is not None and he_server is not None
        server = CkksServer(params, directory, he_server, timeout=timeout, now=now)
        clients = {
            c: CkksClient(
                c, identities[c], params, directory, inputs[c], weights[c], he_secret.key_holder(),
                rounding_key=rounding[c], policy=policy,
            )
            for c in inputs
        }  # fmt: skip
    else:
        timeouts = StageTimeouts.uniform(timeout)
        server = SecAggServer(params, directory, timeouts=timeouts, now=now, he_context=he_server)
        clients = {
            c: SecAggClient(
                c, identities[c], params, directory, inputs[c], weights[c],
                rounding_key=rounding[c],
                he_context=None if he_secret is None else he_secret.key_holder(),
                policy=policy, dp_prepared=dp_prepared.get(c),
            )
            for c in inputs
        }  # fmt: skip

    def to_server(cid: int, msgs: list[Message]) -> list[tuple[int, Message]]:
        out: list[tuple[int, Message]] = []
        for m in msgs:
            if withholds(drop_plan.get(cid), m.TYPE):
                continue
            if cid in spoil and isinstance(m, EncryptedInput) and he_secret is not None:
                m = spoiled_upload(he_secret, params, identities[cid], m)
            data = m.encode()
            tally.up[cid] += len(data)
            t0 = time.perf_counter()
            try:
                out.extend(server.receive(cid, data, now))
            except SecAggError:
                out.extend(server.tick(now))
            tally.server_seconds += time.perf_counter() - t0
        return out

    pending: list[tuple[int, Message]] = []
    for cid, c in clients.items():
        t0 = time.perf_counter()
        first = c.start(now)
        tally.client_seconds[cid] += time.perf_counter() - t0
        pending.extend(to_server(cid, first))
    while not server.done or pending:
        if not pending:
            deadline = server.deadline
            assert deadline is not None
            now = max(now, deadline)
            t0 = time.perf_counter()
            pending = server.tick(now)
            tally.server_seconds += time.perf_counter() - t0
            continue
        batch, pending = pending, []
        for cid, msg in batch:
            if withheld_from(drop_plan.get(cid), msg.TYPE):
                continue
            data = msg.encode()
            tally.down[cid] += len(data)
            t0 = time.perf_counter()
            try:
                replies = clients[cid].receive(data, now)
            except SecAggError as exc:
                errors.append(exc)
                replies = []
            tally.client_seconds[cid] += time.perf_counter() - t0
            pending.extend(to_server(cid, replies))
    return server, tally, rounding


def spoiled_upload(
    secret: ckks.SecretContext, params: RoundParams, identity: IdentityKey, msg: EncryptedInput
) -> EncryptedInput:
    """A malicious client's upload: ciphertexts of slots at ``2^slot_sum_bits - 1`` (no
    honest client encrypts them; the sum then leaves its range), signed by the client."""
    he = params.he
    k = he.slots_per_ciphertext
    huge = np.zeros(he.n_ciphertexts * k)
    huge[: he.n_slots] = 2.0**he.slot_sum_bits - 1
    cts = tuple(
        secret._dump(secret._encryptor.encrypt_symmetric(secret._encode(huge[i * k : (i + 1) * k])))
        for i in range(he.n_ciphertexts)
    )
    sig = identity.sign(encrypted_input_payload(msg.session_id, msg.sender, cts))
    return EncryptedInput(msg.round_id, msg.sender, msg.session_id, cts, sig)


def simulation_inputs(
    cfg: SimulationConfig,
) -> tuple[list[int], dict[int, np.ndarray[Any, Any]], dict[int, int], dict[int, Stage]]:
    """Client ids, inputs, weights and the dropout plan of ``cfg`` (seeded test data)."""
    rng = random.Random(cfg.seed)  # noqa: S311 -- picks test data and dropouts, no secrets
    data_rng = np.random.default_rng(cfg.seed)  # test data only, never secrets
    ids = list(range(1, cfg.clients + 1))
    inputs = {
        cid: np.clip(data_rng.normal(0.0, cfg.clip / 4, cfg.dim), -cfg.clip, cfg.clip)
        for cid in ids
    }
    weights = {cid: rng.randint(1, cfg.max_weight) for cid in ids}
    return ids, inputs, weights, schedule(cfg, ids, rng)


def he_params_report(he: HEParams, **extra: Any) -> dict[str, Any]:
    """The ``he`` section of a report: the CKKS parameters of the round, then ``extra``."""
    return {
        "poly_modulus_degree": he.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(he.coeff_mod_bit_sizes),
        "scale_bits": he.scale_bits,
        "lanes_per_slot": he.lanes_per_slot,
        "ciphertexts_per_client": he.n_ciphertexts,
        **extra,
    }


def simulate(cfg: SimulationConfig) -> dict[str, Any]:
    """Run the configured round and return the report printed by ``secagg simulate``."""
    params = make_params(
        cfg.clients,
        cfg.dim,
        mode=Mode.parse(cfg.mode),
        clip=cfg.clip,
        bits=cfg.bits,
        max_weight=cfg.max_weight,
        neighbors=cfg.neighbors,
        threshold=cfg.threshold,
        dropout=cfg.tolerated_dropout,
        corrupt=cfg.tolerated_corrupt,
    )
    dp_cal = None
    if cfg.dp_epsilon is not None and params.mode is not Mode.CKKS:
        # The round itself carries DP: calibrated for its n and threshold, offered in params
        # (hybrid: before the CKKS parameters, which follow the DP lanes).
        from secagg.dp.policy import DPOffer

        dp_cal = _calibrate(cfg, params.n_clients, params.threshold)
        params = dataclasses.replace(params, dp=DPOffer.from_calibration(dp_cal))
    he_secret: ckks.SecretContext | None = None
    he_server: ckks.ServerContext | None = None
    he_report: dict[str, Any] = {}
    if params.mode is not Mode.MASKED:
        he = params.he
        t0 = time.perf_counter()
        secret_bytes = ckks.make_secret_context(he)
        he_secret = ckks.load_secret_context(secret_bytes, he)
        he_server = ckks.load_server_context(ckks.make_public_context(secret_bytes), he)
        he_report = he_params_report(he, keygen_seconds=time.perf_counter() - t0)
    ids, inputs, weights, plan = simulation_inputs(cfg)
    if params.mode is Mode.CKKS:
        # No stage but the upload: a dropped client simply never uploads.
        plan = {c: Stage.MASKED_INPUT for c in plan}
    wall0 = time.perf_counter()
    # The simulated clients assume what the operator told the finder to tolerate.
    policy = cfg.policy or ClientPolicy(
        dropout=graph.DEFAULT_DROPOUT if cfg.tolerated_dropout is None else cfg.tolerated_dropout,
        corrupt=graph.DEFAULT_CORRUPT if cfg.tolerated_corrupt is None else cfg.tolerated_corrupt,
        dp=None if dp_cal is None else _dp_policy(cfg, dp_cal.clip),
    )
    if cfg.spoil and params.mode is not Mode.HYBRID:
        raise SecAggError("spoiled uploads are simulated in hybrid rounds only")
    prepared: dict[int, Any] = {}
    prepare_seconds: list[float] = []
    if cfg.dp_prepare and params.dp is not None:
        from secagg.dp.participants import PreparedNoise

        for c in ids:  # ahead of the round (training time in a deployment): not in `wall`
            t0 = time.perf_counter()
            prepared[c] = PreparedNoise(params.dp, policy.dp)
            prepare_seconds.append(time.perf_counter() - t0)
        wall0 = time.perf_counter()
    server, tally, rounding = run_round(
        params,
        inputs,
        weights,
        plan,
        he_secret=he_secret,
        he_server=he_server,
        policy=policy,
        spoil=cfg.spoil,
        dp_prepared=prepared,
    )
    wall = time.perf_counter() - wall0  # the round only: not data generation or checking

    report: dict[str, Any] = {
        "mode": params.mode.name.lower(),
        "clients": cfg.clients,
        "dim": cfg.dim,
        "bits": cfg.bits,
        "neighbors": 0 if params.mode is Mode.CKKS else params.degree,
        "threshold": params.threshold,
        "dropped": {str(c): s.value for c, s in sorted(plan.items())},
        "warnings": list(params.warnings) + server.ctx.warnings,
    }
    if he_report:
        report["he"] = he_report
    result = server.result
    if result is None:
        err = server.error
        assert isinstance(err, RoundAborted)
        report.update(
            status="aborted",
            abort={"stage": err.stage, "reason": err.reason},
            blamed=sorted(c for c, r in server.records.items() if r.dropped_stage is Stage.BLAME),
            survivors=0,
            exact=False,
            max_abs_error=None,
        )
    elif params.dp is not None:
        dp_ring = _dp_ring(params, result, he_secret)
        released = _dp_decode(params, dp_ring, server.session_id)
        clipped = sum(_clip(inputs[c], params) for c in result.contributors)
        report.update(
            status="completed",
            survivors=len(result.contributors),
            exact=False,  # the release carries noise by design; see dp.measured_std
            max_abs_error=float(np.max(np.abs(released - clipped))),
            quantization_step=1.0 / params.dp.gamma,
        )
    else:
        spec = params.quant
        expected = np.zeros(spec.values(cfg.dim), dtype=np.uint64)
        float_sum = np.zeros(cfg.dim)
        for cid in result.contributors:
            expected += lane_values(inputs[cid], weights[cid], spec, rounding[cid])
            float_sum += weights[cid] * inputs[cid]
        if result.sums is not None:
            sums = result.sums
        else:  # ckks, hybrid: a key holder decrypts what the server published
            assert result.ciphertexts is not None and he_secret is not None
            sums = decrypt_lane_sums(he_secret, params, result.ciphertexts)
        weighted_sum, _ = dequantize(sums, spec, len(result.contributors), cfg.dim)
        report.update(
            status="completed",
            survivors=len(result.contributors),
            exact=bool(np.array_equal(expected, sums)),
            max_abs_error=float(np.max(np.abs(weighted_sum - float_sum))),
            quantization_step=1.0 / spec.scale,
        )
    senders = [c for c in ids if c not in plan] or ids
    if dp_cal is not None and result is not None:
        report["dp"] = _dp_round_report(dp_cal, server, inputs, dp_ring)
        report["dp"]["seconds_per_client"] = statistics.median(
            tally.client_seconds[c] for c in senders
        )
        report["dp"]["prepared"] = bool(prepared)
        if prepare_seconds:
            report["dp"]["prepare_seconds"] = statistics.median(prepare_seconds)
    elif cfg.dp_epsilon is not None and result is not None:
        report["dp"] = _dp_report(cfg, ids, inputs, list(result.contributors), params.threshold)
    report["seconds"] = {
        "client_median": statistics.median(tally.client_seconds[c] for c in senders),
        "server": tally.server_seconds,
        "wall": wall,
    }
    report["bytes"] = {
        "upload_per_client": statistics.mean(tally.up[c] for c in senders),
        "download_per_client": statistics.mean(tally.down[c] for c in senders),
        "raw_float32_per_client": 4 * cfg.dim,
    }
    return report


def _calibrate(cfg: SimulationConfig, n: int, threshold: int) -> Any:
    from secagg.dp.calibration import calibrate

    assert cfg.dp_epsilon is not None
    return calibrate(
        cfg.dp_epsilon,
        cfg.dp_delta,
        cfg.dp_rounds,
        n_clients=n,
        min_survivors=threshold,
        dim=cfg.dim,
        clip=cfg.dp_clip if cfg.dp_clip is not None else cfg.clip,
    )


def _dp_policy(cfg: SimulationConfig, clip: float) -> Any:
    """The simulated clients' own DP requirement: the operator's budget, rounds and clip."""
    from secagg.dp.policy import DPPolicy

    assert cfg.dp_epsilon is not None
    return DPPolicy(cfg.dp_epsilon, cfg.dp_delta, cfg.dp_rounds, clip)


def _clip(x: np.ndarray[Any, Any], params: RoundParams) -> np.ndarray[Any, Any]:
    from secagg.dp.encoding import clip_l2

    assert params.dp is not None
    return clip_l2(x, params.dp.clip)


def _dp_ring(
    params: RoundParams, result: Any, he_secret: ckks.SecretContext | None
) -> np.ndarray[Any, Any]:
    """The released ring sum: the server's (masked) or a key holder's decryption plus the
    published removal (hybrid)."""
    from secagg.client import hybrid_dp_ring

    if result.sums is not None:
        return np.asarray(result.sums, dtype=np.uint64)
    assert result.ciphertexts is not None and he_secret is not None
    sums = decrypt_lane_sums(he_secret, params, result.ciphertexts)
    return hybrid_dp_ring(params, sums, result.dp_removal)


def _dp_decode(
    params: RoundParams, ring: np.ndarray[Any, Any], session_id: bytes
) -> np.ndarray[Any, Any]:
    from secagg.dp.encoding import decode_sum
    from secagg.dp.participants import rotation_key

    o = params.dp
    assert o is not None
    return decode_sum(
        ring, bits=o.bits, gamma=o.gamma, rotation_key=rotation_key(session_id), dim=o.dim
    )


def _dp_round_report(
    cal: Any,
    server: SecAggServer | CkksServer,
    inputs: dict[int, np.ndarray[Any, Any]],
    ring: np.ndarray[Any, Any],
) -> dict[str, Any]:
    """The ``dp`` block from the masked round's OWN output (``path: "masked-round"``).

    ``measured_std``: standard deviation over the ``d'`` coordinates of (released ring sum,
    centred, minus ``gamma`` times the exact sum of the clipped, rotated inputs), divided by
    ``gamma``: input units, like ``target_std`` (it includes rounding, variance <= 1/4 per
    contributor and coordinate in integer units).
    """
    from secagg.dp.encoding import centre, clip_l2
    from secagg.dp.participants import rotation_key
    from secagg.dp.rotation import rotate

    result = server.result
    assert result is not None and result.dp is not None
    key = rotation_key(server.session_id)
    exact = cal.gamma * sum(rotate(clip_l2(inputs[c], cal.clip), key) for c in result.contributors)
    residual = centre(ring, cal.bits).astype(np.float64) - exact
    report: dict[str, Any] = cal.as_dict()
    report.update(result.dp)
    report["measured_std"] = float(residual.std()) / cal.gamma
    report["path"] = f"{server.ctx.params.mode.name.lower()}-round"
    return report


def _dp_report(
    cfg: SimulationConfig,
    ids: list[int],
    inputs: dict[int, np.ndarray[Any, Any]],
    contributors: list[int],
    threshold: int,
) -> dict[str, Any]:
    """The ``dp`` block of a mode without DP integration (hybrid, ckks): the DP arithmetic
    (secagg.dp) run beside the round on its inputs and contributors (``path:
    "beside-masked-round"``); masks cancel mod 2^b, so the figures are those an integrated
    round would release.
    """
    from secagg.dp.calibration import calibrate
    from secagg.dp.simulation import run_dp_aggregate

    assert cfg.dp_epsilon is not None
    cal = calibrate(
        cfg.dp_epsilon,
        cfg.dp_delta,
        cfg.dp_rounds,
        n_clients=len(ids),
        min_survivors=threshold,
        dim=cfg.dim,
        clip=cfg.dp_clip if cfg.dp_clip is not None else cfg.clip,
    )
    index = {cid: k for k, cid in enumerate(ids)}
    t0 = time.perf_counter()
    res = run_dp_aggregate(
        cal, [inputs[cid] for cid in ids], sorted(index[c] for c in contributors)
    )
    report = dict(res.report)
    report["path"] = "beside-masked-round"
    report["seconds_per_client"] = (time.perf_counter() - t0) / max(1, len(contributors))
    return report
