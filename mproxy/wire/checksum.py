"""Internet checksums (RFC 1071) and incremental updates (RFC 1624).

The one's-complement sum of 16-bit big-endian words equals the data read as
one big integer modulo 0xFFFF (because 2**16 == 1 mod 0xFFFF), so CPython's
C bignum code does the loop: ~1 µs for a full-size segment instead of ~30 µs
for a Python byte loop.
"""

from __future__ import annotations

from collections.abc import Callable
from struct import Struct

_U16 = Struct("!H")


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """One's-complement 16-bit sum of ``data`` (odd length padded with zero)."""
    n = len(data)
    v = int.from_bytes(data, "big")
    if n & 1:
        v <<= 8
    s = (v + initial) % 0xFFFF
    if s == 0 and (v or initial):
        return 0xFFFF
    return s


def finish(total: int) -> int:
    """Final checksum value from a one's-complement sum."""
    return (~total) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """One's-complement sum of the IPv4/IPv6 pseudo header."""
    return ones_sum(src + dst, proto + (length & 0xFFFF) + (length >> 16))


def tcp_checksum(src: bytes, dst: bytes, tcp: bytes | bytearray | memoryview) -> int:
    """TCP checksum of a segment whose checksum field is zero (or to verify: 0 = ok)."""
    return finish(ones_sum(tcp, pseudo_header_sum(src, dst, 6, len(tcp))))


def ipv4_header_checksum(hdr: bytes | bytearray | memoryview) -> int:
    return finish(ones_sum(hdr))


CSUM_GOOD, CSUM_UNFILLED, CSUM_BAD = 0, 1, 2


def segment_checksum_state_pure(ip: bytes | bytearray | memoryview, tcp_off: int, end: int, ipver: int,
                                quick: bool = False) -> int:
    """How a captured segment's checksums read: CSUM_GOOD (TCP, and the IPv4 header's, verify),
    CSUM_UNFILLED (the TCP field holds the pseudo-header's sum, as checksum offload leaves it for
    the NIC to finish; IPv4 header good), or CSUM_BAD. ``ip[tcp_off:end]`` is the TCP segment.
    ``quick``: a field that looks unfilled is taken as such without summing the segment (one in
    65,535 good ones reads as unfilled: for captures, where both are taken alike)."""
    # sums as big integers modulo 0xFFFF (see ones_sum), inlined: this runs per captured packet
    if ipver == 4:
        if int.from_bytes(ip[:tcp_off], "big") % 0xFFFF:
            return CSUM_BAD  # a good header sums to 0xFFFF
        pseudo = (int.from_bytes(ip[12:20], "big") + 6 + end - tcp_off) % 0xFFFF or 0xFFFF
    else:
        pseudo = (int.from_bytes(ip[8:40], "big") + 6 + end - tcp_off) % 0xFFFF or 0xFFFF
    field = (ip[tcp_off + 16] << 8) | ip[tcp_off + 17]
    unfilled = field == pseudo or field == pseudo % 0xFFFF
    if quick and unfilled:
        return CSUM_UNFILLED
    v = int.from_bytes(ip[tcp_off:end], "big")
    if (end - tcp_off) & 1:
        v <<= 8
    if (v + pseudo) % 0xFFFF == 0:
        return CSUM_GOOD
    return CSUM_UNFILLED if unfilled else CSUM_BAD


def _accelerated_state() -> Callable[[bytes | bytearray | memoryview, int, int, int, bool], int] | None:
    from ..compiled import accelerator

    return getattr(accelerator(), "segment_checksum_state", None)


segment_checksum_state = _accelerated_state() or segment_checksum_state_pure


def incremental_update(old_csum: int, old_word: int, new_word: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for one changed 16-bit word."""
    s = (~old_csum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def replace_bytes(buf: bytearray, csum_off: int, data_off: int, new: bytes, rel_off: int) -> None:
    """Overwrite ``buf[data_off:data_off+len(new)]`` and fix the checksum at ``csum_off``.

    ``rel_off`` is ``data_off`` relative to the start of the checksummed area,
    which decides the 16-bit word alignment of the change.
    """
    csum = _U16.unpack_from(buf, csum_off)[0]
    start = data_off - (rel_off & 1)
    end = data_off + len(new)
    end += (end - start) & 1
    old = bytes(buf[start:end])
    buf[data_off : data_off + len(new)] = new
    cur = bytes(buf[start:end])
    old_sum = ones_sum(old)
    new_sum = ones_sum(cur)
    csum = incremental_update(csum, old_sum, new_sum)
    _U16.pack_into(buf, csum_off, csum)
