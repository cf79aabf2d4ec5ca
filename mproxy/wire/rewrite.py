"""In-place rewriting of captured/queued IP packets with incremental checksum fixes.

Used by policy actions that change a packet on its way through (``downgrade``
NOPs out MP_CAPABLE; ``low_ttl = "raise"`` gives a packet its direction's TTL
back; ``clamp_window`` lowers the window an ACK advertises). The TCP checksum is updated with RFC 1624 arithmetic over
the changed bytes only, so a packet whose checksum was wrong before (checksum
offload on the sender) stays wrong by the same amount rather than being
"repaired" into something the endpoint would not have sent.
"""

from __future__ import annotations

from .checksum import ipv4_header_checksum, replace_bytes, tcp_checksum
from .packet import CWR, FIN, PSH, TCPOPT_NOP, TcpSegment, parse_ip

_TCP_CSUM = 16  # offset of the checksum in the TCP header
_TCP_WINDOW = 14


def nop_out(ip: bytearray, tcp_off: int, opt_off: int, length: int) -> None:
    """Overwrite ``length`` bytes at ``ip[opt_off]`` (a TCP option) with NOPs and fix the TCP checksum.

    ``tcp_off`` is the TCP header's offset in ``ip``; the option must lie in
    the TCP options area (after the 20-byte fixed header, within the data
    offset). Raises ``ValueError`` otherwise: that is a caller bug, not input.
    """
    if len(ip) < tcp_off + 20:
        raise ValueError("no TCP header at tcp_off")
    hdr_len = (ip[tcp_off + 12] >> 4) * 4
    if length < 0 or opt_off < tcp_off + 20 or opt_off + length > tcp_off + hdr_len or opt_off + length > len(ip):
        raise ValueError(f"bytes {opt_off}..{opt_off + length} are not inside the TCP options")
    if length:
        replace_bytes(ip, tcp_off + _TCP_CSUM, opt_off, bytes((TCPOPT_NOP,)) * length, opt_off - tcp_off)


def set_ttl(ip: bytearray, ttl: int) -> None:
    """Give the packet TTL (IPv4; its header checksum updated incrementally) or hop limit (IPv6,
    no header checksum) ``ttl``. Raises ``ValueError`` for a buffer that is not an IP packet."""
    if not 0 <= ttl <= 255:
        raise ValueError(f"TTL {ttl} out of range")
    if len(ip) >= 20 and ip[0] >> 4 == 4:
        replace_bytes(ip, 10, 8, bytes((ttl,)), 8)
    elif len(ip) >= 40 and ip[0] >> 4 == 6:
        ip[7] = ttl
    else:
        raise ValueError("not an IPv4 or IPv6 packet")


def set_window(ip: bytearray, tcp_off: int, window: int) -> None:
    """Give the TCP header at ``ip[tcp_off]`` the window field ``window`` (as sent: before
    scaling), its checksum updated incrementally. Raises ``ValueError`` for a value that does not
    fit or a buffer with no TCP header there."""
    if not 0 <= window <= 0xFFFF:
        raise ValueError(f"window {window} out of range")
    if tcp_off < 0 or len(ip) < tcp_off + 20:
        raise ValueError("no TCP header at tcp_off")
    replace_bytes(ip, tcp_off + _TCP_CSUM, tcp_off + _TCP_WINDOW, window.to_bytes(2, "big"), _TCP_WINDOW)


def _store_tcp_checksum(ip: bytearray, tcp_off: int, end: int, src: bytes, dst: bytes) -> None:
    """Zero the TCP checksum field of ``ip`` (TCP from ``tcp_off`` to ``end``), sum, store."""
    ip[tcp_off + _TCP_CSUM : tcp_off + _TCP_CSUM + 2] = b"\0\0"
    csum = tcp_checksum(src, dst, memoryview(ip)[tcp_off:end])
    ip[tcp_off + _TCP_CSUM : tcp_off + _TCP_CSUM + 2] = csum.to_bytes(2, "big")


def fill_tcp_checksum(ip: bytearray) -> bool:
    """Compute the TCP checksum of ``ip`` in full and store it; False when ``ip`` is not a whole TCP packet.

    For packets whose checksum the kernel left partial (``CHECKSUM_PARTIAL``:
    the field holds only the pseudo-header sum, the NIC or the GSO code was to
    finish it): once we rewrite such a packet the kernel sends it as it is.
    """
    seg = parse_ip(memoryview(ip))
    if not isinstance(seg, TcpSegment) or seg.payload_len != seg.wire_payload_len:
        return False
    _store_tcp_checksum(ip, seg.tcp_off, seg.payload_off + seg.payload_len, seg.src, seg.dst)
    return True


def split_tcp(ip: bytes | bytearray | memoryview, mss: int) -> list[bytes]:
    """The TCP packet as the wire would carry it: segments of at most ``mss`` payload bytes, checksums filled.

    What GSO segmentation does to a packet queued whole (``NFQA_CFG_F_GSO``),
    for copies handed to an IDS that checks sizes and checksums: the headers
    repeat with the sequence number advanced, the IPv4 ID incremented and
    the lengths (and the IPv4 header checksum) fixed; CWR stays on the first
    segment, FIN and PSH on the last. Anything that is not a whole TCP packet
    comes back unchanged.
    """
    seg = parse_ip(memoryview(ip))
    if not isinstance(seg, TcpSegment) or seg.payload_len != seg.wire_payload_len or mss < 1:
        return [bytes(ip)]
    head = bytes(ip[: seg.payload_off])
    data = ip[seg.payload_off : seg.payload_off + seg.payload_len]
    n = seg.payload_len
    t, v4 = seg.tcp_off, seg.ipver == 4
    ipid = (head[4] << 8) | head[5] if v4 else 0
    out = []
    for k, i in enumerate(range(0, max(n, 1), mss)):  # one segment also for no payload
        pkt = bytearray(head)
        pkt += data[i : i + mss]
        length = len(pkt)
        if v4:
            pkt[2:4] = length.to_bytes(2, "big")
            pkt[4:6] = ((ipid + k) & 0xFFFF).to_bytes(2, "big")
            pkt[10:12] = b"\0\0"
            pkt[10:12] = ipv4_header_checksum(memoryview(pkt)[:t]).to_bytes(2, "big")
        else:
            pkt[4:6] = (length - 40).to_bytes(2, "big")
        pkt[t + 4 : t + 8] = ((seg.seq + i) & 0xFFFFFFFF).to_bytes(4, "big")
        flags = seg.flags
        if k:
            flags &= ~CWR
        if i + mss < n:
            flags &= ~(FIN | PSH)
        pkt[t + 13] = flags
        _store_tcp_checksum(pkt, t, length, seg.src, seg.dst)
        out.append(bytes(pkt))
    return out
