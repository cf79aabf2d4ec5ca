"""Bytes are read in subflow order: a data segment after a hole in its subflow's sequence space is
kept until the hole fills (the receiver's TCP hands MPTCP nothing past a hole), and the copy that
fills the hole wins over one kept after it, as in Linux (tcp_data_queue, tcp_ofo_queue)."""
from __future__ import annotations

from mproxy.core.events import GapSkipped
from mproxy.core.tracker import _MAX_OFO, Tracker, TrackerConfig
from mproxy.wire import mptcp as m
from mproxy.wire.packet import ACK, FIN

from .session import Session, c2s, notice_types, run




def test_a_segment_sent_ahead_of_a_hole_does_not_win_over_the_bytes_read_first() -> None:
    """The split-exploit evasion: on the join, BENIGN after a hole of ten subflow bytes, mapped
    (consistently) to the DSNs the initial subflow then carries "UNION SELECT" at. The server's
    TCP keeps BENIGN out of order (the hole never fills) and reads UNION SELECT; read at once,
    BENIGN was the accepted copy and the IDS never saw the attack."""
    s = Session(1)
    pk = s.handshake() + s.join(1) + [s.data(0, True, 0, b"abcd")]
    pk.append(s.data(1, True, 4, b"BENIGN", rel=11))
    pk.append(s.data(0, True, 4, b"UNION SELECT"))
    pk += [s.ack(0, False, s.idsn[0] + 16), s.data_fin(0, True, 16), s.data_fin(0, False, 0)]
    ev = run(Tracker(), pk)
    assert c2s(ev) == b"abcdUNION SELECT"
    # at the end the kept copy is compared like any other: its bytes differ
    assert notice_types(ev) == ["overlap_mismatch"]


def test_the_copy_that_fills_the_hole_wins_over_a_kept_one_mapped_elsewhere() -> None:
    """One subflow: BENIGN after a hole, mapped where the real bytes go; then the real segment
    over the hole and BENIGN's subflow bytes. TCP takes the in-order copy and drops the kept one."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"abcd")]
    pk.append(s.data(0, True, 4, b"BENIGN", rel=15))  # subflow bytes 15-20, after a hole at 5-14
    pk.append(s.data(0, True, 4, b"UNION SELECT 1,2", rel=5))  # subflow bytes 5-20, in order
    pk.append(s.data(0, True, 20, b"xyz", rel=21))
    pk += [s.ack(0, False, s.idsn[0] + 23), s.data_fin(0, True, 23), s.data_fin(0, False, 0)]
    ev = run(Tracker(), pk)
    assert c2s(ev) == b"abcdUNION SELECT 1,2xyz"
    assert notice_types(ev) == []


def test_a_kept_segment_the_filler_overlaps_gives_its_tail() -> None:
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"abcd")]
    pk.append(s.data(0, True, 14, b"opqrstuvwx", rel=15))  # kept: subflow bytes 15-24
    pk.append(s.data(0, True, 12, b"mnop", rel=13))  # kept too, before it and overlapping it
    assert c2s(run(Tracker(), pk, flush=False)) == b"abcd"
    pk.append(s.data(0, True, 4, b"efghijklmnopq", rel=5))  # fills the hole, and beyond
    pk += [s.ack(0, False, s.idsn[0] + 24), s.data_fin(0, True, 24), s.data_fin(0, False, 0)]
    ev = run(Tracker(), pk)
    assert c2s(ev) == b"abcdefghijklmnopqrstuvwx"
    assert notice_types(ev) == []


def test_copies_kept_after_a_hole_overlap_as_linux_keeps_them() -> None:
    """Among kept copies: one inside another is dropped; one from the same byte and longer
    replaces it; one covering later ones whole replaces them; otherwise the earlier start wins."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"ab")]
    # (subflow bytes from 3; the stream's offset = rel - 1)
    pk.append(s.data(0, True, 4, b"EFGH", rel=5))      # kept
    pk.append(s.data(0, True, 5, b"xy", rel=6))        # inside it: dropped
    pk.append(s.data(0, True, 10, b"KL", rel=11))      # kept
    pk.append(s.data(0, True, 10, b"klmn", rel=11))    # same start, longer: replaces KL
    pk.append(s.data(0, True, 16, b"QR", rel=17))      # kept
    pk.append(s.data(0, True, 15, b"pqrs", rel=16))    # covers QR whole: replaces it
    pk.append(s.data(0, True, 13, b"NOP", rel=14))     # starts inside klmn: klmn wins 13
    pk.append(s.data(0, True, 2, b"cd", rel=3))        # fills the hole
    pk.append(s.data(0, True, 6, b"GHij", rel=7))      # and the next one
    pk += [s.ack(0, False, s.idsn[0] + 19), s.data_fin(0, True, 19), s.data_fin(0, False, 0)]
    ev = run(Tracker(), pk)
    assert c2s(ev) == b"abcdEFGHijklmnOPqrs"
    assert notice_types(ev) == []


def test_the_receiver_acknowledging_past_a_hole_releases_what_was_kept() -> None:
    """A hole the capture lost: the receiver acknowledges past it, so it has those bytes, and the
    segments kept after it are read (the hole is a gap of the stream)."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"abcd")]
    s.data(0, True, 4, b"efgh")  # sent, never captured
    pk.append(s.data(0, True, 8, b"ijkl"))
    t = Tracker()
    assert c2s(run(t, pk, flush=False)) == b"abcd"
    (conn,) = t.connections.values()
    sfd = conn.subflows[0].dirs[0]
    assert sfd.ofo is not None and len(sfd.ofo) == 1
    run(t, [s._pkt(s.subs[0], False, ACK, [], ack_rel=13)], flush=False)
    assert sfd.ofo is None and conn.streams[0].ooo_bytes == 4  # read: at the data level, after a hole
    ev = run(t, [s.data(0, True, 12, b"mnop")])  # in order now: read at once
    assert c2s(ev) == b"ijklmnop"  # (the hole is a gap at the end)
    assert [e.length for e in ev if isinstance(e, GapSkipped)] == [4]


def test_a_flood_of_segments_after_a_hole_is_bounded() -> None:
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"a")]
    for i in range(_MAX_OFO + 10):
        pk.append(s.data(0, True, 10 + 2 * i, b"z", rel=12 + 2 * i))
    t = Tracker()
    run(t, pk, flush=False)
    (conn,) = t.connections.values()
    sfd = conn.subflows[0].dirs[0]
    assert sfd.ofo is not None and len(sfd.ofo) == _MAX_OFO
    assert t.stats.memcap["subflow_order"] == 10
    held = sum(h.cost for h in sfd.ofo)
    assert t.budget.used >= held
    t.flush()
    assert t.budget.used == 0


def test_a_copy_replacing_every_kept_one_is_kept() -> None:
    s = Session(1)
    t = Tracker()
    pk = s.handshake() + [s.data(0, True, 0, b"ab")]
    pk.append(s.data(0, True, 4, b"EF", rel=5))
    pk.append(s.data(0, True, 4, b"efgh", rel=5))  # from the same byte, longer: replaces the only one
    run(t, pk, flush=False)
    (conn,) = t.connections.values()
    sfd = conn.subflows[0].dirs[0]
    assert sfd.ofo is not None and len(sfd.ofo) == 1 and sfd.ofo_bytes == 4 == conn.ofo_bytes[0]
    assert t.stats.subflow_order_kept == 2  # (the first, replaced)
    assert c2s(run(t, [s.data(0, True, 2, b"cd", rel=3)])) == b"cdefgh"
    assert t.budget.used == 0


def test_off_it_reads_segments_as_they_come() -> None:
    """``subflow_order = false``: as before the rule (the data level's rules alone)."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"abcd"), s.data(0, True, 4, b"BENIGN", rel=15)]
    pk.append(s.data(0, True, 4, b"UNION SELECT 1,2", rel=5))
    ev = run(Tracker(TrackerConfig(subflow_order=False)), pk)
    assert c2s(ev).startswith(b"abcdBENIGN")


def test_a_fin_sent_ahead_of_a_hole_does_not_end_the_bytes_a_later_copy_carries_past_it() -> None:
    """The receiver's TCP keeps a FIN after a hole out of order with its segment; the copy that fills
    the hole and runs past the FIN's place is read whole, and the FIN dropped as old (tcp_ofo_queue).
    Taken as it came, the FIN made every byte from its place on void: the IDS lost the request's tail."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"abcd")]
    pk.append(s._pkt(s.subs[0], True, FIN | ACK, [], rel=20))  # a FIN after a hole (subflow bytes 5-19)
    body = b"UNION SELECT password FROM users"
    pk.append(s.data(0, True, 4, body, rel=5))  # fills the hole and runs past the FIN's place
    pk += [s.ack(0, False, s.idsn[0] + 4 + len(body)), s.data_fin(0, True, 4 + len(body)), s.data_fin(0, False, 0)]
    t = Tracker()
    ev = run(t, pk)
    assert c2s(ev) == b"abcd" + body
    assert notice_types(ev) == []


def test_a_kept_fin_is_taken_when_its_segment_is_read_in_order() -> None:
    """Data with a FIN after a hole: the filler reaches into it, its tail is read, then its FIN; bytes
    after the FIN are never read. A bare FIN kept after a hole that the next bytes reach exactly is
    taken too, and the subflow ends with both FINs."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"ab")]
    fin_data = s._pkt(s.subs[0], True, FIN | ACK, [m.dss(s.idsn[1], s.idsn[0] + 8, 9, 4).encode()], b"ijkl", rel=9)
    pk.append(fin_data)  # subflow bytes 9-12 and the FIN at 13, after a hole at 3-8
    t = Tracker()
    run(t, pk, flush=False)
    (conn,) = t.connections.values()
    sf = conn.subflows[0]
    assert sf.dirs[0].ofo is not None and not sf.dirs[0].fin
    late = [s.data(0, True, 2, b"cdefghIJ", rel=3), s.data(0, True, 12, b"zz", rel=13)]
    ev = run(t, late, flush=False)
    assert c2s(ev) == b"cdefghIJkl"  # (the filler's IJ won 8-9; after the FIN at 13 nothing is read)
    assert sf.dirs[0].fin and sf.dirs[0].fin_seq == (s.subs[0].isn[0] + 13) & 0xFFFFFFFF
    s2 = Session(1)
    pk = s2.handshake() + [s2.data(0, True, 0, b"ab")]
    pk.append(s2._pkt(s2.subs[0], True, FIN | ACK, [], rel=5))  # a bare FIN after bytes 3-4
    pk.append(s2._pkt(s2.subs[0], False, FIN | ACK, [], rel=1))  # the server's, in order
    t2 = Tracker()
    run(t2, pk, flush=False)
    (sf2,) = next(iter(t2.connections.values())).subflows
    assert not sf2.dirs[0].fin and sf2.dirs[1].fin and sf2.closed_ts is None
    run(t2, [s2.data(0, True, 2, b"cd", rel=3)], flush=False)
    assert sf2.dirs[0].fin and sf2.closed_ts is not None
