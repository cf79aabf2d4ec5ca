"""The emitted stream: one plain TCP conversation per MPTCP connection.

Stock IDSes (Suricata, Snort 3, Zeek) and ``tshark -z follow,tcp`` only
understand plain TCP, so the rebuilt data-level byte stream of an MPTCP
connection is re-emitted as an ordinary TCP conversation addressed as the
initial subflow: SYN, SYN/ACK, ACK, data in segments of at most ``mss`` bytes,
each followed by the receiver's pure ACK (so no analyser ever sees
unacknowledged data or a full window), then FIN or RST.

Frames are complete Ethernet frames (IDS pcap readers ignore Linux cooked
captures) with synthetic locally-administered MACs. IDSes drop segments with
bad checksums, so checksums are exact; they are computed arithmetically: the
one's-complement sum of 16-bit words is the data read as one big integer
modulo 0xFFFF (2**16 == 1 mod 0xFFFF), so the constant header words are summed
once per direction and a 32-bit sequence number adds in as a plain integer.

Sans-I/O: bytes and timestamps in, ``(ts, frame)`` lists out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from struct import Struct

from mproxy.compiled import accelerator
from mproxy.wire.packet import ACK, FIN, PSH, RST, SYN
from mproxy.wire.rewrite import split_tcp

__all__ = [
    "CLIENT_MAC",
    "SERVER_MAC",
    "TcpEmitter",
    "ethernet_frame",
    "passthrough_frames",
]

CLIENT_MAC = bytes.fromhex("020000000001")  # locally administered, unicast
SERVER_MAC = bytes.fromhex("020000000002")
_ETHERTYPE = {4: b"\x08\x00", 6: b"\x86\xdd"}
_ETH_C2S = {v: SERVER_MAC + CLIENT_MAC + t for v, t in _ETHERTYPE.items()}
_ETH_S2C = {v: CLIENT_MAC + SERVER_MAC + t for v, t in _ETHERTYPE.items()}

_WINDOW = 65535
_TTL = 64
_MASK32 = 0xFFFFFFFF
_MAX_MSS = 65495  # IPv4 total length 65535 - 20 - 20

_U16 = Struct("!H")
_V4_VAR = Struct("!HHHBBH")  # total length, id, DF, TTL, proto, checksum (frame offset 16)
_DF = 0x4000
_TCP_VAR = Struct("!IIBBHH")  # seq, ack, data offset, flags, window, checksum (TCP offset 4)
_IPV4_HDR = Struct("!BBHHHBBH4s4s")
_IPV6_HDR = Struct("!IHBB16s16s")
_TCP_PORTS = Struct("!HH")
_MSS_OPT = Struct("!BBH")


_FOLD_PLANS: dict[int, tuple[tuple[int, int], ...]] = {}


def _fold_plan(n: int) -> tuple[tuple[int, int], ...]:
    """Shifts and masks that halve an ``n``-byte integer down to ~1500 bits.

    ``v % 0xFFFF`` is a per-30-bit-digit hardware division in CPython, the
    single largest cost of a segment; ``(v & mask) + (v >> k)`` with ``k`` a
    multiple of 16 keeps the value mod 0xFFFF and is far cheaper, so fold first.
    """
    plan = []
    bits = (n + 1) * 8
    while bits > 1536:
        k = ((bits >> 1) + 15) & ~15
        plan.append((k, (1 << k) - 1))
        bits = k + 1
    if len(_FOLD_PLANS) < 4096:
        _FOLD_PLANS[n] = tuple(plan)
    return tuple(plan)


def _accelerated() -> Callable[..., tuple[int, int, int]] | None:
    """The compiled segment loop (``mproxy/_accel.c``), if :func:`~mproxy.compiled.accelerator` has it."""
    return getattr(accelerator(), "emit_data", None)


_emit_data = _accelerated()  # None: data_runs' own loop, the reference


def _payload_sum(payload: bytes | memoryview, n: int) -> int:
    """One's-complement sum of ``payload`` (zero-padded to even length), mod 0xFFFF.

    Read little-endian (CPython converts that byte order about twice as fast)
    and byte-swapped at the end: the sum of byte-swapped words is the
    byte-swapped sum (RFC 1071, 2.(B)), and an odd last byte lands in the low
    half of its word, which is the zero padding after the swap.
    """
    v = int.from_bytes(payload, "little")
    plan = _FOLD_PLANS.get(n)
    if plan is None:
        plan = _fold_plan(n)
    for k, m in plan:
        v = (v & m) + (v >> k)
    v %= 0xFFFF
    return ((v & 0xFF) << 8) | (v >> 8)


def passthrough_frames(ip_packet: bytes | memoryview, ipver: int, ts: float, mss: int | None) -> list[tuple[float, bytes]]:
    """A passed-through packet for the sink: as it is, or (``mss`` given) as the wire carries it.

    The live gateway queues GSO packets whole with their checksum left to the
    kernel; with ``mss`` they are cut into segments with filled checksums (see
    :func:`~mproxy.wire.rewrite.split_tcp`), so an IDS that checks both reads them.
    """
    if mss is None:
        return [(ts, ethernet_frame(ip_packet, ipver))]
    return [(ts, ethernet_frame(p, ipver)) for p in split_tcp(ip_packet, mss)]


def _nbytes(payload: bytes | memoryview) -> int:
    return memoryview(payload).nbytes


def ethernet_frame(ip_packet: bytes | memoryview, ipver: int) -> bytes:
    """Wrap a raw IP packet in the emitter's synthetic Ethernet header.

    Lets plain TCP pass through unchanged into an Ethernet pcap whatever the
    input link type (stock IDS readers skip SLL/SLL2).
    """
    try:
        head = _ETH_C2S[ipver]
    except KeyError:
        raise ValueError(f"IP version must be 4 or 6, not {ipver!r}") from None
    return b"".join((head, ip_packet))


@dataclass(slots=True, eq=False)
class _Side:
    """One sending direction: its header template, sums and sequence state."""

    buf: bytearray  # Ethernet + IP + 20-byte TCP header, constant fields filled in
    tcp_off: int
    ip_const: int  # sum (mod 0xFFFF) of the constant IPv4 header words
    tcp_const: int  # pseudo header (addresses, proto) + ports + window, mod 0xFFFF
    isn: int
    seq: int  # next sequence number this side sends
    ip_id: int
    sent: int = 0  # payload bytes emitted
    skipped: int = 0  # bytes jumped over by skip()
    fin: bool = False


def _side(ipver: int, src: bytes, dst: bytes, sport: int, dport: int, from_client: bool, isn: int, ip_id: int) -> _Side:
    eth = (_ETH_C2S if from_client else _ETH_S2C)[ipver]
    if ipver == 4:
        ip = _IPV4_HDR.pack(0x45, 0, 0, 0, _DF, _TTL, 6, 0, src, dst)
        ip_const = int.from_bytes(ip, "big") % 0xFFFF
    else:
        ip = _IPV6_HDR.pack(0x60000000, 0, 6, _TTL, src, dst)
        ip_const = 0
    tcp = _TCP_PORTS.pack(sport, dport) + bytes(16)
    buf = bytearray(eth + ip + tcp)
    tcp_const = (int.from_bytes(src + dst, "big") + 6 + sport + dport + _WINDOW) % 0xFFFF
    return _Side(buf, len(eth) + len(ip), ip_const, tcp_const, isn, (isn + 1) & _MASK32, ip_id)


class TcpEmitter:
    """The plain-TCP conversation that stands for one MPTCP connection.

    Addressed as the connection's initial subflow. Every method returns a list
    of ``(ts, ethernet_frame)``. ISNs and IP IDs are derived from a hash of the
    4-tuple (and ``salt``) unless given, so the same input always gives the same
    output; a conversation resumed after the emitter process was restarted
    gets a salt, so an IDS does not take its SYN for a repeat of the first.
    """

    __slots__ = ("_v4", "_mss", "_c", "_s", "_opened", "_closed", "_reset", "_discarded")

    def __init__(
        self,
        client_addr: bytes,
        client_port: int,
        server_addr: bytes,
        server_port: int,
        *,
        mss: int = 1460,
        client_isn: int | None = None,
        server_isn: int | None = None,
        salt: bytes = b"",
    ) -> None:
        client_addr, server_addr = bytes(client_addr), bytes(server_addr)
        if len(client_addr) not in (4, 16) or len(server_addr) != len(client_addr):
            raise ValueError("addresses must both be 4 (IPv4) or both 16 (IPv6) bytes")
        for p in (client_port, server_port):
            if not 0 <= p <= 0xFFFF:
                raise ValueError(f"port out of range: {p}")
        if not 1 <= mss <= _MAX_MSS:
            raise ValueError(f"mss must be in 1..{_MAX_MSS}, not {mss}")
        ipver = 4 if len(client_addr) == 4 else 6
        h = hashlib.sha256(
            b"mproxy-emitter\0" + client_addr + _U16.pack(client_port) + server_addr + _U16.pack(server_port) + salt
        ).digest()
        c_isn = int.from_bytes(h[0:4], "big") if client_isn is None else client_isn & _MASK32
        s_isn = int.from_bytes(h[4:8], "big") if server_isn is None else server_isn & _MASK32
        c_id, s_id = int.from_bytes(h[8:10], "big"), int.from_bytes(h[10:12], "big")
        self._v4 = ipver == 4
        self._mss = mss
        self._c = _side(ipver, client_addr, server_addr, client_port, server_port, True, c_isn, c_id)
        self._s = _side(ipver, server_addr, client_addr, server_port, client_port, False, s_isn, s_id)
        self._opened = False
        self._closed = False
        self._reset = False
        self._discarded = 0

    # -- state ------------------------------------------------------------
    @property
    def ipver(self) -> int:
        return 4 if self._v4 else 6

    @property
    def opened(self) -> bool:
        """The handshake has been emitted."""
        return self._opened

    @property
    def closed(self) -> bool:
        """Both FINs or an RST have been emitted; nothing more will be."""
        return self._closed

    @property
    def is_open(self) -> bool:
        return self._opened and not self._closed

    @property
    def was_reset(self) -> bool:
        return self._reset

    @property
    def client_fin(self) -> bool:
        return self._c.fin

    @property
    def server_fin(self) -> bool:
        return self._s.fin

    @property
    def client_bytes(self) -> int:
        """Client→server payload bytes emitted (skipped bytes not included)."""
        return self._c.sent

    @property
    def server_bytes(self) -> int:
        """Server→client payload bytes emitted (skipped bytes not included)."""
        return self._s.sent

    @property
    def client_skipped(self) -> int:
        return self._c.skipped

    @property
    def server_skipped(self) -> int:
        return self._s.skipped

    @property
    def discarded(self) -> int:
        """Bytes handed to :meth:`data` after that direction's FIN or the close."""
        return self._discarded

    @property
    def client_isn(self) -> int:
        return self._c.isn

    @property
    def server_isn(self) -> int:
        return self._s.isn

    def next_seq(self, from_client: bool) -> int:
        """Sequence number the next byte from that side will carry."""
        return (self._c if from_client else self._s).seq

    # -- emitting -----------------------------------------------------------
    def _frame(self, s: _Side, seq: int, ack: int, flags: int, payload: bytes | memoryview = b"", opts: bytes = b"") -> bytes:
        """One Ethernet frame from side ``s``; fills the template in place."""
        n = len(payload)
        hl = 20 + len(opts)  # options are always a multiple of 4 bytes
        tcp_len = hl + n
        buf = s.buf
        if self._v4:
            total = 20 + tcp_len
            ipid = s.ip_id
            s.ip_id = (ipid + 1) & 0xFFFF
            _V4_VAR.pack_into(buf, 16, total, ipid, _DF, _TTL, 6, -(s.ip_const + total + ipid) % 0xFFFF)
        else:
            _U16.pack_into(buf, 18, tcp_len)
        # Sum of everything but payload and options; seq/ack add in whole
        # because hi*2**16 + lo == hi + lo (mod 0xFFFF).
        x = s.tcp_const + tcp_len + seq + ack + (hl << 10) + flags
        if n:
            x += _payload_sum(payload, n)
        if opts:
            x += int.from_bytes(opts, "big") % 0xFFFF
        # -x % 0xFFFF == ~sum, and 0 (not 0xFFFF) when the sum is "negative zero".
        _TCP_VAR.pack_into(buf, s.tcp_off + 4, seq, ack, hl << 2, flags, _WINDOW, -x % 0xFFFF)
        if n or opts:
            return b"".join((buf, opts, payload))
        return bytes(buf)

    def open(self, ts: float) -> list[tuple[float, bytes]]:
        """SYN, SYN/ACK, ACK (empty if already opened or closed)."""
        if self._opened or self._closed:
            return []
        self._opened = True
        c, s = self._c, self._s
        mss = _MSS_OPT.pack(2, 4, self._mss)
        f = self._frame
        return [
            (ts, f(c, c.isn, 0, SYN, b"", mss)),
            (ts, f(s, s.isn, (c.isn + 1) & _MASK32, SYN | ACK, b"", mss)),
            (ts, f(c, (c.isn + 1) & _MASK32, (s.isn + 1) & _MASK32, ACK)),
        ]

    def data(self, from_client: bool, payload: bytes | memoryview, ts: float) -> list[tuple[float, bytes]]:
        """``payload`` in segments of at most ``mss`` bytes, PSH on the last,
        each followed by the receiver's pure ACK. Opens implicitly.

        Bytes after that direction's FIN (or after the close) cannot be
        expressed in TCP: they are dropped and counted in :attr:`discarded`.
        """
        return self.data_runs(from_client, ((payload, ts),))

    def data_runs(self, from_client: bool, runs: Iterable[tuple[bytes | memoryview, float]]) -> list[tuple[float, bytes]]:
        """Several payloads of one direction, in order: exactly the frames of one :meth:`data`
        call per ``(payload, ts)``, concatenated, for one set-up (a bulk transfer releases one
        packet's worth at a time, and the set-up costs about a third of a segment)."""
        snd, rcv = (self._c, self._s) if from_client else (self._s, self._c)
        out: list[tuple[float, bytes]] = []
        if self._closed or snd.fin:
            for payload, _ts in runs:
                self._discarded += _nbytes(payload)
            return out
        # The loop inlines _frame for both frames of each pair: this is the hot path.
        mss = self._mss
        sbuf, rbuf = snd.buf, rcv.buf
        stoff, rtoff = snd.tcp_off + 4, rcv.tcp_off + 4
        sconst, rconst = snd.tcp_const, rcv.tcp_const
        v4 = self._v4
        sipc, ripc = snd.ip_const, rcv.ip_const
        pack_ip, pack_tcp, pack16 = _V4_VAR.pack_into, _TCP_VAR.pack_into, _U16.pack_into
        from_bytes = int.from_bytes
        full_plan = _FOLD_PLANS.get(mss)
        if full_plan is None:
            full_plan = _fold_plan(mss)
        join = b"".join
        append = out.append
        emit = _emit_data
        sid = rid = seq = ack = -1  # loaded after the implicit open, which sends frames too
        for payload, ts in runs:
            mv = memoryview(payload)
            if mv.ndim != 1 or mv.itemsize != 1:
                mv = mv.cast("B")  # count bytes, not items
            n = len(mv)
            if not n:
                continue
            if sid < 0:
                if not self._opened:
                    out += self.open(ts)
                sid, rid = snd.ip_id, rcv.ip_id
                seq, ack = snd.seq, rcv.seq
            if emit is not None:
                sid, rid, seq = emit(sbuf, rbuf, stoff, rtoff, v4, sipc, ripc, sconst, rconst, mss, sid, rid, seq,
                                     ack, mv, ts, out)
                snd.sent += n
                continue
            last = n - mss
            off = 0
            while off < n:
                chunk = mv[off : off + mss] if n > mss else mv
                k = len(chunk)
                flags = ACK | PSH if off >= last else ACK
                tcp_len = 20 + k
                if v4:
                    pack_ip(sbuf, 16, tcp_len + 20, sid, _DF, _TTL, 6, -(sipc + tcp_len + 20 + sid) % 0xFFFF)
                    sid = (sid + 1) & 0xFFFF
                else:
                    pack16(sbuf, 18, tcp_len)
                v = from_bytes(chunk, "little")  # payload sum, as _payload_sum
                if k == mss:
                    plan = full_plan
                else:
                    known = _FOLD_PLANS.get(k)
                    plan = known if known is not None else _fold_plan(k)
                for fk, fm in plan:
                    v = (v & fm) + (v >> fk)
                v %= 0xFFFF
                x = sconst + tcp_len + seq + ack + 0x5000 + flags + ((v & 0xFF) << 8) + (v >> 8)
                pack_tcp(sbuf, stoff, seq, ack, 0x50, flags, _WINDOW, -x % 0xFFFF)
                append((ts, join((sbuf, chunk))))
                seq = (seq + k) & _MASK32
                if v4:
                    pack_ip(rbuf, 16, 40, rid, _DF, _TTL, 6, -(ripc + 40 + rid) % 0xFFFF)
                    rid = (rid + 1) & 0xFFFF
                else:
                    pack16(rbuf, 18, 20)
                x = rconst + 20 + ack + seq + 0x5000 + ACK
                pack_tcp(rbuf, rtoff, ack, seq, 0x50, ACK, _WINDOW, -x % 0xFFFF)
                append((ts, bytes(rbuf)))
                off += mss
            snd.sent += n
        if sid >= 0:
            snd.ip_id, rcv.ip_id = sid, rid
            snd.seq = seq
        return out

    def skip(self, from_client: bool, n: int) -> None:
        """Advance that direction by ``n`` bytes without sending them.

        For bytes that never crossed the capture point: the IDS sees a gap,
        as it would for a lost packet.
        """
        if n < 0:
            raise ValueError(f"cannot skip {n} bytes")
        s = self._c if from_client else self._s
        if self._closed or s.fin:
            return
        s.seq = (s.seq + n) & _MASK32
        s.skipped += n

    def _fin(self, a: _Side, b: _Side, ts: float, out: list[tuple[float, bytes]]) -> None:
        """FIN/ACK from ``a`` and ``b``'s pure ACK of it."""
        f = self._frame
        out.append((ts, f(a, a.seq, b.seq, FIN | ACK)))
        a.seq = (a.seq + 1) & _MASK32
        a.fin = True
        out.append((ts, f(b, b.seq, a.seq, ACK)))

    def half_close(self, from_client: bool, ts: float) -> list[tuple[float, bytes]]:
        """FIN from one side only (a DATA_FIN in one direction), ACKed by the other.

        A later :meth:`close` then finishes the other side alone.
        """
        a, b = (self._c, self._s) if from_client else (self._s, self._c)
        if self._closed or a.fin:
            return []
        out = self.open(ts) if not self._opened else []
        self._fin(a, b, ts, out)
        if b.fin:
            self._closed = True
        return out

    def close(self, ts: float, reset: bool = False, from_client: bool = True) -> list[tuple[float, bytes]]:
        """FIN exchange started by ``from_client``'s side, or an RST from it.

        FIN/ACK, FIN/ACK, ACK when neither side has finished; the remaining
        FIN and its ACK after a :meth:`half_close`. Idempotent; opens
        implicitly so the conversation is always complete.
        """
        if self._closed:
            return []
        out = self.open(ts) if not self._opened else []
        a, b = (self._c, self._s) if from_client else (self._s, self._c)
        self._closed = True
        if reset:
            self._reset = True
            out.append((ts, self._frame(a, a.seq, b.seq, RST | ACK)))
            return out
        if a.fin:
            a, b = b, a
        if b.fin:  # only ``a`` still has to finish
            self._fin(a, b, ts, out)
            return out
        f = self._frame
        out.append((ts, f(a, a.seq, b.seq, FIN | ACK)))
        a.seq = (a.seq + 1) & _MASK32
        a.fin = True
        out.append((ts, f(b, b.seq, a.seq, FIN | ACK)))
        b.seq = (b.seq + 1) & _MASK32
        b.fin = True
        out.append((ts, f(a, a.seq, b.seq, ACK)))
        return out
