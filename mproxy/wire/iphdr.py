"""IPv4 options and IPv6 extension headers a Linux receiver refuses.

A packet Linux drops before TCP sees it carries no bytes for the stream, so
mproxy must not read it either: else a forger puts bytes in front of the IDS
that the server never reads, ahead of other bytes for the same sequence
numbers (an insertion). Each function returns why the packet is refused, or
None. They follow the kernel's receive path with its default settings:

* IPv4 (``ip_options_compile`` for a received packet, then
  ``ip_rcv_options``): an option whose length lies, a record-route or
  timestamp option with a bad pointer or twice, a source route (refused
  unless ``accept_source_route`` is set, which it is not by default; a router
  checks this before forwarding, so live such packets never reach the queue),
  CIPSO (refused unless a DOI is configured).
* IPv6 hop-by-hop and destination options (``ip6_parse_tlv``): an option
  whose length lies, more than 7 bytes of padding in a row, PadN bytes that
  are not zero, more than 8 options, an unknown option whose type's top two
  bits say "discard" (01, 10, 11); in hop-by-hop, a Router Alert whose length
  is not 2, a bad Jumbo Payload, CALIPSO (no DOI configured), a misaligned
  IOAM; a hop-by-hop header that is not the first. Every router checks
  hop-by-hop options, so live those never reach the queue.
* IPv6 routing header (``ipv6_rthdr_rcv``): segment routing (types 3, 4: off
  by default), type 2, or segments left (the destination would forward it).
* IPv6 next headers with no handler in Linux (Mobility 135, HIP 139, Shim6 140).

Only reached for packets that have options or extension headers; the plain
20- and 40-byte headers never come here.
"""

from __future__ import annotations

__all__ = ["ipv4_options_refused", "ipv6_header_refused", "ipv6_options_refused", "ipv6_routing_refused"]

# IPv4 option types (RFC 791 and later)
_END, _NOP, _RR, _TS, _SEC, _LSRR, _CIPSO, _SID, _SSRR, _RA = 0, 1, 7, 68, 130, 131, 134, 136, 137, 148
_TS_ONLY, _TS_AND_ADDR, _TS_PRESPEC = 0, 1, 3

# IPv6 TLV option types
_PAD1, _PADN, _ROUTER_ALERT, _CALIPSO, _IOAM, _JUMBO = 0, 1, 5, 0x07, 0x31, 0xC2
_MAX_TLVS = 8  # net.ipv6.max_{hbh,dst}_opts_number's default

_HOPOPTS, _ROUTING, _DSTOPTS = 0, 43, 60
_NO_HANDLER = frozenset((135, 139, 140))


def ipv4_options_refused(ip: memoryview | bytes, ihl: int) -> str | None:
    """Why Linux drops an IPv4 packet for its options (``ip[20:ihl]``), or None."""
    off, end = 20, ihl
    rr = ts = srr = cipso = False
    while off < end:
        kind = ip[off]
        if kind == _END:
            break
        if kind == _NOP:
            off += 1
            continue
        if end - off < 2:
            return f"option {kind} cut at the header's end"
        olen = ip[off + 1]
        if olen < 2 or olen > end - off:
            return f"option {kind} of length {olen}"
        if kind == _LSRR or kind == _SSRR:
            if olen < 3 or ip[off + 2] < 4 or srr:
                return "bad source route option"
            srr = True
        elif kind == _RR:
            if rr or olen < 3 or ip[off + 2] < 4:
                return "bad record-route option"
            ptr = ip[off + 2]
            if ptr <= olen and ptr + 3 > olen:
                return "record-route pointer past the option"
            rr = True
        elif kind == _TS:
            if ts or olen < 4 or ip[off + 2] < 5:
                return "bad timestamp option"
            ptr, flag = ip[off + 2], ip[off + 3] & 0x0F
            if ptr <= olen:
                if ptr + 3 > olen or flag in (_TS_AND_ADDR, _TS_PRESPEC) and ptr + 7 > olen:
                    return "timestamp pointer past the option"
            ts = True
        elif kind == _RA:
            if olen < 4:
                return "router alert shorter than 4"
        elif kind == _CIPSO:
            if cipso:
                return "two CIPSO options"
            cipso = True
        off += olen
    if srr:
        return "source route (accept_source_route is off)"
    if cipso:
        return "CIPSO option (no DOI configured)"
    return None


def ipv6_header_refused(ip: memoryview | bytes, nxt: int, off: int, hlen: int, plen: int) -> str | None:
    """Why Linux drops an IPv6 packet for its extension header of type ``nxt`` at
    ``ip[off:off + hlen]`` (whole in ``ip``), or None; ``plen`` is the fixed header's payload length."""
    if nxt == _HOPOPTS or nxt == _DSTOPTS:
        if nxt == _HOPOPTS and off != 40:
            return "hop-by-hop options not first"
        return ipv6_options_refused(ip, off, hlen, nxt == _HOPOPTS, plen)
    if nxt == _ROUTING:
        return ipv6_routing_refused(ip, off)
    if nxt in _NO_HANDLER:
        return f"next header {nxt} (no handler)"
    return None


def ipv6_options_refused(ip: memoryview | bytes, off: int, hlen: int, hop_by_hop: bool, plen: int) -> str | None:
    """Why Linux drops an IPv6 packet for the hop-by-hop or destination options header at
    ``ip[off:off + hlen]``, or None."""
    p, end = off + 2, off + hlen
    pad = tlvs = 0
    while p < end:
        kind = ip[p]
        if kind == _PAD1:
            pad += 1
            if pad > 7:
                return "more than 7 bytes of padding"
            p += 1
            continue
        if end - p < 2:
            return f"option {kind} cut at the header's end"
        olen = ip[p + 1] + 2
        if olen > end - p:
            return f"option {kind} of length {olen - 2} past the header"
        if kind == _PADN:
            pad += olen
            if pad > 7:
                return "more than 7 bytes of padding"
            if any(ip[p + 2 : p + olen]):
                return "PadN bytes not zero"
        else:
            tlvs += 1
            if tlvs > _MAX_TLVS:
                return f"more than {_MAX_TLVS} options"
            if hop_by_hop and kind == _ROUTER_ALERT:
                if olen != 4:
                    return "router alert of the wrong length"
            elif hop_by_hop and kind == _JUMBO:
                if olen != 6 or plen != 0 or int.from_bytes(ip[p + 2 : p + 6], "big") <= 0xFFFF:
                    return "bad jumbo payload option"
            elif hop_by_hop and kind == _CALIPSO:
                return "CALIPSO option (no DOI configured)"
            elif hop_by_hop and kind == _IOAM:
                if p & 3:
                    return "IOAM option not 4-byte aligned"
            elif kind >> 6:
                return f"unknown option 0x{kind:02x} that says discard"
            pad = 0
        p += olen
    return None


def ipv6_routing_refused(ip: memoryview | bytes, off: int) -> str | None:
    """Why Linux drops an IPv6 packet for the routing header at ``ip[off:]``, or None."""
    rtype, left = ip[off + 2], ip[off + 3]
    if rtype in (3, 4):
        return f"routing header type {rtype} (segment routing is off)"
    if rtype == 2:
        return "routing header type 2 (mobile IPv6)"
    if left:
        return f"routing header type {rtype} with {left} segments left"
    return None
