"""Lab fixtures: each scenario runs once per session and is shared by its tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mproxy.lab import lab_available
from mproxy.lab.scenarios import SCENARIOS, ScenarioResult

LAB_REASON = lab_available()


@pytest.fixture(scope="session")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ScenarioResult]:
    """``scenario(name)`` runs the named scenario once (in a fresh lab) and caches its result."""
    if LAB_REASON:
        pytest.skip(LAB_REASON)
    cache: dict[str, ScenarioResult | BaseException] = {}

    def get(name: str) -> ScenarioResult:
        if name not in cache:
            try:
                cache[name] = SCENARIOS[name](tmp_path_factory.mktemp(name))
            except Exception as exc:  # a broken scenario fails each of its tests, runs once
                cache[name] = exc
        res = cache[name]
        if isinstance(res, BaseException):
            raise res
        return res

    return get
