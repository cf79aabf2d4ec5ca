"""The Hyperscan gate in front of pcre: wherever Python ``re`` finds a match, the gate says "maybe".

Differential: random patterns of the supported subset (and flags), random haystacks; the gate,
built from Python's own parse of each pattern, must never report "no match" where ``re.search``
finds one. Patterns outside the subset get no gate (``re`` always runs).
"""

from __future__ import annotations

import re
import signal

from hypothesis import given, reject, settings
from hypothesis import strategies as st

from mproxy.core.pcre_gate import PcreGate, translate

_ATOMS = st.sampled_from([r"a", r"b", r"A", r"x", r"\-", r"\.", r"\n", r"\ ", r"1", r".", r"[a-c]", r"[^ab]",
                          r"\d", r"\D", r"\s", r"\S", r"\w", r"\W", r"[\w\-]", r"[^\s1]", r"\x00", r"%27"])


def _combine(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, children).map("".join),
        st.tuples(children, children).map(lambda t: f"(?:{t[0]}|{t[1]})"),
        children.map(lambda c: f"({c})"),
        st.tuples(children, st.sampled_from(["*", "+", "?", "*?", "+?", "{2}", "{1,3}", "{0,2}?", "{2,}", "{33}", "{0,40}", "{34,}"]))
        .map(lambda t: f"(?:{t[0]}){t[1]}"),
    )


_PATTERNS = st.recursive(_ATOMS, _combine, max_leaves=8)
_HAY = st.lists(st.sampled_from(b"abABx-. \n1_%27\x00"), max_size=40).map(bytes) | \
    st.tuples(st.sampled_from(b"ax1 "), st.integers(0, 80)).map(lambda t: bytes([t[0]]) * t[1])


@settings(max_examples=1500, deadline=None)
@given(pattern=_PATTERNS, flags=st.sampled_from([0, re.I, re.S, re.I | re.S, re.X]), hay=_HAY)
def test_the_gate_never_hides_a_match(pattern: str, flags: int, hay: bytes) -> None:
    rx = re.compile(pattern.encode(), flags)
    gate = PcreGate({7: rx})
    if _search(rx, hay) is not None:
        assert 7 not in gate.gated or 7 in gate.matching(hay), (pattern, flags, hay, translate(rx))


class _Slow(Exception):
    pass


def _search(rx: re.Pattern[bytes], hay: bytes) -> re.Match[bytes] | None:
    r"""The oracle, ``re.search``; an example on which it backtracks for seconds (nested repeats such
    as ``(?:(?: )+){0,40}\w`` on 49 spaces take years) has no answer and is rejected, not waited for."""
    def slow(_sig: int, _frame: object) -> None:
        raise _Slow

    old = signal.signal(signal.SIGALRM, slow)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        return rx.search(hay)
    except _Slow:
        reject()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_outside_the_subset_there_is_no_gate() -> None:
    for p in (rb"^GET", rb"\bunion", rb"(a)\1", rb"a(?=b)", rb"(?<!x)y", rb"a*", rb"(?i:a)b", rb"x$", rb"\Aab",
              rb"(?>ab)c", rb"a++"):
        rx = re.compile(p)
        assert translate(rx) is None and PcreGate({1: rx}).gated == frozenset(), p


def test_the_shipped_rules_are_gated_and_the_gate_spells_cases_and_classes_out() -> None:
    from pathlib import Path

    from mproxy.core.rules import load_rules

    rs = load_rules(Path(__file__).resolve().parents[2] / "config" / "mproxy.rules")
    pcres = {i: r.pcre.regex for i, r in enumerate(rs.rules) if r.pcre is not None}
    gate = PcreGate(pcres)
    assert gate.gated == frozenset(pcres)
    assert translate(re.compile(rb"a\s", re.I)) == rb"[\x41\x61][\x09-\x0d\x20]"
    sqli = next(i for i, r in enumerate(rs.rules) if r.sid == 1000002)
    assert sqli in gate.matching(b"GET /q?x=1+UnIoN%20sElEcT+1") and not gate.matching(b"GET /index.html")


def test_large_repeats_are_loosened_and_a_refused_pattern_does_not_sink_the_others(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import hyperscan

    from mproxy.core import pcre_gate

    gate = PcreGate({1: re.compile(rb"x{40}y")})
    assert translate(re.compile(rb"x{40}y")) == rb"(?:\x78){32,}\x79"
    assert gate.matching(b"." + b"x" * 40 + b"y") == {1} and gate.matching(b"x" * 10 + b"y") == set()
    real = pcre_gate._compile

    def picky(exprs):  # type: ignore[no-untyped-def]
        if any(b"\\x7a" in e for e in exprs.values()):  # "z": refused, as Hyperscan refuses some patterns
            raise hyperscan.error("too large")
        return real(exprs)

    monkeypatch.setattr(pcre_gate, "_compile", picky)
    gate = PcreGate({1: re.compile(rb"az"), 2: re.compile(rb"evil"), 3: re.compile(rb"zz")})
    assert gate.gated == {2} and gate.matching(b"an evil zz") == {2}
