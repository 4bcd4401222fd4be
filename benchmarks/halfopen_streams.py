"""Server memory under 30 half-open ``Session`` streams from one participant key (issue 11).

Each stream sends ``Hello`` and one 1-byte chunk announcing a message of the round's largest
size, then stalls. Before the fix the server allocated the announced size per stream and held
all 30; now it refuses the streams past ``max_streams_per_participant`` and holds only the
bytes that arrived. Prints RSS of this process (server and attacker share it) before and after.

    python benchmarks/halfopen_streams.py [--streams 30] [--dim 2000000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secagg.server import StageTimeouts
from tests.service.helpers import Deployment, RawSession


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--streams", type=int, default=30)
    ap.add_argument("--dim", type=int, default=2_000_000)
    args = ap.parse_args()
    d = Deployment(Path(tempfile.mkdtemp()) / "s.db").start()
    try:
        names = d.enroll(3)
        rid = d.create(names, args.dim, StageTimeouts.uniform(120.0))
        assert d.server is not None and d.server.service is not None
        total = d.server.service.coordinator.runner(rid).max_message_bytes
        time.sleep(1.0)
        before = rss_mib()
        raws = []
        for _ in range(args.streams):
            raw = RawSession(d, names[0], rid)
            raw.send_chunk(seq=0, total=total, offset=0, data=b"x")
            raws.append(raw)
        time.sleep(3.0)
        after = rss_mib()
        refused = sum(
            r.call.done() and r.call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in raws
        )
        print(
            f"{args.streams} half-open streams, {total / 2**20:.1f} MiB announced each: "
            f"RSS {before:.0f} -> {after:.0f} MiB; refused {refused}/{args.streams}"
        )
        for r in raws:
            r.close()
    finally:
        d.stop()


if __name__ == "__main__":
    main()
