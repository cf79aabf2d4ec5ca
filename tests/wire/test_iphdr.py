"""IPv4 options and IPv6 extension headers: what a Linux receiver refuses is not read (the packet
is a ``refused_*`` WireError), what it takes is read as before.

Packets come from our encoder (``with_ipv4_options``, ``with_ipv6_headers``, round-tripped here);
the kernel's own verdict on the same shapes is checked on live traffic in
tests/lab/test_unread_bytes_lab.py (``ip_*`` and ``v6_*`` forgeries).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy.wire.build import build_tcp, ipv6_options_header, with_ipv4_options, with_ipv6_headers
from mproxy.wire.checksum import ipv4_header_checksum
from mproxy.wire.errors import ErrorKind, WireError
from mproxy.wire.packet import ACK, PSH, TcpSegment, parse_ip

SRC4, DST4 = bytes([198, 18, 1, 2]), bytes([198, 18, 10, 2])
SRC6, DST6 = bytes.fromhex("20010db8000100000000000000000002"), bytes.fromhex("20010db8000a00000000000000000002")
PAYLOAD = b"UNION SELECT"


def v4(options: bytes) -> bytes:
    return with_ipv4_options(build_tcp(SRC4, DST4, 40000, 80, 1000, 2000, ACK | PSH, payload=PAYLOAD), options)


def v6(headers: list[tuple[int, bytes]]) -> bytes:
    return with_ipv6_headers(build_tcp(SRC6, DST6, 40000, 80, 1000, 2000, ACK | PSH, payload=PAYLOAD), headers)


def read(pkt: bytes) -> TcpSegment:
    seg = parse_ip(memoryview(pkt))
    assert isinstance(seg, TcpSegment), seg
    assert bytes(seg.payload) == PAYLOAD and (seg.sport, seg.dport, seg.seq, seg.ack) == (40000, 80, 1000, 2000)
    return seg


def refused(pkt: bytes, kind: ErrorKind) -> str:
    r = parse_ip(memoryview(pkt))
    assert isinstance(r, WireError) and r.kind is kind, r
    return r.detail


# --------------------------------------------------------------------------- the encoder round-trips
def test_ipv4_options_round_trip() -> None:
    pkt = v4(bytes([1, 148, 4, 0, 0]))  # NOP, Router Alert; padded with End to 8 bytes
    assert pkt[0] == 0x47 and int.from_bytes(pkt[2:4], "big") == len(pkt)
    assert ipv4_header_checksum(pkt[:10] + b"\0\0" + pkt[12:28]) == int.from_bytes(pkt[10:12], "big")
    seg = read(pkt)
    assert seg.tcp_off == 28 and bytes(seg.ip[20:28]) == bytes([1, 148, 4, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        v4(bytes(44))


def test_ipv6_headers_round_trip() -> None:
    dst = ipv6_options_header(bytes([0x1E, 3, 1, 2, 3]))  # an option that says "skip"
    assert (len(dst) + 1) % 8 == 0
    pkt = v6([(0, ipv6_options_header()), (43, bytes([0, 0, 0]) + bytes(4)), (60, dst)])
    seg = read(pkt)
    assert seg.tcp_off == 40 + 8 + 8 + 8 and pkt[6] == 0 and int.from_bytes(pkt[4:6], "big") == len(pkt) - 40
    # every padding length the helper chooses is one Linux takes
    for n in range(0, 20):
        read(v6([(60, ipv6_options_header(bytes([0x1E, n]) + bytes(n)))]))


# --------------------------------------------------------------------------- IPv4 options
@pytest.mark.parametrize("opts,why", [
    (bytes([7, 1]), "length 1"),  # a length below 2
    (bytes([25, 9, 0, 0]), "length 9"),  # past the header (4 bytes of options)
    (bytes([7, 7, 3]) + bytes(4), "record-route"),  # pointer below 4
    (bytes([7, 7, 4]) + bytes(4) + bytes([7, 7, 4]) + bytes(4), "record-route"),  # twice
    (bytes([7, 6, 4]) + bytes(3), "record-route pointer"),  # room for no address
    (bytes([68, 8, 4, 0]) + bytes(4), "timestamp"),  # pointer below 5
    (bytes([68, 8, 5, 1]) + bytes(4), "timestamp pointer"),  # address + stamp need 8 bytes
    (bytes([131, 7, 4]) + bytes(4), "source route"),  # LSRR: accept_source_route is off
    (bytes([137, 7, 4]) + bytes(4), "source route"),  # SSRR
    (bytes([134, 10]) + bytes(8), "CIPSO"),
    (bytes([148, 2]), "router alert"),
])
def test_ipv4_options_linux_refuses(opts: bytes, why: str) -> None:
    assert why in refused(v4(opts), ErrorKind.REFUSED_IP_OPTIONS)


@pytest.mark.parametrize("opts", [
    bytes([1, 1, 1, 0]),  # NOPs, End
    bytes([0, 7, 1]),  # anything after End is not read
    bytes([148, 4, 0, 0]),  # Router Alert
    bytes([7, 7, 4]) + bytes(4),  # Record Route with room for one address
    bytes([7, 7, 8]) + bytes(4),  # ... full
    bytes([68, 12, 5, 0]) + bytes(8),  # Timestamp, stamps only
    bytes([68, 12, 13, 0x10]) + bytes(8),  # ... full, overflow counted
    bytes([130, 11]) + bytes(9),  # Security
    bytes([25, 4, 0, 0]),  # an unknown option: Linux passes it
])
def test_ipv4_options_linux_takes(opts: bytes) -> None:
    read(v4(opts))


# --------------------------------------------------------------------------- IPv6 extension headers
def opt(kind: int, data: bytes = b"") -> bytes:
    return bytes((kind, len(data))) + data


@pytest.mark.parametrize("headers,why", [
    ([(60, ipv6_options_header(opt(0x80, bytes(4))))], "0x80"),  # unknown, "discard + ICMP"
    ([(60, ipv6_options_header(opt(0x41, bytes(4))))], "0x41"),  # unknown, "discard"
    ([(60, ipv6_options_header(opt(0xC9, bytes(16))))], "0xc9"),  # Home Address (needs an xfrm state)
    ([(60, bytes([0]) + bytes([1, 4, 0, 0, 1, 0]))], "PadN"),  # PadN bytes not zero
    ([(60, bytes([1]) + bytes(14))], "padding"),  # 14 Pad1 in a row
    ([(60, bytes([1]) + opt(0x1E, bytes(8)) + bytes([0x1E, 4]))], "past the header"),
    ([(60, ipv6_options_header(*[opt(0x1E)] * 9))], "more than 8"),
    ([(60, ipv6_options_header()), (0, ipv6_options_header())], "not first"),
    ([(0, ipv6_options_header(opt(5, bytes(4))))], "router alert"),  # RA must be 2 bytes
    ([(0, ipv6_options_header(opt(0x07, bytes(8))))], "CALIPSO"),
    ([(0, ipv6_options_header(opt(0xC2, (70000).to_bytes(4, "big"))))], "jumbo"),  # payload length set
    ([(43, bytes([2, 0, 1]) + bytes(4) + bytes(16))], "segments left"),  # type 0, one to go
    ([(43, bytes([2, 4, 0]) + bytes(4) + bytes(16))], "type 4"),  # segment routing
    ([(43, bytes([2, 2, 1]) + bytes(4) + bytes(16))], "type 2"),
    ([(135, bytes([0]) + bytes(6))], "135"),  # Mobility
    ([(140, bytes([0]) + bytes(6))], "140"),  # Shim6
    ([(139, bytes([0]) + bytes(6))], "139"),  # HIP
])
def test_ipv6_headers_linux_refuses(headers: list[tuple[int, bytes]], why: str) -> None:
    assert why in refused(v6(headers), ErrorKind.REFUSED_IPV6_EXTENSION)


@pytest.mark.parametrize("headers", [
    [(60, ipv6_options_header(opt(0x1E, bytes(4))))],  # unknown, "skip"
    [(60, ipv6_options_header(*[opt(0x1E)] * 8))],  # eight options
    [(0, ipv6_options_header(opt(5, bytes(2))))],  # Router Alert
    [(0, ipv6_options_header()), (60, ipv6_options_header()), (43, bytes([0, 0, 0]) + bytes(4))],
    [(43, bytes([2, 0, 0]) + bytes(4) + bytes(16))],  # type 0, no segment left: processed, passed
    [(0, bytes([0]) + bytes([1, 4, 0, 0, 0, 0]))],  # PadN of 6 bytes: the most in a row
])
def test_ipv6_headers_linux_takes(headers: list[tuple[int, bytes]]) -> None:
    read(v6(headers))


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=30), st.sampled_from([0, 60, 43]))
def test_any_extension_header_body_is_read_or_refused(body: bytes, kind: int) -> None:
    """Whatever the options say, a segment or a WireError, never an exception."""
    units = len(body) // 8
    header = bytes([units]) + (body + bytes(6))[: units * 8 + 6]  # (units + 1) * 8 bytes with its first
    r = parse_ip(memoryview(v6([(kind, header)])))
    assert isinstance(r, (TcpSegment, WireError))
