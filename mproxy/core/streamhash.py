"""SHA-256 of the rebuilt streams, taken from emission ops by the process that emits them.

The ``sha256`` of each direction in an ``mptcp_connection`` record costs about
1 ns per byte (a quarter of the live gateway's time at 2.5 Gbit/s). The
released bytes already travel to the emitter process as ``data`` ops, so that
process can hash them on a core the verdicts do not wait for. The tracker then
keeps no hashes (``Tracker.stream_hash`` off). Each record reaches the log once
its digests come back: in the same batch for the replay, and after a round trip
for the live gateway (:class:`AwaitingDigests`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from .pipeline import Op

__all__ = ["AwaitingDigests", "Digests", "StreamHashes", "fill_record"]

Digests = dict[int, tuple[str, str]]  # connection id -> (client->server, server->client) hex digests

_EMPTY = hashlib.sha256().hexdigest()


class StreamHashes:
    """Hashes per connection direction, fed with emission ops in order. A ``close`` op ends a
    connection: its digests move to :attr:`done`. Every connection the tracker closes gets a
    ``close`` op, so nothing is held for longer than a connection lives. A conversation taken over
    mid-stream (``resume``: a restarted emitter process) is not hashed: its digests would be of a
    part of the stream, so its record keeps ``sha256`` null."""

    __slots__ = ("_h", "_partial", "done")

    def __init__(self) -> None:
        self._h: dict[tuple[int, bool], Any] = {}  # (connection, from client) -> hash of its released bytes
        self._partial: set[int] = set()  # resumed connections: their first bytes went to a dead process
        self.done: Digests = {}

    def update(self, ops: list[Op]) -> None:
        hs = self._h
        partial = self._partial
        for op in ops:
            kind = op[0]
            if kind == "data":
                h = hs.get((op[1], op[2]))
                if h is None:
                    if partial and op[1] in partial:
                        continue
                    h = hs[(op[1], op[2])] = hashlib.sha256()
                h.update(op[3])
            elif kind == "close":
                cid = op[1]
                if partial and cid in partial:
                    partial.discard(cid)
                    continue
                c2s, s2c = hs.pop((cid, True), None), hs.pop((cid, False), None)
                self.done[cid] = (_EMPTY if c2s is None else c2s.hexdigest(),
                                  _EMPTY if s2c is None else s2c.hexdigest())
            elif kind == "resume":
                partial.add(op[1])

    def take_done(self) -> Digests:
        done, self.done = self.done, {}
        return done

    def __len__(self) -> int:
        """Connection directions being hashed (or skipped, resumed)."""
        return len(self._h) + len(self._partial)


def fill_record(rec: dict[str, Any], digests: Digests) -> None:
    """Put a connection's digests into its ``mptcp_connection`` record where the tracker left them out
    (None when none came: the emitter process failed)."""
    got = digests.get(rec["conn_id"])
    for i, key in enumerate(("c2s", "s2c")):
        if rec[key]["sha256"] is None and got is not None:
            rec[key]["sha256"] = got[i]


def awaits_digests(rec: dict[str, Any]) -> bool:
    return rec.get("event") == "mptcp_connection" and rec["c2s"]["sha256"] is None


class AwaitingDigests:
    """The live gateway's ``mptcp_connection`` records, held until the emitter process has answered
    for their connections (the round trip that also reads its sink counters; everything shipped
    before it is then hashed). Other records pass at once."""

    __slots__ = ("held", "since", "_spare")

    def __init__(self) -> None:
        self.held: list[dict[str, Any]] = []
        self.since = 0.0  # when the oldest held record came (the caller's clock)
        self._spare: Digests = {}  # digests that came before their record, kept one round

    def hold(self, recs: list[dict[str, Any]], now: float = 0.0) -> list[dict[str, Any]]:
        """The records that can be written now; the others are held."""
        if not any(awaits_digests(r) for r in recs):
            return recs
        if not self.held:
            self.since = now
        ready: list[dict[str, Any]] = []
        for r in recs:
            (self.held if awaits_digests(r) else ready).append(r)
        return ready

    def due(self, now: float, wait: float, most: int) -> bool:
        """Settle now? Records were held ``wait`` seconds, or ``most`` of them are."""
        return bool(self.held) and (now - self.since >= wait or len(self.held) >= most)

    def settle(self, digests: Digests) -> list[dict[str, Any]]:
        """After a round trip: every held record, filled. A record whose digests did not come (the
        emitter process failed) keeps ``sha256`` null. Digests of no held record are kept for the next
        round only (a connection closed without a record never claims them)."""
        pool = {**self._spare, **digests}
        out, self.held = self.held, []
        for r in out:
            fill_record(r, pool)
            pool.pop(r["conn_id"], None)
        self._spare = {k: v for k, v in digests.items() if k in pool}
        return out
