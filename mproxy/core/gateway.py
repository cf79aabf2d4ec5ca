"""Inline decisions for queued packets: policy + tracker + emitter, one verdict per packet.

Sans-I/O: :meth:`Gateway.packet` takes the IP packet the kernel queued and
the time, and returns a :class:`Decision` — the verdict (accept, drop,
accept a rewritten packet), the emitted frames for the IDS sink and log
records. The NFQUEUE adapter only moves bytes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .. import crypto
from ..wire import mptcp as m
from ..wire.errors import WireError
from ..wire.packet import ACK, SYN, TcpSegment, parse_ip, read_mptcp_spans, tcp_md5_signed
from ..wire.rewrite import nop_out, set_ttl, set_window
from .alerts import Alert
from .emitter import passthrough_frames
from .events import Event, Notice, NoticeType
from .inspector import Inspector
from .pipeline import Frames, Pipeline
from .policy import Action, LowTtl, OnMemcap, Policy, UntrustedJoin
from .reactions import Reactions, Responder
from .tracker import TrackerConfig


class Verdict(str, Enum):
    ACCEPT = "accept"
    DROP = "drop"
    ACCEPT_MODIFIED = "accept_modified"
    REPEAT = "repeat"  # back through the hook with ``Decision.mark`` (control queue: steer to a worker)


@dataclass(slots=True)
class Decision:
    verdict: Verdict
    payload: bytes | None = None  # the rewritten packet for ACCEPT_MODIFIED
    frames: Frames = field(default_factory=list)  # emitted stream for the IDS sink
    reason: str = ""
    inject: list[bytes] = field(default_factory=list)  # IP packets to send (MP_FASTCLOSE/RST) before the verdict
    mark: int = 0  # REPEAT: the packet mark's bits under the queue's mark mask


@dataclass(slots=True)
class GatewayStats:
    verdicts: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)  # downgrade, join_refused, allow, ...
    parse_errors: Counter[str] = field(default_factory=Counter)


_ACCEPT = Decision(Verdict.ACCEPT)
_FLOWS_LIMIT = 200_000


class Gateway:
    """One worker's state: every subflow of a connection must reach the same Gateway."""

    def __init__(self, policy: Policy | None = None, tracker: TrackerConfig | None = None, *,
                 passthrough: bool = True, inspector: Inspector | None = None,
                 reactions: Reactions | None = None, split_passthrough: bool = False) -> None:
        self.policy = policy or Policy()
        self.pipeline = Pipeline(tracker, passthrough=passthrough, split_passthrough=split_passthrough)
        self.tracker = self.pipeline.tracker
        # a low-TTL packet leaves with its direction's TTL, so the tracker reads it as any other
        self.tracker.raise_ttl = self.policy.low_ttl == LowTtl.RAISE
        # a packet whose bytes a buffer limit shed is dropped: the tracker keeps its subflow where it was
        self.tracker.drop_shed = self.policy.on_memcap == OnMemcap.DROP
        # the most a receiver's window may offer a sender in the ACKs the gateway forwards (0: as sent)
        tc = self.tracker.config
        self.window_cap = min(tc.ooo_limit, tc.memcap // 4) if self.tracker.drop_shed and self.policy.clamp_window \
            else 0
        self.stats = GatewayStats()
        # connections mproxy decided to leave alone: 4-tuples (both orientations) and tokens
        self._untouched: dict[tuple[bytes, int, bytes, int], Action] = {}
        self._untouched_tokens: set[int] = set()
        self._conn_action: dict[int, Action] = {}
        self.records: list[dict[str, Any]] = []
        # inspector matches, IDS alerts, side channels -> fastclose / log / downgrade-host
        self.responder = Responder(self.tracker, reactions, inspector, self._reaction_record)

    # ------------------------------------------------------------------
    def packet(self, ip: bytes | bytearray | memoryview, ts: float, csum_ready: bool = False,
               iface: int = 0) -> Decision:
        """The verdict on one queued packet. ``csum_ready``: the kernel says its checksums are the
        sender's (not NFQA_SKB_CSUMNOTREADY), so the tracker judges them as the receiver will.
        ``iface``: the interface it came in on (the tracker refuses a subflow's packets that come in
        on another interface than its direction's first: see ``TrackerConfig.pin_interfaces``).
        Several segments the kernel queued merged (GSO) are judged as one packet: every rewrite
        here (a raised TTL, a clamped window) is in place, which the kernel's segmentation takes
        (see QueueAdapter._rewritten)."""
        seg = parse_ip(memoryview(ip), ts)
        if seg is None:
            return self._count(_ACCEPT)
        if isinstance(seg, WireError):
            # not ours to judge: the endpoint's stack drops what it cannot parse
            self.stats.parse_errors[seg.kind.value] += 1
            return self._count(_ACCEPT)
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        left = self._untouched.get(key)
        if left is not None:
            return self._untouched_packet(seg, left)
        if self.responder.killed:
            r = self.responder.killed_packet(seg)
            if r is not None:
                return self._count(Decision(Verdict.DROP if r.drop else Verdict.ACCEPT, None, [], r.reason,
                                            r.inject))
        flags = seg.flags
        chosen: Action | None = None
        if flags & SYN and not flags & ACK:
            d = self._syn(seg, ip)
            if isinstance(d, Decision):
                return self._count(d)
            chosen = d
        tracker = self.tracker
        shed = tracker.shed_bytes
        wrong, low = tracker.stats.wrong_interface, tracker.stats.low_ttl
        events = tracker.process(seg, csum_ready, iface)
        if tracker.stats.wrong_interface != wrong:
            # refused by the tracker, so the receiver must not get it either (and a spoofed packet
            # should not): counted, its notice logged once per subflow direction
            self.stats.actions["wrong_interface_drop"] += 1
            frames = self.pipeline.handle(events)
            self.records.extend(self.pipeline.drain_records())
            return self._count(Decision(Verdict.DROP, None, frames, "wrong interface"))
        if chosen is not None:
            self._remember(seg, chosen)
        verdict = Verdict.ACCEPT
        reason = ""
        inject: list[bytes] = []
        if events or (flags & SYN and not flags & ACK and seg.payload_len):  # (a Fast Open SYN is judged too)
            verdict, reason = self._judge(seg, events)
            # inline verdict: bytes this packet made in-order pass the inspector before it is accepted
            r = self.responder.judge(seg, events)
            if r is not None:
                events = events + r.events
                inject = r.inject
                if r.drop:
                    verdict, reason = Verdict.DROP, r.reason
        if verdict == Verdict.ACCEPT and tracker.shed_bytes != shed and self.policy.on_memcap == OnMemcap.DROP:
            # a buffer limit kept bytes of this packet out: dropped, so the sender resends them once
            # there is room and the server never holds bytes the IDS did not see. Counted, not logged
            # per packet (a flood would drown the log; one memcap notice per connection says it happened)
            verdict, reason = Verdict.DROP, "memcap"
            self.stats.actions["memcap_drop"] += 1
        payload = None
        if verdict == Verdict.ACCEPT and tracker.raise_ttl and tracker.stats.low_ttl != low:
            # it may expire before the receiver (a TTL insertion): it leaves with the TTL its subflow
            # direction's first packet came with, which reached the receiver
            buf = bytearray(ip)
            set_ttl(buf, tracker.last_ttl_floor)
            verdict, payload, reason = Verdict.ACCEPT_MODIFIED, bytes(buf), "low TTL raised"
            self.stats.actions["ttl_raised"] += 1
        if self.window_cap and verdict != Verdict.DROP and flags & ACK and seg.window << 14 > self.window_cap:
            clamped = self._clamp_window(seg, payload if payload is not None else ip)
            if clamped is not None:
                verdict, payload = Verdict.ACCEPT_MODIFIED, clamped
                reason = reason or "window clamped"
        frames = self.pipeline.handle(events)
        self.records.extend(self.pipeline.drain_records())
        return self._count(Decision(verdict, payload, frames, reason, inject))

    def _clamp_window(self, seg: TcpSegment, ip: bytes | bytearray | memoryview) -> bytes | None:
        """``ip`` with the window its ACK advertises lowered to ``window_cap``, or None to leave it.

        Inline under on_memcap = "drop", a sender with more in flight past a hole in its stream than
        the tracker may buffer could stall for good: what comes after the hole is refused, and on a
        subflow that refusal is a hole the receiver reads nothing past, even the bytes that would
        fill the stream's hole (a path failed holding them). The receiver's DATA_ACK stays at that
        hole, and a sender keeps its data within DATA_ACK + window (RFC 8684: the receive window is
        relative to the DATA_ACK; Linux's msk wnd_end), so a window of at most the cap keeps what it
        sends past the hole within what may be buffered. The right edge it advertises never moves
        back: the receiver's own does not, and the cap is fixed. GSO packets are clamped too (the
        kernel segments them again; see QueueAdapter._rewritten): data sent one way carries the
        window of the other, and an MPTCP sender keeps the largest right edge it was shown, so one
        packet left as sent would open it for good. Only for subflows of tracked MPTCP connections
        whose handshake was seen (the window scale is known), and never for a TCP-MD5 signed
        segment (its signature covers the window)."""
        hit = self.tracker.subflow_of(seg)
        if hit is None:
            return None
        sf, d = hit
        mine, theirs = sf.dirs[d], sf.dirs[d ^ 1]
        if sf.conn is None or sf.plain or sf.refused or seg.flags & SYN or mine.isn is None or theirs.isn is None:
            return None
        ws = mine.wscale if mine.wscale is not None and theirs.wscale is not None else 0
        top = max(self.window_cap >> ws, 1)
        if seg.window <= top or tcp_md5_signed(seg):
            return None
        buf = bytearray(ip)
        set_window(buf, seg.tcp_off, top)
        self.stats.actions["window_clamped"] += 1
        return bytes(buf)

    def alert(self, a: Alert, ts: float) -> Decision | None:
        """An external IDS alert (``[actions] on_alert``); None when it names no live MPTCP connection.

        The Decision's verdict means nothing (no packet is waiting); its frames
        go to the sink and its packets are injected.
        """
        r, _conn = self.responder.alert(a, ts)
        if r is None:
            return None
        frames = self.pipeline.handle(r.events)
        self.records.extend(self.pipeline.drain_records())
        return Decision(Verdict.ACCEPT, None, frames, r.reason, r.inject)

    def flush(self, ts: float) -> Frames:
        frames = self.pipeline.finish(ts)
        self.records.extend(self.pipeline.drain_records())
        return frames

    def expire(self, ts: float) -> Frames:
        frames = self.pipeline.handle(self.tracker.expire(ts))
        self.records.extend(self.pipeline.drain_records())
        return frames

    def drain_records(self) -> list[dict[str, Any]]:
        recs, self.records = self.records, []
        return recs

    # ------------------------------------------------------------------
    def _reaction_record(self, rec: dict[str, Any]) -> None:
        self.stats.actions[rec["action"]] += 1
        self.records.append(rec)

    def _count(self, d: Decision) -> Decision:
        self.stats.verdicts[d.verdict.value] += 1
        return d

    def _action_record(self, action: str, seg: TcpSegment, detail: str, conn_id: int | None = None) -> None:
        self.stats.actions[action] += 1
        self.records.append({"event": "action", "ts": round(seg.ts, 6), "action": action, "conn_id": conn_id,
                             "src": seg.src_text, "sport": seg.sport, "dst": seg.dst_text, "dport": seg.dport,
                             "detail": detail})

    def _syn(self, seg: TcpSegment, ip: bytes | bytearray | memoryview) -> Decision | Action | None:
        """Policy on a connection's or subflow's first SYN.

        A Decision is final; an Action (for a new connection) or None means the
        SYN goes on to the tracker.
        """
        spans, _ = read_mptcp_spans(seg)  # as the endpoint reads them: a damaged option ends the walk
        if not spans:
            return None
        opts = [(off, ln, m.decode(seg.ip[off : off + ln], seg.flags)) for off, ln in spans]
        cap = next(((off, ln, o) for off, ln, o in opts if isinstance(o, m.MpCapable)), None)
        join = next((o for _, _, o in opts if isinstance(o, m.MpJoin)), None)
        if cap is not None:
            action, rule = self.policy.decide(seg.src, seg.dst, seg.dport)
            if self.responder.hosts and action != Action.ALLOW:
                until = self.responder.host_downgraded(seg.src, seg.ts)
                if until is not None:
                    action, rule = Action.DOWNGRADE, f"downgrade-host until {until:.0f}"
            if action == Action.DOWNGRADE:
                buf = bytearray(seg.ip)
                off, ln, _ = cap
                nop_out(buf, seg.tcp_off, off, ln)
                self._leave(seg, Action.DOWNGRADE)
                self._action_record("downgrade", seg, f"MP_CAPABLE removed ({rule})")
                if len(buf) != len(ip):  # the kernel gave us more than the IP packet: keep the tail
                    buf += bytes(ip[len(buf):])
                return Decision(Verdict.ACCEPT_MODIFIED, bytes(buf), [], "downgrade")
            if action == Action.ALLOW:
                self._leave(seg, Action.ALLOW)
                self._action_record("allow", seg, f"left alone ({rule})")
                return _ACCEPT
            return action
        if join is not None and join.phase == m.JoinPhase.SYN:
            token = join.token or 0
            if self.responder.killed_tokens and self.responder.token_killed(token, seg.ts):
                return self._refuse_join(seg, None, f"token 0x{token:08x} of a fast-closed connection")
            if token in self._untouched_tokens:
                self._leave(seg, Action.ALLOW)
                return _ACCEPT
            conn = self.tracker.join_target(token, seg.dst)
            conn_action = self._conn_action.get(conn.id, self.policy.default) if conn is not None else None
            if not self.policy.is_trusted(seg.src) and self.policy.untrusted_join == UntrustedJoin.REFUSE:
                return self._refuse_join(seg, conn, "join from an untrusted address")
            if conn_action == Action.BLOCK_JOINS:
                return self._refuse_join(seg, conn, "joins blocked by policy")
            if conn is None and self._verifying():
                return self._refuse_join(seg, None, f"unknown token 0x{token:08x}")
        return None

    def _verifying(self) -> bool:
        return self.policy.default == Action.VERIFY_JOINS or any(
            r.action == Action.VERIFY_JOINS for r in self.policy.rules)

    def _refuse_join(self, seg: TcpSegment, conn: Any, why: str) -> Decision:
        self._action_record("join_refused", seg, why, conn.id if conn is not None else None)
        return Decision(Verdict.DROP, None, [], why)

    def _leave(self, seg: TcpSegment, action: Action) -> None:
        if len(self._untouched) > _FLOWS_LIMIT:
            self._untouched.clear()  # bounded: forgotten flows are simply tracked as plain TCP
        self._untouched[(seg.src, seg.sport, seg.dst, seg.dport)] = action
        self._untouched[(seg.dst, seg.dport, seg.src, seg.sport)] = action

    def _untouched_packet(self, seg: TcpSegment, action: Action) -> Decision:
        if action == Action.ALLOW and seg.flags & SYN and seg.flags & ACK:
            # learn the server's key so the allowed connection's joins are allowed too
            for off, ln in read_mptcp_spans(seg)[0]:
                o = m.decode(seg.ip[off : off + ln], seg.flags)
                if isinstance(o, m.MpCapable) and o.sender_key is not None:
                    self._untouched_tokens.add(crypto.key_token(o.sender_key, o.version))
        frames: Frames = []
        if action == Action.DOWNGRADE and self.pipeline.passthrough:
            frames = passthrough_frames(seg.ip, seg.ipver, seg.ts, self.pipeline.passthrough_mss)
        return self._count(Decision(Verdict.ACCEPT, None, frames))

    def _remember(self, seg: TcpSegment, action: Action) -> None:
        """Keep the policy action of the connection a SYN just opened (bounded by live connections)."""
        hit = self.tracker.subflow_of(seg)
        if hit is None or hit[0].conn is None:
            return
        self._conn_action[hit[0].conn.id] = action
        if len(self._conn_action) > 2 * self.tracker.config.max_connections:
            live = self.tracker.connections
            self._conn_action = {k: v for k, v in self._conn_action.items() if k in live}

    def action_of(self, conn_id: int) -> Action:
        return self._conn_action.get(conn_id, self.policy.default)

    def _judge(self, seg: TcpSegment, events: list[Event]) -> tuple[Verdict, str]:
        """Per-packet verdict from what the tracker saw in it."""
        for e in events:
            if isinstance(e, Notice) and e.type == NoticeType.JOIN_HMAC_FAILURE:
                action = self._conn_action.get(e.conn_id or 0, self.policy.default)
                if action == Action.VERIFY_JOINS:
                    self._action_record("join_refused", seg, "MP_JOIN HMAC does not verify", e.conn_id)
                    return Verdict.DROP, "join HMAC"
        return Verdict.ACCEPT, ""
