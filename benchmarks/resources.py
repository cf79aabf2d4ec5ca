"""Memory per tracked connection and subflow, and peak RSS with 100k concurrent connections.

Run: .venv/bin/python benchmarks/resources.py [--n 20000] [--concurrent 100000] [--json]

Why: the limits in ``[tracker]`` (max_connections, max_subflows, ooo_limit, history, ...) are only
useful to an operator who can turn them into bytes. Measured here, in a child process per figure:

* tracemalloc: ``n`` idle established connections fed through the replay pipeline (tracker +
  emitter: what ``replay`` and ``run`` keep per connection), Python heap bytes per connection --
  handshake only; after a 1 KB exchange each way (released bytes kept in the per-direction
  comparison history); and per extra joined subflow (every connection joins one);
* peak RSS (``ru_maxrss``) of a child holding ``concurrent`` connections open at once (handshake
  plus 100 bytes each way, none closed), next to the same child's RSS before the first packet.

Packets are built on the fly with our encoder (``tests/core/manyconns.py`` style), so no packet
list inflates the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MASK64 = (1 << 64) - 1


def conn_packets(i: int, *, data: int = 0, join: bool = False) -> list[bytes]:
    """Packets of connection ``i``: v1 handshake, optionally ``data`` bytes each way, optionally a join."""
    from mproxy import crypto
    from mproxy.wire import mptcp as m
    from mproxy.wire.build import build_tcp, tcp_options
    from mproxy.wire.packet import ACK, SYN

    cli = bytes((198, 18, (i // 50000) >> 8 & 0xFF, (i // 50000) & 0xFF))
    cli2 = bytes((198, 18, 128 + ((i // 50000) >> 8 & 0x7F), (i // 50000) & 0xFF))
    srv = bytes((198, 19, 255, 1))
    sport = 10000 + i % 50000
    ck, sk = (0x5EED << 48) | (2 * i + 1), (0xBEEF << 48) | (2 * i + 2)
    ci, si = (i * 2654435761) & 0xFFFFFFFF, (i * 40503 + 12345) & 0xFFFFFFFF
    cd, sd = (crypto.key_idsn(ck, 1) + 1) & MASK64, (crypto.key_idsn(sk, 1) + 1) & MASK64
    c2s, s2c = (cli, srv, sport, 80), (srv, cli, 80, sport)
    pk = [
        build_tcp(*c2s, ci, 0, SYN, 64240, tcp_options(m.MpCapable(1, m.CAP_H_HMAC).encode())),
        build_tcp(*s2c, si, ci + 1, SYN | ACK, 65160, tcp_options(m.MpCapable(1, m.CAP_H_HMAC, sk).encode())),
        build_tcp(*c2s, ci + 1, si + 1, ACK, 502, tcp_options(m.MpCapable(1, m.CAP_H_HMAC, ck, sk).encode())),
    ]
    if data:
        pk.append(build_tcp(*c2s, ci + 1, si + 1, ACK, 502, tcp_options(m.dss(sd, cd, 1, data).encode()),
                            b"q" * data))
        pk.append(build_tcp(*s2c, si + 1, ci + 1 + data, ACK, 509,
                            tcp_options(m.dss((cd + data) & MASK64, sd, 1, data).encode()), b"r" * data))
    if join:
        tok = crypto.key_token(sk, 1)
        ni, nr = 0x1000 + i, 0x2000 + i
        jp = 20000 + i % 40000
        a, b = (cli2, srv, jp, 80), (srv, cli2, 80, jp)
        pk += [
            build_tcp(*a, ci ^ 0x5555, 0, SYN, 64240, tcp_options(m.MpJoin(m.JoinPhase.SYN, False, 1, tok, ni).encode())),
            build_tcp(*b, si ^ 0x5555, (ci ^ 0x5555) + 1, SYN | ACK, 65160, tcp_options(m.MpJoin(
                m.JoinPhase.SYN_ACK, False, 0, None, nr, crypto.join_hmac(sk, ck, nr, ni, 1)[:8]).encode())),
            build_tcp(*a, (ci ^ 0x5555) + 1, (si ^ 0x5555) + 1, ACK, 502, tcp_options(m.MpJoin(
                m.JoinPhase.ACK, hmac=crypto.join_hmac(ck, sk, ni, nr, 1)[:20]).encode())),
        ]
    return pk


def _feed(pipe: object, n: int, **kw: object) -> None:
    from mproxy.wire.packet import LinkType

    ts = 1_000_000.0
    for i in range(n):
        for p in conn_packets(i, **kw):  # type: ignore[arg-type]
            ts += 0.00001
            pipe.feed(LinkType.RAW, p, ts)  # type: ignore[attr-defined]


def child_tracemalloc(n: int, data: int, join: bool) -> dict[str, float]:
    """Heap bytes per connection held by the pipeline after ``n`` idle connections."""
    import gc
    import tracemalloc

    from mproxy.core.pipeline import Pipeline
    from mproxy.core.tracker import TrackerConfig

    conn_packets(0, data=data, join=join)  # import and warm everything first
    pipe = Pipeline(TrackerConfig(max_connections=n + 10, max_subflows=4 * n + 10), passthrough=False)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    _feed(pipe, n, data=data, join=join)
    pipe.drain_records()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tr = pipe.tracker
    assert len(tr.connections) == n and tr.active_subflows == n * (2 if join else 1), (len(tr.connections),
                                                                                       tr.active_subflows)
    return {"n": n, "bytes_per_connection": used / n}


def child_rss(n: int) -> dict[str, float]:
    """Peak RSS with ``n`` concurrent connections (handshake + 100 bytes each way, none closed)."""
    import resource

    from mproxy.core.pipeline import Pipeline
    from mproxy.core.tracker import TrackerConfig

    conn_packets(0, data=100)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pipe = Pipeline(TrackerConfig(max_connections=n + 10, max_subflows=4 * n + 10), passthrough=False)
    _feed(pipe, n, data=100)
    pipe.drain_records()
    assert len(pipe.tracker.connections) == n
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "rss_before_kib": before, "peak_rss_kib": peak, "kib_per_connection": (peak - before) / n}


def _child(args: list[str]) -> dict[str, float]:
    cp = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(cp.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="connections for the tracemalloc figures")
    ap.add_argument("--concurrent", type=int, default=100_000, help="connections for the peak RSS figure")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "heap":
            out = child_tracemalloc(int(rest[0]), int(rest[1]), rest[2] == "1")
        else:
            out = child_rss(int(rest[0]))
        print(json.dumps(out))
        return 0
    idle = _child(["heap", str(a.n), "0", "0"])
    data = _child(["heap", str(a.n), "1000", "0"])
    joined = _child(["heap", str(a.n), "0", "1"])
    rss = _child(["rss", str(a.concurrent)])
    res = {
        "connection_idle_bytes": round(idle["bytes_per_connection"]),
        "connection_after_1kb_each_way_bytes": round(data["bytes_per_connection"]),
        "extra_subflow_bytes": round(joined["bytes_per_connection"] - idle["bytes_per_connection"]),
        "concurrent": rss["n"], "rss_before_mib": round(rss["rss_before_kib"] / 1024, 1),
        "peak_rss_mib": round(rss["peak_rss_kib"] / 1024, 1),
        "rss_kib_per_connection": round(rss["kib_per_connection"], 2),
    }
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"| what | measured ({a.n} connections, tracemalloc) |\n|---|---|")
    print(f"| idle established connection, 1 subflow (tracker + emitter) | {res['connection_idle_bytes']:,} B |")
    print(f"| same after 1 KB each way (comparison history holds it) | "
          f"{res['connection_after_1kb_each_way_bytes']:,} B |")
    print(f"| each further subflow (MP_JOIN) | {res['extra_subflow_bytes']:,} B |")
    print("\n| concurrent connections | RSS before | peak RSS | per connection |\n|---|---|---|---|")
    print(f"| {res['concurrent']:,} | {res['rss_before_mib']} MiB | {res['peak_rss_mib']} MiB | "
          f"{res['rss_kib_per_connection']} KiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
