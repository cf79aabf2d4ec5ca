"""The ``replay`` job: captures in, emitted pcap and JSON-lines log out."""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from .core.pipeline import Pipeline
from .core.tracker import TrackerConfig
from .io.emitproc import EmitProcess, EmitProcessError, json_line
from .io.pcap import CaptureError, CaptureReader, Frame, PcapWriter, read_captures

if TYPE_CHECKING:
    from .core.inspector import Inspector


_BATCH_MASK = 0xFF  # emit every 256 input packets


@dataclass(slots=True)
class ReplayResult:
    frames: int
    connections: int
    notices: int
    problems: list[str]
    pipeline: Pipeline
    signatures: int = 0  # inspector matches (``inspector`` given)


class _Progress:
    """A one-line progress bar on stderr, only when it is a terminal."""

    def __init__(self, readers: list[CaptureReader], enabled: bool) -> None:
        self.readers = readers
        self.enabled = enabled
        self.last = 0.0

    def tick(self, frames: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.25:
            return
        self.last = now
        if not all(r.size for r in self.readers):  # a pipe: how much is to come is unknown
            sys.stderr.write(f"\r{frames} frames")
        else:
            total = sum(r.size for r in self.readers)
            pct = min(100.0, 100.0 * sum(r.progress() for r in self.readers) / total)
            bar = "#" * int(pct / 4)
            sys.stderr.write(f"\r[{bar:<25}] {pct:5.1f}% {frames} frames")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")


def replay(inputs: list[str], out: IO[bytes], log: IO[str] | None = None,
           config: TrackerConfig | None = None, progress: bool = False, *, log_keys: bool = False,
           emit_process: bool | None = None, inspector: Inspector | None = None,
           pin_interfaces: bool = False) -> ReplayResult:
    """Replay captures through the core; raises CaptureError for unreadable inputs.

    MPTCP keys (``*_key`` fields) are left out of the log unless ``log_keys``: with them anyone
    reading the log could forge MP_JOINs and MP_FASTCLOSEs for connections still open.

    ``emit_process``: emit and write the pcap (and the log) in a second process
    (:mod:`mproxy.io.emitproc`: the same bytes; raises EmitProcessError if it fails); default: when
    two CPUs are available, ``out`` and ``log`` are files (not in-memory buffers) and no other
    thread runs.

    ``inspector``: match its rules on every MPTCP connection's rebuilt stream (as the live gateway
    does), one ``signature`` record per match.

    ``pin_interfaces``: read each frame's interface from a Linux cooked v2 header, for the
    tracker's ``pin_interfaces`` (one input only). Off by default: a router without mproxy forwarded
    what came in on the wrong side (its receiver read it), and ``tcpdump -i any`` records a packet
    twice on a VLAN, bridge or bond (on the master and the port)."""
    files = _has_fd(out) and (log is None or _has_fd(log))  # a forked child writes through descriptors
    if emit_process is None:
        emit_process = files and _cpus() > 1 and not _threads()
    elif emit_process and not files:
        raise ValueError("the emitter process writes to files: out and log need file descriptors")
    pipe = Pipeline(config)
    pipe.inspector = inspector
    if pin_interfaces and len(inputs) != 1:
        raise ValueError("pin_interfaces takes one input: interface numbers are each capture host's own")
    pipe.link_ifaces = pin_interfaces
    if emit_process or log is None:  # the child hashes the streams for the log; without a log nobody reads them
        pipe.tracker.stream_hash = False
    pipe.remote = []  # ops gathered and emitted every _BATCH_MASK + 1 packets: runs of releases per emitter call
    readers: list[CaptureReader] = []
    frames: Iterator[Frame] = read_captures(inputs, readers)
    child: EmitProcess | None = None
    writer: PcapWriter | None = None
    if emit_process:
        first = next(frames, None)  # every input opened and checked: a bad one fails before the fork
        frames = itertools.chain(() if first is None else (first,), frames)
        child = EmitProcess(out, log, mss=pipe.mss, passthrough_mss=pipe.passthrough_mss,
                            fill_hashes=log is not None)
        child.start()
    else:
        writer = PcapWriter(out)
    prog = _Progress(readers, progress)
    n = conns = notices = signatures = 0
    pending: list[dict[str, Any]] = []  # log records for the child, sent with their batch's ops

    def write_records() -> None:
        nonlocal conns, notices, signatures
        for rec in pipe.drain_records():
            ev = rec["event"]
            if ev == "mptcp_connection":
                conns += 1
            elif ev == "signature":
                signatures += 1
            else:
                notices += 1
            if log is not None:
                if not log_keys:
                    rec = {k: v for k, v in rec.items() if not k.endswith("_key")}
                if child is not None:
                    pending.append(rec)
                else:
                    log.write(json_line(rec))

    def emit() -> None:
        if child is not None:
            ops = pipe.take_ops()
            if ops or pending:
                child.send(ops, pending)
                pending.clear()
        elif writer is not None:
            writer.write_frames(pipe.emit_pending())

    feed = pipe.feed
    try:
        try:
            for fr in frames:
                n += 1
                feed(fr.linktype, fr.data, fr.ts)
                if pipe.records:
                    write_records()
                if not n & _BATCH_MASK:
                    emit()
                    if not n & 0x3FF:
                        prog.tick(n)
        finally:
            prog.done()
        pipe.finish()
        write_records()
        emit()
        if child is not None:
            pipe.stats.emitted_frames, pipe.stats.passthrough_frames = child.close()
        elif writer is not None:
            writer.flush()
    except BaseException:
        if child is not None:
            child.abort()
        raise
    problems = [p for r in readers for p in r.problems]
    return ReplayResult(n, conns, notices, problems, pipe, signatures)


def _has_fd(f: IO[Any]) -> bool:
    try:
        f.fileno()
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both of the first two
        return False
    return True


def _threads() -> bool:
    """Other threads running? (Forking then could copy a lock one of them holds.) Without the
    threading module imported there are none to ask about, and it is not imported for this."""
    threading = sys.modules.get("threading")
    return threading is not None and threading.active_count() > 1


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def summary_lines(res: ReplayResult) -> list[str]:
    st = res.pipeline.tracker.stats
    ps = res.pipeline.stats
    lines = [
        f"{res.frames} frames: {st.mptcp_packets} MPTCP, {st.plain_packets} plain TCP, "
        f"{ps.non_tcp} other, {sum(ps.parse_errors.values())} unparsable",
        f"{res.connections} MPTCP connections ({st.joins} joined subflows), "
        f"rebuilt {ps.bytes_out[0]} bytes client->server and {ps.bytes_out[1]} server->client",
    ]
    fr = ps.defrag
    if fr.fragments:
        lines.append(f"IP fragments: {fr.fragments}, {fr.reassembled} datagrams reassembled"
                     + ("; dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(fr.dropped.items()))
                        if fr.dropped else ""))
    if st.notices:
        lines.append("notices: " + ", ".join(f"{k} {v}" for k, v in sorted(st.notices.items())))
    bad = st.bad_checksums
    if bad["dropped"] or bad["taken"]:
        lines.append(f"bad checksums: {bad['dropped']} segments dropped (as the receiver drops them), "
                     f"{bad['taken']} taken ([tracker] checksums = count)")
    if st.wrong_interface:
        lines.append(f"wrong interface: {st.wrong_interface} packets refused (their subflow direction came in on "
                     f"another interface before; see the wrong_interface notices)")
    if st.low_ttl:
        lines.append(f"low TTL: {st.low_ttl} packets with a TTL below their subflow direction's first packet's "
                     f"(those that brought anything new were read only once the receiver acknowledged them: "
                     f"see the low_ttl notices)")
    if res.pipeline.inspector is not None:
        sigs = ps.signatures
        lines.append(f"signature matches: {res.signatures}" + (" (" + ", ".join(
            f"sid {sid} x{k}" for sid, k in sorted(sigs.items())) + ")" if sigs else ""))
        ist = res.pipeline.inspector.stats
        if ist.pcre_limits:
            lines.append(f"pcre searches out of time: {ist.pcre_limits} (those rules did not match there; see the "
                         f"log's pcre_limit notices and [inspector] pcre_budget_ms)"
                         + (f"; {ist.pcre_given_up} rule(s) given up on a connection direction after "
                            f"[inspector] pcre_strikes" if ist.pcre_given_up else ""))
    if st.decode_errors or ps.parse_errors:
        errs: dict[str, Any] = dict(st.decode_errors)
        errs.update(ps.parse_errors)
        lines.append("decode errors: " + ", ".join(f"{k} {v}" for k, v in sorted(errs.items())))
    for p in res.problems:
        lines.append(f"warning: {p}")
    return lines


def open_output(path: str) -> IO[bytes]:
    if path == "-":
        return os.fdopen(sys.stdout.fileno(), "wb", closefd=False)
    return open(path, "wb")


__all__ = ["replay", "ReplayResult", "summary_lines", "open_output", "CaptureError", "EmitProcessError"]
