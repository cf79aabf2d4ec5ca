"""The commands run with a rarer first-generation collection (see mproxy.gcpolicy)."""

from __future__ import annotations

import gc
from pathlib import Path

from mproxy.cli import main
from mproxy.gcpolicy import GEN0_THRESHOLD

CONFIG = Path(__file__).resolve().parents[1] / "config" / "mproxy.toml"


def test_a_command_sets_the_first_generation_threshold_and_keeps_the_others() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 7, 9)
        assert main(["check", "-c", str(CONFIG), "-q"]) == 0
        assert gc.get_threshold() == (GEN0_THRESHOLD, 7, 9)
    finally:
        gc.set_threshold(*before)

