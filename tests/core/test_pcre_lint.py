"""Warnings for pcres that can backtrack exponentially (a variable repeat inside a repeat)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mproxy.core.pcre_lint import backtracking, backtracking_warnings
from mproxy.core.rules import load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[2]
# sid 1000001 as shipped until rev 1: 'union' + 30 comments took Python re minutes
OLD_UNION = r'alert tcp any any -> any any (msg:"u"; content:"union"; pcre:"/union(\s|\/\*.*?\*\/)+select/i"; sid:9;)'


@pytest.mark.parametrize("pattern,flagged", [
    # a repeat whose bytes can also be what follows it, in the same or the next iteration
    (rb"(a+)+b", True),
    (rb"(\s|/\*.*?\*/)+select", True),  # "." also reads the "*/"
    (rb"(?:\w+\s?)+:", True),
    (rb"(?:(?: )+){0,40}(\w)", True),
    (rb"((?:a)*)*", True),
    (rb"(\w+)*@", True),
    (rb"(.*,)+x", True),
    (rb"(?=(a+)+)", True),  # in a look-ahead too
    (rb"(\w+\.)+com", False),  # each iteration ends at its ".", one way only
    (rb"(ab+)+", False),
    (rb"(?:[^,]*,)+x", False),
    (rb"(\d+\.){3}\d+", False),  # a small count: not many iterations
    (rb"(\s|(?>/\*.*?\*/))+select", False),  # the inner part atomic
    (rb"(?:a++)+", False),  # possessive
    (rb"(\s|\+|%20)*or(\s|\+|%20)*1", False),  # repeats side by side, not nested
    (rb"(?:x{2})+", False),
    # alternatives that can read the same bytes
    (rb"(a|a)+b", True),
    (rb"(?:aa|a)+b", True),  # one ends where the other goes on with what follows
    (rb"(x|y|xy)+z", True),
    (rb"(a|ab)+c", False),  # "b" alone is no alternative: one reading
    (rb"(%20|%2b)+x", False),  # past the common "%2", "0" and "b" differ
    (rb"(\+|%20|%0a|(?>/\*.*?\*/)|(?>%2f%2a.*?%2a%2f))+select", False),  # shipped sid 1000002, rev 2
    (rb"(\w|\d)+!", False),  # Python's parser makes this one class: no alternatives left
])
def test_what_can_read_bytes_two_ways_in_a_repeat_is_named(pattern: bytes, flagged: bool) -> None:
    assert bool(backtracking(pattern)) is flagged, backtracking(pattern)


@pytest.mark.parametrize("pattern,data", [
    (rb"(a|a)+b", b"a" * 40 + b"!b"),
    (rb"(?:aa|a)+b", b"a" * 60 + b"!b"),
    (rb"(x|y|xy)+z", b"xy" * 40 + b"!z"),
    (rb"(\s|/\*.*?\*/)+select", b"/**/" * 40 + b"! select"),
])
def test_what_is_named_really_backtracks(pattern: bytes, data: bytes) -> None:
    """The engine gives up within 0.5 s on 40 repetitions (a linear search takes microseconds). Some
    shapes named, (a+)+ among them, the engine itself short-cuts: Python re does not."""
    import regex

    assert backtracking(pattern)
    with pytest.raises(TimeoutError):
        regex.compile(pattern).search(data, timeout=0.5)


def test_the_shipped_rules_are_clean_and_the_old_union_rule_is_named(caplog: pytest.LogCaptureFixture) -> None:
    from mproxy.reacting import warn_rules

    assert backtracking_warnings(load_rules(ROOT / "config" / "mproxy.rules")) == []
    (why,) = backtracking_warnings(parse_rules(OLD_UNION + "\n"))
    assert why.startswith("<rules>:1: sid 9: pcre /union(") and "atomic (?>...)" in why
    assert "a repeat inside a repeat can read the same bytes as what follows it" in why
    with caplog.at_level(logging.WARNING, logger="mproxy"):
        warn_rules(parse_rules(OLD_UNION + "\n"))
    assert "rule may backtrack: <rules>:1: sid 9" in caplog.text


def test_check_and_replay_name_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mproxy.cli import main

    (tmp_path / "old.rules").write_text(OLD_UNION + "\n")
    conf = tmp_path / "m.toml"
    conf.write_text('[inspector]\nrules = "old.rules"\n[actions]\non_match = "log"\n')
    assert main(["check", "-c", str(conf)]) == 0  # a warning, not an error
    err = capsys.readouterr().err
    assert f"rule may backtrack: {tmp_path / 'old.rules'}:1: sid 9" in err
    sample = ROOT / "mproxy" / "samples" / "split-attack.pcap"
    assert main(["replay", str(sample), "--out", str(tmp_path / "o.pcap"), "--rules",
                 str(tmp_path / "old.rules")]) == 0
    assert "mproxy replay: rule may backtrack: " in capsys.readouterr().err
