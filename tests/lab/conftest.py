"""Lab fixtures: each scenario runs once per session (again if the kernels failed it) and is shared by its tests."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest

from mproxy.lab import lab_available
from mproxy.lab.scenarios import SCENARIOS, ScenarioResult

LAB_REASON = lab_available()
ATTEMPTS = 3
# dss_stripped falls back on purpose, and the kernel often loses bytes there: the scenario retries itself
JUDGED_BY_THE_KERNEL = set(SCENARIOS) - {"dss_stripped"}
FALLS_BACK = {"fast_open_refused"}  # on purpose: judged by its bytes alone


def kernel_trouble(name: str, res: ScenarioResult) -> list[str]:
    """Why a run cannot serve as ground truth: the kernels themselves did not carry every byte
    intact over MPTCP (mproxy is not on the path in these scenarios: the gateway forwards)."""
    if name not in JUDGED_BY_THE_KERNEL:
        return []
    problems = res.problems()  # these name the kernel counters when there are any
    if name in FALLS_BACK:
        return problems
    fell_back = [f"{c.four_tuple} fell back to TCP" for c in res.connections if c.mptcp is False]
    if fell_back and not problems and res.mib:
        fell_back.append(f"kernel MPTCP counters: {res.mib}")
    return problems + fell_back


@pytest.fixture(scope="session")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ScenarioResult]:
    """``scenario(name)`` runs the named scenario (in a fresh lab) and caches its result.

    A run in which the kernels lost or corrupted bytes, or fell back to TCP, is no ground truth
    for mproxy: it is run again (up to ``ATTEMPTS`` times), with a warning that says why, so a
    kernel hiccup on a loaded machine shows in the report without failing the suite; a
    scenario that keeps failing fails its tests with the last run's problems.
    """
    if LAB_REASON:
        pytest.skip(LAB_REASON)
    cache: dict[str, ScenarioResult | BaseException] = {}

    def get(name: str) -> ScenarioResult:
        if name not in cache:
            try:
                for attempt in range(1, ATTEMPTS + 1):
                    res = SCENARIOS[name](tmp_path_factory.mktemp(name))
                    cache[name] = res
                    trouble = kernel_trouble(name, res)
                    if not trouble:
                        break
                    warnings.warn(f"lab scenario {name}, run {attempt} of {ATTEMPTS}: " + "; ".join(trouble),
                                  stacklevel=1)
            except Exception as exc:  # a broken scenario fails each of its tests, runs once
                cache[name] = exc
        res = cache[name]
        if isinstance(res, BaseException):
            raise res
        return res

    return get
