"""The emitter process: ops shipped from the gateway come out of its sinks as the in-process pipeline emits them."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from mproxy.core.gateway import Gateway
from mproxy.core.policy import Action, Policy
from mproxy.io.emitworker import RemoteSinks
from mproxy.io.pcap import read_captures
from mproxy.io.sinks import SinkError

from ..core.session import Session


def traffic() -> list[bytes]:
    s = Session(1)
    pk = s.handshake() + s.join(1)
    off = 0
    for i in range(6):
        chunk = bytes([65 + i]) * (1000 + 7000 * i)
        pk.append(s.data(i % 2, True, off, chunk))
        off += len(chunk)
    return pk + [s.data_fin(0, True, off), s.data_fin(0, False, 0), s.fin(0, True), s.fin(0, False)]


def test_worker_writes_what_the_in_process_pipeline_emits(tmp_path: Path) -> None:
    local = Gateway(split_passthrough=True)
    want = [f for p in traffic() for _, f in local.packet(p, 1000.0).frames] + [f for _, f in local.flush(1001.0)]

    gw = Gateway(split_passthrough=True)
    sinks = RemoteSinks(gw.pipeline, "", str(tmp_path / "out"), 100, 3)
    sinks.start()
    try:
        for p in traffic():
            d = gw.packet(p, 1000.0)
            assert d.frames == []
            sinks.write(d.frames)
        assert gw.flush(1001.0) == []
        sinks.pump()
        stats = sinks.stats()  # a round trip: everything sent before is written
        assert stats and stats[0]["frames"] == len(want)
        assert gw.pipeline.stats.emitted_frames == len(want) and sinks.batches > 0
    finally:
        sinks.close()
    got = [f.data for f in read_captures([str(p) for p in sorted(tmp_path.glob("out.*.pcap"))])]
    assert got == want


def test_worker_carries_frames_made_outside_the_pipeline(tmp_path: Path) -> None:
    """A downgraded connection's packets are frames of the decision, not ops."""
    s = Session(1)
    syn = s.handshake()[0]
    gw = Gateway(Policy(default=Action.DOWNGRADE), split_passthrough=True)
    sinks = RemoteSinks(gw.pipeline, "", str(tmp_path / "dg"), 100, 3)
    sinks.start()
    gw.packet(syn, 1.0)
    d = gw.packet(s.data(0, True, 0, b"z" * 5000, mapping=False), 1.1)
    assert len(d.frames) == 4
    sinks.write(d.frames)
    sinks.close()
    got = [f.data for f in read_captures([str(p) for p in sorted(tmp_path.glob("dg.*.pcap"))])]
    assert got == [f for _, f in d.frames]


def test_bad_sink_fails_start_with_its_message() -> None:
    gw = Gateway()
    with pytest.raises(SinkError, match="no interface named"):
        RemoteSinks(gw.pipeline, "mpx-no-such-if0", "", 100, 3).start()
    assert gw.pipeline.remote is None


def test_dead_worker_is_counted_and_verdicts_go_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gw = Gateway()
    sinks = RemoteSinks(gw.pipeline, "", str(tmp_path / "x"), 100, 3)
    sinks.start()
    assert sinks._proc is not None
    sinks._proc.kill()
    sinks._proc.wait(5)
    with caplog.at_level(logging.ERROR, logger="mproxy.emitworker"):
        for p in traffic():
            gw.packet(p, 1.0)
            sinks.write([])
    assert sinks.worker_errors >= 1 and sinks.stats() == []
    assert len([r for r in caplog.records if "emitter process" in r.getMessage()]) == 1
    assert gw.pipeline.take_ops() == []  # nothing piles up
    sinks.close()


def test_worker_ends_when_its_parent_is_gone_and_holds_no_parent_socket(tmp_path: Path) -> None:
    """A SIGKILLed gateway must not leave its emitter behind: the child keeps no copy of the parent's
    end of the pipe (else the parent's death is no end of file there) nor any other descriptor of
    the parent's (it is a fresh interpreter, not a fork)."""
    import socket

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    os.set_inheritable(theirs.fileno(), True)  # even one a fork would have kept
    sinks = RemoteSinks(Gateway().pipeline, "", str(tmp_path / "orphan"), 100, 3)
    sinks.start()
    proc = sinks._proc
    assert proc is not None
    theirs.close()  # now only the child could still hold it
    mine.setblocking(False)
    assert mine.recv(1) == b""  # end of file: nobody holds the other end
    assert sinks._conn is not None
    sinks._conn.close()  # what the kernel does to a killed parent's descriptors
    proc.wait(5)
    mine.close()


def test_worker_hashes_the_streams_as_the_tracker_would(tmp_path: Path) -> None:
    """``hash_streams``: the child hashes the data ops; an answer brings the digests of the connections
    closed before it, which are the tracker's own."""
    local = Gateway(split_passthrough=True)
    for p in traffic():
        local.packet(p, 1000.0)
    local.flush(1001.0)
    (want,) = [r for r in local.drain_records() if r["event"] == "mptcp_connection"]

    gw = Gateway(split_passthrough=True)
    gw.pipeline.tracker.stream_hash = False
    sinks = RemoteSinks(gw.pipeline, "", str(tmp_path / "h"), 100, 3, hash_streams=True)
    sinks.start()
    try:
        for p in traffic():
            sinks.write(gw.packet(p, 1000.0).frames)
        gw.flush(1001.0)
        (got,) = [r for r in gw.drain_records() if r["event"] == "mptcp_connection"]
        assert got["c2s"]["sha256"] is None
        assert sinks.take_digests() == {}
        sinks.stats()
        digests = sinks.take_digests()
    finally:
        sinks.close()
    assert digests == {want["conn_id"]: (want["c2s"]["sha256"], want["s2c"]["sha256"])}
    assert want["c2s"]["bytes"] > 0


def _conversations(path: Path) -> list[tuple[int, int, int, bytes]]:
    """(client port, flags, seq, payload) of every emitted client->server frame, in order."""
    from mproxy.wire.packet import TcpSegment, parse_frame

    out = []
    for f in read_captures([str(p) for p in sorted(path.parent.glob(path.name + ".*.pcap"),
                                                   key=lambda p: int(p.name.split(".")[-2]))]):
        seg = parse_frame(f.linktype, f.data, f.ts)
        assert isinstance(seg, TcpSegment)
        if seg.dport == 80:
            out.append((seg.sport, seg.flags, seg.seq, bytes(seg.payload)))
    return out


def test_a_lost_worker_is_replaced_and_takes_over_the_conversations_in_progress(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The child dies mid-connection: after its back-off another starts (``revive``), opens the
    connection again with a new handshake (other ISNs) and emits its data from there on; bytes shipped
    while none ran are lost, the digests of that connection never come (its record keeps sha256
    null), a connection that opens later is hashed whole, and the sink counters go on growing."""
    from mproxy.wire.packet import SYN

    def conn(sport: int, chunks: list[bytes]) -> tuple[Session, list[bytes]]:
        s = Session(1, sport=sport)
        pk = s.handshake()
        off = 0
        for c in chunks:
            pk.append(s.data(0, True, off, c))
            off += len(c)
        return s, pk

    gw = Gateway(split_passthrough=True)
    gw.pipeline.tracker.stream_hash = False
    sinks = RemoteSinks(gw.pipeline, "", str(tmp_path / "r"), 100, 3, hash_streams=True)
    sinks.start()
    try:
        s, pk = conn(41000, [b"A" * 3000, b"B" * 3000, b"C" * 3000])
        for p in pk[:-2]:  # handshake and A
            sinks.write(gw.packet(p, 1000.0).frames)
        before = sinks.stats()[0]["frames"]
        assert sinks._proc is not None
        first = sinks._proc.pid
        sinks._proc.kill()
        sinks._proc.wait(5)
        with caplog.at_level(logging.WARNING, logger="mproxy.emitworker"):
            sinks.write(gw.packet(pk[-2], 1000.0).frames)  # B: shipped to nobody (noticed here)
            assert not sinks.running() and sinks.worker_errors == 1
            assert sinks.revive() is False  # its back-off (1 s) has not passed
            assert sinks.revive(time.monotonic() + 1.5) is True
        assert sinks.running() and sinks.pid != first and sinks.restarts == 1
        assert "started again (restart 1)" in caplog.text and "connections in progress (1)" in caplog.text
        sinks.write(gw.packet(pk[-1], 1000.0).frames)  # C: emitted after the resumed handshake
        s2, pk2 = conn(41001, [b"D" * 2000])
        for p in pk2 + [s2.data_fin(0, True, 2000), s2.data_fin(0, False, 0), s2.fin(0, True), s2.fin(0, False)]:
            sinks.write(gw.packet(p, 1001.0).frames)
        for p in [s.data_fin(0, True, 9000), s.data_fin(0, False, 0), s.fin(0, True), s.fin(0, False)]:
            sinks.write(gw.packet(p, 1002.0).frames)
        after = sinks.stats()[0]
        digests = sinks.take_digests()
    finally:
        sinks.close()
    assert after["frames"] > before and after["files"] == 2  # one file each: the second never overwrites
    recs = {r["client_port"]: r for r in gw.drain_records() if r["event"] == "mptcp_connection"}
    assert set(digests) == {recs[41001]["conn_id"]}  # the resumed connection's digests never come
    assert digests[recs[41001]["conn_id"]][0] == hashlib.sha256(b"D" * 2000).hexdigest()

    frames = _conversations(tmp_path / "r")
    syns = [(port, seq) for port, flags, seq, _ in frames if flags & SYN]
    assert [port for port, _ in syns] == [41000, 41000, 41001]
    assert syns[0][1] != syns[1][1]  # the resumed conversation has other ISNs
    c2s: dict[int, list[tuple[int, bytes]]] = {}
    for port, _, seq, data in frames:
        if data:
            c2s.setdefault(port, []).append((seq, data))
    a = b"".join(d for _, d in c2s[41000])
    assert a == b"A" * 3000 + b"C" * 3000  # B went to the dead process
    resumed = [(seq, d) for seq, d in c2s[41000] if d[:1] == b"C"]
    assert resumed[0][0] == (syns[1][1] + 1) & 0xFFFFFFFF  # C starts right after the new SYN
    assert b"".join(d for _, d in c2s[41001]) == b"D" * 2000


def test_a_worker_that_cannot_start_again_is_retried_with_a_growing_back_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The sinks cannot be opened any more (their directory is gone): each new child fails at start,
    which is noticed without the gateway waiting for it, and the next try comes later each time."""
    import shutil

    d = tmp_path / "gone"
    d.mkdir()
    gw = Gateway()
    sinks = RemoteSinks(gw.pipeline, "", str(d / "s"), 100, 3)
    sinks.start()
    try:
        assert sinks._proc is not None
        sinks._proc.kill()
        sinks._proc.wait(5)
        shutil.rmtree(d)
        assert not sinks.running()
        delays = []
        with caplog.at_level(logging.ERROR, logger="mproxy.emitworker"):
            for _ in range(3):
                t0 = time.monotonic()
                assert sinks.revive(sinks._retry_at) is True  # started: the gateway does not wait for it
                deadline = time.monotonic() + 20
                while sinks.running():
                    assert time.monotonic() < deadline, "the failed start was not noticed"
                    time.sleep(0.05)
                delays.append(sinks._retry_at - t0)
        assert sinks.restarts == 3 and sinks.worker_errors == 4
        assert delays[0] < delays[1] < delays[2]
        assert "cannot create" in caplog.text and "could not start" in caplog.text
    finally:
        sinks.close()
    assert sinks.revive(time.monotonic() + 100) is False  # closed: nothing is started again


def test_stats_of_a_worker_that_died_before_answering() -> None:
    """No answer ever came: the counters are empty, not an error."""
    from mproxy.io.emitworker import _add_counts

    assert _add_counts([], []) == []
    base = [{"pcap": "a.0.pcap", "frames": 5, "files": 1, "errors": 0}]
    assert _add_counts(base, []) == base
    assert _add_counts(base, [{"pcap": "a.1.pcap", "frames": 2, "files": 1, "errors": 1}]) == \
        [{"pcap": "a.1.pcap", "frames": 7, "files": 2, "errors": 1}]


def test_flush_reaches_the_pcap_file_without_a_round_trip(tmp_path: Path) -> None:
    """The gateway's tick flushes the child's sinks: the frames are in the pcap file within moments,
    not only when the 1 MiB buffer fills or a stats round trip comes (a crash then loses at most
    about a tick of them)."""
    gw = Gateway(split_passthrough=True)
    sinks = RemoteSinks(gw.pipeline, "", str(tmp_path / "f"), 100, 3)
    sinks.start()
    try:
        for p in traffic()[:-4]:  # open, data: well under the buffer
            sinks.write(gw.packet(p, 1000.0).frames)
        path = tmp_path / "f.0.pcap"
        assert path.stat().st_size == 0  # buffered in the child
        sinks.flush()
        deadline = time.monotonic() + 5
        while path.stat().st_size < 20_000:
            assert time.monotonic() < deadline, path.stat().st_size
            time.sleep(0.02)
        assert sinks.running()
    finally:
        sinks.close()
