"""Warnings for rule pcres that can backtrack exponentially.

Why: the inspector stops a pcre at ``[inspector] pcre_budget_ms``, and a rule
stopped there does not match, so a pcre that backtracks on crafted bytes is a
way to hide an attack behind a prefix. ``mproxy check``, ``run`` and
``replay`` name such rules at load, so they are rewritten (the inner part
atomic, ``(?>...)``, or possessive) before an attacker finds them.

What is named: inside a repeat that can run many times, bytes that one
iteration can read in two ways, so that N iterations have 2^N readings:

* a repeat whose bytes can also be what follows it, there or in the next
  iteration: ``(a+)+``, ``(\\w+\\s?)+``, ``(\\s|/\\*.*?\\*/)+`` (``.`` also
  reads the ``*/``). ``(\\w+\\.)+`` and ``(ab+)+`` are not named: the ``.``
  and the ``a`` end each iteration one way only;
* alternatives that can start the same way: ``(a|a)+``, ``(\\w|\\d)+``
  (common literal prefixes are looked past: ``(%20|%2b)+`` is fine).

It works on first-byte sets, so it is a heuristic: a pattern named can still
be fast, and one that is slow in a way not described above is not named; the
budget stays the bound.
"""

from __future__ import annotations

import re
from typing import Any

from .pcre_gate import ALL_BYTES as _ALL
from .pcre_gate import class_bytes, fold_case
from .rules import RuleSet

try:  # Python 3.11+
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

__all__ = ["backtracking", "backtracking_warnings"]

_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT)
_EMPTY: frozenset[int] = frozenset()
_MANY = 8  # an outer repeat that can run more than this many times is looked into


def backtracking(pattern: bytes, flags: int = 0) -> str | None:
    """Why ``pattern`` can backtrack exponentially (see the module), or None."""
    try:
        return _Lint(flags).outer(_p.parse(pattern, flags))
    except (re.error, RecursionError, OverflowError):
        return None


class _Lint:
    def __init__(self, flags: int) -> None:
        self.fold = bool(flags & re.IGNORECASE)
        self.dotall = bool(flags & re.DOTALL)

    # ------------------------------------------------------------ first bytes
    def first(self, items: Any) -> tuple[frozenset[int], bool]:
        """The bytes a match of the sequence ``items`` can start with, and whether it can be empty."""
        out: set[int] = set()
        for item in items:
            f, nullable = self.item(item)
            out |= f
            if not nullable:
                return frozenset(out), False
        return frozenset(out), True

    def item(self, item: Any) -> tuple[frozenset[int], bool]:
        op, av = item
        if op is _c.LITERAL:
            return self._lit(av), False
        if op is _c.NOT_LITERAL:
            return _ALL - self._lit(av), False
        if op is _c.ANY:
            return (_ALL if self.dotall else _ALL - {0x0A}), False
        if op is _c.IN:
            cls = class_bytes(av, self.fold)
            return (_ALL if cls is None else cls), False
        if op is _c.SUBPATTERN:
            return self.first(av[3])
        if op is _c.ATOMIC_GROUP:
            return self.first(av)
        if op is _c.BRANCH:
            alts = [self.first(alt) for alt in av[1]]
            return frozenset().union(*(f for f, _ in alts)), any(n for _, n in alts)
        if op in _REPEATS or op is _c.POSSESSIVE_REPEAT:
            lo, _hi, sub = av
            f, n = self.first(sub)
            return f, n or lo == 0
        if op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            return _EMPTY, True
        return _ALL, True  # back-references, conditionals: anything

    def _lit(self, b: int) -> frozenset[int]:
        s = frozenset((b,))
        return fold_case(s) if self.fold else s

    # ------------------------------------------------------------ the walk
    def outer(self, items: Any) -> str | None:
        """Find the repeats that can run many times; look inside each."""
        for op, av in items:
            if op in _REPEATS:
                lo, hi, sub = av
                if hi is _c.MAXREPEAT or hi > _MANY:
                    # after an iteration comes another: what can follow the body is where it starts
                    why = self.inside(sub, self.first(sub)[0])
                    if why:
                        return why
                why = self.outer(sub)
            elif op is _c.SUBPATTERN:
                why = self.outer(av[3])
            elif op is _c.BRANCH:
                why = next((w for alt in av[1] if (w := self.outer(alt))), None)
            elif op in (_c.ASSERT, _c.ASSERT_NOT):
                why = self.outer(av[1])
            else:  # atomic groups and possessive repeats are never backtracked into
                why = None
            if why:
                return why
        return None

    def inside(self, items: Any, after: frozenset[int]) -> str | None:
        """In the body of a repeat: ``after`` is what can follow the sequence ``items``."""
        for i, (op, av) in enumerate(items):
            f, nullable = self.first(items[i + 1 :])
            follow = f | after if nullable else f
            if op in _REPEATS:
                lo, hi, sub = av
                if lo != hi:
                    mine = self.first(sub)[0]
                    if mine & follow:
                        return "a repeat inside a repeat can read the same bytes as what follows it"
                why = self.inside(sub, self.first(sub)[0] | follow)
            elif op is _c.SUBPATTERN:
                why = self.inside(av[3], follow)
            elif op is _c.BRANCH:
                why = self._overlap(av[1], follow) or next((w for alt in av[1] if (w := self.inside(alt, follow))),
                                                           None)
            else:
                why = None
            if why:
                return why
        return None

    def _overlap(self, alts: Any, follow: frozenset[int]) -> str | None:
        """Two alternatives that can read the same bytes: past a common literal prefix they start
        the same way, or one ends where the other goes on with what can follow them (``(a|aa)+``)."""
        for i in range(len(alts)):
            for j in range(i + 1, len(alts)):
                a, b = _open(list(alts[i])), _open(list(alts[j]))
                while a and b and a[0][0] is _c.LITERAL and b[0][0] is _c.LITERAL \
                        and self._lit(a[0][1]) == self._lit(b[0][1]):
                    a, b = _open(a[1:]), _open(b[1:])
                fa, na = self.first(a)
                fb, nb = self.first(b)
                if fa & fb or (na and nb) or (na and fb & follow) or (nb and fa & follow):
                    return "alternatives of a repeated group can read the same bytes"
        return None


def _open(items: list[Any]) -> list[Any]:
    """``items`` with a leading group (plain or atomic) opened, so its literals can be compared."""
    while items and (items[0][0] is _c.ATOMIC_GROUP or items[0][0] is _c.SUBPATTERN and not any(items[0][1][1:3])):
        op, av = items[0]
        items = list(av if op is _c.ATOMIC_GROUP else av[3]) + items[1:]
    return items


def backtracking_warnings(rs: RuleSet) -> list[str]:
    """One line per rule of ``rs`` whose pcre can backtrack exponentially, naming its file and line."""
    out = []
    for r in rs.rules:
        if r.pcre is None:
            continue
        why = backtracking(r.pcre.regex.pattern, r.pcre.flags)
        if why:
            out.append(f"{rs.source}:{r.line}: sid {r.sid}: pcre {r.pcre.source}: {why}, so crafted bytes can "
                       f"make it backtrack until [inspector] pcre_budget_ms runs out, and then the rule does not "
                       f"match; make that part atomic (?>...) or possessive (x*+)")
    return out
