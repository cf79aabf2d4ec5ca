"""A compact DSL for tracker tests: packets of a synthetic MPTCP connection, built with our encoder.

``Session`` plays both endpoints: it hands out the IP packets of the
handshake, joins, data segments with DSS mappings, DATA_FIN and FIN, with
consistent keys, tokens, nonces, HMACs and sequence numbers, so a test reads
as "packets in -> events out".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from mproxy import crypto
from mproxy.core.events import DataReleased, Direction, Event, Notice
from mproxy.core.tracker import Tracker
from mproxy.wire import mptcp as m
from mproxy.wire.build import build_tcp, tcp_options, timestamp_option
from mproxy.wire.packet import ACK, FIN, RST, SYN, TcpSegment, parse_ip

MASK64 = (1 << 64) - 1


def seg(ip: bytes, ts: float = 0.0) -> TcpSegment:
    s = parse_ip(memoryview(ip), ts)
    assert isinstance(s, TcpSegment), s
    return s


@dataclass
class Sub:
    client: tuple[bytes, int]
    server: tuple[bytes, int]
    isn: list[int]  # [client isn, server isn]
    next_rel: list[int] = field(default_factory=lambda: [1, 1])
    addr_id: int = 0
    nonce: tuple[int, int] = (0, 0)


class Session:
    def __init__(self, version: int = 1, ipver: int = 4, *, client_key: int = 0x1122334455667788,
                 server_key: int = 0x99AABBCCDDEEFF00, csum: bool = False, dsn64: bool = True,
                 sport: int = 40000, dport: int = 80, timestamps: bool = False, ack64: bool = True,
                 sack: bool = True, wscale: int | None = None) -> None:
        self.version = version
        self.sack = sack  # the SYNs offer SACK (SACK_PERM), as Linux's do by default
        self.wscale = wscale  # both SYNs announce this window scale (None: no option, windows unscaled)
        self.ipver = ipver
        self.ck, self.sk = client_key, server_key
        self.csum = csum
        self.dsn64 = dsn64
        self.timestamps = timestamps
        self.ack64 = ack64
        self._ack_mask = MASK64 if ack64 else 0xFFFFFFFF
        self.idsn = [(crypto.key_idsn(client_key, version) + 1) & MASK64,
                     (crypto.key_idsn(server_key, version) + 1) & MASK64]
        self.subs: list[Sub] = []
        self.sport = sport
        self.dport = dport
        self.ts = 1000.0
        self._isn = 1000

    def addr(self, host: int, path: int = 0) -> bytes:
        if self.ipver == 4:
            return ipaddress.IPv4Address(f"198.18.{path}.{host}").packed
        return ipaddress.IPv6Address(f"2001:db8:{path}::{host}").packed

    def _tick(self) -> float:
        self.ts += 0.001
        return self.ts

    def _pkt(self, sub: Sub, from_client: bool, flags: int, opts: list[bytes], payload: bytes = b"",
             rel: int | None = None, ack_rel: int | None = None) -> bytes:
        d = 0 if from_client else 1
        src, dst = (sub.client, sub.server) if from_client else (sub.server, sub.client)
        if rel is None:
            rel = sub.next_rel[d]
        seq = sub.isn[d] + rel
        if flags & SYN:
            seq = sub.isn[d]
        ack = 0
        if flags & ACK:
            ack = sub.isn[d ^ 1] + (sub.next_rel[d ^ 1] if ack_rel is None else ack_rel)
        if self.timestamps and not flags & SYN:  # Linux's layout: NOP NOP timestamp first
            opts = [timestamp_option(int(self.ts * 1000)), *opts]
        if self.sack and flags & SYN:
            opts = [b"\x04\x02", *opts]
        if self.wscale is not None and flags & SYN:
            opts = [bytes([1, 3, 3, self.wscale]), *opts]
        return build_tcp(src[0], dst[0], src[1], dst[1], seq, ack, flags, 65535, tcp_options(*opts), payload)

    # -- handshakes -------------------------------------------------------
    def handshake(self, syn_data: bytes = b"", taken: int | None = None, ack_cap: bool = True) -> list[bytes]:
        """SYN, SYN/ACK, ACK of the initial subflow. ``syn_data``: TCP Fast Open bytes in the SYN, of
        which the server takes ``taken`` (default all; 0: none, to be sent again as data); like
        Linux, relative subflow sequence 1 is then the byte after those taken. ``ack_cap=False``:
        the handshake ACK carries no MPTCP option."""
        sub = Sub((self.addr(2, 1), self.sport), (self.addr(2, 9), self.dport), [self._isn, self._isn + 50000])
        self._isn += 100000
        self.subs.append(sub)
        took = len(syn_data) if taken is None else taken
        flags = m.CAP_H_HMAC | (m.CAP_A_CHECKSUM if self.csum else 0)
        if self.version == 1:
            syn = m.MpCapable(1, flags)
            synack = m.MpCapable(1, flags, self.sk)
        else:
            syn = m.MpCapable(0, flags, self.ck)
            synack = m.MpCapable(0, flags, self.sk)
        ack = m.MpCapable(self.version, flags, self.ck, self.sk)
        first = self._pkt(sub, True, SYN, [syn.encode()], syn_data)
        sub.isn[0] += took  # the bytes the server took lie outside the mapped sequence space
        return [
            first,
            self._pkt(sub, False, SYN | ACK, [synack.encode()]),
            self._pkt(sub, True, ACK, [ack.encode()] if ack_cap else []),
        ]

    def join(self, path: int, *, backup: bool = False, addr_id: int = 1, bad_hmac: bool = False,
             token: int | None = None, server: bytes | None = None) -> list[bytes]:
        """The three packets of an MP_JOIN handshake from client path ``path`` (to ``server``,
        default the server's only address)."""
        sub = Sub((self.addr(2, path + 1), self.sport + 1 + len(self.subs)), (server or self.addr(2, 9), self.dport),
                  [self._isn, self._isn + 50000], addr_id=addr_id, nonce=(0x1000 + path, 0x2000 + path))
        self._isn += 100000
        self.subs.append(sub)
        tok = crypto.key_token(self.sk, self.version) if token is None else token
        ni, nr = sub.nonce
        mac_r = crypto.join_hmac(self.sk, self.ck, nr, ni, self.version)[:8]
        mac_i = crypto.join_hmac(self.ck, self.sk, ni, nr, self.version)[:20]
        if bad_hmac:
            mac_i = bytes(20)
        return [
            self._pkt(sub, True, SYN, [m.MpJoin(m.JoinPhase.SYN, backup, addr_id, tok, ni).encode()]),
            self._pkt(sub, False, SYN | ACK, [m.MpJoin(m.JoinPhase.SYN_ACK, backup, 0, None, nr, mac_r).encode()]),
            self._pkt(sub, True, ACK, [m.MpJoin(m.JoinPhase.ACK, hmac=mac_i).encode()]),
        ]

    # -- data ---------------------------------------------------------------
    def data(self, sf: int, from_client: bool, offset: int, payload: bytes, *, mapping: bool = True,
             map_len: int | None = None, map_rel: int | None = None, rel: int | None = None,
             data_ack: int | None = None, fin: bool = False) -> bytes:
        """A segment of ``payload`` at data offset ``offset`` on subflow ``sf``.

        The mapping covers ``map_len`` bytes from ``map_rel`` (defaults: this
        segment). Subflow sequence advances unless ``rel`` is given.
        """
        sub = self.subs[sf]
        d = 0 if from_client else 1
        r = sub.next_rel[d] if rel is None else rel
        opts: list[bytes] = []
        ack = data_ack
        if ack is None:
            ack = self.idsn[d ^ 1]
        mrel = r if map_rel is None else map_rel
        mlen = len(payload) if map_len is None else map_len
        if mapping:
            dsn = (self.idsn[d] + offset - (r - mrel)) & MASK64
            cs = None
            if self.csum:
                cs = crypto.dss_checksum(dsn, mrel, mlen + (1 if fin else 0), payload) if mlen == len(payload) else 0
            wire_dsn = dsn if self.dsn64 else dsn & 0xFFFFFFFF
            opt = m.dss(ack & self._ack_mask, wire_dsn, mrel, mlen + (1 if fin else 0), checksum=cs, data_fin=fin,
                        ack64=self.ack64,
                        dsn64=self.dsn64)
        else:
            opt = m.dss(ack & self._ack_mask, ack64=self.ack64)
        opts.append(opt.encode())
        pkt = self._pkt(sub, from_client, ACK, opts, payload, rel=r)
        if rel is None:
            sub.next_rel[d] = r + len(payload)
        return pkt

    def data_fin(self, sf: int, from_client: bool, offset: int) -> bytes:
        sub = self.subs[sf]
        d = 0 if from_client else 1
        dsn = (self.idsn[d] + offset) & MASK64
        opt = m.dss(self.idsn[d ^ 1] & self._ack_mask, dsn if self.dsn64 else dsn & 0xFFFFFFFF, 0, 1, data_fin=True,
                    ack64=self.ack64,
                    dsn64=self.dsn64, checksum=0 if self.csum else None)
        return self._pkt(sub, from_client, ACK, [opt.encode()])

    def ack(self, sf: int, from_client: bool, data_ack: int) -> bytes:
        return self._pkt(self.subs[sf], from_client, ACK, [m.dss(data_ack & self._ack_mask, ack64=self.ack64).encode()])

    def fin(self, sf: int, from_client: bool) -> bytes:
        return self._pkt(self.subs[sf], from_client, FIN | ACK, [])

    def rst(self, sf: int, from_client: bool, opts: list[bytes] | None = None) -> bytes:
        return self._pkt(self.subs[sf], from_client, RST | ACK, opts or [])


def lying_tail(pkt: bytes) -> bytes:
    """``pkt`` again with an option whose length lies (kind 253, length 1) after its own options:
    a TCP stack's option walk stops there and keeps what came before."""
    s0 = seg(pkt)
    area = bytes(s0.ip[s0.tcp_off + 20 : s0.tcp_off + s0.hdr_len])
    return build_tcp(s0.src, s0.dst, s0.sport, s0.dport, s0.seq, s0.ack, s0.flags, s0.window,
                     tcp_options(area, bytes((253, 1))), bytes(s0.payload))


def run(tracker: Tracker, packets: list[bytes], *, flush: bool = True) -> list[Event]:
    ev: list[Event] = []
    ts = 1000.0
    for p in packets:
        ts += 0.0001
        ev += tracker.process(seg(p, ts))
    if flush:
        ev += tracker.flush()
    return ev


def streams(events: list[Event]) -> dict[tuple[int, Direction], bytes]:
    out: dict[tuple[int, Direction], bytearray] = {}
    for e in events:
        if isinstance(e, DataReleased):
            out.setdefault((e.conn_id, e.direction), bytearray()).extend(e.data)
    return {k: bytes(v) for k, v in out.items()}


def c2s(events: list[Event]) -> bytes:
    """The client-to-server bytes the events released, of their one connection."""
    (data,) = [v for (_, d), v in streams(events).items() if d == Direction.C2S]
    return data


def notice_types(events: list[Event]) -> list[str]:
    return [e.type.value for e in events if isinstance(e, Notice)]
