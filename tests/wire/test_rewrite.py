"""Packet rewriting: full checksums and GSO-style splitting, checked against scapy's own checksum code."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from mproxy.wire.build import build_tcp
from mproxy.wire.packet import ACK, CWR, FIN, PSH, TcpSegment, parse_ip
from mproxy.wire.rewrite import fill_tcp_checksum, split_tcp

V4 = (bytes([198, 18, 1, 2]), bytes([198, 18, 10, 2]))
V6 = (bytes.fromhex("20010db8000100000000000000000002"), bytes.fromhex("20010db8000a00000000000000000002"))


def scapy_ok(pkt: bytes) -> bool:
    """scapy recomputes both checksums from scratch; equal means ours were right."""
    p = IP(pkt) if pkt[0] >> 4 == 4 else IPv6(pkt)
    q = p.copy()
    del q[TCP].chksum
    if pkt[0] >> 4 == 4:
        del q[IP].chksum
    r = q.__class__(bytes(q))
    return p[TCP].chksum == r[TCP].chksum and (pkt[0] >> 4 == 6 or p[IP].chksum == r[IP].chksum)


def corrupt_csum(pkt: bytes) -> bytearray:
    s = parse_ip(memoryview(pkt))
    assert isinstance(s, TcpSegment)
    buf = bytearray(pkt)
    buf[s.tcp_off + 16] ^= 0x5A
    return buf


@pytest.mark.parametrize("addrs", [V4, V6])
def test_fill_tcp_checksum(addrs: tuple[bytes, bytes]) -> None:
    pkt = build_tcp(*addrs, 40000, 80, 7, 9, ACK, payload=b"odd-length payload!")
    buf = corrupt_csum(pkt)
    assert not scapy_ok(bytes(buf))
    assert fill_tcp_checksum(buf) and bytes(buf) == pkt and scapy_ok(pkt)
    assert not fill_tcp_checksum(bytearray(pkt[:30]))  # not a whole packet: left alone


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 6000), mss=st.integers(200, 1460), v6=st.booleans(), fin=st.booleans())
def test_split_tcp_is_what_the_wire_carries(n: int, mss: int, v6: bool, fin: bool) -> None:
    data = bytes((i * 7) & 0xFF for i in range(n))
    flags = ACK | PSH | CWR | (FIN if fin else 0)
    big = bytes(corrupt_csum(build_tcp(*(V6 if v6 else V4), 40000, 80, 0xFFFFF000, 9, flags, payload=data)))
    parts = split_tcp(big, mss)
    assert len(parts) == max(1, -(-n // mss))
    got = b""
    for k, p in enumerate(parts):
        s = parse_ip(memoryview(p))
        assert isinstance(s, TcpSegment) and s.payload_len <= mss and scapy_ok(p)
        assert s.seq == (0xFFFFF000 + len(got)) & 0xFFFFFFFF
        last = k == len(parts) - 1
        assert bool(s.flags & FIN) == (fin and last) and bool(s.flags & PSH) == last
        assert bool(s.flags & CWR) == (k == 0)
        got += bytes(s.payload)
    assert got == data


def test_split_tcp_leaves_non_tcp_alone() -> None:
    assert split_tcp(b"\x45" + bytes(30), 100) == [b"\x45" + bytes(30)]


@given(ttl=st.integers(0, 255), v6=st.booleans(), payload=st.binary(max_size=40))
@settings(max_examples=60, deadline=None)
def test_set_ttl_keeps_the_checksums_right(ttl: int, v6: bool, payload: bytes) -> None:
    from mproxy.wire.rewrite import set_ttl

    src, dst = V6 if v6 else V4
    buf = bytearray(build_tcp(src, dst, 40000, 80, 1, 2, ACK, payload=payload, ttl=7))
    set_ttl(buf, ttl)
    assert buf[7 if v6 else 8] == ttl and scapy_ok(bytes(buf))


def test_set_ttl_refuses_what_is_not_an_ip_packet() -> None:
    from mproxy.wire.rewrite import set_ttl

    for bad, ttl in ((bytearray(10), 64), (bytearray(b"\x45" + bytes(19)), 256)):
        with pytest.raises(ValueError):
            set_ttl(bad, ttl)


@given(window=st.integers(0, 0xFFFF), old=st.integers(0, 0xFFFF), v6=st.booleans(), payload=st.binary(max_size=40))
@settings(max_examples=60, deadline=None)
def test_set_window_keeps_the_checksum_right(window: int, old: int, v6: bool, payload: bytes) -> None:
    """scapy (an independent encoder) agrees with the incrementally updated checksum; a checksum
    that was wrong stays wrong by the same amount (RFC 1624), not repaired."""
    from mproxy.wire.rewrite import set_window

    src, dst = V6 if v6 else V4
    pkt = build_tcp(src, dst, 40000, 80, 1, 2, ACK, window=old, payload=payload)
    buf = bytearray(pkt)
    seg = parse_ip(memoryview(pkt))
    assert isinstance(seg, TcpSegment)
    set_window(buf, seg.tcp_off, window)
    assert int.from_bytes(buf[seg.tcp_off + 14 : seg.tcp_off + 16], "big") == window and scapy_ok(bytes(buf))
    bad = corrupt_csum(pkt)
    c = seg.tcp_off + 16

    def off_by(a: bytearray, b: bytes | bytearray) -> int:  # one's complement difference of the checksums
        return (int.from_bytes(a[c : c + 2], "big") - int.from_bytes(b[c : c + 2], "big")) % 0xFFFF

    was = off_by(bad, pkt)
    set_window(bad, seg.tcp_off, window)
    assert not scapy_ok(bytes(bad)) and off_by(bad, buf) == was
    assert bad[:c] == buf[:c] and bad[c + 2 :] == buf[c + 2 :]


def test_set_window_refuses_what_does_not_fit() -> None:
    from mproxy.wire.rewrite import set_window

    pkt = bytearray(build_tcp(*V4, 1, 2, 3, 4, ACK))
    for buf, off, window in ((pkt, 20, 0x10000), (pkt, 20, -1), (pkt, 30, 1), (bytearray(30), 20, 1)):
        with pytest.raises(ValueError):
            set_window(buf, off, window)
