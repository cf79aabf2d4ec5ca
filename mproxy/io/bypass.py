"""Counting the packets that mproxy's rules sent to a queue but that never reached it.

The kernel does not count them. With fail open, a packet that finds the queue
full, or no process bound to it (``--queue-bypass``), is accepted and never
seen by mproxy: an attacker who can fill the queue gets bytes past the
inspector, and nothing says so. Fail closed drops the second kind uncounted.

Three counters the kernel does keep add up to them. Each NFQUEUE rule counts
the packets it matched; each queue numbers the packets it takes (``id_sequence``
in ``/proc/net/netfilter/nfnetlink_queue``, assigned only once a packet is in
the queue) and counts those it dropped because it was full (fail closed). For a
queue, rule hits - packets numbered - packets dropped = packets that bypassed it.

A queue's numbers restart when its process binds it again (a worker restarted;
told apart by the binding's netlink port) and wrap at 2**32 otherwise: the last
value seen before is folded into a running total, so the figures are read every
tick, and a worker that dies may have its last tick's packets counted as
bypassed. Readings are taken hits first, then the queue table: a packet
between the two is numbered but not yet a hit, so a reading can only fall short,
never count a packet that did reach mproxy; the count is kept monotonic.

Rules mproxy did not install (``[rules] manage = false``) were counting before
it started: their hits are read once after the queue table at the start, and
counted from there (:class:`~mproxy.io.netfilter.SavedRuleHits` follows them
through resets).

Sans-I/O: the owner reads the rule counters (:meth:`Rules.queue_hits`,
:meth:`SavedRuleHits.read`) and the queue table (:func:`kernel_queue_table`)
and passes them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

__all__ = ["Bypass"]


@dataclass(slots=True)
class _Queue:
    portid: int = 0  # netlink port of the process bound when last read (0: none)
    ids: int = 0  # id_sequence of that binding when last read
    dropped: int = 0  # its queue_dropped
    ids_before: int = 0  # packets numbered by earlier bindings (minus what was there at the baseline)
    dropped_before: int = 0
    hits_before: int = 0  # rule hits at the baseline (rules that were there before mproxy)
    bypassed: int = 0


@dataclass(slots=True)
class Bypass:
    """Per queue number, the packets its rules matched that it never took (see the module docstring)."""

    queues: Iterable[int]
    _q: dict[int, _Queue] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._q = {n: _Queue() for n in self.queues}

    def baseline(self, table: Mapping[int, Mapping[str, int]], hits: Mapping[int, int] | None = None) -> None:
        """The queue table just before mproxy's rules exist (their hits start at 0); or, for rules
        that were there already, the table and then their ``hits`` (in that order: a packet between
        the two readings is left out, so the count can only fall short)."""
        for n, q in self._q.items():
            self._see(q, table.get(n))
            q.ids_before, q.dropped_before = -q.ids, -q.dropped
            q.hits_before = hits.get(n, 0) if hits else 0

    def kernel(self, table: Mapping[int, Mapping[str, int]]) -> None:
        """A reading of the queue table (every tick: a rebinding is noticed before it numbers much)."""
        for n, q in self._q.items():
            self._see(q, table.get(n))

    def update(self, hits: Mapping[int, int], table: Mapping[int, Mapping[str, int]]) -> None:
        """Rule hits, then the queue table read right after them."""
        for n, q in self._q.items():
            self._see(q, table.get(n))
            if n in hits:
                b = hits[n] - q.hits_before - (q.ids_before + q.ids) - (q.dropped_before + q.dropped)
                if b > q.bypassed:
                    q.bypassed = b

    def counts(self) -> dict[int, int]:
        return {n: q.bypassed for n, q in self._q.items()}

    @staticmethod
    def _see(q: _Queue, row: Mapping[str, int] | None) -> None:
        if row is None or row["portid"] != q.portid:
            q.ids_before += q.ids  # another binding (or none): what the last one numbered is kept
            q.dropped_before += q.dropped
            q.ids = q.dropped = q.portid = 0
        if row is None:
            return
        if row["id_sequence"] < q.ids:  # the same binding: its 32-bit counters wrapped
            q.ids_before += 1 << 32
        if row["dropped"] < q.dropped:
            q.dropped_before += 1 << 32
        q.portid, q.ids, q.dropped = row["portid"], row["id_sequence"], row["dropped"]
