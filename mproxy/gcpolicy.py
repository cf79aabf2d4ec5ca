"""Garbage-collector settings for mproxy's processes (the commands, the emitter child).

Why: every packet allocates a few short-lived containers (segments, events, emission ops), and
with CPython's default first-generation threshold (700 allocations) the collector then ran
thousands of times per second, each pass also walking older objects: on a capture of 20,000
short MPTCP connections it was a third of the replay's time. Nothing in the per-packet path
makes reference cycles (an ended connection is unlinked from its subflows, see
``Tracker._drop_subflow``), so reference counting frees almost everything, and a rarer
collection only catches the odd cycle later. Memory does not grow (the short-connection replay's
peak RSS fell: benchmarks/README.md ``## resources``).
"""

from __future__ import annotations

import gc

# allocations (net of frees) between first-generation collections; CPython's default is 700
GEN0_THRESHOLD = 20_000


def tune() -> None:
    """Apply the process-wide settings (keeps the older generations' ratios)."""
    _g0, g1, g2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, g1, g2)
