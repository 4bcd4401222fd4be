"""The docs run: the README's Deployment section and the hybrid site snippet of
docs/service.md, executed as written on loopback.

The only substitutions (documented in the README and in docs/service.md): the variables
``LISTEN``, ``SERVER``, ``STATE``, ``PKI`` and ``SITES`` are set in the environment (a free
port, temporary directories, a throwaway CA from :mod:`.pki`), bash runs the blocks with
``set -euo pipefail``, and the sites' snippet has its line marked ``# from the job
scheduler`` replaced by the site's name, the server and the round id. Before issue 12 the
README's commands failed (``round create`` without ``--server`` raised ``AttributeError``;
``enroll`` wrote ``./secagg.db``; the hybrid round needed unwritten keygen flags).
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
line = next(x for x in snippet.splitlines() if x.endswith("# from the job scheduler"))
errors = []

def site(i):
    code = snippet.replace(line, "site, server, round_id = SITE, SERVER, ROUND")
    scope = {"SITE": f"site-{i}", "SERVER": os.environ["SERVER"], "ROUND": os.environ["ROUND"]}
    try:
        exec(compile(code, "docs/service.md", "exec"), scope)
        assert abs(float(scope["result"].mean[0]) - 0.25) < 1e-3, scope["result"].mean[:3]
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
            f'ROUND="$ROUND" "{sys.executable}" sites.py site_snippet.py',
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
    statuses = [json.loads(x) for x in stdout.splitlines() if x.startswith('{"round_id"')]
    assert statuses[0]["status"] == "running" and len(statuses[0]["participants"]) == SITES
    assert statuses[-1]["status"] == "completed", statuses[-1]
    assert len(statuses[-1]["contributors"]) == SITES
    assert "audit chain OK" in stderr and "round_completed" in stdout
    # The server's log is one JSON stream, and every rpc line names its caller.
    records = [json.loads(x) for x in (state / "secagg.log").read_text().splitlines()]
    rpcs = [r for r in records if r["msg"] == "rpc"]
    assert rpcs and all(r["caller"] for r in rpcs)
    assert {r["caller"] for r in rpcs} >= {"admin", *(f"site-{i}" for i in range(1, SITES + 1))}
    assert any(r["msg"] == "serving" and r["admin_api"] for r in records)


def _kill_server(stdout: str) -> None:
    m = re.search(r"^SERVE_PID=(\d+)$", stdout, re.M)
    if m is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(m.group(1)), signal.SIGKILL)
