"""TTL insertion: a packet whose TTL (hop limit) is below the one its subflow direction's first
packet reached the gateway with may expire before the receiver. A sender that knows the hop count
sends BENIGN so, then the real bytes: the IDS read BENIGN, the server the real bytes. Offline such a
packet's bytes are read only once the receiver acknowledges them (a copy that comes first wins), and
nothing else of it is taken; inline its TTL is raised back, so the receiver gets what the IDS reads."""
from __future__ import annotations

from mproxy.core.gateway import Gateway, Verdict
from mproxy.core.policy import LowTtl, Policy
from mproxy.core.events import DataReleased
from mproxy.core.tracker import Tracker
from mproxy.wire import mptcp as m
from mproxy.wire.checksum import finish, ones_sum
from mproxy.wire.packet import ACK, FIN, RST
from mproxy.wire.rewrite import set_ttl

from .session import Session, c2s, notice_types, run, seg

REAL = b"UNION SELECT pw"


def low(pkt: bytes, ttl: int = 3) -> bytes:
    buf = bytearray(pkt)
    set_ttl(buf, ttl)
    return bytes(buf)


def insertion(s: Session) -> list[bytes]:
    """``GET /?q=``, BENIGN with TTL 3 at the next subflow bytes and DSNs, then the real bytes
    there with the connection's TTL, the server's acknowledgement and both DATA_FINs."""
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    rel = s.subs[0].next_rel[0]
    pk.append(low(s.data(0, True, 8, b"BENIGN", rel=rel)))
    pk.append(s.data(0, True, 8, REAL, rel=rel))
    end = 8 + len(REAL)
    return pk + [s.ack(0, False, s.idsn[0] + end), s.data_fin(0, True, end), s.data_fin(0, False, 0)]


def test_a_low_ttl_copy_sent_ahead_of_the_real_bytes_is_not_read() -> None:
    for ipver in (4, 6):
        t = Tracker()
        ev = run(t, insertion(Session(1, ipver)))
        assert c2s(ev) == b"GET /?q=" + REAL, c2s(ev)
        assert notice_types(ev) == ["low_ttl", "out_of_window"] and t.stats.low_ttl == 1
        assert dict(t.stats.outcomes) == {"data_fin": 1}


def test_a_low_ttl_copy_with_an_old_head_is_not_taken_by_an_ack_of_that_head() -> None:
    """BENIGN with TTL 3 behind one byte the server already has: the server's (duplicate) ACK of
    its next byte acknowledges that old byte, not BENIGN. Taken as acknowledged, BENIGN was read."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    rel = s.subs[0].next_rel[0]
    pk.append(low(s.data(0, True, 7, b"=BENIGN", rel=rel - 1)))
    pk.append(s.ack(0, False, s.idsn[0] + 8))  # the server's ACK of its next byte (for the old "=")
    pk.append(s.data(0, True, 8, REAL, rel=rel))
    end = 8 + len(REAL)
    pk += [s.ack(0, False, s.idsn[0] + end), s.data_fin(0, True, end), s.data_fin(0, False, 0)]
    t = Tracker()
    ev = run(t, pk)
    assert c2s(ev) == b"GET /?q=" + REAL, c2s(ev)
    assert t.stats.past_edge_taken == 0 and notice_types(ev) == ["low_ttl", "out_of_window"]


def test_a_low_ttl_segment_the_receiver_acknowledges_is_read() -> None:
    """A path that got shorter mid-connection (or a sender that lowered its TTL): the receiver's
    acknowledgement shows it took the bytes, which are then read."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    pk += [low(s.data(0, True, 8, REAL)), s.ack(0, False, s.idsn[0] + 8 + len(REAL))]
    pk += [s.data_fin(0, True, 8 + len(REAL)), s.data_fin(0, False, 0)]
    t = Tracker()
    ev = run(t, pk)
    assert c2s(ev) == b"GET /?q=" + REAL and notice_types(ev) == ["low_ttl"]
    assert t.stats.past_edge_taken == 1


def test_nothing_else_of_a_low_ttl_packet_is_taken() -> None:
    """An exact RST + MP_FASTCLOSE, a FIN or a DATA_FIN with a low TTL may never have reached the
    server: the stream goes on to the real end."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    pk.append(low(s._pkt(s.subs[0], True, RST | ACK, [m.MpFastclose(s.sk).encode()])))
    pk.append(low(s._pkt(s.subs[0], True, FIN | ACK, [])))
    pk.append(low(s.data_fin(0, True, 8)))
    pk.append(s.data(0, True, 8, REAL))
    end = 8 + len(REAL)
    pk += [s.ack(0, False, s.idsn[0] + end), s.data_fin(0, True, end), s.data_fin(0, False, 0)]
    t = Tracker()
    ev = run(t, pk)
    assert c2s(ev) == b"GET /?q=" + REAL and dict(t.stats.outcomes) == {"data_fin": 1}
    assert t.stats.low_ttl == 3 and notice_types(ev) == ["low_ttl", "out_of_window"]


def test_the_reference_is_each_directions_first_packet() -> None:
    """The server's packets come with their own TTL (another hop count): only a drop below their
    own first one counts; a TTL above it is no insertion."""
    s = Session(1)
    hs = s.handshake()
    pk = [hs[0], low(hs[1], 50), hs[2], s.data(0, True, 0, b"GET"), low(s.data(0, False, 0, b"200"), 50)]
    pk += [low(s.data(0, True, 3, b" /", rel=s.subs[0].next_rel[0]), 65)]
    t = Tracker()
    ev = run(t, pk)
    assert t.stats.low_ttl == 0 and notice_types(ev) == []


def test_raised_inline_a_low_ttl_packet_is_read_as_it_came() -> None:
    """``raise_ttl`` (the gateway forwards it with the first packet's TTL): the receiver gets it, so
    BENIGN is what the server reads and what the IDS reads."""
    t = Tracker()
    t.raise_ttl = True
    ev = run(t, insertion(Session(1)))
    assert c2s(ev) == b"GET /?q=BENIGN" + REAL[6:]
    assert notice_types(ev)[0] == "low_ttl" and t.stats.low_ttl == 1


def gateway_run(gw: Gateway, pk: list[bytes]) -> list:
    return [gw.packet(p, 1000.0 + i * 0.001) for i, p in enumerate(pk)]


def test_the_gateway_gives_a_low_ttl_packet_its_directions_ttl_back() -> None:
    for ipver in (4, 6):
        s = Session(1, ipver)
        pk = insertion(s)
        gw = Gateway()
        ds = gateway_run(gw, pk)
        d = ds[4]  # (the low-TTL packet: after the handshake and GET)
        assert d.verdict == Verdict.ACCEPT_MODIFIED and d.payload is not None
        assert d.payload[8 if ipver == 4 else 7] == 64 and d.payload == low(pk[4], 64)
        if ipver == 4:
            assert finish(ones_sum(d.payload[:20])) == 0  # (the header checksum verifies)
        assert [x.verdict for i, x in enumerate(ds) if i != 4] == [Verdict.ACCEPT] * (len(pk) - 1)
        assert gw.stats.actions["ttl_raised"] == 1


def test_with_low_ttl_pass_the_gateway_forwards_it_as_it_came() -> None:
    gw = Gateway(Policy(low_ttl=LowTtl.PASS))
    ds = gateway_run(gw, insertion(Session(1)))
    assert all(d.verdict == Verdict.ACCEPT for d in ds) and "ttl_raised" not in gw.stats.actions
    assert gw.tracker.stats.low_ttl == 1 and not gw.tracker.raise_ttl


def test_a_low_ttl_packet_skips_the_fast_path() -> None:
    """The fast path reads in-order data at once: a low-TTL one must go the general way."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q="), s.ack(0, False, s.idsn[0] + 8)]
    t = Tracker()
    run(t, pk, flush=False)
    ev = t.process(seg(low(s.data(0, True, 8, b"BENIGN")), 1001.0))
    assert not [e for e in ev if isinstance(e, DataReleased)] and notice_types(ev) == ["low_ttl"]


def test_a_routers_second_copy_of_each_packet_is_not_judged() -> None:
    """``tcpdump -i any`` on a router records each forwarded packet twice, leaving with its TTL one
    lower: the second copies bring nothing new, so nothing is noticed or held, and the stream is
    whole (their lowered TTLs are only counted)."""
    s = Session(1)
    pk = s.handshake() + s.join(1) + [s.data(0, True, 0, b"GET /?q="), s.data(1, True, 8, REAL)]
    end = 8 + len(REAL)
    pk += [s.ack(0, False, s.idsn[0] + end), s.data(0, False, 0, b"200 OK"), s.ack(1, True, s.idsn[1] + 6)]
    pk += [s.data_fin(0, True, end), s.data_fin(0, False, 6)]
    t = Tracker()
    ev = run(t, [q for p in pk for q in (p, low(p, 63))])
    assert c2s(ev) == b"GET /?q=" + REAL and notice_types(ev) == []
    assert t.stats.low_ttl >= len(pk) // 2 and dict(t.stats.outcomes) == {"data_fin": 1}
