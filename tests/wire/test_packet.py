"""Link/IP/TCP parsing across link types, IPv6 extension headers, truncation; checksums and rewriting."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy.io.pcap import read_captures
from mproxy.wire.checksum import (
    finish,
    incremental_update,
    ipv4_header_checksum,
    ones_sum,
    pseudo_header_sum,
    replace_bytes,
    tcp_checksum,
)
from mproxy.wire.errors import ErrorKind, WireError
from mproxy.wire.packet import (
    ACK,
    PSH,
    SYN,
    LinkType,
    TcpSegment,
    addr_text,
    mptcp_spans,
    option_spans,
    read_mptcp_spans,
    read_option_spans,
    parse_frame,
    parse_frame_pure,
    parse_ip,
    strip_link,
)
from mproxy.wire.rewrite import nop_out

CAPTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "captures"
K = ErrorKind

SRC4, DST4 = bytes((192, 0, 2, 1)), bytes((198, 51, 100, 2))
SRC6 = bytes.fromhex("20010db8000000000000000000000001")
DST6 = bytes.fromhex("20010db8000000000000000000000002")
MP_CAPABLE_SYN = bytes((30, 12, 0x00, 0x81)) + bytes.fromhex("9c9eabd1e46a33b2")
TCP_OPTS = bytes((2, 4, 0x05, 0xB4, 1, 1, 4, 2)) + MP_CAPABLE_SYN  # mss, nop, nop, sackOK, mptcp


# ------------------------------------------------------------------ reference checksum and builders


def naive_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 the slow way: 16-bit words with end-around carry."""
    if len(data) % 2:
        data += b"\0"
    s = initial
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def naive_tcp_checksum(src: bytes, dst: bytes, seg: bytes) -> int:
    pseudo = src + dst + (struct.pack("!BBH", 0, 6, len(seg)) if len(src) == 4 else struct.pack("!IxxxB", len(seg), 6))
    return ~naive_sum(pseudo + seg) & 0xFFFF


def tcp_bytes(src: bytes, dst: bytes, *, flags: int = SYN, opts: bytes = TCP_OPTS, payload: bytes = b"",
              sport: int = 40000, dport: int = 80, seq: int = 1000, ack: int = 0, doff: int | None = None) -> bytes:
    assert len(opts) % 4 == 0
    off = (20 + len(opts)) // 4 if doff is None else doff
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 65535, 0, 0) + opts
    seg = hdr + payload
    c = naive_tcp_checksum(src, dst, seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def ipv4(l4: bytes, *, proto: int = 6, frag: int = 0, total: int | None = None, options: bytes = b"",
         src: bytes = SRC4, dst: bytes = DST4, ihl: int | None = None) -> bytes:
    ihl = (20 + len(options)) // 4 if ihl is None else ihl
    tot = 20 + len(options) + len(l4) if total is None else total
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tot, 1, frag, 64, proto, 0, src, dst) + options
    hdr = hdr[:10] + struct.pack("!H", ipv4_header_checksum(hdr)) + hdr[12:]
    return hdr + l4


def ipv6(l4: bytes, *, exts: tuple[tuple[int, bytes], ...] = (), nxt_final: int = 6, plen: int | None = None) -> bytes:
    """IPv6 with extension headers given as (type, body-without-next-header-byte)."""
    chain = b""
    types = [t for t, _ in exts] + [nxt_final]
    for i, (_, body) in enumerate(exts):
        chain += bytes((types[i + 1],)) + body
    first = types[0]
    payload = chain + l4
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload) if plen is None else plen, first, 64, SRC6, DST6) + payload


def ext_generic(units: int) -> bytes:
    """Body of a (units+1)*8-byte generic extension header (after its next-header byte)."""
    return bytes((units,)) + bytes(6 + 8 * units)


def ext_opts(units: int) -> bytes:
    """Body of a (units+1)*8-byte hop-by-hop or destination options header that Linux takes: one
    unknown option whose type says "skip" (0x1E) fills it (all-zero bytes would be Pad1 options,
    more than the 7 bytes of padding Linux allows in a row)."""
    return bytes((units, 0x1E, 4 + 8 * units)) + bytes(4 + 8 * units)


def ext_fragment(offset: int = 0, more: bool = False) -> bytes:
    return bytes((0,)) + struct.pack("!HI", (offset << 3) | int(more), 0x12345678)


def ext_ah(words: int = 4) -> bytes:  # (words + 2) * 4 bytes
    return bytes((words,)) + bytes((words + 2) * 4 - 2)


TCP4 = tcp_bytes(SRC4, DST4)
TCP6 = tcp_bytes(SRC6, DST6)
IP4 = ipv4(TCP4)
IP6 = ipv6(TCP6)
ETH_SRC_DST = bytes.fromhex("020000000001020000000002")


def eth(ip: bytes, etype: int = 0x0800, vlans: tuple[int, ...] = ()) -> bytes:
    tags = b"".join(struct.pack("!HH", tpid, 100 + i) for i, tpid in enumerate(vlans))
    return ETH_SRC_DST + tags + struct.pack("!H", etype) + ip


def sll(ip: bytes, proto: int = 0x0800) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, bytes(8), proto) + ip


def sll2(ip: bytes, proto: int = 0x0800) -> bytes:
    return struct.pack("!HHIHBB8s", proto, 0, 2, 1, 0, 6, bytes(8)) + ip


def check_syn(seg, ver: int = 4) -> None:
    assert isinstance(seg, TcpSegment), seg
    assert seg.ipver == ver
    assert (seg.sport, seg.dport, seg.seq, seg.flags, seg.hdr_len) == (40000, 80, 1000, SYN, 20 + len(TCP_OPTS))
    assert bytes(seg.options) == TCP_OPTS
    assert seg.payload_len == seg.wire_payload_len == 0 and not seg.truncated
    spans = mptcp_spans(seg)
    assert [bytes(seg.ip[o : o + n]) for o, n in spans] == [MP_CAPABLE_SYN]


# ------------------------------------------------------------------ link types


@pytest.mark.parametrize(
    "linktype,frame,ver",
    [
        (LinkType.ETHERNET, eth(IP4), 4),
        (LinkType.ETHERNET, eth(IP6, 0x86DD), 6),
        (LinkType.ETHERNET, eth(IP4, vlans=(0x8100,)), 4),
        (LinkType.ETHERNET, eth(IP6, 0x86DD, vlans=(0x88A8, 0x8100)), 6),
        (LinkType.ETHERNET, eth(IP4, vlans=(0x88A8, 0x8100)), 4),
        (LinkType.ETHERNET, eth(IP4, vlans=(0x9100, 0x8100, 0x8100)), 4),
        (LinkType.LINUX_SLL, sll(IP4), 4),
        (LinkType.LINUX_SLL, sll(IP6, 0x86DD), 6),
        (LinkType.LINUX_SLL2, sll2(IP4), 4),
        (LinkType.LINUX_SLL2, sll2(IP6, 0x86DD), 6),
        (LinkType.RAW, IP4, 4),
        (LinkType.RAW, IP6, 6),
        (LinkType.RAW_OLD, IP4, 4),
        (LinkType.RAW_OPENBSD, IP6, 6),
        (LinkType.IPV4, IP4, 4),
        (LinkType.IPV6, IP6, 6),
        (LinkType.NULL, struct.pack("<I", 2) + IP4, 4),
        (LinkType.NULL, struct.pack(">I", 2) + IP4, 4),  # written on a big-endian host
        (LinkType.NULL, struct.pack("<I", 30) + IP6, 6),  # Darwin AF_INET6
        (LinkType.NULL, struct.pack("<I", 24) + IP6, 6),  # OpenBSD/NetBSD AF_INET6
        (LinkType.NULL, struct.pack("<I", 28) + IP6, 6),  # FreeBSD AF_INET6
        (LinkType.LOOP, struct.pack(">I", 2) + IP4, 4),
    ],
    ids=lambda v: v.name if isinstance(v, LinkType) else str(v)[:12],
)
def test_link_types(linktype: int, frame: bytes, ver: int) -> None:
    check_syn(parse_frame(linktype, frame), ver)
    check_syn(parse_frame(int(linktype), memoryview(frame)), ver)
    check_syn(parse_frame(linktype, bytearray(frame)), ver)


@pytest.mark.parametrize(
    "linktype,frame,result",
    [
        (LinkType.ETHERNET, eth(b"\x00" * 28, 0x0806), None),  # ARP
        (LinkType.ETHERNET, eth(IP4, 0x0800)[:13], K.TRUNCATED_LINK),
        (LinkType.ETHERNET, eth(IP4, vlans=(0x8100,))[:16], K.TRUNCATED_LINK),
        (LinkType.ETHERNET, eth(IP4, vlans=(0x88A8, 0x8100))[:19], K.TRUNCATED_LINK),
        (LinkType.ETHERNET, eth(b"", 0x0800), K.TRUNCATED_IP),
        (LinkType.ETHERNET, eth(IP4, vlans=(0x8100,))[:18], K.TRUNCATED_IP),
        (LinkType.ETHERNET, eth(IP4, 0x05DC), None),  # 802.3 length field
        (LinkType.LINUX_SLL, sll(IP4)[:15], K.TRUNCATED_LINK),
        (LinkType.LINUX_SLL, sll(IP4, 0x0806), None),
        (LinkType.LINUX_SLL2, sll2(IP4)[:19], K.TRUNCATED_LINK),
        (LinkType.LINUX_SLL2, sll2(IP4, 0x0806), None),
        (LinkType.NULL, b"\x02\x00", K.TRUNCATED_LINK),
        (LinkType.NULL, struct.pack("<I", 7) + IP4, None),
        (147, IP4, K.UNSUPPORTED_LINKTYPE),  # USER0
        (LinkType.RAW, b"", K.TRUNCATED_IP),
    ],
)
def test_link_errors(linktype: int, frame: bytes, result) -> None:
    r = parse_frame(linktype, frame)
    if result is None:
        assert r is None
    else:
        assert isinstance(r, WireError) and r.kind == result, r


def test_strip_link_is_a_view() -> None:
    frame = bytearray(eth(IP4, vlans=(0x8100,)))
    ip = strip_link(LinkType.ETHERNET, memoryview(frame))
    assert isinstance(ip, memoryview) and bytes(ip) == IP4
    frame[18] = 0x45
    assert ip[0] == 0x45  # no copy


# ------------------------------------------------------------------ IPv4


def test_ipv4_options_and_padding() -> None:
    ip = ipv4(TCP4, options=bytes((1, 1, 1, 0)))
    seg = parse_ip(memoryview(ip))
    check_syn(seg)
    assert seg.tcp_off == 24
    # Ethernet minimum-frame padding after the IP packet is not payload
    seg = parse_frame(LinkType.ETHERNET, eth(ipv4(tcp_bytes(SRC4, DST4, opts=b"", flags=ACK))) + bytes(6))
    assert seg.payload_len == 0 and len(seg.ip) == 40


def test_ipv4_payload_and_snaplen_cut() -> None:
    full = ipv4(tcp_bytes(SRC4, DST4, flags=ACK | PSH, payload=b"x" * 100))
    seg = parse_ip(memoryview(full))
    assert bytes(seg.payload) == b"x" * 100 and not seg.truncated
    seg = parse_ip(memoryview(full[:-30]))
    assert seg.payload_len == 70 and seg.wire_payload_len == 100 and seg.truncated
    assert bytes(seg.payload) == b"x" * 70


@pytest.mark.parametrize(
    "frag,result",
    [(0x4000, "ok"), (0x2000, K.FRAGMENT), (0x0001, K.FRAGMENT), (0x2010, K.FRAGMENT), (0x1FFF, K.FRAGMENT),
     (0x8000, "ok")],  # DF, MF, offset 8, MF+offset, max offset, reserved bit
)
def test_ipv4_fragments(frag: int, result) -> None:
    r = parse_ip(memoryview(ipv4(TCP4, frag=frag)))
    if result == "ok":
        check_syn(r)
    else:
        assert isinstance(r, WireError) and r.kind == result


def test_ipv4_non_tcp_fragment_is_not_ours() -> None:
    assert parse_ip(memoryview(ipv4(bytes(8), proto=17, frag=0x2000))) is None


@pytest.mark.parametrize(
    "ip,kind",
    [
        (ipv4(TCP4, ihl=4), K.BAD_IP_HEADER_LENGTH),
        (ipv4(TCP4, ihl=0), K.BAD_IP_HEADER_LENGTH),
        (ipv4(TCP4, total=19), K.BAD_IP_TOTAL_LENGTH),
        (ipv4(TCP4, ihl=15)[:40], K.TRUNCATED_IP),
        (bytes((0x55,)) + IP4[1:], K.BAD_IP_VERSION),
        (bytes((0x00,)) + IP4[1:], K.BAD_IP_VERSION),
        (IP4[:19], K.TRUNCATED_IP),
        (IP6[:39], K.TRUNCATED_IP),
    ],
)
def test_ip_header_errors(ip: bytes, kind: ErrorKind) -> None:
    r = parse_ip(memoryview(ip))
    assert isinstance(r, WireError) and r.kind == kind, r


def test_ip_total_length_shorter_than_tcp_header_uses_capture() -> None:
    seg = parse_ip(memoryview(ipv4(TCP4, total=30)))
    check_syn(seg)


# ------------------------------------------------------------------ IPv6 extension headers


@pytest.mark.parametrize(
    "exts",
    [
        ((0, ext_generic(0)),),  # hop-by-hop, 8 bytes
        ((43, ext_generic(2)),),  # routing, 24 bytes
        ((60, ext_opts(1)),),  # destination options, 16 bytes
        ((44, ext_fragment(0, False)),),  # atomic fragment
        ((51, ext_ah(4)),),  # AH, 24 bytes
        ((0, ext_generic(0)), (60, ext_generic(0)), (43, ext_generic(1)), (44, ext_fragment()), (60, ext_opts(3))),
    ],
    ids=["hbh", "routing", "dstopts", "frag0", "ah", "chain"],
)
def test_ipv6_extension_headers(exts) -> None:
    ip = ipv6(TCP6, exts=exts)
    seg = parse_ip(memoryview(ip))
    check_syn(seg, 6)
    assert seg.tcp_off == len(ip) - len(TCP6)
    # and via a link layer
    check_syn(parse_frame(LinkType.ETHERNET, eth(ip, 0x86DD, vlans=(0x8100,))), 6)


@pytest.mark.parametrize("offset,more", [(0, True), (1, False), (185, True), (8191, False)])
def test_ipv6_real_fragments_rejected(offset: int, more: bool) -> None:
    r = parse_ip(memoryview(ipv6(TCP6, exts=((0, ext_generic(0)), (44, ext_fragment(offset, more))))))
    assert isinstance(r, WireError) and r.kind == K.FRAGMENT


def test_ipv6_fragment_reserved_bits_ignored() -> None:
    body = bytes((0,)) + struct.pack("!HI", 0x0006, 1)  # res bits set, offset 0, M 0
    check_syn(parse_ip(memoryview(ipv6(TCP6, exts=((44, body),)))), 6)


@pytest.mark.parametrize("nxt", [17, 58, 59, 50])  # UDP, ICMPv6, no next header, ESP
def test_ipv6_not_tcp(nxt: int) -> None:
    assert parse_ip(memoryview(ipv6(bytes(16), nxt_final=nxt))) is None
    assert parse_ip(memoryview(ipv6(bytes(16), exts=((0, ext_generic(0)),), nxt_final=nxt))) is None


def test_ipv6_extension_truncated() -> None:
    ip = ipv6(TCP6, exts=((0, ext_generic(0)), (60, ext_generic(4))))
    r = parse_ip(memoryview(ip[:40 + 8 + 4]))
    assert isinstance(r, WireError) and r.kind == K.TRUNCATED_IPV6_EXTENSION
    r = parse_ip(memoryview(ip[:40 + 8 + 20]))  # header says 40 bytes, 20 captured
    assert isinstance(r, WireError) and r.kind == K.TRUNCATED_IPV6_EXTENSION


def test_ipv6_jumbo_or_tso_zero_payload_length() -> None:
    seg = parse_ip(memoryview(ipv6(tcp_bytes(SRC6, DST6, flags=ACK, payload=b"y" * 50), plen=0)))
    assert bytes(seg.payload) == b"y" * 50


def test_ipv6_address_text() -> None:
    assert addr_text(SRC6) == "2001:db8::1" and addr_text(SRC4) == "192.0.2.1"
    assert parse_ip(memoryview(IP6)).src_text == "2001:db8::1"


# ------------------------------------------------------------------ TCP header


@pytest.mark.parametrize("doff", [0, 1, 4])
def test_bad_data_offset(doff: int) -> None:
    r = parse_ip(memoryview(ipv4(tcp_bytes(SRC4, DST4, doff=doff))))
    assert isinstance(r, WireError) and r.kind == K.BAD_TCP_DATA_OFFSET


def test_data_offset_past_capture() -> None:
    r = parse_ip(memoryview(ipv4(tcp_bytes(SRC4, DST4, opts=b"", doff=15))))
    assert isinstance(r, WireError) and r.kind == K.TRUNCATED_TCP


ALL_FRAMES = [
    (LinkType.ETHERNET, eth(ipv4(tcp_bytes(SRC4, DST4, flags=ACK | PSH, payload=b"abc")), vlans=(0x88A8, 0x8100))),
    (LinkType.LINUX_SLL2, sll2(ipv6(TCP6, exts=((0, ext_generic(0)), (44, ext_fragment()))), 0x86DD)),
    (LinkType.LINUX_SLL, sll(ipv4(TCP4, options=bytes(4)))),
    (LinkType.NULL, struct.pack("<I", 30) + ipv6(tcp_bytes(SRC6, DST6, payload=b"z"), exts=((60, ext_opts(1)),))),
    (LinkType.RAW, ipv6(TCP6, exts=((51, ext_ah()),))),
]


@pytest.mark.parametrize("linktype,frame", ALL_FRAMES)
def test_every_prefix_is_an_error_or_a_segment(linktype: int, frame: bytes) -> None:
    full = parse_frame(linktype, frame)
    assert isinstance(full, TcpSegment)
    header_end = len(frame) - len(full.ip) + full.payload_off
    for n in range(len(frame)):
        r = parse_frame(linktype, frame[:n])
        if n < header_end:
            assert isinstance(r, WireError), (n, r)
        else:
            assert isinstance(r, TcpSegment) and r.truncated, (n, r)


@settings(max_examples=2000)
@given(st.sampled_from(list(LinkType) + [3, 147, 0xFFFF]), st.binary(max_size=120))
def test_random_frames_never_raise(linktype: int, frame: bytes) -> None:
    r = parse_frame(linktype, frame)
    assert r is None or isinstance(r, (WireError, TcpSegment))
    if isinstance(r, TcpSegment):
        assert r.hdr_len >= 20 and r.payload_len >= 0 and r.wire_payload_len >= r.payload_len
        mptcp_spans(r)


@settings(max_examples=2000)
@given(st.binary(min_size=20, max_size=80), st.sampled_from([4, 6]))
def test_random_bytes_after_valid_ip_header_never_raise(tail: bytes, ver: int) -> None:
    head = ipv4(b"")[:20] if ver == 4 else ipv6(b"", nxt_final=0)[:40]
    r = parse_ip(memoryview(head + tail))
    assert r is None or isinstance(r, (WireError, TcpSegment))


def test_option_spans_lying_lengths() -> None:
    def spans(opts: bytes):
        return option_spans(memoryview(opts))

    assert spans(bytes((2, 4, 5, 0xB4, 30, 3, 0x20, 1))) == [(2, 0, 4), (30, 4, 3)]
    assert spans(bytes((2, 4, 5, 0xB4, 30, 5, 0x20, 1))).kind == K.OPTION_PAST_HEADER
    assert spans(bytes((2, 4, 5, 0xB4, 30, 0, 0x20, 1))).kind == K.BAD_OPTION_LENGTH
    assert spans(bytes((2, 1, 5, 0xB4))).kind == K.BAD_OPTION_LENGTH
    assert spans(bytes((1, 1, 1, 8))).kind == K.OPTION_PAST_HEADER
    assert spans(bytes((2, 40)) + bytes(38)) == [(2, 0, 40)]
    seg = parse_ip(memoryview(ipv4(tcp_bytes(SRC4, DST4, opts=bytes((1, 30, 9, 0x20)) + bytes(4)))))
    assert isinstance(mptcp_spans(seg), WireError)
    assert mptcp_spans(parse_ip(memoryview(ipv4(tcp_bytes(SRC4, DST4, opts=b""))))) == []


def test_the_walk_keeps_the_options_before_a_lying_one() -> None:
    """As Linux's tcp_parse_options / mptcp_get_options: the walk stops at a damaged option and
    the options before it stand (the lab shows the kernel answering MP_CAPABLE and placing a DSS
    so followed); the strict forms report the error instead."""
    opts = bytes((2, 4, 5, 0xB4, 30, 4, 0x10, 0x01, 253, 1, 30, 4, 0x10, 0x01)) + bytes(2)
    spans, err = read_option_spans(memoryview(opts))
    assert spans == [(2, 0, 4), (30, 4, 4)] and err is not None and err.kind == K.BAD_OPTION_LENGTH
    assert option_spans(memoryview(opts)) == err
    seg = parse_ip(memoryview(ipv4(tcp_bytes(SRC4, DST4, opts=opts))))
    mspans, merr = read_mptcp_spans(seg)
    assert mspans == [(seg.tcp_off + 24, 4)] and merr == err
    assert mptcp_spans(seg) == err
    for tail in (bytes((30, 9, 0, 0)), bytes((1, 1, 1, 30))):  # past the header; a kind without length
        seg = parse_ip(memoryview(ipv4(tcp_bytes(SRC4, DST4, opts=bytes((30, 4, 0x10, 0x01)) + tail))))
        mspans, merr = read_mptcp_spans(seg)
        assert mspans == [(seg.tcp_off + 20, 4)] and merr is not None and merr.kind == K.OPTION_PAST_HEADER


# ------------------------------------------------------------------ checksums


@settings(max_examples=1000)
@given(st.binary(max_size=300), st.integers(0, 0x3FFFF))
def test_ones_sum_matches_naive(data: bytes, initial: int) -> None:
    assert ones_sum(data) == naive_sum(data)
    assert ones_sum(memoryview(data)) == naive_sum(data)
    assert ones_sum(data, initial) == naive_sum(data, initial)


def test_ones_sum_edge_values() -> None:
    assert ones_sum(b"") == 0 and ones_sum(bytes(7)) == 0
    assert ones_sum(b"\xff\xff") == 0xFFFF and ones_sum(b"\xff\xff\xff\xff") == 0xFFFF
    assert ones_sum(b"\xff") == 0xFF00 and ones_sum(b"\x00\x01\xff\xfe") == 0xFFFF
    assert finish(0xFFFF) == 0 and finish(0) == 0xFFFF


@settings(max_examples=500)
@given(st.sampled_from([(SRC4, DST4), (SRC6, DST6)]), st.binary(min_size=20, max_size=200))
def test_tcp_checksum_matches_naive(addrs, seg: bytes) -> None:
    src, dst = addrs
    seg = seg[:16] + b"\0\0" + seg[18:]
    c = tcp_checksum(src, dst, seg)
    assert c == naive_tcp_checksum(src, dst, seg)
    filled = seg[:16] + struct.pack("!H", c) + seg[18:]
    assert tcp_checksum(src, dst, filled) == 0


def test_pseudo_header_large_length() -> None:
    # IPv6 jumbograms: the upper 16 bits of the length fold in too
    assert pseudo_header_sum(SRC6, DST6, 6, 0x12345) == naive_sum(SRC6 + DST6 + struct.pack("!IxxxB", 0x12345, 6))


def test_checksums_agree_with_scapy() -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    for raw, cls in ((IP4, IP), (IP6, IPv6), (ipv4(tcp_bytes(SRC4, DST4, flags=ACK, payload=b"odd")), IP)):
        pkt = cls(raw)
        stored = pkt[TCP].chksum
        del pkt[TCP].chksum
        if cls is IP:
            del pkt[IP].chksum
        rebuilt = cls(bytes(pkt))
        assert rebuilt[TCP].chksum == stored
        if cls is IP:
            assert rebuilt[IP].chksum == struct.unpack_from("!H", raw, 10)[0]


@settings(max_examples=1000)
@given(st.binary(min_size=2, max_size=2), st.binary(min_size=2, max_size=2), st.binary(min_size=40, max_size=120),
       st.integers(0, 19))
def test_incremental_update_equals_recompute(old: bytes, new: bytes, body: bytes, word: int) -> None:
    data = bytearray(body)
    data[2 * word : 2 * word + 2] = old
    before = finish(ones_sum(bytes(data)))
    data[2 * word : 2 * word + 2] = new
    after = finish(ones_sum(bytes(data)))
    upd = incremental_update(before, int.from_bytes(old, "big"), int.from_bytes(new, "big"))
    # 0x0000 and 0xFFFF are the same one's-complement value
    assert upd % 0xFFFF == after % 0xFFFF


@settings(max_examples=1000)
@given(st.binary(min_size=40, max_size=120), st.data())
def test_replace_bytes_keeps_checksum_valid(seg: bytes, data) -> None:
    src, dst = SRC4, DST4
    buf = bytearray(IP4[:20] + seg)  # an IP header, then a "segment" whose checksum is at offset 16
    tcp_off = 20
    buf[tcp_off + 16 : tcp_off + 18] = b"\0\0"
    buf[tcp_off + 16 : tcp_off + 18] = struct.pack("!H", tcp_checksum(src, dst, bytes(buf[tcp_off:])))
    start = data.draw(st.integers(tcp_off + 18, len(buf) - 1))
    new = data.draw(st.binary(min_size=0, max_size=len(buf) - start))
    replace_bytes(buf, tcp_off + 16, start, new, start - tcp_off)
    assert bytes(buf[start : start + len(new)]) == new
    assert tcp_checksum(src, dst, bytes(buf[tcp_off:])) in (0, 0xFFFF)


# ------------------------------------------------------------------ rewriting: NOP out an option


def _frames_with_mptcp(name: str):
    if not (CAPTURES / name).exists():
        pytest.skip("reference captures absent")
    for fr in read_captures([str(CAPTURES / name)]):
        seg = parse_frame(fr.linktype, fr.data)
        if isinstance(seg, TcpSegment):
            spans = mptcp_spans(seg)
            if spans:
                yield fr, seg, spans


def test_nop_out_mp_capable_in_real_syn() -> None:
    from scapy.layers.inet import IP, TCP

    fr, seg, spans = next(_frames_with_mptcp("mptcp-v0.pcap"))
    assert seg.flags == SYN
    ip = bytearray(seg.ip)
    assert tcp_checksum(seg.src, seg.dst, bytes(ip[seg.tcp_off :])) == 0  # valid in the capture
    (off, ln), = spans
    nop_out(ip, seg.tcp_off, off, ln)
    assert bytes(ip[off : off + ln]) == b"\x01" * ln
    assert tcp_checksum(seg.src, seg.dst, bytes(ip[seg.tcp_off :])) == 0
    again = parse_ip(memoryview(bytes(ip)))
    assert mptcp_spans(again) == []
    # scapy recomputes the same checksum from scratch
    pkt = IP(bytes(ip))
    stored = pkt[TCP].chksum
    del pkt[TCP].chksum
    assert IP(bytes(pkt))[TCP].chksum == stored
    assert [o[0] for o in IP(bytes(ip))[TCP].options][:4] == ["MSS", "SAckOK", "Timestamp", "NOP"]


def test_nop_out_every_mptcp_option_of_a_capture() -> None:
    n = 0
    for fr, seg, spans in _frames_with_mptcp("mptcp-v0.pcap"):
        ip = bytearray(seg.ip)
        for off, ln in spans:
            nop_out(ip, seg.tcp_off, off, ln)
        assert tcp_checksum(seg.src, seg.dst, bytes(ip[seg.tcp_off :])) == 0, fr.number
        n += 1
    assert n > 200


def test_nop_out_keeps_a_bad_checksum_off_by_the_same_amount() -> None:
    # captures from the sending host carry offloaded (wrong) checksums: the
    # rewrite must not change how wrong they are
    fr, seg, spans = next(_frames_with_mptcp("mptcp-v1.pcap"))
    ip = bytearray(seg.ip)
    before = tcp_checksum(seg.src, seg.dst, bytes(ip[seg.tcp_off :]))
    assert before != 0
    (off, ln), = spans
    nop_out(ip, seg.tcp_off, off, ln)
    assert tcp_checksum(seg.src, seg.dst, bytes(ip[seg.tcp_off :])) % 0xFFFF == before % 0xFFFF


@pytest.mark.parametrize("ver", [4, 6])
def test_nop_out_odd_offset_built_packet(ver: int) -> None:
    src, dst = (SRC4, DST4) if ver == 4 else (SRC6, DST6)
    opts = bytes((1,)) + bytes((30, 4, 0x80, 0x01)) + bytes((1, 1, 1))  # option at odd offset 21
    ip = bytearray(ipv4(tcp_bytes(src, dst, opts=opts, flags=ACK)) if ver == 4 else ipv6(tcp_bytes(src, dst, opts=opts, flags=ACK)))
    seg = parse_ip(memoryview(bytes(ip)))
    ((off, ln),) = mptcp_spans(seg)
    assert (off - seg.tcp_off) % 2 == 1
    nop_out(ip, seg.tcp_off, off, ln)
    assert tcp_checksum(src, dst, bytes(ip[seg.tcp_off :])) == 0
    assert bytes(ip[seg.tcp_off + 20 : seg.tcp_off + 28]) == b"\x01" * 8


def test_nop_out_rejects_bytes_outside_the_options() -> None:
    ip = bytearray(IP4)
    with pytest.raises(ValueError):
        nop_out(ip, 20, 30, 4)  # inside the fixed header
    with pytest.raises(ValueError):
        nop_out(ip, 20, 40 + len(TCP_OPTS) - 2, 4)  # past the data offset
    nop_out(ip, 20, 40, 0)
    assert ip == bytearray(IP4)


@settings(max_examples=2000)
@given(st.binary(max_size=40).map(lambda b: b + bytes(-len(b) % 4)), st.sampled_from([4, 6]))
def test_mptcp_spans_agrees_with_option_spans(opts: bytes, ver: int) -> None:
    """mptcp_spans is an inlined walk: same spans (also those before a damaged option), same errors
    as option_spans."""
    src, dst = (SRC4, DST4) if ver == 4 else (SRC6, DST6)
    ip = ipv4(tcp_bytes(src, dst, opts=opts, flags=ACK)) if ver == 4 else ipv6(tcp_bytes(src, dst, opts=opts, flags=ACK))
    seg = parse_ip(memoryview(ip))
    ref, ref_err = read_option_spans(seg.options)
    got, err = read_mptcp_spans(seg)
    base = seg.tcp_off + 20
    assert got == [(base + s, n) for k, s, n in ref if k == 30] and err == ref_err
    assert mptcp_spans(seg) == (got if err is None else err)
    assert option_spans(seg.options) == (ref if ref_err is None else ref_err)


def _parse_general(linktype: int, frame: bytes) -> TcpSegment | WireError | None:
    ip = strip_link(linktype, memoryview(frame))
    return ip if ip is None or isinstance(ip, WireError) else parse_ip(ip, 1.5)


_V4_LINKS = [(LinkType.LINUX_SLL2, sll2), (LinkType.ETHERNET, eth), (LinkType.LINUX_SLL, sll),
             (LinkType.RAW, lambda ip: ip), (LinkType.IPV4, lambda ip: ip), (LinkType.RAW_OLD, lambda ip: ip)]


@settings(max_examples=3000)
@given(st.sampled_from(_V4_LINKS), st.binary(max_size=60), st.integers(0, 255), st.integers(20, 60),
       st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=3), st.integers(0, 120),
       st.sampled_from([None, 0, 19, 20, 39, 40, 41, 64, 200]))
def test_one_unpack_parse_equals_strip_link_then_parse_ip(link, payload: bytes, flags: int, hdr: int,
                                                          mutations: list[tuple[int, int]], cut: int,
                                                          total: int | None) -> None:
    """parse_frame_pure reads IPv4 + TCP of the common link types in one unpack: the same segment (or
    the same error) as the general path, for valid frames, damaged ones, cuts and lying lengths."""
    linktype, wrap = link
    opts = bytes((1,)) * ((hdr - 20) // 4 * 4)
    frame = bytearray(wrap(ipv4(tcp_bytes(SRC4, DST4, flags=flags, opts=opts, payload=payload), total=total)))
    for pos, val in mutations:
        if pos < len(frame):
            frame[pos] = val
    frame = frame[: max(0, len(frame) - cut)] if cut < 100 else frame
    got, want = parse_frame_pure(linktype, bytes(frame), 1.5), _parse_general(linktype, bytes(frame))
    assert got == want
    if isinstance(got, TcpSegment):
        assert bytes(got.ip) == bytes(want.ip) and len(got.ip) == len(want.ip)  # type: ignore[union-attr]


# ------------------------------------------------------------------ TCP-MD5 (what Linux's walk finds)
MD5 = bytes([19, 18]) + bytes(range(16))


@pytest.mark.parametrize("opts,signed", [
    (MD5, True),
    (bytes([1, 1]) + MD5 + bytes([1, 1]), True),
    (bytes([30, 4, 0x20, 0]) + MD5 + bytes(2), True),  # after another option
    (bytes([19, 10]) + bytes(8), False),  # not 18 bytes: Linux reads on (lab: tcp_md5_bad_len)
    (bytes([19, 10]) + bytes(8) + MD5 + bytes(2), False),  # the walk stops at the first MD5 kind
    (bytes([0, 0, 0, 0]) + MD5 + bytes(2), False),  # after End
    (bytes([30, 1, 0, 0]) + MD5 + bytes(2), False),  # after a length that lies
    (bytes([29, 6, 1, 1, 0, 0]) + bytes(2), False),  # TCP-AO: read through without CONFIG_TCP_AO
    (bytes(range(2, 3)) + bytes([4]) + bytes(2), False),
])
def test_tcp_md5_signed_follows_linuxs_walk(opts: bytes, signed: bool) -> None:
    from mproxy.wire.build import build_tcp
    from mproxy.wire.packet import tcp_md5_signed

    seg = parse_ip(memoryview(build_tcp(SRC4, DST4, 40000, 80, 1, 1, ACK | PSH, options=opts, payload=b"x")))
    assert isinstance(seg, TcpSegment) and tcp_md5_signed(seg) is signed
