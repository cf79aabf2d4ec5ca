"""Counting packets that bypassed a queue, from the kernel's counters (mproxy.io.bypass).

A model of the kernel keeps the three counters the way nfnetlink_queue and the
NFQUEUE rules do (rule hits; ``id_sequence`` and ``queue_dropped`` per binding,
32-bit, restarting when a process binds the queue again) and the truth: which
packets never reached the queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy.io.bypass import Bypass

M32 = 0xFFFFFFFF


@dataclass
class KernelModel:
    hits: int = 0
    ids: int = 0
    dropped: int = 0
    portid: int | None = 100  # None: no process bound
    bypassed: int = 0  # the truth

    def row(self) -> dict[str, int] | None:
        if self.portid is None:
            return None
        return {"portid": self.portid, "waiting": 0, "dropped": self.dropped, "user_dropped": 0,
                "id_sequence": self.ids}

    def table(self) -> dict[int, dict[str, int]]:
        r = self.row()
        return {} if r is None else {7: r}

    def packet(self, how: str) -> None:
        self.hits += 1
        if self.portid is None or how == "full_open":  # --queue-bypass, or the fail-open flag
            self.bypassed += 1
        elif how == "full_closed":
            self.dropped = (self.dropped + 1) & M32
        else:
            self.ids = (self.ids + 1) & M32


def test_queued_dropped_and_bypassed_packets_are_told_apart() -> None:
    k = KernelModel(ids=50, dropped=3)  # the queue was in use before our rules existed
    b = Bypass([7])
    b.baseline(k.table())
    for how in ["queued"] * 10 + ["full_closed"] * 4:
        k.packet(how)
    b.update({7: k.hits}, k.table())
    assert b.counts() == {7: 0}  # numbered or dropped-and-counted: none bypassed
    for how in ["full_open"] * 5 + ["queued"] * 2:
        k.packet(how)
    b.update({7: k.hits}, k.table())
    assert b.counts() == {7: 5}
    b.update({7: k.hits - 3}, k.table())  # a reading that falls short never takes back
    assert b.counts() == {7: 5}
    b.update({}, k.table())  # no hits read (iptables failed): nothing changes
    assert b.counts() == {7: 5}


def test_a_new_binding_and_a_wrap_keep_the_count() -> None:
    k = KernelModel(ids=M32 - 2)
    b = Bypass([7])
    b.baseline(k.table())
    for _ in range(5):  # wraps past 2**32
        k.packet("queued")
    b.kernel(k.table())
    k.portid = None  # the worker died: its queue is gone, --queue-bypass accepts
    b.kernel(k.table())
    for _ in range(4):
        k.packet("queued")
    k.portid, k.ids, k.dropped = 200, 0, 0  # restarted: a new binding numbers from 1
    for _ in range(6):
        k.packet("queued")
    b.update({7: k.hits}, k.table())
    assert b.counts() == {7: 4} == {7: k.bypassed}


Step = st.one_of(
    st.tuples(st.just("packet"), st.sampled_from(["queued", "queued", "queued", "full_open", "full_closed"]),
              st.integers(1, 3000)),
    st.tuples(st.just("read"), st.booleans(), st.just(0)),  # kernel() only, or update() with hits
    st.tuples(st.just("unbind"), st.just(""), st.just(0)),
    st.tuples(st.just("bind"), st.just(""), st.integers(0, 2)),  # how many ids the new binding skips ahead
)


@settings(max_examples=300, deadline=None)
@given(start_ids=st.integers(0, M32), steps=st.lists(Step, max_size=40),
       earlier_hits=st.one_of(st.none(), st.integers(0, 10**9)))
def test_counts_what_bypassed_whenever_it_is_read(start_ids: int, steps: list[tuple[str, str, int]],
                                                  earlier_hits: int | None) -> None:
    """Read before every rebinding (the owner reads every tick), the count is exact at every update,
    across wraps, rebindings and unbound spells; never decreasing. ``earlier_hits``: the rules were
    the operator's and had counted before mproxy started (their reading is part of the baseline)."""
    k = KernelModel(ids=start_ids, hits=earlier_hits or 0)
    b = Bypass([7])
    b.baseline(k.table(), None if earlier_hits is None else {7: k.hits})
    last = 0
    for kind, how, n in steps:
        if kind == "packet":
            if how == "queued" and k.portid is not None:  # many at once, numbered (wrapping)
                k.ids = (k.ids + n) & M32
                k.hits += n
            else:
                for _ in range(n):
                    k.packet(how)
        elif kind == "read":
            if how:
                b.update({7: k.hits}, k.table())
                assert b.counts()[7] == k.bypassed
            else:
                b.kernel(k.table())
        elif kind == "unbind" and k.portid is not None:
            b.kernel(k.table())
            k.portid = None
        elif kind == "bind" and k.portid is None:
            b.kernel(k.table())
            k.portid, k.ids, k.dropped = 300 + len(str(k.hits)) + k.hits, 0, 0
        assert b.counts()[7] >= last
        last = b.counts()[7]
    b.update({7: k.hits}, k.table())
    assert b.counts()[7] == k.bypassed


def test_unknown_queues_and_missing_rows_count_nothing() -> None:
    b = Bypass([1, 2])
    b.baseline({})
    b.update({1: 0, 9: 40}, {})
    assert b.counts() == {1: 0, 2: 0}
