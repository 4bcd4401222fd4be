"""The docs run: the README's Deployment section (the startup-kit quick start with
docs/operations.md's federation file, and the step-by-step script) and the hybrid site
snippet of docs/service.md, executed as written on loopback.

The only substitutions (documented in the README and in docs/service.md): the variables
``LISTEN``, ``SERVER``, ``STATE``, ``PKI`` and ``SITES`` are set in the environment (a free
port, temporary directories, a throwaway CA from :mod:`.pki`), bash runs the blocks with
``set -euo pipefail``, and the sites' snippet has its line marked ``# from the site's kit``
replaced by the site's name and the server. Before issue 12 the README's commands failed
(``round create`` without ``--server`` raised ``AttributeError``; ``enroll`` wrote
``./secagg.db``; the hybrid round needed unwritten keygen flags), and an operator had to
create each round and hand its id to every site: now a job of two rounds runs as written,
its sites driven by the SDK loop ``for round_id in client.rounds("fed")``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from .cli_proc import cli_env, run_cli
from .pki import make_pki

ROOT = Path(__file__).parents[2]
SITES = 3


def block(doc: Path, marker: str) -> str:
    """The fenced code block right after ``<!-- docs-run: MARKER -->`` in ``doc``."""
    text = doc.read_text()
    m = re.search(rf"<!-- docs-run: {re.escape(marker)} -->\n```\w*\n(.*?)\n```", text, re.S)
    assert m is not None, f"{doc.name} lost its docs-run block {marker!r}"
    return m.group(1)


SITE_RUNNER = """
import os, sys, threading
snippet = open(sys.argv[1]).read()
line = next(x for x in snippet.splitlines() if x.endswith("# from the site's kit"))
errors = []

def site(i):
    code = snippet.replace(line, "site, server = SITE, SERVER")
    scope = {"SITE": f"site-{i}", "SERVER": os.environ["SERVER"]}
    try:
        exec(compile(code, "docs/service.md", "exec"), scope)
        assert abs(float(scope["result"].mean[0]) - 0.25) < 1e-3, scope["result"].mean[:3]
        print(f"site-{i}: last round {scope['round_id']}", file=sys.stderr)
    except BaseException as exc:
        errors.append(f"site-{i}: {type(exc).__name__}: {exc}")

threads = [threading.Thread(target=site, args=(i,)) for i in range(1, int(os.environ["SITES"]) + 1)]
for t in threads: t.start()
for t in threads: t.join()
print("\\n".join(errors) or "sites done", file=sys.stderr)
sys.exit(1 if errors else 0)
"""


def test_readme_deployment_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("the README's shell needs bash")
    pki = make_pki(tmp_path / "pki", [])
    state, work = tmp_path / "state", tmp_path / "work"
    state.mkdir()
    work.mkdir()
    (work / "ca.pem").write_bytes((pki / "ca.pem").read_bytes())  # the sites' kit holds it
    snippet = work / "site_snippet.py"
    snippet.write_text(block(ROOT / "docs" / "service.md", "hybrid-site"))
    (work / "sites.py").write_text(SITE_RUNNER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = "\n".join(
        [
            "set -euo pipefail",
            block(ROOT / "README.md", "deployment"),
            'echo "SERVE_PID=$SERVE_PID"',
            f'"{sys.executable}" sites.py site_snippet.py',
            block(ROOT / "README.md", "deployment-end"),
        ]
    )
    env = cli_env(
        LISTEN=f"127.0.0.1:{port}",
        SERVER=f"127.0.0.1:{port}",  # server.pem names it (IP SAN)
        STATE=str(state),
        PKI=str(pki),
        SITES=str(SITES),
    )
    out, err = work / "stdout", work / "stderr"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, stdout=fo, stderr=fe)
        try:
            rc = proc.wait(timeout=150)
        finally:
            if proc.poll() is None:
                proc.kill()
            _kill_server(out.read_text())
    stdout, stderr = out.read_text(), err.read_text()
    assert rc == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr
    jobs = [json.loads(x) for x in stdout.splitlines() if x.startswith('{"name": "fed"')]
    assert jobs[0]["status"] == "running" and jobs[0]["participants"] == [
        f"site-{i}" for i in range(1, SITES + 1)
    ]
    assert (jobs[-1]["status"], jobs[-1]["rounds_done"], jobs[-1]["rounds_completed"]) == (
        "finished",
        2,
        2,
    ), jobs[-1]
    listed = json.loads(next(x for x in stdout.splitlines() if x.startswith("[")))
    assert [(r["index"], r["status"], r["survivors"]) for r in listed] == [
        (0, "completed", SITES),
        (1, "completed", SITES),
    ]
    # every site ran both rounds through client.rounds and ended on the last one
    assert stderr.count(f"last round {listed[1]['round_id']}") == SITES, stderr
    assert "audit chain OK" in stderr and "round_completed" in stdout
    # The server's log is one JSON stream, and every rpc line names its caller.
    records = [json.loads(x) for x in (state / "secagg.log").read_text().splitlines()]
    rpcs = [r for r in records if r["msg"] == "rpc"]
    assert rpcs and all(r["caller"] for r in rpcs)
    assert {r["caller"] for r in rpcs} >= {"admin", *(f"site-{i}" for i in range(1, SITES + 1))}
    assert any(r["method"].endswith("/WatchRounds") for r in rpcs)
    assert any(r["msg"] == "serving" and r["admin_api"] for r in records)


def _kill_server(stdout: str) -> None:
    m = re.search(r"^SERVE_PID=(\d+)$", stdout, re.M)
    if m is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(m.group(1)), signal.SIGKILL)


def test_readme_pytorch_loop_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's PyTorch block, as written, for three sites of a two-round job: only
    the server address and the key file name are substituted, and ``model``,
    ``train_one_epoch``, ``loader``, ``optimizer`` and ``train_set`` are given (the
    reader's own). Before, the loop iterated over ``rounds``, which nothing provided."""
    torch = pytest.importorskip("torch")
    import copy

    from secagg.server import StageTimeouts
    from secagg.service.admin import AdminClient
    from secagg.service.authority import init_authority, sign_site
    from secagg.service.config import ServerConfig
    from secagg.service.coordinator import JobSpec
    from secagg.service.keyfile import write_identity
    from secagg.service.server import BackgroundServer
    from secagg.service.tls import ClientTls, ServerTls

    from .helpers import TOKEN, run_threads

    code = block(ROOT / "README.md", "pytorch")
    pki = make_pki(tmp_path / "pki", [])
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(pki / "ca.pem", work / "ca.pem")
    shutil.copy(init_authority(work / "offline", "fed"), work / "authority.pub")
    monkeypatch.chdir(work)  # the snippet names ca.pem, authority.pub and its key file
    tls = ServerTls(str(pki / "server.pem"), str(pki / "server.key"))
    cfg = ServerConfig(
        listen="127.0.0.1:0", store=str(tmp_path / "s.db"), admin_token=TOKEN, tls=tls
    )
    torch.manual_seed(0)
    model0 = torch.nn.Linear(4, 1)  # the global model every site starts from
    names = [f"site-{i}" for i in (1, 2, 3)]
    with BackgroundServer(cfg) as server:
        target = f"127.0.0.1:{server.port}"  # server.pem names 127.0.0.1
        with AdminClient(target, TOKEN, tls=ClientTls(ca=str(pki / "ca.pem"))) as admin:
            for n in names:
                key = write_identity(work / f"{n}.key")
                entry = sign_site(work / "offline" / "authority.key", n, key.public)
                admin.enroll(n, key.public, entry.encode())
            admin.create_job(
                JobSpec(name="fed", participants=names, dim=5, rounds=2,
                        deadlines=StageTimeouts.uniform(30.0))
            )  # fmt: skip

            def site(i: int) -> Any:
                def train_one_epoch(model: Any, loader: Any, optimizer: Any) -> None:
                    with torch.no_grad():
                        for p in model.parameters():
                            p.add_(0.1 * i)  # this site's local update

                scope = {
                    "model": copy.deepcopy(model0),
                    "train_one_epoch": train_one_epoch,
                    "loader": None,
                    "optimizer": None,
                    "train_set": range(10 * i),  # num_samples: 10, 20, 30
                }
                src = code.replace('"secagg.example.org:443"', repr(target))
                src = src.replace('"site-3.key"', repr(f"site-{i}.key"))
                assert src != code
                exec(compile(src, "README.md", "exec"), scope)
                scope["client"].close()
                return scope["model"]

            out = run_threads({str(i): (lambda i=i: site(i)) for i in (1, 2, 3)})
            assert not {k: o.error for k, o in out.items() if o.error}
            assert admin.job("fed").rounds_completed == 2
    step = (10 * 0.1 + 20 * 0.2 + 30 * 0.3) / (10 + 20 + 30)  # weighted mean of the deltas
    for o in out.values():
        for got, start in zip(o.result.parameters(), model0.parameters(), strict=True):
            assert torch.allclose(got, start + 2 * step, atol=1e-3), (got, start + 2 * step)


def _federation_file(port: int) -> str:
    """docs/operations.md's federation file with only the server's address made a loopback
    one: its host (in ``server`` and ``server_names``), port and listen address."""
    text = block(ROOT / "docs" / "operations.md", "federation")
    out = text.replace("agg.example.org", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
    out = out.replace(":8443", f":{port}")
    assert out.count(f"127.0.0.1:{port}") == 2 and '["127.0.0.1"]' in out, out
    return out


def _kit_files(kits: Path) -> dict[str, tuple[int, str]]:
    """Every file of the kits but the server's live store: (mtime_ns, sha256)."""
    files = {}
    for p in sorted(kits.rglob("*")):
        if p.is_file() and not p.name.startswith("secagg.db"):
            files[str(p.relative_to(kits.parent))] = (
                p.stat().st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return files


def _model(i: int) -> Any:
    """Site ``i``'s model: 530 float parameters (``nn.Linear(52, 10)``, or the same shapes
    as numpy arrays behind a ``state_dict()`` when torch is absent)."""
    try:
        import torch
    except ImportError:
        rng = np.random.default_rng(i)  # model weights, not a secret
        sd = {
            "weight": rng.uniform(-0.1, 0.1, (10, 52)).astype(np.float32),
            "bias": rng.uniform(-0.1, 0.1, 10).astype(np.float32),
        }
        return SimpleNamespace(state_dict=sd.copy)
    torch.manual_seed(i)
    return torch.nn.Linear(52, 10)


def _array(x: Any) -> npt.NDArray[np.float64]:
    return np.asarray(x.detach().numpy() if hasattr(x, "detach") else x, dtype=np.float64)


def test_readme_kits_quick_start_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's startup-kit quick start, as written: docs/operations.md's federation
    file (only the server's address made a free loopback port), the README's ``kits`` block
    run by bash, and its ``kits-site`` snippet run by three sites (threads; ``model`` is
    given, 530 floats, and site ``i`` opens ``kits/sites/site-i``). Before, the block
    failed: ``job create`` raced the server's start (``Unavailable``, exit 8), the server
    was never stopped, the snippet lacked its import, and the federation file named two
    sites ``hospital-1`` and ``hospital-2`` (``job create``: ``NotFound: participant 'site-1'
    is not enrolled``) with ``min_clients = 8`` (no three-site round passes that policy)."""
    if shutil.which("bash") is None:
        pytest.skip("the README's shell needs bash")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "federation.toml").write_text(_federation_file(port))
    snippet = block(ROOT / "README.md", "kits-site")
    assert snippet.count('"kits/sites/site-1"') == 1
    monkeypatch.chdir(tmp_path)  # the snippet names its kit relative to where it runs
    script = "set -euo pipefail\n" + block(ROOT / "README.md", "kits")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    models = {i: _model(i) for i in range(1, SITES + 1)}
    results: dict[int, Any] = {}

    def site(i: int) -> None:
        scope = {"model": models[i]}
        code = snippet.replace('"kits/sites/site-1"', f'"kits/sites/site-{i}"')
        try:
            exec(compile(code, "README.md", "exec"), scope)
            results[i] = scope["agg"]
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=site, args=(i,)) for i in range(1, SITES + 1)]
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=cli_env(),
            stdout=fo,
            stderr=fe,
            start_new_session=True,  # the server it starts shares its process group
        )
        try:
            while '{"name": "fed"' not in out.read_text():  # the job exists: sites start
                assert proc.poll() is None, err.read_text()
                time.sleep(0.1)
            before = _kit_files(tmp_path / "kits")
            for t in threads:
                t.start()
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            for t in threads:
                if t.is_alive():
                    t.join(timeout=30)
    stdout, stderr = out.read_text(), err.read_text()
    assert rc == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    lines = stdout.splitlines()
    jobs = [json.loads(x) for x in lines if x.startswith('{"name": "fed"')]
    assert jobs[0]["participants"] == [f"site-{i}" for i in range(1, SITES + 1)]
    assert (jobs[-1]["status"], jobs[-1]["rounds_done"], jobs[-1]["rounds_completed"]) == (
        "finished",
        30,
        30,
    ), jobs[-1]
    listed = json.loads(next(x for x in lines if x.startswith("[")))
    assert [(r["index"], r["status"], r["survivors"]) for r in listed] == [
        (k, "completed", SITES) for k in range(30)
    ]
    # Every site ended on the last round with the exact mean, within one quantization
    # step (16 bits over [-8, 8], the defaults: stochastic rounding moves each value by
    # less than a step, and so their mean).
    step = 16.0 / 65535
    exact = {
        k: np.mean([_array(m.state_dict()[k]) for m in models.values()], axis=0)
        for k in ("weight", "bias")
    }
    assert sum(v.size for v in exact.values()) == 530
    for i in range(1, SITES + 1):
        agg = results[i]
        assert not isinstance(agg, BaseException), f"site-{i}: {agg!r}"
        assert agg.round_id.hex() == listed[-1]["round_id"]
        for k, want in exact.items():
            assert np.max(np.abs(_array(agg.mean[k]) - want)) <= step, (i, k)
    # --add-site wrote only the new kit: every earlier kit file is as it was.
    added = json.loads(next(x for x in reversed(lines) if x.startswith('{"federation"')))
    assert added["files"] and all(f.startswith("kits/sites/site-4/") for f in added["files"])
    after = _kit_files(tmp_path / "kits")
    assert {f: after.get(f) for f in before} == before
    assert set(after) - set(before) == set(added["files"])  # and nothing else
    audit = run_cli(["audit", "--store", "kits/server/secagg.db"], cwd=tmp_path)
    assert audit.returncode == 0 and "audit chain OK" in audit.stderr, audit.stderr
