"""Data-level reassembly of one direction of an MPTCP connection.

Bytes arrive keyed by 64-bit data sequence number (DSN) from any subflow, in
any order, duplicated or reinjected. :class:`DataStream` releases them in DSN
order exactly once, with Linux receiver semantics: bytes already read win over
later copies; of copies still waiting out of order, the one whose segment
starts first wins (see ``_store``), and bytes that arrive in order win over
waiting copies. A copy whose bytes *differ* is reported, because that is how
an attacker would try to show the IDS one thing and the server another.
Out-of-order memory is capped per stream and, through a shared
:class:`MemBudget`, across all streams; a cap is counted when it bites.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, field
from enum import Enum

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
GAPS_LISTED = 32  # gaps kept per stream for the log; all are counted (a hole per packet must not grow memory)
_SHED_RANGES = 64  # ranges of bytes a buffer limit kept out, remembered per stream to label later gaps
# What one buffered piece costs beyond its bytes (its bytes object, dict entry, key, list slot; 90-130
# bytes measured on CPython 3.11): charged to the shared budget with every piece, so 1-byte segments
# cannot make the memcap hold a hundred times its size in bookkeeping
PIECE_COST = 128
# Pieces a per-stream limit of N bytes may hold: N / PIECE_SHARE (MIN_PIECES at least), so their
# bookkeeping stays within a quarter of N -- 1-byte segments cannot make one connection's share hold
# a hundred times its size (and exhaust the memcap every other connection uses). Segments of 512
# bytes or more never reach it before the byte limit.
PIECE_SHARE = 512
MIN_PIECES = 64
# How far past its limit the shared budget may go for bytes that must not be refused: the mapping a
# stream waits for (a stall otherwise), bytes the tracker held and let through before their mapping
# came (the IDS would miss bytes the receiver has). Bounded: each such take checks limit + SLACK.
SLACK = 1 << 16


def max_pieces(limit: int) -> int:
    return max(MIN_PIECES, limit // PIECE_SHARE)


def expand32(value: int, ref: int) -> int:
    """Expand a 32-bit DSN or DATA_ACK to the 64-bit value closest to ``ref``.

    Like Linux's ``__mptcp_expand_seq`` but symmetric, so a retransmission
    just below a 2**32 boundary expands downwards rather than 4 GiB ahead.
    """
    cand = (ref & ~MASK32) | (value & MASK32)
    diff = cand - ref
    if diff > 0x80000000:
        cand -= 0x100000000
    elif diff < -0x80000000:
        cand += 0x100000000
    return cand & MASK64


class QueueChange(Enum):
    """What a segment does to the shape of Linux's out-of-order queue (see DataStream._queue_plan)."""

    INSERT = "insert"  # a queued segment of its own
    EXTEND = "extend"  # merged into the queued segment it starts right after
    REPLACE = "replace"  # replaces the queued segment with its start, which it outgrows
    NONE = "none"  # inside a queued segment: dropped


@dataclass(slots=True)
class MemBudget:
    """Bytes buffered across every connection of one tracker, under one cap.

    Per-connection limits alone bound memory only by ``max_connections`` times
    those limits -- terabytes with the defaults, so a few hundred connections
    that each keep a hole open could exhaust a gateway. Every buffer that waits
    for other bytes (out-of-order data, unmapped subflow bytes, checksummed
    mappings being assembled) takes its bytes from here and gives them back
    when it releases or drops them; pieces held in dicts also pay ``PIECE_COST``.
    """

    limit: int
    used: int = 0
    refused: int = 0  # takes refused (how often the cap bit)

    def take(self, n: int, over: int = 0) -> bool:
        """Take ``n`` bytes if they fit; ``over`` (at most SLACK) lets bytes that must not be
        refused go that far past the limit, and no further: the overshoot stays bounded."""
        if self.used + n > self.limit + over:
            self.refused += 1
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


@dataclass(slots=True)
class Overlap:
    """A copy of held bytes that differs from the copy held."""

    dsn: int
    length: int
    released: bool  # the accepted bytes had already been handed on
    replaced: bool = False  # the new copy won over the buffered one (as Linux reads them)


@dataclass(slots=True)
class Gap:
    """Bytes skipped in the released stream; ``acked`` when the peer DATA_ACKed them."""

    dsn: int
    length: int
    acked: bool
    shed: int = 0  # of ``length``, bytes that did arrive but a buffer limit kept out


@dataclass(slots=True)
class DataStream:
    """One direction's byte stream, rebuilt in DSN order.

    ``insert`` returns the newly in-order bytes (possibly empty). Anything else
    worth knowing (overlaps that differ, memcap hits, gaps) is appended to the
    lists the owner drains.
    """

    base: int | None = None  # DSN of the next byte to release
    start: int | None = None  # DSN of the first byte of the stream (as first known)
    ooo_limit: int = 4 * 1024 * 1024
    history_limit: int = 64 * 1024
    released: int = 0
    ooo_bytes: int = 0
    memcap_drops: int = 0  # chunks not buffered because a cap bit (this stream's or the budget's)
    memcap_bytes: int = 0
    budget_drops: int = 0  # of memcap_drops, those refused by the shared budget
    budget: MemBudget | None = None
    # the released history's bytes, counted across streams; the owner empties the histories of
    # the least recently active streams when it is over its limit (see Tracker._shrink_histories)
    history_budget: MemBudget | None = None
    duplicate_bytes: int = 0
    fin_dsn: int | None = None  # DSN carrying DATA_FIN (one past the last data byte)
    finished: bool = False
    acked: int | None = None  # highest DATA_ACK from the peer
    # right edge of the connection-level window the peer advertised, as seen here: its highest
    # DATA_ACK plus the window of the packet carrying it (the tracker keeps out-of-order data
    # ending past it aside until a DATA_ACK shows the receiver took it: Tracker._hold_beyond)
    wnd_end: int | None = None
    _starts: list[int] = field(default_factory=list)
    _chunks: dict[int, bytes] = field(default_factory=dict)
    _history: bytearray = field(default_factory=bytearray)
    sha: "hashlib._Hash | None" = field(default_factory=hashlib.sha256)  # None: the consumer of the releases hashes
    overlaps: list[Overlap] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)  # the first GAPS_LISTED
    gap_count: int = 0
    gap_bytes: int = 0
    skipped_shed: int = 0  # shed bytes inside the gap the last skip_to made
    # [start, end) positions kept out, sorted; None until the first (most streams never shed)
    _shed: list[list[int]] | None = None
    # chunk start -> where the receiver's queued segment holding it starts, for chunks that do not
    # start their segment (merged onto the one before, or left over from an overlap); see _store
    _org: dict[int, int] = field(default_factory=dict)
    # the receiver's out-of-order queue as Linux keeps it: start and end of each queued segment,
    # sorted by start (they may overlap; a segment may have lost all its bytes to others)
    _seg_s: list[int] = field(default_factory=list)
    _seg_e: list[int] = field(default_factory=list)

    # -- input ----------------------------------------------------------
    def insert(self, dsn: int, data: bytes | memoryview, held: bool = False, urgent: bool = False) -> bytes:
        """Accept ``data`` at ``dsn``; return the bytes that became in order. ``held``: bytes
        already let through to the receiver while the tracker held them (no mapping yet), whose
        buffer space was just given back: buffered past ``ooo_limit``, and past the shared budget
        by up to ``SLACK``, or the IDS would miss bytes the receiver has. ``urgent``: bytes the
        stream must take or it may stall (see Tracker._must_take): past ``ooo_limit`` and the
        shared budget by up to ``SLACK`` each, so one connection still cannot take all the rest."""
        n = len(data)
        if n == 0:
            return b""
        if self.base is None:
            self.base = self.start = dsn
        base = self.base
        end = dsn + n
        if self.finished or (self.fin_dsn is not None and dsn >= self.fin_dsn):
            self._compare_released(dsn, data)
            return b""
        if end <= base:
            self._compare_released(dsn, data)
            self.duplicate_bytes += n
            return b""
        if dsn < base:
            self._compare_released(dsn, data[: base - dsn])
            self.duplicate_bytes += base - dsn
            data = data[base - dsn :]
            dsn = base
        if self.fin_dsn is not None and dsn + len(data) > self.fin_dsn:
            data = data[: self.fin_dsn - dsn]
        if dsn == base:
            # in order: Linux reads these bytes as they are, and buffered copies of any of them are
            # dropped (tcp_ofo_queue / mptcp_ofo_queue skip what is already read)
            if self._starts and self._starts[0] < dsn + len(data):
                self._compare_buffered(dsn, data, True)
            out = bytes(data)
            self._advance(out)
            if self._starts:
                out += self._drain()
            return out
        self._store(dsn, bytes(data), held, urgent)
        return b""

    def unwrap(self, dsn: int) -> int:
        """A 64-bit wire DSN (or DATA_ACK) as a position in this stream, which does not wrap.

        DSNs wrap at 2**64 (IDSNs are random; a peer can pick a key whose stream starts just
        below the wrap). Positions here are plain integers that keep growing, so a wire value
        is taken as the one congruent to it mod 2**64 nearest to the stream's position.
        """
        base = self.base
        if base is None:
            return dsn
        d = (dsn - base) & MASK64
        return base + d if d < 1 << 63 else base + d - (1 << 64)

    def set_fin(self, fin_dsn: int) -> bytes:
        """Record DATA_FIN at ``fin_dsn``; returns b"" (data before it still flows)."""
        if self.fin_dsn is None:
            self.fin_dsn = fin_dsn
            if self.base is None:
                self.base = self.start = fin_dsn
            self._check_fin()
        return b""

    def on_data_ack(self, ack: int) -> None:
        if self.acked is None or ack > self.acked:
            self.acked = ack

    def skip_to(self, dsn: int, acked: bool) -> bytes:
        """Declare ``[base, dsn)`` lost (a gap) and release what follows it."""
        if self.base is None:
            self.base = self.start = dsn
            return b""
        if dsn <= self.base:
            return b""
        if self.fin_dsn is not None and dsn > self.fin_dsn:
            dsn = self.fin_dsn
        self.skipped_shed = shed = self._shed_in(self.base, dsn) if self._shed else 0
        self.gap_count += 1
        self.gap_bytes += dsn - self.base
        if len(self.gaps) < GAPS_LISTED:
            self.gaps.append(Gap(self.base, dsn - self.base, acked, shed))
        # drop buffered chunks wholly before the new base, trim a straddler
        while self._starts and self._starts[0] < dsn:
            s = self._starts.pop(0)
            c = self._chunks.pop(s)
            if self._org:
                self._org.pop(s, None)
            if s + len(c) > dsn:
                rest = c[dsn - s :]
                self._chunks[dsn] = rest
                self._starts.insert(0, dsn)
                self._unbuffer(len(c) - len(rest), 0)
                break
            self._unbuffer(len(c))
        self.base = dsn
        if self._seg_e:
            self._trim_segs()
        # the history is the released tail ending at base: across a gap it is not, and a late copy
        # of the skipped bytes would be compared with bytes from before the gap
        if self._history:
            self.drop_history()
        out = self._drain() if self._starts and self._starts[0] == dsn else b""
        self._check_fin()
        return out

    def release(self) -> None:
        """Drop every buffered byte and give it back to the budget (the connection ended; its
        history goes separately, :meth:`drop_history`)."""
        if self._chunks:
            self._unbuffer(self.ooo_bytes, len(self._chunks))
        self._starts.clear()
        self._chunks.clear()
        self._org.clear()
        self._seg_s.clear()
        self._seg_e.clear()

    def missing(self) -> int | None:
        """DSN of the first hole when bytes are buffered beyond it, else None."""
        return self.base if self._starts else None

    def next_buffered(self) -> int | None:
        return self._starts[0] if self._starts else None

    def furthest(self) -> int | None:
        """One past the furthest position seen: released, buffered, or the DATA_FIN's."""
        if self.base is None:
            return None
        end = self.base
        if self._starts:
            last = self._starts[-1]
            end = max(end, last + len(self._chunks[last]))
        if self.fin_dsn is not None:
            end = max(end, self.fin_dsn + 1)
        return end

    def lacks(self, start: int, end: int) -> bool:
        """Are the stream positions [start, end) all unread and unbuffered (a hole, or beyond)?"""
        if self.base is None or start < self.base:
            return False
        i = self._first_over(start)
        return i == len(self._starts) or self._starts[i] >= end

    # -- internals --------------------------------------------------------
    def _advance(self, out: bytes) -> None:
        self.base = (self.base or 0) + len(out)
        self.released += len(out)
        if self._seg_e and self._seg_e[0] <= self.base:
            self._trim_segs()
        if self.sha is not None:
            self.sha.update(out)
        if self.history_limit:
            h = self._history
            h += out
            grown = len(out)
            if len(h) > 2 * self.history_limit:
                cut = len(h) - self.history_limit
                del h[:cut]
                grown -= cut
            if self.history_budget is not None:
                self.history_budget.used += grown
        self._check_fin()

    def drop_history(self) -> None:
        """Forget the released history (memory pressure, or the connection ended): later copies of
        those bytes can no longer be compared, only counted as duplicates."""
        if self.history_budget is not None:
            self.history_budget.give(len(self._history))
        self._history = bytearray()

    def _check_fin(self) -> None:
        if self.fin_dsn is not None and self.base == self.fin_dsn and not self.finished:
            self.finished = True

    def _drain(self) -> bytes:
        parts = []
        starts, chunks, org = self._starts, self._chunks, self._org
        while starts and starts[0] <= self.base:  # type: ignore[operator]
            s = starts.pop(0)
            c = chunks.pop(s)
            if org:
                org.pop(s, None)
            self._unbuffer(len(c))
            skip = self.base - s  # type: ignore[operator]
            if skip >= len(c):
                continue
            c = c[skip:]
            parts.append(c)
            self._advance(c)
        return b"".join(parts)

    def note_shed(self, start: int, end: int) -> None:
        """Remember that ``[start, end)`` arrived but a buffer limit kept it out, so a gap there is
        reported as such rather than as bytes that never crossed (side channel, capture loss)."""
        rs = self._shed
        if rs is None:
            rs = self._shed = []
        base = self.base or 0
        while rs and rs[0][1] <= base:  # ranges the stream has moved past
            rs.pop(0)
        if rs and rs[-1][1] >= start and rs[-1][0] <= end:  # the usual case: right after the last one
            rs[-1][0] = min(rs[-1][0], start)
            rs[-1][1] = max(rs[-1][1], end)
            return
        insort(rs, [start, end])
        if len(rs) > _SHED_RANGES:
            rs.pop(0)

    def _shed_in(self, start: int, end: int) -> int:
        """Shed bytes in ``[start, end)`` (ranges may overlap: counted once)."""
        total, upto = 0, start
        for s, e in self._shed or ():
            s, e = max(s, upto), min(e, end)
            if e > s:
                total += e - s
                upto = e
        return total

    def _unbuffer(self, n: int, pieces: int = 1) -> None:
        self.ooo_bytes -= n
        if self.budget is not None:
            self.budget.give(n + pieces * PIECE_COST)

    def _origin(self, s: int) -> int:
        """Where the receiver's queued segment holding the chunk at ``s`` starts."""
        org = self._org
        return org.get(s, s) if org else s

    def _queue_plan(self, dsn: int, end: int) -> tuple[int | None, bool, tuple[QueueChange, int]]:
        """How Linux's out-of-order queue takes a segment ``[dsn, end)``: (where the queued
        segment holding it starts, whether it replaced one with its start, the change to the
        queue's shape); a None start: it lies inside a queued segment and is dropped."""
        ss, se = self._seg_s, self._seg_e
        if not ss:
            return dsn, False, (QueueChange.INSERT, 0)
        if dsn == se[-1]:
            return ss[-1], False, (QueueChange.EXTEND, len(ss) - 1)  # merged into the last one
        if dsn > se[-1]:
            return dsn, False, (QueueChange.INSERT, len(ss))
        k = bisect_right(ss, dsn) - 1  # the one starting at or before it
        if k < 0:
            return dsn, False, (QueueChange.INSERT, 0)
        ps, pe = ss[k], se[k]
        if dsn < pe:
            if end <= pe:
                return None, False, (QueueChange.NONE, 0)
            if dsn > ps:
                return dsn, False, (QueueChange.INSERT, k + 1)  # partial overlap: both kept
            return dsn, True, (QueueChange.REPLACE, k)
        if dsn == pe:
            return ps, False, (QueueChange.EXTEND, k)
        return dsn, False, (QueueChange.INSERT, k + 1)

    def _apply(self, plan: tuple[QueueChange, int], dsn: int, end: int) -> None:
        kind, k = plan
        ss, se = self._seg_s, self._seg_e
        if kind is QueueChange.EXTEND:
            se[k] = end
            return
        if kind is QueueChange.REPLACE:
            se[k] = end
        else:
            ss.insert(k, dsn)
            se.insert(k, end)
        j = k + 1
        while j < len(ss) and se[j] <= end:
            j += 1  # queued segments it covers are dropped
        if j > k + 1:
            del ss[k + 1 : j], se[k + 1 : j]

    def _trim_segs(self) -> None:
        se, base = self._seg_e, self.base or 0
        if se and se[0] <= base:
            j = 1
            while j < len(se) and se[j] <= base:
                j += 1
            del self._seg_s[:j], se[:j]

    def _store(self, dsn: int, data: bytes, held: bool = False, urgent: bool = False) -> None:
        """Buffer out-of-order bytes as the Linux receiver queues them; differing copies are reported.

        Linux keeps out-of-order segments whole in a queue sorted by start (tcp_data_queue_ofo,
        and mptcp_data_queue_ofo at the data level, alike): a segment inside a queued one is
        dropped, one with the same start that reaches further replaces it, queued segments it
        covers are dropped, partial overlaps are both kept, and reading takes them in start
        order, skipping bytes already read. So of two copies of a byte, the one whose segment
        starts first wins (at the same start, the longer). A segment starting where the last
        queued one ends is merged into it (coalescing) and so counts as starting where that one
        did. ``_seg_s``/``_seg_e`` keep the queue's shape (which decides merging, dropping, replacing);
        chunks here do not overlap, each keeping where the segment that won it starts (``_org``).
        """
        starts, chunks = self._starts, self._chunks
        end = dsn + len(data)
        se = self._seg_e
        if se and dsn == se[-1] and (not starts or starts[-1] + len(chunks[starts[-1]]) <= dsn):
            # the usual case (one path ahead of another): right after the last queued segment,
            # which it is merged into, and nothing buffered beyond
            drops = self.memcap_drops
            self._put([(dsn, data, self._seg_s[-1])], held, urgent)
            if self.memcap_drops == drops:
                se[-1] = end
            return
        origin, replaced, plan = self._queue_plan(dsn, end)
        if origin is None:
            self._compare_buffered(dsn, data)  # inside a queued segment: those bytes win
            return
        if plan[0] is not QueueChange.EXTEND and not held and len(self._seg_s) >= max_pieces(self.ooo_limit):
            self.memcap_drops += 1  # the queue's own bookkeeping is bounded too
            self.memcap_bytes += len(data)
            self.note_shed(dsn, end)
            return
        drops = self.memcap_drops
        i = self._first_over(dsn)
        if i == len(starts) or starts[i] >= end:
            self._put([(dsn, data, origin)], held, urgent)  # the usual case: nothing in common
            if self.memcap_drops == drops:
                self._apply(plan, dsn, end)
            return
        # the chunks it overlaps: who wins each byte in common
        new: list[tuple[int, bytes, int]] = []  # the range's chunks after this segment
        gone: list[int] = []
        fresh: list[tuple[int, bytes, int]] = []  # bytes nobody held: to buffer (limits apply)
        pos = dsn
        j = i
        while j < len(starts) and starts[j] < end:
            s = starts[j]
            c = chunks[s]
            ce = s + len(c)
            o = self._origin(s)
            gone.append(s)
            if pos < s:
                fresh.append((pos, data[pos - dsn : s - dsn], origin))
            lo, hi = max(s, dsn), min(ce, end)
            mine = data[lo - dsn : hi - dsn]
            wins = origin < o or (replaced and o == origin)
            if c[lo - s : hi - s] != mine:
                self.overlaps.append(Overlap(lo, hi - lo, False, wins))
            self.duplicate_bytes += hi - lo
            if s < lo:
                new.append((s, c[: lo - s], o))
            new.append((lo, mine, origin) if wins else (lo, c[lo - s : hi - s], o))
            if ce > hi:
                new.append((hi, c[hi - s :], o))
            pos = hi
            j += 1
        if pos < end:
            fresh.append((pos, data[pos - dsn :], origin))
        extra = len(new) - len(gone)  # pieces more than before (a chunk split around the winner)
        if extra > 0 and len(chunks) + extra + len(fresh) > max_pieces(self.ooo_limit) and not held:
            # no room for the bookkeeping: the queued bytes stay as they are (a piece limit, counted;
            # inline, on_memcap = "drop" keeps the packet from the receiver too)
            self.memcap_drops += 1
            self.memcap_bytes += sum(len(c) for _, c, o in new if o == origin)
            self._put(fresh, held, urgent)
            return
        org = self._org
        for s in gone:
            del chunks[s]
            org.pop(s, None)
        del starts[i : i + len(gone)]
        for s, c, o in new:
            chunks[s] = c
            if o != s:
                org[s] = o
        starts[i:i] = [s for s, _, _ in new]
        if extra and self.budget is not None:
            self.budget.used += extra * PIECE_COST  # (given back with the pieces)
        self._put(fresh, held, urgent)
        if self.memcap_drops == drops:
            self._apply(plan, dsn, end)

    def _put(self, pieces: list[tuple[int, bytes, int]], held: bool, urgent: bool = False) -> None:
        """Buffer bytes no chunk held, within the limits (``held``, ``urgent``: see :meth:`insert`)."""
        starts, chunks = self._starts, self._chunks
        budget = self.budget
        for s, c, o in pieces:
            if not c:
                continue
            # held bytes: their own space was just given back (only a split around buffered
            # chunks costs more), so only the shared budget, with its slack, may refuse them
            over = not held and (self.ooo_bytes + len(c) > self.ooo_limit + (SLACK if urgent else 0)
                                 or len(chunks) >= max_pieces(self.ooo_limit))
            if over or (budget is not None and not budget.take(len(c) + PIECE_COST, SLACK if held or urgent else 0)):
                self.memcap_drops += 1
                self.memcap_bytes += len(c)
                self.note_shed(s, s + len(c))
                if not over:
                    self.budget_drops += 1
                continue
            chunks[s] = c
            if o != s:
                self._org[s] = o
            insort(starts, s)
            self.ooo_bytes += len(c)

    def _first_over(self, dsn: int) -> int:
        """Index of the first buffered chunk that ends past ``dsn`` (the one covering it, if any)."""
        starts = self._starts
        i = bisect_left(starts, dsn)
        if i > 0 and starts[i - 1] + len(self._chunks[starts[i - 1]]) > dsn:
            i -= 1
        return i

    def _compare_buffered(self, dsn: int, data: bytes | memoryview, wins: bool = False) -> None:
        """Compare bytes with the buffered copies of them; ``wins``: the new bytes are the ones read."""
        end = dsn + len(data)
        starts, chunks = self._starts, self._chunks
        i = self._first_over(dsn)
        while i < len(starts) and starts[i] < end:
            s = starts[i]
            c = chunks[s]
            lo, hi = max(s, dsn), min(s + len(c), end)
            if c[lo - s : hi - s] != data[lo - dsn : hi - dsn]:
                self.overlaps.append(Overlap(lo, hi - lo, False, wins))
            self.duplicate_bytes += hi - lo
            i += 1

    def _compare_released(self, dsn: int, data: bytes | memoryview) -> None:
        """Compare a late copy of released bytes with the kept history tail."""
        if self.base is None:
            return
        h = self._history
        hstart = self.base - len(h)
        lo = max(dsn, hstart)
        hi = min(dsn + len(data), self.base)
        if lo >= hi:
            return
        if h[lo - hstart : hi - hstart] != data[lo - dsn : hi - dsn]:
            self.overlaps.append(Overlap(lo, hi - lo, True))
