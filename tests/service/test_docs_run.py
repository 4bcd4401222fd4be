"""The docs run: the README's Deployment section and the hybrid site snippet of
docs/service.md, executed as written on loopback.

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
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .cli_proc import cli_env
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
