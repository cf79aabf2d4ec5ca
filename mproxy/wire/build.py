"""Build IPv4/IPv6 TCP packets with exact checksums from our own option encoder.

For crafting packets (injection of MP_FASTCLOSE/RST, forged joins in tests,
test fixtures) without scapy on the hot path.
"""

from __future__ import annotations

from struct import Struct

from .checksum import ipv4_header_checksum, tcp_checksum
from .packet import ACK

_TCP = Struct("!HHIIBBHHH")
_IPV4 = Struct("!BBHHHBBH4s4s")
_IPV6 = Struct("!IHBB16s16s")
_BLOCK = Struct("!II")


def tcp_options(*opts: bytes) -> bytes:
    """Concatenate encoded options and pad with NOPs to a multiple of 4."""
    raw = b"".join(opts)
    pad = (-len(raw)) % 4
    return raw + b"\x01" * pad


def sack_option(*blocks: tuple[int, int]) -> bytes:
    """NOP NOP SACK (RFC 2018) with up to four (left, right) blocks of 32-bit sequence numbers, the
    layout Linux sends."""
    if not 1 <= len(blocks) <= 4:
        raise ValueError(f"{len(blocks)} SACK blocks (1 to 4 fit)")
    return bytes([1, 1, 5, 2 + 8 * len(blocks)]) + b"".join(
        _BLOCK.pack(left & 0xFFFFFFFF, right & 0xFFFFFFFF) for left, right in blocks)


def timestamp_option(tsval: int, tsecr: int = 0) -> bytes:
    """NOP NOP timestamps (RFC 7323), the layout Linux sends."""
    return bytes([1, 1, 8, 10]) + _BLOCK.pack(tsval & 0xFFFFFFFF, tsecr & 0xFFFFFFFF)


def build_tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int = 0, flags: int = ACK,
              window: int = 65535, options: bytes = b"", payload: bytes = b"", *, ttl: int = 64,
              ip_id: int = 0) -> bytes:
    """A complete IP packet (IPv4 when addresses are 4 bytes, else IPv6) carrying one TCP segment."""
    if len(options) % 4:
        options = tcp_options(options)
    if len(options) > 40:
        raise ValueError(f"{len(options)} bytes of TCP options (max 40)")
    doff = (20 + len(options)) // 4
    tcp = bytearray(_TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, doff << 4, flags, window, 0, 0))
    tcp += options
    tcp += payload
    csum = tcp_checksum(src, dst, tcp)
    tcp[16:18] = csum.to_bytes(2, "big")
    if len(src) == 4:
        total = 20 + len(tcp)
        hdr = bytearray(_IPV4.pack(0x45, 0, total, ip_id & 0xFFFF, 0x4000, ttl, 6, 0, src, dst))
        hdr[10:12] = ipv4_header_checksum(hdr).to_bytes(2, "big")
        return bytes(hdr) + bytes(tcp)
    return _IPV6.pack(6 << 28, len(tcp), 6, ttl, src, dst) + bytes(tcp)


def with_ipv4_options(pkt: bytes, options: bytes) -> bytes:
    """``pkt`` (IPv4 without options, from :func:`build_tcp`) with IP ``options`` after its header,
    padded with End-of-options to a multiple of 4; header length, total length and checksum follow."""
    options += b"\x00" * ((-len(options)) % 4)
    if len(options) > 40:
        raise ValueError(f"{len(options)} bytes of IPv4 options (max 40)")
    hdr = bytearray(pkt[:20]) + options
    hdr[0] = 0x40 | (len(hdr) // 4)
    hdr[2:4] = (len(hdr) + len(pkt) - 20).to_bytes(2, "big")
    hdr[10:12] = b"\x00\x00"
    hdr[10:12] = ipv4_header_checksum(hdr).to_bytes(2, "big")
    return bytes(hdr) + pkt[20:]


def ipv6_options_header(*options: bytes) -> bytes:
    """The body (after the next-header byte) of a hop-by-hop or destination options header holding
    ``options`` (encoded type-length-value), padded with PadN or Pad1 to a multiple of 8 bytes."""
    raw = b"".join(options)
    pad = (-(len(raw) + 2)) % 8
    raw += b"\x00" if pad == 1 else bytes((1, pad - 2)) + bytes(pad - 2) if pad else b""
    return bytes(((len(raw) + 2) // 8 - 1,)) + raw


def with_ipv6_headers(pkt: bytes, headers: list[tuple[int, bytes]]) -> bytes:
    """``pkt`` (IPv6 from :func:`build_tcp`) with extension headers, each ``(type, body after the
    next-header byte)``, between its fixed header and TCP; next headers and payload length follow.
    The TCP checksum stands: no header here changes the pseudo-header (a routing header with segments
    left would, and Linux drops that before reading TCP anyway)."""
    types = [t for t, _ in headers] + [pkt[6]]
    chain = b"".join(bytes((types[i + 1],)) + body for i, (_, body) in enumerate(headers))
    rest = chain + pkt[40:]
    return pkt[:4] + len(rest).to_bytes(2, "big") + bytes((types[0],)) + pkt[7:40] + rest
