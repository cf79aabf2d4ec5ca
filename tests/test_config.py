from __future__ import annotations

from pathlib import Path

import pytest

from mproxy.config import ConfigError, load_config, parse_config
from mproxy.core.policy import Action, LowTtl, OnMemcap

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_example_config_is_valid_and_documents_every_key() -> None:
    cfg = load_config(str(ROOT / "config" / "mproxy.toml"))
    assert cfg.queue.fail == "open" and cfg.policy.default == Action.INSPECT
    assert cfg.policy.on_memcap == OnMemcap.DROP and cfg.tracker.memcap == 256 * 1024 * 1024
    assert "\non_memcap = " in (ROOT / "config" / "mproxy.toml").read_text()
    assert parse_config("[policy]\non_memcap = 'pass'").policy.on_memcap == OnMemcap.PASS
    assert cfg.policy.low_ttl == LowTtl.RAISE and "\nlow_ttl = " in (ROOT / "config" / "mproxy.toml").read_text()
    assert parse_config("[policy]\nlow_ttl = 'pass'").policy.low_ttl == LowTtl.PASS
    text = (ROOT / "config" / "mproxy.toml").read_text()
    from dataclasses import fields

    for section in ("queue", "rules", "tracker", "sink", "log", "metrics", "inspector", "alerts", "actions"):
        for f in fields(getattr(cfg, section)):
            assert f"\n{f.name} = " in text or f"\n# {f.name} = " in text, f"[{section}] {f.name} undocumented"


@pytest.mark.parametrize("text,needle", [
    ("[queue]\nnum = 'x'", "[queue] num"),
    ("[queue]\nfail = 'sideways'", "[queue] fail"),
    ("[nope]\n", "unknown section [nope]"),
    ("[tracker]\nidle_timout = 3", "unknown key 'idle_timout'"),
    ("[[policy.rule]]\naction = 'nuke'", "unknown action 'nuke'"),
    ("[[policy.rule]]\nclient = '10.0.0.0/8'", "missing key 'action'"),
    ("[policy]\ntrusted_networks = ['bogus']", "[policy] trusted_networks"),
    ("[[policy.rule]]\naction='allow'\nports=[70000]", "bad port 70000"),
    ("[metrics]\nlisten = 'nowhere'", "[metrics] listen"),
    ("key = ", "not valid TOML"),
    ("[actions]\non_match = 'nuke'", "[actions] on_match: unknown reaction 'nuke'"),
    ("[actions]\non_alert = []", "[actions] on_alert: choose at least one"),
    ("[inspector]\nmode = 'maybe'", "[inspector] mode"),
    ("[inspector]\npcre_budget_ms = 0", "[inspector] pcre_budget_ms: expected milliseconds in (0, 10000]"),
    ("[inspector]\npcre_budget_ms = nan", "[inspector] pcre_budget_ms"),
    ("[inspector]\npcre_strikes = -1", "[inspector] pcre_strikes"),
    ("[inspector]\npcre_strikes = 1001", "[inspector] pcre_strikes: expected a count in [0, 1000]"),
    ("[inspector]\npcre_strikes = 2.5", "[inspector] pcre_strikes: expected an integer"),
    ("[inspector]\npcre_share = 0", "[inspector] pcre_share: expected a fraction of the time in [0.01, 1]"),
    ("[inspector]\npcre_share = 1.5", "[inspector] pcre_share"),
    ("[inspector]\npcre_share = nan", "[inspector] pcre_share"),
    ("[actions]\non_pcre_limit = 'ignore'", "[actions] on_pcre_limit: unknown reaction 'ignore'"),
    ("[alerts]\nfiles = 'eve.json'", "[alerts] files"),
    ("[alerts]\npoll_interval = 0", "[alerts] poll_interval"),
    ("[queue]\nworkers = 256", "[queue] workers: 256 do not fit"),
    ("[queue]\nnum = 65535\nworkers = 2", "[queue] num/workers"),
    ("[queue]\nsock_rcvbuf = 4096", "[queue] sock_rcvbuf: 4096 bytes is too small"),
    ("[rules]\nworker_mask = 0x10100", "[rules] worker_mask: 0x10100 must be one run"),
    ("[rules]\nworker_mask = 0x4000", "overlaps [rules] connmark"),
    ("[tracker]\nmemcap = 1000", "[tracker] memcap: at least 65536"),
    ("[policy]\non_memcap = 'ignore'", "[policy] on_memcap"),
    ("[policy]\non_memcap = ['drop']", "[policy] on_memcap"),
    ("[policy]\nlow_ttl = 'lower'", "[policy] low_ttl"),
])
def test_bad_config_names_the_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert needle in str(e.value)


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.toml"))
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError):
        load_config(str(tmp_path / "bin.toml"))


def test_rules_path_and_bad_rules_file(tmp_path: Path) -> None:
    from mproxy.config import inspector_enabled
    from mproxy.service import load

    cfg = load_config(str(ROOT / "config" / "mproxy.toml"))
    assert cfg.inspector.rules == str(ROOT / "config" / "mproxy.rules") and inspector_enabled(cfg)
    assert cfg.actions.on_match == ["fastclose"]
    (tmp_path / "bad.rules").write_text('# x\nalert tcp any any -> any any (content:"a"; isdataat:3; sid:1;)\n')
    conf = tmp_path / "m.toml"
    conf.write_text('[inspector]\nrules = "bad.rules"\n[actions]\non_match = "log"\n')
    with pytest.raises(ConfigError, match=r"\[inspector\] rules: .*bad.rules:2: option 'isdataat'"):
        load(str(conf))
    (tmp_path / "far.rules").write_text('alert tcp any any -> any any (content:"a"; content:"b"; distance:90; sid:7;)\n')
    conf.write_text('[inspector]\nrules = "far.rules"\nwindow = 64\n[actions]\non_match = "log"\n')
    with pytest.raises(ConfigError, match=r"far.rules:1: sid 7: .*window \(64 bytes\)"):
        load(str(conf))
    conf.write_text('[inspector]\nrules = "bad.rules"\n[alerts]\nfiles = ["eve.json"]\n')
    assert not inspector_enabled(load(str(conf)))  # auto: an external IDS is followed, rules not needed


def test_skip_bad_rules_loads_the_rest_and_says_what_it_left_out(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """[inspector] skip_bad_rules: bad rules are named (check lists them, the metric counts them)
    instead of refusing the file; a file of which nothing loads is still refused."""
    from mproxy.cli import main
    from mproxy.io.metrics import reaction_families
    from mproxy.reacting import build_inspector
    from mproxy.service import load

    (tmp_path / "mixed.rules").write_text(
        'alert tcp any any -> any any (msg:"ok"; content:"a"; sid:1;)\n'
        'alert tcp any any -> any any (msg:"uri"; content:"b"; http_uri; sid:2;)\n'
        'alert tcp any any -> any any (msg:"far"; content:"a"; content:"b"; distance:100; sid:3;)\n')
    conf = tmp_path / "m.toml"
    conf.write_text('[inspector]\nrules = "mixed.rules"\nwindow = 64\n[actions]\non_match = "log"\n')
    with pytest.raises(ConfigError, match=r"mixed.rules:2: option 'http_uri'"):
        load(str(conf))
    conf.write_text('[inspector]\nrules = "mixed.rules"\nwindow = 64\nskip_bad_rules = true\n'
                    '[actions]\non_match = "log"\n')
    cfg = load(str(conf))
    ins = build_inspector(cfg)
    assert ins is not None and [r.sid for r in ins.rules] == [1]
    assert len(ins.ruleset.skipped) == 2 and "mixed.rules:3: sid 3: " in ins.ruleset.skipped[1]
    (fam,) = [f for f in reaction_families(ins.stats) if f.name == "mproxy_inspector_rules"]
    assert {s.labels["state"]: s.value for s in fam.samples} == {"loaded": 1, "skipped": 2}
    assert main(["check", "-c", str(conf)]) == 0
    cap = capsys.readouterr()
    assert "1 signatures from" in cap.out and "2 skipped" in cap.out
    assert cap.err.count("rule skipped: ") == 2 and "mixed.rules:2: option 'http_uri'" in cap.err
    (tmp_path / "mixed.rules").write_text('alert tcp any any -> any any (content:"b"; http_uri; sid:2;)\n')
    with pytest.raises(ConfigError, match=r"no rule of .*mixed.rules loads \(1 skipped"):
        load(str(conf))


def test_the_gateway_bounds_pcre_time_by_the_share_and_replay_does_not(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """[inspector] pcre_share bounds the live inspector (packets wait for it); `replay --rules`
    takes the same section but not the share: offline nothing waits, and a starved search would be
    a detection lost to the analyst for nothing."""
    import mproxy.reacting as reacting
    from mproxy.cli import main

    (tmp_path / "r.rules").write_text('alert tcp any any -> any any (msg:"x"; pcre:"/x+y/"; sid:1;)\n')
    conf = tmp_path / "m.toml"
    conf.write_text('[inspector]\nrules = "r.rules"\npcre_share = 0.25\n[actions]\non_match = "log"\n')
    ins = reacting.build_inspector(load_config(str(conf)))
    assert ins is not None and ins.pcre_share == 0.25
    assert parse_config("").inspector.pcre_share == 0.5  # the default

    made = []
    real = reacting.inspector_for
    monkeypatch.setattr(reacting, "inspector_for", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    sample = Path(__file__).resolve().parent.parent / "mproxy" / "samples" / "split-attack.pcap"
    assert main(["replay", str(sample), "--out", str(tmp_path / "o.pcap"), "-q", "-c", str(conf),
                 "--rules", str(tmp_path / "r.rules")]) == 0
    assert [i.pcre_share for i in made] == [1.0]
