"""TCP and IPv4 header checksums of tracked segments (``[tracker] checksums``).

A receiver drops a segment whose checksum fails, before reading anything of it: its bytes, its
options, its flags. A forged copy with a bad checksum is the oldest IDS insertion: the IDS reads
it, the server never does. So the tracker judges checksums where they mean something: live, every
one the kernel has filled in; in a capture, those that are neither right nor unfilled (captures
taken on a sending host or on veth carry unfilled ones, checksum offload: the field holds the
pseudo-header's sum for the NIC to finish -- every bad checksum of the reference captures is one).
"""

from __future__ import annotations

import pytest

from mproxy.core.events import Direction, Notice, NoticeType
from mproxy.core.tracker import Tracker, TrackerConfig
from mproxy.wire.packet import ACK, RST

from .session import Session, run, seg, streams

C2S = Direction.C2S


def broken(pkt: bytes) -> bytes:
    """``pkt`` with its TCP checksum wrong (as a forger, or an offloading sender's capture, has it)."""
    s = seg(pkt)
    b = bytearray(pkt)
    b[s.tcp_off + 16] ^= 0x5A
    return bytes(b)


def unfilled(pkt: bytes) -> bytes:
    """``pkt`` as an offloading sender's capture holds it: the TCP checksum field is the
    pseudo-header's sum, left for the NIC to finish."""
    from mproxy.wire.checksum import ones_sum

    s = seg(pkt)
    b = bytearray(pkt)
    b[s.tcp_off + 16 : s.tcp_off + 18] = ones_sum(s.src + s.dst, 6 + len(pkt) - s.tcp_off).to_bytes(2, "big")
    return bytes(b)


def bad_ip_header(pkt: bytes) -> bytes:
    b = bytearray(pkt)
    b[10] ^= 0x5A  # IPv4 header checksum
    return bytes(b)


def insertion(s: Session, forge=broken) -> list[bytes]:
    """A join; on it, BENIGN mapped after ``GET /?q=`` with a bad checksum; then UNION SELECT on the
    initial subflow, at the same DSNs: the server reads UNION."""
    pk = s.handshake() + s.join(1)
    pk.append(s.data(0, True, 0, b"GET /?q="))
    pk.append(forge(s.data(1, True, 8, b"BENIGN", rel=1)))
    pk.append(s.data(0, True, 8, b"UNION SELECT"))
    return pk


def notices(ev: list) -> list[Notice]:
    return [e for e in ev if isinstance(e, Notice)]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("forge", [broken, bad_ip_header])
def test_a_forged_copy_with_a_bad_checksum_places_nothing(fast: bool, forge) -> None:
    t = Tracker()
    t.fast_path = fast
    ev = run(t, insertion(Session(1), forge))
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT"
    (n,) = notices(ev)
    assert n.type == NoticeType.BAD_CHECKSUM and "so does mproxy" in n.detail and n.sport == 40002
    assert t.stats.bad_checksums == {"dropped": 1}


def test_count_takes_it_and_says_so() -> None:
    t = Tracker(TrackerConfig(checksums="count"))
    ev = run(t, insertion(Session(1)))
    assert streams(ev)[(1, C2S)] == b"GET /?q=BENIGNSELECT"
    n, later = notices(ev)  # then the real bytes differ from those taken
    assert n.type == NoticeType.BAD_CHECKSUM and "taken" in n.detail and later.type == NoticeType.OVERLAP_MISMATCH
    assert t.stats.bad_checksums == {"taken": 1}


@pytest.mark.parametrize("mode", ["auto", "count"])
def test_an_offloading_senders_capture_is_not_judged(mode: str) -> None:
    """Unfilled checksums (captured before the NIC or veth filled them in), beside good ones as in
    the reference captures: nothing dropped, nothing noticed, counted as unfilled."""
    s = Session(1)
    pk = s.handshake() + s.join(1)
    for i in range(20):
        pk.append(s.data(i % 2, True, 100 * i, bytes([65 + i]) * 100))
        pk.append(s.ack(i % 2, False, s.idsn[0] + 100 * (i + 1)))
    t = Tracker(TrackerConfig(checksums=mode))
    ev = run(t, [unfilled(p) if i % 3 else p for i, p in enumerate(pk)])
    assert streams(ev)[(1, C2S)] == b"".join(bytes([65 + i]) * 100 for i in range(20))
    assert not notices(ev)
    assert not t.stats.bad_checksums and t.stats.unfilled_checksums > 20


def test_verify_judges_unfilled_checksums_too() -> None:
    """``verify`` is for captures from a wire tap, where an unfilled checksum cannot happen."""
    s = Session(1)
    pk = s.handshake() + [unfilled(s.data(0, True, 0, b"abc"))]
    t = Tracker(TrackerConfig(checksums="verify"))
    ev = run(t, pk)
    assert (1, C2S) not in streams(ev) and t.stats.bad_checksums == {"dropped": 1}


def test_live_judges_every_checksum_the_kernel_filled_in() -> None:
    """Live, the kernel flags unfilled checksums (NFQA_SKB_CSUMNOTREADY): those pass unjudged; every
    other one is the sender's, so one that fails is dropped, even one that looks unfilled."""
    s = Session(1)
    syn, synack, ack = s.handshake()
    t = Tracker()
    ev: list = []
    pk = [(syn, False), (synack, False), (ack, False), (broken(s.data(0, True, 0, b"BENIGN", rel=1)), True),
          (unfilled(s.data(0, True, 0, b"BENIGN", rel=1)), True), (unfilled(s.data(0, True, 0, b"UNION ", rel=1)), False)]
    for i, (p, ready) in enumerate(pk):
        ev += t.process(seg(p, 1000.0 + i * 0.001), ready)
    ev += t.flush()
    assert streams(ev)[(1, C2S)] == b"UNION " and t.stats.bad_checksums == {"dropped": 2}
    assert t.stats.unfilled_checksums == 1


def test_a_forged_segment_right_after_the_handshake_is_judged() -> None:
    s = Session(1)
    pk = s.handshake()
    pk.append(broken(s.data(0, True, 0, b"BENIGN", rel=1)))
    pk.append(s.data(0, True, 0, b"UNION ", rel=1))
    t = Tracker()
    ev = run(t, pk)
    assert streams(ev)[(1, C2S)] == b"UNION " and t.stats.bad_checksums == {"dropped": 1}


def test_a_forged_rst_with_a_bad_checksum_does_not_end_the_subflow() -> None:
    """The receiver never sees it: the connection goes on, and so does the rebuilt stream."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"GET /?q=")]
    pk.append(broken(s._pkt(s.subs[0], True, RST | ACK, [])))
    pk.append(s.data(0, True, 8, b"UNION SELECT"))
    t = Tracker()
    ev = run(t, pk)
    assert streams(ev)[(1, C2S)] == b"GET /?q=UNION SELECT"
    assert t.stats.bad_checksums == {"dropped": 1} and t.stats.outcomes["reset"] == 0


def test_gro_sized_segments_of_a_capture_are_not_judged() -> None:
    """A capture taken on a receiver with GRO holds merged segments whose checksum is stale: more
    than a wire's 1500 bytes, they were never on a wire and are taken as they are."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"a" * 100), broken(s.data(0, True, 100, b"b" * 4000))]
    t = Tracker()
    ev = run(t, pk)
    assert streams(ev)[(1, C2S)] == b"a" * 100 + b"b" * 4000 and not t.stats.bad_checksums


def test_a_good_ack_only_direction_keeps_judging() -> None:
    """Pure ACKs count as segments with a checksum: a forged bare ACK changes nothing either."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"abc")]
    pk.append(broken(s.ack(0, False, s.idsn[0] + 3)))
    t = Tracker()
    run(t, pk)
    assert t.stats.bad_checksums == {"dropped": 1}


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="checksums"):
        Tracker(TrackerConfig(checksums="sometimes"))
