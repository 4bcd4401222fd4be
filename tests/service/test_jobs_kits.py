"""The README's kit quick start: ``secagg serve --kit``, ``secagg job create`` signed by an
operator kit, and sites following the job with ``Client.from_kit(...).rounds(job)``.

Before, the server kit had to be run as ``(cd kits/server && secagg serve --config
server.toml)`` (``serve`` had no ``--kit``), and every round had to be created by hand.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np

from secagg.service.client import Client
from secagg.service.provision import load_federation, provision

from .cli_proc import ServeProc, cli_env, run_cli
from .helpers import run_threads

SITES = ["site-1", "site-2", "site-3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _federation(tmp: Path, port: int) -> Path:
    lines = [
        'name = "hospitals"',
        f'server = "localhost:{port}"',
        f'listen = "127.0.0.1:{port}"',
        'server_names = ["localhost", "127.0.0.1"]',
        'modes = ["masked"]',
        "",
        "[policy]",
        "min_clients = 3",
        "",
        "[[operators]]",
        'name = "alice"',
    ]
    for s in SITES:
        lines += ["", "[[sites]]", f'name = "{s}"']
    path = tmp / "federation.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _site(kits: Path, name: str, value: float) -> list[tuple[str, float]]:
    seen = []
    with Client.from_kit(kits / "sites" / name) as client:
        for round_id in client.rounds("fed", timeout=60):
            agg = client.aggregate(round_id, np.full(8, value), weight=2)
            seen.append((round_id, float(agg.mean[0])))
    return seen


def test_serve_from_the_kit_and_run_a_job(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    provision(load_federation(_federation(tmp_path, _free_port())), kits)
    work = tmp_path / "elsewhere"  # serve --kit works from any directory
    work.mkdir()
    server = ServeProc.start(["--kit", str(kits / "server")], cwd=work)
    try:
        assert (kits / "server" / "secagg.db").exists() and not (work / "secagg.db").exists()
        env = cli_env(SECAGG_OPERATOR_KIT=str(kits / "operators" / "alice"))
        made = run_cli(
            ["job", "create", "fed", "--participants", ",".join(SITES), "--dim", "8",
             "--rounds", "2", "--stage-timeout", "30"],
            cwd=work,
            env=env,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["created_by"] == "alice"
        values = {n: 0.25 * (i + 1) for i, n in enumerate(SITES)}
        out = run_threads({n: (lambda n=n: _site(kits, n, values[n])) for n in SITES})
        assert not {k: o.error for k, o in out.items() if o.error}
        want = sum(values.values()) / len(values)
        for o in out.values():
            assert len(o.result) == 2
            assert all(abs(mean - want) < 1e-3 for _rid, mean in o.result)
        status = run_cli(["job", "status", "fed", "--wait", "--timeout", "30"], cwd=work, env=env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["rounds_completed"] == 2
        listed = run_cli(["round", "list", "--job", "fed"], cwd=work, env=env)
        rows = json.loads(listed.stdout)
        assert [(r["index"], r["status"], r["survivors"]) for r in rows] == [
            (0, "completed", 3),
            (1, "completed", 3),
        ]
    finally:
        assert server.stop() == 0
    created = [e for e in server.events() if e.get("msg") == "job created"]
    assert created and created[0]["operator"] == "alice"
