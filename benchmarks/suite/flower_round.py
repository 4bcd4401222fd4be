"""One Flower SecAgg+ round, run by Flower's own code, timed like ours (child process).

Run in the Flower environment (``.venv-flower``, which holds flwr and this tree)::

    .venv-flower/bin/python -m suite.flower_round CLIENTS DIM NUM_SHARES THRESHOLD DROPOUT \\
        [DROP_STAGE [SEED]]

(from ``benchmarks/``, or with it on ``PYTHONPATH``); prints one JSON object.

What runs is flwr's: the server side is ``flwr.server.workflow.SecAggPlusWorkflow`` (all four
stages, its Shamir over pycryptodome, its ``pseudo_rand_gen`` masks, its unmasking and
``FedAvg.aggregate_fit``), each client is a ``ClientApp`` with ``secaggplus_mod`` around a
``NumPyClient`` whose ``fit`` returns the client's input. Ours is the glue only: a grid that
delivers each message through Flower's protobuf encoding to the addressed ``ClientApp`` in
this process, one at a time, so that each client's seconds are its own; the round's
``LegacyContext`` (what ``DefaultWorkflow`` would set up, without its client-manager polling
thread).

Workload: the inputs and the dropout plan of ``secagg.simulate.simulation_inputs`` for the
same ``SimulationConfig``, so a ``secagg simulate`` run of that config sees the same vectors
and the same clients drop before the same stage (ours ``masked`` = Flower's
``collect_masked_vectors``; ours ``consistency`` and ``unmask`` = Flower's ``unmask``, which
has no consistency stage). A dropped client answers with an error message from its drop
stage on, as the SuperLink reports a node that does not reply.

Counted: ``client_median_s`` (median over the clients that sent their masked vector of the
seconds inside their ``ClientApp`` calls), ``server_s`` (the round's wall time less the
clients' seconds and the protobuf encoding and decoding of every message), ``wall_s`` (the
whole workflow call), ``upload_B`` / ``download_B`` (mean over the same clients of the bytes
of the serialized ``flwr.proto.message_pb2.Message`` replies and requests).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from collections import defaultdict
from typing import Any

import numpy as np

RUN_ID = 7
FLOWER_STAGE = {
    "advertise": "setup",
    "share": "share_keys",
    "masked": "collect_masked_vectors",
    "consistency": "unmask",
    "unmask": "unmask",
}
"""Our drop stage -> the first Flower stage whose message the client never answers."""


def flower_round(
    clients: int,
    dim: int,
    num_shares: int,
    threshold: int,
    dropout: float,
    drop_stage: str = "masked",
    seed: int = 0,
) -> dict[str, Any]:
    from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.compat.common import recorddict_compat as compat
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.server import ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.serverapp import Grid

    from secagg.simulate import DROP_STAGES, SimulationConfig, simulation_inputs

    cfg = SimulationConfig(
        clients=clients, dim=dim, dropout=dropout, drop_stage=drop_stage, seed=seed
    )
    ids, inputs, _, plan = simulation_inputs(cfg)
    stage_names = {v: k for k, v in DROP_STAGES.items()}
    order = ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    gone_from = {c: order.index(FLOWER_STAGE[stage_names[s]]) for c, s in plan.items()}

    class Vector(NumPyClient):  # type: ignore[misc]
        def __init__(self, x: np.ndarray[Any, Any]) -> None:
            self.x = x

        def fit(self, parameters: Any, config: Any) -> tuple[list[Any], int, dict[str, Any]]:
            return [self.x], 1, {}

    def client_fn(context: Any) -> Any:
        return Vector(inputs[int(context.node_id)]).to_client()

    app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    contexts = {c: Context(RUN_ID, c, {}, RecordDict(), {}) for c in ids}
    client_s: dict[int, float] = defaultdict(float)
    up: dict[int, int] = defaultdict(int)
    down: dict[int, int] = defaultdict(int)
    wire_s = 0.0

    def wire(msg: Any) -> tuple[Any, int]:
        nonlocal wire_s
        t0 = time.perf_counter()
        data = message_to_proto(msg).SerializeToString()
        out = message_from_proto(ProtoMessage.FromString(data))
        wire_s += time.perf_counter() - t0
        return out, len(data)

    class TimedGrid(Grid):  # type: ignore[misc]
        """Delivers each message to its ClientApp in turn (the SuperLink's part)."""

        def __init__(self) -> None:
            from flwr.common.constant import SUPERLINK_NODE_ID
            from flwr.supercore.run import Run
            from flwr.supercore.task_identity import TaskIdentity

            self._run = Run.create_empty(RUN_ID)
            # the ServerApp process's identity, as flwr.simulation.run_simulation sets it
            TaskIdentity.task_id = 1
            TaskIdentity.run_id = RUN_ID
            TaskIdentity.node_id = SUPERLINK_NODE_ID

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(self, content: Any, message_type: str, dst_node_id: int,
                           group_id: str, ttl: float | None = None) -> Any:  # fmt: skip
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> list[int]:
            return list(ids)

        def push_messages(self, messages: Any) -> Any:
            raise NotImplementedError("send_and_receive only")

        def pull_messages(self, message_ids: Any) -> Any:
            raise NotImplementedError("send_and_receive only")

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
            replies = []
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                node = int(msg.metadata.dst_node_id)
                incoming, n_down = wire(msg)
                stage = incoming.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
                if node in gone_from and order.index(str(stage)) >= gone_from[node]:
                    reply = Message(Error(code=0, reason="node dropped out"), reply_to=incoming)
                    reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                    replies.append(wire(reply)[0])
                    continue
                down[node] += n_down
                t0 = time.perf_counter()
                reply = app(incoming, contexts[node])
                client_s[node] += time.perf_counter() - t0
                reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                got, n_up = wire(reply)
                up[node] += n_up
                replies.append(got)
            return replies

    grid = TimedGrid()
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
    )
    context = LegacyContext(
        Context(RUN_ID, 0, {}, RecordDict(), {}), ServerConfig(num_rounds=1), strategy
    )
    for c in ids:
        context.client_manager.register(GridClientProxy(node_id=c, grid=grid, run_id=RUN_ID))
    initial = ndarrays_to_parameters([np.zeros(dim, dtype=np.float64)])
    initial_record = compat.parameters_to_arrayrecord(initial, keep_input=True)
    context.state.array_records[MAIN_PARAMS_RECORD] = initial_record
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: 1, WorkflowKey.START_TIME: 0.0}
    )
    workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold)
    wall0 = time.perf_counter()
    workflow(grid, context)
    wall = time.perf_counter() - wall0

    senders = [c for c in ids if gone_from.get(c, len(order)) > 2] or list(ids)
    final = context.state.array_records[MAIN_PARAMS_RECORD]
    completed = final is not initial_record  # the unmask stage stores the aggregate
    mean = parameters_to_ndarrays(compat.arrayrecord_to_parameters(final, keep_input=True))[0]
    expected = np.mean([inputs[c] for c in senders], axis=0)
    return {
        "status": "completed" if completed else "aborted",
        "clients": clients,
        "dim": dim,
        "num_shares": num_shares,
        "threshold": threshold,
        "dropped": len(plan),
        "max_abs_error": float(np.max(np.abs(mean - expected))) if completed else None,
        "wall_s": wall,
        "server_s": wall - sum(client_s.values()) - wire_s,
        "wire_s": wire_s,
        "client_median_s": statistics.median(client_s[c] for c in senders),
        "upload_B": statistics.mean(up[c] for c in senders),
        "download_B": statistics.mean(down[c] for c in senders),
    }


def main(argv: list[str]) -> int:
    import logging

    from flwr import __version__
    from flwr.supercore import logger

    logger.FLOWER_LOGGER.setLevel(logging.ERROR)
    n, dim, shares, t = (int(a) for a in argv[:4])
    dropout = float(argv[4])
    stage = argv[5] if len(argv) > 5 else "masked"
    seed = int(argv[6]) if len(argv) > 6 else 0
    out = flower_round(n, dim, shares, t, dropout, stage, seed)
    out["flwr"] = __version__
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
