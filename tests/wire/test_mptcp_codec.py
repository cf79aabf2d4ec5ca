"""MPTCP option codec: every subtype round-trips; any bytes decode to an option or a WireError."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mproxy.wire import mptcp as m
from mproxy.wire.errors import ErrorKind, WireError
from mproxy.wire.packet import ACK, CWR, ECE, FIN, PSH, RST, SYN, URG, option_spans

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
ipv4 = st.binary(min_size=4, max_size=4)
ipv6 = st.binary(min_size=16, max_size=16)
# TCP flags without SYN: ACK plus any of the others
no_syn = st.builds(lambda extra: ACK | extra, st.sampled_from([0, PSH, FIN, RST, URG, ECE | CWR, PSH | FIN]))

# -------------------------------------------------------------- strategies: (option, suitable TCP flags)


@st.composite
def capable(draw):
    version = draw(st.sampled_from([0, 1]))
    flags = draw(u8)
    if version == 0:
        form = draw(st.sampled_from(["syn", "synack", "ack"]))
        if form == "syn":
            return m.MpCapable(0, flags, draw(u64)), SYN
        if form == "synack":
            return m.MpCapable(0, flags, draw(u64)), SYN | ACK
        return m.MpCapable(0, flags, draw(u64), draw(u64)), draw(no_syn)
    form = draw(st.sampled_from(["syn", "synack", "ack", "data", "data_csum"]))
    if form == "syn":
        return m.MpCapable(1, flags), SYN
    if form == "synack":
        return m.MpCapable(1, flags, draw(u64)), SYN | ACK
    if form == "ack":
        return m.MpCapable(1, flags, draw(u64), draw(u64)), draw(no_syn)
    if form == "data":
        return m.MpCapable(1, flags, draw(u64), draw(u64), draw(u16)), draw(no_syn)
    return m.MpCapable(1, flags, draw(u64), draw(u64), draw(u16), draw(u16)), draw(no_syn)


@st.composite
def join(draw):
    phase = draw(st.sampled_from(list(m.JoinPhase)))
    if phase == m.JoinPhase.SYN:
        return m.MpJoin(phase, draw(st.booleans()), draw(u8), draw(u32), draw(u32), None, draw(st.integers(0, 7))), SYN
    if phase == m.JoinPhase.SYN_ACK:
        return (m.MpJoin(phase, draw(st.booleans()), draw(u8), None, draw(u32), draw(st.binary(min_size=8, max_size=8)),
                         draw(st.integers(0, 7))), SYN | ACK)
    return m.MpJoin(phase, False, 0, None, None, draw(st.binary(min_size=20, max_size=20)),
                    draw(st.integers(0, 0xFFF))), draw(no_syn)


@st.composite
def dss_opt(draw):
    flags = draw(u8)  # reserved bits and "a"/"m" without "A"/"M" are kept as sent
    data_ack = dsn = ssn = dll = csum = None
    if flags & m.DSS_A:
        data_ack = draw(u64 if flags & m.DSS_a else u32)
    if flags & m.DSS_M:
        dsn = draw(u64 if flags & m.DSS_m else u32)
        ssn, dll = draw(u32), draw(u16)
        csum = draw(st.none() | u16)
    return m.Dss(flags, data_ack, dsn, ssn, dll, csum, draw(st.integers(0, 15))), draw(no_syn)


@st.composite
def add_addr(draw):
    version = draw(st.sampled_from([0, 1]))
    address = draw(ipv4 | ipv6)
    port = draw(st.none() | u16)
    if version == 0:
        return m.AddAddr(0, draw(u8), address, port), draw(no_syn)
    echo = draw(st.booleans())
    # (rsv, echo) == (2, 0) / (3, 0) make the nibble 4 / 6: the v0 IPVer values
    rsv = draw(st.integers(0, 7).filter(lambda r: echo or r not in (2, 3)))
    hmac = draw(st.none() | u64)
    return m.AddAddr(1, draw(u8), address, port, echo, hmac, rsv), draw(no_syn)


remove_addr = st.tuples(
    st.builds(m.RemoveAddr, st.lists(u8, min_size=1, max_size=252).map(tuple), st.integers(0, 15)), no_syn)
prio = st.tuples(st.builds(m.MpPrio, st.booleans(), st.none() | u8, st.integers(0, 7)), no_syn)
fail = st.tuples(st.builds(m.MpFail, u64, st.integers(0, 0xFFF)), no_syn)
fastclose = st.tuples(st.builds(m.MpFastclose, u64, st.integers(0, 0xFFF)), no_syn)
tcprst = st.tuples(st.builds(m.MpTcpRst, st.integers(0, 15), u8), st.sampled_from([RST, RST | ACK]))

any_option = st.one_of(capable(), join(), dss_opt(), add_addr(), remove_addr, prio, fail, fastclose, tcprst)


# -------------------------------------------------------------- round trips


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(any_option)
def test_round_trip(case) -> None:
    opt, flags = case
    raw = m.encode(opt)
    assert raw[0] == 30 and raw[1] == len(raw) == opt.length
    assert raw[2] >> 4 == opt.subtype
    assert m.decode(raw, flags) == opt
    assert m.decode(memoryview(raw), flags) == opt
    assert m.decode(bytearray(raw), flags) == opt


@pytest.mark.parametrize("strategy", [capable(), join(), dss_opt(), add_addr(), remove_addr, prio, fail, fastclose,
                                      tcprst], ids=lambda s: repr(s)[:30])
@settings(max_examples=300)
@given(data=st.data())
def test_round_trip_per_subtype(strategy, data) -> None:
    opt, flags = data.draw(strategy)
    assert m.decode(m.encode(opt), flags) == opt


def test_dss_helper_builds_consistent_flags() -> None:
    d = m.dss(data_ack=5, dsn=7, ssn=1, dll=3, checksum=0x1234, data_fin=True, ack64=False, dsn64=True)
    assert d.flags == m.DSS_A | m.DSS_M | m.DSS_m | m.DSS_F
    assert (d.ack64, d.dsn64, d.data_fin, d.has_map) == (False, True, True, True)
    assert d.length == 4 + 4 + 8 + 6 + 2
    assert m.decode(d.encode(), ACK) == d
    bare = m.dss(data_ack=1)
    assert bare.length == 12 and m.decode(bare.encode(), ACK) == bare


def test_lengths_of_every_form() -> None:
    assert {m.MpCapable(1, 1).length, m.MpCapable(1, 1, 1).length, m.MpCapable(1, 1, 1, 2).length,
            m.MpCapable(1, 1, 1, 2, 3).length, m.MpCapable(1, 1, 1, 2, 3, 4).length} == {4, 12, 20, 22, 24}
    v4, v6 = bytes(4), bytes(16)
    lens = {m.AddAddr(1, 1, a, p, False, h).length for a in (v4, v6) for p in (None, 80) for h in (None, 1)}
    assert lens == {8, 10, 16, 18, 20, 22, 28, 30}


# -------------------------------------------------------------- robustness


flags_any = st.integers(0, 0xFF)


@settings(max_examples=3000)
@given(st.binary(max_size=64), flags_any)
def test_random_bytes_never_raise(raw: bytes, flags: int) -> None:
    r = m.decode(raw, flags)
    assert isinstance(r, WireError) or r.subtype in m.Subtype


@st.composite
def framed(draw):
    """Random body behind a well-formed kind/length header: reaches every subtype's checks."""
    body = draw(st.binary(min_size=1, max_size=40))
    sub = draw(st.integers(0, 15)) << 4 | draw(st.integers(0, 15))
    return bytes((30, len(body) + 2, sub)) + body[1:]


@settings(max_examples=5000)
@given(framed(), flags_any)
def test_framed_random_options_decode_or_error_and_round_trip(raw: bytes, flags: int) -> None:
    r = m.decode(raw, flags)
    if isinstance(r, WireError):
        assert isinstance(r.kind, ErrorKind) and str(r)
        return
    # whatever the decoder accepts, it re-encodes byte for byte
    assert m.encode(r) == raw


@settings(max_examples=2000)
@given(st.binary(max_size=60))
def test_option_walk_terminates(opts: bytes) -> None:
    r = option_spans(memoryview(opts))
    if isinstance(r, WireError):
        assert r.kind in (ErrorKind.BAD_OPTION_LENGTH, ErrorKind.OPTION_PAST_HEADER)
        return
    end = 0
    for kind, start, length in r:
        assert start >= end and length >= 2 and start + length <= len(opts) and opts[start] == kind
        end = start + length


# -------------------------------------------------------------- malformed input, kind by kind


def _o(sub_nib: int, body: bytes = b"", length: int | None = None) -> bytes:
    return bytes((30, 3 + len(body) if length is None else length, sub_nib)) + body


K = ErrorKind


@pytest.mark.parametrize(
    "raw,flags,kind",
    [
        (b"", ACK, K.MPTCP_TOO_SHORT),
        (bytes((30,)), ACK, K.MPTCP_TOO_SHORT),
        (bytes((30, 2)), ACK, K.MPTCP_TOO_SHORT),
        (_o(0x20, b"\x00", length=0), ACK, K.MPTCP_BAD_LENGTH),  # length byte 0
        (_o(0x20, b"\x00", length=1), ACK, K.MPTCP_BAD_LENGTH),  # length byte 1
        (_o(0x20, b"\x00", length=40), ACK, K.MPTCP_BAD_LENGTH),  # claims more than there is
        (bytes((8, 4, 0x20, 0)), ACK, K.MPTCP_BAD_LENGTH),  # not kind 30
        # unknown subtypes
        *[(_o(st_ << 4, b"\x00"), ACK, K.MPTCP_UNKNOWN_SUBTYPE) for st_ in range(9, 16)],
        # MP_CAPABLE
        (_o(0x02, b"\x01"), SYN, K.MPTCP_UNKNOWN_VERSION),
        (_o(0x02, b"\x01" + bytes(8)), SYN, K.MPTCP_UNKNOWN_VERSION),
        (_o(0x0F, b"\x01" + bytes(16)), ACK, K.MPTCP_UNKNOWN_VERSION),
        (_o(0x00, b"\x01"), SYN, K.MPTCP_BAD_LENGTH),  # v0 needs a key
        (_o(0x01, b"\x01"), SYN | ACK, K.MPTCP_WRONG_TCP_FLAGS),
        (_o(0x01, b"\x01"), ACK, K.MPTCP_WRONG_TCP_FLAGS),
        (_o(0x01, b"\x01" + bytes(8)), SYN, K.MPTCP_WRONG_TCP_FLAGS),  # v1 SYN has no key
        (_o(0x00, b"\x01" + bytes(8)), ACK, K.MPTCP_WRONG_TCP_FLAGS),
        (_o(0x01, b"\x01" + bytes(16)), SYN | ACK, K.MPTCP_WRONG_TCP_FLAGS),
        (_o(0x01, b"\x01" + bytes(16)), 0, K.MPTCP_WRONG_TCP_FLAGS),
        (_o(0x00, b"\x01" + bytes(18)), ACK, K.MPTCP_BAD_LENGTH),  # v0 has no data_len form
        *[(_o(0x01, b"\x01" + bytes(n - 4)), ACK, K.MPTCP_BAD_LENGTH) for n in (5, 8, 11, 13, 19, 21, 23, 25)],
        (_o(0x00), SYN, K.MPTCP_BAD_LENGTH),
        # MP_JOIN
        *[(_o(0x10, bytes(n - 3)), f, K.MPTCP_BAD_LENGTH) for n in (3, 4, 11, 13, 15, 17, 23, 25)
          for f in (SYN, SYN | ACK, ACK)],
        (_o(0x10, bytes(9)), ACK, K.MPTCP_WRONG_TCP_FLAGS),
        (_o(0x10, bytes(9)), SYN | ACK, K.MPTCP_WRONG_TCP_FLAGS),
        (_o(0x10, bytes(13)), SYN, K.MPTCP_WRONG_TCP_FLAGS),
        (_o(0x10, bytes(13)), ACK, K.MPTCP_WRONG_TCP_FLAGS),
        (_o(0x10, bytes(21)), SYN | ACK, K.MPTCP_WRONG_TCP_FLAGS),
        (_o(0x10, bytes(21)), SYN, K.MPTCP_WRONG_TCP_FLAGS),
        # DSS
        (_o(0x20, b"\x01" + bytes(4)), SYN, K.MPTCP_DSS_ON_SYN),
        (_o(0x20, b"\x01" + bytes(4)), SYN | ACK, K.MPTCP_DSS_ON_SYN),
        (_o(0x20), ACK, K.MPTCP_BAD_LENGTH),
        (_o(0x20, b"\x01" + bytes(3)), ACK, K.MPTCP_BAD_LENGTH),  # 4-byte ack cut
        (_o(0x20, b"\x03" + bytes(4)), ACK, K.MPTCP_BAD_LENGTH),  # says 8-byte ack, has 4
        (_o(0x20, b"\x04" + bytes(9)), ACK, K.MPTCP_BAD_LENGTH),  # mapping cut
        (_o(0x20, b"\x04" + bytes(11)), ACK, K.MPTCP_BAD_LENGTH),  # one byte of checksum
        (_o(0x20, b"\x04" + bytes(13)), ACK, K.MPTCP_BAD_LENGTH),  # trailing byte
        (_o(0x20, b"\x00" + bytes(2)), ACK, K.MPTCP_BAD_LENGTH),  # no fields, extra bytes
        # ADD_ADDR
        *[(_o(0x30, bytes(n - 3)), ACK, K.MPTCP_BAD_LENGTH) for n in (3, 5, 7, 9, 11, 12, 15, 17, 19, 21, 23, 27, 29, 31)],
        (_o(0x34, bytes(13)), ACK, K.MPTCP_BAD_LENGTH),  # v0 IPv4 with 16 bytes
        (_o(0x36, bytes(5)), ACK, K.MPTCP_BAD_LENGTH),  # v0 IPv6 with 8 bytes
        # REMOVE_ADDR
        (_o(0x40), ACK, K.MPTCP_BAD_LENGTH),
        # MP_PRIO
        (_o(0x50, bytes(2)), ACK, K.MPTCP_BAD_LENGTH),
        # MP_FAIL / MP_FASTCLOSE
        *[(_o(s, bytes(n - 3)), ACK, K.MPTCP_BAD_LENGTH) for s in (0x60, 0x70) for n in (3, 4, 8, 11, 13, 20)],
        # MP_TCPRST
        (_o(0x80), RST, K.MPTCP_BAD_LENGTH),
        (_o(0x80, bytes(2)), RST, K.MPTCP_BAD_LENGTH),
    ],
)
def test_malformed(raw: bytes, flags: int, kind: ErrorKind) -> None:
    r = m.decode(raw, flags)
    assert isinstance(r, WireError), r
    assert r.kind == kind, r


def test_option_area_errors() -> None:
    # length 0 / 1 inside a TCP option area
    assert option_spans(memoryview(bytes((1, 30, 0, 0)))).kind == K.BAD_OPTION_LENGTH
    assert option_spans(memoryview(bytes((30, 1, 0, 0)))).kind == K.BAD_OPTION_LENGTH
    # an option running past the header
    assert option_spans(memoryview(bytes((1, 1, 30, 12, 0x20, 0, 0, 0)))).kind == K.OPTION_PAST_HEADER
    assert option_spans(memoryview(bytes((1, 1, 1, 30)))).kind == K.OPTION_PAST_HEADER
    # EOL ends the walk: what follows is not read
    assert option_spans(memoryview(bytes((0, 30, 1, 0)))) == []
    assert option_spans(memoryview(bytes((1, 30, 4, 0x80, 0, 0, 0, 0)))) == [(30, 1, 4)]


def test_error_value_is_printable_and_hashable() -> None:
    e = WireError(K.MPTCP_BAD_LENGTH, "x")
    assert str(e) == "mptcp_bad_length: x" and str(WireError(K.FRAGMENT)) == "fragment"
    assert {e: 1}[WireError(K.MPTCP_BAD_LENGTH, "x")] == 1
