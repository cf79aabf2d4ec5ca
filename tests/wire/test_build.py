"""The option encoders of ``mproxy.wire.build`` round-trip through our parser and the tracker's
readers of those options (the SACK blocks an ACK carries, the TSval PAWS checks)."""

from __future__ import annotations

import pytest

from mproxy.core.tracker import _holds_ofo, _tsval
from mproxy.wire.build import build_tcp, sack_option, tcp_options, timestamp_option
from mproxy.wire.packet import ACK, TcpSegment, option_spans, parse_ip

SRC, DST = bytes([198, 18, 0, 1]), bytes([198, 19, 0, 1])


def _seg(options: bytes, ack: int) -> TcpSegment:
    seg = parse_ip(memoryview(build_tcp(SRC, DST, 40000, 80, 1000, ack, ACK, options=options)))
    assert isinstance(seg, TcpSegment)
    return seg


@pytest.mark.parametrize("blocks", [[(5000, 6000)], [(5000, 6000), (7000, 8000), (9000, 9100)],
                                    [(0xFFFFFF00, 0x100)]])
def test_sack_and_timestamps_round_trip(blocks: list[tuple[int, int]]) -> None:
    opts = tcp_options(timestamp_option(0xDEADBEEF, 7), sack_option(*blocks))
    seg = _seg(opts, (blocks[0][0] - 1000) & 0xFFFFFFFF)
    spans = option_spans(seg.options)
    assert not isinstance(spans, Exception)
    assert [k for k, _, _ in spans] == [8, 5]  # (the NOPs are not spans)
    assert bytes(seg.options[:2]) == bytes(seg.options[12:14]) == b"\x01\x01"
    k, start, ln = spans[-1]
    assert ln == 2 + 8 * len(blocks)
    raw = bytes(seg.options[start + 2 : start + ln])
    assert [(int.from_bytes(raw[i : i + 4], "big"), int.from_bytes(raw[i + 4 : i + 8], "big"))
            for i in range(0, len(raw), 8)] == blocks
    assert _tsval(seg) == 0xDEADBEEF
    assert _holds_ofo(seg)  # every block lies above the acknowledgement


def test_a_block_below_the_acknowledgement_is_a_dsack() -> None:
    assert not _holds_ofo(_seg(sack_option((3000, 3500)), 4000))


@pytest.mark.parametrize("n", [0, 5])
def test_sack_block_count_is_checked(n: int) -> None:
    with pytest.raises(ValueError, match="SACK blocks"):
        sack_option(*[(i, i + 1) for i in range(n)])


def test_four_blocks_and_timestamps_do_not_fit() -> None:
    with pytest.raises(ValueError, match="TCP options"):
        build_tcp(SRC, DST, 1, 2, 3, options=tcp_options(timestamp_option(1),
                                                        sack_option(*[(i, i + 1) for i in range(4)])))
