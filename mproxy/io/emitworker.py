"""The emitter and the sinks in a second process, fed with the pipeline's emission ops.

Turning released bytes into 1460-byte segments with checksums, each followed
by an ACK, and writing them to the sink costs more CPU than everything else
the live gateway does per byte (tracking, reassembly, inspection, verdicts).
With ``[sink] worker = true`` the gateway's pipeline records emission ops
(:class:`~mproxy.core.pipeline.Emission`: plain tuples) instead of applying
them, and :class:`RemoteSinks` ships them, batched, over a pipe to a
child process that runs its own Emission and the configured sinks. The verdict
path no longer waits on the emitter, and a second core does that work.

The child handles messages in order, so a ``stats`` request answered by it
also means everything sent before has been written. Sending blocks when the
child falls behind (back-pressure: the queue absorbs it, then fail-open or
fail-closed decides) rather than dropping ops, which would leave the emitted
conversations inconsistent.

If the child dies, verdicts go on and the gateway starts another
(:meth:`RemoteSinks.revive`, from its tick; after 1 s, doubling to 30 s while
children keep dying young). The new child takes over the conversations in
progress mid-stream (``resume`` ops: a new handshake, then their data from
that point on), so the IDS keeps seeing every connection; what was shipped
to the dead one and not written is lost, and those connections' records
have ``sha256`` null. The child is spawned, not forked: it starts from a
fresh interpreter and holds none of the gateway's descriptors (queue socket,
metrics listener, the control channel), also when it is started again late
in the gateway's life, with threads running.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from ..core.pipeline import Emission, Frames, Pipeline
from ..core.streamhash import Digests, StreamHashes
from .backoff import RestartBackoff
from .sinks import SinkError, open_sinks

__all__ = ["RemoteSinks"]

log = logging.getLogger("mproxy.emitworker")
START_TIMEOUT = 15.0
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SUMMED = ("frames", "bytes", "dropped", "too_big", "errors", "files")  # sink counters carried across children


def _child(conn: Connection, sink_args: tuple[str, str, int, int], mss: int, passthrough_mss: int | None,
           hash_streams: bool = False) -> None:
    """The worker: ops in, frames out to the sinks; ``flush`` flushes them; answers ``stats`` and
    ``close`` in order, with the stream digests of the connections closed since the last answer
    (``hash_streams``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        sinks = open_sinks(*sink_args)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", str(e)))
        return
    conn.send(("ready",))
    em = Emission(mss, passthrough_mss)
    hashes = StreamHashes() if hash_streams else None
    try:
        while True:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the gateway is gone (closed, or reset with our answer unread)
                break
            kind = msg[0]
            if kind == "b":
                frames = em.apply(msg[1])
                if hashes is not None:
                    hashes.update(msg[1])
                if msg[2]:
                    frames += msg[2]
                if frames:
                    sinks.write(frames)
            elif kind == "flush":
                sinks.flush()
            elif kind in ("stats", "close"):
                sinks.flush()
                try:
                    conn.send((sinks.stats(), em.frames, em.passthrough,
                               hashes.take_done() if hashes is not None else {}))
                except OSError:
                    break
                if kind == "close":
                    break
    finally:
        sinks.close()
        conn.close()


def _exit_text(code: int | None) -> str:
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"


def _add_counts(base: list[dict[str, Any]], last: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sink counters of a dead child added to the next one's, so they never go down."""
    if not base:
        return last
    if not last:
        return base
    out = []
    for b, cur in zip(base, last):
        d = dict(cur)
        for k in _SUMMED:
            if k in b:
                d[k] = b[k] + cur.get(k, 0)
        out.append(d)
    return out


class RemoteSinks:
    """FrameSinks look-alike: ``write`` ships the pipeline's pending ops and the given frames to the child."""

    def __init__(self, pipeline: Pipeline, interface: str, pcap: str, rotate_mb: int, keep: int,
                 hash_streams: bool = False) -> None:
        """``hash_streams``: the child hashes the released bytes (the tracker then keeps no hashes);
        each answer brings the digests of the connections closed before it (:meth:`take_digests`)."""
        self.pipeline = pipeline
        self.hash_streams = hash_streams
        self.digests: Digests = {}
        self.sink_args = (interface, pcap, rotate_mb, keep)
        self.worker_errors = 0  # children lost (died, stopped answering, failed to start again)
        self.restarts = 0  # children started after one was lost
        self.batches = 0
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._starting = False  # its "ready" (or the error that stops it) not read yet
        self._last: list[dict[str, Any]] = []  # the running child's last sink counters
        self._base: list[dict[str, Any]] = []  # the dead children's
        self._frames = (0, 0)  # the running child's emitted and passed-through frames
        self._frames_base = (0, 0)
        self._started = 0.0
        self._backoff = RestartBackoff()
        self._retry_at = 0.0
        self._wanted = False  # started and not closed: a dead child is replaced
        self._start_error = ""

    def start(self) -> None:
        """Start the child and wait until it has opened the sinks; raises the SinkError it met."""
        self._launch(time.monotonic())
        if not self._await_ready(START_TIMEOUT):
            raise SinkError(self._start_error)
        self._wanted = True
        self.pipeline.remote = []
        log.info("emitter process %s writes the sinks", self.pid)

    def revive(self, now: float | None = None) -> bool:
        """Start another child if the last one was lost and its back-off has passed. It takes over the
        conversations in progress (:meth:`Pipeline.resume_ops`); the ops go out at once and wait in
        the pipe while it starts, so the gateway never waits for it. True when one was started."""
        if not self._wanted or self.running():
            return False
        now = time.monotonic() if now is None else now
        if now < self._retry_at:
            return False
        self._started = now  # a try that fails at once counts as dying young too
        try:
            self._launch(now)
        except SinkError as e:
            self._lost(str(e), now)
            return False
        self.restarts += 1
        resume = self.pipeline.resume_ops(self.restarts, time.time())
        log.warning("emitter process %s started again (restart %d): connections in progress (%d) go on in "
                    "the emitted stream from here, each with a new handshake, and are logged with sha256 null",
                    self.pid, self.restarts, sum(op[0] == "resume" for op in resume))
        self._send(("b", resume, []))
        return True

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---------------------------------------------------------------- FrameSinks interface
    def write(self, frames: Frames) -> None:
        """Ship the ops the pipeline gathered since the last call, and ``frames`` (made outside it)."""
        ops = self.pipeline.take_ops()
        if ops or frames:
            self._send(("b", ops, frames))
            self.batches += 1

    def pump(self) -> None:
        self.write([])

    def flush(self) -> None:
        """Ship what is pending and have the child flush its sinks (the gateway's tick: a pcap sink
        then holds at most about a second of frames in its buffer, as in one process)."""
        self.pump()
        self._send(("flush",))

    def stats(self) -> list[dict[str, Any]]:
        """The sink counters, the dead children's included (a round trip: everything sent before
        is written by then)."""
        self.pump()
        if self._send(("stats",)):
            self._receive_stats()
        return _add_counts(self._base, self._last)

    def take_digests(self) -> Digests:
        """The digests the answers brought since the last call."""
        d, self.digests = self.digests, {}
        return d

    def running(self) -> bool:
        """Is the child there? (A child that died is noticed here even when nothing is sent; so is
        one that started again and could not open the sinks.)"""
        proc = self._proc
        if self._conn is not None and proc is not None:
            if self._starting:
                self._await_ready(0.0)
            elif proc.poll() is not None:
                self._failed(f"it exited ({_exit_text(proc.returncode)})")
        return self._conn is not None

    def close(self) -> None:
        self._wanted = False
        if self._conn is not None:
            self.pump()
            if self._send(("close",)):
                self._receive_stats()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._reap(wait=10.0)

    def __bool__(self) -> bool:
        return True

    # ---------------------------------------------------------------- internals
    def _launch(self, now: float) -> None:
        """A fresh interpreter (not a fork: it holds none of our descriptors, whenever it starts) running
        :func:`_child` on one end of a socket pair."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        p = self.pipeline
        args = json.dumps([list(self.sink_args), p.mss, p.passthrough_mss, self.hash_streams])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if x)
        try:
            proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno()), args],
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # a terminal's Ctrl-C is for the gateway
        except OSError as e:
            ours.close()
            raise SinkError(f"the emitter process could not be started: {e}") from None
        finally:
            theirs.close()
        self._conn, self._proc, self._started, self._starting = Connection(ours.detach()), proc, now, True
        self._start_error = ""

    def _await_ready(self, timeout: float) -> bool:
        """Read the child's first message: "ready", or the error that stopped it (then it is lost)."""
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            return False
        if not self._starting:
            return True
        try:
            if not conn.poll(timeout):
                if timeout > 0:
                    self._failed("it did not start", start=True)
                elif proc.poll() is not None:
                    self._failed(f"it exited at start ({_exit_text(proc.returncode)})", start=True)
                return False
            reply = conn.recv()
        except (OSError, EOFError):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self._failed(f"it exited at start ({_exit_text(proc.returncode)})", start=True)
            return False
        if reply[0] != "ready":
            self._failed(reply[1], start=True)
            return False
        self._starting = False
        return True

    def _send(self, msg: tuple[Any, ...]) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
            return True
        except (OSError, EOFError, ValueError) as e:
            self._failed(f"sending to it failed: {e}")
            return False

    def _receive_stats(self) -> None:
        if not self._await_ready(START_TIMEOUT):
            return
        conn = self._conn
        if conn is None:
            return
        try:
            if not conn.poll(10):
                self._failed("it did not answer within 10 s")
                return
            reply = conn.recv()
        except (OSError, EOFError) as e:
            self._failed(f"reading from it failed: {e}")
            return
        sinks, frames, passthrough, digests = reply
        self._last = sinks
        self._frames = (frames, passthrough)
        if digests:
            self.digests.update(digests)
        st = self.pipeline.stats
        st.emitted_frames = self._frames_base[0] + frames
        st.passthrough_frames = self._frames_base[1] + passthrough

    def _failed(self, why: str, start: bool = False) -> None:
        """The child is lost: stop sending (ops keep being taken and dropped, so nothing piles up)
        until :meth:`revive` starts another; keep its counters."""
        self._base = _add_counts(self._base, self._last)
        self._frames_base = (self._frames_base[0] + self._frames[0], self._frames_base[1] + self._frames[1])
        self._last, self._frames = [], (0, 0)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._reap(wait=0.0)  # one that stopped answering is not waited for
        if start and not self._wanted:
            self._start_error = why  # start() raises it
            return
        self._lost(why if not start else f"it could not start: {why}", time.monotonic())

    def _lost(self, why: str, now: float) -> None:
        self.worker_errors += 1
        delay = self._backoff.after_death(self._started, now)
        self._retry_at = now + delay
        log.error("emitter process: %s; the emitted stream stops (verdicts go on)%s", why,
                  f" until another is started in {delay:.0f} s" if self._wanted else "")

    def _reap(self, wait: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _main(argv: list[str]) -> int:
    """``python -m mproxy.io.emitworker FD ARGS``: the child, started by :class:`RemoteSinks`."""
    from ..gcpolicy import tune

    tune()
    sink_args, mss, passthrough_mss, hash_streams = json.loads(argv[1])
    _child(Connection(int(argv[0])), tuple(sink_args), mss, passthrough_mss, hash_streams)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
