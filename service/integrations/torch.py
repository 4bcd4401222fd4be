"""Federated averaging of a PyTorch model through secure aggregation (``secagg[torch]``).

A few lines in an existing training loop::

    from secagg.service.client import Client
from secagg.service.tensors import fingerprint
    from secagg.service.integrations.torch import SecureFedAvg

    client = Client("server:443", identity, tls=ClientTls(ca="ca.pem"))
    fedavg = SecureFedAvg(client, model)   # model holds the global weights every site starts from
    for round_id in rounds:                # announced by the operator (``secagg round create``)
        train_one_epoch(model, loader)
        fedavg.step(model, num_samples=len(dataset), round_id=round_id)

Each :meth:`SecureFedAvg.step` sends the site's change since the last global model (a float32
delta per floating-point tensor of the ``state_dict``) weighted by its sample count, and loads
``reference + weighted mean of the deltas`` back into the model, in place and in each tensor's
own dtype (float32, float16, bfloat16) and device. Every site that completes a round ends it
with bit-identical weights; the server and the other sites see only the weighted sum.

CUDA models stay on the GPU: the deltas are computed on the device, the client SDK
concatenates them there (``secagg.service.tensors.flatten``), and in ``masked`` rounds the
fused CUDA kernel quantizes, packs and masks that vector in place of the host path; only the
masked words (what goes on the wire) come to the host, and the averaged result goes back to
the device once (see :data:`CUDA_ZERO_COPY`). ``hybrid`` and ``ckks`` rounds copy the update
to the host once, because TenSEAL encrypts on the CPU.

PyTorch is imported on first use; it is not needed to import this module.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from secagg.dp.policy import DPOffer, DPPolicy
from secagg.service.client import Client, HEContext
from secagg.service.tensors import fingerprint

__all__ = ["CUDA_ZERO_COPY", "DPConfig", "SecureFedAvg", "StepResult", "floating_state"]


@dataclass(frozen=True)
class DPConfig:
    """A site's distributed-DP requirement for the job (docs/dp.md).

    ``epsilon``/``delta``: the budget over ``rounds`` rounds (RDP accountant); ``clip``: the
    largest L2 clip norm of the update (the delta when ``send="delta"``) the site accepts;
    ``min_withholders``: noise withholders the server's plan must tolerate; ``state``: the
    file of the site's own ledger of the DP rounds it joined (``Policy.dp_state``; ``None``
    keeps the client's, a kit's ``dp_state.json`` with ``Client.from_kit``). The site
    refuses, before sending, a round that would take it past ``epsilon`` or ``rounds``.
    """

    epsilon: float
    delta: float = 1e-5
    rounds: int = 1
    clip: float = 1.0
    min_withholders: int = 0
    state: str | os.PathLike[str] | None = None

    def policy(self) -> DPPolicy:
        """The core :class:`~secagg.dp.policy.DPPolicy` the site's client checks offers with."""
        return DPPolicy(self.epsilon, self.delta, self.rounds, self.clip, self.min_withholders)


CUDA_ZERO_COPY = True
"""Whether a CUDA update reaches the CUDA masking kernels without a host copy (``masked``).

The SDK flattens a CUDA ``state_dict`` on its device and the protocol core hands the device
vector to :func:`secagg.kernels.mask_vector` (``__cuda_array_interface__``, zero copy).
"""

Send = Literal["delta", "weights"]


def _torch() -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "secagg.service.integrations.torch needs PyTorch: pip install 'secagg[torch]'"
        ) from exc


def floating_state(model: Any, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The floating-point entries of ``model.state_dict()``, detached (views, no copies).

    Parameters
    ----------
    model:
        A ``torch.nn.Module``.
    keys:
        Entries to take; by default every floating-point parameter and buffer (integer
        buffers such as BatchNorm's ``num_batches_tracked`` stay local).
    """
    state = model.state_dict()
    names = (
        list(keys) if keys is not None else [k for k, v in state.items() if v.is_floating_point()]
    )
    missing = [k for k in names if k not in state]
    if missing:
        raise KeyError(f"the model has no state entries {missing}")
    return {k: state[k].detach() for k in names}


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`SecureFedAvg.step` did.

    Attributes
    ----------
    round_id:
        The secagg round.
    contributors:
        Client ids whose updates are in the average (this site included).
    total_weight:
        Sum of the contributors' sample counts.
    seconds:
        Wall time of the step (protocol and transfers).
    bytes_sent, bytes_received:
        gRPC bytes this site moved in the round.
    """

    round_id: bytes
    contributors: tuple[int, ...]
    total_weight: int
    seconds: float
    bytes_sent: int
    bytes_received: int


class SecureFedAvg:
    """FedAvg of a PyTorch model through a secagg :class:`~secagg.service.client.Client`.

    Parameters
    ----------
    client:
        This site's connection to the server.
    model:
        If given, its current weights become the reference (the global model) of the first
        delta; otherwise call :meth:`sync` before the first :meth:`step`.
    send:
        ``"delta"`` (default): send ``weights - reference`` in float32, so a round's clip
        bounds the per-round change rather than the weights themselves. ``"weights"``: send
        the tensors as they are and load their weighted mean (no reference needed).
    keys:
        ``state_dict`` entries to average (default: every floating-point entry). Every site
        of a round must use the same entries in the same order.
    dp:
        Require distributed DP (:class:`DPConfig`): the client's policy then refuses every
        round without DP or with a weaker offer, before sending anything. DP rounds are
        unweighted (each site's clipped update counts once; ``num_samples`` is not sent) and
        the loaded mean is the released noisy sum over the contributors. After each DP
        round the client draws the next round's noise in a background thread (it does not
        depend on the update), so local training overlaps it and the next :meth:`step`
        only clips, rotates and rounds (docs/dp.md, "Speed"); :meth:`prepare_dp` starts
        it explicitly (e.g. before the first round, given its offer).
    """

    def __init__(
        self,
        client: Client,
        model: Any = None,
        *,
        send: Send = "delta",
        keys: Sequence[str] | None = None,
        dp: DPConfig | None = None,
    ) -> None:
        if send not in ("delta", "weights"):
            raise ValueError(f"send must be 'delta' or 'weights', not {send!r}")
        self.dp = dp
        if dp is not None:
            state = client.policy.dp_state if dp.state is None else os.fspath(dp.state)
            client.policy = dataclasses.replace(client.policy, dp=dp.policy(), dp_state=state)
        self.client = client
        self.send: Send = send
        self.keys = None if keys is None else tuple(keys)
        self._reference: dict[str, Any] | None = None
        if model is not None:
            self.sync(model)

    @property
    def reference(self) -> dict[str, Any] | None:
        """The global weights the next delta is relative to (copies), or ``None``."""
        return self._reference

    def prepare_dp(self, offer: DPOffer | None = None, *, wait: bool = False) -> None:
        """Draw the next DP round's noise now, in the background
        (:meth:`Client.prepare_dp <secagg.service.client.Client.prepare_dp>`; default offer:
        the last DP round's). :meth:`step` does this by itself after every DP round."""
        self.client.prepare_dp(offer, wait=wait)

    def sync(self, model: Any) -> None:
        """Take ``model``'s current weights as the global model (after loading a broadcast)."""
        self._reference = {k: v.clone() for k, v in floating_state(model, self.keys).items()}

    def update(self, model: Any) -> dict[str, Any]:
        """What :meth:`step` would send for ``model``: float32 deltas, or the tensors."""
        state = floating_state(model, self.keys)
        if self.send == "weights":
            return state
        ref = self._require_reference(state)
        return {k: v.float() - ref[k].float() for k, v in state.items()}

    def fingerprint(self, model: Any) -> bytes:
        """The layout fingerprint of what :meth:`step` sends for ``model`` (names, shapes,
        dtypes, canonical order): pass it to ``secagg round create --layout`` (or
        ``RoundSpec.layout``) so that a site with another architecture or key set is refused
        before it sends anything. Needs no reference and allocates no tensor memory."""
        torch = _torch()
        state = floating_state(model, self.keys)
        return fingerprint(
            {
                k: torch.empty(
                    v.shape, dtype=v.dtype if self.send == "weights" else torch.float32,
                    device="meta",
                )
                for k, v in state.items()
            }
        )  # fmt: skip

    def step(
        self,
        model: Any,
        num_samples: int,
        round_id: bytes | str,
        *,
        rounding_key: bytes | None = None,
        he_context: HEContext | None = None,
    ) -> StepResult:
        """Contribute this site's update to ``round_id`` and load the averaged model.

        Parameters
        ----------
        model:
            The locally trained model; its averaged entries are overwritten in place
            (optimizer references stay valid).
        num_samples:
            This site's FedAvg weight, ``1 .. max_weight`` of the round.
        round_id:
            The round (bytes or hex).
        rounding_key:
            Fixes the stochastic rounding (tests and audits); fresh by default.
        he_context:
            ``ckks`` and ``hybrid`` rounds: the key holders' CKKS context, best the path of
            the secret context file so its decryption budget persists across steps
            (:meth:`secagg.service.client.Client.aggregate`).

        Raises
        ------
        RuntimeError
            ``send="delta"`` and no reference was set (:meth:`sync`).
        secagg.errors.SecAggError
            Whatever :meth:`Client.aggregate <secagg.service.client.Client.aggregate>`
            raises; the model is then left as trained.
        """
        torch = _torch()
        if isinstance(num_samples, bool) or int(num_samples) < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        stats = self.client.stats
        sent0, received0 = stats.grpc_sent, stats.grpc_received
        t0 = time.perf_counter()
        with torch.no_grad():
            update = self.update(model)
            agg = self.client.aggregate(
                round_id,
                update,
                weight=1 if self.dp is not None else int(num_samples),
                rounding_key=rounding_key,
                he_context=he_context,
            )
            state = floating_state(model, self.keys)
            if self.send == "weights":
                new = agg.mean
            else:
                ref = self._require_reference(state)
                new = {k: (ref[k].float() + agg.mean[k].float()).to(ref[k].dtype) for k in state}
            for k, target in state.items():
                target.copy_(new[k].to(device=target.device, dtype=target.dtype))
        self.sync(model)
        return StepResult(
            round_id=agg.round_id,
            contributors=agg.contributors,
            total_weight=agg.total_weight,
            seconds=time.perf_counter() - t0,
            bytes_sent=stats.grpc_sent - sent0,
            bytes_received=stats.grpc_received - received0,
        )

    def _require_reference(self, state: dict[str, Any]) -> dict[str, Any]:
        ref = self._reference
        if ref is None:
            raise RuntimeError(
                "no global model to take the delta from: call SecureFedAvg.sync(model) "
                "with the global weights before training (or pass model= to the constructor)"
            )
        if list(ref) != list(state):
            raise RuntimeError("the model's state entries changed since SecureFedAvg.sync")
        return ref
