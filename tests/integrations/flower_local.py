"""An in-process Flower Grid: runs a real ServerApp against real ClientApps in threads.

Flower 1.42's simulation engine needs Ray (``flwr[simulation]``); this grid plays the
SuperLink's part in one process instead. Every message crosses Flower's own protobuf
serialization both ways, as it would on the wire, and the nodes of one send run
concurrently (a secagg round needs all its participants at once). ``delivered`` keeps every
reply the "SuperLink" saw, so tests can check what the server side learns.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 7


def wire(msg: Message) -> Message:
    """``msg`` after a round trip through Flower's protobuf encoding."""
    return message_from_proto(message_to_proto(msg))


class LocalGrid(Grid):  # type: ignore[misc]
    def __init__(
        self,
        client_app: Any,
        node_configs: Mapping[int, dict[str, Any]],
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self._run = Run.create_empty(RUN_ID)
        # the ServerApp process's identity, as flwr.simulation.run_simulation sets it
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = RUN_ID
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.client_app = client_app
        self.contexts = {
            nid: Context(RUN_ID, nid, dict(cfg), RecordDict(), dict(run_config or {}))
            for nid, cfg in node_configs.items()
        }
        self.delivered: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        msgs = list(messages)
        for m in msgs:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        if not msgs:
            return []
        with ThreadPoolExecutor(len(msgs)) as pool:
            replies = list(pool.map(self._deliver, msgs))
        self.delivered.extend(replies)
        return replies

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        incoming = wire(msg)
        try:
            reply = self.client_app(incoming, self.contexts[node])
        except Exception as exc:  # the ClientApp crashed: an error reply, as Flower sends
            reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=incoming)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return wire(reply)
