"""Operations: health, reflection, Prometheus metrics, JSON logs, restart and SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from secagg.server import StageTimeouts
from secagg.service.admin import AdminClient
from secagg.service.client import RetryPolicy
from secagg.service.config import ServerConfig
from secagg.service.logs import JsonFormatter
from secagg.service.server import BackgroundServer
from secagg.service.store import Store

from .helpers import TOKEN, Deployment, participate, run_threads


def test_health_and_reflection(deployment: Deployment) -> None:
    with grpc.insecure_channel(deployment.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "secagg.v1.Aggregation", "secagg.v1.Admin"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(refl.ServerReflectionInfo(iter([req]), timeout=5))
        names = {s.name for s in resp.list_services_response.service}
    assert {"secagg.v1.Aggregation", "secagg.v1.Admin", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint(tmp_path: Path) -> None:
    cfg = ServerConfig(listen="127.0.0.1:0", store=":memory:", admin_token=TOKEN, metrics_port=0)
    d = Deployment(":memory:")
    d.server = BackgroundServer(cfg, store=Store(":memory:")).start()
    d.admin = AdminClient(d.target, TOKEN)
    try:
        names = d.enroll(3)
        rid = d.create(names[:3], 1000, StageTimeouts.uniform(10.0))
        run_threads({n: (lambda n=n: participate(d, n, rid, np.ones(1000))) for n in names})
        assert d.admin.wait(rid).status == "completed"
        assert d.server.service is not None
        port = d.server.service.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        d.stop()
    assert 'secagg_rounds_total{status="completed"} 1.0' in text
    assert 'secagg_stage_seconds_count{stage="masked_input"} 1.0' in text
    assert 'secagg_bytes_total{direction="in"}' in text
    assert 'secagg_rpcs_total{code="OK",method="/secagg.v1.Aggregation/Session"} 3.0' in text


def test_logs_are_json_lines() -> None:
    record = logging.LogRecord(
        "secagg.service.rounds", logging.INFO, __file__, 1, "stage", (), None
    )
    record.fields = {"round": "ab", "stage": "share_keys"}
    line = JsonFormatter().format(record)
    data = json.loads(line)
    assert data["msg"] == "stage" and data["stage"] == "share_keys" and data["level"] == "info"
    assert "\n" not in line


def _start_serve(store: Path) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, SECAGG_ADMIN_TOKEN=TOKEN, GRPC_VERBOSITY="ERROR")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "secagg.service.cli",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            str(store),
            "--shutdown-grace",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"msg": "serving"' in line:
            port = json.loads(line)["port"]
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            return proc, f"127.0.0.1:{port}"
    raise AssertionError(f"server did not start: {proc.wait()}")


def _stalled_round(
    d: Deployment, release: threading.Event
) -> tuple[bytes, threading.Thread, list[str]]:
    """Three clients that advertise and share keys, then stall before their masked input."""
    names = d.enroll(3)
    rid = d.create(names, 1000, StageTimeouts.uniform(30.0))
    stalled = threading.Barrier(4)

    def hook(msg: Any) -> bool:
        if msg.TYPE == 3:
            stalled.wait()
            release.wait()
        return True

    def job(n: str) -> Any:
        with d.client(n, retry=RetryPolicy(budget=0.5, initial_backoff=0.05)) as c:
            return c.participate(c.join(rid), np.ones(1000), on_send=hook)

    runner = threading.Thread(
        target=run_threads, args=({n: (lambda n=n: job(n)) for n in names},), daemon=True
    )
    runner.start()
    stalled.wait()  # every client is past share_keys: the round is in masked_input
    return rid, runner, names


def test_restart_mid_round_aborts_it_and_serves_new_rounds(tmp_path: Path) -> None:
    store_path = tmp_path / "secagg.db"
    proc, target = _start_serve(store_path)
    d = Deployment(store_path)
    d.admin = AdminClient(target, TOKEN)
    release = threading.Event()
    try:
        rid, runner, _ = _stalled_round(_Remote(d, target), release)
        before = Store(store_path).audit_entries()
        os.kill(proc.pid, signal.SIGKILL)  # a crash: nothing gets recorded
        proc.wait()
    finally:
        release.set()
        d.admin.close()
    runner.join(timeout=30)
    restarted = Deployment(store_path).start()  # same store, new process state
    try:
        after = restarted.store.audit_entries()
        assert after[: len(before)] == before  # nothing recorded was lost or altered
        (aborted,) = [e for e in after[len(before) :] if e.round_id == rid.hex()]
        assert aborted.kind == "round_aborted"
        assert aborted.data["reason"] == "the server restarted while the round was running"
        assert aborted.data["stage"] == "masked_input"
        assert restarted.admin is not None
        assert restarted.admin.status(rid).status == "aborted"
        names = restarted.enroll(3, prefix="n")
        rid2 = restarted.create(names, 100, StageTimeouts.uniform(10.0))
        out = run_threads(
            {n: (lambda n=n: participate(restarted, n, rid2, np.ones(100))) for n in names}
        )
        assert all(o.error is None for o in out.values())
        restarted.store.verify_audit()
    finally:
        restarted.stop()


def test_sigterm_aborts_running_rounds_and_records_them(tmp_path: Path) -> None:
    store_path = tmp_path / "secagg.db"
    proc, target = _start_serve(store_path)
    d = Deployment(store_path)
    d.admin = AdminClient(target, TOKEN)
    release = threading.Event()
    try:
        rid, runner, _ = _stalled_round(_Remote(d, target), release)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        release.set()
        d.admin.close()
    runner.join(timeout=30)
    store = Store(store_path)
    entries = store.audit_entries(rid.hex())
    assert [e.kind for e in entries] == ["round_created", "round_aborted"]
    assert entries[1].data["reason"] == "the server is shutting down"
    store.verify_audit()


class _Remote(Deployment):
    """A deployment whose server runs in another process."""

    def __init__(self, base: Deployment, target: str) -> None:
        super().__init__(base.store_path)
        self.admin = base.admin
        self._target = target

    @property
    def target(self) -> str:
        return self._target
