"""How long to wait before starting again a process that died (a worker, the emitter process).

One that dies right after its start would otherwise be started again in a
tight loop, each start costing an interpreter and its imports while the
gateway has packets to answer: the delay doubles while processes keep dying
young, and comes back to the first one after a process lived long enough.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RestartBackoff"]


@dataclass(slots=True)
class RestartBackoff:
    """``first`` seconds after a death, doubled (up to ``cap``) for each later one within ``young``
    seconds of its process's start."""

    first: float = 1.0
    cap: float = 30.0
    young: float = 60.0
    delay: float = 0.0  # the last delay given (0: no death yet)

    def after_death(self, started: float, now: float) -> float:
        """The delay before the next start, for a process started at ``started`` and lost at ``now``
        (one clock, e.g. monotonic)."""
        young = now - started < self.young
        self.delay = min(self.cap, self.delay * 2) if young and self.delay else self.first
        return self.delay
