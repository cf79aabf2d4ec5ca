"""The delay before a dead process is started again (workers, the emitter process)."""

from __future__ import annotations

from mproxy.io.backoff import RestartBackoff


def test_doubles_while_processes_die_young_and_comes_back_after_one_lived() -> None:
    b = RestartBackoff()
    assert b.after_death(started=0.0, now=5.0) == 1.0  # the first death: the first delay, young or not
    assert [b.after_death(started=t, now=t + 2) for t in (10.0, 20.0, 30.0, 40.0, 50.0, 60.0)] == \
        [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]  # capped
    assert b.after_death(started=100.0, now=161.0) == 1.0  # it lived over a minute
    assert b.after_death(started=200.0, now=201.0) == 2.0
