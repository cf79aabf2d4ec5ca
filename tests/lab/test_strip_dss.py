"""The lab's DSS-stripping middlebox, on packets built by our encoder (no root needed)."""

from __future__ import annotations

import pytest

from mproxy.lab.strip_dss import EXPERIMENTAL_KIND, payload_len, strip_dss
from mproxy.wire import mptcp as m
from mproxy.wire.build import build_tcp, tcp_options
from mproxy.wire.checksum import tcp_checksum
from mproxy.wire.packet import ACK, parse_ip

ADDRS = {4: (bytes([198, 18, 1, 2]), bytes([198, 18, 10, 2])),
         6: (bytes.fromhex("20010db8000100000000000000000002"), bytes.fromhex("20010db8001000000000000000000002"))}


def checksum_ok(ip: bytes) -> bool:
    seg = parse_ip(memoryview(ip))
    assert seg is not None and not isinstance(seg, Exception)
    tcp = bytearray(ip[seg.tcp_off:])
    stored = int.from_bytes(tcp[16:18], "big")
    tcp[16:18] = b"\0\0"
    return tcp_checksum(seg.src, seg.dst, bytes(tcp)) == stored


@pytest.mark.parametrize("ipver", [4, 6])
def test_dss_becomes_an_option_receivers_ignore_and_the_checksum_stays_right(ipver: int) -> None:
    src, dst = ADDRS[ipver]
    dss = m.dss(123456, 987654321, 1, 5).encode()
    ip = bytearray(build_tcp(src, dst, 40000, 5201, 1000, 2000, ACK, options=tcp_options(dss), payload=b"hello"))
    assert payload_len(ip) == 5 and checksum_ok(bytes(ip))
    assert strip_dss(ip)
    assert checksum_ok(bytes(ip))
    seg = parse_ip(memoryview(bytes(ip)))
    assert seg is not None and not isinstance(seg, Exception)
    opts = bytes(seg.options)
    assert opts[0] == EXPERIMENTAL_KIND and opts[1] == len(dss)
    assert bytes(seg.ip[seg.payload_off:]) == b"hello"


def test_other_options_and_garbage_are_left_alone() -> None:
    src, dst = ADDRS[4]
    ip = bytearray(build_tcp(src, dst, 40000, 5201, 1, 1, ACK, payload=b"x"))
    before = bytes(ip)
    assert not strip_dss(ip) and bytes(ip) == before
    for junk in (b"", b"\x45", bytes(19), b"\x60" + bytes(30)):
        assert not strip_dss(bytearray(junk)) and payload_len(junk) == 0
