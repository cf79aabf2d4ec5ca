"""The NFQUEUE adapter without a kernel: our nfnetlink_queue messages over a socketpair.

A ``SOCK_DGRAM`` socketpair stands in for the netlink socket: the test
writes packet messages laid out as the kernel lays them out (built by
:func:`packet_message`, whose layout is checked byte by byte below), the
adapter reads them, runs the core and sends verdict messages back, which the
test parses. The same code path on a real queue is exercised end to end in
tests/lab/test_gateway_live.py.
"""

from __future__ import annotations

import logging
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy.core.gateway import Decision, Gateway, Verdict
from mproxy.core.policy import Action, Policy
from mproxy.io.nfqueue import (
    NFQA_SKB_CSUMNOTREADY,
    NFQA_SKB_GSO,
    FailMode,
    Latency,
    QueueAdapter,
    _claimed_length,
    config_message,
    packet_message,
    parse_packet,
    queue_table,
    verdict_message,
)
from mproxy.wire.build import build_tcp
from mproxy.wire.checksum import ones_sum, pseudo_header_sum
from mproxy.wire.packet import ACK, TcpSegment, parse_ip

from ..core.session import Session

NLMSG = struct.Struct("=IHHII")


def tcp4(payload: bytes = b"x") -> bytes:
    return build_tcp(bytes([198, 18, 1, 2]), bytes([198, 18, 10, 2]), 40000, 80, 1, 1, ACK, payload=payload)


def verdicts(raw: bytes, with_mark: bool = False) -> list[tuple[int, int, bytes | None]]:
    """(packet id, verdict, payload or None[, mark or None]) of each NFQNL_MSG_VERDICT in one datagram."""
    out, off = [], 0
    while off + 16 <= len(raw):
        ln, mtype, flags, _seq, _pid = NLMSG.unpack_from(raw, off)
        assert mtype == (3 << 8) | 1 and flags == 1 and ln >= 20
        p, pid, verdict, payload, mark = off + 20, None, None, None, None
        while p + 4 <= off + ln:
            alen, atype = struct.unpack_from("=HH", raw, p)
            if atype == 2:
                verdict, pid = struct.unpack_from("!II", raw, p + 4)
            elif atype == 3:
                assert alen == 8
                mark = struct.unpack_from("!I", raw, p + 4)[0]
            elif atype == 10:
                payload = raw[p + 4 : p + alen]
            p += (alen + 3) & ~3
        assert pid is not None and verdict is not None
        out.append((pid, verdict, payload, mark) if with_mark else (pid, verdict, payload))  # type: ignore[arg-type]
        off += (ln + 3) & ~3
    return out


class Kernel:
    """The kernel's end of a socketpair the adapter reads and answers."""

    def __init__(self, qa: QueueAdapter) -> None:
        self.k, a = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        qa.sock = a
        self.qa = qa
        self.next_id = 1

    def queue(self, *packets: bytes, **kw: object) -> list[int]:
        ids = []
        for p in packets:
            self.k.send(packet_message(self.qa.num, self.next_id, p, **kw))  # type: ignore[arg-type]
            ids.append(self.next_id)
            self.next_id += 1
        return ids

    def answers(self) -> list[list[tuple[int, int, bytes | None]]]:
        """Verdicts per datagram (one datagram per send)."""
        out = []
        while True:
            try:
                out.append(verdicts(self.k.recv(1 << 17, socket.MSG_DONTWAIT)))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.k.close()
        self.qa.sock.close()


def flat(answers: list[list[tuple[int, int, bytes | None]]]) -> list[tuple[int, int, bytes | None]]:
    return [v for a in answers for v in a]


# --------------------------------------------------------------------------- message layouts
def test_config_message_layout() -> None:
    msg = config_message(0x1234, fail_open=True)
    ln, mtype, flags, seq, pid = NLMSG.unpack_from(msg)
    assert ln == len(msg) and mtype == (3 << 8) | 2 and flags == 0x1 | 0x4 and pid == 0
    assert struct.unpack_from("!BBH", msg, 16) == (socket.AF_UNSPEC, 0, 0x1234)
    # NFQA_CFG_PARAMS: copy range 65535, NFQNL_COPY_PACKET (9 bytes, padded to 12)
    assert struct.unpack_from("=HH", msg, 20) == (9, 2) and msg[24:29] == b"\0\0\xff\xff\2" and msg[29:32] == bytes(3)
    # NFQA_CFG_MASK (fail-open | GSO) then NFQA_CFG_FLAGS, big-endian u32
    assert struct.unpack_from("=HH", msg, 32) == (8, 4) and msg[36:40] == b"\0\0\0\5"
    assert struct.unpack_from("=HH", msg, 40) == (8, 5) and msg[44:48] == b"\0\0\0\5" and len(msg) == 48
    assert config_message(0, fail_open=False)[44:48] == b"\0\0\0\4"
    assert config_message(0, fail_open=False, gso=False)[44:48] == b"\0\0\0\0"
    no_copy = config_message(0, fail_open=True, copy_range=None, ack=False)
    assert len(no_copy) == 36 and struct.unpack_from("=H", no_copy, 6)[0] == 0x1


def test_packet_and_verdict_messages_round_trip() -> None:
    pkt = tcp4(b"hello")
    msg = packet_message(3, 77, pkt, indev=5, skb_info=NFQA_SKB_CSUMNOTREADY, cap_len=900, mark=0xAB0042)
    ln, mtype = struct.unpack_from("=IH", msg)
    assert ln == len(msg) and mtype == 3 << 8
    pid, a, b, info, cap, indev, mark = parse_packet(memoryview(msg), 20, len(msg))
    assert (pid, msg[a:b], info, cap, indev, mark) == (77, pkt, NFQA_SKB_CSUMNOTREADY, 900, 5, 0xAB0042)
    assert verdicts(verdict_message(3, 77, 1)) == [(77, 1, None)]
    assert verdicts(verdict_message(3, 78, 1, b"abc")) == [(78, 1, b"abc")]
    assert verdicts(verdict_message(3, 79, 4, mark=0x20000), with_mark=True) == [(79, 4, None, 0x20000)]


def test_the_in_device_is_the_bridge_port_behind_a_bridge() -> None:
    """NFQA_IFINDEX_PHYSINDEV (7), sent when the packet came in through a bridge, is the in-device
    the tracker pins subflows to: the bridge (NFQA_IFINDEX_INDEV) is both sides' there."""
    msg = packet_message(0, 5, tcp4(), indev=9)
    phys = struct.pack("=HH", 8, 7) + struct.pack("!I", 4)  # (an attribute; the payload stays last)
    at = 20 + 12  # after the nfgenmsg and the packet header attribute (4 + 7 bytes, padded to 12)
    msg = msg[:at] + phys + msg[at:]
    msg = struct.pack("=I", len(msg)) + msg[4:]
    *_, indev, _mark = parse_packet(memoryview(msg), 20, len(msg))
    assert indev == 4
    plain = packet_message(0, 5, tcp4(), indev=9)
    *_, indev, _mark = parse_packet(memoryview(plain), 20, len(plain))
    assert indev == 9


def test_parse_packet_stops_at_a_lying_attribute() -> None:
    msg = bytearray(packet_message(0, 9, tcp4()))
    # the payload attribute (last) claims more than the message holds: no payload, the id survives
    plen_off = len(msg) - ((4 + len(tcp4()) + 3) & ~3)
    struct.pack_into("=H", msg, plen_off, 0xFFF0)
    pid, a, _b, *_ = parse_packet(memoryview(msg), 20, len(msg))
    assert pid == 9 and a == -1


# --------------------------------------------------------------------------- adapter
def test_repeat_verdict_sets_only_the_masked_mark_bits() -> None:
    """The control queue's REPEAT carries the worker bits and keeps the rest of the packet's mark."""
    qa = QueueAdapter(0, lambda data, ts, c, i: Decision(Verdict.REPEAT, mark=0x20000), mark_mask=0xFF0000)
    k = Kernel(qa)
    k.queue(tcp4(), mark=0x11000007)
    k.queue(tcp4())
    qa._on_readable()
    assert flat_marks(k) == [(1, 4, None, 0x11020007), (2, 4, None, 0x20000)]
    assert qa.stats.repeated == 2 and qa.stats.accepted == 0
    k.close()


def test_a_worker_clears_the_worker_bits_the_control_set() -> None:
    """An INVALID packet reaches a worker's queue with its worker bits in the packet mark (no
    conntrack entry to save them in); the worker's verdict clears them and keeps the rest, and
    leaves every other packet's mark alone (no mark attribute at all)."""
    verdict = {b"d": Decision(Verdict.DROP), b"a": Decision(Verdict.ACCEPT)}
    qa = QueueAdapter(0, lambda data, ts, c, i: verdict.get(data[-1:]), clear_mask=0xFF0000)
    k = Kernel(qa)
    k.queue(tcp4(b"a"), mark=0x11020007)
    k.queue(tcp4(b"d"), mark=0x20000)
    k.queue(tcp4(b"a"), mark=0x11000007)
    k.queue(tcp4(b"x"), mark=0x30000)  # the core failed: fail open, the bits cleared all the same
    qa._on_readable()
    assert flat_marks(k) == [(1, 1, None, 0x11000007), (2, 0, None, 0), (3, 1, None, None), (4, 1, None, 0)]
    assert qa.stats.core_errors == 0
    k.close()


def flat_marks(k: Kernel) -> list[tuple[int, int, bytes | None, int | None]]:
    out = []
    while True:
        try:
            out += verdicts(k.k.recv(1 << 17, socket.MSG_DONTWAIT), with_mark=True)
        except BlockingIOError:
            return out  # type: ignore[return-value]


def test_verdicts_are_batched_and_frames_follow_them() -> None:
    out: list[list[tuple[float, bytes]]] = []
    qa = QueueAdapter(0, Gateway().packet, emit=out.append)
    k = Kernel(qa)
    ids = k.queue(*Session(1).handshake())
    qa._on_readable()
    answers = k.answers()
    assert len(answers) == 1 and [(i, v) for i, v, _ in answers[0]] == [(i, 1) for i in ids]
    assert qa.stats.accepted == 3 and qa.stats.verdict_sends == 1 and qa.latency.n == 3
    assert out and all(len(f) <= 1514 for batch in out for _, f in batch), "the emitted handshake reaches the sink"
    k.close()


def test_flush_every_bounds_the_wait() -> None:
    qa = QueueAdapter(0, lambda d, t, c, i: Decision(Verdict.ACCEPT), flush_every=2)
    k = Kernel(qa)
    k.queue(*[tcp4()] * 5)
    qa._on_readable()
    assert [len(a) for a in k.answers()] == [2, 2, 1]
    k.close()


def test_ids_the_kernel_never_delivered_are_counted() -> None:
    """The queue numbers what it takes, in the order it sends them: a skipped id is a packet that the
    socket could not take (accepted uninspected with fail open), counted across the 32-bit wrap."""
    qa = QueueAdapter(0, lambda d, t, c, i: Decision(Verdict.ACCEPT))
    k = Kernel(qa)
    k.queue(tcp4(), tcp4())  # 1, 2
    k.next_id = 6  # 3..5 lost
    k.queue(tcp4())
    qa._on_readable()
    assert qa.stats.undelivered == 3 and qa.stats.accepted == 3
    k.next_id = 0xFFFFFFFE  # 7..0xFFFFFFFD lost, then the counter wraps: ..., 0xFFFFFFFF, 0, 1
    k.queue(tcp4(), tcp4())
    k.next_id = 0
    k.queue(tcp4(), tcp4())
    qa._on_readable()
    assert qa.stats.undelivered == 3 + (0xFFFFFFFE - 7) and qa.stats.packets == 7
    k.close()


def test_a_stall_with_nothing_to_read_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from mproxy.io.nfqueue import StallWatch

    qa = QueueAdapter(3, lambda d, t, c, i: Decision(Verdict.ACCEPT))
    k = Kernel(qa)
    qa._fd = qa.sock.fileno()
    w = StallWatch()

    async def ticks() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(4):  # the kernel says 5 wait; the socket has nothing: lost messages
            w.check(qa, 5, loop)
        qa.detach(loop)

    with caplog.at_level(logging.WARNING, "mproxy"):
        asyncio.run(ticks())
    assert caplog.text.count("queue 3: 5 packets have no verdict and none can be read") == 1
    assert qa.stats.rewatched == 0
    k.close()


def test_batch_budget_yields_to_the_loop() -> None:
    qa = QueueAdapter(0, lambda d, t, c, i: Decision(Verdict.DROP), batch=3)
    k = Kernel(qa)
    k.queue(*[tcp4()] * 5)
    qa._on_readable()
    assert qa.stats.packets == 3 and qa.stats.full_batches == 1
    qa._on_readable()
    assert qa.stats.packets == 5 and qa.stats.full_batches == 1
    assert {v for _, v, _ in flat(k.answers())} == {0} and qa.stats.dropped == 5
    k.close()


def _partial(pkt: bytes) -> bytes:
    """The packet as a sender with checksum offload hands it over: the field holds the pseudo-header sum."""
    s = parse_ip(memoryview(pkt))
    assert isinstance(s, TcpSegment)
    buf = bytearray(pkt)
    buf[s.tcp_off + 16 : s.tcp_off + 18] = pseudo_header_sum(s.src, s.dst, 6, len(pkt) - s.tcp_off).to_bytes(2, "big")
    return bytes(buf)


def _tcp_ok(pkt: bytes) -> bool:
    s = parse_ip(memoryview(pkt))
    assert isinstance(s, TcpSegment)
    return ones_sum(pkt[s.tcp_off :], pseudo_header_sum(s.src, s.dst, 6, len(pkt) - s.tcp_off)) == 0xFFFF


@pytest.mark.parametrize("info", [0, NFQA_SKB_CSUMNOTREADY])
def test_downgrade_rewrite_carries_a_complete_checksum(info: int) -> None:
    qa = QueueAdapter(0, Gateway(Policy(default=Action.DOWNGRADE)).packet)
    k = Kernel(qa)
    syn = Session(1).handshake()[0]
    queued = _partial(syn) if info else syn
    assert _tcp_ok(syn) and (not info or not _tcp_ok(queued))
    k.queue(queued, skb_info=info)
    qa._on_readable()
    ((_, verdict, payload),) = flat(k.answers())
    assert verdict == 1 and payload is not None and payload != queued and qa.stats.modified == 1
    assert _tcp_ok(payload), "the kernel sends a rewritten packet as it is: its checksum must be whole"
    k.close()


@pytest.mark.parametrize("fail,verdict", [(FailMode.OPEN, 1), (FailMode.CLOSED, 0)])
def test_core_exception_gets_fail_mode_verdict_logged_once(fail: FailMode, verdict: int,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def boom(data: bytes, ts: float, csum_ready: bool, iface: int) -> Decision:
        raise ValueError("core bug")

    qa = QueueAdapter(0, boom, fail=fail)
    k = Kernel(qa)
    k.queue(*[tcp4()] * 3)
    with caplog.at_level(logging.DEBUG, logger="mproxy.nfqueue"):
        qa._on_readable()
    assert [v for _, v, _ in flat(k.answers())] == [verdict] * 3 and qa.stats.core_errors == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "core raised" in warnings[0].getMessage()
    assert any("ValueError: core bug" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    k.close()


@pytest.mark.parametrize("fail,verdict", [(FailMode.OPEN, 1), (FailMode.CLOSED, 0)])
def test_truncated_copy_is_not_parsed(fail: FailMode, verdict: int, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[bytes] = []

    def core(data: bytes, ts: float, csum_ready: bool, iface: int) -> Decision:
        seen.append(data)
        return Decision(Verdict.ACCEPT)

    qa = QueueAdapter(0, core, fail=fail)
    k = Kernel(qa)
    full = tcp4(b"y" * 3000)
    k.queue(full[:2000])  # the IP header claims more than was copied
    k.queue(full, cap_len=70000)  # the kernel says the packet was longer than the copy
    with caplog.at_level(logging.WARNING, logger="mproxy.nfqueue"):
        qa._on_readable()
    assert [v for _, v, _ in flat(k.answers())] == [verdict] * 2 and not seen and qa.stats.truncated == 2
    (w,) = caplog.records
    assert "2000 of 3040 bytes" in w.getMessage() and "65535" in w.getMessage()
    assert _claimed_length(full) == len(full)
    six = build_tcp(bytes(15) + b"\1", bytes(15) + b"\2", 1, 2, 0, payload=b"abc")
    assert _claimed_length(six) == len(six) and _claimed_length(b"\x45") == 0
    k.close()


def test_gso_packet_is_handled_whole_and_reaches_the_sink_as_segments() -> None:
    s = Session(1)
    out: list[list[tuple[float, bytes]]] = []
    qa = QueueAdapter(0, Gateway().packet, emit=out.append)
    k = Kernel(qa)
    k.queue(*s.handshake())
    big = bytes(range(256)) * 200  # 51,200 bytes in one queued packet
    k.queue(_partial(s.data(0, True, 0, big)), skb_info=NFQA_SKB_GSO | NFQA_SKB_CSUMNOTREADY)
    qa._on_readable()
    assert [v for _, v, _ in flat(k.answers())] == [1] * 4 and qa.stats.gso == 1
    frames = [f for batch in out for _, f in batch]
    data = [f for f in frames if len(f) > 100]  # not the handshake or ACKs
    assert len(data) == 36 and all(len(f) <= 14 + 40 + 1460 for f in frames)
    assert b"".join(f[14 + 40 :] for f in data) == big
    k.close()


def test_kernel_errors_and_send_failures_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    qa = QueueAdapter(0, lambda d, t, c, i: Decision(Verdict.ACCEPT))
    k = Kernel(qa)
    err = NLMSG.pack(36, 2, 0, 0, 0) + struct.pack("=i", -2) + NLMSG.pack(36, (3 << 8) | 1, 1, 0, 0)
    k.k.send(err)
    ack = NLMSG.pack(36, 2, 0, 0x6D707278, 0) + struct.pack("=i", 0) + bytes(16)  # a late configuration ACK
    k.k.send(ack)
    with caplog.at_level(logging.ERROR, logger="mproxy.nfqueue"):
        qa._on_readable()
    assert qa.stats.verdict_errors == 1 and "No such file" in caplog.records[0].getMessage()
    k.queue(tcp4())
    k.k.close()  # the peer is gone: send fails
    qa._on_readable()
    assert qa.stats.verdict_errors == 2 and qa.stats.packets == 1
    qa.sock.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=120),
                          st.builds(lambda i, p: packet_message(0, i, p), st.integers(0, 2**32 - 1),
                                    st.binary(max_size=200))), max_size=6))
def test_garbage_messages_never_escape(msgs: list[bytes]) -> None:
    qa = QueueAdapter(0, Gateway().packet)
    k = Kernel(qa)
    for m in msgs:
        k.k.send(m)
    qa._on_readable()
    answered = flat(k.answers())
    assert len(answered) == qa.stats.packets and qa.stats.core_errors == 0
    k.close()


def test_latency_summary() -> None:
    lat = Latency(size=100)
    assert lat.summary() == {"count": 0}
    for i in range(1, 1001):
        lat.add(i * 1000)
    s = lat.summary()
    assert s["count"] == 1000 and s["max"] == 1000.0 and 900 <= s["p50"] <= 1000  # ring keeps the last 100


def test_queue_table_reads_the_kernels_counters() -> None:
    # /proc/net/netfilter/nfnetlink_queue: queue portid waiting copy_mode copy_range dropped user_dropped id_seq 1
    text = "    0  41235     3 2 65535     0     0     1207  1\n    7  41236     0 2 65535    12     1       99  1\n\n"
    assert queue_table(text) == {
        0: {"portid": 41235, "waiting": 3, "dropped": 0, "user_dropped": 0, "id_sequence": 1207},
        7: {"portid": 41236, "waiting": 0, "dropped": 12, "user_dropped": 1, "id_sequence": 99},
    }
    assert queue_table("") == {} and queue_table("garbage line\n") == {}


@pytest.mark.parametrize("fail,verdict", [(FailMode.OPEN, 1), (FailMode.CLOSED, 0)])
def test_a_gso_packet_rewritten_in_place_is_sent_and_one_whose_length_changed_is_a_core_error(
        fail: FailMode, verdict: int, caplog: pytest.LogCaptureFixture) -> None:
    """The window clamp and the TTL raise rewrite GSO packets: the kernel segments them again and
    sets up each segment's checksum (lab: tests/lab/test_adversarial_live.py), so they go back as
    they are (no checksum filled in). A length change would be segmented wrong: a core bug, fail
    mode."""
    big = _partial(tcp4(b"z" * 30000))
    seg = parse_ip(memoryview(big))
    assert isinstance(seg, TcpSegment)
    clamped = bytearray(big)
    clamped[seg.tcp_off + 14 : seg.tcp_off + 16] = b"\0\x10"

    def core(data: bytes, ts: float, csum_ready: bool, iface: int) -> Decision:
        assert not csum_ready
        return Decision(Verdict.ACCEPT_MODIFIED, bytes(clamped) if data == big else data + b"x")

    qa = QueueAdapter(0, core, fail=fail)
    k = Kernel(qa)
    k.queue(big, skb_info=NFQA_SKB_GSO | NFQA_SKB_CSUMNOTREADY)
    k.queue(_partial(tcp4(b"w" * 20000)), skb_info=NFQA_SKB_GSO | NFQA_SKB_CSUMNOTREADY)
    with caplog.at_level(logging.ERROR, logger="mproxy.nfqueue"):
        qa._on_readable()
    (_, v1, p1), (_, v2, p2) = flat(k.answers())
    assert (v1, p1) == (1, bytes(clamped)) and (v2, p2) == (verdict, None)
    assert qa.stats.modified == 1 and qa.stats.core_errors == 1
    (rec,) = caplog.records
    assert "changed the length of a GSO packet" in rec.getMessage()
    k.close()
