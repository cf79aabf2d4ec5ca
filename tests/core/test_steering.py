"""The control queue's core: which worker each first SYN of an MPTCP connection goes to.

Packets come from our own encoder (tests/core/session.py); the token
announcements a worker would send come from a real Tracker fed the same
handshakes, so "the join lands where its connection is" is checked against
the tracker's own grouping, not against a token we computed here.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy import crypto
from mproxy.core.gateway import Verdict
from mproxy.core.marks import mask_capacity
from mproxy.core.steering import Steering, SteerKind, mask_shift, worker_bits
from mproxy.core.tracker import Tracker
from mproxy.wire.build import build_tcp
from mproxy.wire.packet import ACK, SYN

from .session import Session, lying_tail

MASK = 0xFF0000


def test_worker_bits_sit_under_the_mask_and_zero_means_none() -> None:
    assert mask_shift(MASK) == 16 and worker_bits(0, MASK) == 0x10000 and worker_bits(254, MASK) == 0xFF0000
    assert worker_bits(0, 0x1) == 1
    with pytest.raises(ValueError, match="one run"):
        Steering(2, 0x10100)
    with pytest.raises(ValueError, match="do not fit"):
        Steering(4, 0x3 << 8)  # values 1..3 only
    Steering(3, 0x3 << 8)
    # the same arithmetic the config check uses
    assert mask_capacity(MASK) == 255 and mask_capacity(0x3 << 8) == 3
    assert mask_capacity(0x10100) == mask_capacity(0) == mask_capacity(-1) == 0


def test_capable_syns_go_round_robin_and_joins_follow_their_token() -> None:
    s = Steering(3, MASK)
    sessions = [Session(1, sport=41000 + 10 * i, server_key=0x5000 + i) for i in range(6)]
    owners = []
    for sess in sessions:
        syn = sess.handshake()[0]
        d = s.decide(syn)
        assert d is not None and d.verdict is Verdict.REPEAT and d.reason == "capable"
        owners.append((d.mark >> 16) - 1)
    assert owners == [0, 1, 2, 0, 1, 2]
    # each worker announces the tokens its tracker indexes (see the next test)
    for sess, w in zip(sessions, owners):
        s.learn(w, crypto.key_token(sess.sk, 1), True)
    for sess, w in zip(sessions, owners):
        join_syn = sess.join(1)[0]
        d = s.decide(join_syn)
        assert d is not None and d.reason == "join" and d.mark == worker_bits(w, MASK)
    assert s.stats.capable == 6 and s.stats.join == 6 and s.stats.join_unknown == 0


def test_syns_are_steered_by_the_options_before_one_whose_length_lies() -> None:
    """The server's kernel acts on an MP_CAPABLE or MP_JOIN followed by a lying option, and so
    does the tracker: such a join must reach the worker owning its connection."""
    s = Steering(3, MASK)
    sess = Session(1)
    d = s.decide(lying_tail(sess.handshake()[0]))
    assert d is not None and d.reason == "capable"
    s.learn((d.mark >> 16) - 1, crypto.key_token(sess.sk, 1), True)
    j = s.decide(lying_tail(sess.join(1)[0]))
    assert j is not None and j.reason == "join" and j.mark == d.mark


def test_tracker_announces_the_tokens_it_indexes_and_forgets() -> None:
    from .session import run

    sess = Session(1)
    t = Tracker()
    t.token_log = []
    run(t, sess.handshake(), flush=False)
    learned = {tok for tok, added in t.token_log if added}
    assert crypto.key_token(sess.sk, 1) in learned and crypto.key_token(sess.ck, 1) in learned
    t.token_log.clear()
    run(t, [sess.rst(0, True)], flush=True)
    forgotten = {tok for tok, added in t.token_log if not added}
    assert forgotten == learned


def test_unknown_join_asks_again_then_hashes_stably() -> None:
    s = Steering(4, MASK)
    syn = Session(1).join(1, token=0xDEADBEEF)[0]
    assert s.decide(syn, final=False) is None  # the caller reads pending announcements first
    a, b = s.decide(syn), s.decide(syn)
    assert a is not None and b is not None and a.mark == b.mark and a.reason == "join_unknown"
    s.learn(2, 0xDEADBEEF, True)  # the announcement arrives: the same SYN now goes to its owner
    assert s.decide(syn, final=False).mark == worker_bits(2, MASK)  # type: ignore[union-attr]


def test_a_forget_from_an_old_owner_leaves_a_newer_announcement() -> None:
    s = Steering(2, MASK)
    s.learn(0, 7, True)
    s.learn(1, 7, True)  # the token now names a connection of worker 1
    s.learn(0, 7, False)
    assert s.tokens == {7: 1}
    s.learn(1, 8, True)
    assert s.forget_worker(1) == 2 and s.tokens == {}


def test_the_token_table_is_bounded() -> None:
    s = Steering(2, MASK, max_tokens=100)
    for tok in range(250):
        s.learn(tok % 2, tok, True)
    assert len(s.tokens) == 100 and min(s.tokens) == 150 and s.stats.tokens_evicted == 150


def test_non_syn_and_plain_packets_are_hashed_not_refused() -> None:
    s = Steering(2, MASK)
    src, dst = bytes([198, 18, 1, 2]), bytes([198, 18, 10, 2])
    plain_syn = build_tcp(src, dst, 40000, 80, 1, 0, SYN)
    ack = build_tcp(src, dst, 40001, 80, 1, 1, ACK)
    d = s.decide(plain_syn)
    assert d is not None and d.verdict is Verdict.REPEAT and d.reason == SteerKind.OTHER.value
    for p in (ack, b"", b"\x45" * 10, b"\x60" + bytes(50)):
        d = s.decide(p)
        assert d is not None and d.verdict is Verdict.REPEAT and d.reason == SteerKind.UNKNOWN.value
        assert d.mark in (worker_bits(0, MASK), worker_bits(1, MASK))
    assert s.stats.other == 1 and s.stats.unknown == 4


def test_later_packets_go_to_the_worker_of_their_subflows_syn() -> None:
    """What reaches the control after a first SYN (conntrack found it INVALID, so it has no saved
    worker bits) goes where the SYN went, in both directions; the token still decides a join."""
    s = Steering(3, MASK)
    sess = [Session(1, sport=43000 + i, server_key=0x7000 + i) for i in range(4)]
    owners = []
    for x in sess:
        d = s.decide(x.handshake()[0])
        assert d is not None
        owners.append(d.mark)
    assert len(set(owners)) == 3 and len(s.subflows) == 4
    for x, mark in zip(sess, owners):
        for pkt in (*x.handshake()[1:], x.data(0, True, 0, b"UNION SELECT"), x.data(0, False, 0, b"ok")):
            d = s.decide(pkt)  # the SYN/ACK, the third ACK, data both ways
            assert d is not None and d.mark == mark and d.reason == "subflow"
    assert s.stats.subflow == 16 and s.stats.unknown == 0
    # a join is steered by its token (its 4-tuple is new), and its later packets follow it
    x = sess[1]
    s.learn((owners[1] >> 16) - 1, crypto.key_token(x.sk, 1), True)
    j = x.join(1)
    d = s.decide(j[0])
    assert d is not None and d.reason == "join" and d.mark == owners[1]
    d = s.decide(j[1])
    assert d is not None and d.reason == "subflow" and d.mark == owners[1]


def test_the_subflow_table_is_bounded() -> None:
    s = Steering(2, MASK, max_subflows=10)
    src, dst = bytes([198, 18, 1, 2]), bytes([198, 18, 10, 2])
    for port in range(40000, 40025):
        assert s.decide(build_tcp(src, dst, port, 80, 1, 0, SYN)) is not None
    assert len(s.subflows) == 10 and s.stats.subflows_evicted == 15
    d = s.decide(build_tcp(src, dst, 40024, 80, 2, 1, ACK))
    assert d is not None and d.reason == "subflow"
    d = s.decide(build_tcp(src, dst, 40000, 80, 2, 1, ACK))
    assert d is not None and d.reason == "unknown"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(1, 8))
def test_garbage_always_gets_a_worker(data: bytes, workers: int) -> None:
    s = Steering(workers, MASK)
    d = s.decide(data)
    assert d is not None and 1 <= d.mark >> 16 <= workers


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**32 - 1)), max_size=40), st.integers(0, 2**32 - 1))
def test_mptcp_option_garbage_in_a_syn_never_raises(opts: list[tuple[int, int]], token: int) -> None:
    """Option 30 of any length and subtype inside a SYN: a worker, never an exception."""
    raw = b"".join(bytes([30, 2 + (n % 14), (sub << 4)]) + token.to_bytes(4, "big")[: (n % 14)]
                   for sub, n in opts)[:40]
    src, dst = bytes([198, 18, 1, 2]), bytes([198, 18, 10, 2])
    pkt = build_tcp(src, dst, 40000, 80, 1, 0, SYN, 65535, raw.ljust((len(raw) + 3) & ~3, b"\x01"))
    assert Steering(3, MASK).decide(pkt) is not None
