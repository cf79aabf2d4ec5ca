"""The rules parser: the documented Snort/Suricata subset, and clear errors naming the line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mproxy.core.rules import Flow, RuleError, load_rules, parse_rules

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
    ('alert tcp any any -> any any (content:"x"; depth:4; sid:1;)', "option 'depth' is not supported"),
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
