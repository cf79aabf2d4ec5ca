"""The Hyperscan gate in front of pcre: wherever the pcre engine finds a match, the gate says "maybe".

Differential: random patterns (of the supported subset, and as random text), random flags and
haystacks; the gate, built from Python ``re``'s parse of each pattern, must never report "no
match" where the engine that runs rules (the ``regex`` module, see :class:`mproxy.core.rules.Pcre`)
finds one. Patterns outside the subset get no gate (the engine always runs).
"""

from __future__ import annotations

import re

import regex
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from mproxy.core.pcre_gate import PcreGate, translate
from mproxy.core.rules import compile_pcre

_ATOMS = st.sampled_from([r"a", r"b", r"A", r"x", r"\-", r"\.", r"\n", r"\ ", r"1", r".", r"[a-c]", r"[^ab]",
                          r"\d", r"\D", r"\s", r"\S", r"\w", r"\W", r"[\w\-]", r"[^\s1]", r"\x00", r"%27"])


def _combine(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, children).map("".join),
        st.tuples(children, children).map(lambda t: f"(?:{t[0]}|{t[1]})"),
        children.map(lambda c: f"({c})"),
        children.map(lambda c: f"(?>{c})"),  # atomic: gated as the plain group
        st.tuples(children, st.sampled_from(["*+", "++", "?+", "{1,3}+"])).map(lambda t: f"(?:{t[0]}){t[1]}"),
        st.tuples(children, st.sampled_from(["*", "+", "?", "*?", "+?", "{2}", "{1,3}", "{0,2}?", "{2,}", "{33}", "{0,40}", "{34,}"]))
        .map(lambda t: f"(?:{t[0]}){t[1]}"),
    )


_PATTERNS = st.recursive(_ATOMS, _combine, max_leaves=8)
_HAY = st.lists(st.sampled_from(b"abABx-. \n1_%27\x00"), max_size=40).map(bytes) | \
    st.tuples(st.sampled_from(b"ax1 "), st.integers(0, 80)).map(lambda t: bytes([t[0]]) * t[1])


@settings(max_examples=1500, deadline=None)
@given(pattern=_PATTERNS, flags=st.sampled_from([0, re.I, re.S, re.I | re.S, re.X]), hay=_HAY)
def test_the_gate_never_hides_a_match(pattern: str, flags: int, hay: bytes) -> None:
    _check(pattern.encode(), flags, hay)


# pattern text from pieces either engine may read its own way: braces, POSIX classes, verbose
# comments, escapes, look-arounds (what does not compile is refused by the loader: rejected here)
_PIECES = st.sampled_from([*"ab{}[]()?*+|\\:^$-&~,<=>#.1 eidsx!0%\n", "{2}", "{1,3}", "{,2}", "{e<=1}", "(?:", "(?i)",
                           "(?x)", "[[:alpha:]]", "[[=a=]]", "[[.a.]]", "[:", "\\{", "\\d", "\\s", "\\w",
                           "(?P<n>", "(?=", "(?!", "\\\n"])
_TEXT = st.lists(_PIECES, min_size=1, max_size=12).map("".join)
_TEXT_HAY = st.lists(st.sampled_from(b"ab{}[]1 eid:,<=>-\n!0%AB"), min_size=1, max_size=30).map(bytes)


@settings(max_examples=1500, deadline=None)
@given(pattern=_TEXT, flags=st.sampled_from([0, re.I, re.S, re.M, re.X]), hay=_TEXT_HAY)
def test_the_gate_never_hides_a_match_of_any_pattern_text(pattern: str, flags: int, hay: bytes) -> None:
    _check(pattern.encode("latin-1"), flags, hay)


def _check(pattern: bytes, flags: int, hay: bytes) -> None:
    try:
        p = compile_pcre(pattern, flags)
    except ValueError:
        reject()
    if p.stdlib is None:
        return  # no gate: the engine always runs
    gate = PcreGate({7: p.stdlib})
    if _search(p.regex, hay) is not None:
        assert 7 not in gate.gated or 7 in gate.matching(hay), (pattern, flags, hay, translate(p.stdlib))


def _search(rx: regex.Pattern[bytes], hay: bytes) -> regex.Match[bytes] | None:
    r"""The oracle, the rules' engine; an example on which it backtracks for seconds (nested repeats
    such as ``(?:a|a)+b`` on 30 a's) has no answer and is rejected, not waited for."""
    try:
        return rx.search(hay, timeout=2.0)
    except TimeoutError:
        reject()


def test_outside_the_subset_there_is_no_gate() -> None:
    for p in (rb"^GET", rb"\bunion", rb"(a)\1", rb"a(?=b)", rb"(?<!x)y", rb"a*", rb"(?i:a)b", rb"x$", rb"\Aab"):
        rx = re.compile(p)
        assert translate(rx) is None and PcreGate({1: rx}).gated == frozenset(), p


def test_the_shipped_rules_are_gated_and_the_gate_spells_cases_and_classes_out() -> None:
    from pathlib import Path

    from mproxy.core.rules import load_rules

    rs = load_rules(Path(__file__).resolve().parents[2] / "config" / "mproxy.rules")
    pcres = {i: r.pcre.stdlib for i, r in enumerate(rs.rules) if r.pcre is not None and r.pcre.stdlib is not None}
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
