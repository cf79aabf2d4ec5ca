from __future__ import annotations

import hashlib

from hypothesis import given, settings, strategies as st

from mproxy.core.reassembler import GAPS_LISTED, PIECE_COST, DataStream, MemBudget, expand32


def test_expand32_nearest_and_wrap() -> None:
    assert expand32(5, 0x1_0000_0000) == 0x1_0000_0005
    assert expand32(0xFFFF_FFF0, 0x1_0000_0005) == 0x0_FFFF_FFF0  # just below the boundary
    assert expand32(0x10, 0x1_FFFF_FFF0) == 0x2_0000_0010  # just above
    assert expand32(7, 0xFFFF_FFFF_FFFF_FFF0) == 7  # 64-bit wrap


def test_in_order_and_out_of_order() -> None:
    s = DataStream(base=100)
    assert s.insert(105, b"world") == b""
    assert s.insert(100, b"hello") == b"helloworld"
    assert s.released == 10
    assert s.sha.hexdigest() == hashlib.sha256(b"helloworld").hexdigest()


def test_first_accepted_wins_and_differing_copy_is_reported() -> None:
    s = DataStream(base=0)
    s.insert(10, b"SELECT")
    s.insert(10, b"DELETE")  # same place, other bytes, still buffered
    assert [o.released for o in s.overlaps] == [False]
    out = s.insert(0, b"0123456789")
    assert out == b"0123456789SELECT"
    s.insert(12, b"LE")  # identical late copy: no report
    assert len(s.overlaps) == 1
    s.insert(12, b"XX")  # differing copy of released bytes
    assert s.overlaps[-1].released and s.overlaps[-1].dsn == 12


def test_memcap_counts_and_bounds() -> None:
    s = DataStream(base=0, ooo_limit=100)
    for i in range(10):
        s.insert(1000 + i * 50, b"x" * 50)
    assert s.ooo_bytes <= 100
    assert s.memcap_drops == 8


def test_a_segment_that_fills_the_hole_is_never_refused_even_with_the_buffer_full() -> None:
    """Seen live: a fast path fills the buffer, and the slow path's resend (one GSO packet from
    the hole over the buffered bytes and past them) was refused for its pieces past the first
    buffered chunk -- dropped under on_memcap = "drop", and so on every resend: the transfer
    stalled. Bytes from the stream's base on drain at once, so they are always taken."""
    budget = MemBudget(PIECE_COST + 100)
    s = DataStream(base=0, ooo_limit=100, budget=budget)
    assert s.insert(100, b"b" * 100) == b""  # the buffer and the budget are full
    assert s.insert(300, b"x") == b"" and s.memcap_drops == 1  # out of order: refused
    data = b"a" * 100 + b"b" * 100 + b"c" * 500
    assert s.insert(0, data) == data
    assert (s.base, s.memcap_drops, s.ooo_bytes, budget.used) == (700, 1, 0, 0)
    t = DataStream(base=0, ooo_limit=10)  # several buffered chunks under the new segment
    assert t.insert(20, b"B" * 10) == b"" and t.insert(40, b"D" * 10) == b""
    assert t.memcap_drops == 1 and t.ooo_bytes == 10
    # (bytes that arrive in order win over buffered copies, as in Linux: the X's)
    assert t.insert(0, b"A" * 20 + b"X" * 10 + b"C" * 30) == b"A" * 20 + b"X" * 10 + b"C" * 30
    assert t.overlaps and t.ooo_bytes == 0


def test_shared_budget_caps_streams_together_and_gets_every_byte_back() -> None:
    c = PIECE_COST  # every chunk also pays for its bookkeeping
    budget = MemBudget(3 * c + 120)
    a, b = DataStream(base=0, budget=budget), DataStream(base=0, budget=budget)
    assert a.insert(100, b"a" * 50) == b"" and a.insert(200, b"a" * 50) == b""
    assert budget.used == 2 * c + 100
    assert b.insert(100, b"b" * 50) == b""  # 3c + 150 > 3c + 120: refused by the budget, not by b's own limit
    assert (b.ooo_bytes, b.memcap_drops, b.budget_drops, b.memcap_bytes) == (0, 1, 1, 50)
    assert budget.refused == 1
    assert b.insert(300, b"b" * 20) == b"" and budget.used == 3 * c + 120  # what fits is taken
    # draining gives back: a's first chunk is released when its hole fills
    assert a.insert(0, b"0" * 100) == b"0" * 100 + b"a" * 50
    assert budget.used == 2 * c + 70 and a.ooo_bytes == 50
    assert b.insert(100, b"b" * 50) == b"" and budget.used == 3 * c + 120  # room again
    assert b.insert(160, b"c" * 30) == b""  # over the budget: refused whole
    assert b.budget_drops == 2
    # skipping a hole into a chunk: its skipped head is dropped, its tail released, all given back
    assert b.skip_to(120, acked=True) == b"b" * 30
    assert budget.used == 2 * c + 70 and b.ooo_bytes == 20
    a.release()
    b.release()
    assert budget.used == 0 and a.ooo_bytes == b.ooo_bytes == 0 and a.next_buffered() is None


def test_gaps_are_counted_all_and_listed_first_32_with_their_shed_bytes() -> None:
    """One gap per packet must not grow memory (or the log record) without bound; a gap over bytes
    a buffer limit kept out says so (it is not a side channel)."""
    s = DataStream(base=0, ooo_limit=100)
    for i in range(40):  # a 10-byte hole, then 10 bytes, 40 times: every hole is skipped
        s.insert(20 * i + 10, b"d" * 10)
        s.skip_to(20 * i + 10, acked=True)
    assert (s.gap_count, s.gap_bytes, len(s.gaps)) == (40, 400, GAPS_LISTED) and s.released == 400
    t = DataStream(base=0, ooo_limit=100)
    t.insert(50, b"a" * 100)  # buffered
    t.insert(150, b"b" * 60)  # over the limit: shed
    t.insert(250, b"c" * 10)  # shed too
    assert t.memcap_drops == 2 and t._shed == [[150, 210], [250, 260]]
    assert t.skip_to(50, acked=True) == b"a" * 100 and t.gaps[-1].shed == 0
    t.skip_to(300, acked=True)  # [150, 300): 70 bytes of it were seen and shed
    assert (t.gaps[-1].length, t.gaps[-1].shed, t.skipped_shed) == (150, 70, 70)
    assert t.note_shed(400, 410) is None and t._shed == [[400, 410]]  # ranges passed by are forgotten


def test_history_budget_counts_what_the_histories_hold() -> None:
    hb = MemBudget(1 << 20)
    a, b = DataStream(base=0, history_limit=100, history_budget=hb), DataStream(base=0, history_budget=hb)
    a.insert(0, b"x" * 150)
    b.insert(0, b"y" * 50)
    assert hb.used == 200 == len(a._history) + len(b._history)
    a.insert(150, b"x" * 60)  # 210 > 2 x 100: trimmed to the last 100
    assert len(a._history) == 100 and hb.used == 150
    a.drop_history()
    assert hb.used == 50 and not a._history
    assert a.insert(100, b"z" * 10) == b"" and not a.overlaps  # no history left: not compared
    assert a.duplicate_bytes == 10


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=30),
       order=st.randoms(use_true_random=False), limit=st.integers(0, 2500), skips=st.integers(0, 3))
def test_budget_matches_what_the_streams_hold(data: bytes, cuts: list[int], order, limit: int, skips: int) -> None:
    """Whatever arrives, is dropped by the cap, drained, skipped or released: the budget's count is
    exactly the bytes the streams hold, and never over its limit."""
    budget = MemBudget(limit)
    streams = [DataStream(base=0, budget=budget, ooo_limit=1500), DataStream(base=0, budget=budget)]
    pts = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [(a, data[a:b]) for a, b in zip(pts, pts[1:]) if b > a]
    order.shuffle(pieces)
    for i, (a, p) in enumerate(pieces):
        s = streams[i % 2]
        before = s.base
        s.insert(a, p)
        if before is not None and a <= before < a + len(p):
            assert s.base is not None and s.base >= a + len(p)  # in-order bytes are never refused
        if skips and order.random() < 0.1:
            s.skip_to((s.base or 0) + order.randrange(1, 200), acked=False)
            skips -= 1
        assert budget.used == sum(x.ooo_bytes + PIECE_COST * len(x._chunks) for x in streams) <= limit
        assert all(x.ooo_bytes == sum(len(c) for c in x._chunks.values()) for x in streams)
    for s in streams:
        s.release()
    assert budget.used == 0


def test_fin_and_skip() -> None:
    s = DataStream(base=0)
    s.set_fin(10)
    s.insert(5, b"56789")
    assert not s.finished
    assert s.skip_to(5, acked=True) == b"56789"
    assert s.finished
    assert s.gaps[0].dsn == 0 and s.gaps[0].length == 5 and s.gaps[0].acked
    assert s.insert(8, b"zz") == b""  # nothing after DATA_FIN


def test_late_copies_after_a_gap_are_compared_with_the_right_bytes() -> None:
    """Seen live: a stalled reader let packets past under fail open, the peer's DATA_ACK made their
    bytes a gap, then the packets mproxy had held arrived late. The released history was taken as the
    tail ending at the stream's position, across the gap: late copies of skipped bytes were compared
    with bytes from before it, and reported as an overlap mismatch (the split-path evasion alarm)."""
    data = bytes(range(256)) * 2
    s = DataStream(base=0)
    assert s.insert(0, data[:100]) == data[:100]
    s.skip_to(200, acked=True)  # [100, 200) never seen
    assert s.insert(200, data[200:300]) == data[200:300]
    s.insert(120, data[120:140])  # a late copy of skipped bytes: nothing to compare it with
    s.insert(250, data[250:260])  # a late copy of released bytes, identical
    s.insert(40, data[40:60])  # from before the gap: not in the history any more
    assert s.overlaps == []
    s.insert(210, b"X" * 10)  # a late copy that differs is still reported
    assert [(o.dsn, o.length, o.released) for o in s.overlaps] == [(210, 10, True)]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=40),
       order=st.randoms(use_true_random=False), dups=st.integers(0, 10))
def test_any_split_any_order_rebuilds(data: bytes, cuts: list[int], order, dups: int) -> None:
    pts = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [(a, data[a:b]) for a, b in zip(pts, pts[1:]) if b > a]
    # overlapping retransmissions: pieces that straddle earlier cuts
    for _ in range(dups):
        a = order.randrange(len(data))
        b = order.randrange(a, len(data)) + 1
        pieces.append((a, data[a:b]))
    order.shuffle(pieces)
    s = DataStream(base=7_000_000_000)
    out = b"".join(s.insert(7_000_000_000 + a, p) for a, p in pieces)
    assert out == data
    assert s.ooo_bytes == 0 and not s.overlaps


class LinuxQueue:
    """A reference of the Linux receiver's out-of-order queue (tcp_data_queue_ofo, and
    mptcp_data_queue_ofo at the data level, alike), written from the kernel's rules rather than
    from DataStream: whole segments sorted by start, possibly overlapping; a segment inside the one
    starting at or before it is dropped, one with the same start reaching further replaces it,
    the ones it covers are dropped, one starting where the one before it ends is merged into it;
    reading takes segments in start order, skipping bytes already read."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.q: list[list] = []  # [start, bytearray], sorted by start
        self.out = bytearray()

    def insert(self, seq: int, data: bytes) -> None:
        end = seq + len(data)
        if end <= self.base:
            return
        if seq <= self.base:  # in order (its old head skipped): read, then what the queue holds
            self.out += data[self.base - seq:]
            self.base = end
            self._drain()
            return
        q = self.q
        pred = max((i for i, (s, _) in enumerate(q) if s <= seq), default=None)
        if pred is None:
            at = 0
        else:
            s1, b1 = q[pred]
            e1 = s1 + len(b1)
            if seq < e1:
                if end <= e1:
                    return  # all present
                if seq > s1:
                    at = pred + 1  # partial overlap: both kept
                else:
                    del q[pred]  # same start, reaches further: replaces it
                    at = pred
            elif seq == e1:
                b1 += data  # coalesced
                return
            else:
                at = pred + 1
        q.insert(at, [seq, bytearray(data)])
        while at + 1 < len(q) and q[at + 1][0] + len(q[at + 1][1]) <= end:
            del q[at + 1]  # covered

    def _drain(self) -> None:
        while self.q and self.q[0][0] <= self.base:
            s, b = self.q.pop(0)
            if s + len(b) > self.base:
                self.out += b[self.base - s:]
                self.base = s + len(b)


@settings(max_examples=3000, deadline=None)
@given(segs=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12)), min_size=1, max_size=14))
def test_overlapping_copies_are_read_as_the_linux_queue_reads_them(segs: list[tuple[int, int]]) -> None:
    """Copies that differ, in any order and overlap: the bytes released are the ones the Linux
    receiver reads (the reference queue above), then with each hole filled by one byte."""
    ref, s = LinuxQueue(0), DataStream(base=0)
    out = b""
    for i, (start, n) in enumerate(segs):
        data = bytes([65 + i]) * n  # every copy its own letter
        ref.insert(start, data)
        out += s.insert(start, data)
    while ref.base < 60:  # one byte at each hole: the queue's winners come out
        assert s.base == ref.base
        ref.insert(ref.base, b"z")
        out += s.insert(s.base, b"z")
    assert out == bytes(ref.out)
