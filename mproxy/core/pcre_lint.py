"""Warnings for rule pcres that can backtrack exponentially: a repeat inside a repeat.

Why: the inspector stops a pcre at ``[inspector] pcre_budget_ms``, and a rule
stopped there does not match, so a pcre that backtracks on crafted bytes is a
way to hide an attack behind a prefix. The classic shape is a variable repeat
nested in another repeat, ``(a+)+`` or ``(\\s|/\\*.*?\\*/)+``: N repetitions can
be split between the two in 2^N ways. ``mproxy check``, ``run`` and ``replay``
name such rules at load, so they are rewritten (the inner part atomic,
``(?>...)``, or possessive) before an attacker finds them. A heuristic: it
does not prove a pattern slow (``(ab+)+`` is flagged and is linear) nor find
every slow one (``(a|a)+`` is not flagged); the budget stays the bound.
"""

from __future__ import annotations

import re
from typing import Any

from .rules import RuleSet

try:  # Python 3.11+
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

__all__ = ["nested_repeat", "backtracking_warnings"]

_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT)


def nested_repeat(pattern: bytes, flags: int = 0) -> bool:
    """True if a repeat that can run more than once holds, outside any atomic group or possessive
    repeat, a repeat whose count varies."""
    try:
        return _walk(_p.parse(pattern, flags), False)
    except (re.error, RecursionError, OverflowError):
        return False


def _walk(items: Any, inside: bool) -> bool:
    for op, av in items:
        if op in _REPEATS:
            lo, hi, sub = av
            if inside and lo != hi:
                return True
            if _walk(sub, inside or hi is _c.MAXREPEAT or hi > 1):
                return True
        elif op is _c.SUBPATTERN:
            if _walk(av[3], inside):
                return True
        elif op is _c.BRANCH:
            if any(_walk(alt, inside) for alt in av[1]):
                return True
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            if _walk(av[1], inside):
                return True
        elif op is _c.GROUPREF_EXISTS:
            if any(_walk(x, inside) for x in av[1:] if x is not None):
                return True
        # ATOMIC_GROUP, POSSESSIVE_REPEAT: never backtracked into, whatever they hold
    return False


def backtracking_warnings(rs: RuleSet) -> list[str]:
    """One line per rule of ``rs`` whose pcre has a nested repeat, naming its file and line."""
    out = []
    for r in rs.rules:
        if r.pcre is None:
            continue
        if nested_repeat(r.pcre.regex.pattern, r.pcre.flags):
            out.append(f"{rs.source}:{r.line}: sid {r.sid}: pcre {r.pcre.source} has a repeat inside a repeat: "
                       f"crafted bytes can make it backtrack until [inspector] pcre_budget_ms runs out, and then "
                       f"the rule does not match; make the inner part atomic (?>...) or possessive (x*+)")
    return out

