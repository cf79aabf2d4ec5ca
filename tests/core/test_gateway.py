"""Gateway verdicts from packets built by our encoder (sans-I/O; the live tests run it on NFQUEUE)."""

from __future__ import annotations

from mproxy.core.gateway import Gateway, Verdict
from mproxy.core.policy import Action, Policy, Rule, UntrustedJoin
from mproxy.wire import mptcp as m
from mproxy.wire.packet import TcpSegment, mptcp_spans, parse_ip
from mproxy.wire.checksum import tcp_checksum

from .session import Session


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
