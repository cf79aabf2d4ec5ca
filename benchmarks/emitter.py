"""Emitter throughput: µs per full-size segment (data frame + its ACK) and MB/s.

Run: .venv/bin/python benchmarks/emitter.py [--mb 32] [--repeat 5]
Best of ``--repeat`` runs, so the number is the code's cost, not the noise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mproxy.core.emitter import TcpEmitter  # noqa: E402

ADDRS = {
    4: (bytes([192, 0, 2, 1]), bytes([198, 51, 100, 2])),
    6: (bytes.fromhex("20010db8000000000000000000000001"), bytes.fromhex("20010db8000000000000000000000002")),
}


def run(ipver: int, total: int, chunk: int, repeat: int) -> tuple[float, float, int]:
    data = os.urandom(total)
    mv = memoryview(data)
    best = float("inf")
    segs = 0
    for _ in range(repeat):
        cli, srv = ADDRS[ipver]
        e = TcpEmitter(cli, 40000, srv, 80)
        e.open(0.0)
        frames = 0
        t0 = time.perf_counter()
        for off in range(0, total, chunk):
            frames += len(e.data(True, mv[off : off + chunk], 1.0))
        dt = time.perf_counter() - t0
        best = min(best, dt)
        segs = frames // 2
    return best * 1e6 / segs, total / best / 1e6, segs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=float, default=32, help="payload per run, MB")
    ap.add_argument("--chunk", type=int, default=146_000, help="bytes per data() call")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    total = int(a.mb * 1e6)
    print(f"python {sys.version.split()[0]}, {a.mb:g} MB per run, data() chunks of {a.chunk} B, mss 1460, best of {a.repeat}")
    for ipver in (4, 6):
        us, mbs, segs = run(ipver, total, a.chunk, a.repeat)
        print(f"IPv{ipver}: {us:6.2f} µs per full-size segment (data+ack), {mbs:7.1f} MB/s payload ({segs} segments)")


if __name__ == "__main__":
    main()
