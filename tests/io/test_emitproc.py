"""The replay's emitter process: the same bytes as in-process, and failures that are loud, not hangs."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from mproxy.cli import main
from mproxy.core.pipeline import Pipeline
from mproxy.io import emitproc
from mproxy.io.emitproc import EmitProcessError
from mproxy.io.pcap import PcapWriter
from mproxy.replay import replay
from mproxy.wire.packet import LinkType

from ..core.session import Session

SAMPLE = Path(__file__).resolve().parents[2] / "mproxy" / "samples" / "split-attack.pcap"
CAPTURES = Path(__file__).resolve().parents[2].parent / "shared" / "captures"


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two connections over two subflows each, interleaved, ~1500 packets (several batches)."""
    sessions = [Session(1, sport=40000), Session(0, sport=41000, client_key=0x5555, server_key=0x6666)]
    pk: list[bytes] = []
    for s in sessions:
        pk += s.handshake() + s.join(1)
    offs = [[0, 0], [0, 0]]
    for i in range(1500):
        k = i % 2
        s = sessions[k]
        c2s = i % 11 != 5
        d = 0 if c2s else 1
        n = 1448 if c2s else 200
        pk.append(s.data((i // 2) % 2, c2s, offs[k][d], bytes((i + j) & 0xFF for j in range(n))))
        offs[k][d] += n
    for k, s in enumerate(sessions):
        pk += [s.data_fin(0, True, offs[k][0]), s.data_fin(0, False, offs[k][1]), s.fin(0, True), s.fin(0, False)]
    path = tmp_path_factory.mktemp("cap") / "two.pcap"
    with path.open("wb") as f:
        w = PcapWriter(f, linktype=int(LinkType.RAW))
        for i, p in enumerate(pk):
            w.write(1000.0 + i / 1000, p)
    return path


def _replay(inputs: list[Path], tmp: Path, tag: str, **kw: Any) -> tuple[bytes, str, Any]:
    out, log = tmp / f"{tag}.pcap", tmp / f"{tag}.jsonl"
    with out.open("wb") as o, log.open("w") as lg:
        res = replay([str(p) for p in inputs], o, lg, **kw)
    return out.read_bytes(), log.read_text(), res


def _no_zombies() -> bool:
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == me and fields[0] == "Z":
            return False
    return True


def test_same_bytes_as_in_process(capture: Path, tmp_path: Path) -> None:
    inputs = [[capture], [SAMPLE]]
    if CAPTURES.is_dir():
        inputs += [[CAPTURES / "v0-client-4subflows.pcap"], [CAPTURES / "v0-client-4subflows.pcap", CAPTURES / "mptcp-v1.pcap"]]
    for i, ins in enumerate(inputs):
        a_pcap, a_log, a = _replay(ins, tmp_path, f"a{i}", emit_process=False)
        b_pcap, b_log, b = _replay(ins, tmp_path, f"b{i}", emit_process=True)
        assert a_pcap == b_pcap and a_log == b_log and len(a_pcap) > 1000
        sa, sb = a.pipeline.stats, b.pipeline.stats
        assert (sa.emitted_frames, sa.passthrough_frames, sa.bytes_out) == (sb.emitted_frames, sb.passthrough_frames,
                                                                             sb.bytes_out)
        assert sa.emitted_frames > 0 and (a.frames, a.connections) == (b.frames, b.connections)
    assert _no_zombies()


def test_cli_uses_it_and_can_turn_it_off(capture: Path, tmp_path: Path) -> None:
    outs = []
    for flag in ("--emit-process", "--no-emit-process"):
        out = tmp_path / f"{flag}.pcap"
        assert main(["replay", str(capture), "--out", str(out), "-q", flag]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def _child_killed_after_first_batch(ops_fd: int, *_args: Any) -> int:
    emitproc._recv(ops_fd)
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


@pytest.mark.timeout(60)
def test_child_death_is_an_error_not_a_hang(capture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(emitproc, "_child", _child_killed_after_first_batch)  # the fork inherits it
    with pytest.raises(EmitProcessError, match="killed by SIGKILL"):
        _replay([capture], tmp_path, "killed", emit_process=True)
    assert _no_zombies()
    rc = main(["replay", str(capture), "--out", str(tmp_path / "cli.pcap"), "-q", "--emit-process"])
    err = capsys.readouterr().err
    assert rc == 1 and "emitter process killed by SIGKILL" in err and "incomplete" in err and "Traceback" not in err
    assert _no_zombies()


@pytest.mark.timeout(60)
def test_child_that_exits_early(capture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emitproc, "_child", lambda *a: 5)
    with pytest.raises(EmitProcessError, match="exited with status 5"):
        _replay([capture], tmp_path, "early", emit_process=True)
    assert _no_zombies()


@pytest.mark.timeout(60)
def test_child_that_cannot_write_says_why(capture: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "wb") as out, pytest.raises(EmitProcessError, match="No space left on device"):
        replay([str(capture)], out, None, emit_process=True)
    assert main(["replay", str(capture), "--out", "/dev/full", "-q", "--emit-process"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert _no_zombies()
    assert main(["replay", str(capture), "--out", "/dev/full", "-q", "--no-emit-process"]) == 1  # in-process too
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err


@pytest.mark.timeout(60)
def test_parent_failure_stops_the_child(capture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    feed = Pipeline.feed

    def failing(self: Pipeline, *a: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 700:
            raise RuntimeError("boom")
        return feed(self, *a)

    monkeypatch.setattr(Pipeline, "feed", failing)
    with pytest.raises(RuntimeError, match="boom"):
        _replay([capture], tmp_path, "boom", emit_process=True)
    assert _no_zombies()


def test_bad_input_fails_before_the_fork(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all")
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked for a bad input"))
    assert main(["replay", str(bad), "--out", str(tmp_path / "o.pcap"), "-q", "--emit-process"]) == 2


def test_empty_capture(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pcap"
    with empty.open("wb") as f:
        PcapWriter(f)
    a, _, _ = _replay([empty], tmp_path, "e1", emit_process=True)
    b, _, _ = _replay([empty], tmp_path, "e2", emit_process=False)
    assert a == b and len(a) == 24


def test_in_memory_outputs_stay_in_process(capture: Path) -> None:
    """A forked child cannot write into this process's BytesIO: the default stays in-process."""
    out, log = io.BytesIO(), io.StringIO()
    res = replay([str(capture)], out, log)
    assert len(out.getvalue()) > 10_000 and log.getvalue().count("mptcp_connection") == 2
    assert res.pipeline.tracker.stream_hash
    with pytest.raises(ValueError, match="file descriptors"):
        replay([str(capture)], io.BytesIO(), None, emit_process=True)


def test_no_fork_while_other_threads_run(capture: Path, tmp_path: Path) -> None:
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        _, _, res = _replay([capture], tmp_path, "threads")
    finally:
        stop.set()
        t.join()
    assert res.pipeline.tracker.stream_hash  # hashed here: no emitter process


def test_not_running() -> None:
    p = emitproc.EmitProcess(io.BytesIO())
    with pytest.raises(EmitProcessError):
        p.send([])
    with pytest.raises(EmitProcessError):
        p.close()
    p.abort()


@pytest.mark.timeout(60)
def test_log_written_by_the_child_and_its_errors(capture: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """With the emitter process the child writes the log (and fills in the stream hashes the
    tracking process no longer computes): the same lines; a log it cannot write is an error."""
    a_pcap, a_log, a = _replay([capture], tmp_path, "la", emit_process=False)
    b_pcap, b_log, b = _replay([capture], tmp_path, "lb", emit_process=True)
    assert a_log == b_log and '"sha256":"' in b_log and '"sha256":null' not in b_log
    assert b.pipeline.tracker.stream_hash is False and a.pipeline.tracker.stream_hash is True
    if os.path.exists("/dev/full"):
        rc = main(["replay", str(capture), "--out", str(tmp_path / "o.pcap"), "--log", "/dev/full", "-q",
                   "--emit-process"])
        err = capsys.readouterr().err
        assert rc == 1 and "No space left on device" in err and "Traceback" not in err
        assert _no_zombies()
