"""Adversarial traffic against the sans-I/O core: floods, buffer filling, conflicting overlaps,
insertion, DSN jumps and wraps, damaged captures, a very large number of connections.

The security property under test is the same everywhere: whatever the traffic, tracker state
stays within the configured limits (and the limit hits are counted), per-packet cost stays flat,
and what reaches the rebuilt stream is exactly what the legitimate endpoints exchanged.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import struct
import subprocess
import sys
import tracemalloc
from collections import Counter, OrderedDict
from typing import Any
from pathlib import Path

import pytest

from mproxy import crypto
from mproxy.core.events import DataReleased, Direction, Notice, NoticeType
from mproxy.core.pipeline import Pipeline
from mproxy.core.reassembler import PIECE_COST, max_pieces
from mproxy.core.tracker import _MAX_LATE as MAX_LATE
from mproxy.core.tracker import ConnectionClosedSummary, Tracker, TrackerConfig
from mproxy.io.pcap import PcapWriter
from mproxy.replay import replay
from mproxy.wire import mptcp as m
from mproxy.wire.build import build_tcp, sack_option, tcp_options, timestamp_option
from mproxy.wire.packet import ACK, FIN, RST, SYN
from tests.fuzz.targets import buffered_pieces, check_bounded, check_frame

from .session import MASK64, Session, lying_tail, run, seg, streams

C2S, S2C = Direction.C2S, Direction.S2C
ROOT = Path(__file__).resolve().parents[2]


def notices(ev: list) -> list[NoticeType]:
    return [e.type for e in ev if isinstance(e, Notice)]


def summaries(ev: list) -> list[dict]:
    return [e.summary for e in ev if isinstance(e, ConnectionClosedSummary)]


def flood_syn(i: int, *, join: bool = False, dst: bytes = bytes((198, 18, 9, 2))) -> bytes:
    """Attacker SYN ``i``: MP_CAPABLE (SYN flood) or MP_JOIN with a random token (join flood),
    from 198.19.0.0/16 sources."""
    src = ipaddress.IPv4Address(0xC6130000 + i % 65000 + 1).packed
    opt = m.MpJoin(m.JoinPhase.SYN, False, 1, (i * 2654435761) & 0xFFFFFFFF, i).encode() if join \
        else m.MpCapable(1, m.CAP_H_HMAC).encode()
    return build_tcp(src, dst, 1024 + i % 60000, 80, i * 7919, 0, SYN, 65535, tcp_options(opt))


def legit_exchange(s: Session, c2s: bytes, s2c: bytes) -> list[bytes]:
    """Handshake, a join, data both ways split over both subflows, DATA_FIN both ways."""
    pk = s.handshake() + s.join(1)
    h = len(c2s) // 2
    pk += [s.data(0, True, 0, c2s[:h]), s.data(1, True, h, c2s[h:]), s.data(1, False, 0, s2c)]
    pk += [s.data_fin(0, True, len(c2s)), s.data_fin(0, False, len(s2c))]
    return pk


def _tracked(pk: list[bytes], fast: bool) -> tuple[Tracker, list]:
    """A tracker with its fast path on or off, and the events of ``pk`` fed to it (then flushed)."""
    t = Tracker()
    t.fast_path = fast
    return t, run(t, pk)


def _one_notice(ev: list, t: NoticeType, word: str) -> None:
    (n,) = [e for e in ev if isinstance(e, Notice)]
    assert n.type == t and word in n.detail, n


class Feeder:
    """Feeds IP packets with an advancing clock and keeps every event."""

    def __init__(self, tracker: Tracker, ts: float = 1000.0, step: float = 0.0001) -> None:
        self.tracker, self.ts, self.step = tracker, ts, step
        self.events: list = []

    def __call__(self, packets: list[bytes]) -> list:
        out: list = []
        for p in packets:
            self.ts += self.step
            out += self.tracker.process(seg(p, self.ts))
        self.events += out
        return out


# --------------------------------------------------------------------------- floods
def test_syn_flood_is_bounded_counted_and_legit_connections_are_rebuilt() -> None:
    cfg = TrackerConfig(max_connections=200, max_subflows=600)
    tr = Tracker(cfg)
    feed = Feeder(tr)
    feed([flood_syn(i) for i in range(3000)])
    # a legitimate connection during the flood: its handshake interleaved with 50 more flood SYNs per RTT
    s = Session(1, sport=33001)
    legit = legit_exchange(s, b"POST /login user=admin&pw=' OR 1=1 --", b"HTTP/1.1 403 Forbidden\r\n\r\n")
    ev: list = []
    for n, p in enumerate(legit):
        ev += feed([p])
        feed([flood_syn(10_000 + 50 * n + k) for k in range(50)])
        check_bounded(tr)
    assert len(tr.connections) <= cfg.max_connections
    assert tr.stats.memcap["connections"] >= 3000 - cfg.max_connections
    (sm,) = [x for x in summaries(ev) if x["client_port"] == 33001]
    assert sm["outcome"] == "data_fin" and not sm["pickup"] and len(sm["subflows"]) == 2
    got = streams(ev)
    cid = sm["conn_id"]
    assert got[(cid, C2S)] == b"POST /login user=admin&pw=' OR 1=1 --"
    assert got[(cid, S2C)] == b"HTTP/1.1 403 Forbidden\r\n\r\n"
    # and one after the flood
    s2 = Session(1, sport=33002, client_key=7, server_key=8)
    ev2 = feed(legit_exchange(s2, b"after", b"flood"))
    (sm2,) = summaries([e for e in ev2 if isinstance(e, ConnectionClosedSummary) and e.summary["client_port"] == 33002])
    assert sm2["outcome"] == "data_fin" and sm2["c2s"]["bytes"] == 5 and sm2["s2c"]["bytes"] == 5


def test_join_flood_is_bounded_counted_and_does_not_blind_the_tracker() -> None:
    """MP_JOIN SYNs with random tokens cost the attacker nothing (no handshake). They must not
    occupy the subflow table so that a legitimate connection arriving next goes untracked."""
    cfg = TrackerConfig(max_connections=100, max_subflows=300)
    tr = Tracker(cfg)
    feed = Feeder(tr)
    ev = feed([flood_syn(i, join=True) for i in range(5000)])
    check_bounded(tr)
    assert len(tr._sf) <= 2 * cfg.max_subflows
    assert tr.stats.memcap["subflows"] > 0
    assert NoticeType.JOIN_FLOOD in notices(ev) and NoticeType.JOIN_UNKNOWN_TOKEN in notices(ev)
    # a legitimate connection while the flood goes on (10 join SYNs between its packets)
    s = Session(1, sport=34001)
    legit = legit_exchange(s, b"GET /?id=1 UNION SELECT password FROM users", b"200 OK")
    ev = []
    for n, p in enumerate(legit):
        ev += feed([p])
        feed([flood_syn(20_000 + 10 * n + k, join=True) for k in range(10)])
        check_bounded(tr)
    (sm,) = summaries(ev)
    assert sm["outcome"] == "data_fin" and len(sm["subflows"]) == 2
    assert streams(ev)[(sm["conn_id"], C2S)] == b"GET /?id=1 UNION SELECT password FROM users"


def _lines_per_syn(established: int, syns: int = 300) -> float:
    """Python lines executed per flood SYN when the connection table is full of established
    connections. Counting executed lines (sys.settrace) instead of timing keeps the test
    deterministic on a noisy machine, and a scan of the tables shows up as lines per entry."""
    tr = Tracker(TrackerConfig(max_connections=established, max_subflows=4 * established))
    ts = 1000.0
    for i in range(established):
        s = Session(1, sport=1024 + i % 60000, client_key=i + 1, server_key=i + 2)
        s._isn = 1000 + i * 10
        for p in s.handshake():
            ts += 0.000001
            tr.process(seg(p, ts))
    pk = [seg(flood_syn(i), 0.0) for i in range(syns)]
    lines = 0

    def tracer(frame: object, event: str, arg: object) -> object:
        nonlocal lines
        if event == "line":
            lines += 1
        return tracer

    sys.settrace(tracer)
    try:
        for p in pk:
            ts += 0.0001
            p.ts = ts
            tr.process(p)
    finally:
        sys.settrace(None)
    assert tr.stats.refused["connection_limit"] == syns  # nothing half-open to evict: refused, counted
    assert len(tr.connections) == established
    return lines / syns


def test_flood_cost_per_packet_does_not_grow_with_the_table() -> None:
    """At the connection limit every flood SYN looked for a victim and swept the subflow table:
    O(table) per packet, a CPU denial of service. The work per packet must not depend on the
    table size (the timed figures are in benchmarks/README.md)."""
    small, large = _lines_per_syn(1000), _lines_per_syn(10_000)
    assert large <= small * 1.05 + 5, (small, large)


# --------------------------------------------------------------------------- buffers
def test_out_of_order_flood_stays_under_the_memcaps() -> None:
    # (no ACK from the receiver in this flood, past the 64 kB its SYN/ACK offered: the window check
    # off, so the bytes reach the buffers)
    cfg = TrackerConfig(ooo_limit=64 * 1024, pending_limit=32 * 1024, window_check=False)
    tr = Tracker(cfg)
    feed = Feeder(tr)
    s = Session(1)
    feed(s.handshake() + s.join(1))
    data = os.urandom(4 * 1024 * 1024)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        # never fill DSN offset 0..1000: everything after it is out of order (1400-byte segments)
        for off in range(1000, len(data) - 1400, 1400):
            feed([s.data(off // 1400 % 2, True, off, data[off : off + 1400])])
        # unmapped bytes: segments whose mapping never comes
        for i in range(200):
            feed([s.data(1, False, 0, b"u" * 1000, mapping=False)])
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    (conn,) = tr.connections.values()
    st = conn.streams[C2S]
    assert st.ooo_bytes <= cfg.ooo_limit and st.released == 0
    assert tr.buffered_bytes()[0] == st.ooo_bytes and tr.buffered_bytes()[1] <= cfg.pending_limit
    assert tr.stats.memcap["out_of_order"] > 0 and tr.stats.memcap["pending"] > 0
    assert st.memcap_bytes >= len(data) - 1000 - cfg.ooo_limit - 2800
    assert NoticeType.MEMCAP in notices(feed.events)
    check_bounded(tr)
    # what the cap kept is whole and right: filling the hole releases exactly those bytes
    assert peak < 4 * (cfg.ooo_limit + cfg.pending_limit) + 2 * 1024 * 1024, peak
    ev = feed([s.data(0, True, 0, data[:1000])])
    out = b"".join(e.data for e in ev if isinstance(e, DataReleased))
    assert len(out) >= 1000 + cfg.ooo_limit - 1400 and out == data[: len(out)]


def test_tiny_segments_cannot_make_one_connection_hold_the_memcap() -> None:
    """1-byte segments, every other byte (nothing adjacent): each buffered piece costs PIECE_COST of
    bookkeeping, so byte limits alone let one connection hold ~129 x ooo_limit (and pending_limit per
    subflow) of the memcap every other connection shares. The pieces are capped as well."""
    cfg = TrackerConfig(ooo_limit=64 * 1024, pending_limit=32 * 1024)
    tr = Tracker(cfg)
    feed = Feeder(tr)
    s = Session(1)
    feed(s.handshake() + s.join(1))
    for off in range(1000, 1000 + 2 * 5000, 2):  # out of order at the data level, in order per subflow
        feed([s.data(0, True, off, b"x")])
    for _ in range(1000):  # unmapped: their mapping never comes
        feed([s.data(1, True, 0, b"u", mapping=False)])
    (conn,) = tr.connections.values()
    st = conn.streams[C2S]
    assert len(st._chunks) == max_pieces(cfg.ooo_limit) == 128 and st.memcap_drops == 5000 - 128
    assert sum(len(sf.dirs[0].pending) for sf in conn.subflows) == max_pieces(cfg.pending_limit) == 64
    # 5,000 + 1,000 pieces would cost 774 KB of the budget; capped, 24.8 KB
    assert tr.budget.used == (128 + 64) * (1 + PIECE_COST) <= (cfg.ooo_limit + cfg.pending_limit) // 2
    assert tr.stats.memcap["out_of_order"] == 5000 - 128 and tr.stats.memcap["pending"] == 1000 - 64
    check_bounded(tr)


def test_global_memcap_holds_all_connections_together() -> None:
    """Each connection keeps a hole open and fills its own out-of-order allowance: the per-connection
    limit alone would let N connections hold N x ooo_limit. The shared cap holds them to memcap,
    counts the hits (one notice per connection), and what was buffered is still exact."""
    cfg = TrackerConfig(ooo_limit=64 * 1024, memcap=100 * 1024, window_check=False)  # (no ACKs: see above)
    tr = Tracker(cfg)
    feed = Feeder(tr)
    sessions = [Session(1, sport=41000 + 100 * k, client_key=0x1000 + k, server_key=0x9000 + k) for k in range(4)]
    data = [os.urandom(60 * 1024) for _ in sessions]
    for s in sessions:
        feed(s.handshake())
    for s, d in zip(sessions, data):
        for off in range(1000, len(d), 1400):  # DSN offsets 0..1000 never sent: a hole
            feed([s.data(0, True, off, d[off : off + 1400])])
        check_bounded(tr)
    assert len(tr.connections) == 4
    held = [c.streams[C2S].ooo_bytes for c in tr.connections.values()]
    assert tr.budget.used == sum(held) + PIECE_COST * buffered_pieces(tr) <= cfg.memcap and held[0] > held[-1]
    assert tr.stats.memcap["global"] > 0 and tr.stats.memcap["out_of_order"] == 0
    assert tr.shed_bytes == sum(len(d) - 1000 for d in data) - sum(held)
    per_conn = Counter(e.conn_id for e in feed.events if isinstance(e, Notice) and e.type == NoticeType.MEMCAP)
    assert per_conn and max(per_conn.values()) == 1
    # the first connection's hole fills: its bytes come out whole and its share goes back
    out = b"".join(e.data for e in feed([sessions[0].data(0, True, 0, data[0][:1000])])
                   if isinstance(e, DataReleased))
    assert out == data[0][: len(out)] and len(out) == 1000 + held[0]
    assert tr.budget.used == sum(held[1:]) + PIECE_COST * buffered_pieces(tr)
    # room again: the last connection can now buffer what it was refused (the sender resends)
    last = sessions[-1]
    before = tr.connections[max(tr.connections)].streams[C2S].ooo_bytes
    feed([last.data(0, True, off, data[-1][off : off + 1400]) for off in range(1000, len(data[-1]), 1400)])
    assert tr.connections[max(tr.connections)].streams[C2S].ooo_bytes > before
    check_bounded(tr)
    # closing gives everything back: the connections wait close_timeout for a join, then end
    feed([s.rst(0, True) for s in sessions])
    assert len(tr.connections) == 4
    check_bounded(tr)
    tr.expire(feed.ts + cfg.close_timeout)
    assert not tr.connections and tr.budget.used == 0
    check_bounded(tr)


def test_one_byte_segments_cannot_hold_many_times_the_memcap() -> None:
    """Each buffered piece costs ~100 bytes of bookkeeping beyond its payload: counted against the
    memcap, so 1-byte out-of-order segments stop at the cap in real memory, not at 100x it."""
    cfg = TrackerConfig(ooo_limit=64 * 1024 * 1024, memcap=1024 * 1024)
    tr = Tracker(cfg)
    feed = Feeder(tr)
    s = Session(1)
    feed(s.handshake())
    pk = [s.data(0, True, 2 + 2 * i, b"x", rel=3 + 2 * i) for i in range(20_000)]  # every other byte
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        feed(pk)
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    (conn,) = tr.connections.values()
    st = conn.streams[C2S]
    assert tr.stats.memcap["global"] > 0 and len(st._chunks) < cfg.memcap // PIECE_COST
    assert held < 1.5 * cfg.memcap, held  # payload + bookkeeping, as charged (uncharged: 2.2 MB here, and growing)
    check_bounded(tr)


def test_history_memcap_drops_the_least_recently_active_histories_first() -> None:
    """Released bytes kept for overlap checks are capped all together: each connection would keep
    up to 2 x history per direction, max_connections times over. Over history_memcap the least
    recently active connections lose theirs first; the busiest keeps comparing."""
    cfg = TrackerConfig(history=4096, history_memcap=4 * 8192)
    tr = Tracker(cfg)
    feed = Feeder(tr)
    sessions = [Session(1, sport=42000 + 100 * k, client_key=0x2000 + k, server_key=0xA000 + k) for k in range(8)]
    for s in sessions:
        feed(s.handshake())
    for s in sessions:  # 8 KiB each, in order: each C2S history holds 8 KiB (trimmed at 2 x 4096)
        feed([s.data(0, True, off, bytes([off // 1000]) * 1000) for off in range(0, 8000, 1000)])
        check_bounded(tr)
    feed([sessions[-1].ack(0, True, 0)])  # one more packet: the cap is enforced before each packet
    hist = [len(c.streams[C2S]._history) for c in tr.connections.values()]
    assert tr.history_budget.used == sum(hist) <= cfg.history_memcap and tr.stats.memcap["history"] > 0
    assert hist[0] == 0 and hist[-1] == 8000, hist  # the oldest went, the newest stayed
    check_bounded(tr)
    # a differing late copy: compared (and noticed) where the history is kept, counted where not
    ev = feed([sessions[-1].data(0, True, 0, b"X" * 1000, rel=1), sessions[0].data(0, True, 0, b"X" * 1000, rel=1)])
    assert [e.conn_id for e in ev if isinstance(e, Notice) and e.type == NoticeType.OVERLAP_MISMATCH] \
        == [max(tr.connections)]
    assert tr.connections[min(tr.connections)].streams[C2S].duplicate_bytes == 1000
    feed([s.rst(0, True) for s in sessions])
    tr.expire(feed.ts + tr.config.close_timeout)  # (no join within close_timeout: they end)
    assert tr.history_budget.used == 0


def _checksummed(memcap: int) -> tuple[Tracker, Feeder, Session]:
    """A tracker with that memcap, fed the handshake of a v0 connection with DSS checksums. Segments
    after holes in the subflow are read as they come (``subflow_order`` off): these tests are about
    the data level's buffers, and holes are the short way to fill them (test_subflow_order has the
    subflow's)."""
    tr = Tracker(TrackerConfig(memcap=memcap, subflow_order=False))
    feed = Feeder(tr)
    s = Session(0, csum=True, dsn64=False)
    feed(s.handshake())
    return tr, feed, s


def _first_mapping(s: Session, data: bytes) -> bytes:
    """The DSS option of one checksummed mapping of ``data`` from the stream's first byte."""
    return m.dss(s.idsn[1], s.idsn[0] & 0xFFFFFFFF, 1, len(data),
                 checksum=crypto.dss_checksum(s.idsn[0], 1, len(data), data), dsn64=False).encode()


def test_memcap_covers_unmapped_and_checksummed_bytes() -> None:
    """Unmapped bytes and a checksummed mapping being assembled are buffers too: counted in the
    budget, refused beyond it, given back when resolved, evicted or closed."""
    tr, feed, s = _checksummed(memcap=3000)
    # a checksummed mapping of 2000 bytes of which only the first 500 arrived: 2000 reserved
    full = os.urandom(2000)
    dss = _first_mapping(s, full)
    feed([s._pkt(s.subs[0], True, ACK, [dss], full[:500], rel=1)])
    assert tr.buffered_bytes() == (0, 0, 2000, 0) and tr.budget.used == 2000
    # unmapped bytes on the subflow (no DSS mapping yet): 800 more
    feed([s.data(0, True, 0, b"u" * 800, mapping=False, rel=3001)])
    assert tr.buffered_bytes() == (0, 800, 2000, 0) and tr.budget.used == 2800 + PIECE_COST  # one unmapped piece
    # a second checksummed mapping does not fit
    feed([s.data(0, True, 5000, b"c" * 100, map_len=1000, rel=6001)])
    assert tr.stats.memcap["global"] == 1 and tr.budget.used == 2800 + PIECE_COST
    # the first mapping completes: verified, released, its reservation given back
    ev = feed([s._pkt(s.subs[0], True, ACK, [dss], full[500:], rel=501)])
    assert b"".join(e.data for e in ev if isinstance(e, DataReleased)) == full
    assert tr.budget.used == 800 + PIECE_COST
    check_bounded(tr)
    # mappings evicted (a subflow direction keeps the newest 32) give their reservation back
    feed([s.data(0, True, 10000 + 100 * k, b"z" * 10, map_len=50, rel=20001 + 100 * k) for k in range(40)])
    assert tr.budget.used == 800 + PIECE_COST + 32 * 50
    check_bounded(tr)
    # the subflow's RST, after its last bytes (the end of the highest block the receiver holds out of
    # order: Linux takes an RST there, RFC 5961); the connection waits for a join, but what only a
    # subflow completes goes
    feed([s._pkt(s.subs[0], True, RST | ACK, [], rel=20001 + 100 * 39 + 10)])
    assert tr.budget.used == 0 and len(tr.connections) == 1
    check_bounded(tr)


def test_the_checksummed_mapping_a_stream_waits_for_gets_past_a_full_memcap() -> None:
    """Out-of-order bytes fill the memcap; the mapping at the hole must still be taken, or each
    resend of it is refused (dropped, with on_memcap = "drop") and the connection stalls for good.
    It may go past the cap by one mapping; nothing else may while it is there."""
    tr, feed, s = _checksummed(memcap=3000)
    later = os.urandom(2400)
    feed([s.data(0, True, 2000, later[:1200], rel=2001), s.data(0, True, 3200, later[1200:], rel=3201)])
    assert tr.buffered_bytes()[0] == 2400 and tr.budget.used == 2400 + 2 * PIECE_COST
    head = os.urandom(2000)
    dss = _first_mapping(s, head)
    feed([s._pkt(s.subs[0], True, ACK, [dss], head[:500], rel=1)])
    assert tr.stats.memcap["global"] == 0 and tr.budget.used == 4400 + 2 * PIECE_COST  # past the cap
    feed([s.data(0, True, 9000, b"c" * 100, rel=9001)])  # anything else is refused meanwhile
    assert tr.stats.memcap["global"] == 1
    ev = feed([s._pkt(s.subs[0], True, ACK, [dss], head[500:], rel=501)])
    assert b"".join(e.data for e in ev if isinstance(e, DataReleased)) == head + later
    assert tr.budget.used == 0
    check_bounded(tr)


def test_overlapping_segments_with_conflicting_bytes_are_read_as_linux_reads_them() -> None:
    """Policy (README, Semantics): bytes already released win; of copies still buffered, the one
    whose segment starts first wins, as in Linux's out-of-order queue; every copy that differs
    raises overlap_mismatch."""
    s = Session(1)
    feed = Feeder(Tracker())
    feed(s.handshake() + s.join(1))
    pk = [
        s.data(0, True, 0, b"AAAAAAAAAA"),  # [0,10) released
        s.data(1, True, 5, b"bbbbbbbbbb"),  # [5,15): [5,10) conflicts with released bytes, [10,15) new
        s.data(0, True, 30, b"CCCCCCCCCC"),  # [30,40) buffered out of order
        s.data(1, True, 35, b"dddddddddd"),  # [35,45): conflicts with the buffered bytes
        s.data(0, True, 25, b"eeeeeeeeee"),  # [25,35): starts first, so wins the buffered bytes at [30,35)
        s.data(1, True, 15, b"ffffffffff"),  # [15,25) fills the hole: everything is released
        s.data(0, True, 0, b"AAAAAAAAAA"),  # an identical retransmission: no notice
    ]
    ev = feed(pk) + feed.tracker.flush()
    got = streams(ev)[(1, C2S)]
    assert got == b"AAAAAAAAAA" + b"bbbbb" + b"ffffffffff" + b"eeeeeeeeee" + b"CCCCC" + b"ddddd"
    assert notices(ev).count(NoticeType.OVERLAP_MISMATCH) == 3
    details = [e.detail for e in ev if isinstance(e, Notice) and e.type == NoticeType.OVERLAP_MISMATCH]
    assert "already released" in details[0] and all("already released" not in d for d in details[1:])
    assert summaries(ev)[0]["c2s"]["duplicate_bytes"] == 5 + 5 + 5 + 10


# --------------------------------------------------------------------------- insertion
def test_off_window_segments_on_the_real_subflow_are_not_accepted() -> None:
    s = Session(1)
    feed = Feeder(Tracker())
    feed(s.handshake())
    feed([s.data(0, True, 0, b"real"), s.ack(0, False, s.idsn[0] + 4)])
    bad = [s.data(0, True, 4, b"EVIL", rel=5 + 10_000_000),  # far ahead of the window
           s.data(0, True, 4, b"EVIL", rel=(5 - 5_000_000) % 2**32),  # far behind
           s.data(0, True, 4, b"EVIL", rel=5 + 0x80000000)]  # half the sequence space away
    ev = feed(bad) + feed([s.data(0, True, 4, b"good")]) + feed.tracker.flush()
    assert streams(feed.events)[(1, C2S)] == b"realgood"
    assert NoticeType.OUT_OF_WINDOW in notices(ev) and feed.tracker.stats.out_of_window == 3
    assert not notices(ev).count(NoticeType.OVERLAP_MISMATCH)


def test_off_path_insertion_is_not_accepted() -> None:
    """An off-path attacker knows addresses and ports, not sequence numbers or DSNs (keyed by
    secrets). A spoofed ACK with a huge DATA_ACK must neither skip the stream forward (blinding the
    IDS) nor move the subflow window (so the real data would be refused); a spoofed data segment
    on a new 4-tuple with a guessed DSN must not join the victim's stream."""
    s = Session(1)
    tr = Tracker()
    feed = Feeder(tr)
    feed(s.handshake())
    feed([s.data(0, True, 0, b"hello"), s.ack(0, False, s.idsn[0] + 5)])
    sub = s.subs[0]
    spoofed = [build_tcp(sub.server[0], sub.client[0], sub.server[1], sub.client[1], seq, ack, ACK, 65535,
                         tcp_options(m.dss(data_ack).encode()))
               for seq, ack, data_ack in ((0x12345678, 0x9ABCDEF0, MASK64), (0x55555555, 0x1, s.idsn[0] + 10**9),
                                          (sub.isn[1] + 0x40000000, sub.isn[0] + 6, s.idsn[0] + 1000))]
    feed(spoofed)
    # a forged subflow: new 4-tuple, a DSS claiming the next bytes at a guessed DSN
    forged = build_tcp(s.addr(66, 1), sub.server[0], 50000, sub.server[1], 777, 1, ACK, 65535,
                       tcp_options(m.dss(1, 0x0123456789ABCDEF, 1, 4).encode()), b"EVIL")
    feed([forged])
    feed([s.data(0, True, 5, b" world"), s.data_fin(0, True, 11), s.data_fin(0, False, 0)])
    ev = feed.events + tr.flush()
    victim = [x for x in summaries(ev) if x["client_port"] == s.sport]
    assert victim and victim[0]["c2s"]["bytes"] == 11 and victim[0]["outcome"] == "data_fin"
    assert streams(ev)[(victim[0]["conn_id"], C2S)] == b"hello world"
    assert victim[0]["c2s"]["gaps"] == [] and NoticeType.SIDE_CHANNEL not in notices(ev)
    assert tr.stats.out_of_window >= 3  # the spoofed ACKs are counted


# --------------------------------------------------------------------------- DSN jumps and wraps
def test_huge_dsn_jump_does_not_allocate() -> None:
    s = Session(1)
    pipe = Pipeline()
    for p in s.handshake():
        pipe.feed_segment(seg(p, 1000.0))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        frames = []
        for off in (1 << 40, (1 << 63) - 5, (1 << 64) - (s.idsn[0] % (1 << 64)) - 100):
            frames += pipe.feed_segment(seg(s.data(0, True, off, b"X" * 1000), 1000.1))
        # the receiver acks 2**40 bytes nobody saw (a legitimate-looking side channel)
        frames += pipe.feed_segment(seg(s.ack(0, False, s.idsn[0] + (1 << 40) + 1000), 1000.2))
        frames += pipe.finish()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak
    for f in frames:
        check_frame(*f)
    (rec,) = [r for r in pipe.records if r["event"] == "mptcp_connection"]
    assert rec["c2s"]["gap_bytes"] >= 1 << 40


def _released(ev: list, cid: int = 1, d: Direction = C2S) -> bytes:
    return streams(ev).get((cid, d), b"")


@pytest.mark.parametrize("dsn64", [True, False])
def test_dsn_wraps_past_2_64(dsn64: bool) -> None:
    """A stream whose DSNs cross 2**64 (64-bit DSNs; IDSNs are random, and a peer can choose its key
    so its stream starts just below the wrap) and, with 32-bit DSNs on the wire, crosses the
    2**32 boundaries at the same time. Picked up mid-stream, so the stream starts where we say."""
    s = Session(1, dsn64=dsn64)
    s.handshake()
    s.join(1)
    start = MASK64 - 2999  # 3000 bytes before the 64-bit wrap
    off0 = (start - s.idsn[0]) & MASK64
    data = os.urandom(8000)
    pk = [s.data(i // 1000 % 2, True, off0 + i, data[i : i + 1000]) for i in range(0, 8000, 1000)]
    ack = m.dss((start + 8000) & (MASK64 if dsn64 else 0xFFFFFFFF), ack64=dsn64)  # the width the peer uses
    pk.append(s._pkt(s.subs[0], False, ACK, [ack.encode()]))
    pk.append(s.data_fin(0, True, off0 + 8000))
    ev = run(Tracker(), pk)
    assert _released(ev) == data
    (sm,) = summaries(ev)
    assert sm["pickup"] and sm["c2s"]["gaps"] == [] and sm["c2s"]["data_fin"]
    assert sm["c2s"]["acked_bytes"] == 8000 and not notices(ev)


def _key_with_idsn_low32_near_wrap(room: int = 1 << 20) -> int:
    """A client key whose IDSN's low 32 bits sit just below 2**32 (found in ~4k SHA-256 tries)."""
    from mproxy import crypto

    k = 1
    while (crypto.key_idsn(k, 1) + 1) & 0xFFFFFFFF < (1 << 32) - room:
        k += 1
    return k


def test_32_bit_dsn_wrap_from_the_handshake() -> None:
    k = _key_with_idsn_low32_near_wrap()
    s = Session(1, dsn64=False, client_key=k)
    left = (1 << 32) - (s.idsn[0] & 0xFFFFFFFF)  # bytes before the low 32 bits wrap
    data = os.urandom(left + 200_000)
    pk = s.handshake() + s.join(1)
    pk += [s.data(i // 1400 % 2, True, i, data[i : i + 1400]) for i in range(0, len(data), 1400)]
    pk += [s.data_fin(0, True, len(data)), s.data_fin(0, False, 0)]
    ev = run(Tracker(TrackerConfig(window_check=False)), pk)  # (no ACKs from the server: see above)
    assert _released(ev) == data
    assert summaries(ev)[0]["outcome"] == "data_fin"


# --------------------------------------------------------------------------- restart: pickup
def test_pickup_groups_subflows_before_any_byte_is_in_order() -> None:
    """After ``mproxy run`` restarts, the first segment seen on a subflow is usually in the middle
    of a mapping: its bytes wait for the subflow's sequence space to be anchored, so the picked-up
    stream has no position yet. The other subflow must still join it (by the peer's DATA_ACK),
    not become a second connection whose gaps are the first one's bytes (found live by
    tests/lab/test_failure_live.py)."""
    s = Session(1)
    s.handshake()
    s.join(1)
    tr = Tracker()
    ev = run(tr, [
        s.data(0, True, 5000, b"m" * 1000, rel=5001, map_rel=1, map_len=20000),  # mid-mapping: held
        s.ack(0, False, s.idsn[0] + 6000),  # the server's DATA_ACK: the only position known
        s.data(1, True, 8000, b"n" * 1000),  # the other subflow
    ], flush=False)
    (conn,) = tr.connections.values()
    assert conn.pickup and len(conn.subflows) == 2 and tr.stats.connections == 1
    assert not [e for e in ev if isinstance(e, Notice)]


def test_late_ack_after_linger_does_not_resurrect_a_connection() -> None:
    cfg = TrackerConfig(closed_linger=5.0)
    s = Session(1)
    tr = Tracker(cfg)
    feed = Feeder(tr)
    feed(s.handshake() + [s.data(0, True, 0, b"x"), s.data_fin(0, True, 1), s.data_fin(0, False, 0)])
    assert not tr.connections and tr.stats.outcomes["data_fin"] == 1
    feed.ts += 60  # entries of the closed connection are gone
    feed([s.ack(0, True, s.idsn[1] + 1), s.fin(0, False)])
    assert not tr.connections and tr.stats.connections == 1


# --------------------------------------------------------------------------- damaged captures
def test_truncated_final_packet_and_snaplen_cut_packets(tmp_path: Path) -> None:
    """Snaplen-cut packets (captured payload shorter than the IP length): the missing bytes are
    never invented -- they are a capture gap of exactly their length, and every byte after them is
    at its right place. A truncated last record is reported, not a crash."""
    s = Session(1)
    data = bytes(range(256)) * 40  # 10240 bytes
    pk = s.handshake() + s.join(1)
    pk += [s.data(i // 1024 % 2, True, i, data[i : i + 1024]) for i in range(0, len(data), 1024)]
    pk += [s.data_fin(0, True, len(data)), s.data_fin(0, False, 0)]
    cut = {6: 100, 9: 1}  # packet index (6: the first data packet) -> payload bytes captured (of 1024)
    buf = io.BytesIO()
    w = PcapWriter(buf, 101)
    for i, p in enumerate(pk):
        frame = p[: len(p) - 1024 + cut[i]] if i in cut else p
        w._f.write(struct.pack("<IIII", 1000 + i, 0, len(frame), len(p)) + frame)
    whole = buf.getvalue()
    cap = tmp_path / "cut.pcap"
    cap.write_bytes(whole + struct.pack("<IIII", 2000, 0, 500, 500) + b"\x45" * 100)  # truncated last record
    log = io.StringIO()
    res = replay([str(cap)], io.BytesIO(), log)
    assert any("truncated last packet" in p for p in res.problems)
    import json

    (rec,) = [json.loads(x) for x in log.getvalue().splitlines() if '"mptcp_connection"' in x]
    offsets = {(i - 6) * 1024: n for i, n in cut.items()}  # data offset of a cut segment -> bytes captured
    expected = b"".join(data[i : i + offsets.get(i, 1024)] for i in range(0, len(data), 1024))
    assert rec["c2s"]["gap_bytes"] == (1024 - 100) + (1024 - 1)
    assert [(g["length"], g["acked"]) for g in rec["c2s"]["gaps"]] == [(924, False), (1023, False)]
    assert rec["c2s"]["bytes"] == len(expected) and rec["c2s"]["sha256"] == hashlib.sha256(expected).hexdigest()
    assert res.pipeline.tracker.stats.notices["capture_gap"] == 2


# --------------------------------------------------------------------------- a million connections
def _replay_peak_rss(path: Path) -> tuple[int, float, str]:
    """Peak RSS (KiB) and seconds of ``mproxy replay`` over ``path``, in a fresh interpreter."""
    code = ("import resource, sys, time; from mproxy.cli import main; t = time.monotonic(); "
            f"rc = main(['replay', {str(path)!r}, '--out', '/dev/null', '-q']); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic() - t, rc)")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert cp.returncode == 0, cp.stderr
    rss, secs, rc = cp.stdout.split()
    return int(rss), float(secs), rc


def test_many_short_lived_connections_keep_rss_flat(tmp_path: Path) -> None:
    """Short-lived connections through ``replay``: peak RSS must not grow with their number (closed
    connections are reported and forgotten). CI compares 10k with 50k connections (~15 s); the
    100k vs 1M comparison is ``benchmarks/connections.py`` (figures in benchmarks/README.md)."""
    from tests.core.manyconns import write_capture

    small, large = tmp_path / "10k.pcap", tmp_path / "50k.pcap"
    write_capture(small, 10_000)
    write_capture(large, 50_000)
    rss_small, _t, rc = _replay_peak_rss(small)
    rss_large, secs, _rc = _replay_peak_rss(large)
    assert rc == "0"
    # flat: 5x the connections, < 10% (and < 8 MiB) more peak memory
    assert rss_large - rss_small < max(0.10 * rss_small, 8 * 1024), (rss_small, rss_large)
    assert secs < 120


# -- bytes a Linux receiver never reads ----------------------------------------------------------
def _insertion_case(kind: str) -> list[bytes]:
    """The client sends part 1 on the initial subflow; on the join, bytes for the next DSNs that
    the server never reads (in an RST, or after that subflow's FIN); then the real bytes for those
    DSNs on the initial subflow. Placing the unread ones first would show the IDS "BENIGN" where
    the server reads "UNION "."""
    from mproxy.wire.packet import FIN, RST

    s = Session(1)
    pk = s.handshake() + s.join(1)
    pk.append(s.data(0, True, 0, b"GET /?q="))
    sub = s.subs[1]
    if kind == "rst":
        opt = m.dss(s.idsn[1], s.idsn[0] + 8, sub.next_rel[0], 6)
        pk.append(s._pkt(sub, True, RST | ACK, [opt.encode()], b"BENIGN"))
    elif kind == "after_fin":
        pk.append(s._pkt(sub, True, FIN | ACK, []))
        sub.next_rel[0] += 1
        pk.append(s.data(1, True, 8, b"BENIGN"))
    else:  # straddling: one segment with its last bytes past the FIN
        pk.append(s.data(1, True, 8, b"UNI"))
        pk.append(s._pkt(sub, True, FIN | ACK, []))
        opt = m.dss(s.idsn[1], s.idsn[0] + 8, sub.next_rel[0] - 3, 9)
        pk.append(s._pkt(sub, True, ACK, [opt.encode()], b"UNIBENIGN", rel=sub.next_rel[0] - 3))
    pk.append(s.data(0, True, 8, b"UNION "))
    return pk


@pytest.mark.parametrize("kind", ["rst", "after_fin", "straddling"])
@pytest.mark.parametrize("fast", [True, False])
def test_bytes_the_receiver_never_reads_place_nothing(kind: str, fast: bool) -> None:
    t = Tracker()
    t.fast_path = fast
    ev = run(t, _insertion_case(kind))
    assert streams(ev)[(1, Direction.C2S)] == b"GET /?q=UNION "
    assert not [e for e in ev if isinstance(e, Notice) and e.type == NoticeType.OVERLAP_MISMATCH]


# -- PAWS (RFC 7323), as Linux applies it ------------------------------------------------------
def _ts(tsval: int, tsecr: int = 1) -> bytes:
    return timestamp_option(tsval, tsecr)


def _paws_session() -> tuple[Session, list[bytes]]:
    """A connection whose packets all carry timestamps (Linux's layout), 100 ms apart."""
    s = Session(1)
    syn, synack, ack = s.handshake()
    s.clock = 5000  # type: ignore[attr-defined]
    return s, [_with_ts(s, p) for p in (syn, synack, ack)]


def _with_ts(s: Session, pkt: bytes, tsval: int | None = None) -> bytes:
    """``pkt`` again with a timestamp option in front of its options (a fresh TSval unless given)."""
    from mproxy.wire.packet import option_spans

    seg0 = seg(pkt)
    if tsval is None:
        s.clock += 100  # type: ignore[attr-defined]
        tsval = s.clock  # type: ignore[attr-defined]
    area = memoryview(pkt)[seg0.tcp_off + 20 : seg0.tcp_off + seg0.hdr_len]
    spans = option_spans(area)
    assert isinstance(spans, list)
    opts = [bytes(area[o : o + ln]) for _k, o, ln in spans]
    return build_tcp(seg0.src, seg0.dst, seg0.sport, seg0.dport, seg0.seq, seg0.ack, seg0.flags, seg0.window,
                     tcp_options(_ts(tsval), *opts), bytes(seg0.payload))


@pytest.mark.parametrize("fast", [True, False])
def test_a_segment_with_a_stale_timestamp_places_nothing(fast: bool) -> None:
    """PAWS: Linux drops a data segment whose TSval is older, by more than one, than the last it
    kept; the same bytes with the real timestamp then fill those DSNs."""
    s, pk = _paws_session()
    pk.append(_with_ts(s, s.data(0, True, 0, b"GET /?q=")))
    pk.append(_with_ts(s, s.ack(0, False, s.idsn[0] + 8)))
    stale = s.data(0, True, 8, b"BENIGN", rel=9)
    pk.append(_with_ts(s, stale, tsval=s.clock - 1000))  # type: ignore[attr-defined]
    pk.append(_with_ts(s, s.data(0, True, 8, b"UNION ")))
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, Direction.C2S)] == b"GET /?q=UNION "
    _one_notice(ev, NoticeType.OUT_OF_WINDOW, "PAWS")


def test_paws_tolerates_one_tick_and_equal_timestamps() -> None:
    s, pk = _paws_session()
    pk.append(_with_ts(s, s.data(0, True, 0, b"abc")))
    pk.append(_with_ts(s, s.ack(0, False, s.idsn[0] + 3)))
    now = s.clock  # type: ignore[attr-defined]
    pk.append(_with_ts(s, s.data(0, True, 3, b"def"), tsval=now - 1))
    pk.append(_with_ts(s, s.data(0, True, 6, b"ghi"), tsval=now - 1))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, Direction.C2S)] == b"abcdefghi" and not [e for e in ev if isinstance(e, Notice)]


def test_an_old_duplicate_with_a_far_future_timestamp_cannot_blind_the_tracker() -> None:
    """Linux keeps no TSval from a segment that ends before the point it acknowledged (it fails
    the sequence check); if the tracker kept it, every later segment would look stale to it while
    the server took them."""
    s, pk = _paws_session()
    pk.append(_with_ts(s, s.data(0, True, 0, b"abc")))
    pk.append(_with_ts(s, s.ack(0, False, s.idsn[0] + 3)))
    pk.append(_with_ts(s, s.data(0, True, 0, b"ab", rel=1), tsval=0x7000_0000))  # an old copy
    pk.append(_with_ts(s, s.data(0, True, 3, b"UNION SELECT")))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, Direction.C2S)] == b"abcUNION SELECT"
    assert not [e for e in ev if isinstance(e, Notice)]


@pytest.mark.parametrize("fast", [True, False])
def test_a_dss_before_an_option_whose_length_lies_places_its_bytes(fast: bool) -> None:
    """Linux's option walk stops at an option whose length lies and acts on the options before it:
    a DSS so followed places its bytes (tests/lab/test_unread_bytes_lab.py), and the copy that
    comes later on the other subflow is the duplicate. Reading no option at all left those DSNs to
    the later copy: the IDS read UNION where the server read BENIGN, or the other way round."""
    s = Session(1)
    pk = s.handshake() + s.join(1)
    pk.append(s.data(0, True, 0, b"GET /?q="))
    pk.append(lying_tail(s.data(1, True, 8, b"BENIGN")))
    pk.append(s.data(0, True, 8, b"UNION SELECT"))
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=BENIGNSELECT"
    assert NoticeType.INVALID_OPTION in notices(ev) and t.stats.decode_errors["bad_option_length"] == 1


def test_an_mp_capable_before_an_option_whose_length_lies_opens_mptcp() -> None:
    """The kernel answers such a SYN with MP_CAPABLE (lab: test_gateway_live's lying-option test),
    so the connection is MPTCP and its join belongs to it."""
    s = Session(1)
    syn, synack, ack = s.handshake()
    pk = [lying_tail(syn), synack, lying_tail(ack)] + s.join(1)
    pk += [s.data(0, True, 0, b"GET /?q="), s.data(1, True, 8, b"UNION SELECT")]
    t = Tracker()
    ev = run(t, pk)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT"
    (summary,) = summaries(ev)
    assert len(summary["subflows"]) == 2


def _ack_session(**kw: Any) -> tuple[Session, list[bytes]]:
    """A join, ``GET /?q=`` from the client, and the server's reply of 100 bytes (acked)."""
    s = Session(1, **kw)
    pk = s.handshake() + s.join(1)
    pk.append(s.data(0, True, 0, b"GET /?q="))
    pk.append(s.data(0, False, 0, b"r" * 100))
    return s, pk


def _with_ack(pkt: bytes, ack: int, flags: int | None = None) -> bytes:
    s0 = seg(pkt)
    return build_tcp(s0.src, s0.dst, s0.sport, s0.dport, s0.seq, ack, s0.flags if flags is None else flags,
                     s0.window, bytes(s0.options), bytes(s0.payload))


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("shape", ["no_ack", "unsent", "too_old", "behind"])
def test_a_segment_whose_ack_the_receiver_refuses_places_nothing(fast: bool, shape: str) -> None:
    """Linux discards, whole, a segment without ACK and one whose ACK acknowledges data the receiver
    never sent or lies more than a window behind its last (tcp_ack; RFC 5961 5.2). The lab shows
    the server reading UNION after each such BENIGN (tests/lab/test_unread_bytes_lab.py)."""
    s, pk = _ack_session()
    forged = s.data(1, True, 8, b"BENIGN", rel=1)
    ack = seg(forged).ack
    forged = {"no_ack": _with_ack(forged, ack, flags=0x08),
              "unsent": _with_ack(forged, ack + 1_000_000),
              "too_old": _with_ack(forged, ack - 1_000_000),
              # the server sent nothing on the join: Linux bounds the look-back by the bytes acked, 0
              "behind": _with_ack(forged, ack - 1)}[shape]
    pk += [forged, s.data(1, True, 8, b"UNION SELECT", rel=1)]
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT"
    _one_notice(ev, NoticeType.OUT_OF_WINDOW, "discarded")


@pytest.mark.parametrize("fast", [True, False])
def test_acks_past_server_bytes_the_capture_lost_still_count(fast: bool) -> None:
    """A capture that lost the server's segments: the client's later segments acknowledge bytes the
    gateway never saw the server send. Within the window the client advertised, that is what a
    receiver may have sent, so they are taken (the server took them)."""
    s, pk = _ack_session()
    s.data(0, False, 100, b"s" * 30000)  # sent, not captured
    pk.append(s.data(0, True, 8, b"UNION SELECT"))
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT"
    assert not [e for e in ev if isinstance(e, Notice) and e.type == NoticeType.OUT_OF_WINDOW]


@pytest.mark.parametrize("fast", [True, False])
def test_an_ack_behind_by_less_than_the_bytes_acked_is_taken(fast: bool) -> None:
    """A segment overtaken on its way (its ACK a little behind the last) is read by Linux when the
    receiver has had at least that many bytes acknowledged and the peer's window allows it."""
    s, pk = _ack_session()  # the server sent 100 bytes on the initial subflow
    pk.append(s.ack(0, True, s.idsn[1] + 100))  # ... which the client acknowledges
    late = s.data(0, True, 8, b"UNION SELECT")
    pk.append(_with_ack(late, seg(late).ack - 50))
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT"
    assert not [e for e in ev if isinstance(e, Notice)]


@pytest.mark.parametrize("fast", [True, False])
def test_a_segment_starting_past_the_advertised_right_edge_places_nothing(fast: bool) -> None:
    """Linux drops a segment that starts past the right edge it last advertised (tcp_sequence), and
    data that starts at it (tcp_data_queue: over the window), even with a DSS mapping for the next
    DSNs (lab: past_window, at_edge). One inside a window the receiver has since opened wider is read."""
    s, pk = _ack_session()
    pk.append(s.ack(1, False, s.idsn[0] + 8))  # the server advertises 65535 bytes on the join
    forged = s.data(1, True, 8, b"BENIGN", rel=1 + 65535 + 1)
    pk += [forged, s.data(1, True, 8, b"UNION ", rel=1)]
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION "
    _one_notice(ev, NoticeType.OUT_OF_WINDOW, "right edge")
    s, pk = _ack_session()
    pk.append(s.ack(1, False, s.idsn[0] + 8))
    # at the edge exactly: the subflow drops it (over the window), unless its window grew in an ACK
    # still on its way: kept until the receiver acknowledges it, and none does: refused at the end
    pk += [s.data(1, True, 8 + 65535, b"X", rel=1 + 65535)]
    t, ev = _tracked(pk, fast)
    assert t.stats.out_of_window == 1 and t.stats.past_window_taken == 0
    _one_notice(ev, NoticeType.OUT_OF_WINDOW, "right edge at +65535: never acknowledged")
    # the same, then the receiver's DATA_ACK past it: it had the subflow bytes before it (unseen),
    # so it read it, and by then inside the connection-level window the DATA_ACK opened
    s, pk = _ack_session()
    pk.append(s.ack(1, False, s.idsn[0] + 8))
    pk += [s.data(1, True, 8 + 65535, b"X", rel=1 + 65535), s.ack(1, False, s.idsn[0] + 8 + 65536)]
    t, ev = _tracked(pk, fast)
    assert t.stats.out_of_window == 0 and t.stats.past_window_taken == 0
    assert streams(ev)[(1, C2S)].endswith(b"X")
    # in subflow order, past the connection-level window: kept, and taken at the DATA_ACK past it
    s, pk = _ack_session()
    pk.append(s.ack(1, False, s.idsn[0] + 8))
    pk += [s.data(1, True, 8 + 65535, b"X"), s.ack(1, False, s.idsn[0] + 8 + 65536)]
    t, ev = _tracked(pk, fast)
    assert t.stats.out_of_window == 0 and t.stats.past_window_taken == 1
    assert streams(ev)[(1, C2S)].endswith(b"X")


def _past_window(s: Session, pk: list[bytes], far: int) -> int:
    """The client's stream read in order up to ``far - 2000`` on the initial subflow, the server
    DATA_ACKing as it reads (window 65535: its connection-level edge trails by 2000 + 65535 bytes).
    Returns the offset reached."""
    pk.append(s.ack(1, False, s.idsn[0] + 8))  # DATA_ACK 8, window 65535
    off = 8
    while off < far - 2000:
        n = min(1400, far - 2000 - off)
        pk.append(s.data(0, True, off, bytes([97 + off % 26]) * n))
        off += n
        if off % 14_000 < 1400:
            pk.append(s.ack(0, False, s.idsn[0] + off))
    pk.append(s.ack(0, False, s.idsn[0] + off))
    return off


def _expected(far: int, end: int, tail: dict[int, bytes]) -> bytes:
    out = bytearray(b"GET /?q=")
    off = 8
    while off < far - 2000:
        n = min(1400, far - 2000 - off)
        out += bytes([97 + off % 26]) * n
        off += n
    out += bytes(end - off)
    for pos, b in tail.items():
        out[pos : pos + len(b)] = b
    return bytes(out)


@pytest.mark.parametrize("fast", [True, False])
def test_out_of_order_data_past_the_connection_level_window_is_read_only_once_data_acked(fast: bool) -> None:
    """Linux drops out-of-order data that ends past the connection-level window its receiver
    advertised (mptcp_data_queue_ofo, NoDSSInWindow), but the edge seen at the gateway lags the
    receiver's: such data waits for the receiver's DATA_ACK. Forged BBB far ahead, then the real
    bytes of those DSNs inside the window: the receiver reads those, and so does the IDS."""
    far = 8 + 70_000
    s, pk = _ack_session()
    pk.append(s.data(1, True, far, b"B" * 1200))  # out of order, past the edge: kept aside
    off = _past_window(s, pk, far)
    pk.append(s.data(0, True, far + 700, b"R" * 1400))  # out of order, inside the window now: read
    pk.append(s.data(0, True, off, bytes(far + 700 - off)))
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == _expected(far, far + 2100, {far + 700: b"R" * 1400})
    _one_notice(ev, NoticeType.OUT_OF_WINDOW, "other bytes")
    assert t.stats.past_window_taken == 0 and t.stats.out_of_window == 1


@pytest.mark.parametrize("fast", [True, False])
def test_data_past_the_connection_level_window_the_receiver_data_acks_is_read(fast: bool) -> None:
    """The same data past the gateway's edge, taken by the receiver (its edge was further on): read
    when its DATA_ACK comes, and not before -- the stream waits at it. An identical copy inside
    the window (a reinjection) in between changes nothing and raises nothing."""
    far = 8 + 70_000
    for reinject in (False, True):
        s, pk = _ack_session()
        pk.append(s.data(1, True, far, b"B" * 1200))
        off = _past_window(s, pk, far)
        pk.append(s.data(0, True, off, bytes(far - off)))  # in order up to it
        if reinject:
            pk.append(s.data(0, True, far + 200, b"B" * 1000))
        t = Tracker()
        t.fast_path = fast
        feed = Feeder(t)
        before = streams(feed(pk))[(1, C2S)]
        assert len(before) == far and t.stats.past_window_taken == 0  # waiting for the DATA_ACK
        ev = feed([s.ack(0, False, s.idsn[0] + far + 1200)]) + run(t, [])
        assert streams(ev)[(1, C2S)] == b"B" * 1200
        assert t.stats.past_window_taken == 1 and t.stats.out_of_window == 0
        assert not [e for e in feed.events + ev if isinstance(e, Notice)]
        assert t.budget.used == 0


def test_data_past_the_connection_level_window_is_kept_within_limits() -> None:
    """At most 256 pieces a connection are kept past the connection-level window (each later
    segment scans them); past that, data is placed at once, as any out-of-order data (refusing
    what the receiver took would lose it). The memcap counts what is kept."""
    far = 8 + 70_000
    s, pk = _ack_session()
    pk.append(s.ack(1, False, s.idsn[0] + 8))
    pk += [s.data(1, True, far + 2 * i, b"B") for i in range(300)]
    t = Tracker()
    ev = run(t, pk, flush=False)
    (conn,) = t.connections.values()
    assert conn.late == len(conn.beyond or ()) == MAX_LATE and t.stats.past_window_placed == 300 - MAX_LATE
    assert conn.streams[C2S].ooo_bytes == 300 - MAX_LATE
    assert t.budget.used == sum(t.buffered_bytes()) + PIECE_COST * 300  # 256 kept pieces, 44 chunks
    ev += t.flush()
    assert t.stats.out_of_window == MAX_LATE and t.budget.used == 0
    (n,) = [e for e in ev if isinstance(e, Notice) and e.type == NoticeType.OUT_OF_WINDOW]
    assert "connection-level window" in n.detail and "never acknowledged" in n.detail
    # a memcap too small for them: shed (inline, on_memcap = "drop" drops the packet)
    s, pk = _ack_session()
    pk.append(s.ack(1, False, s.idsn[0] + 8))
    pk.append(s.data(1, True, far, b"B" * 1000))
    t = Tracker(TrackerConfig(memcap=900))
    run(t, pk)
    assert t.stats.memcap["global"] == 1 and t.shed_bytes == 1000 and t.stats.out_of_window == 0


@pytest.mark.parametrize("fast", [True, False])
def test_data_past_the_connection_level_window_read_from_an_identical_copy_is_let_go(fast: bool) -> None:
    """Kept data past the connection-level window whose DSNs the stream then reads from an identical
    copy (a reinjection) is let go silently, DATA_ACK or not (lab: fast_open, whose client's last
    DATA_ACKs the capture did not hold): no refusal at the end, and the fast path comes back."""
    far = 8 + 70_000
    s, pk = _ack_session()
    pk.append(s.data(1, True, far, b"B" * 1200))
    off = _past_window(s, pk, far)
    pk.append(s.data(0, True, off, bytes(far - off) + b"B" * 1200))
    t = Tracker()
    t.fast_path = fast
    ev = run(t, pk, flush=False)
    (conn,) = t.connections.values()
    assert conn.beyond is None and conn.late == 0 and conn.streams[C2S].duplicate_bytes >= 1200
    ev += t.flush()
    assert streams(ev)[(1, C2S)].endswith(bytes(100) + b"B" * 1200)
    assert not [e for e in ev if isinstance(e, Notice)] and t.stats.out_of_window == 0


@pytest.mark.parametrize("fast", [True, False])
def test_past_the_edge_a_bare_segment_at_the_receivers_next_byte_is_read(fast: bool) -> None:
    """An MPTCP sender may send on a subflow past the right edge that subflow advertised: the
    connection-level window another subflow advertised allows it (Linux raises the subflow's send
    window, MPTCP_MIB_SNDWNDSHARED). Linux's tcp_sequence takes a segment starting at its next
    byte whatever the window: a bare one is read (a DATA_FIN there, seen in the lab's concurrent
    scenario), the data of one is dropped for the zero window. Past that byte, nothing is read."""
    s, pk = _ack_session()
    pk.append(s.ack(1, False, s.idsn[0] + 8))  # the server advertises 65535 bytes on the join
    off = 8
    for _ in range(47):  # the last starts inside the window and ends 265 bytes past its edge
        pk.append(s.data(1, True, off, b"x" * 1400))
        off += 1400
    nxt = s.subs[1].next_rel[0]
    pk.append(s.data(1, True, off, b"BENIGN", rel=nxt))  # data at the next byte: zero window, dropped
    pk.append(s._pkt(s.subs[1], True, ACK, [], rel=nxt + 1))  # bare, one byte further: not read
    pk.append(s.data_fin(1, True, off))  # bare, at the next byte: read
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=" + b"x" * 65800
    assert summaries(ev)[0]["c2s"]["data_fin"] is True
    # BENIGN is kept until the end (the receiver might have opened its window in an ACK still on its
    # way: see test_past_the_edge_data_the_receiver_acknowledges_is_read), never acknowledged, and
    # refused then (and noticed); the bare segment one byte past the next byte is refused at once,
    # counted but not noticed (see test_past_the_edge_a_bare_ack_is_ignored_without_a_notice)
    (n,) = [e for e in ev if isinstance(e, Notice)]
    assert n.type == NoticeType.OUT_OF_WINDOW and n.detail.startswith("6 bytes"), n
    assert t.stats.out_of_window == 2 and t.stats.past_edge_taken == 0


@pytest.mark.parametrize("fast", [True, False])
def test_past_the_edge_a_bare_ack_is_ignored_without_a_notice(fast: bool) -> None:
    """A sender's bare ACK after data it sent past the edge the gateway saw (lab: Fast Open through
    the tbf queue, 13.7 kB past it): the receiver, its window grown in an ACK still on its way,
    takes it. Its ACK fields are ignored here all the same (later packets carry newer ones), but
    it raised ``out_of_window`` (an insertion alert) for a packet that inserts nothing. Further
    than data may be kept (twice the largest window), or with a FIN, it is still noticed."""
    s, pk = _ack_session()
    off, nxt = _past_the_edge(s, pk)
    pk.append(s.data(1, True, off, b"UNION SELECT"))  # past the edge: kept
    pk.append(s._pkt(s.subs[1], True, ACK, [m.dss(s.idsn[1]).encode()], rel=nxt + 12))  # the bare ACK after it
    pk.append(s.ack(1, False, s.idsn[0] + off + 12))  # the receiver took both
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=" + b"x" * 65800 + b"UNION SELECT"
    assert not [e for e in ev if isinstance(e, Notice)]
    assert t.stats.out_of_window == 1 and t.stats.past_edge_taken == 1

    s, pk = _ack_session()
    off, nxt = _past_the_edge(s, pk)
    pk.append(s._pkt(s.subs[1], True, ACK, [], rel=nxt + 200_000))  # beyond what a sender's overshoot reaches
    t, ev = _tracked(pk, fast)
    (n,) = [e for e in ev if isinstance(e, Notice)]
    assert n.type == NoticeType.OUT_OF_WINDOW and n.detail.startswith("0 bytes"), n


@pytest.mark.parametrize("fast", [True, False])
def test_a_rsts_ack_and_window_move_no_edge(fast: bool) -> None:
    """Linux reads neither the ACK field nor the window of a RST: it resets the subflow when the RST
    is at the next expected byte, and answers one elsewhere in the window with a challenge ACK (RFC
    5961), both before the ACK is looked at. A RST from the server acknowledging 60 kB the client
    never sent moved the right edge the gateway keeps for the client's bytes that far, so a copy of
    the client's next DSNs sent past the real edge (the server drops it) was read."""
    s, pk = _ack_session()
    pk.append(s.ack(0, False, s.idsn[0] + 8))
    sub = s.subs[0]
    nxt = sub.next_rel[0]
    pk.append(s._pkt(sub, False, RST | ACK, [], rel=sub.next_rel[1] + 10, ack_rel=nxt + 60_000))
    pk.append(s.data(0, True, 8, b"UNION SELECT", rel=nxt + 65_535 + 1000))  # past the real edge
    pk.append(s.data(0, True, 8, b"0123456789ab"))
    pk += [s.data_fin(1, True, 20), s.data_fin(1, False, 100)]
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=0123456789ab"


def _with_window(pkt: bytes, win: int) -> bytes:
    s0 = seg(pkt)
    return build_tcp(s0.src, s0.dst, s0.sport, s0.dport, s0.seq, s0.ack, s0.flags, win, bytes(s0.options),
                     bytes(s0.payload))


def _edge_session(window: int) -> tuple[Session, list[bytes]]:
    """``GET /?q=`` on the initial subflow, then a join whose server offers ``window`` bytes (its
    right edge is relative sequence 1 + ``window``)."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    j = s.join(1)
    return s, pk + [j[0], _with_window(j[1], window), j[2], _server_ack(s, 1, 8, window)]


def _server_ack(s: Session, ack_rel: int, data_ack: int, window: int = 65535) -> bytes:
    """The server's ACK on the join of the client's subflow bytes up to ``ack_rel``."""
    return _with_window(s._pkt(s.subs[1], False, ACK, [m.dss(s.idsn[0] + data_ack).encode()], ack_rel=ack_rel),
                        window)


def _edge_end(s: Session, pk: list[bytes], end: int) -> list[bytes]:
    return pk + [s.ack(0, False, s.idsn[0] + end), s.data_fin(0, True, end), s.data_fin(0, False, 0)]


@pytest.mark.parametrize("fast", [True, False])
def test_data_at_the_right_edge_after_a_hole_is_not_read_when_the_hole_fills(fast: bool) -> None:
    """The evasion: BENIGN exactly at the right edge the join's receiver advertised, after a hole.
    Linux drops data that starts at the edge (tcp_data_queue: over the window); read as inside it,
    BENIGN was kept until the hole filled and then read, ahead of the real bytes at its place."""
    s, pk = _edge_session(10)
    pk.append(s.data(1, True, 18, b"BENIGN", rel=11))  # at the edge: relative 1 + 10
    pk.append(s.data(1, True, 8, b"0123456789", rel=1))  # fills the hole up to the edge
    pk.append(_server_ack(s, 11, 18))  # the receiver has up to the edge; its window opens
    pk.append(s.data(1, True, 18, b"UNION SELECT", rel=11))  # the real bytes there
    t, ev = _tracked(_edge_end(s, pk, 30), fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=0123456789UNION SELECT"
    assert t.stats.out_of_window == 1 and t.stats.past_edge_taken == 0


@pytest.mark.parametrize("fast", [True, False])
def test_a_fin_at_the_right_edge_after_a_hole_is_not_taken(fast: bool) -> None:
    """A bare FIN exactly at the edge, past the receiver's next byte: over the window, dropped
    (tcp_data_queue). Kept after the hole and taken when it filled, it made the bytes after it
    void; the server reads on. At the receiver's next byte a FIN is taken even at the edge."""
    s, pk = _edge_session(10)
    pk.append(s._pkt(s.subs[1], True, FIN | ACK, [], rel=11))  # at the edge, after a hole
    pk.append(s.data(1, True, 8, b"0123456789", rel=1))
    pk.append(_server_ack(s, 11, 18))
    pk.append(s.data(1, True, 18, b"UNION SELECT", rel=11))
    t, ev = _tracked(_edge_end(s, pk, 30), fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=0123456789UNION SELECT"
    s, pk = _edge_session(10)
    pk += [s.data(1, True, 8, b"0123456789", rel=1), s._pkt(s.subs[1], True, FIN | ACK, [], rel=11)]
    pk.append(s.data(1, True, 18, b"UNION SELECT", rel=11))  # after the FIN: void
    t, ev = _tracked(_edge_end(s, pk, 18), fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=0123456789"


@pytest.mark.parametrize("fast", [True, False])
def test_before_the_servers_first_ack_its_syn_ack_sets_the_window(fast: bool) -> None:
    """The SYN/ACK offers the window (unscaled) for the client's first bytes: BENIGN at its edge,
    before the server acknowledged anything, is dropped there as later (the right edge was unknown
    until the server's first ACK, so it was kept after the hole and read once the hole filled)."""
    s = Session(1)
    hs = s.handshake()
    pk = [hs[0], _with_window(hs[1], 10), hs[2]]
    pk.append(s.data(0, True, 10, b"BENIGN", rel=11))  # at the SYN/ACK's edge: relative 1 + 10
    pk.append(s.data(0, True, 0, b"0123456789", rel=1))
    pk.append(_with_window(s._pkt(s.subs[0], False, ACK, [m.dss(s.idsn[0] + 10).encode()], ack_rel=11), 65535))
    pk.append(s.data(0, True, 10, b"UNION SELECT", rel=11))
    pk.append(s._pkt(s.subs[0], False, ACK, [m.dss(s.idsn[0] + 22).encode()], ack_rel=23))
    pk += [s.data_fin(0, True, 22), s.data_fin(0, False, 0)]
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"0123456789UNION SELECT"


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("old", [0, 1])
def test_data_into_a_zero_window_is_not_read(fast: bool, old: int) -> None:
    """The receiver has filled its window (advertises 0): data at its next byte is dropped
    (tcp_data_queue: zero window), and so is a segment that starts ``old`` bytes before it and runs
    on past it, whole ("If window is closed, drop tail of packet"). BENIGN there, then the real
    bytes once the window opens: read as inside the window or as a partial copy, BENIGN came
    ahead of them."""
    head = b"9"[:old]

    def run_with(first: bytes, window: int, opens: bool) -> tuple[Tracker, list]:
        s, pk = _edge_session(10)
        pk += [s.data(1, True, 8, b"0123456789", rel=1), _server_ack(s, 11, 18, window=window)]
        pk.append(s.data(1, True, 18 - old, head + first, rel=11 - old))
        if opens:  # the window opens, the segment not acknowledged; the real bytes come
            pk += [_server_ack(s, 11, 18), s.data(1, True, 18, b"UNION SELECT", rel=11)]
        else:
            pk.append(_server_ack(s, 23, 30))
        return _tracked(_edge_end(s, pk, 30), fast)

    t, ev = run_with(b"BENIGN", 0, True)
    assert streams(ev)[(1, C2S)] == b"GET /?q=0123456789UNION SELECT" and t.stats.past_edge_taken == 0
    assert t.stats.out_of_window == 1
    # open, the same segment is read (its old byte a copy)
    t, ev = run_with(b"UNION SELECT", 100, False)
    assert streams(ev)[(1, C2S)] == b"GET /?q=0123456789UNION SELECT" and t.stats.past_edge_taken == 0
    # the control: acknowledged (its window had grown in an ACK the gateway had not seen), it is read
    t, ev = run_with(b"UNION SELECT", 0, False)
    assert streams(ev)[(1, C2S)] == b"GET /?q=0123456789UNION SELECT" and t.stats.past_edge_taken == 1


def _closed_join() -> tuple[Session, list[bytes], bytes]:
    """The join's server offers 100 bytes (to DSN offset 108); the initial subflow then carries 90
    of them and the join the last ten, and the server's ACK on the join closes its window: 0 at
    relative 11, though its furthest edge was relative 101 (an MPTCP subflow advertises the
    connection's window, relative to the DATA_ACK). Returns the session, its packets and the
    stream so far; the client's next bytes are DSN offset 108, the join's relative 11."""
    s, pk = _edge_session(100)
    pk.append(s.data(0, True, 8, b"x" * 90))
    pk.append(s.data(1, True, 98, b"0123456789", rel=1))
    pk.append(_server_ack(s, 11, 108, window=0))
    return s, pk, b"GET /?q=" + b"x" * 90 + b"0123456789"


@pytest.mark.parametrize("fast", [True, False])
def test_a_window_that_closed_behind_the_furthest_edge_takes_no_data(fast: bool) -> None:
    """The join's window closed behind the furthest edge it advertised (see ``_closed_join``; lab:
    6432 bytes at the join's handshake, 1312, then 0 at the byte the join reached). Linux reads its
    last window: BENIGN at that byte is dropped. By the furthest edge it was inside the window."""
    s, pk, head = _closed_join()
    pk.append(s.data(1, True, 108, b"BENIGN", rel=11))
    pk.append(_server_ack(s, 11, 108, window=100))  # it opens; BENIGN is not acknowledged
    pk.append(s.data(1, True, 108, b"UNION SELECT", rel=11))
    t, ev = _tracked(_edge_end(s, pk, 120), fast)
    assert streams(ev)[(1, C2S)] == head + b"UNION SELECT"
    assert t.stats.past_edge_taken == 0


@pytest.mark.parametrize("fast", [True, False])
def test_a_window_another_subflow_opened_takes_data_at_once(fast: bool) -> None:
    """The join's last window is 0, but the server's ACK on the initial subflow opened the
    connection's window (DATA_ACK plus window), and Linux takes data on the join then (lab: one
    byte, then a burst, on a join whose last window was 0). It is read as it comes, not kept."""
    s, pk, head = _closed_join()
    pk.append(s.ack(0, False, s.idsn[0] + 108))  # (window 65535 relative to the DATA_ACK)
    pk.append(s.data(1, True, 108, b"UNION SELECT", rel=11))
    t, ev = _tracked(_edge_end(s, pk, 120), fast)
    assert streams(ev)[(1, C2S)] == head + b"UNION SELECT"
    assert t.stats.past_edge_taken == 0 and t.stats.out_of_window == 0


@pytest.mark.parametrize("fast", [True, False])
def test_an_ack_inside_a_kept_segment_refuses_it(fast: bool) -> None:
    """BENIGN behind one old byte into the closed window, then one byte at the receiver's next one
    (the lab's MPTCP probe), both kept; the receiver acknowledges that byte only. It takes a
    segment whole, so it did not take the first: taken in the order they came, BENIGN was read."""
    s, pk, head = _closed_join()
    pk.append(s.data(1, True, 107, b"9BENIGN", rel=10))
    pk.append(s.data(1, True, 108, b"U", rel=11))  # (still closed for the gateway)
    pk.append(_server_ack(s, 12, 109))  # the byte of the second copy
    pk.append(s.data(1, True, 109, b"NION SELECT", rel=12))
    t, ev = _tracked(_edge_end(s, pk, 120), fast)
    assert streams(ev)[(1, C2S)] == head + b"UNION SELECT"
    assert t.stats.past_edge_taken == 1
    (n,) = [e for e in ev if isinstance(e, Notice)]
    assert "another copy" in n.detail and "closed" in n.detail


def _sacked_ack(s: Session, ack_rel: int, data_ack: int, block: tuple[int, int]) -> bytes:
    """The server's ACK on the join with one SACK block (join-relative client sequence numbers)."""
    isn = s.subs[1].isn[0]
    sack = sack_option((isn + block[0], isn + block[1]))
    return s._pkt(s.subs[1], False, ACK, [m.dss(s.idsn[0] + data_ack).encode(), sack], ack_rel=ack_rel)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("held", [False, True])
def test_a_kept_segment_after_a_hole_the_receiver_does_not_hold_is_refused(fast: bool, held: bool) -> None:
    """BENIGN ten bytes after the join's next byte into its closed window (Linux drops it: no SACK
    block for it follows), then -- the connection's window opened elsewhere -- the client's own
    bytes on the join, past the furthest edge the join advertised (its first window was small),
    kept too and taken by the receiver. One ACK covers both: read in the order they came, BENIGN
    was the IDS's copy. The ACK of the probe before them, with no SACK block, shows the receiver
    holds nothing out of order. The control: SACKed, BENIGN is held, and read."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    j = s.join(1)
    pk += [j[0], _with_window(j[1], 10), j[2], _server_ack(s, 1, 8, 10)]  # (the join's edge: relative 11)
    pk.append(s.data(1, True, 8, b"0123456789", rel=1))
    pk.append(_server_ack(s, 11, 18, window=0))
    first = b"ABCDEF" if held else b"BENIGN"  # (held: the client's own bytes there)
    pk.append(s.data(1, True, 28, first, rel=21))  # after a hole into the closed window
    pk.append(s.ack(0, False, s.idsn[0] + 18))  # the initial subflow's ACK opens the connection's window
    pk.append(s.data(1, True, 18, b"U", rel=11))  # the probe (past the join's edge: kept)
    rest = b"NION SELE" if held else b"NION SELECT pw"  # (kept too: the server's ACKs come after it)
    pk.append(s.data(1, True, 19, rest, rel=12))
    pk.append(_sacked_ack(s, 12, 19, (21, 27)) if held else _server_ack(s, 12, 19))  # (the probe's)
    end = 34 if held else 33
    pk.append(_server_ack(s, end - 7, end))
    t, ev = _tracked(_edge_end(s, pk, end), fast)
    want = b"GET /?q=0123456789U" + rest + (first if held else b"")
    assert streams(ev)[(1, C2S)] == want, streams(ev)


@pytest.mark.parametrize("fast", [True, False])
def test_a_kept_segment_acknowledged_segment_by_segment_is_read(fast: bool) -> None:
    """A GSO (or GRO) packet into the closed window, the window having opened in an ACK the gateway
    had not seen: the receiver gets (or sent) it as several segments and acknowledges them one by
    one. An ACK inside it is no other copy's: it is read once acknowledged whole."""
    s, pk, head = _closed_join()
    pk.append(s.data(1, True, 108, b"UNION SELECT", rel=11))
    pk += [_server_ack(s, 17, 114), _server_ack(s, 23, 120)]
    t, ev = _tracked(_edge_end(s, pk, 120), fast)
    assert streams(ev)[(1, C2S)] == head + b"UNION SELECT"
    assert t.stats.past_edge_taken == 1 and not [e for e in ev if isinstance(e, Notice)]


def _past_the_edge(s: Session, pk: list[bytes]) -> tuple[int, int]:
    """The server advertises 65535 bytes on the join; the client fills them (the last segment
    ends 265 bytes past the edge). Returns (data offset, subflow rel) of the next byte."""
    pk.append(s.ack(1, False, s.idsn[0] + 8))
    off = 8
    for _ in range(47):
        pk.append(s.data(1, True, off, b"x" * 1400))
        off += 1400
    return off, s.subs[1].next_rel[0]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("trigger", ["subflow_ack", "data_ack_elsewhere"])
def test_past_the_edge_data_the_receiver_acknowledges_is_read(fast: bool, trigger: str) -> None:
    """An MPTCP sender sends past the right edge a subflow advertised (Linux raises the subflow's
    send window to the connection-level one another subflow advertised), and the receiver takes
    the segment when its window has grown in an ACK that was still on its way (lab: fragments,
    where mproxy lost such bytes every few runs). The segment is kept until the receiver
    acknowledges it -- on its subflow, or by a DATA_ACK of its DSNs on another -- and read then."""
    s, pk = _ack_session()
    off, nxt = _past_the_edge(s, pk)
    pk.append(s.data(1, True, off, b"UNION SELECT"))  # starts past the edge the gateway saw
    pk.append(s.data(0, False, 100, b"r" * 10))  # the server's side goes on meanwhile
    if trigger == "subflow_ack":
        pk.append(s.ack(1, False, s.idsn[0] + off + 12))
    else:  # the DATA_ACK comes first on the initial subflow: the bytes are not a gap
        pk.append(s.ack(0, False, s.idsn[0] + off + 12))
    t = Tracker()
    t.fast_path = fast
    ev = run(t, pk, flush=False)
    assert t.buffered_bytes() == (0, 0, 0, 0) and t.budget.used == 0
    ev += t.flush()
    assert streams(ev)[(1, C2S)] == b"GET /?q=" + b"x" * 65800 + b"UNION SELECT"
    assert not [e for e in ev if isinstance(e, Notice)]
    assert t.stats.past_edge_taken == 1 and t.stats.out_of_window == 0
    assert summaries(ev)[0]["c2s"]["gap_bytes"] == 0


@pytest.mark.parametrize("fast", [True, False])
def test_past_the_edge_a_copy_superseded_by_an_in_window_one_is_not_read(fast: bool) -> None:
    """A copy past the edge that another copy of the same subflow bytes follows before the receiver
    acknowledged any: the receiver dropped the first (a sender resends only what went unacknowledged),
    so the IDS reads the second. Forged BENIGN past the edge, the real UNION after the window opened."""
    s, pk = _ack_session()
    off, nxt = _past_the_edge(s, pk)
    pk.append(s.data(1, True, off, b"BENIGN", rel=nxt))  # kept
    pk.append(s.ack(1, False, s.idsn[0] + off))  # the receiver's ack reaches the kept copy's start, no further
    pk.append(s.data(1, True, off, b"UNION "))  # in the window now: the receiver reads this one
    pk.append(s.ack(1, False, s.idsn[0] + off + 6))
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=" + b"x" * 65800 + b"UNION "
    _one_notice(ev, NoticeType.OUT_OF_WINDOW, "another copy of its subflow bytes came before the receiver")
    assert t.stats.past_edge_taken == 0 and t.stats.out_of_window == 1


@pytest.mark.parametrize("fast", [True, False])
def test_past_the_edge_a_data_ack_takes_a_kept_copy_only_for_a_hole(fast: bool) -> None:
    """A DATA_ACK on another subflow takes a kept copy only where the stream has no other copy of its
    DSNs: else the receiver may have read that other one, which came inside its window. Forged
    XXXXXX past the edge, mapped over SELECT that came out of order on the initial subflow."""
    s, pk = _ack_session()
    off, nxt = _past_the_edge(s, pk)
    pk.append(s.data(0, True, off + 6, b"SELECT"))  # out of order: UNION before it is still to come
    pk.append(s.data(1, True, off + 6, b"XXXXXX"))  # past the edge, the same DSNs
    pk.append(s.ack(0, False, s.idsn[0] + off + 12))  # the receiver has it all (UNION went unseen)
    t, ev = _tracked(pk, fast)
    got = streams(ev)[(1, C2S)]
    assert got.endswith(b"SELECT") and b"XXXXXX" not in got
    assert t.stats.past_edge_taken == 0 and t.stats.out_of_window == 1


def test_past_the_edge_keeping_is_bounded_and_accounted() -> None:
    """Kept segments hold whole packets under the memcap, and at most twice the receiver's largest
    window per subflow direction; past that they are refused at once. A subflow that goes gives
    every byte back."""
    s, pk = _ack_session()
    off, nxt = _past_the_edge(s, pk)
    rel = nxt
    for _ in range(120):  # 168,000 bytes past the edge, never acknowledged
        pk.append(s.data(1, True, off, b"y" * 1400, rel=rel))
        off += 1400
        rel += 1400
    big = pk
    t = Tracker()
    ev = run(t, pk, flush=False)
    past = t.buffered_bytes()[3]
    kept = sum(len(sd.late or ()) for sf in t.connections[1].subflows for sd in sf.dirs)
    assert 30 < kept < 120 and past <= 2 * 65535 + kept * 100  # (whole packets: headers too)
    assert t.budget.used == past + kept * PIECE_COST, (past, t.budget.used)
    assert t.stats.out_of_window == 120 - kept
    check_bounded(t)
    ev += t.flush()
    assert t.budget.used == 0 and t.stats.out_of_window == 120 and t.stats.past_edge_taken == 0
    assert streams(ev)[(1, C2S)] == b"GET /?q=" + b"x" * 65800
    # at most _MAX_LATE of them, however small
    s, pk = _ack_session()
    off, nxt = _past_the_edge(s, pk)
    pk += [s.data(1, True, off + i, b"z", rel=nxt + i) for i in range(300)]
    t = Tracker()
    run(t, pk, flush=False)
    assert len(t.connections[1].subflows[1].dirs[0].late or ()) == MAX_LATE and t.stats.out_of_window == 300 - MAX_LATE
    # under a small memcap, what it refuses is shed like any bytes it keeps out (inline, with
    # on_memcap = "drop", their packets are dropped for the sender to send again)
    t = Tracker(TrackerConfig(memcap=4 * 1600))
    run(t, big, flush=False)
    assert t.shed_bytes and t.stats.memcap["global"] and t.budget.used <= 4 * 1600
    check_bounded(t)


@pytest.mark.parametrize("fast", [True, False])
def test_a_segment_signed_with_tcp_md5_places_nothing(fast: bool) -> None:
    """Linux drops a segment carrying a TCP-MD5 signature when it holds no key for the peer, which
    an MPTCP socket never does (lab: tcp_md5, the server read UNION after such a BENIGN)."""
    s, pk = _ack_session(ack64=False, dsn64=False)  # 32-bit DSNs: room for the 18-byte option
    forged = seg(s.data(1, True, 8, b"BENIGN", rel=1))
    md5 = bytes([19, 18]) + bytes(16)
    pk.append(build_tcp(forged.src, forged.dst, forged.sport, forged.dport, forged.seq, forged.ack, forged.flags,
                        forged.window, bytes(forged.options) + md5, b"BENIGN"))
    pk.append(s.data(1, True, 8, b"UNION SELECT", rel=1))
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT"
    _one_notice(ev, NoticeType.OUT_OF_WINDOW, "TCP-MD5")
    # nor does an MP_CAPABLE SYN so signed open a connection
    s2 = Session(1, sport=42001)
    syn = seg(s2.handshake()[0])
    t2 = Tracker()
    ev2 = t2.process(seg(build_tcp(syn.src, syn.dst, syn.sport, syn.dport, syn.seq, 0, syn.flags, syn.window,
                                   bytes(syn.options) + md5)))
    assert not t2.connections and "TCP-MD5" in ev2[0].detail


@pytest.mark.parametrize("fast", [True, False])
def test_a_syn_on_an_established_subflow_ends_nothing(fast: bool) -> None:
    """Linux discards a SYN on an established socket (a challenge ACK answers it), so the subflow
    goes on: a forged one (another ISN, an MP_JOIN naming the connection) must not make mproxy
    drop the subflow and lose what the client sends on it next (lab: syn_established)."""
    s, pk = _ack_session()
    old = seg(s.data(1, True, 8, b"x", rel=1))
    join_syn = seg(s.join(1)[0])
    pk.append(build_tcp(old.src, old.dst, old.sport, old.dport, 0x12345678, 0, SYN, 65535,
                        bytes(join_syn.options)))
    pk.append(s.data(1, True, 8, b"UNION SELECT", rel=1))
    t, ev = _tracked(pk, fast)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT"
    _one_notice(ev, NoticeType.OUT_OF_WINDOW, "challenge ACK")


def test_a_reused_four_tuple_whose_end_went_unseen_starts_a_new_connection() -> None:
    """When the old connection's end was not seen (a lossy capture), the peer answering the new SYN
    with a SYN/ACK that acknowledges it shows the 4-tuple was free: a new connection starts."""
    t = Tracker()
    first = Session(1)
    ev = run(t, first.handshake() + [first.data(0, True, 0, b"one")], flush=False)
    second = Session(1, client_key=0x0102030405060708, server_key=0x1112131415161718)
    second._isn = 777_000  # same 4-tuple, new ISNs and keys; the first one's end never captured
    for p in second.handshake() + [second.data(0, True, 0, b"two")]:
        ev += t.process(seg(p, 1005.0))
    ev += t.flush()
    closed = [e.summary for e in ev if isinstance(e, ConnectionClosedSummary)]
    assert sorted(c["c2s"]["bytes"] for c in closed) == [3, 3] and len(closed) == 2
    assert streams(ev)[(2, C2S)] == b"two"


@pytest.mark.parametrize("fast", [True, False])
def test_an_mp_fastclose_with_a_key_not_the_receivers_ends_nothing(fast: bool) -> None:
    """Linux takes an MP_FASTCLOSE only when it names the receiver's own key; with another one the
    server reads on (lab: fastclose_bad_key), so the rebuilt stream must go on too. With the
    server's key the connection ends."""
    for key, want, outcome in ((0x0123456789ABCDEF, b"GET /?q=UNION SELECT", "end_of_input"),
                               (None, b"GET /?q=", "fastclose")):
        s, pk = _ack_session()
        pk.append(s._pkt(s.subs[1], True, ACK, [m.MpFastclose(s.sk if key is None else key).encode()]))
        pk.append(s.data(0, True, 8, b"UNION SELECT"))
        t, ev = _tracked(pk, fast)
        assert streams(ev)[(1, C2S)] == want
        assert summaries(ev)[0]["outcome"] == outcome
        if key is not None:
            _one_notice(ev, NoticeType.INVALID_OPTION, "MP_FASTCLOSE")


# -- lookups anyone can trigger stay off the connection table ---------------------------------------
class _NoWalk(OrderedDict):  # type: ignore[type-arg]
    """A connection table whose walks (newest first, as the lookups walk it) fail the test."""

    def values(self):  # type: ignore[no-untyped-def, override]
        vals = super().values()

        class _Values:
            def __iter__(self):  # type: ignore[no-untyped-def]
                return iter(vals)

            def __len__(self) -> int:
                return len(vals)

            def __reversed__(self):  # type: ignore[no-untyped-def]
                raise AssertionError("a walk over the connection table")

        return _Values()


def _announce(s: Session, addr_id: int, addr: bytes) -> bytes:
    sub = s.subs[0]
    return s._pkt(sub, False, ACK, [m.AddAddr(1, addr_id, addr, None, False, 0).encode(),
                                    m.dss(s.idsn[0]).encode()])


def test_a_join_with_an_unknown_token_goes_by_address_index_to_the_latest_announcer() -> None:
    """An MP_JOIN whose token mproxy does not know (it missed the handshake, or the token is made up)
    is grouped by the address it goes to. That used to be a walk over every live connection per join
    SYN: 38 ms with 50,000 connections, so a few dozen made-up joins a second took a core. Now an
    index: the join goes to the live connection that announced the address last."""
    x = bytes((198, 18, 77, 7))
    tr = Tracker()
    tr.connections = _NoWalk()
    ss = [Session(1, client_key=0x1000 + i, server_key=0x2000 + i, sport=41000 + 100 * i) for i in range(3)]
    pk = [p for s in ss for p in s.handshake()]
    pk += [_announce(ss[0], 5, x), _announce(ss[2], 5, x), _announce(ss[1], 6, bytes((198, 18, 77, 8)))]
    ev = run(tr, pk, flush=False)
    conns = {c.client[1]: c for c in tr.connections.values()}
    a, b, c = (conns[s.sport] for s in ss)

    def join_to_x(s: Session) -> list:
        return run(tr, s.join(1, token=0x0BADBAD0, server=x)[:1], flush=False)

    ev = join_to_x(ss[1])
    assert [len(k.subflows) for k in (a, b, c)] == [1, 1, 2]  # the last to announce it
    run(tr, [_announce(ss[0], 5, x)], flush=False)  # announced again (Linux repeats until echoed)
    join_to_x(ss[1])
    assert [len(k.subflows) for k in (a, b, c)] == [2, 1, 2]
    t0, idle = tr.now, tr.config.idle_timeout  # a and b go idle; c is still talking
    tr.process(seg(ss[2].ack(0, False, ss[2].idsn[0]), t0 + idle - 1))
    tr.expire(t0 + idle + 0.5)
    assert a.closed is not None and c.closed is None
    sub = ss[2].subs[0]
    run(tr, [ss[2]._pkt(sub, False, ACK, [m.RemoveAddr((5,)).encode(), m.dss(ss[2].idsn[0]).encode()])],
        flush=False)
    ev = join_to_x(ss[1])
    assert NoticeType.JOIN_UNKNOWN_TOKEN in notices(ev)  # nobody announces x any more
    assert not tr._announcers.get((x, None))
    check_bounded(tr)


def test_connections_sharing_a_token_stay_bounded() -> None:
    """A host's stack keeps its tokens unique; an endpoint re-using its key on every connection made each
    new one cost a comparison with every earlier one (Connection compared by value: 46 ms per new
    connection after 20,000). One token now finds its first 16 live connections; later ones are counted,
    and a join with the token still goes to the oldest that owns the join's address, as before."""
    from mproxy.core.tracker import _TOKEN_SHARERS

    tr = Tracker()
    ss = [Session(1, sport=20000 + 10 * i) for i in range(40)]
    run(tr, [p for s in ss for p in s.handshake()], flush=False)
    assert len(tr.connections) == 40
    tok = crypto.key_token(ss[0].sk, 1)
    assert len(tr._tokens[tok]) == _TOKEN_SHARERS
    assert tr.stats.memcap["token_sharers"] == 2 * (40 - _TOKEN_SHARERS)  # the client's token and the server's
    assert list(tr._tokens[tok]) == sorted(c.id for c in tr.connections.values())[:_TOKEN_SHARERS]
    ev = run(tr, ss[-1].join(1), flush=False)
    assert NoticeType.JOIN_UNKNOWN_TOKEN not in notices(ev)
    oldest = min(tr.connections.values(), key=lambda c: c.id)
    assert [len(c.subflows) for c in tr.connections.values()] == [2 if c is oldest else 1
                                                                  for c in tr.connections.values()]
    check_bounded(tr)


def _stray(tr: Tracker, i: int, ts: float, *, wide: bool) -> list:
    """A DSS segment with a made-up DSN from a new 4-tuple: to the tracker, a subflow picked up mid-stream."""
    dsn = ((i + 1) * 0x9E3779B97F4A7C15) & (MASK64 if wide else 0xFFFFFFFF)
    p = build_tcp(bytes((198, 18, 123, 1)), bytes((198, 18, 9, 2)), 50000 + i, 80, 7 + i, 9, ACK, 502,
                  tcp_options(m.dss(None, dsn, 1, 4, dsn64=wide).encode()), b"abcd")
    return tr.process(seg(p, ts))


def _open_sessions(tr: Tracker, n: int) -> list[Session]:
    ss = [Session(1, client_key=0x3000 + i, server_key=0x4000 + i, sport=30000 + 10 * i) for i in range(n)]
    run(tr, [p for s in ss for p in s.handshake()], flush=False)
    return ss


def _picked_up(tr: Tracker, s: Session, ts: float) -> Any:
    """A real further subflow of ``s``'s connection, first seen mid-stream; returns that connection."""
    s.join(1)
    tr.process(seg(s.data(1, True, 0, b"GET /"), ts))
    return next(c for c in tr.connections.values() if c.client[1] == s.sport)


def test_mid_stream_subflows_with_64_bit_values_are_matched_through_an_index(monkeypatch: pytest.MonkeyPatch
                                                                           ) -> None:
    """A subflow first seen mid-stream is matched to a connection by DSN proximity. That was a walk over
    every live connection per segment (74 ms with 50,000 of them; any host can send such segments from
    new 4-tuples). With 64-bit values (Linux sends them) an index of the streams' positions finds the
    candidates, kept exact by re-indexing the connections that had packets since the last lookup."""
    import mproxy.core.tracker as tracker_mod

    monkeypatch.setattr(tracker_mod, "_SCAN_RATE", 40)
    tr = Tracker(TrackerConfig(max_connections=400))
    ss = _open_sessions(tr, 30)
    t0 = tr.now
    for i in range(100):  # each would have walked the whole table, and spent the budget at once
        _stray(tr, i, t0, wide=True)
    assert tr.stats.memcap["pickup_walk"] == 0
    # streams moved since they were indexed: the first connection's stream 100 MB on (one packet)
    s = ss[0]
    far = 100 << 20
    tr.process(seg(s.data(0, True, 0, b"x", map_len=1), t0))
    st = next(c for c in tr.connections.values() if c.client[1] == s.sport).streams[0]
    st.base = (st.base or 0) + far  # (as after 100 MB in order, without sending them)
    s.join(1)
    tr.process(seg(s.data(1, True, far + 1, b"GET /"), t0))
    first = next(c for c in tr.connections.values() if c.client[1] == s.sport)
    assert len(first.subflows) == 2 and tr.stats.memcap["pickup_walk"] == 0
    check_bounded(tr)


def test_walks_for_mid_stream_subflows_with_32_bit_values_have_a_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a 32-bit value the match needs a walk over the live connections; the walks together look at a
    bounded number of connections per second of packet time. Past it a mid-stream subflow starts its
    own connection, counted as the limit ``pickup_walk``."""
    import mproxy.core.tracker as tracker_mod

    monkeypatch.setattr(tracker_mod, "_SCAN_RATE", 40)
    tr = Tracker(TrackerConfig(max_connections=40))
    ss = _open_sessions(tr, 30)
    t0 = tr.now
    _stray(tr, 0, t0, wide=False)  # walks all 30
    assert tr.stats.memcap["pickup_walk"] == 0
    _stray(tr, 1, t0, wide=False)  # 10 left, 31 to walk
    _stray(tr, 2, t0, wide=False)
    assert tr.stats.memcap["pickup_walk"] == 2
    # a real subflow of the first connection picked up mid-stream, a second later: walked again
    first = _picked_up(tr, ss[0], t0 + 1.0)
    assert len(first.subflows) == 2 and tr.stats.memcap["pickup_walk"] == 2  # (its bytes wait for the server's ACK)
    check_bounded(tr)
