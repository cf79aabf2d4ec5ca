"""A compact generator of captures holding very many short-lived MPTCP connections.

Each connection is five packets built with our encoder: SYN, SYN/ACK and the third ACK carrying
MP_CAPABLE (v1; the ACK carries the first data bytes, mapped at IDSN+1), then a DATA_FIN each
way. Connections start every ``gap`` seconds (200 per second) and last 40 ms, so a few are open at
any time and closed ones linger for ``closed_linger`` (30 s: ~6000 of them): a steady state, reached
after ~6000 connections, whose memory must not depend on how many went before. Used by the RSS test and
``benchmarks/connections.py``.

Run as ``python -m tests.core.manyconns OUT.pcap N`` to write one.
"""

from __future__ import annotations

import heapq
import struct
import sys
from pathlib import Path

from mproxy import crypto
from mproxy.wire import mptcp as m
from mproxy.wire.build import build_tcp, tcp_options
from mproxy.wire.packet import ACK, SYN

MASK64 = (1 << 64) - 1
SERVER = bytes((198, 19, 255, 1))
PAYLOAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def connection(i: int) -> list[bytes]:
    """The five IP packets of connection ``i`` (unique 4-tuple, keys, ISNs)."""
    cli = bytes((198, 18, (i // 50000) >> 8 & 0xFF, (i // 50000) & 0xFF))
    sport = 10000 + i % 50000
    ck, sk = (0x5EED << 48) | (2 * i + 1), (0xBEEF << 48) | (2 * i + 2)
    ci, si = (i * 2654435761) & 0xFFFFFFFF, (i * 40503 + 12345) & 0xFFFFFFFF
    cd = (crypto.key_idsn(ck, 1) + 1) & MASK64  # first data-level byte, client to server
    sd = (crypto.key_idsn(sk, 1) + 1) & MASK64
    n = len(PAYLOAD)
    c2s = (cli, SERVER, sport, 80)
    s2c = (SERVER, cli, 80, sport)
    return [
        build_tcp(*c2s, ci, 0, SYN, 64240, tcp_options(m.MpCapable(1, m.CAP_H_HMAC).encode())),
        build_tcp(*s2c, si, ci + 1, SYN | ACK, 65160, tcp_options(m.MpCapable(1, m.CAP_H_HMAC, sk).encode())),
        build_tcp(*c2s, ci + 1, si + 1, ACK, 502, tcp_options(m.MpCapable(1, m.CAP_H_HMAC, ck, sk, n).encode()),
                  PAYLOAD),
        build_tcp(*s2c, si + 1, ci + 1 + n, ACK, 509,
                  tcp_options(m.dss((cd + n) & MASK64, sd, 0, 1, data_fin=True).encode())),
        build_tcp(*c2s, ci + 1 + n, si + 1, ACK, 502,
                  tcp_options(m.dss((sd + 1) & MASK64, (cd + n) & MASK64, 0, 1, data_fin=True).encode())),
    ]


def write_capture(path: str | Path, n: int, *, gap: float = 0.005, span: float = 0.040) -> int:
    """Write ``n`` connections as a raw-IP pcap; returns the number of packets."""
    rec = struct.Struct("<IIII")
    heap: list[tuple[float, int, bytes]] = []
    seq = 0
    written = 0
    with open(path, "wb", buffering=1 << 20) as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for i in range(n):
            t0 = 1_000_000.0 + i * gap
            while heap and heap[0][0] < t0:
                ts, _s, p = heapq.heappop(heap)
                sec = int(ts)
                f.write(rec.pack(sec, int((ts - sec) * 1e6), len(p), len(p)) + p)
                written += 1
            pk = connection(i)
            for k, p in enumerate(pk):
                heapq.heappush(heap, (t0 + k * span / (len(pk) - 1), seq, p))
                seq += 1
        while heap:
            ts, _s, p = heapq.heappop(heap)
            sec = int(ts)
            f.write(rec.pack(sec, int((ts - sec) * 1e6), len(p), len(p)) + p)
            written += 1
    return written


if __name__ == "__main__":
    print(write_capture(sys.argv[1], int(sys.argv[2])))
