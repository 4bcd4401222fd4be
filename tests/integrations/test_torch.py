"""SecureFedAvg over a real loopback server: dtypes, exact means, FedAvg weights, dropouts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from secagg.messages import EncryptedInput, MaskedInput, Message
from secagg.service.integrations.torch import CUDA_ZERO_COPY, SecureFedAvg, floating_state
from secagg.service.tensors import flatten

from .conftest import Federation, run_all

torch = pytest.importorskip("torch")

CLIP = 65535 / 8192
"""With 16 bits the quantization scale is exactly 4096: odd multiples of 1/8192 sit on the
grid, so sums are exact and the published mean is the exact weighted mean."""


class Mixed(torch.nn.Module):  # type: ignore[misc]
    """Parameters in three dtypes and an integer buffer."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.w32 = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float32, device=device))
        self.w16 = torch.nn.Parameter(torch.zeros(5, dtype=torch.float16, device=device))
        self.wbf = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16, device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))


DIM = 12 + 5 + 6


def grid_values(rng: np.random.Generator, shape: tuple[int, ...]) -> Any:
    """Odd multiples of 1/8192 with 8 significant bits: exact in bf16, fp16 and fp32."""
    k = 2 * rng.integers(-127, 128, size=shape) + 1
    return k / 8192.0


def fill(model: Mixed, values: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, v in values.items():
            p = getattr(model, name)
            p.copy_(torch.as_tensor(v, dtype=torch.float64).to(p.dtype))


def test_state_dict_weights_mixed_dtypes_exact_mean(federation: Federation) -> None:
    names = federation.enroll(3)
    rid = federation.round(names, DIM, job="torch-weights", clip=CLIP, max_weight=8)
    rng = np.random.default_rng(1)
    weights = [1, 2, 5]
    values = [
        {
            "w32": grid_values(rng, (3, 4)),
            "w16": grid_values(rng, (5,)),
            "wbf": grid_values(rng, (2, 3)),
        }
        for _ in names
    ]
    models = []
    for i in range(3):
        m = Mixed()
        fill(m, values[i])
        m.steps.fill_(i + 10)
        models.append(m)
    clients = [federation.client(n) for n in names]
    fedavgs = [SecureFedAvg(c, send="weights") for c in clients]
    results = run_all(
        [
            lambda i=i: fedavgs[i].step(models[i], weights[i], rid)  # type: ignore[misc]
            for i in range(3)
        ]
    )
    for c in clients:
        c.close()
    for r in results:
        assert not isinstance(r, BaseException), r
        assert r.contributors == (1, 2, 3)
        assert r.total_weight == 8
        assert r.bytes_sent > 0 and r.bytes_received > 0
    for name in ("w32", "w16", "wbf"):
        exact = sum(w * v[name] for w, v in zip(weights, values, strict=True)) / 8
        for i, m in enumerate(models):
            got = getattr(m, name)
            assert got.dtype == getattr(Mixed(), name).dtype
            want = torch.as_tensor(exact, dtype=torch.float64).to(got.dtype)
            assert torch.equal(got.detach(), want), (name, i)
    assert [int(m.steps) for m in models] == [10, 11, 12]  # integer buffers stay local


def test_delta_fedavg_weighted_by_samples(federation: Federation) -> None:
    names = federation.enroll(3)
    torch.manual_seed(0)
    start = Mixed()
    layout = SecureFedAvg(federation.client(names[0])).fingerprint(start)  # in the round
    rid = federation.round(names, DIM, job="torch-delta", clip=1.0, max_weight=100, layout=layout)
    with torch.no_grad():
        for p in start.parameters():
            p.copy_(torch.randn(p.shape).to(p.dtype))
    samples = [10, 30, 60]
    deltas = [
        {k: torch.randn(v.shape) * 0.1 for k, v in floating_state(start).items()} for _ in names
    ]
    models, fedavgs, clients = [], [], []
    for i, n in enumerate(names):
        m = Mixed()
        m.load_state_dict(start.state_dict())
        clients.append(federation.client(n))
        fedavgs.append(SecureFedAvg(clients[-1], m))  # m holds the global model
        with torch.no_grad():  # "training"
            for k, v in floating_state(m).items():
                v.copy_((v.float() + deltas[i][k]).to(v.dtype))
        models.append(m)
    sent = [fa.update(m) for fa, m in zip(fedavgs, models, strict=True)]
    results = run_all(
        [lambda i=i: fedavgs[i].step(models[i], samples[i], rid.hex()) for i in range(3)]  # type: ignore[misc]
    )
    for c in clients:
        c.close()
    assert all(not isinstance(r, BaseException) for r in results), results
    step = 2.0 / 65535  # quantization step of clip 1, 16 bits
    ref = floating_state(start)
    for k, r in ref.items():
        mean = sum(w * s[k].double() for w, s in zip(samples, sent, strict=True)) / sum(samples)
        want = (r.float() + mean.float()).to(r.dtype)
        tol = step + (0.0 if r.dtype == torch.float32 else 2 * float(want.abs().max()) * 2**-7)
        for m in models:
            got = floating_state(m)[k]
            assert got.dtype == r.dtype
            assert float((got.double() - want.double()).abs().max()) <= tol + 1e-6
    # every site ends the round with bit-identical weights, and as its new reference
    for m, fa in zip(models[1:], fedavgs[1:], strict=True):
        for k, v in floating_state(models[0]).items():
            assert torch.equal(floating_state(m)[k], v)
            assert fa.reference is not None and torch.equal(fa.reference[k], v)


def test_dropped_site_is_left_out_of_the_average(federation: Federation) -> None:
    names = federation.enroll(4)
    dim = 8
    rid = federation.round(names, dim, job="torch-drop", clip=CLIP, max_weight=10)
    rng = np.random.default_rng(7)
    values = [grid_values(rng, (dim,)) for _ in names]
    weights = [1, 2, 3, 4]

    class Flat(torch.nn.Module):  # type: ignore[misc]
        def __init__(self, v: Any) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.as_tensor(v, dtype=torch.float32))

    models = [Flat(v) for v in values]
    clients = [federation.client(n) for n in names]

    def silent(msg: Message) -> bool:  # crashes just before sending its input
        return not isinstance(msg, MaskedInput | EncryptedInput)

    def dropper() -> None:
        joined = clients[3].join(rid)
        vec = models[3].p.detach().double().numpy()
        assert clients[3].participate(joined, vec, weights[3], on_send=silent) is None

    fns: list[Any] = [
        lambda i=i: SecureFedAvg(clients[i], send="weights").step(models[i], weights[i], rid)
        for i in range(3)
    ]
    results = run_all([*fns, dropper])
    for c in clients:
        c.close()
    assert all(not isinstance(r, BaseException) for r in results), results
    assert results[0].contributors == (1, 2, 3)  # type: ignore[union-attr]
    exact = sum(w * v for w, v in zip(weights[:3], values[:3], strict=True)) / 6
    for m in models[:3]:
        assert torch.equal(m.p.detach(), torch.as_tensor(exact, dtype=torch.float32))
    outcome = [
        e.data for e in federation.store.audit_entries(rid.hex()) if e.kind == "round_completed"
    ]
    assert outcome and [d["name"] for d in outcome[0]["dropouts"]] == ["site-4"]


def test_delta_needs_a_reference(federation: Federation) -> None:
    names = federation.enroll(2)
    fa = SecureFedAvg(federation.client(names[0]))
    with pytest.raises(RuntimeError, match="sync"):
        fa.update(Mixed())
    with pytest.raises(ValueError):
        SecureFedAvg(federation.client(names[0]), send="sum")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_model_round_trip(federation: Federation) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    names = federation.enroll(2)
    rid = federation.round(names, DIM, job="torch-cuda", clip=CLIP, max_weight=4)
    rng = np.random.default_rng(3)
    values = [
        {
            "w32": grid_values(rng, (3, 4)),
            "w16": grid_values(rng, (5,)),
            "wbf": grid_values(rng, (2, 3)),
        }
        for _ in names
    ]
    models = []
    for v in values:
        m = Mixed("cuda")
        fill(m, v)
        models.append(m)
    clients = [federation.client(n) for n in names]
    # the flat update stays on the GPU, ready for the CUDA kernels
    vec, layout = flatten(SecureFedAvg(clients[0], send="weights").update(models[0]))
    assert CUDA_ZERO_COPY and layout.on_device and vec.is_cuda and vec.numel() == DIM
    results = run_all(
        [
            lambda i=i: SecureFedAvg(clients[i], send="weights").step(models[i], i + 1, rid)  # type: ignore[misc]
            for i in range(2)
        ]
    )
    assert all(not isinstance(r, BaseException) for r in results), results
    for name in ("w32", "w16", "wbf"):
        exact = (values[0][name] + 2 * values[1][name]) / 3
        for m in models:
            got = getattr(m, name).detach()
            assert got.is_cuda
            want = torch.as_tensor(exact, dtype=torch.float64).to(got.dtype).cuda()
            assert torch.equal(got, want)


class Transposed(torch.nn.Module):  # type: ignore[misc]
    """:class:`Mixed` with ``w32`` stored as 4 x 3: the same length, another layout."""

    def __init__(self) -> None:
        super().__init__()
        self.w32 = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float32))
        self.w16 = torch.nn.Parameter(torch.zeros(5, dtype=torch.float16))
        self.wbf = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16))


def test_site_with_another_layout_is_refused_before_sending(federation: Federation) -> None:
    """Layout attack (issue 11, item 7): a site whose model has the same number of values
    but another layout joins a round that carries the model's fingerprint; it is refused
    before anything is sent. Failed before the fix: its values were summed position by
    position with the other sites' (a silent wrong aggregate)."""
    from secagg.service.errors import PolicyRefused

    names = federation.enroll(3, prefix="lay")
    client = federation.client(names[0])
    fa = SecureFedAvg(client, Mixed(), send="weights")
    assert fa.fingerprint(Mixed()) != fa.fingerprint(Transposed())
    rid = federation.round(names, DIM, job="torch-layout", layout=fa.fingerprint(Mixed()))
    other = SecureFedAvg(client, Transposed(), send="weights")
    with pytest.raises(PolicyRefused, match="layout"):
        other.step(Transposed(), 1, rid)
    client.close()


def test_dp_site_refuses_a_round_without_dp_before_sending(federation: Federation) -> None:
    """Attack: the server runs the job's round without distributed DP for a site that asked
    for it (``SecureFedAvg(..., dp=DPConfig(...))``). The site's policy refuses the round
    before anything is sent (failed before SecureFedAvg passed ``dp`` into the policy)."""
    from secagg.service.errors import PolicyRefused
    from secagg.service.integrations.torch import DPConfig

    names = federation.enroll(3, prefix="dp")
    client = federation.client(names[0])
    fa = SecureFedAvg(client, Mixed(), send="weights", dp=DPConfig(3.0, 1e-5, 10, clip=1.0))
    assert client.policy.dp == DPConfig(3.0, 1e-5, 10, clip=1.0).policy()
    assert client.policy.core().dp == client.policy.dp
    rid = federation.round(names, DIM, job="torch-dp")
    with pytest.raises(PolicyRefused, match="requires distributed DP"):
        fa.step(Mixed(), 1, rid)
    client.close()
