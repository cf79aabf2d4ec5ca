"""Packets in, emitted plain-TCP frames and log records out.

Runs the tracker and turns its events into (a) the emitted stream — one
:class:`~mproxy.core.emitter.TcpEmitter` per MPTCP connection, plain TCP
passed through re-framed as Ethernet — and (b) JSON-ready log records
(``mptcp_connection`` and ``notice``). Sans-I/O: the replay command and the
live gateway wrap the same object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..wire.errors import WireError
from ..wire.packet import TcpSegment, parse_frame
from .emitter import TcpEmitter, passthrough_frames
from .events import (
    ConnectionClosed,
    ConnectionOpened,
    DataFinished,
    DataReleased,
    Direction,
    Event,
    GapSkipped,
    Notice,
    Outcome,
    PassThrough,
)
from .tracker import ConnectionClosedSummary, Tracker, TrackerConfig

Frames = list[tuple[float, bytes]]


@dataclass(slots=True)
class PipelineStats:
    frames: int = 0
    non_tcp: int = 0
    parse_errors: Counter[str] = field(default_factory=Counter)
    emitted_frames: int = 0
    passthrough_frames: int = 0
    bytes_out: list[int] = field(default_factory=lambda: [0, 0])


class Pipeline:
    """Tracker + emitters: ``feed``/``feed_segment`` return output frames; records accumulate."""

    def __init__(self, config: TrackerConfig | None = None, *, passthrough: bool = True,
                 mss: int = 1460, split_passthrough: bool = False) -> None:
        self.tracker = Tracker(config)
        self.stats = PipelineStats()
        self.passthrough = passthrough
        self.mss = mss
        # live: packets queued whole (GSO, checksum left to the kernel) reach the sink as the wire carries them
        self.passthrough_mss: int | None = mss if split_passthrough else None
        self.records: list[dict[str, Any]] = []
        self._emitters: dict[int, TcpEmitter] = {}

    def feed(self, linktype: int, frame: bytes | memoryview, ts: float) -> Frames:
        """One captured frame; non-TCP frames are counted and not forwarded."""
        self.stats.frames += 1
        seg = parse_frame(linktype, frame, ts)
        if seg is None:
            self.stats.non_tcp += 1
            return []
        if isinstance(seg, WireError):
            self.stats.parse_errors[seg.kind.value] += 1
            return []
        return self.feed_segment(seg)

    def feed_segment(self, seg: TcpSegment) -> Frames:
        return self.handle(self.tracker.process(seg))

    def finish(self, now: float | None = None) -> Frames:
        """End of input: flush the tracker (connections still open are reported, not closed on the wire)."""
        return self.handle(self.tracker.flush(now))

    def handle(self, events: list[Event]) -> Frames:
        """Turn tracker events into frames (and log records)."""
        if not events:
            return []
        out: Frames = []
        for e in events:
            if isinstance(e, DataReleased):
                em = self._emitters.get(e.conn_id)
                if em is not None:
                    out += em.data(e.direction == Direction.C2S, e.data, e.ts)
                    self.stats.bytes_out[e.direction] += len(e.data)
            elif isinstance(e, PassThrough):
                if self.passthrough:
                    frames = passthrough_frames(e.ip, e.ipver, e.ts, self.passthrough_mss)
                    out += frames
                    self.stats.passthrough_frames += len(frames)
            elif isinstance(e, ConnectionOpened):
                conn = self.tracker.connections.get(e.conn_id)
                if conn is not None:
                    em = TcpEmitter(conn.client[0], conn.client[1], conn.server[0], conn.server[1], mss=self.mss)
                    self._emitters[e.conn_id] = em
                    out += em.open(e.ts)
            elif isinstance(e, GapSkipped):
                em = self._emitters.get(e.conn_id)
                if em is not None:
                    em.skip(e.direction == Direction.C2S, e.length)
            elif isinstance(e, DataFinished):
                em = self._emitters.get(e.conn_id)
                if em is not None:
                    out += em.half_close(e.direction == Direction.C2S, e.ts)
            elif isinstance(e, ConnectionClosed):
                em = self._emitters.pop(e.conn_id, None)
                if em is not None and e.outcome != Outcome.END_OF_INPUT:
                    out += em.close(e.ts, reset=e.reset)
                if isinstance(e, ConnectionClosedSummary):
                    self.records.append(e.summary)
            elif isinstance(e, Notice):
                self.records.append(notice_record(e))
        self.stats.emitted_frames += len(out)
        return out

    def drain_records(self) -> list[dict[str, Any]]:
        recs = self.records
        self.records = []
        return recs


def notice_record(n: Notice) -> dict[str, Any]:
    rec: dict[str, Any] = {"event": "notice", "ts": round(n.ts, 6), "type": n.type.value, "conn_id": n.conn_id,
                           "detail": n.detail}
    if n.src:
        rec.update(src=n.src, sport=n.sport, dst=n.dst, dport=n.dport)
    return rec
