"""Packets in, emitted plain-TCP frames and log records out.

Runs the tracker and turns its events into (a) the emitted stream — one
:class:`~mproxy.core.emitter.TcpEmitter` per MPTCP connection, plain TCP
passed through re-framed as Ethernet — and (b) JSON-ready log records
(``mptcp_connection`` and ``notice``; ``signature`` when an inspector is set:
the replay's offline signature matching). Sans-I/O: the replay command and
the live gateway wrap the same object.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..wire.errors import ErrorKind, WireError
from ..wire.packet import LinkType, TcpSegment, addr_text, parse_frame, parse_ip, strip_link
from .defrag import DefragStats, Defragmenter
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
from .tracker import Connection, ConnectionClosedSummary, Tracker, TrackerConfig

if TYPE_CHECKING:  # (the inspector and Hyperscan cost ~20 ms of start-up; a replay without rules skips them)
    from .inspector import Inspector, Match, PcreLimit

Frames = list[tuple[float, bytes]]
_BE32 = struct.Struct("!I")
_LT_SLL2 = int(LinkType.LINUX_SLL2)  # (its header holds the interface index, at offset 4)


@dataclass(slots=True)
class PipelineStats:
    frames: int = 0
    non_tcp: int = 0
    parse_errors: Counter[str] = field(default_factory=Counter)
    emitted_frames: int = 0
    passthrough_frames: int = 0
    bytes_out: list[int] = field(default_factory=lambda: [0, 0])
    signatures: Counter[int] = field(default_factory=Counter)  # inspector matches by sid (replay --rules)
    defrag: DefragStats = field(default_factory=DefragStats)  # IP fragments in the input


Op = tuple[Any, ...]  # one emission step; plain tuples so a second process can receive them pickled


class Emission:
    """The emitted stream's state: emission ops in, Ethernet frames out.

    One :class:`TcpEmitter` per MPTCP connection. :class:`Pipeline` turns
    tracker events into ops and applies them here in-process; the live
    gateway can instead ship the ops to a second process that runs its own
    Emission (:mod:`mproxy.io.emitworker`) — the emitter is most of the
    per-byte cost, and the same ops give the same frames either way.
    """

    def __init__(self, mss: int = 1460, passthrough_mss: int | None = None) -> None:
        self.mss = mss
        self.passthrough_mss = passthrough_mss
        self.frames = 0
        self.passthrough = 0
        self._emitters: dict[int, TcpEmitter] = {}

    def apply(self, ops: list[Op]) -> Frames:
        """The frames of ``ops``, in order. Consecutive data ops of one connection direction
        (a bulk transfer's releases, one per packet) go to the emitter as one run."""
        out: Frames = []
        emitters = self._emitters
        i, n = 0, len(ops)
        while i < n:
            op = ops[i]
            i += 1
            kind = op[0]
            if kind == "data":
                cid, fc = op[1], op[2]
                run = [(op[3], op[4])]
                while i < n:
                    nx = ops[i]
                    if nx[0] != "data" or nx[1] != cid or nx[2] != fc:
                        break
                    run.append((nx[3], nx[4]))
                    i += 1
                em = emitters.get(cid)
                if em is not None:
                    out += em.data_runs(fc, run)
            elif kind == "pass":
                frames = passthrough_frames(op[1], op[2], op[3], self.passthrough_mss)
                out += frames
                self.passthrough += len(frames)
            elif kind == "open" or kind == "resume":  # resume: a new emitter process takes one over
                em = TcpEmitter(op[2], op[3], op[4], op[5], mss=self.mss,
                                salt=b"resume:%d" % op[7] if kind == "resume" else b"")
                emitters[op[1]] = em
                out += em.open(op[6])
            elif kind == "skip":
                em = emitters.get(op[1])
                if em is not None:
                    em.skip(op[2], op[3])
            elif kind == "fin":
                em = emitters.get(op[1])
                if em is not None:
                    out += em.half_close(op[2], op[3])
            elif kind == "close":
                em = emitters.pop(op[1], None)
                if em is not None and op[4]:
                    out += em.close(op[2], reset=op[3])
        self.frames += len(out)
        return out

    def __len__(self) -> int:
        return len(self._emitters)


class Pipeline:
    """Tracker + emitters: ``feed``/``feed_segment`` return output frames; records accumulate.

    With ``remote`` set (a list), emission ops are appended there instead of
    being applied, and no frames are returned: another process emits them.
    """

    def __init__(self, config: TrackerConfig | None = None, *, passthrough: bool = True,
                 mss: int = 1460, split_passthrough: bool = False) -> None:
        self.tracker = Tracker(config)
        self.stats = PipelineStats()
        self.passthrough = passthrough
        self.mss = mss
        # live: packets queued whole (GSO, checksum left to the kernel) reach the sink as the wire carries them
        self.passthrough_mss: int | None = mss if split_passthrough else None
        self.records: list[dict[str, Any]] = []
        self.emission = Emission(mss, self.passthrough_mss)
        self.remote: list[Op] | None = None
        # captures may hold IP fragments (the live gateway gets datagrams whole from conntrack)
        self.defrag = Defragmenter(stats=self.stats.defrag)
        # matched on each connection's rebuilt stream as it is released (the live gateway inspects in
        # its responder instead, before the verdict): one `signature` record per match
        self.inspector: Inspector | None = None
        # read the interface a frame came in on from a Linux cooked v2 header (``tcpdump -i any``),
        # for the tracker's pin_interfaces (``mproxy replay --pin-interfaces``: see replay())
        self.link_ifaces = False

    def feed(self, linktype: int, frame: bytes | memoryview, ts: float) -> Frames:
        """One captured frame; non-TCP frames are counted and not forwarded."""
        self.stats.frames += 1
        seg = parse_frame(linktype, frame, ts)
        if type(seg) is TcpSegment:  # nearly every frame: straight on (feed_segment, inlined)
            iface = 0
            if linktype == _LT_SLL2 and self.link_ifaces and frame[10] != 4:  # (4: sent by the capturing host)
                iface = _BE32.unpack_from(frame, 4)[0]
            events = self.tracker.process(seg, False, iface)
            return self.handle(events) if events else []
        if isinstance(seg, WireError) and seg.kind is ErrorKind.FRAGMENT:
            # an IP fragment: held until its datagram is whole, which is then parsed as any packet
            ip = strip_link(linktype, memoryview(frame))
            whole = self.defrag.add(ip, ts) if isinstance(ip, memoryview) and len(ip) else None
            if whole is None:
                return []
            seg = parse_ip(memoryview(whole), ts)
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
        """Turn tracker events into frames (or remote ops) and log records."""
        if not events:
            return []
        remote = self.remote
        ops: list[Op] = [] if remote is None else remote  # remote mode: gathered in place
        bytes_out = self.stats.bytes_out
        ins = self.inspector
        for e in events:
            if type(e) is DataReleased:  # nearly every event, tested first (a @final class)
                d = e.direction
                ops.append(("data", e.conn_id, not d, e.data, e.ts))  # C2S is 0
                bytes_out[d] += len(e.data)
                if ins is not None:
                    self._inspect(ins, e)
            elif isinstance(e, PassThrough):
                if self.passthrough:
                    ops.append(("pass", e.ip, e.ipver, e.ts))
            elif isinstance(e, ConnectionOpened):
                conn = self.tracker.connections.get(e.conn_id)
                if conn is not None:
                    ops.append(("open", e.conn_id, conn.client[0], conn.client[1], conn.server[0],
                                conn.server[1], e.ts))
            elif isinstance(e, GapSkipped):
                ops.append(("skip", e.conn_id, e.direction == Direction.C2S, e.length))
            elif isinstance(e, DataFinished):
                ops.append(("fin", e.conn_id, e.direction == Direction.C2S, e.ts))
            elif isinstance(e, ConnectionClosed):
                ops.append(("close", e.conn_id, e.ts, e.reset, e.outcome != Outcome.END_OF_INPUT))
                if isinstance(e, ConnectionClosedSummary):
                    self.records.append(e.summary)
                if ins is not None:
                    ins.close(e.conn_id)
            elif isinstance(e, Notice):
                self.records.append(notice_record(e))
        if remote is not None or not ops:
            return []
        em = self.emission
        out = em.apply(ops)
        self.stats.emitted_frames, self.stats.passthrough_frames = em.frames, em.passthrough
        return out

    def _inspect(self, ins: Inspector, e: DataReleased) -> None:
        conn = self.tracker.connections.get(e.conn_id)
        if conn is None:
            return
        for m in ins.feed(e.conn_id, e.direction, e.data, conn.client, conn.server):
            from .inspector import Match as _Match  # (here, where a chunk matched: see the TYPE_CHECKING import)

            if isinstance(m, _Match):
                self.stats.signatures[m.sid] += 1
            self.records.append(signature_record(conn, m, e.ts))

    def emit_pending(self) -> Frames:
        """Apply the ops gathered in remote mode here, in one batch (the replay does this every
        few hundred packets: a run of releases then reaches each emitter in one call)."""
        ops = self.take_ops()
        if not ops:
            return []
        em = self.emission
        out = em.apply(ops)
        self.stats.emitted_frames, self.stats.passthrough_frames = em.frames, em.passthrough
        return out

    def resume_ops(self, generation: int, ts: float) -> list[Op]:
        """Ops that open every conversation in progress again in a new emitter process (the
        ``generation``-th): a new handshake (other ISNs) from which their data goes on, half-closed
        where a DATA_FIN was already emitted. The bytes the dead process had not written are lost.
        The conversations are the tracker's opened connections (each got an ``open`` op; a closed
        one has left the table with its ``close`` op)."""
        ops: list[Op] = []
        for conn in self.tracker.connections.values():
            if conn.opened:
                ops.append(("resume", conn.id, conn.client[0], conn.client[1], conn.server[0], conn.server[1], ts,
                            generation))
                ops += [("fin", conn.id, d == Direction.C2S, ts) for d in Direction if conn.fin_emitted[d]]
        return ops

    def take_ops(self) -> list[Op]:
        """The emission ops gathered since the last call (remote mode)."""
        ops = self.remote
        if not ops:
            return []
        self.remote = []
        return ops

    def drain_records(self) -> list[dict[str, Any]]:
        recs = self.records
        self.records = []
        return recs


def signature_record(conn: Connection, m: Match | PcreLimit, ts: float) -> dict[str, Any]:
    """A rule that matched a connection's rebuilt stream, or a ``pcre_limit`` notice: a rule whose
    pcre was not decided within the time budget (the live gateway's ``action`` record says the same,
    with what it did)."""
    from .inspector import PcreLimit

    rec: dict[str, Any] = {"event": "signature", "ts": round(ts, 6)}
    if isinstance(m, PcreLimit):
        rec = {"event": "notice", "ts": round(ts, 6), "type": "pcre_limit", "detail": m.reason()}
    rec.update({"conn_id": conn.id, "src": addr_text(conn.client[0]), "sport": conn.client[1],
                "dst": addr_text(conn.server[0]), "dport": conn.server[1], "sid": m.sid, "rev": m.rev,
                "msg": m.msg, "direction": "c2s" if m.direction == Direction.C2S else "s2c",
                "stream_offset": m.offset})
    return rec


def notice_record(n: Notice) -> dict[str, Any]:
    rec: dict[str, Any] = {"event": "notice", "ts": round(n.ts, 6), "type": n.type.value, "conn_id": n.conn_id,
                           "detail": n.detail}
    if n.src:
        rec.update(src=n.src, sport=n.sport, dst=n.dst, dport=n.dport)
    return rec
