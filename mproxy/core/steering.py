"""Which worker owns an MPTCP connection: the sans-I/O core of the control queue.

With ``[queue] workers`` > 1 every subflow of one MPTCP connection must reach
the same worker, but the kernel's ``--queue-balance`` hashes the address pair
and a join comes from (or goes to) other addresses. Only the MPTCP layer
knows which connection a join belongs to: by the token in its SYN. So the
first SYN of every TCP connection carrying option 30 goes to one control
queue, and this core picks its worker:

* MP_CAPABLE: the next worker in turn (the connection is new);
* MP_JOIN: the worker that announced the token (workers announce the tokens
  their trackers learn, before the verdict of the packet that taught them,
  so the announcement is ahead of any join that packet made possible);
* a join with a token nobody announced, or an option we cannot read: a hash
  of the 4-tuple, so the worker's own policy decides (``verify-joins``
  drops it, ``inspect`` tracks it as it would with one worker);
* any later packet (conntrack found it INVALID, so it has no conntrack entry,
  or its entry was lost and picked up again without the worker bits; see
  :mod:`mproxy.io.netfilter`): the worker its subflow's SYN went to,
  remembered by 4-tuple in a bounded table; a 4-tuple hash when the control
  never saw that SYN (a connection opened before mproxy started).

The decision is a ``REPEAT`` verdict with the worker's number in the packet
mark; the rules save it in the connection's conntrack mark and queue every
later packet of the connection (both directions) to that worker's queue.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import Enum

from ..wire.errors import WireError
from ..wire.mptcp import Subtype
from ..wire.packet import ACK, SYN, TcpSegment, parse_ip, read_mptcp_spans
from .gateway import Decision, Verdict
from .marks import mask_capacity, mask_shift, worker_bits

__all__ = ["Steering", "SteeringStats", "SteerKind", "worker_bits", "mask_shift", "mask_capacity"]


class SteerKind(str, Enum):
    CAPABLE = "capable"  # MP_CAPABLE SYN: next worker in turn
    JOIN = "join"  # MP_JOIN SYN with an announced token: its worker
    JOIN_UNKNOWN = "join_unknown"  # MP_JOIN SYN, token not announced: 4-tuple hash
    OTHER = "other"  # a SYN without a readable MP_CAPABLE/MP_JOIN: 4-tuple hash
    SUBFLOW = "subflow"  # a later packet (INVALID, or its conntrack entry lost) of a subflow whose SYN we steered
    UNKNOWN = "unknown"  # a later packet of a subflow whose SYN we did not see: 4-tuple hash


@dataclass(slots=True)
class SteeringStats:
    capable: int = 0
    join: int = 0
    join_unknown: int = 0
    other: int = 0
    subflow: int = 0
    unknown: int = 0
    subflows_evicted: int = 0  # the subflow table was full: oldest SYNs' entries dropped
    tokens_learned: int = 0
    tokens_forgotten: int = 0
    tokens_evicted: int = 0  # the table was full: oldest announcements dropped

    def count(self, kind: SteerKind) -> None:
        setattr(self, kind.value, getattr(self, kind.value) + 1)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


class Steering:
    """Token -> worker table and the per-SYN choice (see the module docstring)."""

    __slots__ = ("workers", "mask", "max_tokens", "tokens", "stats", "_next", "last_kind", "max_subflows",
                 "subflows")

    def __init__(self, workers: int, mask: int, max_tokens: int = 1 << 20, max_subflows: int = 1 << 18) -> None:
        capacity = mask_capacity(mask)
        if not capacity:
            raise ValueError(f"mark mask 0x{mask:x} is not one run of set bits")
        if not 1 <= workers <= capacity:
            raise ValueError(f"{workers} workers do not fit in mark mask 0x{mask:x}")
        self.workers = workers
        self.mask = mask
        self.max_tokens = max_tokens
        self.tokens: dict[int, int] = {}  # token -> worker, oldest first
        # hash of a SYN's 4-tuple (either orientation) -> worker, oldest first; ~100 bytes an entry
        self.max_subflows = max_subflows
        self.subflows: dict[int, int] = {}
        self.stats = SteeringStats()
        self._next = 0
        self.last_kind = SteerKind.OTHER

    # ------------------------------------------------------------------ announcements
    def learn(self, worker: int, token: int, added: bool) -> None:
        """A worker's tracker indexed (``added``) or forgot a token."""
        t = self.tokens
        if added:
            t.pop(token, None)  # re-insert: newest last
            t[token] = worker
            self.stats.tokens_learned += 1
            while len(t) > self.max_tokens:
                del t[next(iter(t))]
                self.stats.tokens_evicted += 1
        elif t.get(token) == worker:  # a token another worker announced since stays
            del t[token]
            self.stats.tokens_forgotten += 1

    def forget_worker(self, worker: int) -> int:
        """Drop a worker's tokens (it restarted with an empty tracker); returns how many."""
        gone = [tok for tok, w in self.tokens.items() if w == worker]
        for tok in gone:
            del self.tokens[tok]
        return len(gone)

    # ------------------------------------------------------------------ decisions
    def choose(self, ip: bytes | memoryview, final: bool = True) -> int | None:
        """The worker for this packet; None when a join's token is unknown and not ``final``.

        The caller reads pending announcements and asks again with ``final``
        before falling back to the hash, so a race between a worker's
        announcement and the join it made possible cannot misroute the join.
        """
        seg = parse_ip(memoryview(ip))
        if seg is None or isinstance(seg, WireError):
            self.last_kind = SteerKind.UNKNOWN
            return zlib.crc32(bytes(ip[:40])) % self.workers
        if seg.flags & (SYN | ACK) != SYN:  # a later packet: INVALID, or of a connection without worker bits
            owner = self.subflows.get(_flow_key(seg))
            if owner is not None:
                self.last_kind = SteerKind.SUBFLOW
                return owner
            self.last_kind = SteerKind.UNKNOWN
            return self._hash(seg)
        w = self._syn(seg, final)
        if w is not None:
            self._remember(seg, w)
        return w

    def _syn(self, seg: TcpSegment, final: bool) -> int | None:
        raw = seg.ip
        for off, olen in read_mptcp_spans(seg)[0]:  # the tracker's own walk: options before a damaged one stand
            if olen < 3:
                continue
            sub = raw[off + 2] >> 4
            if sub == Subtype.MP_CAPABLE:
                self.last_kind = SteerKind.CAPABLE
                w = self._next
                self._next = (w + 1) % self.workers
                return w
            if sub == Subtype.MP_JOIN and olen == 12:
                token = int.from_bytes(raw[off + 4 : off + 8], "big")
                owner = self.tokens.get(token)
                if owner is not None:
                    self.last_kind = SteerKind.JOIN
                    return owner
                if not final:
                    return None
                self.last_kind = SteerKind.JOIN_UNKNOWN
                return self._hash(seg)
        self.last_kind = SteerKind.OTHER
        return self._hash(seg)

    def decide(self, ip: bytes, final: bool = True) -> Decision | None:
        """The control queue's verdict: repeat the packet marked with its worker (None: ask again)."""
        w = self.choose(ip, final)
        if w is None:
            return None
        self.stats.count(self.last_kind)
        return Decision(Verdict.REPEAT, mark=worker_bits(w, self.mask), reason=self.last_kind.value)

    def _remember(self, seg: TcpSegment, worker: int) -> None:
        """The SYN's 4-tuple -> its worker, for later packets that reach the control queue."""
        t = self.subflows
        key = _flow_key(seg)
        t.pop(key, None)  # a SYN seen again: newest last
        t[key] = worker
        while len(t) > self.max_subflows:
            del t[next(iter(t))]
            self.stats.subflows_evicted += 1

    def _hash(self, seg: TcpSegment) -> int:
        """A stable choice from the addresses and ports (same 4-tuple, same worker)."""
        key = seg.src + seg.dst + seg.sport.to_bytes(2, "big") + seg.dport.to_bytes(2, "big")
        return zlib.crc32(key) % self.workers


def _flow_key(seg: TcpSegment) -> int:
    """One key for both orientations of a 4-tuple (a hash: 2**-64 collisions cost a misroute at most)."""
    a = seg.src + seg.sport.to_bytes(2, "big")
    b = seg.dst + seg.dport.to_bytes(2, "big")
    return hash(a + b if a <= b else b + a)
