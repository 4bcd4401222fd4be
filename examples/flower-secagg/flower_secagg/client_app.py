"""ClientApp: local training, wrapped by secagg's mod (a pass-through unless the strategy
asked for secure aggregation)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_secagg import task
from secagg.service.client import Client
from secagg.service.integrations.flower import SITE_KIT_KEY, SecAggMod, connect_from_config

SITE_KITS_ENV = "SECAGG_SITE_KITS"
"""Simulation only: the directory of site kits (``kits/sites``); node ``partition-id`` p
uses ``site-{p + 1}``. A real SuperNode names its kit in its node config instead."""


def connect(context: Context) -> Client:
    """This node's secagg client: its site kit from the node config (a deployment) or, in
    simulation, from ``$SECAGG_SITE_KITS`` by partition id. Both are the node's own
    settings; nothing here comes from the run config the server side writes."""
    kits = os.environ.get(SITE_KITS_ENV, "")
    if SITE_KIT_KEY not in context.node_config and kits:
        kit = Path(kits) / f"site-{int(context.node_config['partition-id']) + 1}"
        return Client.from_kit(kit)
    return connect_from_config(context)


secagg = SecAggMod(connect)
app = ClientApp(mods=[secagg])


def _data(context: Context) -> Any:
    return task.load_data(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    config = msg.content["config"]
    x, y, _, _ = _data(context)
    w, b, loss = task.train(
        arrays["w"].numpy(),
        arrays["b"].numpy(),
        x,
        y,
        int(config["local-epochs"]),
        float(config["lr"]),
    )
    out = ArrayRecord({"w": Array(w), "b": Array(b)})
    metrics = MetricRecord({"num-examples": len(y), "train-loss": loss})
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    _, _, x, y = _data(context)
    loss, acc = task.evaluate(arrays["w"].numpy(), arrays["b"].numpy(), x, y)
    metrics = MetricRecord({"num-examples": len(y), "eval-loss": loss, "eval-acc": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


secagg.register(app)  # answers the strategy's identity query
