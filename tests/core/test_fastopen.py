"""TCP Fast Open on MPTCP (RFC 8684 B.3) and the fallbacks around the handshake ACK.

The bytes of a Fast Open SYN that the server takes reach its application before
the data-level stream and have no DSN: they must head the rebuilt stream, or an
exploit sent in the SYN never reaches the IDS. Captures of the same exchanges
with Linux 6.18 are in tests/lab/test_fastopen_lab.py.
"""

from __future__ import annotations

import pytest

from mproxy.core.events import Direction, GapSkipped, Notice, NoticeType, PassThrough
from mproxy.core.tracker import Tracker, TrackerConfig
from mproxy.wire import mptcp as m
from mproxy.wire.build import build_tcp
from mproxy.wire.packet import ACK, SYN

from .session import Session, run, seg, streams
from .test_tracker import _bare, notices, summary

C2S, S2C = Direction.C2S, Direction.S2C
ATTACK = b"GET /?id=1 UNION SELECT password FROM users HTTP/1.1\r\n"


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("ipver", [4, 6])
def test_fast_open_bytes_the_server_took_head_the_stream(version: int, ipver: int) -> None:
    s = Session(version, ipver)
    pk = s.handshake(syn_data=ATTACK) + s.join(1)
    pk += [s.data(0, True, 0, b"Host: a\r\n"), s.data(1, True, 9, b"\r\n"), s.data(0, False, 0, b"HTTP/1.1 200")]
    pk += [s.data_fin(1, True, 11), s.data_fin(0, False, 12)]
    ev = run(Tracker(), pk)
    got = streams(ev)
    assert got[(1, C2S)] == ATTACK + b"Host: a\r\n\r\n"
    assert got[(1, S2C)] == b"HTTP/1.1 200"
    assert not notices(ev)
    sm = summary(ev)
    assert sm["outcome"] == "data_fin" and sm["c2s"]["bytes"] == len(ATTACK) + 11 and sm["c2s"]["gap_bytes"] == 0


def test_fast_open_with_the_syn_ack_unseen() -> None:
    """One direction of the SYN/ACK missing from the capture: the client's next sequence number
    (its handshake ACK's) says the server took the bytes."""
    s = Session(1)
    syn, _synack, ack = s.handshake(syn_data=ATTACK)
    ev = run(Tracker(), [syn, ack, s.data(0, True, 0, b"rest"), s.data_fin(0, True, 4)])
    assert streams(ev)[(1, C2S)] == ATTACK + b"rest"


def test_fast_open_with_mp_capable_data_and_no_handshake_ack() -> None:
    """The handshake ACK lost: the first data carries MP_CAPABLE (v1), mapped at IDSN+1 -- after
    the Fast Open bytes, which still come first."""
    s = Session(1)
    syn, synack, _ack = s.handshake(syn_data=b"abc")
    sub = s.subs[0]
    cap = m.MpCapable(1, m.CAP_H_HMAC, s.ck, s.sk, 3)
    first = s._pkt(sub, True, ACK, [cap.encode()], b"def")
    sub.next_rel[0] += 3
    ev = run(Tracker(), [syn, synack, first, s.data(0, True, 3, b"ghi")])
    assert streams(ev)[(1, C2S)] == b"abcdefghi"
    assert not notices(ev)


def test_fast_open_bytes_the_server_refused_are_not_taken_twice() -> None:
    """The SYN/ACK acknowledges only the SYN: the client sends the bytes again after the
    handshake. As Linux 6.18 does, without an MP_CAPABLE on that packet (its DSS carries a data
    ACK only), so the server falls back to TCP; the stream is the resent bytes, once."""
    s = Session(1)
    syn, synack, _ack = s.handshake(syn_data=ATTACK, taken=0)
    sub = s.subs[0]
    resent = s._pkt(sub, True, ACK, [m.dss(s.idsn[1]).encode()], ATTACK)
    sub.next_rel[0] += len(ATTACK)
    ev = run(Tracker(), [syn, synack, resent, _bare(s, 0, True, b"Host: a\r\n"), _bare(s, 0, False, b"HTTP")])
    got = streams(ev)
    assert got[(1, C2S)] == ATTACK + b"Host: a\r\n"
    assert got[(1, S2C)] == b"HTTP"
    assert NoticeType.INFINITE_MAPPING in notices(ev)
    assert summary(ev)["client_token"] is None  # the client's key never came: the stream needs none


def test_fast_open_bytes_over_the_memcap_are_a_gap_not_a_side_channel() -> None:
    s = Session(1)
    pk = s.handshake(syn_data=bytes(300)) + [s.data(0, True, 0, b"next")]
    t = Tracker(TrackerConfig(memcap=100))
    ev = run(t, pk)
    assert streams(ev)[(1, C2S)] == b"next"
    (gap,) = [e for e in ev if isinstance(e, GapSkipped)]
    assert gap.length == 300 and gap.direction == C2S
    assert summary(ev)["c2s"]["gap_bytes"] == 300
    assert NoticeType.SIDE_CHANNEL not in notices(ev) and NoticeType.CAPTURE_GAP not in notices(ev)
    assert t.stats.memcap["global"] >= 1 and t.budget.used == 0


def test_fast_open_syn_held_by_a_handshake_that_never_ends_is_given_back() -> None:
    s = Session(1)
    syn = s.handshake(syn_data=bytes(500))[0]
    t = Tracker()
    t.process(seg(syn, 1000.0))
    assert t.budget.used == 500
    t.flush()
    assert t.budget.used == 0


def test_retransmitted_fast_open_syn_is_no_new_connection() -> None:
    s = Session(1)
    syn, synack, ack = s.handshake(syn_data=b"abc")
    ev = run(Tracker(), [syn, synack, syn, ack, s.data(0, True, 0, b"def")])
    assert streams(ev) == {(1, C2S): b"abcdef"}


def test_handshake_ack_without_mptcp_falls_back_and_later_mappings_are_ignored() -> None:
    """v1 handshake ACK with no MPTCP option: Linux's server falls back to TCP and takes every
    later byte in subflow order, ignoring DSS. A client that then sends mappings reordering
    its bytes must not make mproxy rebuild another stream than the server reads."""
    s = Session(1)
    pk = s.handshake(ack_cap=False)
    pk.append(_bare(s, 0, True, b"UNION "))
    # "SELECT" at relative subflow byte 7 claims to be data-level byte 1000
    pk.append(s.data(0, True, 1000, b"SELECT"))
    pk.append(_bare(s, 0, True, b" pw"))
    pk.append(_bare(s, 0, False, b"200"))
    ev = run(Tracker(), pk)
    got = streams(ev)
    assert got[(1, C2S)] == b"UNION SELECT pw"
    assert got[(1, S2C)] == b"200"
    assert any("handshake ACK without MP_CAPABLE" in e.detail for e in ev if isinstance(e, Notice))


def test_mappings_after_a_data_without_dss_fallback_are_ignored() -> None:
    s = Session(1)
    pk = s.handshake()
    pk += [s.data(0, True, 0, b"GET /?q="), _bare(s, 0, True, b"UNION ")]
    pk.append(s.data(0, True, 5000, b"SELECT"))  # after the fallback: Linux ignores the mapping
    pk.append(_bare(s, 0, True, b" 1"))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT 1"


def test_fast_path_leaves_a_fallen_back_connection_to_the_general_path() -> None:
    """The fast path takes in-order DSS-mapped data: after a fallback it must not either."""
    s = Session(1, timestamps=True)
    pk = s.handshake()
    pk += [s.data(0, True, 0, b"ab"), _bare(s, 0, True, b"cd"), s.data(0, True, 900, b"ef")]
    for fast in (True, False):
        t = Tracker()
        t.fast_path = fast
        assert streams(run(t, pk))[(1, C2S)] == b"abcdef"


def test_syn_data_on_a_plain_handshake_passes_through_untouched() -> None:
    """The server does not echo MP_CAPABLE: plain TCP, the SYN (with its Fast Open bytes) passes
    as it came, for the IDS to read as any TCP Fast Open."""
    s = Session(1)
    syn = s.handshake(syn_data=b"abc")[0]
    t = Tracker()
    ev = t.process(seg(syn, 1.0))
    plain = build_tcp(s.addr(2, 9), s.addr(2, 1), s.dport, s.sport, s.subs[0].isn[1], s.subs[0].isn[0] + 1,
                      SYN | ACK)
    ev += t.process(seg(plain, 1.1))
    assert [e.ip for e in ev if isinstance(e, PassThrough)] == [syn, plain]
    assert t.budget.used == 0


def test_fast_open_bytes_shift_only_the_initial_subflow() -> None:
    """A retransmitted join SYN is judged by the join's own ISN, not moved by the SYN's bytes."""
    s = Session(1)
    pk = s.handshake(syn_data=b"abc") + s.join(1)
    pk.append(pk[3])  # the join's SYN again
    pk += [s.data(1, True, 0, b"def"), s.data(0, True, 3, b"ghi")]
    ev = run(Tracker(), pk)
    assert streams(ev) == {(1, C2S): b"abcdefghi"}
    assert summary(ev)["subflows"][1]["bytes_c2s"] == 3


def test_a_server_packet_with_mp_capable_says_nothing_of_the_syn_bytes() -> None:
    """Only the client's next sequence number stands in for an unseen SYN/ACK."""
    s = Session(1)
    syn, _synack, ack = s.handshake(syn_data=b"abc")
    sub = s.subs[0]
    forged = s._pkt(sub, False, ACK, [m.MpCapable(1, m.CAP_H_HMAC, s.sk, s.ck).encode()], rel=1)
    ev = run(Tracker(), [syn, forged, ack, s.data(0, True, 0, b"def")])
    assert streams(ev)[(1, C2S)] == b"abcdef"


# -- inline: the gateway's verdict on a Fast Open SYN ------------------------------------------
def _gateway(log_only: bool = False):  # type: ignore[no-untyped-def]
    from mproxy.core.gateway import Gateway
    from mproxy.core.inspector import Inspector
    from mproxy.core.reactions import Reaction, Reactions
    from mproxy.core.rules import parse_rules

    rules = parse_rules('alert tcp any any -> any any (msg:"union select"; content:"UNION SELECT"; sid:7;)')
    reactions = Reactions(on_match=(Reaction.LOG,)) if log_only else Reactions()
    return Gateway(inspector=Inspector(rules), reactions=reactions)


def test_gateway_drops_a_fast_open_syn_whose_bytes_match() -> None:
    """The server's application gets a Fast Open SYN's bytes with the SYN: inline, they are judged
    before the SYN passes, and a match that fast-closes drops it."""
    from mproxy.core.gateway import Verdict

    s = Session(1)
    syn, synack, ack = s.handshake(syn_data=ATTACK)
    gw = _gateway()
    d = gw.packet(syn, 1000.0)
    assert d.verdict == Verdict.DROP and "Fast Open SYN" in d.reason
    (act,) = [r for r in gw.drain_records() if r["event"] == "action"]
    assert act["action"] == "fastclose" and act["trigger"] == "inspector" and act["sid"] == 7
    assert act["dropped"]["len"] == len(ATTACK) and not gw.tracker.connections
    assert gw.tracker.budget.used == 0
    # the client sends the SYN again, without the bytes (as Linux does), then the bytes as data:
    # a new connection, inspected as every stream, and killed again
    s2 = Session(1)
    syn2, synack2, ack2 = s2.handshake()
    for p in (syn2, synack2, ack2):
        assert gw.packet(p, 1001.0).verdict == Verdict.ACCEPT
    assert gw.packet(s2.data(0, True, 0, ATTACK), 1001.1).verdict == Verdict.DROP


def test_gateway_passes_a_harmless_fast_open_syn_and_inspects_its_bytes_once() -> None:
    from mproxy.core.gateway import Verdict

    s = Session(1)
    pk = s.handshake(syn_data=b"GET /?q=1 UNION ") + [s.data(0, True, 0, b"SELECT pw HTTP/1.1\r\n")]
    gw = _gateway()
    verdicts = [gw.packet(p, 1000.0 + i / 100).verdict for i, p in enumerate(pk)]
    assert verdicts == [Verdict.ACCEPT] * 3 + [Verdict.DROP]  # the match completes on the data packet
    (act,) = [r for r in gw.drain_records() if r["event"] == "action"]
    assert act["stream_offset"] == len(b"GET /?q=1 UNION SELECT")


def test_gateway_with_log_only_reports_a_fast_open_match_once() -> None:
    from mproxy.core.gateway import Verdict

    s = Session(1)
    gw = _gateway(log_only=True)
    pk = s.handshake(syn_data=ATTACK) + [s.data(0, True, 0, b"Host: a\r\n\r\n")]
    assert [gw.packet(p, 1000.0).verdict for p in pk] == [Verdict.ACCEPT] * 4
    (act,) = [r for r in gw.drain_records() if r["event"] == "action"]
    assert act["action"] == "log" and act["sid"] == 7

