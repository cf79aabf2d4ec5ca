"""The lab's DSS-stripping middlebox, on packets built by our encoder (no root needed)."""

from __future__ import annotations

import pytest

from mproxy.lab.strip_dss import EXPERIMENTAL_KIND, strip_dss
from mproxy.wire import mptcp as m
from mproxy.wire.build import build_tcp, tcp_options
from mproxy.wire.checksum import tcp_checksum
from mproxy.wire.packet import ACK, TcpSegment, parse_ip

ADDRS = {4: (bytes([198, 18, 1, 2]), bytes([198, 18, 10, 2])),
         6: (bytes.fromhex("20010db8000100000000000000000002"), bytes.fromhex("20010db8001000000000000000000002"))}


def parsed(ip: bytes | bytearray) -> TcpSegment:
    seg = parse_ip(memoryview(ip))
    assert isinstance(seg, TcpSegment), seg
    return seg


def checksum_ok(ip: bytes) -> bool:
    seg = parsed(ip)
    return tcp_checksum(seg.src, seg.dst, seg.ip[seg.tcp_off :]) == 0  # the sum over a right one is 0


@pytest.mark.parametrize("ipver", [4, 6])
def test_dss_becomes_an_option_receivers_ignore_and_the_checksum_stays_right(ipver: int) -> None:
    src, dst = ADDRS[ipver]
    dss = m.dss(123456, 987654321, 1, 5).encode()
    ip = bytearray(build_tcp(src, dst, 40000, 5201, 1000, 2000, ACK, options=tcp_options(dss), payload=b"hello"))
    assert parsed(ip).payload_len == 5 and checksum_ok(bytes(ip))
    assert strip_dss(ip, parsed(ip))
    assert checksum_ok(bytes(ip))
    seg = parsed(bytes(ip))
    opts = bytes(seg.options)
    assert opts[0] == EXPERIMENTAL_KIND and opts[1] == len(dss)
    assert bytes(seg.ip[seg.payload_off:]) == b"hello"


def test_other_options_and_damaged_option_areas_are_left_alone() -> None:
    src, dst = ADDRS[4]
    for opts in (b"", tcp_options(m.MpCapable(1, m.CAP_H_HMAC).encode()), b"\x1e\x01\x00\x00"):
        ip = bytearray(build_tcp(src, dst, 40000, 5201, 1, 1, ACK, options=opts, payload=b"x"))
        before = bytes(ip)
        assert not strip_dss(ip, parsed(ip)) and bytes(ip) == before
