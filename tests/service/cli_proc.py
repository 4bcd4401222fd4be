"""Run the real ``secagg`` command as a subprocess (the error table and the docs-run test)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SECAGG = str(Path(sys.executable).with_name("secagg"))
if not Path(SECAGG).exists():  # pragma: no cover - an environment without the script
    SECAGG = shutil.which("secagg") or SECAGG


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``secagg`` subprocess: no SECAGG_* or GRPC_* from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SECAGG_", "GRPC_"))}
    env["PATH"] = f"{Path(SECAGG).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_cli(
    args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SECAGG, *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class ServeProc:
    """A ``secagg serve`` subprocess; ``port`` comes from its ``serving`` log line."""

    proc: subprocess.Popen[str]
    port: int = 0
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls, args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None
    ) -> ServeProc:
        proc = subprocess.Popen(
            [SECAGG, "serve", *args],
            cwd=cwd,
            env=env or cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        me = cls(proc)
        ready = threading.Event()
        assert proc.stderr is not None
        threading.Thread(target=me._drain, args=(proc.stderr, ready), daemon=True).start()
        deadline = time.monotonic() + 30
        while not ready.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"secagg serve did not start: {me.lines}")
        return me

    def _drain(self, stream: IO[str], ready: threading.Event) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            if not ready.is_set() and '"msg": "serving"' in line:
                self.port = int(json.loads(line)["port"])
                ready.set()

    def events(self) -> list[dict[str, object]]:
        return [json.loads(x) for x in self.lines]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
