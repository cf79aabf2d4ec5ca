"""The emitter process: ops shipped from the gateway come out of its sinks as the in-process pipeline emits them."""

from __future__ import annotations

import logging
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
    sinks._proc.kill()
    sinks._proc.join(5)
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
    end of the pipe (else the parent's death is no end of file there) nor the sockets it is told about."""
    import socket

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sinks = RemoteSinks(Gateway().pipeline, "", str(tmp_path / "orphan"), 100, 3, inherited=(theirs,))
    sinks.start()
    proc = sinks._proc
    theirs.close()  # now only the child could still hold it
    mine.setblocking(False)
    assert mine.recv(1) == b""  # end of file: nobody holds the other end
    assert sinks._conn is not None
    sinks._conn.close()  # what the kernel does to a killed parent's descriptors
    proc.join(5)
    assert not proc.is_alive()
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
