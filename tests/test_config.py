from __future__ import annotations

from pathlib import Path

import pytest

from mproxy.config import ConfigError, load_config, parse_config
from mproxy.core.policy import Action

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_example_config_is_valid_and_documents_every_key() -> None:
    cfg = load_config(str(ROOT / "config" / "mproxy.toml"))
    assert cfg.queue.fail == "open" and cfg.policy.default == Action.INSPECT
    text = (ROOT / "config" / "mproxy.toml").read_text()
    from dataclasses import fields

    for section in ("queue", "rules", "tracker", "sink", "log", "metrics"):
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
