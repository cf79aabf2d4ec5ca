"""A Hyperscan gate in front of the rules' pcres: skip Python ``re`` where no match can be.

Why: a pcre is searched near every match of its rule's contents (see
:mod:`mproxy.core.inspector`), which in a 64 KB chunk can be most of the
chunk, with Python ``re``: ~100 µs. One Hyperscan pass over the same bytes for
every pcre at once costs a few µs and says which pcres match nowhere in them;
for those ``re`` is not run. ``re`` still decides every match, so rule authors
keep its semantics.

The gate must never hide a match ``re`` would find, so it is not built from
the pattern's text (Hyperscan's parser and Python's differ in corners): each
pattern is parsed by Python's own regex parser and translated, construct by
construct, into an explicit byte-level expression — classes as byte sets,
case folding spelt out — and compiled in prefilter mode (a superset of the
matches). Atomic groups and possessive repeats are translated as the plain
group and greedy repeat: they match a subset of those strings, so the gate
stays a superset (rules use them to stop backtracking). Patterns using
anything outside that subset (anchors, word boundaries, look-arounds,
back-references, inline flag groups), or that can match the empty string, get
no gate: the engine runs as before. A gate reports only whether its pattern
matches anywhere in the scanned bytes (one report per pattern per scan, so a permissive pattern cannot
make a scan cost a callback per byte).
"""

from __future__ import annotations

import re
from typing import Any

import hyperscan

try:  # Python 3.11+
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

__all__ = ["translate", "PcreGate", "class_bytes", "ALL_BYTES", "fold_case"]

_DIGIT = frozenset(range(0x30, 0x3A))
_SPACE = frozenset((0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20))  # Python's bytes \s
_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_ALL = ALL_BYTES = frozenset(range(256))
_CATEGORIES = {
    _c.CATEGORY_DIGIT: _DIGIT, _c.CATEGORY_NOT_DIGIT: _ALL - _DIGIT,
    _c.CATEGORY_SPACE: _SPACE, _c.CATEGORY_NOT_SPACE: _ALL - _SPACE,
    _c.CATEGORY_WORD: _WORD, _c.CATEGORY_NOT_WORD: _ALL - _WORD,
}
_REPEAT_BOUND = 32  # repeat counts above this are loosened (a superset: fine for a gate; large ones compile slowly)


class _Unsupported(Exception):
    pass


def fold_case(s: frozenset[int]) -> frozenset[int]:
    """Add the other case of every ASCII letter (Python's IGNORECASE on bytes is ASCII only)."""
    out = set(s)
    for b in s:
        if 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A:
            out.add(b ^ 0x20)
    return frozenset(out)


def class_bytes(items: Any, fold: bool) -> frozenset[int] | None:
    """The bytes a parsed class (``[...]``: the items of an IN node) matches; None if it holds
    something other than bytes, ranges and the \\d \\s \\w categories."""
    s: set[int] = set()
    negate = False
    for iop, iav in items:
        if iop is _c.NEGATE:
            negate = True
        elif iop is _c.LITERAL:
            s.add(iav)
        elif iop is _c.RANGE:
            s.update(range(iav[0], iav[1] + 1))
        elif iop is _c.CATEGORY and iav in _CATEGORIES:
            s.update(_CATEGORIES[iav])
        else:
            return None
    fs = fold_case(frozenset(s)) if fold else frozenset(s)
    return _ALL - fs if negate else fs


def _cls(s: frozenset[int]) -> str:
    if not s:
        raise _Unsupported("empty class")
    if len(s) == 1:
        return f"\\x{next(iter(s)):02x}"
    parts, run = [], sorted(s)
    i = 0
    while i < len(run):
        j = i
        while j + 1 < len(run) and run[j + 1] == run[j] + 1:
            j += 1
        parts.append(f"\\x{run[i]:02x}" if i == j else f"\\x{run[i]:02x}-\\x{run[j]:02x}")
        i = j + 1
    return "[" + "".join(parts) + "]"


def _emit(items: Any, flags: int) -> str:
    fold = bool(flags & re.IGNORECASE)
    out = []
    for op, av in items:
        if op is _c.LITERAL:
            out.append(_cls(fold_case(frozenset((av,))) if fold else frozenset((av,))))
        elif op is _c.NOT_LITERAL:
            out.append(_cls(_ALL - (fold_case(frozenset((av,))) if fold else frozenset((av,)))))
        elif op is _c.ANY:
            out.append(_cls(_ALL if flags & re.DOTALL else _ALL - {0x0A}))
        elif op is _c.IN:
            fs = class_bytes(av, fold)
            if fs is None:
                raise _Unsupported("class item")
            out.append(_cls(fs))
        elif op is _c.SUBPATTERN:
            _group, add, rem, sub = av
            if add or rem:
                raise _Unsupported("inline flags")
            out.append("(?:" + _emit(sub, flags) + ")")
        elif op is _c.BRANCH:
            out.append("(?:" + "|".join(_emit(alt, flags) for alt in av[1]) + ")")
        elif op is _c.ATOMIC_GROUP:  # matches a subset of what the plain group matches: fine for a gate
            out.append("(?:" + _emit(av, flags) + ")")
        elif op is _c.MAX_REPEAT or op is _c.MIN_REPEAT or op is _c.POSSESSIVE_REPEAT:  # (possessive: a subset)
            lo, hi, sub = av  # large bounds loosened: {1000} -> {32,} (a superset, and Hyperscan compiles it fast)
            top = "" if hi is _c.MAXREPEAT or hi > _REPEAT_BOUND else str(hi)
            out.append("(?:" + _emit(sub, flags) + "){" + f"{min(lo, _REPEAT_BOUND)},{top}" + "}")
        else:  # AT (anchors, \b), GROUPREF, ASSERT*, ...
            raise _Unsupported(str(op))
    return "".join(out)


def translate(rx: re.Pattern[bytes]) -> bytes | None:
    """A Hyperscan expression matching (at least) every substring ``rx`` matches; None if ``rx``
    uses something outside the subset or can match the empty string."""
    try:
        tree = _p.parse(rx.pattern, rx.flags & ~re.DEBUG)
        if tree.getwidth()[0] == 0:
            return None
        return _emit(tree, rx.flags).encode()
    except (_Unsupported, re.error, RecursionError, OverflowError):
        return None


class PcreGate:
    """One Hyperscan database of the translated pcres of a rule set (rule index -> expression)."""

    def __init__(self, patterns: dict[int, re.Pattern[bytes]]) -> None:
        exprs = {ri: e for ri, rx in patterns.items() if (e := translate(rx)) is not None}
        self._db: Any = None
        self._found: set[int] = set()
        if exprs:
            try:
                self._db = _compile(exprs)
            except hyperscan.error:  # one Hyperscan refuses (too large...): find it, gate the others
                exprs = {ri: e for ri, e in exprs.items() if _compiles(e)}
                self._db = _compile(exprs) if exprs else None
        self.gated = frozenset(exprs)  # rules whose pcre is gated

    def matching(self, data: bytes) -> set[int]:
        """The gated rules whose pcre may match somewhere in ``data``."""
        found = self._found = set()
        if self._db is not None:
            self._db.scan(data, match_event_handler=self._hit)
        return found

    def _hit(self, rid: int, _start: int, _end: int, _flags: int, _ctx: object) -> None:
        self._found.add(rid)


def _compile(exprs: dict[int, bytes]) -> Any:
    ids = list(exprs)
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=[exprs[i] for i in ids], ids=ids, elements=len(ids),
               flags=[hyperscan.HS_FLAG_PREFILTER | hyperscan.HS_FLAG_SINGLEMATCH] * len(ids))
    return db


def _compiles(expr: bytes) -> bool:
    """Hyperscan takes the expression alone (one it refuses must not sink the others)."""
    try:
        _compile({0: expr})
    except hyperscan.error:
        return False
    return True
