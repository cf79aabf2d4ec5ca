from __future__ import annotations

import hashlib

from hypothesis import given, settings, strategies as st

from mproxy.core.reassembler import DataStream, expand32


def test_expand32_nearest_and_wrap() -> None:
    assert expand32(5, 0x1_0000_0000) == 0x1_0000_0005
    assert expand32(0xFFFF_FFF0, 0x1_0000_0005) == 0x0_FFFF_FFF0  # just below the boundary
    assert expand32(0x10, 0x1_FFFF_FFF0) == 0x2_0000_0010  # just above
    assert expand32(7, 0xFFFF_FFFF_FFFF_FFF0) == 7  # 64-bit wrap


def test_in_order_and_out_of_order() -> None:
    s = DataStream(base=100)
    assert s.insert(105, b"world") == b""
    assert s.insert(100, b"hello") == b"helloworld"
    assert s.released == 10
    assert s.sha.hexdigest() == hashlib.sha256(b"helloworld").hexdigest()


def test_first_accepted_wins_and_differing_copy_is_reported() -> None:
    s = DataStream(base=0)
    s.insert(10, b"SELECT")
    s.insert(10, b"DELETE")  # same place, other bytes, still buffered
    assert [o.released for o in s.overlaps] == [False]
    out = s.insert(0, b"0123456789")
    assert out == b"0123456789SELECT"
    s.insert(12, b"LE")  # identical late copy: no report
    assert len(s.overlaps) == 1
    s.insert(12, b"XX")  # differing copy of released bytes
    assert s.overlaps[-1].released and s.overlaps[-1].dsn == 12


def test_memcap_counts_and_bounds() -> None:
    s = DataStream(base=0, ooo_limit=100)
    for i in range(10):
        s.insert(1000 + i * 50, b"x" * 50)
    assert s.ooo_bytes <= 100
    assert s.memcap_drops == 8


def test_fin_and_skip() -> None:
    s = DataStream(base=0)
    s.set_fin(10)
    s.insert(5, b"56789")
    assert not s.finished
    assert s.skip_to(5, acked=True) == b"56789"
    assert s.finished
    assert s.gaps[0].dsn == 0 and s.gaps[0].length == 5 and s.gaps[0].acked
    assert s.insert(8, b"zz") == b""  # nothing after DATA_FIN


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=40),
       order=st.randoms(use_true_random=False), dups=st.integers(0, 10))
def test_any_split_any_order_rebuilds(data: bytes, cuts: list[int], order, dups: int) -> None:
    pts = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [(a, data[a:b]) for a, b in zip(pts, pts[1:]) if b > a]
    # overlapping retransmissions: pieces that straddle earlier cuts
    for _ in range(dups):
        a = order.randrange(len(data))
        b = order.randrange(a, len(data)) + 1
        pieces.append((a, data[a:b]))
    order.shuffle(pieces)
    s = DataStream(base=7_000_000_000)
    out = b"".join(s.insert(7_000_000_000 + a, p) for a, p in pieces)
    assert out == data
    assert s.ooo_bytes == 0 and not s.overlaps
