"""Embedded inspector: signature rules matched on each connection's rebuilt byte stream.

Sans-I/O: :meth:`Inspector.feed` takes the bytes a connection just released in
one direction (in data-sequence order) and returns the rules that matched.
The gateway calls it before it gives the packet that released those bytes
its verdict, so a match can still drop that packet.

Engine: one Hyperscan block-mode database (C, SIMD: several GB/s) holds every
``content`` of every rule (as a fully escaped expression: binary contents
included), caseless for ``nocase`` ones, so one
pass per chunk finds all contents of all rules; Python only sees the hits,
filed by expression in C where the compiled scanner (``mproxy/_hsscan.c``) was
built (the binding calls a Python handler per match: a flood of one content
then cost most of the inspector's time).

Streaming: a content split across two chunks must be found, so each
direction keeps its last ``longest content - 1`` bytes and the next chunk is
scanned behind them; hits that lie wholly inside that tail were reported
before and are skipped. ``pcre`` runs only once all of a rule's contents have
been seen within ``window`` bytes of each other (the contents are the
prefilter, as Snort's fast pattern), and only on the stretch where a match can
satisfy the rule: within ``window`` bytes of those contents, and no further
back than ``pcre_window`` bytes before the chunk (so a match straddling the
chunk boundary is still found, and so is one wholly before it whose rule's
last content, or whose look-ahead's bytes, came with the chunk); rules with a
pcre and no content run it on each chunk plus those ``pcre_window`` bytes. A
rule fires at most once per connection direction.

Time bound: the pcre searches of one chunk share ``pcre_budget`` seconds
(the ``regex`` engine stops at its timeout; see :class:`mproxy.core.rules.Pcre`).
A rule whose pcre is not decided within it does not match there: it is
reported as a :class:`PcreLimit` (once per rule and connection direction,
counted every time) for the caller to react to, and is tried again with the
next chunk. So a rule with nested repeats costs a packet's verdict at most the
budget, not the hours Python's backtracking can take on chosen bytes. A search
that ran out of time with the budget to itself is its rule's strike: the rules
after it on the chunk get a budget of their own (one backtracking rule must not
keep the others from being searched), and at ``pcre_strikes`` strikes the rule
is no longer searched on that direction (counted in ``pcre_given_up``).

Strikes bound what such bytes cost per connection direction, not in all: every
new connection fed them costs ``pcre_strikes`` budgets again, and a few dozen
a second stall a worker (and with it the queue, which then passes or drops
everything). So the searches of all connections together may take at most
``pcre_share`` of the inspector's time: a credit of ``pcre_share`` seconds that
refills at ``pcre_share`` seconds per second. A search also stops where the
credit ends, and while it is spent pcre rules are not searched: each reported
as a :class:`PcreLimit` (``starved``; no strike), while content-only rules go
on matching.

Semantics on the stream (the subset documented in :mod:`mproxy.core.rules`):
a rule matches when there is one match of each of its contents (in any order,
unless ``distance``/``within`` tie a content to the one before it;
``offset``/``depth`` count from the start of the stream) and of its pcre, all
within ``window`` bytes of stream. Each direction keeps the ends of the
recent matches of each content (within ``window`` bytes, at most
``_OCCURRENCES`` each; one list per distinct content, shared by the rules that
use it), not only the last: a rule whose contents lie close together must
match even when the same chunk repeats one of them further on.
"""

from __future__ import annotations

import ipaddress
import time
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any, Callable

import hyperscan
import regex

from ..compiled import content_scanner
from .events import Direction
from .pcre_gate import PcreGate
from .rules import Content, Rule, RuleError, RuleSet, load_rules

__all__ = ["Match", "PcreLimit", "Inspector", "InspectorStats", "fit_window", "load_checked"]

_OCCURRENCES = 256  # match ends kept per distinct content and direction (the latest)
_NO_END = 1 << 62
_HEX = [b"\\x%02x" % b for b in range(256)]

# A chain: a content and the contents tied to it by distance/within, in rule order; each link is
# (content index, length, distance, within or None) (the first link's distance and within unused)
_Link = tuple[int, int, int, "int | None"]


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
        return _rule_text(self.sid, self.msg)


@dataclass(frozen=True, slots=True)
class PcreLimit:
    """A rule whose pcre could not be decided on a chunk within the inspector's ``pcre_budget``:
    it did not match there, though it might have (the caller decides what that is worth)."""

    conn_id: int
    direction: Direction
    sid: int
    rev: int
    msg: str
    offset: int  # stream offset of the end of the chunk it was searched in
    starved: bool = False  # not (fully) searched: the pcre time share of all connections was spent

    def reason(self) -> str:
        if self.starved:
            return f"{_rule_text(self.sid, self.msg)}: pcre not searched, the inspector's pcre time share was spent"
        return f"{_rule_text(self.sid, self.msg)}: pcre not decided within the time budget"


def _rule_text(sid: int, msg: str) -> str:
    return f"sid {sid}: {msg}" if msg else f"sid {sid}"


@dataclass(slots=True)
class InspectorStats:
    bytes: list[int] = field(default_factory=lambda: [0, 0])  # inspected, by direction
    chunks: int = 0
    matches: int = 0
    pcre_runs: int = 0
    pcre_gated: int = 0  # pcre searches skipped: the Hyperscan gate found no possible match in the bytes
    pcre_limits: int = 0  # pcre searches not decided within the budget (stopped, or not started)
    pcre_given_up: int = 0  # (rule, direction)s no longer searched: pcre_strikes searches that ran out of time
    pcre_starved: int = 0  # pcre searches not run or cut short: the pcre_share of all connections was spent
    flows: int = 0  # connection directions inspected since start
    shed: int = 0  # content match ends dropped over _OCCURRENCES (a rule can then miss)
    rules: int = 0  # rules in force
    skipped_rules: int = 0  # rules of the file left out ([inspector] skip_bad_rules)


@dataclass(slots=True)
class _Dir:
    """Per connection direction: the tail, the position, partial rule state."""

    groups: frozenset[int]  # the header groups (see Inspector) whose rules apply to this direction
    pcre_only: tuple[int, ...]  # rules with a pcre and no content: run on every chunk
    offset: int = 0  # bytes inspected so far
    tail: bytes = b""
    # expression (distinct content) -> stream offsets where its recent matches end, sorted
    occ: dict[int, list[int]] = field(default_factory=dict)
    fired: set[int] = field(default_factory=set)
    partial: set[int] = field(default_factory=set)  # rules with a pcre and contents, some seen: pcre may run
    recheck: tuple[int, ...] = ()  # rules to evaluate with the next chunk (after a reload)
    limited: set[int] = field(default_factory=set)  # rules whose pcre ran out of time here (reported once)
    strikes: dict[int, int] = field(default_factory=dict)  # rule -> its searches that ran out of time on their own
    gave_up: set[int] = field(default_factory=set)  # rules not searched here any more (pcre_strikes reached)
    swept: int = 0  # offset of the last sweep of ``occ`` (stale match ends dropped)

    def settled(self) -> set[int]:
        """The rules done with here: fired, or given up (no new set while none was given up)."""
        return self.fired | self.gave_up if self.gave_up else self.fired


def _chains(rule: Rule) -> tuple[tuple[_Link, ...], ...]:
    links: list[list[_Link]] = []
    for ci, c in enumerate(rule.contents):
        link = (ci, len(c.pattern), c.distance or 0, c.within)
        if c.relative and links:
            links[-1].append(link)
        else:
            links.append([link])
    return tuple(tuple(x) for x in links)


def fit_window(rules: RuleSet, window: int, skip: bool = False) -> RuleSet:
    """RuleError (naming the line) for a rule whose distances put its contents further apart than
    ``window``: it could never match, and a rule that silently never fires is worse than none.
    With ``skip``, such rules are left out instead (named in ``skipped``)."""
    bad: dict[int, str] = {}
    for r in rules.rules:
        for links in _chains(r):
            reach = 0
            for _ci, ln, dist, _w in links[1:]:
                reach += dist + ln
                if reach > window and r.sid not in bad:
                    bad[r.sid] = (f"{rules.source}:{r.line}: sid {r.sid}: its distance/within put contents more "
                                  f"than the inspector window ({window} bytes) apart; it could never match")
    if bad and not skip:
        raise RuleError(next(iter(bad.values())))
    if not bad:
        return rules
    return replace(rules, rules=tuple(r for r in rules.rules if r.sid not in bad),
                   skipped=rules.skipped + tuple(bad.values()))


def load_checked(path: str, window: int, skip: bool = False) -> RuleSet:
    """A rules file for an inspector with this ``window``: parsed (``skip``: bad rules left out and
    named) and fitted to the window; RuleError names the file and line, or says that no rule loads."""
    rs = fit_window(load_rules(path, skip), window, skip)
    if not rs.rules and rs.skipped:
        raise RuleError(f"no rule of {path} loads ({len(rs.skipped)} skipped; the first: {rs.skipped[0]})")
    return rs


def rule_warnings(rs: RuleSet) -> list[tuple[str, list[str]]]:
    """What to tell an operator about a loaded rule set, by kind: the rules ``skip_bad_rules`` left
    out, and those whose pcre can backtrack (:mod:`mproxy.core.pcre_lint`)."""
    from .pcre_lint import backtracking_warnings

    return [("rule skipped", list(rs.skipped)), ("rule may backtrack", backtracking_warnings(rs))]


def _sets(chains: tuple[tuple[_Link, ...], ...], occ: list[list[int]], window: int,
          first: bool) -> list[tuple[int, int]]:
    """Where all of a rule's contents match: ``(lo, hi)``, the earliest and latest match end of one
    choice of a match per content that satisfies the relative modifiers, with ``hi - lo <= window``;
    one per distinct ``hi`` (with the latest ``lo`` for it), in stream order (only the first if
    ``first``). ``occ`` holds each content's match ends, sorted.

    A chain is solved by dynamic programming over those ends: a match of a tied content links to the
    latest match of the content before it that leaves it room, which is also the link whose chain
    starts latest (the tightest), so one pass per content suffices."""
    if len(chains) == 1 and len(chains[0]) == 1:  # one content: each of its matches
        ends = occ[chains[0][0][0]]
        return [(ends[0], ends[0])] if first else [(e, e) for e in ends]
    his: list[list[int]] = []
    los: list[list[int]] = []
    for links in chains:
        comp = [(e, e, e) for e in occ[links[0][0]]]  # (end of the chain so far, lo, hi)
        for ci, ln, dist, within in links[1:]:
            ends = [c[0] for c in comp]
            nxt = []
            for e in occ[ci]:
                j = bisect_right(ends, e - ln - dist) - 1  # starts at least `dist` after the previous end
                if j < 0:
                    continue
                p, lo, hi = comp[j]
                if within is not None and e > p + dist + within:
                    continue
                nxt.append((e, lo if lo < e else e, hi if hi > e else e))
            comp = nxt
        if not comp:
            return []
        pairs = sorted((hi, lo) for _e, lo, hi in comp)
        best, bests = -_NO_END, []
        for _hi, lo in pairs:
            best = lo if lo > best else best
            bests.append(best)
        his.append([hi for hi, _lo in pairs])
        los.append(bests)
    out: list[tuple[int, int]] = []
    for top in sorted(set(chain.from_iterable(his))):
        low = top
        for h, b in zip(his, los):
            k = bisect_right(h, top) - 1
            if k < 0:
                break
            low = min(low, b[k])
        else:
            if top - low <= window:
                out.append((low, top))
                if first:
                    break
    return out


def _ends_allowed(c: Content) -> tuple[int, int]:
    """The lowest and highest stream offset a match of ``c`` may end at (its offset and depth)."""
    lo = c.offset or 0
    return lo + len(c.pattern), _NO_END if c.depth is None else lo + c.depth


def _key(pattern: bytes, nocase: bool) -> tuple[bytes, bool]:
    return (pattern.lower(), True) if nocase else (pattern, False)


def _scan_into(db: Any, by: dict[int, list[int]]) -> Callable[[bytes, int], None]:
    """``scan(data, base)``: every content match of ``data``, its stream offset (its end in ``data``
    plus ``base``) filed under its expression in ``by``. The compiled scanner (``mproxy/_hsscan.c``)
    does that in C; the binding's database calls a Python handler per match, the reference."""
    if db is None:
        return lambda _data, _base: None
    if not isinstance(db, hyperscan.Database):
        return lambda data, base: db.scan(data, by, base)
    get, at = by.get, [0]

    def on_match(eid: int, _start: int, stop: int, _flags: int, _ctx: object) -> None:
        ends = get(eid)
        if ends is None:
            by[eid] = [stop + at[0]]
        else:
            ends.append(stop + at[0])

    def scan(data: bytes, base: int) -> None:
        at[0] = base
        db.scan(data, match_event_handler=on_match)

    return scan


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

    def __init__(self, rules: RuleSet, *, window: int = 4096, pcre_window: int = 1024,
                 pcre_budget: float = 0.02, pcre_strikes: int = 3, pcre_share: float = 1.0) -> None:
        self.ruleset = rules
        self.rules: tuple[Rule, ...] = rules.rules
        self.window = window
        self.pcre_window = pcre_window
        self.pcre_budget = pcre_budget  # seconds the pcre searches of one chunk may take together
        self.pcre_strikes = pcre_strikes  # searches a rule may run out of time on one direction (0: no end)
        # of the time, what the pcre searches of all connections may take (1: no bound): a credit of
        # that many seconds, refilled at that many seconds per second
        self.pcre_share = pcre_share
        self._credit = pcre_share
        self._credit_at = 0.0  # time.perf_counter() of the last refill; 0: not yet used
        self.stats = InspectorStats(rules=len(rules.rules), skipped_rules=len(rules.skipped))
        self._flows: dict[tuple[int, int], _Dir] = {}
        # Hyperscan expression id -> (pattern length, ((rule index, content index, lowest end, highest
        # end), ...)): the match ends offset/depth allow
        self._db: Any = None
        self._targets: list[tuple[int, tuple[tuple[int, int, int, int], ...]]] = []
        fit_window(rules, window)
        self._chains = [_chains(r) for r in self.rules]
        exprs: dict[tuple[bytes, bool], list[tuple[int, int, int, int]]] = {}
        # rule -> if any content has offset/depth, the match ends each allows (lowest, highest)
        self._bounds: list[tuple[tuple[int, int], ...] | None] = []
        for ri, r in enumerate(self.rules):
            bounds = tuple(_ends_allowed(c) for c in r.contents)
            for ci, c in enumerate(r.contents):
                exprs.setdefault(_key(c.pattern, c.nocase), []).append((ri, ci, *bounds[ci]))
            self._bounds.append(bounds if any(c.offset is not None or c.depth is not None for c in r.contents)
                                else None)
        self._eids = {k: i for i, k in enumerate(exprs)}  # content (pattern, nocase) -> expression id
        # rule -> the expression of each content
        self._uses = [tuple(self._eids[_key(c.pattern, c.nocase)] for c in r.contents) for r in self.rules]
        # id(replaced inspector, in _carried) -> its expression id -> ours (None: a content we lack)
        self._emaps: dict[int, list[int | None]] = {}
        if exprs:
            keys = list(exprs)
            # every byte escaped, in regex mode: the binding's pure-literal mode measures patterns with
            # strlen(), so "a|00 01|" would be compiled as "a" (and "|00|..." refused); as fast here
            # a content whose every rule has no other content, no pcre and no offset/depth fires them at its
            # first match: Hyperscan reports only that one per scan (a flood of it then costs one
            # callback per chunk, not one per match: "../../" repeated went from 70 Mbit/s to Gbit/s)
            single = [all(len(self.rules[ri].contents) == 1 and self.rules[ri].pcre is None
                          and self._bounds[ri] is None for ri, _ci, _lo, _hi in exprs[k]) for k in keys]
            patterns = [b"".join(_HEX[b] for b in k[0]) for k in keys]
            flags = [(hyperscan.HS_FLAG_CASELESS if k[1] else 0) | (hyperscan.HS_FLAG_SINGLEMATCH if one else 0)
                     for k, one in zip(keys, single)]
            native = content_scanner()
            if native is not None:  # the same database, its match handler in C (mproxy/_hsscan.c; the
                self._db = native.Scanner(patterns, flags)  # HS_FLAG_* are hs.h's numbers in both)
            else:
                db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
                db.compile(expressions=patterns, ids=list(range(len(keys))), elements=len(keys), flags=flags)
                self._db = db
            self._targets = [(len(k[0]), tuple(exprs[k])) for k in keys]
        # the chunk's matches, grouped by expression as Hyperscan reports them (expression -> the stream
        # offsets where they end): no tuple per match, no second pass to group them; and those of the
        # stretch around the tail's end (a content split across two chunks)
        self._by: dict[int, list[int]] = {}
        self._lead_by: dict[int, list[int]] = {}
        self._scan_by = _scan_into(self._db, self._by)
        self._scan_lead = _scan_into(self._db, self._lead_by)
        self._gate = PcreGate({ri: r.pcre.stdlib for ri, r in enumerate(self.rules)
                               if r.pcre is not None and r.pcre.stdlib is not None})
        self._ac_keep = max(rules.longest_content - 1, 0)
        # a pcre looks pcre_window bytes back, and at one more byte before them (see _pcre)
        self._keep = max(rules.longest_content - 1, pcre_window + 1 if any(r.pcre for r in self.rules) else 0, 0)
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
    def peek(self, conn_id: int, direction: Direction, data: bytes, client: tuple[bytes, int],
             server: tuple[bytes, int]) -> list[Match | PcreLimit]:
        """Inspect ``data`` as the first bytes of a direction and keep nothing: for bytes that may
        or may not become the head of the stream (a Fast Open SYN's, before the server has
        answered). A state the direction already has is left as it was."""
        key = (conn_id, int(direction))
        saved = self._flows.pop(key, None)
        self._flows[key] = self._dir(int(direction), client, server)
        try:
            return self.feed(conn_id, direction, data, client, server)
        finally:
            del self._flows[key]
            if saved is not None:
                self._flows[key] = saved

    def feed(self, conn_id: int, direction: Direction, data: bytes, client: tuple[bytes, int],
             server: tuple[bytes, int]) -> list[Match | PcreLimit]:
        """Inspect the next in-order bytes of one direction; returns new matches, and the rules
        whose pcre ran out of time on them (the first time for each rule and direction)."""
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
        out: list[Match | PcreLimit] = []
        touched: set[int] = set()
        db = self._db
        if db is not None:
            by, start = self._by, base + lt
            self._scan_by(data, start)
            lead = min(lt, self._ac_keep)  # the part of the tail a split content can start in
            if lead:  # contents that start in the tail and end in this chunk
                lead_by, targets_of = self._lead_by, self._targets
                self._scan_lead(tail[lt - lead :] + data[: self._ac_keep], start - lead)
                for eid, stops in lead_by.items():
                    ln = targets_of[eid][0]
                    for stop in stops:
                        if stop > start and stop - ln < start:
                            by.setdefault(eid, []).append(stop)
                lead_by.clear()
            touched, hit = self._record(st, by, st.settled())
            by.clear()
        else:
            hit = set()
        if st.recheck:
            touched.update(st.recheck)
            st.recheck = ()
        chunk_start = st.offset - len(data)
        window = self.window
        cands = touched.union(st.pcre_only, st.partial)
        gate, maybe = self._gate, None
        deadline = 0.0  # of this chunk's pcre searches; set by the first
        for ri in sorted(cands):
            if ri in st.fired or ri in st.gave_up:
                continue
            r = self.rules[ri]
            sets: list[tuple[int, int]] = []
            lists: list[list[int]] = []
            if r.contents:
                got = self._lists(st, ri)
                if got is None:
                    continue  # not every content seen yet (or seen, and left behind)
                lists = got
                if r.pcre is not None:
                    st.partial.add(ri)
                if ri not in touched and (r.pcre is None or max(x[-1] for x in lists) < chunk_start - window):
                    # unchanged since it was last found incomplete, or no content within the window of
                    # this chunk (not pcre_window: a pcre match may lie up to `window` after a content)
                    continue
            if r.pcre is not None and ri in gate.gated:
                # one Hyperscan pass for every gated pcre, over all the bytes a search could look at: where
                # the pcre cannot match, neither the search nor the content sets before it (which cost the
                # most when contents are dense) are needed
                if maybe is None:
                    maybe = gate.matching(_span(tail, data, max(0, lt - self.pcre_window), lt + len(data)))
                if ri not in maybe:
                    self.stats.pcre_gated += 1
                    continue
            if r.contents:
                sets = _sets(self._chains[ri], lists, window, r.pcre is None)
                if not sets:
                    continue  # not close enough together, or not in the order distance/within ask
            if r.pcre is not None:
                now = time.perf_counter()
                if not deadline:
                    deadline = now + self.pcre_budget
                until = deadline  # this search's: the chunk's deadline, or where the credit ends
                if self.pcre_share < 1.0:
                    credit = self._refill(now)
                    if credit <= 0.0:
                        self.stats.pcre_starved += 1
                        self.stats.pcre_limits += 1
                        self._limited(st, ri, r, conn_id, direction, out, True)
                        continue
                    until = min(deadline, now + credit)
                self.stats.pcre_runs += 1
                try:
                    found_at = self._pcre(r.pcre.regex, tail, data, base, sets, until)
                except TimeoutError:
                    self.stats.pcre_limits += 1
                    starved = until < deadline
                    if starved:
                        self.stats.pcre_starved += 1  # the share ran out, not this rule's budget: no strike
                    elif deadline - now >= self.pcre_budget / 2:
                        # it had (most of) the budget and spent it: its own doing, a strike; the rules
                        # after it get a budget of their own, or bytes that make one rule backtrack
                        # would keep every other pcre rule from being searched on the chunk
                        deadline = time.perf_counter() + self.pcre_budget
                        self._strike(st, ri)
                    self._limited(st, ri, r, conn_id, direction, out, starved)
                    continue
                finally:
                    if self.pcre_share < 1.0:
                        self._credit -= time.perf_counter() - now
                if found_at is None:
                    continue
                end_off = found_at
            else:
                end_off = sets[0][1]
            st.fired.add(ri)
            st.partial.discard(ri)
            self.stats.matches += 1
            out.append(Match(conn_id, direction, r.sid, r.rev, r.msg, end_off))
        self._forget_old(st, hit)
        keep = self._keep
        if not keep:
            st.tail = b""
        elif len(data) >= keep:
            st.tail = data[-keep:]
        else:
            st.tail = (tail + data)[-keep:]
        return out

    def _refill(self, now: float) -> float:
        """The pcre time credit at ``now``: ``pcre_share`` seconds per second since the last refill,
        up to ``pcre_share`` seconds (a second's worth: what one busy second may spend)."""
        if self._credit_at:
            self._credit = min(self.pcre_share, self._credit + (now - self._credit_at) * self.pcre_share)
        self._credit_at = now
        return self._credit

    @staticmethod
    def _limited(st: _Dir, ri: int, r: Rule, conn_id: int, direction: Direction, out: list[Match | PcreLimit],
                 starved: bool) -> None:
        """Rule ``ri``'s pcre was not decided on this chunk: reported once per connection direction."""
        if ri not in st.limited:
            st.limited.add(ri)
            out.append(PcreLimit(conn_id, direction, r.sid, r.rev, r.msg, st.offset, starved))

    def _strike(self, st: _Dir, ri: int) -> None:
        """Rule ``ri``'s search ran out of time with the budget to itself. At ``pcre_strikes`` such
        searches on one direction it is not searched there again: bytes that make it backtrack
        would otherwise cost the worker the budget on every packet (50 packets a second stall it,
        and then the whole queue), and they can as well be sent with each packet to keep the rule
        from matching, so giving up loses no detection an attacker could not already avoid."""
        n = st.strikes[ri] = st.strikes.get(ri, 0) + 1
        if self.pcre_strikes and n >= self.pcre_strikes:
            st.gave_up.add(ri)
            st.partial.discard(ri)
            self.stats.pcre_given_up += 1

    def _pcre(self, rx: regex.Pattern[bytes], tail: bytes, data: bytes, base: int,
              sets: list[tuple[int, int]], deadline: float) -> int | None:
        """Stream offset where a match of ``rx`` ends that lies within ``window`` of each content
        of one of ``sets`` (any match, for a rule without contents); None if there is none. The
        match may lie wholly in the tail, before the new bytes (``data``): a content it needed, or
        the bytes its look-ahead needed, came with them (requiring it to take new bytes let a
        packet boundary decide, an evasion). Searches only where such a match can be: each set's
        stretch, the overlapping ones merged, and no further back than ``pcre_window``.
        TimeoutError if that is not decided by ``deadline`` (``time.perf_counter``).

        Each stretch is searched in place (``pos``/``endpos``), not cut out: ``^``, ``\\b`` and
        look-behinds see the byte before it, so ``^`` matches at the start of the stream (or of a
        line, with ``m``), never merely where a stretch begins. The tail keeps one byte more than
        ``pcre_window`` for that; a tail that does not begin the stream is never searched from its
        first byte (only right after a reload can there be no tail: then the new bytes are searched
        from their first). ``$`` still matches where a stretch ends (the end of the bytes so far,
        or of the window)."""
        lt = len(tail)
        first, last, window = max(1 if base and lt else 0, lt - self.pcre_window), lt + len(data), self.window
        spans: list[list[int]] = []
        if len(sets) > 8:  # many: their stretches overlap into (nearly) one, the hull costs less to find
            sets_ = [(sets[-1][0], sets[0][1])]
        else:
            sets_ = sets
        if not sets:
            spans.append([first, last])
        for lo, hi in sets_:  # both grow along `sets`, so merging in order suffices
            a, b = max(first, hi - window - base), min(last, lo + window - base)
            if b <= lt or a >= b:
                continue
            if spans and a <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], b)
            else:
                spans.append([a, b])
        buf = tail + data if tail else data
        for a, b in spans:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError
            for m in rx.finditer(buf, a, b, timeout=left):
                start, end = base + m.start(), base + m.end()
                if not sets or any(start >= hi - window and end <= lo + window for lo, hi in sets):
                    return end
        return None

    def _record(self, st: _Dir, by: dict[int, list[int]], skip: set[int]) -> tuple[set[int], set[int]]:
        """Note the content matches ``by`` (expression -> the stream offsets where its matches end;
        the lists are taken over) that a rule of ``st`` not in ``skip`` can use; returns those rules
        and the expressions noted (their lists come out sorted). Grouped by expression, the rules'
        conditions are tested once per expression and chunk, not once per match (a stream dense
        with contents has dozens of matches per packet)."""
        touched: set[int] = set()
        hit: set[int] = set()
        targets_of, group_of, groups, occ = self._targets, self._group_of, st.groups, st.occ
        for eid, ends in by.items():
            ends.sort()  # (reported nearly in order: a pass)
            first, last = ends[0], ends[-1]
            every = False  # a rule can use every end
            some: set[int] = set()  # else the ends some rule can use
            for ri, _ci, lowest, highest in targets_of[eid][1]:
                if group_of[ri] not in groups or ri in skip or last < lowest or first > highest:
                    continue
                if lowest <= first and last <= highest:
                    every = True
                else:
                    usable = [e for e in ends if lowest <= e <= highest]
                    if not usable:
                        continue
                    some.update(usable)
                touched.add(ri)
            if not every and not some:
                continue
            lst = occ.get(eid)
            if lst is None:
                occ[eid] = ends if every else list(some)
            else:
                lst.extend(ends if every else some)
            hit.add(eid)
        for eid in hit:
            occ[eid].sort()
        return touched, hit

    def _lists(self, st: _Dir, ri: int) -> list[list[int]] | None:
        """The match ends of each of rule ``ri``'s contents (within its offset/depth), or None if a
        content has none."""
        occ = st.occ
        lists = []
        for eid in self._uses[ri]:
            lst = occ.get(eid)
            if not lst:
                return None
            lists.append(lst)
        bounds = self._bounds[ri]
        if bounds is not None:
            for ci, (lo, hi) in enumerate(bounds):
                lst = lists[ci]
                lst = lst[bisect_right(lst, lo - 1) : bisect_right(lst, hi)]
                if not lst:
                    return None
                lists[ci] = lst
        return lists

    def _forget_old(self, st: _Dir, hit: set[int]) -> None:
        """Drop match ends no later match can be within ``window`` of: those of the contents matched
        in this chunk, and every ``window`` bytes all of them (and the pcre rules they leave without
        a content); at most ``_OCCURRENCES`` per content."""
        occ, horizon = st.occ, st.offset - self.window
        sweep = st.offset - st.swept >= self.window
        for eid in list(occ) if sweep else hit:
            lst = occ[eid]
            if lst[0] < horizon:
                del lst[: bisect_right(lst, horizon - 1)]
            if len(lst) > _OCCURRENCES:
                self.stats.shed += len(lst) - _OCCURRENCES
                del lst[:-_OCCURRENCES]
            if not lst:
                del occ[eid]
        if sweep:
            st.swept = st.offset
            st.partial = {ri for ri in st.partial if all(eid in occ for eid in self._uses[ri])}

    def close(self, conn_id: int) -> None:
        for table in (self._flows, *(flows for _old, flows in self._carried)):
            table.pop((conn_id, 0), None)
            table.pop((conn_id, 1), None)

    def retain(self, live: Any) -> None:
        """Forget the state of connections not in ``live`` (a container of connection ids)."""
        for table in (self._flows, *(flows for _old, flows in self._carried)):
            for key in [k for k in table if k[0] not in live]:
                del table[key]
        self._drop_taken()

    def adopt(self, old: Inspector) -> None:
        """Take over the connections of the inspector this one replaces (rules reloaded).

        Each direction goes on from where it is: its stream offset, and the tail a content split
        across chunks or a pcre needs (as much as the old rules kept). A rule that already fired on
        a direction (same sid) does not fire again. Every rule, kept, changed or new, sees the
        matches (within the window) of the contents the old rules had, and its contents in the
        carried tail; what lies before that tail, of a content no old rule had, it cannot see, so it
        can miss a match that began there. The counters carry on.

        Constant work per connection here (the loop puts the new rules in force between two
        packets): which rules apply to a direction is worked out on its next bytes, as for a new
        connection (10,000 connections x 500 rules at once took 6 s); here, the old states change
        hands whole. So does the pcre time credit."""
        old.stats.rules, old.stats.skipped_rules = self.stats.rules, self.stats.skipped_rules
        self.stats = old.stats
        if old._credit_at:  # a reload does not refill the pcre time credit
            self._credit, self._credit_at = min(old._credit, self.pcre_share), old._credit_at
        self._carried = [(old, old._flows), *old._carried]  # the newest first: a key is in one of them
        old._flows, old._carried = {}, []

    def _drop_taken(self) -> None:
        """Forget the replaced inspectors whose directions were all taken over (or closed)."""
        self._carried = [c for c in self._carried if c[1]]
        live = {id(old) for old, _flows in self._carried}
        self._emaps = {k: v for k, v in self._emaps.items() if k in live}

    def _applies(self, st: _Dir, ri: int) -> bool:
        return self._group_of[ri] in st.groups

    def _take(self, nd: _Dir, old: Inspector, od: _Dir) -> None:
        """A carried direction's state (``od``, of the ``old`` inspector) into ``nd``, this
        inspector's state of the same direction."""
        nd.offset = od.offset
        sids = self._sids

        def here(ri: int) -> int | None:  # the same rule (sid) here, if it applies to this direction
            ni = sids.get(old.rules[ri].sid)
            return ni if ni is not None and self._applies(nd, ni) else None

        for mine, theirs in ((nd.fired, od.fired), (nd.limited, od.limited), (nd.gave_up, od.gave_up)):
            mine.update(ni for ri in theirs if (ni := here(ri)) is not None)
        nd.strikes = {ni: n for ri, n in od.strikes.items() if (ni := here(ri)) is not None}
        # the content matches the old rules noted, for the same contents here; and those of the new
        # contents in the old tail (before it is cut to this one's length). Every rule that has one
        # is evaluated with the next chunk
        emap = self._emaps.get(id(old))
        if emap is None:
            emap = self._emaps[id(old)] = [self._eids.get(k) for k in old._eids]
        again: set[int] = set()
        done = nd.settled()
        for oeid, lst in od.occ.items():
            ne = emap[oeid]
            if ne is None:
                continue
            users = [ri for ri, _ci, _lo, _hi in self._targets[ne][1] if self._applies(nd, ri) and ri not in done]
            if users:  # (a content no rule here uses on this direction is not kept)
                nd.occ[ne] = list(lst)
                again.update(users)
        if self._db is not None and od.tail:
            self._scan_by(od.tail, nd.offset - len(od.tail))
            touched, hit = self._record(nd, self._by, done)
            self._by.clear()
            again |= touched
            for eid in hit:  # the old rules may have noted some of these already; the cap holds here too
                lst = nd.occ[eid] = sorted(set(nd.occ[eid]))
                if len(lst) > _OCCURRENCES:
                    self.stats.shed += len(lst) - _OCCURRENCES
                    del lst[:-_OCCURRENCES]
        nd.recheck = tuple(sorted(again))
        keep = self._keep
        nd.tail = od.tail[-keep:] if keep else b""

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
                    self._drop_taken()
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
