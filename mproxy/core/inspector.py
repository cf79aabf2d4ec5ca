"""Embedded inspector: signature rules matched on each connection's rebuilt byte stream.

Sans-I/O: :meth:`Inspector.feed` takes the bytes a connection just released in
one direction (in data-sequence order) and returns the rules that matched.
The gateway calls it before it gives the packet that released those bytes
its verdict, so a match can still drop that packet.

Engine: one Aho-Corasick automaton (pyahocorasick, C) holds every ``content``
of every rule, lower-cased; the stream is lower-cased too (ASCII only, as
Snort's ``nocase``) and case-sensitive contents are verified on the original
bytes at each hit. One pass per chunk finds all contents of all rules.

Streaming: a content split across two chunks must be found, so each
direction keeps its last ``longest content - 1`` bytes and the next chunk is
scanned behind them; hits that lie wholly inside that tail were reported
before and are skipped. ``pcre`` is evaluated on a bounded window (the last
``pcre_window`` bytes plus the new chunk); for rules with contents only once
all of them have been seen within ``window`` bytes of each other, and only on
a chunk that holds one of them or starts less than ``pcre_window`` bytes after
one (the contents are the prefilter, as Snort's fast pattern, and a pcre
match that straddles the boundary after its content is still found). A rule
fires at most once per connection direction.

Semantics on the stream (the subset documented in :mod:`mproxy.core.rules`):
a rule matches when every content occurs (in any order) and its pcre
matches, all within ``window`` bytes of stream.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import ahocorasick

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

    rules: tuple[int, ...]  # indices of the rules that apply to this direction
    applies: frozenset[int]
    pcre_only: tuple[int, ...]  # rules with a pcre and no content: run on every chunk
    offset: int = 0  # bytes inspected so far
    tail: bytes = b""
    seen: dict[int, list[int]] = field(default_factory=dict)  # rule -> last end offset per content (-1: none)
    fired: set[int] = field(default_factory=set)


class Inspector:
    """Matches a :class:`RuleSet` on rebuilt streams; state per live connection."""

    def __init__(self, rules: RuleSet, *, window: int = 4096, pcre_window: int = 1024) -> None:
        self.ruleset = rules
        self.rules: tuple[Rule, ...] = rules.rules
        self.window = window
        self.pcre_window = pcre_window
        self.stats = InspectorStats()
        self._flows: dict[tuple[int, int], _Dir] = {}
        # pattern (lower-cased) -> [(rule index, content index, exact pattern or None)]
        self._auto: Any = None
        hits: dict[str, list[tuple[int, int, bytes | None]]] = {}
        for ri, r in enumerate(self.rules):
            for ci, c in enumerate(r.contents):
                key = c.pattern.lower().decode("latin-1")
                hits.setdefault(key, []).append((ri, ci, None if c.nocase else c.pattern))
        if hits:
            auto = ahocorasick.Automaton()
            for key, targets in hits.items():
                auto.add_word(key, (len(key), tuple(targets)))
            auto.make_automaton()
            self._auto = auto
        self._ac_keep = max(rules.longest_content - 1, 0)
        self._keep = max(rules.longest_content - 1, pcre_window if any(r.pcre for r in self.rules) else 0, 0)

    def __len__(self) -> int:
        return len(self._flows)

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
        if not st.rules:
            st.offset += len(data)
            return []
        self.stats.chunks += 1
        self.stats.bytes[direction] += len(data)
        tail = st.tail
        buf = tail + data if tail else bytes(data)
        base = st.offset - len(tail)  # stream offset of buf[0]
        st.offset += len(data)
        out: list[Match] = []
        touched: set[int] = set()
        auto = self._auto
        if auto is not None:
            lead = min(len(tail), self._ac_keep)  # the part of the tail a split content can start in
            a0 = len(tail) - lead
            hay = buf[a0:].lower().decode("latin-1")
            for end, (plen, targets) in auto.iter(hay):
                if end < lead:
                    continue  # wholly inside the tail: reported with the previous chunk
                end += a0
                for ri, ci, exact in targets:
                    if ri not in st.applies or ri in st.fired:
                        continue
                    if exact is not None and buf[end - plen + 1 : end + 1] != exact:
                        continue
                    ends = st.seen.get(ri)
                    if ends is None:
                        ends = st.seen[ri] = [-1] * len(self.rules[ri].contents)
                    ends[ci] = base + end + 1
                    touched.add(ri)
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
                start = max(0, len(tail) - self.pcre_window)
                region = buf[start:]
                new_from = len(tail) - start
                found = None
                for m in r.pcre.regex.finditer(region):
                    if m.end() > new_from:
                        found = m
                        break
                if found is None:
                    continue
                end_off = base + start + found.end()
            else:
                end_off = max(st.seen[ri])
            st.fired.add(ri)
            st.seen.pop(ri, None)
            self.stats.matches += 1
            out.append(Match(conn_id, direction, r.sid, r.rev, r.msg, end_off))
        keep = self._keep
        st.tail = buf[-keep:] if keep else b""
        return out

    def close(self, conn_id: int) -> None:
        self._flows.pop((conn_id, 0), None)
        self._flows.pop((conn_id, 1), None)

    def retain(self, live: Any) -> None:
        """Forget the state of connections not in ``live`` (a container of connection ids)."""
        for key in [k for k in self._flows if k[0] not in live]:
            del self._flows[key]

    # ------------------------------------------------------------------
    def _open(self, key: tuple[int, int], direction: Direction, client: tuple[bytes, int],
              server: tuple[bytes, int]) -> _Dir:
        c = (ipaddress.ip_address(client[0]), client[1])
        s = (ipaddress.ip_address(server[0]), server[1])
        to_server = direction == Direction.C2S
        sender, receiver = (c, s) if to_server else (s, c)
        idx = tuple(i for i, r in enumerate(self.rules) if r.applies(to_server, sender, receiver))
        pcre_only = tuple(i for i in idx if not self.rules[i].contents)
        st = _Dir(idx, frozenset(idx), pcre_only)
        self._flows[key] = st
        self.stats.flows += 1
        return st
