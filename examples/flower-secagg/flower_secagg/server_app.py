"""ServerApp: Flower's FedAvg, or secagg's SecAggFedAvg when the run config names a server."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from flower_secagg.task import initial_arrays
from secagg.service.integrations.flower import strategy_from_run_config

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    # secagg-server / secagg-operator-kit set: SecAggFedAvg; otherwise Flower's own FedAvg.
    strategy = strategy_from_run_config(
        rc,
        fraction_train=1.0,
        fraction_evaluate=float(rc["fraction-evaluate"]),
        min_available_nodes=int(rc["min-nodes"]),
        min_train_nodes=int(rc["min-nodes"]),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in initial_arrays().items()}),
        num_rounds=int(rc["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(rc["lr"]), "local-epochs": int(rc["local-epochs"])}),
    )
    save = str(rc.get("save-path", ""))
    if save:
        np.savez(save, **{k: result.arrays[k].numpy() for k in result.arrays})
        log.info("final model written to %s", save)
