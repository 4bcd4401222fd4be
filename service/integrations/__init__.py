"""Adapters that plug secure aggregation into training frameworks.

* :mod:`secagg.service.integrations.torch`: :class:`~secagg.service.integrations.torch.SecureFedAvg`
  averages a PyTorch model across sites through the client SDK (``secagg[torch]``).
* :mod:`secagg.service.integrations.flower`: a Flower strategy and client mod that route a
  Flower app's aggregation through a secagg server (``secagg[flower]``).

Each module imports its framework lazily and says which extra to install when it is missing.
See ``docs/integrations.md``.
"""

__all__: list[str] = []
