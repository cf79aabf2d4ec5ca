"""Warnings for pcres that can backtrack exponentially (a variable repeat inside a repeat)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mproxy.core.pcre_lint import backtracking_warnings, nested_repeat
from mproxy.core.rules import load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[2]
# sid 1000001 as shipped until rev 1: 'union' + 30 comments took Python re minutes
OLD_UNION = r'alert tcp any any -> any any (msg:"u"; content:"union"; pcre:"/union(\s|\/\*.*?\*\/)+select/i"; sid:9;)'


@pytest.mark.parametrize("pattern,flagged", [
    (rb"(a+)+b", True),
    (rb"(\s|/\*.*?\*/)+select", True),
    (rb"(?:\w+\s?)+:", True),
    (rb"(?:(?: )+){0,40}(\w)", True),
    (rb"((?:a)*)*", True),
    (rb"(?=(a+)+)", True),  # in a look-ahead too
    (rb"(\s|(?>/\*.*?\*/))+select", False),  # the inner part atomic
    (rb"(?:a++)+", False),  # possessive
    (rb"(\s|\+|%20)*or(\s|\+|%20)*1", False),  # repeats side by side, not nested
    (rb"(?:x{2})+", False),  # a fixed count inside
    (rb"a{1,5}", False),
])
def test_a_variable_repeat_inside_a_repeat_is_flagged(pattern: bytes, flagged: bool) -> None:
    assert nested_repeat(pattern) is flagged


def test_the_shipped_rules_are_clean_and_the_old_union_rule_is_named(caplog: pytest.LogCaptureFixture) -> None:
    from mproxy.reacting import warn_rules

    assert backtracking_warnings(load_rules(ROOT / "config" / "mproxy.rules")) == []
    (why,) = backtracking_warnings(parse_rules(OLD_UNION + "\n"))
    assert why.startswith("<rules>:1: sid 9: pcre /union(") and "atomic (?>...)" in why
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
