"""The compiled accelerator (``mproxy/_accel.c``) against the pure-Python reference it replaces."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from mproxy.wire import packet
from mproxy.wire.packet import LinkType, TcpSegment, parse_frame_pure

from .test_packet import DST4, SRC4, eth, ipv4, sll, sll2, tcp_bytes

try:
    from mproxy import _accel  # type: ignore[attr-defined]
except ImportError:  # not built (no compiler): the pure code runs, and is what the rest of the suite tests
    _accel = None

needs_accel = pytest.mark.skipif(_accel is None or not packet.ACCELERATED, reason="accelerator not built (or MPROXY_NO_ACCEL)")
ROOT = Path(__file__).resolve().parents[2]


def _frames() -> st.SearchStrategy[tuple[int, bytes]]:
    """Valid IPv4/TCP frames of every link type the C code reads, then damaged; and anything at all."""
    wraps = [(276, sll2), (1, eth), (113, sll), (101, lambda ip: ip), (228, lambda ip: ip), (12, lambda ip: ip),
             (14, lambda ip: ip), (229, lambda ip: ip)]

    @st.composite
    def built(draw: st.DrawFn) -> tuple[int, bytes]:
        lt, wrap = draw(st.sampled_from(wraps))
        opts = bytes((1,)) * draw(st.sampled_from([0, 4, 12, 20, 40]))
        payload = draw(st.binary(max_size=80))
        total = draw(st.sampled_from([None, None, 0, 19, 20, 39, 40, 52, 300, 65535]))
        frag = draw(st.sampled_from([0, 0, 0x4000, 0x2000, 0x0001, 0x6000, 0x8000]))  # DF, MF, offset, reserved
        proto = draw(st.sampled_from([6, 6, 6, 17]))
        frame = bytearray(wrap(ipv4(tcp_bytes(SRC4, DST4, flags=draw(st.integers(0, 255)), opts=opts,
                                              payload=payload, seq=draw(st.integers(0, 2**32 - 1)),
                                              ack=draw(st.integers(0, 2**32 - 1))), total=total, frag=frag,
                                    proto=proto)))
        for pos, val in draw(st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=3)):
            if pos < len(frame):
                frame[pos] = val
        cut = draw(st.integers(0, 130))
        return lt, bytes(frame[: max(0, len(frame) - cut)] if cut < 100 else frame)

    return built() | st.tuples(st.sampled_from([0, 1, 12, 101, 113, 276, 3, 70000, -1]), st.binary(max_size=100))


@needs_accel
@settings(max_examples=4000, deadline=None)
@given(_frames(), st.sampled_from([0.0, 1.5, 1e9 + 0.25]))
def test_compiled_parse_frame_equals_the_reference(frame: tuple[int, bytes], ts: float) -> None:
    lt, data = frame
    got, want = _accel.parse_frame(lt, data, ts), parse_frame_pure(lt, data, ts)
    assert type(got) is type(want) and got == want
    if isinstance(got, TcpSegment):
        assert isinstance(want, TcpSegment)
        assert bytes(got.ip) == bytes(want.ip) and got.ip.obj is data and type(got.ts) is type(want.ts)
        assert got.options.tobytes() == want.options.tobytes() and got.payload.tobytes() == want.payload.tobytes()
        got.flags = 0  # an ordinary, mutable TcpSegment
        assert got.flags == 0 and repr(got).startswith("TcpSegment(")


@needs_accel
def test_other_argument_types_go_to_the_reference() -> None:
    frame = sll2(ipv4(tcp_bytes(SRC4, DST4, payload=b"x")))
    want = parse_frame_pure(276, frame, 2.0)
    assert isinstance(want, TcpSegment)
    for lt, data, ts in [(LinkType.LINUX_SLL2, frame, 2.0), (276, memoryview(frame), 2.0), (276, bytearray(frame), 2.0),
                         (276, frame, 2)]:
        got = _accel.parse_frame(lt, data, ts)
        assert got == want and type(got.ts) is type(ts)
    assert _accel.parse_frame(276, frame) == parse_frame_pure(276, frame)
    with pytest.raises(TypeError):
        _accel.parse_frame(276)
    with pytest.raises(TypeError):
        _accel.parse_frame(276, frame, 1.0, 2)


@needs_accel
def test_no_reference_leaks() -> None:
    frame = eth(ipv4(tcp_bytes(SRC4, DST4, payload=bytes(1000))))
    ts = 5.5
    before = sys.getrefcount(frame), sys.getrefcount(ts)
    for _ in range(1000):
        seg = _accel.parse_frame(1, frame, ts)
        assert isinstance(seg, TcpSegment) and seg.ip.obj is frame
        del seg
    gc.collect()
    assert (sys.getrefcount(frame), sys.getrefcount(ts)) == before
    seg = _accel.parse_frame(1, frame, ts)
    assert gc.is_tracked(seg) and any(r is seg.ip for r in gc.get_referents(seg))


@needs_accel
def test_init_refuses_a_class_it_does_not_fit() -> None:
    from dataclasses import dataclass

    @dataclass(slots=True)
    class Other:
        ip: object

    with pytest.raises(TypeError):
        _accel.init(Other, ("ip",), parse_frame_pure)
    names = tuple(f"f{i}" for i in range(16))
    with pytest.raises(TypeError):
        _accel.init(TcpSegment, names, parse_frame_pure)
    assert packet.parse_frame(1, eth(ipv4(tcp_bytes(SRC4, DST4)))) is not None  # still initialised for TcpSegment


def test_switch_off_and_pure_fallback() -> None:
    """MPROXY_NO_ACCEL=1 runs the reference; so does a build without the extension."""
    code = "from mproxy.wire import packet; print(packet.ACCELERATED, packet.parse_frame is packet.parse_frame_pure)"
    env = dict(os.environ, MPROXY_NO_ACCEL="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    if _accel is None:
        assert not packet.ACCELERATED and packet.parse_frame is parse_frame_pure


@st.composite
def _checksummed(draw: st.DrawFn) -> tuple[bytes, int, int, int]:
    """A valid IPv4 or IPv6 segment, as is, with its TCP checksum left unfilled (the pseudo-header's
    sum, as checksum offload leaves it), or with bytes changed anywhere."""
    from mproxy.wire.checksum import ones_sum

    from .test_packet import DST6, SRC6, ipv6

    ver = draw(st.sampled_from([4, 6]))
    payload = draw(st.binary(max_size=1400))
    src, dst = (SRC4, DST4) if ver == 4 else (SRC6, DST6)
    tcp = tcp_bytes(src, dst, flags=0x10, payload=payload)
    ip = bytearray(ipv4(tcp) if ver == 4 else ipv6(tcp))
    off = 20 if ver == 4 else 40
    how = draw(st.sampled_from(["good", "unfilled", "changed"]))
    if how == "unfilled":
        ip[off + 16 : off + 18] = ones_sum(src + dst, 6 + len(tcp)).to_bytes(2, "big")
    elif how == "changed":
        for pos, val in draw(st.lists(st.tuples(st.integers(0, len(ip) - 1), st.integers(0, 255)), min_size=1,
                                      max_size=3)):
            if ver == 6 and pos < 8 or ver == 4 and pos in (0, 2, 3):  # keep the header's lengths readable
                continue
            ip[pos] = val
    return bytes(ip), off, len(ip), ver


@needs_accel
@settings(max_examples=3000, deadline=None)
@given(_checksummed())
def test_compiled_checksum_state_equals_the_reference(case: tuple[bytes, int, int, int]) -> None:
    from mproxy.wire.checksum import segment_checksum_state_pure

    ip, off, end, ver = case
    want = segment_checksum_state_pure(ip, off, end, ver)
    assert _accel.segment_checksum_state(ip, off, end, ver) == want
    assert _accel.segment_checksum_state(memoryview(ip), off, end, ver, False) == want
    assert _accel.segment_checksum_state(ip, off, end, ver, True) == segment_checksum_state_pure(ip, off, end, ver, True)


def test_checksum_state_reads_good_unfilled_and_bad() -> None:
    from mproxy.wire.checksum import CSUM_BAD, CSUM_GOOD, CSUM_UNFILLED, ones_sum, segment_checksum_state, \
        segment_checksum_state_pure

    tcp = tcp_bytes(SRC4, DST4, flags=0x10, payload=b"hello")
    ip = bytearray(ipv4(tcp))
    for f in {segment_checksum_state, segment_checksum_state_pure}:
        assert f(bytes(ip), 20, len(ip), 4) == CSUM_GOOD
        unf = bytearray(ip)
        unf[36:38] = ones_sum(SRC4 + DST4, 6 + len(tcp)).to_bytes(2, "big")
        assert f(bytes(unf), 20, len(ip), 4) == CSUM_UNFILLED
        bad = bytearray(ip)
        bad[36] ^= 0x5A
        assert f(bytes(bad), 20, len(ip), 4) == CSUM_BAD
        hdr = bytearray(ip)
        hdr[10] ^= 0x5A  # the IPv4 header's checksum
        assert f(bytes(hdr), 20, len(ip), 4) == CSUM_BAD
    if _accel is not None:
        with pytest.raises(ValueError):
            _accel.segment_checksum_state(bytes(ip), 20, len(ip) + 5, 4)
