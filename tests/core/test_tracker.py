"""Tracker behaviour from packets built by our encoder: packets in, events out."""

from __future__ import annotations

import gc
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mproxy.core.events import (
    ConnectionOpened, DataReleased, Direction, GapSkipped, Notice, NoticeType, Outcome, PassThrough, SubflowJoined,
)
from mproxy.core.tracker import ConnectionClosedSummary, Tracker, TrackerConfig
from mproxy.wire import mptcp as m
from mproxy.wire.build import build_tcp
from mproxy.wire.packet import ACK, RST, SYN
from mproxy.wire.rewrite import fill_tcp_checksum

from .session import Session, run, seg, streams

C2S, S2C = Direction.C2S, Direction.S2C


def notices(ev) -> list[NoticeType]:
    return [e.type for e in ev if isinstance(e, Notice)]


def summary(ev) -> dict:
    (s,) = [e.summary for e in ev if isinstance(e, ConnectionClosedSummary)]
    return s


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("ipver", [4, 6])
def test_two_subflows_both_directions(version: int, ipver: int) -> None:
    s = Session(version, ipver)
    pk = s.handshake() + s.join(1)
    pk += [s.data(0, True, 0, b"GET /?q=UNION SELE"), s.data(1, True, 18, b"CT * FROM users HTTP/1.0\r\n\r\n")]
    pk += [s.data(1, False, 0, b"HTTP/1.0 200 OK\r\n"), s.data(0, False, 17, b"\r\nbody")]
    pk += [s.data_fin(0, True, 46), s.data_fin(1, False, 23)]
    ev = run(Tracker(), pk)
    got = streams(ev)
    assert got[(1, C2S)] == b"GET /?q=UNION SELECT * FROM users HTTP/1.0\r\n\r\n"
    assert got[(1, S2C)] == b"HTTP/1.0 200 OK\r\n\r\nbody"
    assert sum(isinstance(e, SubflowJoined) for e in ev) == 1
    sm = summary(ev)
    assert sm["outcome"] == "data_fin" and sm["version"] == version
    assert [sf["role"] for sf in sm["subflows"]] == ["initial", "join"]
    assert not notices(ev)


def test_v1_mp_capable_with_data_maps_at_idsn_plus_one() -> None:
    s = Session(1)
    pk = s.handshake()
    sub = s.subs[0]
    cap = m.MpCapable(1, m.CAP_H_HMAC, s.ck, s.sk, 5)
    pk.append(s._pkt(sub, True, ACK, [cap.encode()], b"hello"))
    sub.next_rel[0] += 5
    pk.append(s.data(0, True, 5, b" world"))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"hello world"
    assert not notices(ev)


def test_plain_tcp_passes_through_and_fallback_in_handshake() -> None:
    s = Session(1)
    syn, synack, ack = s.handshake()
    plain_synack = build_tcp(s.addr(2, 9), s.addr(2, 1), s.dport, s.sport, s.subs[0].isn[1], s.subs[0].isn[0] + 1,
                             SYN | ACK)
    t = Tracker()
    ev = run(t, [syn, plain_synack], flush=False)
    assert [type(e) for e in ev] == [PassThrough, PassThrough]  # held SYN released with the SYN/ACK
    other = build_tcp(s.addr(5), s.addr(6), 1234, 80, 1, 1, ACK, payload=b"x")
    assert isinstance(t.process(seg(other))[0], PassThrough)


def _bare(s: Session, sf: int, from_client: bool, payload: bytes, rel: int | None = None) -> bytes:
    """A data segment with no MPTCP option at all (what a fallen-back Linux end sends); ``rel``
    resends earlier subflow bytes."""
    sub = s.subs[sf]
    d = 0 if from_client else 1
    pkt = s._pkt(sub, from_client, ACK, [], payload, rel=rel)
    if rel is None:
        sub.next_rel[d] += len(payload)
    return pkt


def test_data_without_dss_after_mappings_is_a_fallback_both_ways() -> None:
    """Linux falls back when in-order data has no mapping (no join yet): the bytes continue the
    stream where the last mapping ended, in both directions, and nothing waits for a mapping."""
    s = Session(1)
    pk = s.handshake()
    pk += [s.data(0, True, 0, b"GET /a HTTP/1.1\r\n"), s.data(0, False, 0, b"HTTP/1.1 200 OK\r\n")]
    pk += [_bare(s, 0, True, b"X-Evil: "), _bare(s, 0, False, b"body "), _bare(s, 0, True, b"1\r\n\r\n")]
    pk += [_bare(s, 0, False, b"more")]
    ev = run(Tracker(), pk)
    got = streams(ev)
    assert got[(1, C2S)] == b"GET /a HTTP/1.1\r\nX-Evil: 1\r\n\r\n"
    assert got[(1, S2C)] == b"HTTP/1.1 200 OK\r\nbody more"
    assert notices(ev).count(NoticeType.INFINITE_MAPPING) == 2
    sm = summary(ev)
    assert sm["c2s"]["gap_bytes"] == 0 and sm["s2c"]["gap_bytes"] == 0


def test_fallback_after_resent_copies_and_an_announced_data_fin() -> None:
    """As captured from Linux 6.18 (lab scenario dss_stripped): the sender had announced its
    DATA_FIN, fell back, resent bytes already mapped without DSS, then sent the rest without DSS,
    and a bare segment overtook the bytes before it. Copies are compared, the rest continues
    the stream up to the DATA_FIN."""
    s = Session(1)
    pk = s.handshake()
    pk += [s.data(0, True, 0, b"abc"), s.data(0, True, 3, b"def"), s.data_fin(0, True, 15)]
    pk.append(_bare(s, 0, True, b"def", rel=4))  # a copy, no DSS now
    ghi, jkl, mno = _bare(s, 0, True, b"ghi"), _bare(s, 0, True, b"jkl"), _bare(s, 0, True, b"mno")
    pk += [ghi, mno, jkl]  # the last two swapped: "mno" waits for "jkl"
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"abcdefghijklmno"
    sm = summary(ev)
    assert sm["c2s"]["data_fin"] and sm["c2s"]["gap_bytes"] == 0 and sm["c2s"]["duplicate_bytes"] == 3
    assert notices(ev) == [NoticeType.INFINITE_MAPPING]


def test_fallback_right_after_mp_capable_with_data() -> None:
    """The v1 first data packet maps itself (MP_CAPABLE with data); bare data right after it is
    the fallback, not bytes waiting for a mapping."""
    s = Session(1)
    pk = s.handshake()
    sub = s.subs[0]
    pk.append(s._pkt(sub, True, ACK, [m.MpCapable(1, m.CAP_H_HMAC, s.ck, s.sk, 5).encode()], b"hello"))
    sub.next_rel[0] += 5
    pk.append(_bare(s, 0, True, b" world"))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"hello world"
    assert notices(ev) == [NoticeType.INFINITE_MAPPING]


def test_data_without_dss_is_no_fallback_once_a_join_is_up_or_out_of_order() -> None:
    """After a join Linux cannot fall back (it resets the subflow): bare bytes are not taken.
    A bare segment after a hole is not in order: it waits for a mapping, as before."""
    s = Session(1)
    pk = s.handshake() + s.join(1)
    pk += [s.data(0, True, 0, b"abc"), _bare(s, 0, True, b"zzz")]
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"abc"
    assert NoticeType.INFINITE_MAPPING not in notices(ev)

    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"abc")]
    s.subs[0].next_rel[0] += 5  # five bytes the capture missed
    pk.append(_bare(s, 0, True, b"zzz"))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"abc"
    assert NoticeType.INFINITE_MAPPING not in notices(ev)


def test_reinjection_with_differing_bytes_raises_notice_first_copy_wins() -> None:
    s = Session(1)
    pk = s.handshake() + s.join(1)
    pk.append(s.data(0, True, 0, b"benign request"))
    pk.append(s.data(1, True, 0, b"UNION SELECT 1"))  # same DSNs, other bytes, other path
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"benign request"
    assert NoticeType.OVERLAP_MISMATCH in notices(ev)


def test_side_channel_gap_when_peer_acks_unseen_bytes() -> None:
    s = Session(1)
    pk = s.handshake()
    pk.append(s.data(0, True, 0, b"seen"))
    # 100 bytes travel on a path the gateway does not see; the server DATA_ACKs them
    pk.append(s.ack(0, False, s.idsn[0] + 104))
    s.subs[0].next_rel[0] += 0
    pk.append(s.data(0, True, 104, b"after"))
    ev = run(Tracker(), pk)
    gaps = [e for e in ev if isinstance(e, GapSkipped)]
    assert len(gaps) == 1 and gaps[0].length == 100 and gaps[0].acked
    assert NoticeType.SIDE_CHANNEL in notices(ev)
    assert streams(ev)[(1, C2S)] == b"seenafter"
    assert summary(ev)["c2s"]["gap_bytes"] == 100


def test_off_window_injection_is_not_accepted() -> None:
    s = Session(1)
    pk = s.handshake()
    pk.append(s.data(0, True, 0, b"real"))
    pk.append(s.ack(0, False, s.idsn[0] + 4))  # server acks: window known
    # injected segment far outside the subflow window, claiming the next DSNs
    pk.append(s.data(0, True, 4, b"EVIL", rel=5 + 50_000_000))
    pk.append(s.data(0, True, 4, b"good"))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"realgood"
    assert NoticeType.OUT_OF_WINDOW in notices(ev)


def test_mapping_spanning_segments_and_late_mapping() -> None:
    s = Session(1)
    pk = s.handshake()
    # a 12-byte mapping announced only on its second segment
    a = s.data(0, True, 0, b"abcdef", mapping=False)
    b = s.data(0, True, 6, b"ghijkl", map_rel=1, map_len=12)
    ev = run(Tracker(), pk + [a, b])
    assert streams(ev)[(1, C2S)] == b"abcdefghijkl"


def test_dss_checksum_verified_and_failure_dropped() -> None:
    s = Session(0, csum=True, dsn64=False)
    pk = s.handshake()
    pk.append(s.data(0, True, 0, b"good"))
    bad = bytearray(s.data(0, True, 4, b"more"))
    bad[-1] ^= 0xFF  # payload corrupted after the DSS checksum was computed, the TCP checksum fixed
    fill_tcp_checksum(bad)  # up (a payload-rewriting middlebox: the receiver takes the segment)
    pk.append(bytes(bad))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"good"
    assert NoticeType.DSS_CHECKSUM_FAILURE in notices(ev)


def test_infinite_mapping_fallback() -> None:
    s = Session(1)
    pk = s.handshake()
    pk.append(s.data(0, True, 0, b"mptcp "))
    sub = s.subs[0]
    inf = m.dss(s.idsn[1], s.idsn[0] + 6, sub.next_rel[0], 0)
    pk.append(s._pkt(sub, True, ACK, [inf.encode()], b"then tcp"))
    sub.next_rel[0] += 8
    pk.append(s._pkt(sub, True, ACK, [], b" only"))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"mptcp then tcp only"
    assert NoticeType.INFINITE_MAPPING in notices(ev)


def test_fastclose_ends_connection_with_reset() -> None:
    s = Session(1)
    pk = s.handshake() + s.join(1)
    pk.append(s.data(0, True, 0, b"x"))
    pk.append(s.rst(1, True, [m.MpFastclose(s.sk).encode()]))
    ev = run(Tracker(), pk, flush=False)
    closed = [e for e in ev if isinstance(e, ConnectionClosedSummary)]
    assert closed and closed[0].outcome == Outcome.FASTCLOSE and closed[0].reset


def test_join_grouped_by_token_and_hmac_failure_noticed() -> None:
    s = Session(1)
    pk = s.handshake() + s.join(1, bad_hmac=True)
    ev = run(Tracker(), pk)
    assert NoticeType.JOIN_HMAC_FAILURE in notices(ev)
    s2 = Session(1)
    ev2 = run(Tracker(), s2.handshake() + s2.join(1, token=0xDEADBEEF))
    assert NoticeType.JOIN_UNKNOWN_TOKEN in notices(ev2)


def test_join_grouped_by_add_addr_when_handshake_missed() -> None:
    s = Session(1)
    hs = s.handshake()
    ann = m.AddAddr(1, 5, s.addr(2, 9), None, False, 0)
    sub = s.subs[0]
    first = s.data(0, True, 0, b"abc")
    pk = [first, s._pkt(sub, False, ACK, [ann.encode(), m.dss(s.idsn[0] + 3).encode()])]
    pk += s.join(1, token=0x01020304)[0:3]  # unknown token: handshake not seen
    pk.append(s.data(1, True, 3, b"def"))
    ev = run(Tracker(), pk)
    del hs
    sm = summary(ev)
    assert sm["pickup"] and len(sm["subflows"]) == 2
    assert streams(ev)[(1, C2S)] == b"abcdef"


def test_pickup_mid_stream_by_dsn_proximity() -> None:
    s = Session(1)
    s.handshake()
    s.join(1)
    t = Tracker()
    pk = [s.data(0, True, 0, b"0123"), s.data(1, True, 4, b"4567"), s.data(0, True, 8, b"89")]
    ev = run(t, pk)
    sm = summary(ev)
    assert sm["pickup"] and len(sm["subflows"]) == 2
    assert streams(ev)[(1, C2S)] == b"0123456789"


def test_a_mid_stream_subflow_of_another_connection_between_the_same_hosts_stays_apart() -> None:
    """A subflow first seen mid-stream joins a connection only when every value its DSS carries agrees
    with that connection: here another connection's packet whose 32-bit DATA_ACK lies near this
    connection's server stream but whose 64-bit DSN is nowhere near its client stream. The lab met
    it (a connection of the test before, still closing, as mproxy started): joined, its DATA_FIN and
    FIN ended the new connection's client stream early and the IDS lost the rest."""
    a = Session(1)
    pk = a.handshake() + [a.data(0, True, 0, b"GET /?q=")]
    b = Session(1, client_key=0x0102030405060708, server_key=0x1112131415161718, sport=41000, ack64=False)
    b.handshake()
    pk.append(b.data(0, True, 0, b"other", data_ack=a.idsn[1] + 5))
    pk.append(a.data(0, True, 8, b"UNION SELECT"))
    tr = Tracker()
    ev = run(tr, pk, flush=False)
    assert len(tr.connections) == 2
    (first,) = [c for c in tr.connections.values() if not c.pickup]
    assert [sf.role.value for sf in first.subflows] == ["initial"]
    assert streams(ev)[(first.id, C2S)] == b"GET /?q=UNION SELECT"


def test_a_subflow_first_seen_mid_stream_counts_once_its_receiver_acknowledges_bytes_on_it() -> None:
    """Data on a subflow whose handshake was not seen, attached by its DSNs to a connection whose
    handshake was, is kept until the receiver acknowledges it on that subflow. A made-up "subflow"
    with the next DSNs and other bytes was what the IDS read, while the server (which answers it
    with a RST) read the real subflow's."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    s.join(1)  # never completed: the server does not know this subflow
    pk.append(s.data(1, True, 8, b"BENIGN......"))
    pk.append(s.data_fin(1, True, 20))  # its DATA_FIN (and DATA_ACKs, and the like) count for nothing
    pk.append(s.data(0, True, 8, b"UNION SELECT"))
    pk.append(s.ack(0, False, s.idsn[0] + 20))
    pk.append(s.rst(1, False))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT"
    (n,) = [e for e in ev if isinstance(e, Notice)]
    assert n.type == NoticeType.OUT_OF_WINDOW and "handshake was not seen" in n.detail and "reset" in n.detail

    # a real subflow whose join the capture missed: the server's ACK on it takes its bytes, then
    # they flow as any subflow's; those the receiver DATA_ACKs on another subflow first are taken too
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    s.join(1)
    pk += [s.data(1, True, 8, b"UNION SELECT"), s.data(1, True, 20, b" 1,2")]
    pk.append(s.ack(0, False, s.idsn[0] + 24))
    pk.append(s.ack(1, False, s.idsn[0] + 24))
    pk += [s.data(1, True, 24, b" FROM t"), s.data_fin(1, True, 31), s.data_fin(0, False, 0)]
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT 1,2 FROM t"
    assert not notices(ev)
    sm = summary(ev)
    assert [(x["role"], x["bytes_c2s"]) for x in sm["subflows"]] == [("initial", 8), ("pickup", 23)]
    assert sm["outcome"] == "data_fin" and sm["c2s"]["gap_bytes"] == 0


def test_a_data_ack_of_data_never_sent_is_ignored() -> None:
    """A DATA_ACK far past anything its sender can have sent (a forged one of 0: 2**60 bytes ahead)
    is ignored, as the sender ignores it; taken, it made a 2**60-byte side channel of the server's
    stream (which ``on_side_channel`` may act on) and its ``acked_bytes``."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    pk.append(s.data(0, True, 8, b"0123456789", data_ack=0))
    pk.append(s.ack(0, False, s.idsn[0] + 18))
    pk += [s.data(0, False, 0, b"HTTP/1.1 200"), s.data_fin(0, True, 18), s.data_fin(0, False, 12)]
    ev = run(Tracker(), pk)
    assert streams(ev) == {(1, C2S): b"GET /?q=0123456789", (1, S2C): b"HTTP/1.1 200"}
    (n,) = [e for e in ev if isinstance(e, Notice)]
    assert n.type == NoticeType.INVALID_OPTION and "past anything its sender can have sent" in n.detail
    sm = summary(ev)
    assert sm["s2c"]["gap_bytes"] == 0 and sm["s2c"]["acked_bytes"] == 0


def test_a_forged_data_ack_ahead_of_the_stream_does_not_hide_the_bytes_that_follow() -> None:
    """A DATA_ACK past everything the server was seen to send, but within the loose bound of what
    it may have sent on paths the gateway does not see (the client can forge one). Skipped at once
    as a side channel, the server's real bytes were then dropped as already skipped, and the IDS
    never read the response. The tail is now noticed but not skipped: the bytes that come are read."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /", data_ack=s.idsn[1] + 5000)]
    pk.append(s.ack(0, False, s.idsn[0] + 5))
    pk += [s.data(0, False, 0, b"HTTP/1.1 200 OK"), s.data(0, False, 15, b"\r\n\r\nmalware")]
    pk += [s.data_fin(0, True, 5), s.data_fin(0, False, 26)]
    ev = run(Tracker(), pk)
    assert streams(ev) == {(1, C2S): b"GET /", (1, S2C): b"HTTP/1.1 200 OK\r\n\r\nmalware"}
    (n,) = [e for e in ev if isinstance(e, Notice)]  # the alert is as timely as before
    assert n.type == NoticeType.SIDE_CHANNEL and "the stream waits there" in n.detail
    sm = summary(ev)
    assert sm["outcome"] == "data_fin" and sm["s2c"]["gap_bytes"] == 0 and not [e for e in ev if isinstance(e, GapSkipped)]


def test_an_acknowledged_tail_nothing_came_past_is_a_gap_when_the_connection_ends() -> None:
    """Bytes sent only on a path the gateway does not see, acknowledged, and then the subflows end:
    noticed once when acknowledged (however far the DATA_ACK grows), skipped and counted at the end."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"seen")]
    pk += [s.ack(0, False, s.idsn[0] + 104), s.ack(0, False, s.idsn[0] + 204)]
    pk += [s.fin(0, True), s.fin(0, False)]
    ev = run(Tracker(), pk)
    (n,) = [e for e in ev if isinstance(e, Notice)]
    assert n.type == NoticeType.SIDE_CHANNEL and n.detail.startswith("100 bytes at dsn")
    (g,) = [e for e in ev if isinstance(e, GapSkipped)]
    assert g.length == 200 and g.acked
    sm = summary(ev)
    assert sm["outcome"] == "fin" and sm["c2s"]["gap_bytes"] == 200 and sm["c2s"]["bytes"] == 4


def test_a_connection_whose_subflows_all_ended_goes_on_over_a_new_join() -> None:
    """Linux keeps an established connection whose subflows all ended (no DATA_FIN) open for
    net.mptcp.close_timeout (60 s), and a subflow that joins it then carries the stream on.
    Closed at the last subflow's RST, the connection's token was forgotten, the join came as an
    unknown token's, and the IDS read ``GET /?q=UNION `` and never ``SELECT pw``."""
    s = Session(1)
    # the client's request split: its only subflow reset (exact sequence number) after the first
    # half, then a new subflow joined with the token carrying the second
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=UNION ")]
    pk += [s.ack(0, False, s.idsn[0] + 14), s.rst(0, True)]
    pk += s.join(1) + [s.data(1, True, 14, b"SELECT pw"), s.ack(1, False, s.idsn[0] + 23)]
    pk += [s.data_fin(1, True, 23), s.data_fin(1, False, 0)]
    ev = run(Tracker(), pk)
    assert streams(ev) == {(1, C2S): b"GET /?q=UNION SELECT pw"}
    assert not notices(ev)
    sm = summary(ev)
    assert sm["outcome"] == "data_fin" and len(sm["subflows"]) == 2


def test_a_rst_the_receiver_answers_with_a_challenge_ack_does_not_end_the_stream() -> None:
    """A RST in the window but not at the receiver's next byte: Linux answers it with a challenge
    ACK and reads on (RFC 5961). mproxy counts any RST in the window as the subflow's end, and the
    connection ended with it: the client sent one on its only subflow and the IDS never read the
    rest of its request. The connection now waits for a join (see above), and the rest is read."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=UNION "), s.ack(0, False, s.idsn[0] + 14)]
    pk.append(s._pkt(s.subs[0], True, RST | ACK, [], rel=s.subs[0].next_rel[0] + 100))
    pk += [s.data(0, True, 14, b"SELECT pw"), s.ack(0, False, s.idsn[0] + 23)]
    pk += [s.data_fin(0, True, 23), s.data_fin(0, False, 0)]
    ev = run(Tracker(), pk)
    assert streams(ev) == {(1, C2S): b"GET /?q=UNION SELECT pw"}
    assert summary(ev)["outcome"] == "data_fin"


def test_ended_joins_make_room_at_the_per_connection_subflow_limit() -> None:
    """Linux limits a connection's live subflows, so it may reset them and join new ones again and
    again. Counting every subflow ever joined, the limit refused the joins past it, and their bytes
    (the rest of the request, as the server read it) reached no stream."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"a"), s.ack(0, False, s.idsn[0] + 1), s.rst(0, True)]
    for i in range(1, 7):
        pk += s.join(i, addr_id=i)
        pk += [s.data(i, True, i, bytes([97 + i])), s.ack(i, False, s.idsn[0] + i + 1), s.rst(i, True)]
    pk += s.join(7, addr_id=7) + [s.data_fin(7, True, 7), s.data_fin(7, False, 0)]
    ev = run(Tracker(TrackerConfig(max_subflows_per_connection=3)), pk)
    assert streams(ev) == {(1, C2S): b"abcdefg"}
    sm = summary(ev)
    assert sm["outcome"] == "data_fin" and sm["subflows_retired"] == 5
    assert [sf["role"] for sf in sm["subflows"]] == ["initial", "join", "join"]


def test_a_connection_whose_subflows_all_ended_ends_after_close_timeout() -> None:
    """No subflow joins within close_timeout: the connection ends then, as it ended before (reset),
    its record written; at the end of input, and at an idle timeout, it ends so too. With a
    DATA_FIN seen, or close_timeout 0, it ends with its last subflow."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /"), s.ack(0, False, s.idsn[0] + 5), s.rst(0, True)]
    t = Tracker()
    ev = run(t, pk, flush=False)
    assert not [e for e in ev if isinstance(e, ConnectionClosedSummary)] and len(t.connections) == 1
    assert not [e for e in t.expire(1059.0) if isinstance(e, ConnectionClosedSummary)]
    ev = t.expire(1061.0)
    assert summary(ev)["outcome"] == "reset" and not t.connections
    for cfg, tail in ((TrackerConfig(), []), (TrackerConfig(close_timeout=0), []),
                      (TrackerConfig(), [s.data_fin(0, True, 5)])):
        s = Session(1)
        pk = s.handshake() + [s.data(0, True, 0, b"GET /"), s.ack(0, False, s.idsn[0] + 5)] + tail
        pk += [s.rst(0, True)]
        t = Tracker(cfg)
        ev = run(t, pk, flush=False)
        if cfg.close_timeout and not tail:
            ev += t.flush()  # the end of input: reset, not end_of_input
        assert summary(ev)["outcome"] == "reset"
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /"), s.ack(0, False, s.idsn[0] + 5), s.fin(0, True), s.fin(0, False)]
    t = Tracker(TrackerConfig(idle_timeout=30.0))
    run(t, pk, flush=False)
    assert summary(t.expire(1031.0))["outcome"] == "fin"
    # packets still come on its subflows (an RST its receiver took for a stale one): it waits
    # close_timeout after the last of them
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /"), s.ack(0, False, s.idsn[0] + 5), s.rst(0, True)]
    t = Tracker()
    run(t, pk, flush=False)
    t.process(seg(s.ack(0, False, s.idsn[0] + 5), 1050.0))
    assert not [e for e in t.expire(1061.0) if isinstance(e, ConnectionClosedSummary)]
    sm = summary(t.expire(1111.0))
    assert sm["outcome"] == "reset" and sm["end"] == 1050.0


def test_connection_limit_is_counted() -> None:
    t = Tracker(TrackerConfig(max_connections=3))
    for i in range(6):
        s = Session(1, sport=41000 + i)
        s._isn += i * 7
        run(t, s.handshake(), flush=False)
    assert len(t.connections) <= 3
    assert t.stats.memcap["connections"] >= 3


def test_idle_connections_expire() -> None:
    t = Tracker(TrackerConfig(idle_timeout=10.0))
    s = Session(1)
    ev = run(t, s.handshake(), flush=False)
    later = build_tcp(s.addr(7), s.addr(8), 1, 2, 0, 0, ACK)
    ev += t.process(seg(later, 2000.0))
    assert [e.outcome for e in ev if isinstance(e, ConnectionClosedSummary)] == [Outcome.IDLE]
    assert not t.connections


def test_an_ended_connection_is_freed_by_reference_counting() -> None:
    """Once its subflow entries have lingered and gone, nothing of an ended connection is left for the
    cycle collector: mproxy runs it rarely (mproxy.gcpolicy), so a connection <-> subflow cycle per
    connection would hold every ended connection's state until a full collection."""
    from mproxy.core.tracker import Connection, Subflow

    gc.collect()
    gc.disable()
    try:
        t = Tracker()
        for i in range(20):
            s = Session(1, sport=41000 + i)
            pk = s.handshake() + s.join(1) + [s.data(0, True, 0, b"GET / HTTP/1.0\r\n\r\n"),
                                              s.data(1, False, 0, b"HTTP/1.0 200 OK\r\n")]
            pk += [s.data_fin(0, True, 18), s.data_fin(1, False, 17), s.data_fin(0, True, 18)]
            run(t, pk, flush=False)
        assert t.stats.outcomes["data_fin"] == 20
        t.expire(1000.0 + 3600)  # past closed_linger: every subflow entry goes
        assert not t.connections and not t._sf
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (Connection, Subflow))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c2s=st.binary(min_size=1, max_size=12000),
    s2c=st.binary(min_size=0, max_size=2000),
    nsub=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    version=st.sampled_from([0, 1]),
    dsn64=st.booleans(),
    dup_rate=st.floats(0, 0.5),
    reinject_rate=st.floats(0, 0.5),
)
def test_property_any_split_order_duplicates_reinjection(c2s, s2c, nsub, seed, version, dsn64, dup_rate,
                                                         reinject_rate) -> None:
    """Any split of both streams over 1-8 subflows, any arrival order, duplicates and
    reinjections on other subflows: the rebuilt streams equal the originals."""
    rnd = random.Random(seed)
    s = Session(version, dsn64=dsn64)
    setup = s.handshake()
    for i in range(1, nsub):
        setup += s.join(i, addr_id=i)
    data: list[bytes] = []
    for from_client, payload in ((True, c2s), (False, s2c)):
        off = 0
        while off < len(payload):
            n = rnd.randint(1, rnd.choice((8, 200, 1400)))
            chunk = payload[off : off + n]
            sf = rnd.randrange(nsub)
            data.append(s.data(sf, from_client, off, chunk))
            if rnd.random() < reinject_rate and nsub > 1:
                other = (sf + rnd.randrange(1, nsub)) % nsub
                data.append(s.data(other, from_client, off, chunk))
            off += len(chunk)
    data += [p for p in data if rnd.random() < dup_rate]
    rnd.shuffle(data)
    fins = [s.data_fin(rnd.randrange(nsub), True, len(c2s)), s.data_fin(rnd.randrange(nsub), False, len(s2c))]
    ev = run(Tracker(), setup + data + fins)
    got = streams(ev)
    assert got.get((1, C2S), b"") == c2s
    assert got.get((1, S2C), b"") == s2c
    assert summary(ev)["outcome"] == "data_fin"
    assert not notices(ev)
    assert [e for e in ev if isinstance(e, ConnectionOpened)][0].conn_id == 1
    assert all(isinstance(e.data, bytes) for e in ev if isinstance(e, DataReleased))


def test_reused_four_tuple_starts_a_new_connection() -> None:
    """Found by the replay benchmark: a closed connection's entries must not swallow a new one."""
    t = Tracker()
    first = Session(1)
    pk = first.handshake() + [first.data(0, True, 0, b"one"), first.data_fin(0, True, 3),
                              first.data_fin(0, False, 0)]
    ev = run(t, pk, flush=False)
    second = Session(1, client_key=0x0102030405060708, server_key=0x1112131415161718)
    second._isn = 777_000  # same 4-tuple, new ISNs and keys, 5 seconds later
    pk2 = second.handshake() + [second.data(0, True, 0, b"two")]
    for p in pk2:
        ev += t.process(seg(p, 1005.0))
    ev += t.flush()
    closed = [e.summary for e in ev if isinstance(e, ConnectionClosedSummary)]
    assert [c["c2s"]["bytes"] for c in closed] == [3, 3]
    assert closed[0]["client_port"] == closed[1]["client_port"]


def test_closed_subflow_entries_linger_then_go() -> None:
    t = Tracker(TrackerConfig(closed_linger=5.0))
    s = Session(1)
    run(t, s.handshake() + [s.data_fin(0, True, 0), s.data_fin(0, False, 0)], flush=False)
    assert not t.connections and t._sf
    t.process(seg(build_tcp(s.addr(7), s.addr(8), 1, 2, 0, 0, ACK), 1003.0))
    assert t._sf  # still lingering for late FIN/ACKs
    t.process(seg(build_tcp(s.addr(7), s.addr(8), 1, 2, 0, 0, ACK), 1010.0))
    assert not t._sf


@pytest.mark.parametrize("flood", ["syn", "join"])
def test_a_flood_at_the_limits_leaves_an_ended_connections_entries_lingering(flood: str) -> None:
    """Right after a connection ended, a SYN flood (at the connection limit) or a join flood with
    unknown tokens (at the subflow limit): the flood's own entries make room, the ended
    connection's lingering ones stay, and its late retransmission is absorbed, not picked up
    as a new connection (a second conversation for the IDS with bytes the client already had)."""
    t = Tracker(TrackerConfig(max_connections=5, max_subflows=12))
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET / HTTP/1.0\r\n\r\n")]
    late = s.data(0, False, 0, b"HTTP/1.0 200 OK\r\n\r\n")
    run(t, pk + [late, s.data_fin(0, True, 18), s.data_fin(0, False, 19)], flush=False)
    assert not t.connections and t.stats.connections == 1
    joiner = Session(1, sport=30000, client_key=0x99, server_key=0x98)
    for i in range(100):
        syn = Session(1, sport=20000 + i).handshake()[0] if flood == "syn" else joiner.join(1, token=0x10000 + i)[0]
        t.process(seg(syn, 1001.0 + i / 1000))
    assert t.stats.memcap["connections" if flood == "syn" else "subflows"] > 0
    opened = t.stats.connections
    ev = t.process(seg(late, 1002.0))
    assert t.stats.connections == opened and not [e for e in ev if isinstance(e, ConnectionOpened)]
    assert len(t._lingering) == 1 and len(t._lingering_unopened) <= t.config.max_subflows
    # past closed_linger the entries go as before, and the same segment is then picked up
    t.process(seg(late, 1040.0))
    assert t.stats.connections == opened + 1


def test_off_window_packet_cannot_forge_a_data_ack_gap() -> None:
    """An off-path DATA_ACK far ahead would make the tracker skip real bytes as a 'gap'
    and then drop them as duplicates: the whole out-of-window packet must be ignored."""
    s = Session(1)
    pk = s.handshake()
    pk.append(s.data(0, True, 0, b"GET /?q=1"))
    pk.append(s.ack(0, False, s.idsn[0] + 9))  # the server's real ack: window known
    sub = s.subs[0]
    forged = s._pkt(sub, False, ACK, [m.dss(s.idsn[0] + 5000).encode()], rel=sub.next_rel[1] + 900_000_000)
    pk.append(forged)
    pk.append(s.data(0, True, 9, b"' UNION SELECT"))
    ev = run(Tracker(), pk)
    assert streams(ev)[(1, C2S)] == b"GET /?q=1' UNION SELECT"
    assert not [e for e in ev if isinstance(e, GapSkipped)]
    assert NoticeType.OUT_OF_WINDOW in notices(ev)
