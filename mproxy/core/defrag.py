"""IP reassembly for captures: the fragments of a datagram put back together before parsing.

Why: a capture taken where packets are still fragmented (a tap or span port
behind a router with a smaller MTU, a sensor ahead of the host) holds pieces of
datagrams that the host's stack reassembled before TCP saw them, and an attacker
can fragment on purpose to keep an exploit from a reader that does not
reassemble. Without this, every fragmented segment was a hole in the rebuilt
stream. The live gateway never sees fragments: conntrack reassembles them
before the queue.

Semantics follow the Linux receiver, whose application the stream must match:
a datagram with overlapping fragments is dropped whole (RFC 5722; Linux does the
same for IPv4), an exact duplicate is ignored (the first copy stands), a
datagram not complete within ``timeout`` seconds of its first fragment
(``ipfrag_time``, 30 s) is dropped, and the bytes held are capped
(``ipfrag_high_thresh``): over the cap the oldest datagrams go first. Every drop
is counted by reason.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from struct import Struct

from ..wire.checksum import ipv4_header_checksum

__all__ = ["Defragmenter", "DefragStats", "DROP_REASONS"]

DROP_REASONS = ("overlap", "timeout", "memcap", "oversize", "truncated", "malformed")
_V4 = Struct("!BxHHHxB2x4s4s")  # ver/ihl, total length, id, flags/offset, proto, src, dst
_V6_FRAG = Struct("!BxHI")  # next header, offset/M, identification
_U16 = Struct("!H")
_IPV6_EXT = frozenset((0, 43, 60, 51))  # hop-by-hop, routing, destination options, AH: may precede it
_FRAGMENT_HEADER = 44
_PIECE_COST = 64  # bookkeeping per fragment held, on top of its bytes


@dataclass(slots=True)
class DefragStats:
    fragments: int = 0  # fragments handed in
    reassembled: int = 0  # datagrams put back together
    dropped: Counter[str] = field(default_factory=Counter)  # datagrams (or fragments) dropped, by reason


@dataclass(slots=True)
class _Datagram:
    first_ts: float
    pieces: dict[int, bytes] = field(default_factory=dict)  # payload offset -> bytes
    head: bytes | None = None  # IPv4: the offset-0 fragment's header; IPv6: its unfragmentable part
    nh_at: int = 0  # IPv6: where in ``head`` the next-header byte naming the fragment header is
    next_header: int = 0  # IPv6: the protocol after the fragment header, from the offset-0 fragment
    total: int | None = None  # payload length, once the last fragment came
    held: int = 0


class Defragmenter:
    """Feed it IP fragments (what ``parse_ip`` calls ``fragment``); it hands back whole datagrams."""

    def __init__(self, limit: int = 4 << 20, timeout: float = 30.0, stats: DefragStats | None = None) -> None:
        self.limit = limit
        self.timeout = timeout
        self.stats = DefragStats() if stats is None else stats
        self.held = 0
        self._q: OrderedDict[tuple[object, ...], _Datagram] = OrderedDict()

    def __len__(self) -> int:
        return len(self._q)

    def add(self, ip: memoryview | bytes, ts: float) -> bytes | None:
        """One fragment; the reassembled datagram when this one completed it, else None."""
        self.stats.fragments += 1
        self._expire(ts)
        ip = memoryview(ip)
        got = _v4(ip) if ip[0] >> 4 == 4 else _v6(ip)
        if isinstance(got, str):
            self.stats.dropped[got] += 1
            return None
        key, off, data, more, head, nh_at, next_header = got
        if off + len(data) > 0xFFFF:
            self._drop(key, "oversize")
            return None
        dg = self._q.get(key)
        if dg is None:
            dg = self._q[key] = _Datagram(ts)
        for o, d in dg.pieces.items():
            if o < off + len(data) and off < o + len(d):
                if o == off and len(d) == len(data):
                    return None  # an exact duplicate: the first copy stands
                self._drop(key, "overlap")
                return None
        end = off + len(data)
        if not more:
            if dg.total is not None and dg.total != end:
                self._drop(key, "malformed")
                return None
            dg.total = end
        if dg.total is not None and (end > dg.total or any(o + len(d) > dg.total for o, d in dg.pieces.items())):
            self._drop(key, "malformed")
            return None
        if off == 0:
            dg.head, dg.nh_at, dg.next_header = head, nh_at, next_header
        dg.pieces[off] = bytes(data)
        cost = len(data) + _PIECE_COST
        dg.held += cost
        self.held += cost
        while self.held > self.limit and self._q:
            old = next(iter(self._q))
            self._drop(old, "memcap")
        if key not in self._q or dg.total is None or dg.head is None:
            return None
        pos, parts = 0, []
        for o in sorted(dg.pieces):
            if o != pos:
                return None  # a hole still
            parts.append(dg.pieces[o])
            pos += len(dg.pieces[o])
        if pos != dg.total:
            return None
        self._forget(key)
        self.stats.reassembled += 1
        return _whole(dg, b"".join(parts))

    def _expire(self, ts: float) -> None:
        while self._q:
            key, dg = next(iter(self._q.items()))
            if ts - dg.first_ts < self.timeout:
                return
            self._drop(key, "timeout")

    def _drop(self, key: tuple[object, ...], reason: str) -> None:
        self.stats.dropped[reason] += 1
        self._forget(key)

    def _forget(self, key: tuple[object, ...]) -> None:
        dg = self._q.pop(key, None)
        if dg is not None:
            self.held -= dg.held


def _v4(ip: memoryview) -> tuple[tuple[object, ...], int, memoryview, bool, bytes, int, int] | str:
    if len(ip) < 20:
        return "malformed"
    vihl, total, ident, frag, proto, src, dst = _V4.unpack_from(ip, 0)
    ihl = (vihl & 0x0F) * 4
    if ihl < 20 or total < ihl:
        return "malformed"
    if len(ip) < total:
        return "truncated"  # cut by the capture's snap length: its bytes are not all there
    off, more = (frag & 0x1FFF) * 8, bool(frag & 0x2000)
    data = ip[ihl:total]
    if (more and len(data) % 8) or not data:
        return "malformed"
    return (4, src, dst, proto, ident), off, data, more, bytes(ip[:ihl]), 0, proto


def _v6(ip: memoryview) -> tuple[tuple[object, ...], int, memoryview, bool, bytes, int, int] | str:
    n = len(ip)
    if n < 40:
        return "malformed"
    end = 40 + _U16.unpack_from(ip, 4)[0]
    if n < end:
        return "truncated"
    nxt, nh_at, pos = ip[6], 6, 40
    while nxt != _FRAGMENT_HEADER:
        if nxt not in _IPV6_EXT or pos + 8 > end:
            return "malformed"
        hlen = (ip[pos + 1] + 2) * 4 if nxt == 51 else (ip[pos + 1] + 1) * 8
        nxt, nh_at, pos = ip[pos], pos, pos + hlen
    if pos + 8 > end:
        return "malformed"
    inner, fo, ident = _V6_FRAG.unpack_from(ip, pos)
    off, more = fo & 0xFFF8, bool(fo & 1)
    data = ip[pos + 8 : end]
    if (more and len(data) % 8) or not data:
        return "malformed"
    src, dst = bytes(ip[8:24]), bytes(ip[24:40])
    return (6, src, dst, ident), off, data, more, bytes(ip[:pos]), nh_at, inner


def _whole(dg: _Datagram, payload: bytes) -> bytes:
    head = bytearray(dg.head or b"")
    if head[0] >> 4 == 4:
        ihl = len(head)
        head[2:4] = (ihl + len(payload)).to_bytes(2, "big")
        head[6:8] = b"\x00\x00"  # no longer a fragment
        head[10:12] = b"\x00\x00"
        head[10:12] = ipv4_header_checksum(head).to_bytes(2, "big")
    else:
        head[dg.nh_at] = dg.next_header  # the fragment header is gone: what followed it follows this
        head[4:6] = (len(head) - 40 + len(payload)).to_bytes(2, "big")
    return bytes(head) + payload
