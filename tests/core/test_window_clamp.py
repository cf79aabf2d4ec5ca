"""Inline under ``on_memcap = "drop"``, the window an ACK of an MPTCP subflow advertises is lowered
to what the tracker may buffer for a connection direction (``Gateway.window_cap``): a sender then
never has more in flight past a hole in its stream than the gateway may keep, so a full buffer
cannot refuse the subflow bytes before a reinjection of the hole's bytes for good. Packets come from
our encoder (``tests/core/session.py``); the rewritten ones are read back by our parser and their
checksums summed."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from mproxy.config import ConfigError, parse_config
from mproxy.core.gateway import Gateway, Verdict
from mproxy.core.policy import OnMemcap, Policy
from mproxy.core.tracker import TrackerConfig
from mproxy.wire.build import build_tcp
from mproxy.wire.checksum import tcp_checksum
from mproxy.wire.packet import ACK, SYN, TcpSegment, parse_ip

from .session import Session


def _seg(ip: bytes) -> TcpSegment:
    seg = parse_ip(memoryview(ip))
    assert isinstance(seg, TcpSegment)
    return seg


def _conn(s: Session) -> list[bytes]:
    """Handshake, 10 bytes each way, the ACKs of both."""
    return s.handshake() + [s.data(0, True, 0, b"GET / HTTP"), s.ack(0, False, s.idsn[0] + 10),
                            s.data(0, False, 0, b"HTTP/1.1 2"), s.ack(0, True, s.idsn[1] + 10)]


def _run(gw: Gateway, pkts: list[bytes]) -> list[tuple[Verdict, bytes]]:
    out = []
    for i, p in enumerate(pkts):
        d = gw.packet(p, 1000.0 + i / 1000)
        out.append((d.verdict, d.payload if d.payload is not None else p))
    return out


@pytest.mark.parametrize("ipver", [4, 6])
@pytest.mark.parametrize("wscale, memcap, field", [(7, 256 << 20, 32768), (None, 65536, 16384), (14, 65536, 1)])
def test_every_ack_past_the_cap_is_clamped_and_nothing_else_changes(ipver: int, wscale: int | None, memcap: int,
                                                                     field: int) -> None:
    """The cap is ``min(ooo_limit, memcap / 4)`` (4 MiB by default), in units of the sender's window
    scale (none announced: unscaled), at least 1. The SYNs keep their windows (never scaled)."""
    pkts = _conn(Session(1, ipver, wscale=wscale))
    gw = Gateway(tracker=TrackerConfig(memcap=memcap))
    assert gw.window_cap == min(4 << 20, memcap // 4)
    out = _run(gw, pkts)
    for (verdict, new), old in zip(out, pkts):
        seg, was = _seg(new), _seg(old)
        assert tcp_checksum(seg.src, seg.dst, seg.ip[seg.tcp_off:]) == 0  # (summed over a right one: 0)
        if was.flags & SYN:
            assert verdict == Verdict.ACCEPT and new == old
            continue
        assert verdict == Verdict.ACCEPT_MODIFIED and seg.window == field
        assert new[: was.tcp_off + 14] == old[: was.tcp_off + 14] and new[was.tcp_off + 18 :] == old[was.tcp_off + 18 :]
    assert gw.stats.actions["window_clamped"] == len(pkts) - 2


def test_the_tracker_keeps_the_receivers_own_window() -> None:
    """What the receiver accepts is judged by the window it sent, not the one the sender got."""
    s = Session(1, wscale=7)
    gw = Gateway()
    _run(gw, _conn(s))
    hit = gw.tracker.subflow_of(_seg(s.data(0, True, 10, b"x")))
    assert hit is not None
    sf, d = hit
    assert sf.dirs[d].peer_win == 65535 << 7  # the client's bytes: the server's window
    assert sf.dirs[d ^ 1].peer_win == 65535 << 7


def _unclamped(gw: Gateway, pkts: list[bytes]) -> None:
    for p in pkts:
        d = gw.packet(p, 1000.0)
        assert d.verdict == Verdict.ACCEPT and d.payload is None
    assert "window_clamped" not in gw.stats.actions


@pytest.mark.parametrize("policy", [Policy(clamp_window=False), Policy(on_memcap=OnMemcap.PASS)])
def test_not_asked_for_or_not_dropping(policy: Policy) -> None:
    """Off, or under on_memcap = "pass" (nothing refused, so nothing to stall): windows as sent."""
    gw = Gateway(policy)
    assert gw.window_cap == 0
    _unclamped(gw, _conn(Session(1, wscale=7)))


def test_windows_within_the_cap_and_plain_tcp_are_left() -> None:
    _unclamped(Gateway(), _conn(Session(1, wscale=6)))  # 65535 << 6 is under 4 MiB
    src, dst = bytes([198, 18, 1, 2]), bytes([198, 18, 9, 2])
    wsopt = bytes([1, 3, 3, 7])
    _unclamped(Gateway(), [build_tcp(src, dst, 40000, 80, 1, 0, SYN, options=wsopt),
                           build_tcp(dst, src, 80, 40000, 9, 2, SYN | ACK, options=wsopt),
                           build_tcp(src, dst, 40000, 80, 2, 10, ACK, payload=b"plain")])


def test_a_subflow_picked_up_mid_stream_is_left() -> None:
    """Its window scale is unknown: a clamp could as well open the window as close it."""
    pkts = _conn(Session(1, wscale=7))
    _unclamped(Gateway(), pkts[3:])


def test_config() -> None:
    assert parse_config("[policy]\nclamp_window = false\n").policy.clamp_window is False
    assert parse_config("").policy.clamp_window is True
    with pytest.raises(ConfigError, match="clamp_window: expected true or false"):
        parse_config('[policy]\nclamp_window = "yes"\n')


@given(steps=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 0xFFFF)), min_size=1, max_size=40),
       ws=st.integers(0, 14), cap=st.integers(1 << 14, 1 << 24))
def test_the_clamped_right_edge_never_moves_back(steps: list[tuple[int, int]], ws: int, cap: int) -> None:
    """A receiver's ACKs whose right edges (ack + window << ws) never move back, as Linux's do:
    clamped as the gateway clamps them, their right edges never move back either, and never lie
    past the receiver's own (so a sender is never shown room the receiver has not given)."""
    ack, edge, shown = 0, 0, 0
    top = max(cap >> ws, 1)
    for advance, window in steps:
        ack += advance
        window = max(window, -(-(edge - ack) // (1 << ws)), 0)  # the receiver does not shrink its window
        edge = ack + (window << ws)
        clamped = ack + (min(window, top) << ws)
        assert shown <= clamped <= edge
        shown = clamped
