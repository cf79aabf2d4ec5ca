"""Closing the loop: what the gateway does when the inspector matches, an IDS alerts, or a
side channel shows up.

Sans-I/O, owned by :class:`~mproxy.core.gateway.Gateway`: each method takes a
packet or an alert and the time, and returns a :class:`Response` — drop the
packet or not, IP packets to inject (MP_FASTCLOSE/RST), tracker events to
hand to the pipeline. Action records go to the gateway's event log through
the ``record`` callback.

Reactions (``[actions]`` in the config): ``fastclose`` kills the whole MPTCP
connection on every subflow (:mod:`mproxy.core.fastclose`), ``log`` only
records, ``downgrade-host`` downgrades the client's later connections to TCP
for ``downgrade_host_seconds`` (one path the IDS can follow, no more side
channels). A killed connection's 4-tuples are remembered for ``kill_linger``
seconds: whatever its ends still send is dropped, and answered with an RST at
the exact sequence number the sender's ACK reveals, so a first RST that
missed the window is corrected within one round trip.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..wire.packet import ACK, FIN, RST, SYN, TcpSegment, addr_text, parse_ip
from .alerts import Alert
from .events import ConnectionClosed, DataReleased, Direction, Event, Notice, NoticeType
from .fastclose import answer_rst, close_set, seq_at_or_after
from .inspector import Inspector, Match, PcreLimit
from .reassembler import MASK32
from .tracker import Connection, Tracker

__all__ = ["Reaction", "Reactions", "Response", "Responder"]

_KILLED_LIMIT = 65536  # remembered killed 4-tuples (both orientations); oldest forgotten first
_ANSWERS = 4  # RSTs sent in answer to one killed subflow direction


class Reaction(str, Enum):
    FASTCLOSE = "fastclose"  # MP_FASTCLOSE/RST on every subflow, both directions; drop the trigger packet
    LOG = "log"  # an action record, nothing else
    DOWNGRADE_HOST = "downgrade-host"  # the client's later connections are downgraded to TCP


@dataclass(frozen=True, slots=True)
class Reactions:
    on_match: tuple[Reaction, ...] = (Reaction.FASTCLOSE,)
    on_alert: tuple[Reaction, ...] = (Reaction.FASTCLOSE,)
    on_side_channel: tuple[Reaction, ...] = (Reaction.LOG,)
    # a rule's pcre not decided within the inspector's time budget: it might have matched
    on_pcre_limit: tuple[Reaction, ...] = (Reaction.LOG,)
    downgrade_host_seconds: float = 600.0
    kill_linger: float = 30.0


@dataclass(slots=True)
class Response:
    drop: bool = False
    inject: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    reason: str = ""


@dataclass(slots=True)
class _Killed:
    conn_id: int
    version: int | None
    until: float
    answers: int = 0


@dataclass(slots=True)
class ResponderStats:
    killed: int = 0
    answered: int = 0  # RSTs sent in answer to a killed connection's late packets
    late_dropped: int = 0  # packets of killed connections dropped
    host_downgrades: int = 0


class Responder:
    def __init__(self, tracker: Tracker, reactions: Reactions | None = None, inspector: Inspector | None = None,
                 record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.tracker = tracker
        self.reactions = reactions or Reactions()
        self.inspector = inspector
        self.stats = ResponderStats()
        self._record = record or (lambda r: None)
        # 4-tuple (sender first) of a killed subflow direction -> (state, key of the sender's host)
        self.killed: OrderedDict[tuple[bytes, int, bytes, int], tuple[_Killed, int | None]] = OrderedDict()
        self.killed_tokens: dict[int, float] = {}
        self.hosts: dict[bytes, float] = {}  # client address -> downgraded until
        self._last_sweep = 0.0

    def replace_inspector(self, new: Inspector | None) -> None:
        """Rules reloaded: ``new`` takes over every live connection where the old one stood
        (:meth:`Inspector.adopt`), from the next released byte on; None turns inspection off."""
        if new is not None and self.inspector is not None:
            new.adopt(self.inspector)
        self.inspector = new

    # ------------------------------------------------------------------ per packet
    def killed_packet(self, seg: TcpSegment) -> Response | None:
        """A packet of a connection mproxy killed: drop it and answer with an exact RST; None if not one."""
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        hit = self.killed.get(key)
        if hit is None:
            return None
        k, src_key = hit
        flags = seg.flags
        if seg.ts > k.until:
            self._forget_tuple(key)
            return None  # over
        if flags & SYN and not flags & ACK:
            # a new connection re-using the 4-tuple (or a SYN the gateway dropped, sent again):
            # its answers must pass too
            self._forget_tuple(key)
            self._forget_tuple((seg.dst, seg.dport, seg.src, seg.sport))
            return None
        if flags & RST:
            return Response(False, reason="killed connection: its own RST passes")
        self.stats.late_dropped += 1
        r = Response(True, reason="killed connection")
        if flags & ACK and k.answers < _ANSWERS:
            k.answers += 1
            self.stats.answered += 1
            end = (seg.seq + seg.payload_len + (1 if flags & (SYN | FIN) else 0)) & MASK32
            r.inject.append(answer_rst(seg.dst, seg.dport, seg.src, seg.sport, seg.ack, end, src_key, k.version))
        return r

    def judge(self, seg: TcpSegment, events: list[Event]) -> Response | None:
        """Inspect what this packet released (and a Fast Open SYN's bytes); apply the reactions.
        None: nothing to do."""
        resp: Response | None = None
        if seg.payload_len and seg.flags & SYN and not seg.flags & ACK:
            resp = self._syn_data(seg)
        ins = self.inspector
        for e in events:
            if isinstance(e, DataReleased):
                if ins is None or resp is not None and resp.drop:
                    continue
                conn = self.tracker.connections.get(e.conn_id)
                if conn is None:
                    continue
                found = ins.feed(e.conn_id, e.direction, e.data, conn.client, conn.server)
                if not found:
                    continue
                matches = [m for m in found if isinstance(m, Match)]
                if matches:
                    r = self._react(conn, self.reactions.on_match, "inspector", matches[0].reason(), seg.ts,
                                    seg, _match_fields(matches))
                    resp = _merge(resp, r)
                for lim in found:
                    if isinstance(lim, PcreLimit) and not (resp and resp.drop):
                        resp = _merge(resp, self._react(conn, self.reactions.on_pcre_limit, "pcre_limit",
                                                        lim.reason(), seg.ts, seg, _match_fields([lim])))
            elif isinstance(e, Notice):
                if e.type == NoticeType.SIDE_CHANNEL and e.conn_id is not None and not (resp and resp.drop):
                    conn = self.tracker.connections.get(e.conn_id)
                    if conn is not None:
                        r = self._react(conn, self.reactions.on_side_channel, "side_channel", e.detail, seg.ts,
                                        seg, {})
                        resp = _merge(resp, r)
            elif isinstance(e, ConnectionClosed) and ins is not None:
                ins.close(e.conn_id)
        if ins is not None and seg.ts - self._last_sweep > 10.0:
            self._sweep(seg.ts)
        return resp

    def _syn_data(self, seg: TcpSegment) -> Response | None:
        """A TCP Fast Open SYN: its bytes reach the server's application with the SYN (the socket
        exists from then on), before the tracker can place them (only the server's answer says
        whether it took them). When a match would fast-close, they are inspected now, as the
        head of the stream they would start, and a match drops the SYN: the server never gets
        them. Otherwise (log only) they are inspected once placed, as every byte, and reported
        once. None: nothing to do."""
        ins = self.inspector
        if ins is None or Reaction.FASTCLOSE not in self.reactions.on_match:
            return None
        hit = self.tracker.subflow_of(seg)
        conn = hit[0].conn if hit is not None else None
        if conn is None or conn.opened or not conn.syn_data or conn.closed is not None:
            return None
        found = ins.peek(conn.id, Direction.C2S, conn.syn_data, conn.client, conn.server)
        matches = [m for m in found if isinstance(m, Match)]
        if not matches:
            return None  # a pcre limit here is decided again when the bytes are placed
        return self._react(conn, self.reactions.on_match, "inspector",
                           f"{matches[0].reason()} (in the bytes of a TCP Fast Open SYN)", seg.ts, seg,
                           _match_fields(matches))

    def alert(self, a: Alert, ts: float) -> tuple[Response | None, Connection | None]:
        """An external IDS alert: the connection whose emitted stream it names, and the reaction."""
        conn = self.tracker.connection_at(a.src, a.sport, a.dst, a.dport)
        if conn is None:
            return None, None
        extra: dict[str, Any] = {"sid": a.sid, "msg": a.msg, "ids": a.source}
        return self._react(conn, self.reactions.on_alert, "alert", a.reason(), ts, None, extra), conn

    # ------------------------------------------------------------------ policy queries
    def host_downgraded(self, addr: bytes, ts: float) -> float | None:
        """Until when connections from ``addr`` are downgraded (None: they are not)."""
        until = self.hosts.get(addr)
        if until is None:
            return None
        if ts >= until:
            del self.hosts[addr]
            return None
        return until

    def token_killed(self, token: int, ts: float) -> bool:
        until = self.killed_tokens.get(token)
        if until is None:
            return False
        if ts >= until:
            del self.killed_tokens[token]
            return False
        return True

    # ------------------------------------------------------------------ reactions
    def _react(self, conn: Connection, what: tuple[Reaction, ...], trigger: str, reason: str, ts: float,
               seg: TcpSegment | None, extra: dict[str, Any]) -> Response:
        resp = Response(reason=f"{trigger}: {reason}")
        base = {"trigger": trigger, "reason": reason, **extra}
        if Reaction.DOWNGRADE_HOST in what:
            until = ts + self.reactions.downgrade_host_seconds
            self.hosts[conn.client[0]] = until
            if len(self.hosts) > _KILLED_LIMIT:
                self.hosts.pop(next(iter(self.hosts)))
            self.stats.host_downgrades += 1
            self._record(self._rec("downgrade-host", conn, ts, dict(base, host=addr_text(conn.client[0]),
                                                                     until=round(until, 6),
                                                                     detail=f"later connections from "
                                                                            f"{addr_text(conn.client[0])} are "
                                                                            f"downgraded for "
                                                                            f"{self.reactions.downgrade_host_seconds:g} s")))
        if Reaction.FASTCLOSE in what:
            inject, events, fields = self.kill(conn, ts, seg)
            resp.drop = seg is not None
            resp.inject, resp.events = inject, events
            self._record(self._rec("fastclose", conn, ts, dict(base, **fields)))
        elif Reaction.LOG in what or not what:
            self._record(self._rec("log", conn, ts, dict(base, detail=f"{trigger}: {reason} (logged only)")))
        return resp

    def kill(self, conn: Connection, ts: float, seg: TcpSegment | None = None
             ) -> tuple[list[bytes], list[Event], dict[str, Any]]:
        """Build the kill packets, remember the connection as killed, close it in the tracker.

        ``seg``: a packet being dropped; its receiver never sees it, so that
        direction's next sequence number is the packet's own start.
        """
        overrides: dict[tuple[bytes, int, bytes, int], int] = {}
        if seg is not None:
            seq = seg.seq
            hit = self.tracker.subflow_of(seg)
            if hit is not None:
                pa = hit[0].dirs[hit[1]].peer_ack
                if pa is not None and seq_at_or_after(pa, seq):
                    seq = pa  # the receiver already has more than this packet (a retransmission)
            overrides[(seg.src, seg.sport, seg.dst, seg.dport)] = seq
        cs = close_set(conn, overrides)
        until = ts + self.reactions.kill_linger
        state = _Killed(conn.id, conn.version, until)
        for sf in conn.subflows:
            k = sf.key
            a_key, b_key = (conn.server_key, conn.client_key) if sf.flipped else (conn.client_key, conn.server_key)
            self._remember(k, state, a_key)
            self._remember((k[2], k[3], k[0], k[1]), state, b_key)
        for tok in (conn.client_token(), conn.server_token()):
            if tok is not None:
                self.killed_tokens.pop(tok, None)
                self.killed_tokens[tok] = until  # (latest kill last: the oldest go first)
        while len(self.killed_tokens) > _KILLED_LIMIT:  # bounded even when none has expired yet
            del self.killed_tokens[next(iter(self.killed_tokens))]
        # the tracker sees the kill as if it had crossed the gateway: the connection ends with
        # outcome fastclose (or reset), the emitter closes the IDS's conversation with an RST
        events: list[Event] = []
        for p in cs.packets:
            s = parse_ip(memoryview(p), ts)
            if isinstance(s, TcpSegment):
                events += self.tracker.process(s)
        self.stats.killed += 1
        if self.inspector is not None:
            self.inspector.close(conn.id)
        detail = {
            "mp_fastclose": f"MP_FASTCLOSE + RST on {len(cs.subflows)} subflow(s), both directions",
            "partial": "MP_FASTCLOSE where the end's key is known, RST elsewhere (one key unseen)",
            "rst_only": "keys unknown (MPTCP handshake not seen): in-window RSTs only, no MP_FASTCLOSE",
        }[cs.mode.value]
        if conn.version == 0 and cs.mode.value == "mp_fastclose":
            detail = f"v0: ACK + MP_FASTCLOSE on one subflow, RST on the others ({len(cs.subflows)} subflows)"
        fields: dict[str, Any] = {"mode": cs.mode.value, "version": conn.version, "packets": len(cs.packets),
                                  "subflows": cs.subflows, "detail": detail}
        if cs.skipped:
            fields["skipped"] = cs.skipped
        if seg is not None:
            fields["dropped"] = {"src": seg.src_text, "sport": seg.sport, "dst": seg.dst_text, "dport": seg.dport,
                                 "seq": seg.seq, "len": seg.payload_len}
        return cs.packets, events, fields

    # ------------------------------------------------------------------ helpers
    def _rec(self, action: str, conn: Connection, ts: float, fields: dict[str, Any]) -> dict[str, Any]:
        return {"event": "action", "ts": round(ts, 6), "action": action, "conn_id": conn.id,
                "src": addr_text(conn.client[0]), "sport": conn.client[1],
                "dst": addr_text(conn.server[0]), "dport": conn.server[1], **fields}

    def _remember(self, key: tuple[bytes, int, bytes, int], state: _Killed, sender_key: int | None) -> None:
        self.killed[key] = (state, sender_key)
        self.killed.move_to_end(key)
        while len(self.killed) > _KILLED_LIMIT:
            self.killed.popitem(last=False)

    def _forget_tuple(self, key: tuple[bytes, int, bytes, int]) -> None:
        self.killed.pop(key, None)

    def _sweep(self, ts: float) -> None:
        """Drop inspector state of connections the tracker no longer has (expired, evicted)."""
        self._last_sweep = ts
        if self.inspector is not None:
            self.inspector.retain(self.tracker.connections)
        for key in [k for k, (s, _) in self.killed.items() if s.until < ts]:
            del self.killed[key]


def _match_fields(matches: list[Match] | list[PcreLimit]) -> dict[str, Any]:
    m0 = matches[0]
    out: dict[str, Any] = {"sid": m0.sid, "rev": m0.rev, "msg": m0.msg,
                           "direction": "c2s" if m0.direction == Direction.C2S else "s2c",
                           "stream_offset": m0.offset}
    if len(matches) > 1:
        out["matches"] = [{"sid": m.sid, "msg": m.msg} for m in matches]
    return out


def _merge(a: Response | None, b: Response) -> Response:
    if a is None:
        return b
    a.drop = a.drop or b.drop
    a.inject += b.inject
    a.events += b.events
    a.reason = a.reason or b.reason
    return a
