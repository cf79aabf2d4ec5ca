"""Follow IDS alert files (Suricata ``eve.json``, Snort 3 ``alert_json``) like ``tail -F``.

Polling, not inotify: one ``stat`` per file every ``interval`` seconds (0.25 s
by default) costs nothing, works on every file system (inotify misses changes
made through NFS or bind mounts from another namespace) and needs no extra
dependency; alert latency is bounded by the interval. No busy loop: between
polls the task sleeps on the event loop.

* Rotation (the path now names another inode, e.g. logrotate's rename): the
  rest of the old file is read first, then the new one from its start.
* Truncation (``copytruncate``, or the IDS restarted and rewrote the file):
  reading restarts at the beginning.
* A path that does not exist yet is waited for, and read from its start once
  it appears. At startup existing files are read from their end (old alerts
  are history, not a reason to kill connections) unless ``from_start``.
* Partial lines wait for their newline; a "line" longer than ``max_line``
  bytes is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

__all__ = ["FileTail", "AlertFollower"]

log = logging.getLogger("mproxy.alerts")


@dataclass(slots=True)
class FileTail:
    path: str
    from_start: bool = False
    max_line: int = 1 << 20
    rotations: int = 0
    truncations: int = 0
    too_long: int = 0
    _f: BinaryIO | None = None
    _ino: tuple[int, int] | None = None
    _pos: int = 0
    _buf: bytes = b""
    _started: bool = False
    _skip: bool = False

    def poll(self) -> list[bytes]:
        """Complete lines appended since the last poll (rotation and truncation handled)."""
        lines: list[bytes] = []
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        first = not self._started
        self._started = True
        if self._f is not None and (st is None or (st.st_dev, st.st_ino) != self._ino):
            # rotated away (or deleted): finish the old file, then switch
            lines += self._read()
            self._close()
            self.rotations += 1
            self._buf = b""
            self._skip = False
        if st is None:
            return lines
        if self._f is None:
            try:
                self._f = open(self.path, "rb")  # noqa: SIM115 - kept open between polls
            except OSError as e:
                log.debug("cannot open %s: %s", self.path, e)
                return lines
            self._ino = (st.st_dev, st.st_ino)
            self._pos = 0
            if first and not self.from_start:
                self._pos = self._f.seek(0, os.SEEK_END)
        elif st.st_size < self._pos:
            self.truncations += 1
            self._f.seek(0)
            self._pos = 0
            self._buf = b""
            self._skip = False
        lines += self._read()
        return lines

    def _read(self) -> list[bytes]:
        f = self._f
        if f is None:
            return []
        out: list[bytes] = []
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            self._pos += len(chunk)
            parts = (self._buf + chunk).split(b"\n")
            self._buf = parts.pop()
            for ln in parts:
                if self._skip:  # the end of a line already dropped as too long
                    self._skip = False
                elif len(ln) > self.max_line:
                    self.too_long += 1
                elif ln.strip():
                    out.append(ln)
            if len(self._buf) > self.max_line:
                if not self._skip:
                    self.too_long += 1
                self._buf = b""
                self._skip = True
        return out

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = None
        self._ino = None
        self._pos = 0

    def close(self) -> None:
        self._close()


@dataclass(slots=True)
class AlertFollower:
    """Polls several files and hands every new line to ``on_line``."""

    paths: list[str]
    on_line: Callable[[bytes], None]
    interval: float = 0.25
    from_start: bool = False
    tails: list[FileTail] = field(init=False)
    errors: int = 0

    def __post_init__(self) -> None:
        self.tails = [FileTail(p, self.from_start) for p in self.paths]

    def poll_once(self) -> int:
        n = 0
        for t in self.tails:
            for line in t.poll():
                n += 1
                try:
                    self.on_line(line)
                except Exception:  # noqa: BLE001 - a bad alert must not stop the follower
                    self.errors += 1
                    if self.errors == 1:
                        log.exception("handling an alert line failed (further failures only counted)")
        return n

    async def run(self) -> None:
        while True:
            self.poll_once()
            await asyncio.sleep(self.interval)

    def retarget(self, paths: list[str], interval: float, from_start: bool) -> None:
        """Follow these files from now on (a reload). A file followed already keeps its place, so no
        alert is read twice or skipped; a file added is taken up as at start (its end, or its start
        with ``from_start``) at once, not at the next poll; a file no longer named is closed."""
        kept = {t.path: t for t in self.tails}
        self.tails = [kept.pop(p) if p in kept else FileTail(p, from_start) for p in paths]
        for t in kept.values():
            t.close()
        self.paths, self.interval, self.from_start = list(paths), interval, from_start
        self.poll_once()

    def stats(self) -> dict[str, object]:
        return {"files": [{"path": t.path, "rotations": t.rotations, "truncations": t.truncations,
                           "too_long": t.too_long} for t in self.tails], "errors": self.errors}

    def close(self) -> None:
        for t in self.tails:
            t.close()
