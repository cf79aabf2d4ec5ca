"""In-place rewriting of captured/queued IP packets with incremental checksum fixes.

Used by policy actions that change a packet on its way through (``downgrade``
NOPs out MP_CAPABLE). The TCP checksum is updated with RFC 1624 arithmetic over
the changed bytes only, so a packet whose checksum was wrong before (checksum
offload on the sender) stays wrong by the same amount rather than being
"repaired" into something the endpoint would not have sent.
"""

from __future__ import annotations

from .checksum import replace_bytes
from .packet import TCPOPT_NOP

_TCP_CSUM = 16  # offset of the checksum in the TCP header


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
