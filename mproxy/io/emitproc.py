"""The replay's emitter and pcap writer in a forked child: emission ops in over a pipe, pcap out.

A replay is two halves of about equal cost per packet: reading, parsing and
tracking, and turning released bytes into checksummed segments (each with its
ACK) written as pcap records. On two cores they overlap. The parent's pipeline
gathers emission ops (:class:`~mproxy.core.pipeline.Pipeline` remote mode, the
same plain tuples :mod:`mproxy.io.emitworker` ships for the live gateway);
:class:`EmitProcess` sends them marshalled, in batches, and the child applies them
in order to its own :class:`~mproxy.core.pipeline.Emission`: the frames are the
ones an in-process replay writes, byte for byte.

Failure is loud and bounded: if the child dies (or cannot write), the parent's
next send, or the final handshake, raises :class:`EmitProcessError` with the
child's message or exit status. A full pipe blocks the parent (back-pressure,
memory stays flat); the parent never waits on a child that is gone, because
each side holds only its own ends of the pipes.
"""

from __future__ import annotations

import fcntl
import json
import marshal
import os
import signal
from typing import IO, Any

from ..core.pipeline import Emission, Op
from ..core.streamhash import StreamHashes, fill_record
from .pcap import PcapWriter

__all__ = ["EmitProcess", "EmitProcessError"]

_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), not exported by every Python build
_PIPE_SIZE = 1 << 20  # a batch or two in flight; the default 64 KiB costs a context switch per 64 KiB
_PARENT_GONE = 3
# Messages: 8-byte little-endian length, then marshal data. marshal (built in: no import at start-up,
# faster than pickle) carries the ops' plain tuples and the log records' JSON values; both ends are us.


class EmitProcessError(Exception):
    """The emitter process failed; the message says how (the output is incomplete)."""


def _send(fd: int, obj: Any) -> None:
    data = marshal.dumps(obj)
    bufs: list[bytes | memoryview] = [len(data).to_bytes(8, "little"), data]
    while bufs:
        n = os.writev(fd, bufs)
        while bufs and n >= len(bufs[0]):
            n -= len(bufs.pop(0))
        if bufs and n:
            bufs[0] = memoryview(bufs[0])[n:]


def _recv(fd: int) -> Any:
    """One message; EOFError when the other end is closed (between messages or inside one)."""
    size = int.from_bytes(_read(fd, 8), "little")
    return marshal.loads(_read(fd, size))


def _read(fd: int, n: int) -> bytes | bytearray:
    first = os.read(fd, n)
    if len(first) == n:
        return first
    buf = bytearray(first)
    while len(buf) < n:
        more = os.read(fd, n - len(buf))
        if not more:
            raise EOFError
        buf += more
    return buf


def json_line(rec: dict[str, Any]) -> str:
    """One record of the JSON-lines log."""
    return json.dumps(rec, separators=(",", ":")) + "\n"


def _child(ops_fd: int, reply_fd: int, out: IO[bytes], log: IO[str] | None, mss: int, passthrough_mss: int | None,
           fill_hashes: bool) -> int:
    """The child's loop: ``(ops, records)`` per message, ``None`` to finish. Returns the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; its exit closes the pipe
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    em = Emission(mss, passthrough_mss)
    hashes = StreamHashes() if fill_hashes else None
    try:
        writer = PcapWriter(out)
        while True:
            try:
                msg = _recv(ops_fd)
            except EOFError:
                out.flush()
                return _PARENT_GONE
            if msg is None:
                break
            ops, records = msg
            writer.write_frames(em.apply(ops))
            if hashes is not None:
                hashes.update(ops)
                # a record is sent with the batch holding its connection's close op
                done = hashes.take_done()
            for rec in records:
                if hashes is not None and rec["event"] == "mptcp_connection":
                    fill_record(rec, done)
                if log is not None:
                    log.write(json_line(rec))
        writer.flush()
        if log is not None:
            log.flush()
    except OSError as e:
        _send(reply_fd, ("error", f"cannot write: {e.strerror or e}"))
        return 1
    _send(reply_fd, ("done", em.frames, em.passthrough))
    return 0


class EmitProcess:
    """Handle on the child: :meth:`start`, :meth:`send` op batches, :meth:`close` (or :meth:`abort`)."""

    def __init__(self, out: IO[bytes], log: IO[str] | None = None, *, mss: int = 1460,
                 passthrough_mss: int | None = None, fill_hashes: bool = False) -> None:
        """``log``: the child writes the records sent with each batch there; ``fill_hashes``: the
        tracker keeps no stream hashes (``Tracker.stream_hash`` off), the child fills in each
        mptcp_connection record's ``sha256`` from the data ops it saw."""
        self.out = out
        self.log = log
        self.mss = mss
        self.passthrough_mss = passthrough_mss
        self.fill_hashes = fill_hashes
        self.pid = 0
        self.batches = 0
        self._ops = -1  # our ends of the two pipes
        self._reply = -1

    def start(self) -> None:
        """Fork the child. Call before writing anything to ``out`` from this process."""
        self.out.flush()  # nothing buffered may be written twice (once per process)
        if self.log is not None:
            self.log.flush()
        ops_r, ops_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            fcntl.fcntl(ops_w, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size: the default size only costs context switches
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 70
            try:
                os.close(ops_w)
                os.close(reply_r)
                code = _child(ops_r, reply_w, self.out, self.log, self.mss, self.passthrough_mss, self.fill_hashes)
            except BaseException:  # noqa: BLE001 - reported by the exit code
                code = 70
            finally:
                os._exit(code)
        os.close(ops_r)
        os.close(reply_w)
        self.pid = pid
        self._ops, self._reply = ops_w, reply_r

    def send(self, ops: list[Op], records: list[dict[str, Any]] = []) -> None:  # noqa: B006 - not mutated
        """Ship one batch: ops, then the log records made with them (blocks while the child is a
        pipe's worth behind)."""
        if self._ops < 0:
            raise EmitProcessError("the emitter process is not running")
        try:
            _send(self._ops, (ops, records))
        except OSError:
            self._fail()
        self.batches += 1

    def close(self) -> tuple[int, int]:
        """Finish: everything sent is written and flushed. Returns (frames, passthrough frames)."""
        if self._ops < 0:
            raise EmitProcessError("the emitter process is not running")
        try:
            _send(self._ops, None)
            reply: Any = _recv(self._reply)
        except (OSError, EOFError):
            self._fail()
        code = self._reap()
        if reply[0] != "done":
            raise EmitProcessError(f"emitter process: {reply[1]}")
        if code != 0:
            raise EmitProcessError(f"emitter process {_status(code)}")
        return reply[1], reply[2]

    def abort(self) -> None:
        """Stop the child now (the parent failed); the output is left as it is."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap()

    # ---------------------------------------------------------------- internals
    def _reap(self) -> int:
        for fd in (self._ops, self._reply):
            if fd >= 0:
                os.close(fd)
        self._ops = self._reply = -1
        pid, self.pid = self.pid, 0
        if not pid:
            return 0
        _pid, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def _fail(self) -> Any:
        """The pipe broke: the child's own message if it left one, else its exit status."""
        msg = None
        try:
            os.set_blocking(self._reply, False)  # what it wrote before exiting is there, or nothing is
            got = _recv(self._reply)
            if got[0] == "error":
                msg = got[1]
        except (OSError, EOFError, ValueError, TypeError, IndexError):
            pass
        code = self._reap()
        raise EmitProcessError(f"emitter process: {msg}" if msg else f"emitter process {_status(code)}")


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
