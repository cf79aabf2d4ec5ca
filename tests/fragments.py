"""IP fragments cut from a packet, as a router on a smaller MTU would (IPv4) or a sender (IPv6):
fixtures for the defragmenter's tests and the pipeline fuzz target."""

from __future__ import annotations


def frag_v4(ip: bytes, cuts: list[int], ident: int = 0x4242) -> list[bytes]:
    """IPv4 fragments of ``ip`` at payload offsets ``cuts`` (multiples of 8)."""
    ihl = (ip[0] & 0x0F) * 4
    head, payload = bytearray(ip[:ihl]), ip[ihl:]
    bounds = [0, *sorted(set(cuts)), len(payload)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        h = bytearray(head)
        h[2:4] = (ihl + b - a).to_bytes(2, "big")
        h[4:6] = ident.to_bytes(2, "big")
        h[6:8] = ((0x2000 if b < len(payload) else 0) | a // 8).to_bytes(2, "big")
        h[10:12] = b"\x00\x00"
        out.append(bytes(h) + payload[a:b])
    return out


def frag_v6(ip: bytes, cuts: list[int], ident: int = 0x1234567) -> list[bytes]:
    """IPv6 fragments (a fragment header right after the fixed header)."""
    payload, nxt = ip[40:], ip[6]
    bounds = [0, *sorted(set(cuts)), len(payload)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        h = bytearray(ip[:40])
        h[6] = 44
        h[4:6] = (8 + b - a).to_bytes(2, "big")
        fh = bytes([nxt, 0]) + (a | (1 if b < len(payload) else 0)).to_bytes(2, "big") + ident.to_bytes(4, "big")
        out.append(bytes(h) + fh + payload[a:b])
    return out
