"""Stream digests taken from emission ops equal the tracker's own, and held records wait for them."""

from __future__ import annotations

import hashlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy.core.pipeline import Pipeline
from mproxy.core.streamhash import AwaitingDigests, StreamHashes, fill_record

from .session import Session

EMPTY = hashlib.sha256().hexdigest()


def traffic() -> list[bytes]:
    """Two connections, one with a join; data both ways; one ends, one stays open."""
    pk: list[bytes] = []
    for n, (sport, ends) in enumerate(((40001, True), (40002, False))):
        s = Session(1, sport=sport)
        pk += s.handshake() + (s.join(1) if n == 0 else [])
        off = back = 0
        for i in range(5):
            chunk = bytes([65 + i + n]) * (700 + 3000 * i)
            pk.append(s.data(i % (2 - n), True, off, chunk))
            off += len(chunk)
            if i % 2:
                pk.append(s.data(0, False, back, b"ok" * (i + 1)))
                back += 2 * (i + 1)
        if ends:
            pk += [s.data_fin(0, True, off), s.data_fin(0, False, back), s.fin(0, True), s.fin(0, False)]
    return pk


def records(pipe: Pipeline) -> list[dict[str, Any]]:
    return [r for r in pipe.drain_records() if r["event"] == "mptcp_connection"]


def test_digests_from_the_ops_are_the_trackers() -> None:
    hashes = StreamHashes()
    # fed as raw-IP frames (linktype 101); one pipeline hashes in the tracker, the other from its ops
    ref, mine = Pipeline(), Pipeline()
    mine.tracker.stream_hash = False
    mine.remote = []
    for i, p in enumerate(traffic()):
        ref.feed(101, p, 1000.0 + i / 100)
        mine.feed(101, p, 1000.0 + i / 100)
        hashes.update(mine.take_ops())
    ref.finish(1100.0)
    mine.finish(1100.0)
    hashes.update(mine.take_ops())
    want, got = records(ref), records(mine)
    assert len(want) == 2 and all(r["c2s"]["bytes"] and r["s2c"]["bytes"] for r in want)
    assert all(r["c2s"]["sha256"] is None and r["s2c"]["sha256"] is None for r in got)
    done = hashes.take_done()
    for r in got:
        fill_record(r, done)
    assert got == want
    assert len(hashes) == 0  # every connection closed: nothing held


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.binary(max_size=40)), max_size=60),
       st.sets(st.integers(0, 2)))
def test_any_interleaving_of_releases_hashes_each_direction_whole(
        releases: list[tuple[int, bool, bytes]], closed: set[int]) -> None:
    hashes = StreamHashes()
    ops: list[tuple[Any, ...]] = [("data", c, fc, data, 0.0) for c, fc, data in releases]
    ops += [("close", c, 0.0, False, True) for c in sorted(closed)]
    cut = len(ops) // 2
    hashes.update(ops[:cut])
    hashes.update(ops[cut:])
    done = hashes.take_done()
    assert set(done) == closed
    for c in closed:
        for i, fc in enumerate((True, False)):
            whole = b"".join(d for cc, f, d in releases if cc == c and f == fc)
            assert done[c][i] == hashlib.sha256(whole).hexdigest()
    assert hashes.take_done() == {}


def _conn_record(cid: int, sha: str | None = None) -> dict[str, Any]:
    return {"event": "mptcp_connection", "conn_id": cid, "c2s": {"sha256": sha}, "s2c": {"sha256": sha}}


def test_held_records_wait_for_their_digests_and_others_pass() -> None:
    aw = AwaitingDigests()
    notice = {"event": "notice", "type": "side_channel"}
    hashed = _conn_record(9, "ab")  # the tracker hashed it (the emitter process had died): passes
    assert aw.hold([notice, _conn_record(1), hashed, _conn_record(2)]) == [notice, hashed]
    assert [r["conn_id"] for r in aw.held] == [1, 2]
    out = aw.settle({1: ("c1", "s1"), 2: ("c2", "s2"), 3: ("c3", "s3")})
    assert out == [{"event": "mptcp_connection", "conn_id": 1, "c2s": {"sha256": "c1"}, "s2c": {"sha256": "s1"}},
                   {"event": "mptcp_connection", "conn_id": 2, "c2s": {"sha256": "c2"}, "s2c": {"sha256": "s2"}}]
    assert aw.held == []
    # a digest that came before its record is kept one round, then dropped
    aw.hold([_conn_record(3)])
    assert aw.settle({})[0]["c2s"]["sha256"] == "c3"
    aw.settle({4: ("c4", "s4")})
    aw.settle({})
    aw.hold([_conn_record(4)])
    assert aw.settle({})[0]["c2s"]["sha256"] is None


def test_records_whose_digests_never_come_go_out_without_them() -> None:
    aw = AwaitingDigests()
    aw.hold([_conn_record(5)])
    (rec,) = aw.settle({})
    assert rec["c2s"]["sha256"] is None and rec["s2c"]["sha256"] is None


def test_an_empty_direction_has_the_empty_digest() -> None:
    hashes = StreamHashes()
    hashes.update([("data", 7, True, b"abc", 0.0), ("close", 7, 0.0, False, True)])
    assert hashes.take_done() == {7: (hashlib.sha256(b"abc").hexdigest(), EMPTY)}


def test_held_records_fall_due_by_age_or_number() -> None:
    aw = AwaitingDigests()
    assert not aw.due(100.0, 0.2, 3)  # nothing held
    aw.hold([_conn_record(1)], 10.0)
    aw.hold([_conn_record(2)], 10.15)  # the oldest one's time counts
    assert not aw.due(10.19, 0.2, 3) and aw.due(10.21, 0.2, 3)
    aw.hold([_conn_record(3)], 10.19)
    assert aw.due(10.19, 0.2, 3)
    aw.settle({})
    aw.hold([_conn_record(4)], 50.0)  # a new oldest
    assert not aw.due(50.1, 0.2, 3)


def test_a_conversation_taken_over_mid_stream_gets_no_digest() -> None:
    """A restarted emitter process hashes only what it saw from the open: the conversations it takes
    over (``resume``) get no digest (their records keep sha256 null), the others theirs, and nothing
    is left held once they close."""
    pipe = Pipeline()
    pipe.remote = []
    a, b = Session(1, sport=40001), Session(1, sport=40002)
    for p in a.handshake() + b.handshake() + [a.data(0, True, 0, b"a" * 500), b.data(0, True, 0, b"b" * 500)]:
        pipe.feed(101, p, 1000.0)
    pipe.take_ops()  # went to the process that died
    resume = pipe.resume_ops(1, 1001.0)
    assert [op[0] for op in resume] == ["resume", "resume"]
    hashes = StreamHashes()
    hashes.update(resume)
    late = Session(1, sport=40003)
    rest = [a.data(0, True, 500, b"A" * 500), a.data_fin(0, True, 1000), a.data_fin(0, False, 0), a.fin(0, True),
            a.fin(0, False), b.data(0, False, 0, b"B" * 300)]
    for i, p in enumerate(rest + late.handshake() + [late.data(0, True, 0, b"late" * 100)]):
        pipe.feed(101, p, 1002.0 + i / 100)
        hashes.update(pipe.take_ops())
    pipe.finish(1100.0)
    hashes.update(pipe.take_ops())
    by_port = {r["client_port"]: r["conn_id"] for r in records(pipe)}
    assert set(by_port) == {40001, 40002, 40003}
    done = hashes.take_done()
    assert set(done) == {by_port[40003]}
    assert done[by_port[40003]] == (hashlib.sha256(b"late" * 100).hexdigest(), EMPTY)
    assert len(hashes) == 0 and pipe.resume_ops(2, 1101.0) == []  # nothing in progress is left


def test_resume_ops_carry_the_half_closes_already_emitted() -> None:
    pipe = Pipeline()
    pipe.remote = []
    s = Session(1)
    for p in s.handshake() + [s.data(0, True, 0, b"x" * 100), s.data_fin(0, True, 100)]:
        pipe.feed(101, p, 1000.0)
    (cid,) = pipe.tracker.connections
    assert pipe.resume_ops(3, 5.0)[1:] == [("fin", cid, True, 5.0)]
    assert pipe.resume_ops(3, 5.0)[0][7] == 3
