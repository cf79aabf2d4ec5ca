"""Which RSTs the receiver takes, and what a taken one ends. Linux (tcp_validate_incoming, RFC 5961
3.2) resets a subflow only for an RST at its next sequence number (the FIN's, or the one after it,
once the sender's FIN came), or, where SACK was negotiated, at the end of the highest block it holds
out of order; any other RST
in its window gets a challenge ACK and is discarded, its MPTCP options (MP_FASTCLOSE) unread. After
a taken RST neither end has a socket for the subflow: bytes sent on it later are never read."""
from __future__ import annotations

from mproxy.core.events import Notice
from mproxy.core.tracker import Tracker
from mproxy.wire import mptcp as m
from mproxy.wire.packet import ACK, FIN, RST
from mproxy.wire.rewrite import fill_tcp_checksum

from .session import Session, c2s, notice_types, run

BODY = b"UNION SELECT pw"




def fastclose_then_more(off: int) -> tuple[Tracker, list]:
    """``GET /?q=``, then RST + MP_FASTCLOSE (the server's own key) ``off`` bytes past the server's
    next sequence number, then the rest of the request."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    pk.append(s._pkt(s.subs[0], True, RST | ACK, [m.MpFastclose(s.sk).encode()], rel=s.subs[0].next_rel[0] + off))
    pk.append(s.data(0, True, 8, BODY))
    pk += [s.ack(0, False, s.idsn[0] + 8 + len(BODY)), s.data_fin(0, True, 8 + len(BODY)), s.data_fin(0, False, 0)]
    t = Tracker()
    return t, run(t, pk)


def test_an_rst_with_mp_fastclose_off_the_next_sequence_number_does_not_end_the_stream() -> None:
    """The evasion: one byte (or a thousand) off, Linux discards the RST and its MP_FASTCLOSE and
    reads on; taken anywhere in the window, it ended the IDS's stream before the request's tail."""
    for off in (1, 1000):
        t, ev = fastclose_then_more(off)
        assert c2s(ev) == b"GET /?q=" + BODY
        assert notice_types(ev) == ["out_of_window"] and "challenge ACK" in next(
            e.detail for e in ev if isinstance(e, Notice))
        assert dict(t.stats.outcomes) == {"data_fin": 1}


def test_the_exact_rst_with_mp_fastclose_ends_the_connection() -> None:
    t, ev = fastclose_then_more(0)
    assert c2s(ev) == b"GET /?q="
    assert dict(t.stats.outcomes) == {"fastclose": 1} and notice_types(ev) == []


def test_bytes_sent_on_a_subflow_after_its_rst_are_not_read() -> None:
    """The join is reset at its next sequence number; BENIGN then sent on it at the request's next
    DSNs reaches no socket, and the server reads UNION SELECT from the initial subflow."""
    s = Session(1)
    pk = s.handshake() + s.join(1) + [s.data(0, True, 0, b"abcd")]
    pk.append(s._pkt(s.subs[1], True, RST | ACK, [], rel=s.subs[1].next_rel[0]))
    pk.append(s.data(1, True, 4, b"BENIGN"))
    pk.append(s.data(0, True, 4, b"UNION SELECT"))
    pk += [s.ack(0, False, s.idsn[0] + 16), s.data_fin(0, True, 16), s.data_fin(0, False, 0)]
    ev = run(Tracker(), pk)
    assert c2s(ev) == b"abcdUNION SELECT"
    (n,) = [e for e in ev if isinstance(e, Notice)]
    assert n.type.value == "out_of_window" and "after its sender reset it" in n.detail


def test_an_rst_at_the_end_of_what_the_receiver_holds_out_of_order_is_taken() -> None:
    """Bytes after a hole (kept): an RST at their end is at the receiver's highest SACK block's
    edge, which Linux takes; one byte before it is not."""
    for at, taken in ((21, True), (20, False)):
        s = Session(1)
        pk = s.handshake() + [s.data(0, True, 0, b"abcd"), s.data(0, True, 14, b"opqrst", rel=15)]
        pk.append(s._pkt(s.subs[0], True, RST | ACK, [], rel=at))
        t = Tracker()
        run(t, pk, flush=False)
        (conn,) = t.connections.values()
        assert conn.subflows[0].reset is taken


def test_without_sack_the_out_of_order_edge_takes_no_rst() -> None:
    """The evasion: SACK is an end's to refuse (a SYN without SACK_PERM). Linux then takes an RST
    only at its next sequence number; taken at the end of bytes kept after a hole, RST +
    MP_FASTCLOSE ended the IDS's stream at ``GET /?q=`` while the server read the request's tail.
    With SACK on, the same RST ends both."""
    for sack in (False, True):
        s = Session(1, sack=sack)
        pk = s.handshake() + [s.data(0, True, 0, b"GET /?q="), s.data(0, True, 18, b"BENIGN", rel=19)]
        pk.append(s._pkt(s.subs[0], True, RST | ACK, [m.MpFastclose(s.sk).encode()], rel=25))
        pk.append(s.data(0, True, 8, b"0123456789" + BODY))
        end = 18 + len(BODY)
        pk += [s.ack(0, False, s.idsn[0] + end), s.data_fin(0, True, end), s.data_fin(0, False, 0)]
        t = Tracker()
        ev = run(t, pk)
        if sack:
            assert c2s(ev) == b"GET /?q=" and dict(t.stats.outcomes) == {"fastclose": 1}
        else:
            assert c2s(ev) == b"GET /?q=0123456789" + BODY, c2s(ev)
            assert "out_of_window" in notice_types(ev) and dict(t.stats.outcomes) == {"data_fin": 1}


def sack_blocks(pieces: list[tuple[int, int]], rst_at: int) -> tuple[Tracker, list]:
    """``GET /?q=`` on the initial subflow (relative sequence 1-8), then ``(rel, length)`` pieces
    after a hole (mapped far ahead), then RST + MP_FASTCLOSE at ``rst_at``, then the rest."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    pk += [s.data(0, True, 100_000 + rel, b"x" * n, rel=rel) for rel, n in pieces]
    pk.append(s._pkt(s.subs[0], True, RST | ACK, [m.MpFastclose(s.sk).encode()], rel=rst_at))
    pk.append(s.data(0, True, 8, BODY))
    end = 8 + len(BODY)
    pk += [s.ack(0, False, s.idsn[0] + end), s.data_fin(0, True, end), s.data_fin(0, False, 0)]
    t = Tracker()
    return t, run(t, pk)


def test_an_rst_at_the_end_of_a_sack_block_pushed_out_is_not_taken() -> None:
    """The evasion: a Linux receiver keeps four SACK blocks, the most recently changed, and takes
    an RST at the highest end among them only. Five blocks, the highest sent first: the other
    four push it out, so an RST at its end gets a challenge ACK; taken, it ended the IDS's stream.
    At the highest end of the four left, the RST is taken."""
    five = [(100, 6), (20, 2), (30, 2), (40, 2), (50, 2)]
    t, ev = sack_blocks(five, 106)
    assert c2s(ev) == b"GET /?q=" + BODY and dict(t.stats.outcomes) == {"data_fin": 1}
    assert "challenge ACK" in next(e.detail for e in ev if isinstance(e, Notice) and "RST" in e.detail)
    t, ev = sack_blocks(five, 52)
    assert c2s(ev) == b"GET /?q=" and dict(t.stats.outcomes) == {"fastclose": 1}


def test_a_block_extended_moves_to_the_front_and_merges_what_it_reaches() -> None:
    """Extending the highest block (a segment touching it) brings it to the front: the fifth
    block then pushes out the lowest instead. A segment bridging two blocks merges them."""
    grown = [(100, 6), (20, 2), (30, 2), (40, 2), (106, 4), (50, 2)]
    t, ev = sack_blocks(grown, 110)
    assert c2s(ev) == b"GET /?q=" and dict(t.stats.outcomes) == {"fastclose": 1}
    t, ev = sack_blocks(grown, 22)  # (the block at 20 was pushed out)
    assert c2s(ev) == b"GET /?q=" + BODY
    # 20-22 and 30-32 joined by 22-30: one block 20-32, so the block at 100 stays among the four
    bridged = [(100, 6), (20, 2), (30, 2), (22, 8), (40, 2), (50, 2), (60, 2)]
    t, ev = sack_blocks(bridged, 106)
    assert c2s(ev) == b"GET /?q=" + BODY  # (pushed out by 40, 50 and 60 after the merge)
    t, ev = sack_blocks(bridged[:-1], 106)
    assert c2s(ev) == b"GET /?q="


def test_a_missed_syn_ack_leaves_the_out_of_order_edge_to_the_syn() -> None:
    """The gateway saw the SYN (with SACK_PERM) but not the SYN/ACK: it cannot tell, and keeps
    taking the edge; a SYN without SACK_PERM is enough to know."""
    for syn_sack, taken in ((True, True), (False, False)):
        s = Session(1, sack=syn_sack)
        syn, _synack, ack = s.handshake()
        pk = [syn, ack, s.data(0, True, 0, b"abcd"), s.data(0, True, 14, b"opqrst", rel=15)]
        pk.append(s._pkt(s.subs[0], True, RST | ACK, [], rel=21))
        t = Tracker()
        run(t, pk, flush=False)
        (conn,) = t.connections.values()
        assert conn.subflows[0].reset is taken, syn_sack


def test_after_the_senders_fin_the_rst_may_be_at_the_fin_or_past_it() -> None:
    for at, taken in ((5, True), (6, True), (7, False)):
        s = Session(1)
        pk = s.handshake() + [s.data(0, True, 0, b"abcd"), s._pkt(s.subs[0], True, FIN | ACK, [], rel=5)]
        pk.append(s._pkt(s.subs[0], True, RST | ACK, [], rel=at))
        t = Tracker()
        run(t, pk, flush=False)
        (conn,) = t.connections.values()
        assert conn.subflows[0].reset is taken, at


def test_an_rst_is_taken_whatever_its_timestamp() -> None:
    """PAWS drops other segments with a stale timestamp; Linux takes an RST that fails it."""
    s = Session(1, timestamps=True)
    pk = s.handshake() + [s.data(0, True, 0, b"abcd")]
    rst = bytearray(s._pkt(s.subs[0], True, RST | ACK, [], rel=5))
    # (the timestamp option's TSval, after NOP NOP kind length: made 100 s older, the checksum filled again)
    tsval_at = 20 + 20 + 4
    old = (int.from_bytes(rst[tsval_at:tsval_at + 4], "big") - 100_000) & 0xFFFFFFFF
    rst[tsval_at:tsval_at + 4] = old.to_bytes(4, "big")
    fill_tcp_checksum(rst)
    t = Tracker()
    run(t, pk + [bytes(rst)], flush=False)
    (conn,) = t.connections.values()
    assert conn.subflows[0].reset

