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
  drops it, ``inspect`` tracks it as it would with one worker).

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
from ..wire.packet import SYN, TcpSegment, parse_ip, read_mptcp_spans
from .gateway import Decision, Verdict
from .marks import mask_capacity, mask_shift, worker_bits

__all__ = ["Steering", "SteeringStats", "SteerKind", "worker_bits", "mask_shift", "mask_capacity"]


class SteerKind(str, Enum):
    CAPABLE = "capable"  # MP_CAPABLE SYN: next worker in turn
    JOIN = "join"  # MP_JOIN SYN with an announced token: its worker
    JOIN_UNKNOWN = "join_unknown"  # MP_JOIN SYN, token not announced: 4-tuple hash
    OTHER = "other"  # not a SYN with a readable MP_CAPABLE/MP_JOIN: 4-tuple hash


@dataclass(slots=True)
class SteeringStats:
    capable: int = 0
    join: int = 0
    join_unknown: int = 0
    other: int = 0
    tokens_learned: int = 0
    tokens_forgotten: int = 0
    tokens_evicted: int = 0  # the table was full: oldest announcements dropped

    def count(self, kind: SteerKind) -> None:
        setattr(self, kind.value, getattr(self, kind.value) + 1)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


class Steering:
    """Token -> worker table and the per-SYN choice (see the module docstring)."""

    __slots__ = ("workers", "mask", "max_tokens", "tokens", "stats", "_next", "last_kind")

    def __init__(self, workers: int, mask: int, max_tokens: int = 1 << 20) -> None:
        capacity = mask_capacity(mask)
        if not capacity:
            raise ValueError(f"mark mask 0x{mask:x} is not one run of set bits")
        if not 1 <= workers <= capacity:
            raise ValueError(f"{workers} workers do not fit in mark mask 0x{mask:x}")
        self.workers = workers
        self.mask = mask
        self.max_tokens = max_tokens
        self.tokens: dict[int, int] = {}  # token -> worker, oldest first
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
        """The worker for this SYN; None when a join's token is unknown and not ``final``.

        The caller reads pending announcements and asks again with ``final``
        before falling back to the hash, so a race between a worker's
        announcement and the join it made possible cannot misroute the join.
        """
        seg = parse_ip(memoryview(ip))
        if seg is None or isinstance(seg, WireError):
            self.last_kind = SteerKind.OTHER
            return zlib.crc32(bytes(ip[:40])) % self.workers
        if not seg.flags & SYN:
            self.last_kind = SteerKind.OTHER
            return self._hash(seg)
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

    def _hash(self, seg: TcpSegment) -> int:
        """A stable choice from the addresses and ports (same 4-tuple, same worker)."""
        key = seg.src + seg.dst + seg.sport.to_bytes(2, "big") + seg.dport.to_bytes(2, "big")
        return zlib.crc32(key) % self.workers
