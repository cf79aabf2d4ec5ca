"""The rules parser: the documented Snort/Suricata subset, and clear errors naming the line."""

from __future__ import annotations

import ipaddress
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from mproxy.core.rules import Flow, RuleError, compile_pcre, load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[2]
A = ipaddress.ip_address


def test_shipped_rules_load() -> None:
    rs = load_rules(ROOT / "config" / "mproxy.rules")
    sids = {r.sid for r in rs.rules}
    assert {1000001, 1000002} <= sids and len(sids) == len(rs.rules) >= 8
    assert all(r.flow == Flow.TO_SERVER for r in rs.rules)


def test_full_rule() -> None:
    text = r'''
# comment
ipvar HOME_NET [198.18.0.0/15, !198.18.99.0/24]
portvar WEB [80, 8000:8100]
alert tcp any any -> $HOME_NET $WEB (msg:"a \"quoted\" msg\; here"; content:"UNION|20|SELECT"; nocase; \
    content:"x\;y\\z"; fast_pattern; pcre:"/union\s+select/i"; flow:to_server,established; \
    classtype:web-application-attack; reference:url,example.org; metadata:a b; sid:42; rev:3;)
'''
    (r,) = parse_rules(text).rules
    assert r.sid == 42 and r.rev == 3 and r.line == 5 and r.msg == 'a "quoted" msg; here'
    assert [(c.pattern, c.nocase) for c in r.contents] == [(b"UNION SELECT", True), (b"x;y\\z", False)]
    assert r.pcre is not None and r.pcre.regex.search(b"UNION  select")
    assert r.flow == Flow.TO_SERVER and r.classtype == "web-application-attack"
    cli, srv = (A("203.0.113.7"), 50000), (A("198.18.10.2"), 8080)
    assert r.applies(True, cli, srv)
    assert not r.applies(False, srv, cli)  # flow:to_server
    assert not r.applies(True, cli, (A("198.18.99.2"), 80))  # negated network
    assert not r.applies(True, cli, (A("198.18.10.2"), 443))  # port not in $WEB


def test_position_modifiers() -> None:
    (r,) = parse_rules('alert tcp any any -> any any (content:"GET "; depth:4; content:"/admin"; nocase; '
                       'distance:0; within:64; content:"x"; offset:10; content:"y"; distance:-3; sid:1;)').rules
    get, admin, x, y = r.contents
    assert (get.offset, get.depth, get.relative) == (None, 4, False)
    assert (admin.nocase, admin.distance, admin.within, admin.relative) == (True, 0, 64, True)
    assert (x.offset, x.depth, x.relative) == (10, None, False)
    assert (y.distance, y.within) == (-3, None)


def test_bidirectional_and_ports() -> None:
    (r,) = parse_rules('alert tcp 10.0.0.0/8 [1:1023,!22] <> any any (content:"x"; sid:1;)').rules
    assert r.applies(True, (A("10.1.1.1"), 80), (A("192.0.2.1"), 40000))
    assert r.applies(False, (A("192.0.2.1"), 40000), (A("10.1.1.1"), 80))  # <>: either way
    assert not r.applies(True, (A("10.1.1.1"), 22), (A("192.0.2.1"), 1))
    assert not r.applies(True, (A("2001:db8::1"), 80), (A("192.0.2.1"), 1))


@pytest.mark.parametrize("text,needle", [
    ('alert udp any any -> any any (content:"x"; sid:1;)', "protocol 'udp'"),
    ('pass tcp any any -> any any (content:"x"; sid:1;)', "action 'pass'"),
    ('alert tcp any any -> any any (content:"x";)', "sid is required"),
    ('alert tcp any any -> any any (msg:"only msg"; sid:1;)', "at least one content"),
    ('alert tcp any any -> any any (content:"x"; isdataat:4; sid:1;)', "option 'isdataat' is not supported"),
    ('alert tcp any any -> any any (depth:4; content:"x"; sid:1;)', "depth must follow a content"),
    ('alert tcp any any -> any any (content:"xyz"; depth:2; sid:1;)', "depth:2 must be at least the content length"),
    ('alert tcp any any -> any any (content:"x"; offset:-1; sid:1;)', "offset must not be negative"),
    ('alert tcp any any -> any any (content:"x"; offset:1; offset:2; sid:1;)', "offset is given twice"),
    ('alert tcp any any -> any any (content:"x"; depth:four; sid:1;)', "depth must be an integer"),
    ('alert tcp any any -> any any (content:"x"; distance:0; sid:1;)', "this is the rule's first"),
    ('alert tcp any any -> any any (content:"x"; content:"yz"; within:1; sid:1;)', "within:1 must be at least"),
    ('alert tcp any any -> any any (content:"x"; content:"y"; depth:3; distance:1; sid:1;)',
     "distance cannot be mixed with offset/depth"),
    ('alert tcp any any -> any any (content:"x"; content:"y"; within:3; offset:1; sid:1;)',
     "offset cannot be mixed with distance/within"),
    ('alert tcp any any -> any any (content:"x"; content:"y"; distance:99999999999; sid:1;)', "out of range"),
    ('alert tcp any any -> any any (content:"x"; http_uri; sid:1;)', "option 'http_uri'"),
    ('alert tcp any any -> any any (content:!"x"; sid:1;)', "negated content"),
    ('alert tcp any any -> any any (content:"x|4|"; sid:1;)', "bad hex"),
    ('alert tcp any any -> any any (content:"x; sid:1;)', "unterminated"),
    ('alert tcp any any -> any any (pcre:"/a(/"; sid:1;)', "pcre does not compile"),
    ('alert tcp any any -> any any (pcre:"/a/R"; sid:1;)', "pcre flag 'R'"),
    ('alert tcp any any -> any any (nocase; content:"x"; sid:1;)', "nocase must follow a content"),
    ('alert tcp $NOPE any -> any any (content:"x"; sid:1;)', "undefined variable $NOPE"),
    ('alert tcp 10.0.0.300 any -> any any (content:"x"; sid:1;)', "not an address"),
    ('alert tcp any 70000 -> any any (content:"x"; sid:1;)', "bad port range"),
    ('alert tcp any any -> any any (content:"x"; flow:to_server,no_stream; sid:1;)', "flow:no_stream"),
    ('alert tcp any any -> any any (content:""; sid:1;)', "content is empty"),
    ('alert tcp any any any any (content:"x"; sid:1;)', "expected 'ACTION tcp"),
    ('alert tcp any any -> any any (content:"x"; sid:1) ', "not terminated by ';'"),
    ('alert tcp any any -> any any (content:"x"; sid:one;)', "sid must be an integer"),
])
def test_bad_rule_names_the_line(text: str, needle: str) -> None:
    with pytest.raises(RuleError) as e:
        parse_rules(f"# header\n\n{text}\n", "my.rules")
    assert str(e.value).startswith("my.rules:3: ") and needle in str(e.value), str(e.value)


def test_duplicate_sid_and_continuation_past_end() -> None:
    with pytest.raises(RuleError, match=r"r:2: sid 5 already used on line 1"):
        parse_rules('alert tcp any any -> any any (content:"a"; sid:5;)\n'
                    'alert tcp any any -> any any (content:"b"; sid:5;)\n', "r")
    with pytest.raises(RuleError, match=r"r:1: rule continues past the end"):
        parse_rules('alert tcp any any -> any any (content:"a"; \\\n', "r")


def test_unreadable_rules_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="cannot read"):
        load_rules(tmp_path / "missing.rules")


def test_skip_bad_rules_keeps_the_good_ones_and_names_the_rest() -> None:
    text = '''alert tcp any any -> any any (msg:"ok"; content:"a"; sid:1;)
alert tcp any any -> any any (msg:"http"; content:"b"; http_uri; sid:2;)
alert tcp any any -> any any (msg:"dup"; content:"c"; sid:1;)
alert tcp $UNDEFINED any -> any any (content:"d"; sid:3;)
alert tcp any any -> any any (msg:"ok too"; content:"e"; \\
    depth:4; sid:4;)
'''
    with pytest.raises(RuleError, match=r"r:2: option 'http_uri'"):
        parse_rules(text, "r")
    rs = parse_rules(text, "r", skip_bad=True)
    assert [r.sid for r in rs.rules] == [1, 4]
    assert [s.split(": ", 1)[0] for s in rs.skipped] == ["r:2", "r:3", "r:4"]
    assert "sid 1 already used on line 1" in rs.skipped[1] and "undefined variable $UNDEFINED" in rs.skipped[2]
    with pytest.raises(RuleError, match="continues past the end"):
        parse_rules(text + 'alert tcp any any -> any any (content:"f"; \\\n', "r", skip_bad=True)


# ---------------------------------------------------------------------------- pcre: two engines
def _pcre_of(pattern: str) -> Any:
    (r,) = parse_rules(f'alert tcp any any -> any any (pcre:"{pattern}"; sid:1;)').rules
    return r.pcre


def test_a_brace_that_is_not_a_repeat_count_is_a_brace_as_in_pcre() -> None:
    """The engine (regex) would read ``a{e<=1}`` as "a, or one edit away"; PCRE and Python re read
    the braces literally, and so does a rule."""
    fuzzy = _pcre_of("/a{e<=1}/")
    assert fuzzy.regex.search(b"x a{e<=1} y") and not fuzzy.regex.search(b"b")
    assert _pcre_of("/x{2}y/").regex.search(b"xxy") and not _pcre_of("/x{2}y/").regex.search(b"xy")
    assert _pcre_of("/[{]{2}/").regex.search(b"{{") and _pcre_of("/a{}/").regex.search(b"a{}")
    assert _pcre_of(r"/\{1,2/").regex.search(b"{1,2") and _pcre_of("/a{1,2/").regex.search(b"a{1,2")
    assert fuzzy.stdlib is not None  # gated as usual


def test_posix_classes_read_as_pcre_does_and_get_no_gate() -> None:
    p = _pcre_of("/id=[[:digit:]]+/")
    assert p.regex.search(b"?id=42") and not p.regex.search(b"?id=:x")
    assert p.stdlib is None  # re would read the class as its characters: its parse cannot build a gate


def test_an_escaping_that_changed_res_reading_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net under the brace escaping: had it escaped a repeat count, re's parse of the
    escaped pattern would differ, and the rule would be refused rather than read two ways."""
    from mproxy.core import rules

    monkeypatch.setattr(rules, "_COUNT", re.compile(rb"(?!)"))  # no brace is a count
    with pytest.raises(RuleError, match=r"<rules>:1: pcre: a '\{' here is read differently"):
        parse_rules('alert tcp any any -> any any (pcre:"/ab{2}/"; sid:1;)')
    assert _pcre_of("/a{e<=1}/").regex.search(b"a{e<=1}")  # literal braces: the same reading


_PIECES = st.sampled_from([*"ab{}[]()?*+|\\:^$-&~,<=>#.1 eidsx!0%\n", "{2}", "{1,3}", "{,2}", "{e<=1}", "(?:", "(?i)",
                           "(?x)", "[[:alpha:]]", "[:", "\\{", "\\d", "\\s", "\\w", "\\b", "(?P<n>", "(?=", "(?<=a)",
                           "(?!", "\\\n", "\\x7b"])


@settings(max_examples=2000, deadline=None)
@given(pattern=st.lists(_PIECES, min_size=1, max_size=12).map("".join),
       flags=st.sampled_from([0, re.I, re.S, re.M, re.X]),
       hay=st.lists(st.sampled_from(b"ab{}[]1 eid:,<=>-\n!0%AB_"), min_size=1, max_size=30).map(bytes))
def test_the_engine_reads_a_pattern_as_python_re_does(pattern: str, flags: int, hay: bytes) -> None:
    """Where a pcre has a re reading (``stdlib``, the gate's source), the engine that runs it finds
    the same first match: rules keep the semantics they are written and tested with."""
    try:
        p = compile_pcre(pattern.encode("latin-1"), flags)
    except ValueError:
        reject()
    if p.stdlib is None:
        return
    try:
        got = p.regex.search(hay, timeout=2.0)
    except TimeoutError:
        reject()
    want = _re_search(p.stdlib, hay)
    assert (got.span() if got else None) == (want.span() if want else None), (pattern, flags, hay)


class _Slow(Exception):
    pass


def _re_search(rx: re.Pattern[bytes], hay: bytes) -> re.Match[bytes] | None:
    """Python re, which no timeout can stop: an alarm does (a backtracking example is rejected)."""
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
