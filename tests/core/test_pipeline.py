"""Pipeline: emission ops applied in-process or shipped elsewhere give the same frames."""

from __future__ import annotations

import pickle

from mproxy.core.pipeline import Emission, Pipeline

from .session import Session, seg


def packets() -> list[bytes]:
    s = Session(1)
    pk = s.handshake() + s.join(1)
    off = 0
    for i, chunk in enumerate([b"a" * 3000, b"b" * 20, b"c" * 60000]):
        pk.append(s.data(i % 2, True, off, chunk))
        off += len(chunk)
    pk.append(s.data(0, False, 0, b"reply" * 500))
    pk += [s.data_fin(0, True, off), s.data_fin(0, False, 2500), s.fin(0, True), s.fin(0, False)]
    return pk


def test_remote_ops_rebuild_the_same_frames() -> None:
    local = Pipeline()
    want = [f for p in packets() for f in local.feed_segment(seg(p))] + local.finish()
    remote = Pipeline()
    remote.remote = []
    elsewhere = Emission()
    got = []
    for p in packets():
        assert remote.feed_segment(seg(p)) == []
        ops = pickle.loads(pickle.dumps(remote.take_ops()))  # what crosses to the worker
        got += elsewhere.apply(ops)
    assert remote.finish() == []
    got += elsewhere.apply(remote.take_ops())
    assert got == want and len(want) > 100
    assert elsewhere.frames == local.stats.emitted_frames and len(elsewhere) == 0
    assert remote.stats.bytes_out == local.stats.bytes_out
    assert remote.take_ops() == []


def test_ops_applied_in_one_batch_give_the_frames_of_one_batch_per_packet() -> None:
    """Emission.apply hands runs of data ops to the emitter together: same frames as op by op."""
    s = Session(1)
    pk = s.handshake() + s.join(1)
    off = [0, 0]
    for i in range(60):
        c2s = i % 7 != 3
        n = 1448 if c2s else 300
        d = 0 if c2s else 1
        pk.append(s.data(i % 2, c2s, off[d], bytes((i + k) & 0xFF for k in range(n))))
        off[d] += n
    pk += [s.data_fin(0, True, off[0]), s.data_fin(0, False, off[1])]
    remote = Pipeline()
    remote.remote = []
    per_packet = Emission()
    want = []
    for p in pk:
        remote.feed_segment(seg(p))
        want += per_packet.apply(remote.take_ops())
    remote.finish()
    want += per_packet.apply(remote.take_ops())
    batched = Pipeline()
    batched.remote = []
    for p in pk:
        batched.feed_segment(seg(p))
    batched.finish()
    got = batched.emit_pending()
    assert got == want and len(got) > 120
    assert batched.stats.emitted_frames == len(got) == per_packet.frames
