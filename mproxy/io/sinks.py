"""Where the live gateway's output goes: the IDS interface, rotating pcaps, the event log.

* :class:`InterfaceSink` writes the emitted plain-TCP stream as Ethernet frames
  on an interface (a veth or tap end that Suricata, Snort or Zeek listen on)
  through an ``AF_PACKET`` raw socket. The socket is opened with protocol 0,
  so it receives nothing and its buffer never fills with traffic; it is
  non-blocking, so a slow interface costs dropped frames (counted), never a
  stalled verdict.
* :class:`RotatingPcapSink` writes the same frames to ``PREFIX.N.pcap`` files,
  rotating at a size and keeping the newest few.
* :class:`EventLog` writes JSON lines (``-``: stdout) and can be reopened
  (SIGHUP) after logrotate moved the file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from .pcap import PcapWriter

__all__ = ["SinkError", "FrameSink", "InterfaceSink", "RotatingPcapSink", "FrameSinks", "EventLog"]

log = logging.getLogger("mproxy.sinks")
Frames = list[tuple[float, bytes]]
# The emitter cuts data at 1460 bytes: an IPv6 segment is 1520 bytes of IP, whatever the queued MTU was.
MIN_SINK_MTU = 1520


class SinkError(RuntimeError):
    """A sink cannot be opened (message names the config key)."""


class FrameSink(Protocol):
    def write(self, frames: Frames) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class InterfaceSink:
    ifname: str
    frames: int = 0
    bytes: int = 0
    dropped: int = 0  # interface queue full (EAGAIN/ENOBUFS)
    too_big: int = 0  # frame larger than the interface MTU allows
    errors: int = 0
    mtu: int = 0
    _sock: socket.socket | None = None
    _warned: bool = False

    def __post_init__(self) -> None:
        try:
            socket.if_nametoindex(self.ifname)
        except OSError:
            raise SinkError(f"[sink] interface: no interface named {self.ifname!r}") from None
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as e:
            raise SinkError(f"[sink] interface: cannot open a packet socket: {e.strerror} "
                            "(needs CAP_NET_RAW)") from None
        try:
            s.bind((self.ifname, 0))
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        except OSError as e:
            s.close()
            raise SinkError(f"[sink] interface {self.ifname!r}: {e.strerror}") from None
        self._sock = s
        mtu = _read(f"/sys/class/net/{self.ifname}/mtu")
        self.mtu = int(mtu) if mtu and mtu.isdigit() else 0
        if 0 < self.mtu < MIN_SINK_MTU:
            log.warning("sink interface %s has MTU %d: emitted IPv6 segments (1460 bytes of data + 60 of "
                        "headers) need %d; set the MTU of %s and of its peer to at least %d",
                        self.ifname, self.mtu, MIN_SINK_MTU, self.ifname, MIN_SINK_MTU)
        state = _read(f"/sys/class/net/{self.ifname}/operstate")
        if state not in ("up", "unknown", None):
            log.warning("sink interface %s is %s: frames written to it are lost until it is up",
                        self.ifname, state)

    def write(self, frames: Frames) -> None:
        send = self._sock.send  # type: ignore[union-attr]
        for _ts, frame in frames:
            try:
                send(frame)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.ENOBUFS):
                    self.dropped += 1
                    continue
                if e.errno == errno.EMSGSIZE:
                    self.too_big += 1
                    if self.too_big == 1:
                        log.error("a %d-byte frame does not fit the MTU of sink interface %s (%d): set its MTU "
                                  "(and its peer's) to at least %d; such frames are counted and lost",
                                  len(frame), self.ifname, self.mtu, MIN_SINK_MTU)
                    continue
                self.errors += 1
                if not self._warned:
                    self._warned = True
                    log.error("writing to sink interface %s failed: %s (further errors only counted)",
                              self.ifname, e.strerror)
                continue
            self.frames += 1
            self.bytes += len(frame)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def stats(self) -> dict[str, Any]:
        return {"interface": self.ifname, "frames": self.frames, "bytes": self.bytes, "dropped": self.dropped,
                "too_big": self.too_big, "errors": self.errors}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


@dataclass(slots=True)
class RotatingPcapSink:
    """``PREFIX.N.pcap`` files (Ethernet), N increasing; a new file after ``rotate_bytes``; ``keep`` newest kept.

    Numbering continues after the highest existing N, so a restart never
    overwrites an earlier run's output.
    """

    prefix: str
    rotate_bytes: int = 100 * 1024 * 1024
    keep: int = 10
    frames: int = 0
    files: int = 0
    errors: int = 0
    index: int = 0
    _f: IO[bytes] | None = None
    _writer: PcapWriter | None = None
    _size: int = 0

    def __post_init__(self) -> None:
        existing = self._existing()
        self.index = (max(existing) + 1) if existing else 0
        self._open()

    @property
    def path(self) -> str:
        return f"{self.prefix}.{self.index}.pcap"

    def _existing(self) -> list[int]:
        p = Path(self.prefix)
        d = p.parent if str(p.parent) else Path(".")
        pat = re.compile(re.escape(p.name) + r"\.(\d+)\.pcap$")
        try:
            return sorted(int(m.group(1)) for f in d.iterdir() if (m := pat.match(f.name)))
        except OSError:
            return []

    def _open(self) -> None:
        try:
            self._f = open(self.path, "xb", buffering=1 << 20)
        except OSError as e:
            raise SinkError(f"[sink] pcap: cannot create {self.path}: {e.strerror}") from None
        self._writer = PcapWriter(self._f)
        self._size = 24
        self.files += 1
        self._prune()

    def _prune(self) -> None:
        for n in self._existing()[:-self.keep]:
            try:
                os.unlink(f"{self.prefix}.{n}.pcap")
            except OSError:
                pass

    def write(self, frames: Frames) -> None:
        w = self._writer
        if w is None:
            return
        try:
            for ts, frame in frames:
                w.write(ts, frame)
                self._size += 16 + len(frame)
            self.frames += len(frames)
            if self._size >= self.rotate_bytes:
                self.rotate()
        except (OSError, SinkError) as e:
            self.errors += 1
            if self.errors == 1:
                log.error("writing pcap %s failed: %s (further errors only counted)", self.path, e)

    def rotate(self) -> None:
        self._close_file()
        self.index += 1
        self._open()

    def flush(self) -> None:
        if self._f is not None:
            try:
                self._f.flush()
            except OSError:
                self.errors += 1

    def _close_file(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                self.errors += 1
        self._f = None
        self._writer = None

    def close(self) -> None:
        self._close_file()

    def stats(self) -> dict[str, Any]:
        return {"pcap": self.path, "frames": self.frames, "files": self.files, "errors": self.errors}


@dataclass(slots=True)
class FrameSinks:
    """Fan-out of the emitted stream to every configured sink."""

    sinks: list[Any] = field(default_factory=list)

    def write(self, frames: Frames) -> None:
        for s in self.sinks:
            s.write(frames)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def close(self) -> None:
        for s in self.sinks:
            s.close()

    def stats(self) -> list[dict[str, Any]]:
        return [s.stats() for s in self.sinks]

    def __bool__(self) -> bool:
        return bool(self.sinks)


def open_sinks(interface: str, pcap: str, rotate_mb: int, keep: int) -> FrameSinks:
    out = FrameSinks()
    try:
        if interface:
            out.sinks.append(InterfaceSink(interface))
        if pcap:
            out.sinks.append(RotatingPcapSink(pcap, rotate_mb * 1024 * 1024, keep))
    except SinkError:
        out.close()
        raise
    return out


@dataclass(slots=True)
class EventLog:
    """JSON lines to a file (appended) or stdout; ``reopen`` after log rotation.

    Lines gather in memory and go out whole, in one ``write`` per flush on an
    ``O_APPEND`` descriptor: the workers of a multi-worker gateway append to
    the same file without cutting each other's records.
    """

    path: str
    drop_keys: bool = True  # remove MPTCP keys from records unless [log] log_keys
    tag: dict[str, Any] = field(default_factory=dict)  # added to every record (a worker's number)
    records: int = 0
    errors: int = 0
    _fd: int = -1
    _stdout: bool = False
    _pending: list[str] = field(default_factory=list)
    _size: int = 0

    def __post_init__(self) -> None:
        self._open()

    def _open(self) -> None:
        self._stdout = self.path == "-"
        if self.path and not self._stdout:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            except OSError as e:
                raise SinkError(f"[log] events: cannot open {self.path}: {e.strerror}") from None

    def write(self, records: list[dict[str, Any]]) -> None:
        if self._fd < 0 and not self._stdout:
            return
        try:
            for r in records:
                if self.drop_keys:
                    r = {k: v for k, v in r.items() if not k.endswith("_key")}
                if self.tag:
                    r = {**r, **self.tag}
                line = json.dumps(r, separators=(",", ":"), default=str) + "\n"
                self._pending.append(line)
                self._size += len(line)
            self.records += len(records)
        except (TypeError, ValueError) as e:
            self._failed(e)
        if self._size >= _EVENTS_FLUSH:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending, self._size = [], 0
        try:
            if self._stdout:
                sys.stdout.write(text)
                sys.stdout.flush()
                return
            if self._fd < 0:
                return
            view = memoryview(text.encode())
            while view:  # a regular file takes it all in one write unless the disk is full
                view = view[os.write(self._fd, view):]
        except (OSError, ValueError) as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        self.errors += 1
        if self.errors == 1:
            log.error("writing the event log failed: %s (further errors only counted)", e)

    def reopen(self) -> None:
        """Close and open the path again (SIGHUP), so logrotate can move the old file away."""
        if self.path in ("", "-"):
            return
        self.close()
        try:
            self._open()
        except SinkError as e:
            self.errors += 1
            log.error("%s", e)

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1
        self._stdout = False


_EVENTS_FLUSH = 1 << 16  # bytes of records held before they are written anyway
