"""examples/flower-secagg end to end, loaded the way ``flwr run`` loads a Flower app.

The app's components and run config come from its own ``pyproject.toml`` through Flower's
loaders (``get_project_config``, ``get_fused_config_from_dir``, ``load_app``); the nodes get
the node config Flower's simulation gives them (``partition-id``, ``num-partitions``) and
find their site kits through ``$SECAGG_SITE_KITS``, as the example's README says. The
SuperLink is :class:`~tests.integrations.flower_local.LocalGrid` (Flower 1.42 simulates only
on Ray). The secagg server runs from the provisioned server kit: mutual TLS for the
ServerApp's admin calls (operator kit) and for every site.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import EXAMPLE, Kits

flwr = pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.cli.build import build_fab_from_disk  # noqa: E402
from flwr.cli.config_utils import load_and_validate  # noqa: E402
from flwr.common.config import get_fused_config_from_dir, get_project_config  # noqa: E402
from flwr.supercore.object_ref import load_app  # noqa: E402

from secagg.service.integrations.flower import SECAGG_RECORD  # noqa: E402

from .flower_local import RUN_ID, LocalGrid  # noqa: E402

NODES = [3_000_000_001 + 101 * i for i in range(4)]


def run_app(overrides: dict[str, Any]) -> tuple[dict[str, np.ndarray[Any, Any]], LocalGrid]:
    """Run the example once; the final model (``save-path``) and the grid."""
    components = get_project_config(EXAMPLE)["tool"]["flwr"]["app"]["components"]
    run_config = get_fused_config_from_dir(EXAMPLE, overrides)
    server_app = load_app(components["serverapp"], RuntimeError, EXAMPLE)
    client_app = load_app(components["clientapp"], RuntimeError, EXAMPLE)
    nodes = {nid: {"partition-id": i, "num-partitions": len(NODES)} for i, nid in enumerate(NODES)}
    grid = LocalGrid(client_app, nodes, run_config)
    server_app(grid, Context(RUN_ID, 0, {}, RecordDict(), run_config))
    with np.load(str(run_config["save-path"])) as f:
        return {k: f[k] for k in f.files}, grid


@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # flwr's pathspec use
def test_example_is_a_valid_flower_app() -> None:
    """What ``flwr build`` / ``flwr run`` check first: the pyproject validates (components
    importable, publisher set, no missing recommended field) and bundles into a FAB."""
    config, warnings = load_and_validate(EXAMPLE / "pyproject.toml", check_module=True)
    assert warnings == []
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"].endswith(":app")
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(EXAMPLE))) as fab:
        names = set(fab.namelist())
    assert {"pyproject.toml", "flower_secagg/server_app.py", "flower_secagg/task.py"} <= names


@pytest.fixture
def site_kits(kits: Kits, monkeypatch: pytest.MonkeyPatch) -> Kits:
    monkeypatch.setenv("SECAGG_SITE_KITS", str(kits.root / "sites"))
    return kits


@pytest.mark.parametrize("mode", ["masked", "hybrid"])
def test_example_app_matches_fedavg(site_kits: Kits, tmp_path: Path, mode: str) -> None:
    """The example with secagg reaches Flower's own FedAvg model within the quantization
    step; every train reply of a round is the same aggregate; the audit log names the
    operator kit's operator (admin calls over mutual TLS)."""
    plain, _ = run_app({"save-path": str(tmp_path / "plain.npz")})
    overrides: dict[str, Any] = {
        "save-path": str(tmp_path / "secure.npz"),
        "secagg-operator-kit": str(site_kits.operator),
        "secagg-mode": mode,
        "secagg-job": f"example-{mode}",
    }
    if mode == "hybrid":
        overrides["secagg-ckks-server"] = str(site_kits.root / "server" / "ckks.ckks-server")
    secure, grid = run_app(overrides)

    rounds, clip, bits = 3, 1.0, 16  # the example's pyproject
    step = 2 * clip / ((1 << bits) - 1)
    for key in ("w", "b"):
        assert plain[key].shape == secure[key].shape
        diff = float(np.abs(secure[key] - plain[key]).max())
        assert diff <= rounds * step + 1e-5, (key, diff)
    assert float(np.abs(plain["w"]).max()) > 10 * rounds * step  # the model moved

    train = [m for m in grid.delivered if m.metadata.message_type == "train"]
    assert len(train) == 4 * rounds and not any(m.has_error() for m in train)
    by_round: dict[str, set[bytes]] = {}
    for m in train:
        rid = str(m.content.config_records[SECAGG_RECORD]["round-id"])
        by_round.setdefault(rid, set()).add(m.content["arrays"]["w"].numpy().tobytes())
    assert len(by_round) == rounds and all(len(v) == 1 for v in by_round.values())

    store = site_kits.server.service.store  # type: ignore[union-attr]
    for rid in by_round:
        created = [e for e in store.audit_entries(rid) if e.kind == "round_created"]
        assert created[0].data["operator"] == "flower"
        assert created[0].data.get("mode", mode) == mode
