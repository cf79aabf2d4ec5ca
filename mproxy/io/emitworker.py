"""The emitter and the sinks in a second process, fed with the pipeline's emission ops.

Turning released bytes into 1460-byte segments with checksums, each followed
by an ACK, and writing them to the sink costs more CPU than everything else
the live gateway does per byte (tracking, reassembly, inspection, verdicts).
With ``[sink] worker = true`` the gateway's pipeline records emission ops
(:class:`~mproxy.core.pipeline.Emission`: plain tuples) instead of applying
them, and :class:`RemoteSinks` ships them, batched, over a socketpair to a
forked child that runs its own Emission and the configured sinks. The verdict
path no longer waits on the emitter, and a second core does that work.

The child handles messages in order, so a ``stats`` request answered by it
also means everything sent before has been written. Sending blocks when the
child falls behind (back-pressure: the queue absorbs it, then fail-open or
fail-closed decides) rather than dropping ops, which would leave the emitted
conversations inconsistent. If the child dies, emission stops: counted in
``worker_errors`` and logged once; verdicts go on.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
from multiprocessing.connection import Connection
from typing import Any

from ..core.pipeline import Emission, Frames, Pipeline
from ..core.streamhash import Digests, StreamHashes
from .sinks import SinkError, open_sinks

__all__ = ["RemoteSinks"]

log = logging.getLogger("mproxy.emitworker")


def _child(conn: Connection, sink_args: tuple[str, str, int, int], mss: int, passthrough_mss: int | None,
           inherited: tuple[Any, ...] = (), hash_streams: bool = False) -> None:
    """The worker: ops in, frames out to the sinks; answers ``stats`` and ``close`` in order, with
    the stream digests of the connections closed since the last answer (``hash_streams``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for obj in inherited:  # the parent's end of our pipe (else its death is no EOF here), its sockets
        obj.close()
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
            except EOFError:
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
            elif kind in ("stats", "close"):
                sinks.flush()
                conn.send((sinks.stats(), em.frames, em.passthrough,
                           hashes.take_done() if hashes is not None else {}))
                if kind == "close":
                    break
    finally:
        sinks.close()
        conn.close()


def _exit_text(code: int | None) -> str:
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"


class RemoteSinks:
    """FrameSinks look-alike: ``write`` ships the pipeline's pending ops and the given frames to the child."""

    def __init__(self, pipeline: Pipeline, interface: str, pcap: str, rotate_mb: int, keep: int,
                 inherited: tuple[Any, ...] = (), hash_streams: bool = False) -> None:
        """``hash_streams``: the child hashes the released bytes (the tracker then keeps no hashes);
        each answer brings the digests of the connections closed before it (:meth:`take_digests`)."""
        self.pipeline = pipeline
        self.hash_streams = hash_streams
        self.digests: Digests = {}
        self.inherited = inherited  # the parent's sockets the child must not hold open (closed there)
        self.sink_args = (interface, pcap, rotate_mb, keep)
        self.worker_errors = 0
        self.batches = 0
        self._conn: Connection | None = None
        self._proc: Any = None
        self._last: list[dict[str, Any]] = []

    def start(self) -> None:
        """Fork the child, which opens the sinks; raises the SinkError it met."""
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=True)
        p = self.pipeline
        proc = ctx.Process(target=_child, args=(child, self.sink_args, p.mss, p.passthrough_mss,
                                                (parent, *self.inherited), self.hash_streams),
                           name="mproxy-emit", daemon=True)
        proc.start()
        child.close()
        if not parent.poll(15):
            proc.kill()
            raise SinkError("the emitter process did not start")
        reply = parent.recv()
        if reply[0] != "ready":
            proc.join(5)
            raise SinkError(reply[1])
        self._conn, self._proc = parent, proc
        p.remote = []
        log.info("emitter process %d writes the sinks", proc.pid)

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
        self.pump()

    def stats(self) -> list[dict[str, Any]]:
        """The child's sink counters (a round trip: everything sent before is written by then)."""
        self.pump()
        if self._send(("stats",)):
            self._receive_stats()
        return self._last

    def take_digests(self) -> Digests:
        """The digests the answers brought since the last call."""
        d, self.digests = self.digests, {}
        return d

    def running(self) -> bool:
        """Is the child still there? (A child that died is noticed here even when nothing is sent.)"""
        proc = self._proc
        if self._conn is not None and proc is not None and not proc.is_alive():
            self._failed(f"it exited ({_exit_text(proc.exitcode)})")
        return self._conn is not None

    def close(self) -> None:
        if self._conn is None:
            return
        self.pump()
        if self._send(("close",)):
            self._receive_stats()
        self._conn.close()
        self._conn = None
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
            self._proc = None

    def __bool__(self) -> bool:
        return True

    # ---------------------------------------------------------------- internals
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
        if digests:
            self.digests.update(digests)
        st = self.pipeline.stats
        st.emitted_frames, st.passthrough_frames = frames, passthrough

    def _failed(self, why: str) -> None:
        """The child is gone: log once, stop sending (ops keep being taken and dropped, so nothing piles up)."""
        self.worker_errors += 1
        if self.worker_errors == 1:
            log.error("emitter process: %s; the emitted stream stops (verdicts go on)", why)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
