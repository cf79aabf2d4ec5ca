"""MP_FASTCLOSE/RST packets built from tracked connections, and the gateway's reactions (sans-I/O).

Checked by our parser and, independently, by tshark (checksums and the
MPTCP option decode) when it is installed.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mproxy import crypto
from mproxy.core.alerts import Alert
from mproxy.core.events import ConnectionClosed, Outcome
from mproxy.core.fastclose import CloseMode, SubflowEnds, build_fastclose, close_set
from mproxy.core.gateway import Gateway, Verdict
from mproxy.core.inspector import Inspector
from mproxy.core.reactions import Reaction, Reactions
from mproxy.core.rules import parse_rules
from mproxy.core.tracker import Tracker
from mproxy.io.pcap import PcapWriter
from mproxy.wire import mptcp as m
from mproxy.wire.checksum import ipv4_header_checksum, tcp_checksum
from mproxy.wire.packet import ACK, RST, TcpSegment, mptcp_spans, parse_ip

from ..oracles import tshark_available, tshark_fields
from .session import Session, run, seg

RULES = parse_rules('alert tcp any any -> any any (msg:"union select"; content:"UNION+SELECT"; nocase; sid:1;)')
P1, P2 = b"GET /q?x=1+UNION+SEL", b"ECT+pw HTTP/1.1\r\n\r\n"


def decode(p: bytes) -> tuple[TcpSegment, list[object]]:
    s = parse_ip(memoryview(p))
    assert isinstance(s, TcpSegment)
    spans = mptcp_spans(s)
    assert not isinstance(spans, Exception)
    return s, [m.decode(s.ip[o : o + n], s.flags) for o, n in spans]


def checksums_ok(p: bytes) -> bool:
    s, _ = decode(p)
    ok = tcp_checksum(s.src, s.dst, s.ip[s.tcp_off :]) == 0
    if s.ipver == 4:
        ok = ok and ipv4_header_checksum(s.ip[:20]) == 0
    return ok


def session_with_data(version: int, ipver: int = 4) -> tuple[Session, Tracker, list[bytes]]:
    s = Session(version, ipver)
    pk = s.handshake() + s.join(1)
    pk += [s.data(0, True, 0, b"GET / HTTP/1.1\r\n\r\n"), s.data(0, False, 0, b"HTTP/1.1 200 OK\r\n\r\n"),
           s.data(1, True, 18, b"more"), s.data(1, False, 19, b"x")]
    t = Tracker()
    run(t, pk, flush=False)
    return s, t, pk


@pytest.mark.parametrize("ipver", [4, 6])
def test_v1_rst_with_mp_fastclose_on_every_subflow_both_ways(ipver: int) -> None:
    s, t, _ = session_with_data(1, ipver)
    (conn,) = t.connections.values()
    cs = close_set(conn)
    assert cs.mode == CloseMode.FASTCLOSE and len(cs.packets) == 4 and not cs.skipped
    seen = {}
    for p in cs.packets:
        sg, opts = decode(p)
        assert checksums_ok(p)
        assert sg.flags == RST | ACK
        fc = [o for o in opts if isinstance(o, m.MpFastclose)]
        rst = [o for o in opts if isinstance(o, m.MpTcpRst)]
        assert len(fc) == 1 and len(rst) == 1 and rst[0].reason == m.ResetReason.ADMINISTRATIVELY_PROHIBITED
        to_server = sg.dst == s.subs[0].server[0]
        # the option carries the receiver's key
        assert fc[0].receiver_key == (s.sk if to_server else s.ck)
        seen[(sg.src, sg.sport, sg.dst, sg.dport)] = (sg.seq, sg.ack)
    for sub in s.subs:
        c, v = sub.client, sub.server
        # in window: seq = the sender's next sequence number, ack = the other side's
        assert seen[(c[0], c[1], v[0], v[1])] == (sub.isn[0] + sub.next_rel[0], sub.isn[1] + sub.next_rel[1])
        assert seen[(v[0], v[1], c[0], c[1])] == (sub.isn[1] + sub.next_rel[1], sub.isn[0] + sub.next_rel[0])


def test_v0_ack_with_fastclose_on_one_subflow_rst_on_the_others() -> None:
    s, t, _ = session_with_data(0)
    (conn,) = t.connections.values()
    cs = close_set(conn)
    assert cs.mode == CloseMode.FASTCLOSE and len(cs.packets) == 4
    kinds = [(sf["to_responder"], sf["to_initiator"]) for sf in cs.subflows]
    assert kinds == [("ack+mp_fastclose", "ack+mp_fastclose"), ("rst", "rst")]
    for p in cs.packets:
        sg, opts = decode(p)
        assert checksums_ok(p)
        if sg.sport == s.subs[0].client[1] or sg.dport == s.subs[0].client[1]:
            assert sg.flags == ACK
            (fc,) = opts
            assert isinstance(fc, m.MpFastclose)
            assert fc.receiver_key == (s.sk if sg.dst == s.subs[0].server[0] else s.ck)
        else:
            assert sg.flags == RST | ACK and opts == []


def test_keys_unknown_fall_back_to_rst_and_say_so() -> None:
    s = Session(1)
    pk = s.handshake() + s.join(1) + [s.data(0, True, 0, b"abc"), s.data(1, True, 3, b"def"),
                                     s.data(0, False, 0, b"ok")]
    gw = Gateway(reactions=Reactions(on_alert=(Reaction.FASTCLOSE,)))
    for p in pk[3:]:  # the MP_CAPABLE handshake was never seen: the connection is picked up mid-stream
        gw.packet(p, 1000.0)
    (conn,) = gw.tracker.connections.values()
    assert conn.client_key is None and conn.server_key is None
    c = s.subs[0]
    d = gw.alert(Alert(c.client[0], c.client[1], c.server[0], c.server[1], 7, "x", "suricata"), 1001.0)
    assert d is not None and d.inject
    for p in d.inject:
        sg, opts = decode(p)
        assert sg.flags & RST and not any(isinstance(o, m.MpFastclose) for o in opts)
    (rec,) = [r for r in gw.drain_records() if r["event"] == "action"]
    assert rec["mode"] == "rst_only" and "keys unknown" in rec["detail"]


def test_partial_ends_skip_unknown_sequence() -> None:
    a, b = ipaddress.ip_address("198.18.1.2").packed, ipaddress.ip_address("198.18.10.2").packed
    cs = build_fastclose([SubflowEnds(a, 1000, b, 80, 5000, None, 1, 2)], 1)
    assert len(cs.packets) == 1 and cs.skipped and "sequence unknown" in cs.skipped[0]


@pytest.mark.skipif(tshark_available() is not None, reason=tshark_available() or "")
@pytest.mark.parametrize("version,ipver", [(1, 4), (1, 6), (0, 4)])
def test_tshark_reads_valid_checksums_and_keys(tmp_path: Path, version: int, ipver: int) -> None:
    s, t, _ = session_with_data(version, ipver)
    (conn,) = t.connections.values()
    cs = close_set(conn)
    pcap = tmp_path / "fc.pcap"
    with pcap.open("wb") as f:
        w = PcapWriter(f, linktype=101)  # raw IP
        for i, p in enumerate(cs.packets):
            w.write(1000 + i / 1000, p)
    rows = tshark_fields(pcap, ["tcp.checksum.status", "ip.checksum.status", "tcp.options.mptcp.subtype",
                                "tcp.options.mptcp.recvkey", "tcp.flags.reset", "tcp.dstport"],
                         extra=["-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE"])
    assert len(rows) == len(cs.packets)
    for r in rows:
        assert r[0] == "1", r  # good
        assert r[1] in ("1", ""), r  # IPv6 has no header checksum
        if "7" in r[2].split(","):
            to_server = r[5] == str(s.dport)
            assert int(r[3], 0) == (s.sk if to_server else s.ck)
    fc = [r for r in rows if "7" in r[2].split(",")]
    assert len(fc) == (4 if version == 1 else 2)


# --------------------------------------------------------------------------- the gateway's reactions
def attack_packets(s: Session) -> list[bytes]:
    pk = s.handshake() + s.join(1)
    pk += [s.data(0, True, 0, P1), s.ack(0, False, s.idsn[0] + len(P1))]
    return pk


def test_inline_match_drops_the_completing_packet_and_kills_every_subflow() -> None:
    s = Session(1)
    gw = Gateway(inspector=Inspector(RULES))
    for p in attack_packets(s):
        assert gw.packet(p, 1000.0).verdict == Verdict.ACCEPT
    last = s.data(1, True, len(P1), P2)
    d = gw.packet(last, 1000.5)
    assert d.verdict == Verdict.DROP and "sid 1" in d.reason
    assert len(d.inject) == 4
    # the dropped packet's receiver never saw it: the RST to the server on that subflow starts where it did
    to_srv = [decode(p)[0] for p in d.inject if decode(p)[0].sport == s.subs[1].client[1]]
    assert to_srv[0].seq == seg(last).seq
    recs = gw.drain_records()
    act = [r for r in recs if r["event"] == "action"]
    assert len(act) == 1 and act[0]["action"] == "fastclose" and act[0]["sid"] == 1 and act[0]["trigger"] == "inspector"
    assert act[0]["dropped"]["len"] == len(P2)
    (summary,) = [r for r in recs if r["event"] == "mptcp_connection"]
    assert summary["outcome"] == Outcome.FASTCLOSE.value
    assert gw.stats.actions["fastclose"] == 1 and not gw.tracker.connections
    # the client retransmits on another subflow: dropped, answered with an exact RST
    retrans = s.data(0, True, len(P1), P2)
    d2 = gw.packet(retrans, 1000.6)
    assert d2.verdict == Verdict.DROP and len(d2.inject) == 1
    ans, opts = decode(d2.inject[0])
    r = seg(retrans)
    assert (ans.src, ans.dst, ans.seq) == (r.dst, r.src, r.ack)
    assert [o.receiver_key for o in opts if isinstance(o, m.MpFastclose)] == [s.ck]
    # a join with the killed connection's token is refused
    j = s.join(2)[0]
    assert gw.packet(j, 1000.7).verdict == Verdict.DROP
    # the killed connection's own RSTs pass
    assert gw.packet(s.rst(0, False), 1000.8).verdict == Verdict.ACCEPT


def test_match_split_in_any_order_is_found_only_once_complete() -> None:
    s = Session(1)
    gw = Gateway(inspector=Inspector(RULES))
    for p in attack_packets(s)[:-2]:
        gw.packet(p, 1000.0)
    # part 2 first (out of order: buffered, harmless alone), then part 1 completes the stream
    assert gw.packet(s.data(1, True, len(P1), P2), 1000.1).verdict == Verdict.ACCEPT
    assert gw.packet(s.data(0, True, 0, P1, rel=1), 1000.2).verdict == Verdict.DROP  # (attack_packets made one)


def test_log_only_accepts_and_records() -> None:
    s = Session(1)
    gw = Gateway(inspector=Inspector(RULES), reactions=Reactions(on_match=(Reaction.LOG,)))
    for p in attack_packets(s):
        gw.packet(p, 1000.0)
    d = gw.packet(s.data(1, True, len(P1), P2), 1000.5)
    assert d.verdict == Verdict.ACCEPT and not d.inject
    (act,) = [r for r in gw.drain_records() if r["event"] == "action"]
    assert act["action"] == "log" and act["sid"] == 1 and gw.tracker.connections


def test_downgrade_host_downgrades_later_connections_for_a_while() -> None:
    s = Session(1)
    gw = Gateway(inspector=Inspector(RULES),
                 reactions=Reactions(on_match=(Reaction.FASTCLOSE, Reaction.DOWNGRADE_HOST),
                                     downgrade_host_seconds=60))
    for p in attack_packets(s):
        gw.packet(p, 1000.0)
    assert gw.packet(s.data(1, True, len(P1), P2), 1000.5).verdict == Verdict.DROP
    acts = [r["action"] for r in gw.drain_records() if r["event"] == "action"]
    assert acts == ["downgrade-host", "fastclose"]
    again = Session(1, sport=41000)
    syn = again.handshake()[0]
    d = gw.packet(syn, 1010.0)
    assert d.verdict == Verdict.ACCEPT_MODIFIED
    assert "downgrade-host" in [r for r in gw.drain_records() if r["event"] == "action"][0]["detail"]
    later = Session(1, sport=42000)
    assert gw.packet(later.handshake()[0], 1061.0).verdict == Verdict.ACCEPT  # expired


def test_side_channel_reaction() -> None:
    s = Session(1)
    gw = Gateway(reactions=Reactions(on_side_channel=(Reaction.FASTCLOSE,)))
    pk = s.handshake() + [s.data(0, True, 0, b"seen")]
    for p in pk:
        gw.packet(p, 1000.0)
    # the server acknowledges 100 bytes more than crossed the gateway: they went another way
    d = gw.packet(s.ack(0, False, s.idsn[0] + 104), 1000.1)
    assert d.verdict == Verdict.DROP and d.inject
    (act,) = [r for r in gw.drain_records() if r["event"] == "action"]
    assert act["trigger"] == "side_channel" and act["action"] == "fastclose"


def test_alert_maps_either_orientation_of_the_emitted_tuple() -> None:
    for flip in (False, True):
        s = Session(1)
        gw = Gateway(reactions=Reactions(on_alert=(Reaction.FASTCLOSE,)))
        for p in attack_packets(s):
            gw.packet(p, 1000.0)
        c, v = s.subs[0].client, s.subs[0].server
        a = Alert(v[0], v[1], c[0], c[1], 9, "m", "snort") if flip else Alert(c[0], c[1], v[0], v[1], 9, "m", "snort")
        d = gw.alert(a, 1001.0)
        assert d is not None and len(d.inject) == 4
        assert any(isinstance(f, bytes) for _, f in d.frames)  # the IDS's conversation is closed too
        closed = [r for r in gw.drain_records() if r["event"] == "mptcp_connection"]
        assert closed and closed[0]["outcome"] == "fastclose"
    unknown = Alert(c[0], 1, v[0], 2, 1, "", "suricata")
    assert gw.alert(unknown, 1002.0) is None


def test_kill_events_close_the_connection_in_the_tracker() -> None:
    s = Session(1)
    gw = Gateway()
    for p in attack_packets(s):
        gw.packet(p, 1000.0)
    (conn,) = gw.tracker.connections.values()
    _pk, events, fields = gw.responder.kill(conn, 1001.0)
    assert any(isinstance(e, ConnectionClosed) and e.outcome == Outcome.FASTCLOSE for e in events)
    assert fields["packets"] == 4 and fields["mode"] == "mp_fastclose"


def test_killed_tokens_stay_bounded_while_none_has_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokens of killed connections (joins to them are refused) were trimmed only of expired ones:
    with more kills than the limit within kill_linger, the table grew past it and every kill rebuilt it."""
    import mproxy.core.reactions as reactions_mod

    monkeypatch.setattr(reactions_mod, "_KILLED_LIMIT", 6)
    gw = Gateway()
    for i in range(5):
        s = Session(1, client_key=0x7000 + i, server_key=0x8000 + i, sport=42000 + 10 * i)
        for p in attack_packets(s):
            gw.packet(p, 1000.0 + i)
        conn = next(c for c in gw.tracker.connections.values() if c.client[1] == s.sport)
        gw.responder.kill(conn, 1000.5 + i)
    kt = gw.responder.killed_tokens
    assert len(kt) == 6  # the last three kills' two tokens each, all still within kill_linger
    assert crypto.key_token(0x8004, 1) in kt and crypto.key_token(0x8000, 1) not in kt


# a pcre that backtracks for years on the attack's bytes (see tests/core/test_inspector.py)
EVIL_RULES = parse_rules('alert tcp any any -> any any (msg:"evil"; content:"GET"; pcre:"/(?:a|a)+b/"; sid:11;)')
SLOW1, SLOW2 = b"GET /?q=" + b"a" * 15, b"a" * 15 + b"c ab HTTP/1.1\r\n\r\n"


def evil_packets(s: Session) -> list[bytes]:
    return s.handshake() + s.join(1) + [s.data(0, True, 0, SLOW1), s.ack(0, False, s.idsn[0] + len(SLOW1))]


def test_a_pcre_out_of_time_is_logged_and_the_packet_passes_by_default() -> None:
    s = Session(1)
    gw = Gateway(inspector=Inspector(EVIL_RULES, pcre_budget=0.02))
    for p in evil_packets(s):
        assert gw.packet(p, 1000.0).verdict == Verdict.ACCEPT
    d = gw.packet(s.data(1, True, len(SLOW1), SLOW2), 1000.5)
    assert d.verdict == Verdict.ACCEPT and not d.inject
    (act,) = [r for r in gw.drain_records() if r["event"] == "action"]
    assert (act["action"], act["trigger"], act["sid"], act["direction"]) == ("log", "pcre_limit", 11, "c2s")
    assert "pcre not decided within the time budget" in act["reason"] and gw.tracker.connections


def test_on_pcre_limit_fastclose_fails_closed() -> None:
    s = Session(1)
    gw = Gateway(inspector=Inspector(EVIL_RULES, pcre_budget=0.02),
                 reactions=Reactions(on_pcre_limit=(Reaction.FASTCLOSE,)))
    for p in evil_packets(s):
        gw.packet(p, 1000.0)
    d = gw.packet(s.data(1, True, len(SLOW1), SLOW2), 1000.5)
    assert d.verdict == Verdict.DROP and len(d.inject) == 4 and "pcre_limit: sid 11" in d.reason
    (act,) = [r for r in gw.drain_records() if r["event"] == "action"]
    assert (act["action"], act["trigger"]) == ("fastclose", "pcre_limit") and not gw.tracker.connections
