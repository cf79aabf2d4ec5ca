"""Kill a whole MPTCP connection: MP_FASTCLOSE (or RST) packets for both ends of every subflow.

Sans-I/O: :func:`build_fastclose` turns what the tracker knows about a
connection into IP packets; the live adapter injects them
(:mod:`mproxy.io.inject`). Why every subflow and both directions: an RST on
one subflow only makes MPTCP move the traffic to the others; MP_FASTCLOSE
names the whole connection, and each end needs its own copy since mproxy is
in the middle and impersonates each end to the other.

* v1 (RFC 8684 3.5): on every subflow, an RST carrying MP_FASTCLOSE with the
  *receiver's* key (to the server: the server's key; to the client: the
  client's key) and MP_TCPRST "administratively prohibited".
* v0 (RFC 6824 3.5): an ACK carrying MP_FASTCLOSE on one subflow, plain RSTs
  on the others; the receiver answers the ACK with an RST and tears down.
* Keys unknown (the handshake was not seen): in-window RSTs on every subflow,
  and the record says so.

In window: Linux accepts an RST only when its sequence number is exactly the
receiver's ``rcv_nxt`` (RFC 5961; otherwise it sends a challenge ACK and the
MP_FASTCLOSE is never read). So each packet carries the sender side's next
sequence number as tracked (the end of the last segment that crossed the
gateway, or the receiver's own later ACK), and the other side's as ACK.
The gateway answers anything a killed connection still sends with an RST at
the ACK number that packet carried — the exact ``rcv_nxt`` — in case the
first guess missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..wire import mptcp as m
from ..wire.build import build_tcp, tcp_options
from ..wire.packet import ACK, RST, addr_text
from .reassembler import MASK32
from .tracker import Connection, Subflow, SubflowDir

__all__ = ["CloseMode", "SubflowEnds", "CloseSet", "build_fastclose", "close_set", "next_seq", "answer_rst", "seq_at_or_after"]


class CloseMode(str, Enum):
    FASTCLOSE = "mp_fastclose"  # keys known: MP_FASTCLOSE to both ends
    PARTIAL = "partial"  # only one end's key known: MP_FASTCLOSE to that end, RSTs to the other
    RST = "rst_only"  # no keys (handshake not seen): RSTs on every subflow


@dataclass(frozen=True, slots=True)
class SubflowEnds:
    """One subflow as two ends: ``a`` initiated it. ``*_next`` is the next sequence number each
    end will send (None: unknown); ``*_key`` the MPTCP key of the host at that end."""

    a: bytes
    a_port: int
    b: bytes
    b_port: int
    a_next: int | None
    b_next: int | None
    a_key: int | None = None
    b_key: int | None = None

    def tuple_text(self) -> dict[str, object]:
        return {"src": addr_text(self.a), "sport": self.a_port, "dst": addr_text(self.b), "dport": self.b_port}


@dataclass(slots=True)
class CloseSet:
    """The packets that kill one connection, and what the action record should say about them."""

    packets: list[bytes] = field(default_factory=list)
    mode: CloseMode = CloseMode.FASTCLOSE
    subflows: list[dict[str, object]] = field(default_factory=list)  # 4-tuple + packets sent each way
    skipped: list[str] = field(default_factory=list)  # directions with no usable sequence number


def seq_at_or_after(a: int, b: int) -> bool:
    """Is sequence number ``a`` at or after ``b`` (mod 2^32)?"""
    return ((a - b) & MASK32) < 0x80000000


def next_seq(d: SubflowDir) -> int | None:
    """Next sequence number the sender of direction ``d`` will use, as far as the gateway knows.

    The end of the last segment that crossed (plus one for a FIN), or the
    receiver's acknowledgment when that is further (bytes we missed), or the
    ISN + 1 when nothing was sent yet.
    """
    cand: int | None = None
    if d.last_end is not None:
        cand = d.last_end
    elif d.isn is not None:
        cand = (d.isn + 1) & MASK32
    if cand is not None and d.fin:
        cand = (cand + 1) & MASK32
    if d.peer_ack is not None and (cand is None or seq_at_or_after(d.peer_ack, cand)):
        cand = d.peer_ack
    return cand


def _ends(conn: Connection, sf: Subflow, overrides: dict[tuple[bytes, int, bytes, int], int]) -> SubflowEnds:
    k = sf.key
    a_next = overrides.get(k, next_seq(sf.dirs[0]))
    b_next = overrides.get((k[2], k[3], k[0], k[1]), next_seq(sf.dirs[1]))
    # the initiator is the client's host unless the subflow was opened by the server
    a_key, b_key = (conn.server_key, conn.client_key) if sf.flipped else (conn.client_key, conn.server_key)
    return SubflowEnds(k[0], k[1], k[2], k[3], a_next, b_next, a_key, b_key)


def close_set(conn: Connection, overrides: dict[tuple[bytes, int, bytes, int], int] | None = None
              ) -> CloseSet:
    """The kill packets for a tracked connection (every subflow not already reset).

    ``overrides`` maps a direction's 4-tuple (sender first) to the sequence
    number to use: the gateway passes the start of a packet it drops, which
    the receiver will never see.
    """
    subs = [sf for sf in conn.subflows if not sf.reset and not sf.refused] or list(conn.subflows)
    ends = [_ends(conn, sf, overrides or {}) for sf in subs]
    return build_fastclose(ends, conn.version)


def build_fastclose(subflows: list[SubflowEnds], version: int | None) -> CloseSet:
    """MP_FASTCLOSE/RST packets for both ends of every subflow (server-bound ones first per subflow)."""
    out = CloseSet()
    keys_known = [k is not None for s in subflows for k in (s.a_key, s.b_key)]
    if keys_known and all(keys_known):
        out.mode = CloseMode.FASTCLOSE
    elif any(keys_known):
        out.mode = CloseMode.PARTIAL
    else:
        out.mode = CloseMode.RST
    v0_carrier_used = False
    for s in subflows:
        info = dict(s.tuple_text())
        sent = {"to_responder": "", "to_initiator": ""}
        # v0: the first subflow whose sequence numbers are known both ways carries the ACK + MP_FASTCLOSE
        v0_carrier = (version == 0 and not v0_carrier_used and s.a_next is not None and s.b_next is not None
                      and s.a_key is not None and s.b_key is not None)
        if v0_carrier:
            v0_carrier_used = True
        # towards b (the responder, usually the server) from a, then towards a from b
        for name, src, sport, dst, dport, seq, ack, rkey in (
                ("to_responder", s.a, s.a_port, s.b, s.b_port, s.a_next, s.b_next, s.b_key),
                ("to_initiator", s.b, s.b_port, s.a, s.a_port, s.b_next, s.a_next, s.a_key)):
            if seq is None:
                out.skipped.append(f"{addr_text(src)}:{sport} -> {addr_text(dst)}:{dport}: sequence unknown")
                continue
            pkt, kind = _packet(src, sport, dst, dport, seq, ack, rkey, version, v0_carrier)
            out.packets.append(pkt)
            sent[name] = kind
        info.update(sent)
        out.subflows.append(info)
    return out


def _packet(src: bytes, sport: int, dst: bytes, dport: int, seq: int, ack: int | None, receiver_key: int | None,
            version: int | None, v0_carrier: bool) -> tuple[bytes, str]:
    flags = RST | ACK if ack is not None else RST
    ackv = ack or 0
    if receiver_key is None:
        opts = m.MpTcpRst(0, m.ResetReason.ADMINISTRATIVELY_PROHIBITED).encode() if version == 1 else b""
        return build_tcp(src, dst, sport, dport, seq, ackv, flags, 0, tcp_options(opts) if opts else b""), "rst"
    fc = m.MpFastclose(receiver_key).encode()
    if version == 0:
        if v0_carrier:
            return build_tcp(src, dst, sport, dport, seq, ackv, ACK, 0, tcp_options(fc)), "ack+mp_fastclose"
        return build_tcp(src, dst, sport, dport, seq, ackv, flags, 0), "rst"
    rst = m.MpTcpRst(0, m.ResetReason.ADMINISTRATIVELY_PROHIBITED).encode()
    return build_tcp(src, dst, sport, dport, seq, ackv, flags, 0, tcp_options(fc, rst)), "rst+mp_fastclose"


def answer_rst(src: bytes, sport: int, dst: bytes, dport: int, seq: int, ack: int | None,
               receiver_key: int | None, version: int | None) -> bytes:
    """An RST (with MP_FASTCLOSE when the key is known, v1) to a killed connection's late packet:
    ``seq`` is that packet's ACK number, i.e. exactly what its sender expects next."""
    pkt, _ = _packet(src, sport, dst, dport, seq, ack, receiver_key if version == 1 else None, version, False)
    return pkt
