"""Flower: aggregate a Flower app's training rounds through a secagg server (``secagg[flower]``).

Written against Flower's Message API (tested with ``flwr`` 1.42.0: ``ServerApp`` +
``Strategy.start``, ``ClientApp`` with mods). Two pieces:

* :class:`SecAggFedAvg`, a drop-in for ``flwr.serverapp.strategy.FedAvg``. For every Flower
  round it creates a secagg round (admin API) over the sampled nodes and puts its id in the
  train config; it then adopts the aggregate the clients return, after checking that they
  agree with each other and with the digest the secagg server published.
* :class:`SecAggMod`, a client mod. Around the user's train function it sends
  ``trained - global`` weighted by ``num-examples`` through
  :meth:`Client.aggregate <secagg.service.client.Client.aggregate>` and replies with
  ``global + weighted mean`` instead of the site's own arrays: the Flower server (and
  SuperLink) never see an individual update, only the aggregate every participant gets.

Switching an app over is a config change: :func:`strategy_from_run_config` returns
:class:`SecAggFedAvg` when the run config names a secagg server and plain ``FedAvg``
otherwise, and the mod passes every message through untouched unless the strategy asked for
secure aggregation. See ``docs/integrations.md``.

Nodes are matched to enrolled participants by identity key: the strategy asks unknown nodes
(message type ``query.secagg_identity``, answered by the handler :meth:`SecAggMod.register`
installs) and looks the key up in the server's participant list; pass ``names=`` to map
node ids yourself (required for legacy ``client_fn`` apps, which cannot register queries).

Modules: :mod:`.strategy` (server side), :mod:`.mod` (client side), :mod:`.config` (the
``secagg-*`` run-config keys), :mod:`.secaggplus` (Flower's own SecAgg+ settings in our terms).
"""

from __future__ import annotations

from ._common import IDENTITY_QUERY, ROUND_ID_KEY, SECAGG_RECORD
from .config import (
    RUN_CONFIG_KEYS,
    admin_from_run_config,
    round_options_from_run_config,
    strategy_from_run_config,
)
from .mod import HE_CONTEXT_KEY, NODE_KEYS, SITE_KIT_KEY, SecAggMod, connect_from_config
from .secaggplus import SecAggPlusSettings, from_flower_secaggplus
from .strategy import SecAggFedAvg, SecAggRound

__all__ = [
    "HE_CONTEXT_KEY",
    "IDENTITY_QUERY",
    "NODE_KEYS",
    "ROUND_ID_KEY",
    "RUN_CONFIG_KEYS",
    "SECAGG_RECORD",
    "SITE_KIT_KEY",
    "SecAggFedAvg",
    "SecAggMod",
    "SecAggPlusSettings",
    "SecAggRound",
    "admin_from_run_config",
    "connect_from_config",
    "from_flower_secaggplus",
    "round_options_from_run_config",
    "strategy_from_run_config",
]
