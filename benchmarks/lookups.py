"""What made-up MPTCP options cost the tracker as its tables fill: per-packet time of the lookups any
host can trigger, against the number of live connections.

Run: .venv/bin/python benchmarks/lookups.py [--counts 1000,10000,50000] [--root CHECKOUT]

Why: a gateway must not let a handful of packets a second take a core. Three lookups take a packet
an attacker can make up to a table of every connection: an MP_JOIN SYN with an unknown token (grouped
by the address it goes to), a segment with DSS from a new 4-tuple (a subflow picked up mid-stream,
matched by DSN proximity), and a new connection whose key many live connections share (its token).
For each count N, in one process: N connections opened with our encoder (handshake + first data,
none closed), then 200 packets of each kind from new 4-tuples, 10 µs of packet time apart (the first
DSS segment apart: its lookup indexes the positions of every connection that had packets since the
last lookup, here all N); then a sustained flood of
the DSS kind, 2,000 a second for 5 s of packet time (seconds of CPU per second of it: the share of a
core such a flood takes); and separately N connections that all use the same keys (µs per new
connection over the last quarter).
``--root`` runs another checkout's tracker (a before/after comparison in one run).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="1000,10000,50000")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose mproxy is measured")
    a = ap.parse_args()
    sys.path.insert(0, str(a.root.resolve()))
    sys.path.insert(1, str(ROOT))
    import mproxy
    from mproxy.core.tracker import Tracker
    from mproxy.wire import mptcp as m
    from mproxy.wire.build import build_tcp, tcp_options
    from mproxy.wire.packet import ACK, SYN, parse_ip
    from tests.core import manyconns

    gc.set_threshold(20_000)  # the commands' setting (mproxy.gcpolicy), for checkouts older than it
    src_text = Path(manyconns.__file__).read_text()
    shared: dict[str, object] = {}
    exec(compile(src_text.replace("ck, sk = (0x5EED << 48) | (2 * i + 1), (0xBEEF << 48) | (2 * i + 2)",
                                  "ck, sk = 0x5EED000000000001, 0xBEEF000000000002"), "same_keys", "exec"), shared)
    same_keys = shared["connection"]
    att = bytes((198, 18, 200, 1))
    print(f"mproxy from {Path(mproxy.__file__).parent}\n")
    print("| live connections | join SYN, unknown token | DSS from a new 4-tuple: the first | the next 199 | 2,000 "
          "of those a second: CPU per second | new connection, shared key |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in a.counts.split(",")):
        tr = Tracker()
        t = 1000.0
        for i in range(n):
            for p in manyconns.connection(i)[:3]:
                t += 1e-5
                tr.process(parse_ip(memoryview(p), t))

        def per_packet(tr: Tracker, pkts: list[bytes]) -> float:
            nonlocal t
            gc.collect()
            t0 = time.perf_counter()
            for p in pkts:
                t += 1e-5
                tr.process(parse_ip(memoryview(p), t))
            return (time.perf_counter() - t0) / len(pkts) * 1e6

        joins = [build_tcp(att, manyconns.SERVER, 20000 + k, 80, 1000 + k, 0, SYN, 64240, tcp_options(
            m.MpJoin(m.JoinPhase.SYN, token=0xDEAD0000 + k, nonce=k, addr_id=1).encode())) for k in range(200)]
        dss = [build_tcp(att, manyconns.SERVER, 40000 + k, 80, 5000 + k, 7000, ACK, 502, tcp_options(
            m.dss(None, (k * 0x9E3779B97F4A7C15) & ((1 << 64) - 1), 1, 10).encode()), b"x" * 10) for k in range(200)]
        join_us = per_packet(tr, joins)
        first_ms = per_packet(tr, dss[:1]) / 1000  # the first lookup indexes what moved since the last: all N
        dss_us = per_packet(tr, dss[1:])
        # a sustained flood: 2,000 such segments a second for 5 s of packet time (CPU per second of it)
        t = max(t, tr.now) + 2.0  # the budget refilled
        flood = [build_tcp(att, manyconns.SERVER, 1024 + k % 60000, 81 + k // 60000, 9000 + k, 7000, ACK, 502,
                           tcp_options(m.dss(None, (k * 0xC2B2AE3D27D4EB4F) & ((1 << 64) - 1), 1, 10).encode()),
                           b"y" * 10) for k in range(10_000)]
        t0 = time.perf_counter()
        for p in flood:
            t += 5e-4
            tr.process(parse_ip(memoryview(p), t))
        flood_share = (time.perf_counter() - t0) / 5.0
        del tr
        gc.collect()
        tr = Tracker()
        t = 1000.0
        quarter = max(1, n // 4)
        t0 = 0.0
        for i in range(n):
            if i == n - quarter:
                t0 = time.perf_counter()
            for p in same_keys(i)[:3]:  # type: ignore[operator]
                t += 1e-5
                tr.process(parse_ip(memoryview(p), t))
        shared_us = (time.perf_counter() - t0) / quarter * 1e6
        print(f"| {n:,} | {join_us:,.0f} µs | {first_ms:,.1f} ms | {dss_us:,.0f} µs | {flood_share:.2f} s "
              f"| {shared_us:,.0f} µs |", flush=True)
        del tr
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
