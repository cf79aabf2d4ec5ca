"""Gateway verdicts from packets built by our encoder (sans-I/O; the live tests run it on NFQUEUE)."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from mproxy.core.gateway import Gateway, Verdict
from mproxy.core.policy import Action, OnMemcap, Policy, Rule, UntrustedJoin
from mproxy.core.reassembler import PIECE_COST, SLACK
from mproxy.core.tracker import _OFO_COST, TrackerConfig
from mproxy.wire import mptcp as m
from mproxy.wire.packet import TcpSegment, mptcp_spans, parse_ip, read_mptcp_spans
from mproxy.wire.checksum import tcp_checksum

from .session import Session, lying_tail

# the memcap tests' crafted senders ignore windows, so the window clamp is off: it would only make
# ACCEPT verdicts ACCEPT_MODIFIED (tests/core/test_window_clamp.py has it)
_UNCLAMPED = Policy(clamp_window=False)


def verdicts(gw: Gateway, packets: list[bytes]) -> list[Verdict]:
    return [gw.packet(p, 1000.0 + i / 1000).verdict for i, p in enumerate(packets)]


def test_inspect_accepts_and_emits() -> None:
    s = Session(1)
    gw = Gateway()
    pk = s.handshake() + s.join(1) + [s.data(0, True, 0, b"GET / HTTP/1.0\r\n\r\n")]
    ds = [gw.packet(p, 1000.0) for p in pk]
    assert all(d.verdict == Verdict.ACCEPT for d in ds)
    assert sum(len(d.frames) for d in ds) >= 4  # handshake + data + ack of the emitted stream


def test_downgrade_strips_mp_capable_with_valid_checksum() -> None:
    s = Session(1)
    gw = Gateway(Policy(default=Action.DOWNGRADE))
    syn = s.handshake()[0]
    d = gw.packet(syn, 1000.0)
    assert d.verdict == Verdict.ACCEPT_MODIFIED and d.payload is not None
    seg = parse_ip(memoryview(d.payload))
    assert isinstance(seg, TcpSegment) and mptcp_spans(seg) == []
    assert tcp_checksum(seg.src, seg.dst, seg.ip[seg.tcp_off:]) == 0
    assert gw.stats.actions["downgrade"] == 1


def test_policy_reads_the_options_before_one_whose_length_lies() -> None:
    """The server's kernel acts on an MP_CAPABLE or MP_JOIN followed by an option whose length lies
    (its walk stops there): downgrade blanks that MP_CAPABLE, block-joins drops that join."""
    s = Session(1)
    gw = Gateway(Policy(default=Action.DOWNGRADE))
    d = gw.packet(lying_tail(s.handshake()[0]), 1000.0)
    assert d.verdict == Verdict.ACCEPT_MODIFIED and d.payload is not None
    seg = parse_ip(memoryview(d.payload))
    assert isinstance(seg, TcpSegment) and read_mptcp_spans(seg)[0] == []
    assert tcp_checksum(seg.src, seg.dst, seg.ip[seg.tcp_off:]) == 0
    s = Session(1)
    gw = Gateway(Policy(default=Action.BLOCK_JOINS))
    pk = s.handshake() + s.join(1)[:1]
    assert verdicts(gw, pk[:3] + [lying_tail(pk[3])]) == [Verdict.ACCEPT] * 3 + [Verdict.DROP]


def test_downgraded_gso_packets_reach_the_sink_as_segments() -> None:
    """Live (split_passthrough): a 20 KB packet of a downgraded connection leaves as <= 1460-byte segments."""
    s = Session(1)
    syn, synack, ack = s.handshake()
    big = s.data(0, True, 0, b"q" * 20000, mapping=False)
    for split, sizes in ((False, [20000]), (True, [1460] * 13 + [1020])):
        gw = Gateway(Policy(default=Action.DOWNGRADE), split_passthrough=split)
        gw.packet(syn, 1000.0)
        d = gw.packet(big, 1000.1)
        segs = [parse_ip(memoryview(f[14:])) for _, f in d.frames]
        assert [x.payload_len for x in segs if isinstance(x, TcpSegment)] == sizes
        if split:
            assert all(tcp_checksum(x.src, x.dst, x.ip[x.tcp_off:]) == 0 for x in segs if isinstance(x, TcpSegment))


def test_block_joins_drops_join_syn_only() -> None:
    s = Session(1)
    gw = Gateway(Policy(default=Action.BLOCK_JOINS))
    v = verdicts(gw, s.handshake() + s.join(1)[:1])
    assert v == [Verdict.ACCEPT] * 3 + [Verdict.DROP]


def test_verify_joins_drops_unknown_token_and_bad_hmac() -> None:
    s = Session(1)
    gw = Gateway(Policy(rules=(Rule(Action.VERIFY_JOINS),)))
    assert verdicts(gw, s.handshake()) == [Verdict.ACCEPT] * 3
    assert verdicts(gw, s.join(1, token=0x0BADC0DE)[:1]) == [Verdict.DROP]
    assert verdicts(gw, s.join(2, bad_hmac=True)) == [Verdict.ACCEPT, Verdict.ACCEPT, Verdict.DROP]
    assert verdicts(gw, s.join(3)) == [Verdict.ACCEPT] * 3
    assert gw.stats.actions["join_refused"] == 2


def test_untrusted_join_refused() -> None:
    import ipaddress

    s = Session(1)
    trusted = (ipaddress.ip_network("198.18.1.0/24"), ipaddress.ip_network("198.18.9.0/24"))
    gw = Gateway(Policy(trusted=trusted, untrusted_join=UntrustedJoin.REFUSE))
    assert verdicts(gw, s.handshake()) == [Verdict.ACCEPT] * 3
    assert verdicts(gw, s.join(4)[:1]) == [Verdict.DROP]  # 198.18.5.x is outside


def test_allow_leaves_connection_and_its_joins_alone() -> None:
    s = Session(1)
    gw = Gateway(Policy(default=Action.ALLOW, rules=(Rule(Action.VERIFY_JOINS, ports=frozenset({1})),)))
    ds = [gw.packet(p, 1000.0) for p in s.handshake() + s.join(1) + [s.data(1, True, 0, b"x")]]
    assert all(d.verdict == Verdict.ACCEPT and not d.frames for d in ds)
    assert not gw.tracker.connections


def test_core_survives_garbage() -> None:
    gw = Gateway()
    for junk in (b"", b"\x45", b"\x60" + b"\0" * 10, bytes(range(256)) * 3):
        assert gw.packet(junk, 1.0).verdict == Verdict.ACCEPT
    cap = m.MpCapable(1, 1).encode()
    assert cap


def _memcap_run(policy: Policy, resend: bool, server_acks: bool = False) -> tuple[Gateway, list[str], bytes, dict]:
    """One connection whose first 1000 bytes come last, through a gateway that buffers 4000
    out-of-order bytes: what is shed, and what the emitted stream ends up holding."""
    s = Session(1)
    gw = Gateway(replace(policy, clamp_window=False), TrackerConfig(ooo_limit=4000))
    data = os.urandom(12000)
    verdicts(gw, s.handshake())
    pkts = {off: s.data(0, True, off, data[off : off + 1000], rel=1 + off) for off in range(0, len(data), 1000)}
    reasons = []
    for off in range(1000, len(data), 1000):
        d = gw.packet(pkts[off], 1001.0 + off / 1e6)
        reasons.append(d.reason if d.verdict == Verdict.DROP else d.verdict.value)
    assert gw.packet(pkts[0], 1002.0).verdict == Verdict.ACCEPT
    if resend:  # what the sender does with dropped packets: send them again
        for off, why in zip(range(1000, len(data), 1000), reasons):
            if why == "memcap":
                assert gw.packet(pkts[off], 1003.0 + off / 1e6).verdict == Verdict.ACCEPT
    gw.packet(s.data_fin(0, True, len(data)), 1004.0)
    if server_acks:  # the server got every byte (with "pass" too) and says so
        gw.packet(s.ack(0, False, s.idsn[0] + len(data) + 1), 1004.5)
    gw.flush(1005.0)
    (rec,) = [r for r in gw.drain_records() if r["event"] == "mptcp_connection"]
    return gw, reasons, data, rec


def test_memcap_drops_the_packet_and_the_resent_copy_completes_the_stream() -> None:
    """on_memcap = drop (default): a packet whose bytes the out-of-order cap kept out is dropped, so
    the server never holds bytes the IDS missed; once the hole fills the resent copies go through
    and the emitted stream is whole."""
    gw, reasons, data, rec = _memcap_run(Policy(), resend=True)
    assert reasons == ["accept"] * 4 + ["memcap"] * 7
    assert gw.stats.actions["memcap_drop"] == 7 and gw.stats.verdicts["drop"] == 7
    assert gw.tracker.stats.memcap["out_of_order"] == 7 and gw.tracker.shed_bytes == 7000
    assert rec["c2s"]["bytes"] == len(data) and rec["c2s"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert not rec["c2s"]["gaps"] and rec["c2s"]["data_fin"]
    assert gw.tracker.budget.used == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 12000), cuts=st.lists(st.integers(0, 12000), max_size=24),
       paths=st.lists(st.integers(0, 1), min_size=25, max_size=25), ooo=st.integers(0, 6000),
       memcap=st.integers(0, 9000), pending=st.integers(0, 6000), csum=st.booleans(), burst=st.integers(1, 4),
       reinject=st.integers(1, 12000), once=st.booleans(), dies=st.one_of(st.none(), st.integers(0, 12)),
       rnd=st.randoms(use_true_random=False))
# the second path fails with the first byte, and the memcap holds nothing: only a reinjection of the
# whole stream, after the packet dropped on the first subflow, has it (stalled until that hole was
# taken past the memcap)
@example(n=825, cuts=[1], paths=[1] + [0] * 24, ooo=0, memcap=0, pending=0, csum=False, burst=1, reinject=825,
         once=False, dies=0, rnd=random.Random(0))
def test_memcap_drop_never_stalls_a_sender_that_resends(n: int, cuts: list[int], paths: list[int], ooo: int,
                                                        memcap: int, pending: int, csum: bool, burst: int,
                                                        reinject: int, once: bool, dies: int | None,
                                                        rnd) -> None:
    """Liveness of on_memcap = "drop" under any buffer limits, with a sender that behaves as TCP
    and MPTCP do. The data is split over two subflows; each round every subflow sends ``burst``
    new segments, unless the gateway dropped one of its segments: then it resends the first one it
    is missing, the same segment, and nothing new (a retransmission timeout). Now and then the
    sender also reinjects ``reinject`` bytes from its first unacknowledged byte on either subflow
    (as the kernel resends a whole write: bytes the gateway buffers included). Packets of a round
    arrive in any order. With ``once`` (no DSS checksum), a segment of two or more bytes goes out
    as two packets and only the first carries the mapping (RFC 8684 allows it; Linux repeats it):
    the second may come first and wait unmapped, or be shed over ``pending_limit``. The stream
    must reach its end and the emitted stream must be the data. With ``dies``, the second path fails
    in that round: what it has sent and not delivered is lost, the rest goes on the first subflow,
    and only reinjections bring the lost bytes. Caught the stall of stop 15's CI
    (such a reinjection, over buffered bytes and past them, was refused, and so was every resend
    of it, while the subflow behind it carried the next bytes), then held bytes lost when their
    mapping came (test_bytes_let_through_before_their_mapping_are_never_lost_when_it_comes), then
    test_the_hole_before_reinjected_next_bytes_is_taken_past_a_full_memcap."""
    s = Session(1, csum=csum, dsn64=not csum)
    gw = Gateway(_UNCLAMPED, TrackerConfig(ooo_limit=ooo, memcap=memcap, pending_limit=pending))
    data = os.urandom(n)
    assert all(v == Verdict.ACCEPT for v in verdicts(gw, s.handshake() + s.join(1)))
    pts = sorted({0, n, *(c % (n + 1) for c in cuts)})
    new: list[list[tuple[int, int]]] = [[], []]  # per subflow, (data offset, length) not sent yet
    for i, (a, b) in enumerate(zip(pts, pts[1:])):
        new[paths[i % len(paths)]].append((a, b - a))
    next_rel = [1, 1]
    # a packet: (subflow, rel seq, data offset, length, mapping as (rel seq, length) or None)
    Pkt = tuple[int, int, int, int, "tuple[int, int] | None"]
    missing: list[list[Pkt]] = [[], []]  # per subflow, the packets dropped
    have = bytearray(n)  # what the server got (accepted packets)

    def send(sf: int, off: int, ln: int) -> list[Pkt]:
        r = next_rel[sf]
        next_rel[sf] += ln
        if once and not csum and ln > 1:
            k = rnd.randint(1, ln - 1)
            return [(sf, r, off, k, (r, ln)), (sf, r + k, off + k, ln - k, None)]
        return [(sf, r, off, ln, (r, ln))]

    t = 1001.0
    since, last = 0, None
    rounds = 0
    # until the server has every byte, and every dropped segment was sent again (TCP resends a
    # dropped segment even when a reinjection brought its bytes: its receiver reads nothing after
    # the hole it leaves in the subflow)
    while (first := have.find(0)) >= 0 or missing[0] or missing[1]:
        # rounds without progress (a reinjection, p = 0.3 a round, always makes some)
        state = (first, sorted(p[1] for m in missing for p in m))
        since = since + 1 if state == last else 1
        last = state
        assert since < 60, f"stalled at {first} of {n}; dropped, to resend: {missing}"
        if rounds == dies:  # the second path fails: what it sends now is lost, the rest goes on the first
            del new[1][:burst]
            new[0] = sorted(new[0] + new[1])
            new[1], missing[1] = [], []
        rounds += 1
        alive = 1 if dies is not None and rounds > dies else 2
        una = first
        flight = []
        if una >= 0 and rnd.random() < 0.3:  # an MPTCP-level reinjection, ahead of new data
            flight += send(rnd.randrange(alive), una, min(reinject, n - una))
        for sf in range(alive):
            if missing[sf]:
                missing[sf].sort(key=lambda p: p[1])
                flight.append(missing[sf].pop(0))
            else:
                for _ in range(min(burst, len(new[sf]))):
                    flight += send(sf, *new[sf].pop(0))
        rnd.shuffle(flight)
        for p in flight:
            sf, rel, off, ln, mp = p
            t += 0.001
            payload = data[off : off + ln]
            pkt = s.data(sf, True, off, payload, rel=rel, mapping=False) if mp is None else \
                s.data(sf, True, off, payload, rel=rel, map_rel=mp[0], map_len=mp[1])
            d = gw.packet(pkt, t)
            if d.verdict == Verdict.DROP:
                assert d.reason == "memcap"
                missing[sf].append(p)
            else:
                have[off : off + ln] = b"\x01" * ln
    gw.packet(s.data_fin(0, True, n), t + 1)
    gw.flush(t + 2)
    (rec,) = [r for r in gw.drain_records() if r["event"] == "mptcp_connection"]
    assert (rec["c2s"]["bytes"], rec["c2s"]["sha256"]) == (n, hashlib.sha256(data).hexdigest())
    assert not rec["c2s"]["gaps"] and gw.tracker.budget.used == 0


@pytest.mark.parametrize("reinjection", ["shed", "kept", "unsent"])
def test_the_hole_before_reinjected_next_bytes_is_taken_past_a_full_memcap(reinjection: str) -> None:
    """A path fails while it holds the stream's next bytes; the sender reinjects them on the other
    subflow, after a packet the full memcap dropped there. The receiver reads nothing on that
    subflow past the hole, so the dropped packet's resend must be taken although its bytes are
    ahead at the data level (over the memcap, by up to SLACK): refused, it was refused on every
    resend and the connection stalled. The reinjection is shed after the hole, or kept there (it
    fitted), or not sent yet: a sender in its retransmission timeout sends nothing new on the
    subflow, so the gateway takes the hole's third copy (lab: both directions, after a path failed)."""
    s = Session(1)
    data = os.urandom(7000)
    opening = s.handshake() + s.join(1)
    # [0, 1000) went on the join, whose path failed: it never arrives. The initial subflow ran ahead,
    # and the sender reinjects [0, 1000) there after what it sent
    ahead = [s.data(0, True, off, data[off : off + ln], rel=off - 999)
             for off, ln in ((1000, 1000), (2000, 1000), (3000, 1000), (4000, 1000), (5000, 2000))]
    reinjected = s.data(0, True, 0, data[:1000], rel=6001)
    memcap = 4 * (1000 + PIECE_COST) + (len(reinjected) + PIECE_COST + _OFO_COST) * (reinjection == "kept")
    gw = Gateway(_UNCLAMPED, TrackerConfig(memcap=memcap))
    assert all(v == Verdict.ACCEPT for v in verdicts(gw, opening))
    assert verdicts(gw, ahead) == [Verdict.ACCEPT] * 4 + [Verdict.DROP]
    if reinjection == "unsent":
        assert verdicts(gw, ahead[4:]) == [Verdict.DROP]  # (its first resend)
    else:
        assert verdicts(gw, [reinjected]) == [Verdict.ACCEPT if reinjection == "kept" else Verdict.DROP]
    assert gw.tracker.budget.used <= memcap
    # the sender resends what was dropped, in subflow order: taken, over the memcap by at most SLACK
    for p in ahead[4:] + ([] if reinjection == "kept" else [reinjected]):
        assert gw.packet(p, 1002.0).verdict == Verdict.ACCEPT
        assert gw.tracker.budget.used <= memcap + SLACK
    gw.packet(s.data_fin(0, True, len(data)), 1003.0)
    gw.flush(1004.0)
    (rec,) = [r for r in gw.drain_records() if r["event"] == "mptcp_connection"]
    assert (rec["c2s"]["bytes"], rec["c2s"]["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert not rec["c2s"]["gaps"] and gw.tracker.budget.used == 0


@pytest.mark.parametrize("rollback", [True, False])
def test_a_packet_dropped_for_its_shed_bytes_leaves_its_subflow_where_it_was(rollback: bool) -> None:
    """Under on_memcap = "drop" a packet whose own bytes a limit shed is dropped: its receiver never
    gets it. The tracker had moved the subflow's next byte past it all the same, so the join's next
    segment -- BENIGN at the request's next DSNs -- was read at once, while the server keeps it
    after the hole and reads those DSNs from the initial subflow first (UNION)."""
    s = Session(1)
    gw = Gateway(_UNCLAMPED, TrackerConfig(ooo_limit=10))
    gw.tracker.drop_shed = rollback  # (False: as before)
    pk = s.handshake() + s.join(1) + [s.data(0, True, 0, b"abcd")]
    assert all(v == Verdict.ACCEPT for v in verdicts(gw, pk))
    first = s.data(1, True, 20, b"x" * 20, rel=1)  # ahead at the data level, over ooo_limit: shed
    assert verdicts(gw, [first]) == [Verdict.DROP]
    later = [s.data(1, True, 4, b"BENIGN", rel=21), s.data(0, True, 4, b"UNION SELECT 1,2")]
    assert verdicts(gw, later + [first]) == [Verdict.ACCEPT] * 3  # (the copy comes again, with room now)
    gw.packet(s.data_fin(0, True, 40), 1002.0)
    gw.flush(1003.0)
    (rec,) = [r for r in gw.drain_records() if r["event"] == "mptcp_connection"]
    read = b"abcdUNION SELECT 1,2" + b"x" * 20
    assert (rec["c2s"]["sha256"] == hashlib.sha256(read).hexdigest()) is rollback, rec["c2s"]


@pytest.mark.parametrize("ooo", [0, 4000])
def test_bytes_let_through_before_their_mapping_are_never_lost_when_it_comes(ooo: int) -> None:
    """Found by the liveness test: a segment whose mapping was announced on an earlier segment
    that has not arrived yet is held unmapped and let through. When the mapping came, the held
    bytes were placed before the packet's own: out of order, over ooo_limit, refused -- the server
    had bytes the IDS never got, and the packet bringing the mapping was dropped for it. Held
    bytes are placed whatever ooo_limit says (under the shared budget and its slack)."""
    s = Session(1)
    # (subflow_order off: bytes before their mapping are the data level's buffer; in subflow order
    # they wait for the segment before them, which brings the mapping)
    gw = Gateway(_UNCLAMPED, TrackerConfig(ooo_limit=ooo, memcap=PIECE_COST + 1000, pending_limit=1000,
                                         subflow_order=False))
    verdicts(gw, s.handshake())
    data = os.urandom(2000)
    first = s.data(0, True, 0, data[:1000], map_rel=1, map_len=2000, rel=1)
    second = s.data(0, True, 1000, data[1000:], mapping=False, rel=1001)
    assert gw.packet(second, 1001.0).verdict == Verdict.ACCEPT  # held, unmapped: the budget is full
    assert gw.packet(first, 1002.0).verdict == Verdict.ACCEPT
    gw.packet(s.data_fin(0, True, 2000), 1003.0)
    gw.flush(1004.0)
    (rec,) = [r for r in gw.drain_records() if r["event"] == "mptcp_connection"]
    assert (rec["c2s"]["bytes"], rec["c2s"]["sha256"]) == (2000, hashlib.sha256(data).hexdigest())
    assert gw.tracker.shed_bytes == 0 and gw.tracker.budget.used == 0


def test_memcap_pass_lets_the_packet_through_and_the_stream_has_a_gap() -> None:
    gw, reasons, data, rec = _memcap_run(Policy(on_memcap=OnMemcap.PASS), resend=False, server_acks=True)
    assert reasons == ["accept"] * 11
    assert gw.stats.actions["memcap_drop"] == 0 and gw.tracker.shed_bytes == 7000
    # the shed bytes never reach the IDS: a gap, acknowledged by the server, labelled as mproxy's own
    # shedding -- not a side channel (no notice but the one memcap notice)
    c2s = rec["c2s"]
    assert c2s["bytes"] == len(data) - 7000 and c2s["memcap_drops"] == 7
    (gap,) = c2s["gaps"]
    assert (gap["length"], gap["acked"], gap["shed"]) == (7000, True, 7000)
    assert c2s["gap_count"] == 1 and c2s["gap_bytes"] == 7000
    assert gw.tracker.stats.gap_bytes == {"memcap": 7000}
    assert gw.tracker.stats.notices == {"memcap": 1}


@pytest.mark.parametrize("limit", ["pending", "global"])
def test_unmapped_bytes_shed_before_their_mapping_read_as_shed_not_side_channel(limit: str) -> None:
    """Subflow bytes that arrive before their DSS mapping wait (up to pending_limit); those over it
    are shed with no DSN yet. When the mapping comes it tells where they belonged, so the gap the
    server acknowledges over them is mproxy's own shedding -- not a side channel, which
    on_side_channel could react to (e.g. fast-close a connection that did nothing wrong)."""
    s = Session(1)
    # pending: two segments held, the third over pending_limit; global: a memcap that holds none of
    # them, so the mapping arrives with nothing pending (the one-packet mapping path places the run)
    # (subflow_order off, as above: in subflow order they would wait for the first segment)
    cfg = TrackerConfig(pending_limit=2000, subflow_order=False) if limit == "pending" \
        else TrackerConfig(memcap=1000, subflow_order=False)
    shed = 1000 if limit == "pending" else 3000
    gw = Gateway(Policy(on_memcap=OnMemcap.PASS), cfg)
    data = os.urandom(4500)
    verdicts(gw, s.handshake())
    first = s.data(0, True, 0, data[:1000])
    # no mapping yet, and overtaking the first segment (right after mapped bytes they would be a
    # fallback to TCP, as Linux takes them)
    for off in range(1000, 4000, 1000):
        assert gw.packet(s.data(0, True, off, data[off : off + 1000], mapping=False), 1001.0).verdict \
            == Verdict.ACCEPT
    assert gw.tracker.shed_bytes == shed and sum(gw.tracker.stats.memcap.values()) == shed // 1000
    (conn,) = gw.tracker.connections.values()
    assert conn.subflows[0].dirs[0].shed == [[(s.subs[0].isn[0] + 4001 - shed) & 0xFFFFFFFF, shed]]
    gw.packet(first, 1001.5)
    # the last segment carries the mapping of the 3500 bytes after the first 1000: the held ones are
    # placed, the shed run gets its DSNs (stream positions 4000 - shed .. 4000)
    gw.packet(s.data(0, True, 4000, data[4000:], map_rel=1001, map_len=3500), 1002.0)
    assert conn.subflows[0].dirs[0].shed is None
    st = conn.streams[0]
    assert st.released == 4000 - shed and st._shed == [[st.base, st.base + shed]]
    gw.packet(s.data_fin(0, True, len(data)), 1003.0)
    gw.packet(s.ack(0, False, s.idsn[0] + len(data) + 1), 1004.0)  # the server got every byte
    gw.flush(1005.0)
    (rec,) = [r for r in gw.drain_records() if r["event"] == "mptcp_connection"]
    c2s = rec["c2s"]
    assert c2s["bytes"] == len(data) - shed and c2s["gap_bytes"] == shed
    (gap,) = c2s["gaps"]
    assert (gap["length"], gap["acked"], gap["shed"]) == (shed, True, shed)
    assert gw.tracker.stats.gap_bytes == {"memcap": shed}
    assert gw.tracker.stats.notices == {"memcap": 1}
