"""Embedded inspector: signature rules matched on each connection's rebuilt byte stream.

Sans-I/O: :meth:`Inspector.feed` takes the bytes a connection just released in
one direction (in data-sequence order) and returns the rules that matched.
The gateway calls it before it gives the packet that released those bytes
its verdict, so a match can still drop that packet.

Engine: one Hyperscan block-mode database (C, SIMD: several GB/s) holds every
``content`` of every rule as a literal, caseless for ``nocase`` ones, so one
pass per chunk finds all contents of all rules; Python only sees the hits.

Streaming: a content split across two chunks must be found, so each
direction keeps its last ``longest content - 1`` bytes and the next chunk is
scanned behind them; hits that lie wholly inside that tail were reported
before and are skipped. ``pcre`` runs only once all of a rule's contents have
been seen within ``window`` bytes of each other (the contents are the
prefilter, as Snort's fast pattern), and only on the stretch where a match can
satisfy the rule: within ``window`` bytes of those contents, and no further
back than ``pcre_window`` bytes before the chunk (so a match straddling the
chunk boundary is still found); rules with a pcre and no content run it on
each chunk plus those ``pcre_window`` bytes. A rule fires at most once per
connection direction.

Semantics on the stream (the subset documented in :mod:`mproxy.core.rules`):
a rule matches when every content occurs (in any order) and its pcre
matches, all within ``window`` bytes of stream.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import hyperscan

from .events import Direction
from .rules import Rule, RuleSet

__all__ = ["Match", "Inspector", "InspectorStats"]


@dataclass(frozen=True, slots=True)
class Match:
    """A rule that matched one direction of one connection."""

    conn_id: int
    direction: Direction
    sid: int
    rev: int
    msg: str
    offset: int  # stream offset (bytes from the direction's start) just after the match

    def reason(self) -> str:
        return f"sid {self.sid}: {self.msg}" if self.msg else f"sid {self.sid}"


@dataclass(slots=True)
class InspectorStats:
    bytes: list[int] = field(default_factory=lambda: [0, 0])  # inspected, by direction
    chunks: int = 0
    matches: int = 0
    pcre_runs: int = 0
    flows: int = 0  # connection directions inspected since start


@dataclass(slots=True)
class _Dir:
    """Per connection direction: the tail, the position, partial rule state."""

    groups: frozenset[int]  # the header groups (see Inspector) whose rules apply to this direction
    pcre_only: tuple[int, ...]  # rules with a pcre and no content: run on every chunk
    offset: int = 0  # bytes inspected so far
    tail: bytes = b""
    seen: dict[int, list[int]] = field(default_factory=dict)  # rule -> last end offset per content (-1: none)
    fired: set[int] = field(default_factory=set)
    recheck: tuple[int, ...] = ()  # rules to evaluate with the next chunk (contents found in a reload's tail)


def _span(tail: bytes, data: bytes, a: int, b: int) -> bytes:
    """``(tail + data)[a:b]`` without building ``tail + data``."""
    lt = len(tail)
    if b <= lt:
        return tail[a:b]
    if a >= lt:
        return data[a - lt : b - lt]
    return tail[a:] + data[: b - lt]


class Inspector:
    """Matches a :class:`RuleSet` on rebuilt streams; state per live connection."""

    def __init__(self, rules: RuleSet, *, window: int = 4096, pcre_window: int = 1024) -> None:
        self.ruleset = rules
        self.rules: tuple[Rule, ...] = rules.rules
        self.window = window
        self.pcre_window = pcre_window
        self.stats = InspectorStats()
        self._flows: dict[tuple[int, int], _Dir] = {}
        # Hyperscan expression id -> (pattern length, ((rule index, content index), ...))
        self._db: Any = None
        self._targets: list[tuple[int, tuple[tuple[int, int], ...]]] = []
        exprs: dict[tuple[bytes, bool], list[tuple[int, int]]] = {}
        for ri, r in enumerate(self.rules):
            for ci, c in enumerate(r.contents):
                key = (c.pattern.lower(), True) if c.nocase else (c.pattern, False)
                exprs.setdefault(key, []).append((ri, ci))
        if exprs:
            keys = list(exprs)
            db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            db.compile(expressions=[k[0] for k in keys], ids=list(range(len(keys))), elements=len(keys),
                       flags=[hyperscan.HS_FLAG_CASELESS if k[1] else 0 for k in keys], literal=True)
            self._db = db
            self._targets = [(len(k[0]), tuple(exprs[k])) for k in keys]
        self._hits: list[tuple[int, int]] = []
        self._on_hit = self._collect
        self._ac_keep = max(rules.longest_content - 1, 0)
        self._keep = max(rules.longest_content - 1, pcre_window if any(r.pcre for r in self.rules) else 0, 0)
        # Rules with the same header (flow, addresses, ports, direction) apply to the same connection
        # directions: a new direction tests each header once (a rule set of thousands has a few dozen)
        heads: dict[tuple[Any, ...], int] = {}
        self._heads: list[Rule] = []  # one rule of each header group
        self._group_of: list[int] = []  # rule index -> its group
        pcre_only: list[list[int]] = []
        for ri, r in enumerate(self.rules):
            g = heads.setdefault((r.flow, r.src, r.sport, r.dst, r.dport, r.bidirectional), len(self._heads))
            if g == len(self._heads):
                self._heads.append(r)
                pcre_only.append([])
            self._group_of.append(g)
            if not r.contents:
                pcre_only[g].append(ri)
        self._pcre_only = [tuple(x) for x in pcre_only]
        self._sids = {r.sid: i for i, r in enumerate(self.rules)}  # (unique: the parser checks)
        # directions of the inspectors this one replaced (rules reloaded), not fed since: per reload,
        # the old inspector and those directions' states, taken over on their next bytes (see adopt)
        self._carried: list[tuple[Inspector, dict[tuple[int, int], _Dir]]] = []

    def __len__(self) -> int:
        return len(self._flows) + sum(len(flows) for _old, flows in self._carried)

    # ------------------------------------------------------------------
    def feed(self, conn_id: int, direction: Direction, data: bytes, client: tuple[bytes, int],
             server: tuple[bytes, int]) -> list[Match]:
        """Inspect the next in-order bytes of one direction; returns new matches."""
        if not data or not self.rules:
            return []
        key = (conn_id, int(direction))
        st = self._flows.get(key)
        if st is None:
            st = self._open(key, direction, client, server)
        if not st.groups:
            st.offset += len(data)
            return []
        self.stats.chunks += 1
        self.stats.bytes[direction] += len(data)
        tail = st.tail
        lt = len(tail)
        if not isinstance(data, bytes):
            data = bytes(data)
        base = st.offset - lt  # stream offset of the tail's first byte ("buf" = tail + data, never built)
        st.offset += len(data)
        out: list[Match] = []
        touched: set[int] = set()
        db = self._db
        if db is not None:
            hits, targets_of = self._hits, self._targets
            found: list[tuple[int, int]] = []  # (expression, end offset in buf)
            lead = min(lt, self._ac_keep)  # the part of the tail a split content can start in
            if lead:  # contents that start in the tail and end in this chunk
                db.scan(tail[lt - lead :] + data[: self._ac_keep], match_event_handler=self._on_hit)
                found += [(eid, lt - lead + stop) for eid, stop in hits
                          if stop > lead and stop - targets_of[eid][0] < lead]
                hits.clear()
            db.scan(data, match_event_handler=self._on_hit)
            found += [(eid, lt + stop) for eid, stop in hits]
            hits.clear()
            group_of, groups = self._group_of, st.groups
            for eid, end in found:
                for ri, ci in targets_of[eid][1]:
                    if group_of[ri] not in groups or ri in st.fired:
                        continue
                    ends = st.seen.get(ri)
                    if ends is None:
                        ends = st.seen[ri] = [-1] * len(self.rules[ri].contents)
                    if base + end > ends[ci]:
                        ends[ci] = base + end
                    touched.add(ri)
        if st.recheck:
            touched.update(st.recheck)
            st.recheck = ()
        chunk_start = st.offset - len(data)
        cands = touched.union(st.pcre_only)
        cands.update(ri for ri in st.seen if self.rules[ri].pcre is not None)
        for ri in sorted(cands):
            if ri in st.fired:
                continue
            r = self.rules[ri]
            if r.contents:
                ends = st.seen.get(ri)
                if ends is None or min(ends) < 0 or max(ends) - min(ends) > self.window:
                    continue  # not every content seen yet, or too far apart
                if r.pcre is None and ri not in touched:
                    continue  # unchanged since it was last found incomplete
                if r.pcre is not None and ri not in touched and max(ends) < chunk_start - self.pcre_window:
                    continue  # no content of the rule near this chunk: a pcre match here would not be near them
            if r.pcre is not None:
                self.stats.pcre_runs += 1
                start = max(0, lt - self.pcre_window)
                stop = lt + len(data)
                if r.contents:  # the match must lie within `window` of every content
                    ends = st.seen[ri]
                    start = max(start, max(ends) - self.window - base)
                    stop = min(stop, min(ends) + self.window - base)
                    if stop <= lt or start >= stop:
                        continue
                region = _span(tail, data, start, stop)
                new_from = lt - start
                hit = None
                for m in r.pcre.regex.finditer(region):
                    if m.end() > new_from:
                        hit = m
                        break
                if hit is None:
                    continue
                end_off = base + start + hit.end()
            else:
                end_off = max(st.seen[ri])
            st.fired.add(ri)
            st.seen.pop(ri, None)
            self.stats.matches += 1
            out.append(Match(conn_id, direction, r.sid, r.rev, r.msg, end_off))
        keep = self._keep
        if not keep:
            st.tail = b""
        elif len(data) >= keep:
            st.tail = data[-keep:]
        else:
            st.tail = (tail + data)[-keep:]
        return out

    def _collect(self, eid: int, _start: int, stop: int, _flags: int, _ctx: object) -> None:
        self._hits.append((eid, stop))

    def close(self, conn_id: int) -> None:
        for table in (self._flows, *(flows for _old, flows in self._carried)):
            table.pop((conn_id, 0), None)
            table.pop((conn_id, 1), None)

    def retain(self, live: Any) -> None:
        """Forget the state of connections not in ``live`` (a container of connection ids)."""
        for table in (self._flows, *(flows for _old, flows in self._carried)):
            for key in [k for k in table if k[0] not in live]:
                del table[key]
        self._carried = [c for c in self._carried if c[1]]

    def adopt(self, old: Inspector) -> None:
        """Take over the connections of the inspector this one replaces (rules reloaded).

        Each direction goes on from where it is: its stream offset, and the tail a content split
        across chunks or a pcre needs (as much as the old rules kept). A rule that already fired on
        a direction (same sid) does not fire again; a rule kept with the same contents keeps the
        contents it has seen; a new or changed rule sees that direction's bytes from the reload on,
        and its contents already in the carried tail count as seen; what lies before that tail it
        cannot see, so it can miss a match that began there. The counters carry on.

        Constant work per connection here (the loop puts the new rules in force between two
        packets): which rules apply to a direction is worked out on its next bytes, as for a new
        connection (10,000 connections x 500 rules at once took 6 s); here, the old states change
        hands whole."""
        self.stats = old.stats
        self._carried = [(old, old._flows), *old._carried]  # the newest first: a key is in one of them
        old._flows, old._carried = {}, []

    def _applies(self, st: _Dir, ri: int) -> bool:
        return self._group_of[ri] in st.groups

    def _take(self, nd: _Dir, old: Inspector, od: _Dir) -> None:
        """A carried direction's state (``od``, of the ``old`` inspector) into ``nd``, this
        inspector's state of the same direction."""
        nd.offset = od.offset
        sids = self._sids
        for ri in od.fired:
            ni = sids.get(old.rules[ri].sid)
            if ni is not None and self._applies(nd, ni):
                nd.fired.add(ni)
        for ri, ends in od.seen.items():
            ni = sids.get(old.rules[ri].sid)
            if ni is not None and ni not in nd.fired and self._applies(nd, ni) \
                    and self.rules[ni].contents == old.rules[ri].contents:
                nd.seen[ni] = list(ends)
        self._seed(nd, old, od)
        keep = self._keep
        nd.tail = od.tail[-keep:] if keep else b""

    def _seed(self, st: _Dir, old: Inspector, od: _Dir) -> None:
        """Contents of the new and changed rules in the old inspector's tail of a direction (before
        it is cut to this one's length) count as seen (for a rule kept unchanged the old inspector
        found them already); those rules are evaluated with the next chunk."""
        tail = od.tail
        if self._db is None or not tail:
            return
        base = st.offset - len(tail)
        self._db.scan(tail, match_event_handler=self._on_hit)
        hits = list(self._hits)
        self._hits.clear()
        again = set()
        for eid, stop in hits:
            for ri, ci in self._targets[eid][1]:
                if not self._applies(st, ri) or ri in st.fired:
                    continue
                oi = old._sids.get(self.rules[ri].sid)
                if oi is not None and old._applies(od, oi) and old.rules[oi].contents == self.rules[ri].contents:
                    continue  # kept unchanged: what it saw came over with it
                ends = st.seen.get(ri)
                if ends is None:
                    ends = st.seen[ri] = [-1] * len(self.rules[ri].contents)
                ends[ci] = max(ends[ci], base + stop)
                again.add(ri)
        st.recheck = tuple(sorted(again))

    # ------------------------------------------------------------------
    def _open(self, key: tuple[int, int], direction: Direction, client: tuple[bytes, int],
              server: tuple[bytes, int]) -> _Dir:
        st = self._dir(int(direction), client, server)
        self._flows[key] = st
        for old, flows in self._carried:
            od = flows.pop(key, None)
            if od is not None:
                self._take(st, old, od)
                if not flows:
                    self._carried = [c for c in self._carried if c[1]]
                return st
        self.stats.flows += 1
        return st

    def _dir(self, direction: int, client: tuple[bytes, int], server: tuple[bytes, int]) -> _Dir:
        """A direction's state, with the rules that apply to its addresses and ports."""
        c = (ipaddress.ip_address(client[0]), client[1])
        s = (ipaddress.ip_address(server[0]), server[1])
        to_server = direction == Direction.C2S
        sender, receiver = (c, s) if to_server else (s, c)
        groups = frozenset(g for g, r in enumerate(self._heads) if r.applies(to_server, sender, receiver))
        pcre_only = tuple(ri for g in sorted(groups) for ri in self._pcre_only[g])
        return _Dir(groups, pcre_only)
