"""Which compiled parts run, as operators are told (``mproxy check``, the start-up log)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mproxy import compiled
from mproxy.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_switched_off_everything_is_named_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPROXY_NO_ACCEL", "1")
    assert compiled.switched_off() and compiled.accelerator() is None and compiled.content_scanner() is None
    assert compiled.describe() == ("accelerator pure Python (MPROXY_NO_ACCEL), "
                                   "inspector content scan pure Python (MPROXY_NO_ACCEL)")


def test_each_part_is_named_as_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPROXY_NO_ACCEL", raising=False)
    text = compiled.describe()
    assert ("accelerator compiled" in text) == (compiled.accelerator() is not None)
    assert ("inspector content scan compiled" in text) == (compiled.content_scanner() is not None)
    assert "MPROXY_NO_ACCEL" not in text


def test_check_says_which_compiled_parts_run(capsys: pytest.CaptureFixture[str]) -> None:
    conf = str(ROOT / "config" / "mproxy.toml")
    assert main(["check", "-c", conf]) == 0
    assert f"{conf}: {compiled.describe()}\n" in capsys.readouterr().out
