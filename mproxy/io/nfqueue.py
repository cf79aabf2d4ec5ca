"""NFQUEUE adapter: queued packets in, verdicts out, on an asyncio (uvloop) reader.

netfilterqueue binds the queue (``nfq_open``, ``nfq_create_queue``) and
hands us its netlink socket's file descriptor; from then on this module
speaks nfnetlink_queue on that socket itself. The event loop watches the
descriptor; when it is readable :meth:`QueueAdapter._on_readable` reads up to
:attr:`QueueAdapter.batch` messages (``recv_into`` one reused buffer), runs
the sans-I/O core on each queued packet and sends the verdicts, several
``NFQNL_MSG_VERDICT`` messages per ``send``. There is no thread and no
blocking loop.

Why not netfilterqueue's own ``run``/``Packet`` path: it receives into a
4096-byte buffer and copies at most 4016 bytes of a packet, so the kernel
must cut GSO packets into MTU-sized ones before queueing them, and every
packet costs a Python callback, an object and a verdict syscall. Here the
queue is configured (over netlink, on the bound socket: the kernel only
takes a queue's configuration from it) with

* ``NFQA_CFG_F_GSO``: GSO packets (up to 64 KB of one TCP flow) are queued
  whole, not segmented — for bulk transfers ~40x fewer queued packets. Such
  packets (and any ``CHECKSUM_PARTIAL`` one) carry a TCP checksum that is not
  filled in (``NFQA_SKB_CSUMNOTREADY``); the core judges no such checksum
  (every other one is the sender's: a segment whose checksum fails is one
  the receiver drops, so its bytes must not reach the IDS), and a payload we
  rewrite gets its checksum computed in full (the kernel then sends it as
  is), except a GSO one, which the kernel segments again and checksums per
  segment;
* copy range 65535 (the most an ``NFQA_PAYLOAD`` attribute holds): larger
  packets (BIG TCP) arrive cut, are counted as ``truncated`` and get the
  fail-mode verdict;
* ``NFQA_CFG_F_FAIL_OPEN`` (fail open) or not (fail closed): what the kernel
  does when the queue is full.

Every packet gets a verdict, whatever happens: a core exception or a packet
the kernel copied only partly is accepted (fail open) or dropped (fail closed),
counted, and logged once.

With ``[queue] workers`` > 1 one adapter reads the control queue (its
handler answers ``REPEAT`` with the worker in the packet mark, under
``mark_mask``) and one per worker process reads that worker's queue; see
:mod:`mproxy.workers` and :mod:`mproxy.core.steering`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
import subprocess
import time
import traceback
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..core.gateway import Decision, Verdict
from ..core.pipeline import Frames
from ..wire.rewrite import fill_tcp_checksum

__all__ = [
    "FailMode", "QueueStats", "Latency", "QueueAdapter", "QueueError", "configure_queue", "config_message",
    "packet_message", "parse_packet", "verdict_message", "kernel_queue_state", "oversize_interfaces",
    "COPY_RANGE", "NFQA_SKB_CSUMNOTREADY", "NFQA_SKB_GSO",
]

log = logging.getLogger("mproxy.nfqueue")

# nfnetlink_queue (linux/netfilter/nfnetlink_queue.h, linux/netfilter/nfnetlink.h)
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_IFINDEX_INDEV = 1, 2, 3, 5
NFQA_IFINDEX_PHYSINDEV = 7  # the bridge port, when the packet came in through a bridge
NFQA_PAYLOAD, NFQA_CAP_LEN, NFQA_SKB_INFO = 10, 13, 14
NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 2, 3, 4, 5
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 1, 4
NFQA_SKB_CSUMNOTREADY, NFQA_SKB_GSO = 1, 2
NFQNL_COPY_PACKET = 2
NF_DROP, NF_ACCEPT, NF_REPEAT = 0, 1, 4
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
COPY_RANGE = 0xFFFF  # NFQA_PAYLOAD's length field is 16 bits
_PACKET_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_NLMSG = struct.Struct("=IHHII")
_NLMSG_HEAD = struct.Struct("=IH")
_NFGEN = struct.Struct("!BBH")
_NLA = struct.Struct("=HH")
_BE32 = struct.Struct("!I")
_VERDICT_HDR = struct.Struct("!II")
_NLMSG_ERRNO = struct.Struct("=i")  # nlmsgerr.error, after the header
_CONFIG_SEQ = 0x6D707278  # "mprx": tells our ACK from libnfnetlink's
_SO_RCVBUFFORCE = 33  # not exported by Python's socket module
# NETLINK_NO_ENOBUFS: when the socket overflows, the kernel sets no ENOBUFS error on it. The error
# makes epoll report EPOLLERR, and libuv (uvloop) then stops watching the descriptor for good: the queue
# was no longer read after an overflow. Overflows are counted from the packet ids mproxy never reads.
_SOL_NETLINK, _NETLINK_NO_ENOBUFS = 270, 5
_RECV_BUFFER = 0x10000 + 0x4000  # the largest packet message (64 KB payload + attributes) fits
_FLUSH_BYTES = 32 * 1024  # send the verdicts gathered so far once they take this much


class FailMode(str, Enum):
    OPEN = "open"  # accept when mproxy cannot decide
    CLOSED = "closed"  # drop when mproxy cannot decide


class QueueError(RuntimeError):
    """The queue could not be bound or configured (message says why and what to check)."""


@dataclass(slots=True)
class QueueStats:
    packets: int = 0
    accepted: int = 0
    dropped: int = 0
    modified: int = 0  # accepted with a rewritten payload
    core_errors: int = 0  # the core raised: verdict by fail mode
    truncated: int = 0  # the kernel copied less than the IP packet: verdict by fail mode
    verdict_errors: int = 0  # issuing the verdict itself failed (or the kernel refused it)
    sink_errors: int = 0
    overflows: int = 0  # times the socket overflowed: runs of ids never read (the kernel accepted/dropped them)
    undelivered: int = 0  # packets in those runs: the queue took them but could not hand them over
    malformed: int = 0  # netlink messages we could not read (no verdict possible without an id)
    gso: int = 0  # packets queued whole as GSO (several TCP segments' worth)
    queued_bytes: int = 0  # IP bytes of the queued packets
    verdict_sends: int = 0  # send() calls carrying verdicts
    repeated: int = 0  # sent back through the hook with a mark (control queue: steered to a worker)
    wakeups: int = 0
    full_batches: int = 0  # batches cut at the budget (sustained load)
    rewatched: int = 0  # times the service found the socket unwatched with packets waiting, and watched it again

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


class Latency:
    """Verdict latencies in ns: a bounded ring of recent samples for percentiles, plus totals."""

    __slots__ = ("ring", "size", "n", "total", "max")

    def __init__(self, size: int = 1 << 16) -> None:
        self.ring = array("q", bytes(8 * size))
        self.size = size
        self.n = 0
        self.total = 0
        self.max = 0

    def add(self, ns: int) -> None:
        self.ring[self.n % self.size] = ns
        self.n += 1
        self.total += ns
        if ns > self.max:
            self.max = ns

    def summary(self) -> dict[str, float]:
        """count, mean, p50, p90, p99, p999, max in µs (percentiles over the last ``size`` samples)."""
        k = min(self.n, self.size)
        if not k:
            return {"count": 0}
        xs = sorted(self.ring[:k])

        def pct(p: float) -> float:
            return round(xs[min(k - 1, int(p * k))] / 1000, 1)

        return {"count": self.n, "mean": round(self.total / self.n / 1000, 1), "p50": pct(0.5),
                "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999), "max": round(self.max / 1000, 1)}


def _claimed_length(data: bytes) -> int:
    """The IP packet's length according to its header (0: unknown)."""
    if len(data) < 20:
        return 0
    v = data[0] >> 4
    if v == 4:
        return (data[2] << 8) | data[3]
    if v == 6 and len(data) >= 40:
        plen = (data[4] << 8) | data[5]
        return 40 + plen if plen else 0  # 0: jumbogram, length in a hop-by-hop option
    return 0


def _ifname(index: int) -> str:
    if not index:
        return "?"
    try:
        return socket.if_indextoname(index)
    except OSError:
        return f"ifindex {index}"


# --------------------------------------------------------------------------- messages
def _attr(atype: int, value: bytes) -> bytes:
    n = 4 + len(value)
    return _NLA.pack(n, atype) + value + bytes(-n & 3)


def _nfnl(msg_type: int, flags: int, seq: int, res_id: int, attrs: bytes) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, res_id) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


def config_message(queue_num: int, *, fail_open: bool, gso: bool = True, copy_range: int | None = COPY_RANGE,
                   ack: bool = True, seq: int = _CONFIG_SEQ) -> bytes:
    """NFQNL_MSG_CONFIG: copy mode and range, then the fail-open and GSO flags, for ``queue_num``.

    Attributes are big-endian (the kernel reads them with ``ntohl``); ``res_id``
    in the nfgenmsg header is the queue number in network order. With
    ``copy_range=None`` the copy parameters are left as they are.
    """
    attrs = b""
    if copy_range is not None:
        attrs += _attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))
    mask = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
    flags = (NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (NFQA_CFG_F_GSO if gso else 0)
    attrs += _attr(NFQA_CFG_MASK, _BE32.pack(mask)) + _attr(NFQA_CFG_FLAGS, _BE32.pack(flags))
    return _nfnl(NFQNL_MSG_CONFIG, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq, queue_num, attrs)


def verdict_message(queue_num: int, packet_id: int, verdict: int, payload: bytes | None = None,
                    mark: int | None = None) -> bytes:
    """NFQNL_MSG_VERDICT for one packet, with the rewritten packet when ``payload`` is given.

    ``mark`` replaces the packet's whole mark (the kernel does not mask it).
    """
    attrs = _attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, packet_id))
    if mark is not None:
        attrs += _attr(NFQA_MARK, _BE32.pack(mark))
    if payload is not None:
        attrs += _attr(NFQA_PAYLOAD, payload)
    return _nfnl(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, queue_num, attrs)


def packet_message(queue_num: int, packet_id: int, payload: bytes, *, indev: int = 0, skb_info: int = 0,
                   cap_len: int | None = None, hw_protocol: int = 0x0800, hook: int = 2, seq: int = 0,
                   mark: int = 0) -> bytes:
    """NFQNL_MSG_PACKET as the kernel lays it out (header first, payload last): for tests and fuzzing."""
    attrs = _attr(NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, hw_protocol, hook))
    if mark:
        attrs += _attr(NFQA_MARK, _BE32.pack(mark))
    if indev:
        attrs += _attr(NFQA_IFINDEX_INDEV, _BE32.pack(indev))
    if cap_len is not None:
        attrs += _attr(NFQA_CAP_LEN, _BE32.pack(cap_len))
    if skb_info:
        attrs += _attr(NFQA_SKB_INFO, _BE32.pack(skb_info))
    attrs += _attr(NFQA_PAYLOAD, payload)
    return _nfnl(NFQNL_MSG_PACKET, 0, seq, queue_num, attrs)


def parse_packet(mv: memoryview, p: int, end: int) -> tuple[int, int, int, int, int, int, int]:
    """Attributes of one NFQNL_MSG_PACKET between ``p`` (after the nfgenmsg) and ``end``.

    Returns (packet id or -1, payload start, payload end, skb info, cap len, in-device index, packet
    mark); a payload start of -1 means none. The in-device is the bridge port when the packet came
    in through a bridge (the bridge itself is both sides' in-device there). Stops at the first
    attribute whose length lies (the rest is not trusted).
    """
    pid = start = stop = -1
    info = cap = indev = phys = mark = 0
    while p + 4 <= end:
        alen, atype = _NLA.unpack_from(mv, p)
        if alen < 4 or p + alen > end:
            break
        t = atype & NLA_TYPE_MASK
        if t == NFQA_PAYLOAD:
            start, stop = p + 4, p + alen
        elif alen >= 8:
            if t == NFQA_PACKET_HDR:
                pid = _BE32.unpack_from(mv, p + 4)[0]
            elif t == NFQA_SKB_INFO:
                info = _BE32.unpack_from(mv, p + 4)[0]
            elif t == NFQA_CAP_LEN:
                cap = _BE32.unpack_from(mv, p + 4)[0]
            elif t == NFQA_IFINDEX_INDEV:
                indev = _BE32.unpack_from(mv, p + 4)[0]
            elif t == NFQA_IFINDEX_PHYSINDEV:
                phys = _BE32.unpack_from(mv, p + 4)[0]
            elif t == NFQA_MARK:
                mark = _BE32.unpack_from(mv, p + 4)[0]
        p += (alen + 3) & ~3
    return pid, start, stop, info, cap, phys or indev, mark


def configure_queue(sock: socket.socket, queue_num: int, *, fail_open: bool, gso: bool = True,
                    timeout: float = 1.0) -> bool | None:
    """Copy whole packets (range 65535), set fail-open and GSO flags; True when the kernel confirmed.

    Runs right after binding, before anything is queued, on the bound socket:
    the kernel's ACK is read here. Returns None when a queued packet arrived
    first (it stays in the socket for the reader; the ACK that follows is
    read and ignored there), so the outcome is unconfirmed. Raises QueueError
    when the kernel refused the setting.
    """
    import select

    sock.send(config_message(queue_num, fail_open=fail_open, gso=gso))
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return None
        head = sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(head) < _NLMSG.size:
            return None
        _ln, mtype, _fl, seq, _pid = _NLMSG.unpack_from(head)
        if mtype != NLMSG_ERROR or seq != _CONFIG_SEQ:
            return None
        sock.recv(_RECV_BUFFER, socket.MSG_DONTWAIT)  # consume our ACK
        err = -_NLMSG_ERRNO.unpack_from(head, _NLMSG.size)[0] if len(head) >= _NLMSG.size + 4 else 0
        if err:
            raise QueueError(f"kernel refused the configuration of queue {queue_num} (copy range, fail-open, "
                             f"GSO): {os.strerror(err)}")
        return True


def kernel_queue_state(queue_num: int) -> dict[str, int] | None:
    """The kernel's counters for the queue (``/proc/net/netfilter/nfnetlink_queue``), or None.

    ``waiting``: packets handed to us without a verdict yet; ``dropped``: dropped because the
    queue was full (fail closed); ``user_dropped``: could not be sent to the socket;
    ``id_sequence``: the id of the last packet the queue took.
    """
    table = kernel_queue_table()
    return table.get(queue_num) if table is not None else None


def kernel_queue_table() -> dict[int, dict[str, int]] | None:
    """Every bound queue of this network namespace (see :func:`kernel_queue_state`), or None."""
    try:
        text = Path("/proc/net/netfilter/nfnetlink_queue").read_text()
    except OSError:
        return None
    return queue_table(text)


def queue_table(text: str) -> dict[int, dict[str, int]]:
    """``/proc/net/netfilter/nfnetlink_queue`` read (this namespace's, or one a test ``cat``-ed): queue -> counters."""
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0].isdigit():
            out[int(f[0])] = {"portid": int(f[1]), "waiting": int(f[2]), "dropped": int(f[5]),
                              "user_dropped": int(f[6]), "id_sequence": int(f[7])}
    return out


def oversize_interfaces(names: list[str] | None = None) -> list[tuple[str, int]]:
    """Interfaces (given, or all but loopback) that may hand the queue packets above 65535 bytes (BIG TCP).

    Such packets cannot be copied whole (``NFQA_PAYLOAD`` holds at most 65535
    bytes); they would be counted as truncated and get the fail-mode verdict.
    """
    try:
        out = subprocess.run(["ip", "-d", "-j", "link", "show"], capture_output=True, text=True, timeout=5)
        links = json.loads(out.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    found = []
    for link in links:
        name = link.get("ifname", "")
        if name == "lo" or (names and name not in names):
            continue
        size = max(int(link.get("gso_max_size", 0) or 0), int(link.get("gro_max_size", 0) or 0),
                   int(link.get("mtu", 0) or 0))
        if size > 65536:
            found.append((name, size))
    return found


@dataclass(slots=True)
class StallWatch:
    """Packets waiting in the kernel and none read for a whole tick: the event loop may have stopped
    watching the socket (libuv does so for good after an error event on it). Fed the kernel's
    ``waiting`` every tick; watches the socket again when it stalls, and says so."""

    last_packets: int = -1
    last_waiting: int = 0
    warned: bool = False

    def check(self, qa: QueueAdapter, waiting: int, loop: Any) -> None:
        if qa.stats.packets == self.last_packets and waiting and waiting == self.last_waiting:
            read = qa.watch_again(loop)
            if read:
                qa.stats.rewatched += 1
                log.warning("queue %d: %d packets waited for a verdict while the socket was not watched; "
                            "watching it again read %d", qa.num, waiting, read)
            elif not self.warned:
                self.warned = True
                log.warning("queue %d: %d packets have no verdict and none can be read (lost netlink "
                            "messages?); they count against max_len until mproxy stops", qa.num, waiting)
        self.last_packets, self.last_waiting = qa.stats.packets, waiting


# (packet, time, its checksums are the sender's: the kernel did not flag them NFQA_SKB_CSUMNOTREADY)
Handler = Callable[[bytes, float, bool, int], Decision]  # (packet, time, checksums ready, in-device)
FrameSink = Callable[[Frames], None]


@dataclass(slots=True)
class QueueAdapter:
    """One bound NFQUEUE driving a handler (``Gateway.packet``) from an event loop."""

    num: int
    handler: Handler
    emit: FrameSink | None = None  # the emitted stream goes here, after the verdicts are sent
    after_batch: Callable[[], None] | None = None
    fail: FailMode = FailMode.OPEN
    max_len: int = 4096
    sock_rcvbuf: int = 8 * 1024 * 1024
    batch: int = 256  # messages read per wake-up before yielding to the loop
    flush_every: int = 16  # verdicts gathered before a send (fewer syscalls, bounded extra wait)
    gso: bool = True  # queue GSO packets whole (NFQA_CFG_F_GSO)
    mark_mask: int = 0  # REPEAT verdicts set these bits of the packet mark to Decision.mark, keep the rest
    # a worker's queue: these bits of the packet mark (worker bits the control set on an INVALID packet
    # it repeated here) are cleared in the verdict, so they do not leave mproxy's chain
    clear_mask: int = 0
    clock: Callable[[], float] = time.time
    stats: QueueStats = field(default_factory=QueueStats)
    latency: Latency = field(default_factory=Latency)  # packet read -> its verdict sent
    wait_latency: Latency = field(default_factory=Latency)  # socket readable -> verdict sent
    fail_open_confirmed: bool | None = None
    histogram: Any = None  # optional mproxy.io.metrics.LatencyHistogram (packet read -> verdict sent)
    sock: Any = None  # the bound netlink socket (tests pass a socketpair end)
    _nfq: Any = None
    _buf: bytearray = field(default_factory=lambda: bytearray(_RECV_BUFFER))
    _out: bytearray = field(default_factory=bytearray)
    _t0: list[int] = field(default_factory=list)
    _frames: Frames = field(default_factory=list)
    _wake: int = 0
    _logged: set[str] = field(default_factory=set)
    _fd: int = -1
    _next_id: int = 0  # id the kernel gives the next packet it queues (0: none read yet)

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Bind the queue with netfilterqueue, then configure it ourselves (copy range, GSO, fail-open, buffer)."""
        import warnings

        from netfilterqueue import NetfilterQueue

        try:
            nfq = NetfilterQueue()
        except OSError as e:
            raise QueueError(f"cannot open nfnetlink: {e} (needs root or CAP_NET_ADMIN)") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rcvbuf is forced below
            try:
                nfq.bind(self.num, self._unexpected_callback, max_len=self.max_len,
                         sock_len=self.sock_rcvbuf // 2)
            except OSError as e:
                raise QueueError(f"cannot bind NFQUEUE {self.num}: {e} (another process bound to it? "
                                 "root or CAP_NET_ADMIN?)") from None
        self._nfq = nfq
        self._next_id = 1  # our bind created the queue (a bound one is refused): it numbers from 1
        self._fd = nfq.get_fd()
        sock = socket.fromfd(self._fd, socket.AF_NETLINK, socket.SOCK_RAW)  # a dup: same socket, same port id
        try:  # SO_RCVBUFFORCE ignores net.core.rmem_max (we hold CAP_NET_ADMIN)
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.sock_rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.sock_rcvbuf)
        try:  # an overflow must not set an error on the socket: see _SOL_NETLINK
            sock.setsockopt(_SOL_NETLINK, _NETLINK_NO_ENOBUFS, 1)
        except OSError as e:
            log.warning("cannot set NETLINK_NO_ENOBUFS on the queue's socket (%s): an overflow may stop the "
                        "reading until mproxy notices", e)
        self.sock = sock
        try:
            self.fail_open_confirmed = configure_queue(sock, self.num, fail_open=self.fail == FailMode.OPEN,
                                                       gso=self.gso)
        except (QueueError, OSError) as e:
            self.close()
            raise QueueError(str(e)) from None

    def _unexpected_callback(self, pkt: Any) -> None:  # netfilterqueue's run() is never called
        pkt.accept()

    @property
    def fd(self) -> int:
        return self._fd

    def attach(self, loop: Any) -> None:
        loop.add_reader(self._fd, self._on_readable)

    def detach(self, loop: Any) -> None:
        if self._fd >= 0:
            loop.remove_reader(self._fd)

    def drain(self) -> None:
        """Give a verdict to everything already in the socket (at stop, before unbinding)."""
        if self.sock is None:
            return
        for _ in range(1000):
            before = self.stats.packets
            self._on_readable()
            if self.stats.packets == before:
                return

    def close(self) -> None:
        """Unbind: the kernel drops what is still queued without a verdict (TCP retransmits it)."""
        if self._nfq is not None:
            try:
                self._nfq.unbind()
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.debug("unbind failed", exc_info=True)
            self._nfq = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._fd = -1

    # ------------------------------------------------------------------ hot path
    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        st = self.stats
        st.wakeups += 1
        self._wake = time.perf_counter_ns()
        buf = self._buf
        mv = memoryview(buf)
        try:
            for _ in range(self.batch):
                try:
                    n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno == errno.ENOBUFS:  # (without NETLINK_NO_ENOBUFS) the gap in the ids counts it
                        continue
                    self._once("recv", logging.ERROR, f"reading the queue failed: {e}")
                    break
                self._messages(mv, n)
            else:
                st.full_batches += 1
        finally:
            mv.release()
            self._flush()
        if self.after_batch is not None:
            try:
                self.after_batch()
            except Exception:  # noqa: BLE001
                self._once("after_batch", logging.ERROR, "writing records failed", exc=True)

    def _messages(self, mv: memoryview, n: int) -> None:
        off = 0
        while off + 16 <= n:
            ln, mtype = _NLMSG_HEAD.unpack_from(mv, off)
            if ln < 16 or off + ln > n:
                self.stats.malformed += 1
                self._once("malformed", logging.ERROR, f"unreadable netlink message ({ln} bytes at {off} of {n})")
                return
            if mtype == _PACKET_TYPE:
                self._packet(mv, off + 20, off + ln)
            elif mtype == NLMSG_ERROR and ln >= 20:
                err = -_NLMSG_ERRNO.unpack_from(mv, off + _NLMSG.size)[0]
                if err:  # a verdict (or configuration) the kernel refused
                    self.stats.verdict_errors += 1
                    self._once("nlerr", logging.ERROR, f"the kernel refused a queue message: {os.strerror(err)}")
            off += (ln + 3) & ~3

    def _packet(self, mv: memoryview, p: int, end: int) -> None:
        t0 = time.perf_counter_ns()
        st = self.stats
        pid, start, stop, info, cap, indev, mark = parse_packet(mv, p, end)
        if pid < 0:
            st.malformed += 1
            self._once("noid", logging.ERROR, "a queued packet's message has no packet id: no verdict possible")
            return
        st.packets += 1
        if pid != self._next_id and self._next_id:  # ids are given in order, under the lock that sends them
            st.undelivered += (pid - self._next_id) & 0xFFFFFFFF
            st.overflows += 1
        self._next_id = (pid + 1) & 0xFFFFFFFF  # 0 after a wrap: that one is not checked
        decision: Decision | None = None
        data = b""
        try:
            data = mv[start:stop].tobytes() if start >= 0 else b""  # the core may keep it: copy
            st.queued_bytes += len(data)
            if info & NFQA_SKB_GSO:
                st.gso += 1
            claimed = _claimed_length(data)
            if claimed > len(data) or cap > len(data) or not data:
                st.truncated += 1
                self._truncated(indev, len(data), max(claimed, cap))
            else:
                decision = self.handler(data, self.clock(), not info & NFQA_SKB_CSUMNOTREADY, indev)
        except Exception:  # noqa: BLE001 - the verdict below must happen whatever the core did
            st.core_errors += 1
            self._once("core", logging.WARNING,
                       f"the core raised on a packet; it was {self._fail_word()} and further errors are "
                       "only counted (traceback at debug level)", exc=True)
            decision = None
        payload = newmark = None
        if decision is None:
            if self.fail == FailMode.OPEN:
                verdict = NF_ACCEPT
                st.accepted += 1
            else:
                verdict = NF_DROP
                st.dropped += 1
        else:
            v = decision.verdict
            if v is Verdict.ACCEPT:
                verdict = NF_ACCEPT
                st.accepted += 1
            elif v is Verdict.DROP:
                verdict = NF_DROP
                st.dropped += 1
            elif v is Verdict.REPEAT:
                verdict = NF_REPEAT
                newmark = (mark & ~self.mark_mask) | (decision.mark & self.mark_mask)
                st.repeated += 1
            else:
                verdict, payload = self._rewritten(decision.payload or b"", info, len(data))
            if decision.frames and self.emit is not None:
                self._frames += decision.frames
        if mark & self.clear_mask and newmark is None:
            newmark = mark & ~self.clear_mask
        self._out += verdict_message(self.num, pid, verdict, payload, newmark)
        self._t0.append(t0)
        if len(self._t0) >= self.flush_every or len(self._out) >= _FLUSH_BYTES:
            self._flush()

    def _rewritten(self, new: bytes, info: int, was: int) -> tuple[int, bytes | None]:
        """Verdict for a rewritten packet: its TCP checksum completed when the kernel had left it partial.

        A GSO packet may have header fields rewritten in place (a raised TTL, a clamped window): the
        kernel takes it back without its checksum state and segments it as one that has none,
        setting up each segment's checksums itself (inet_gso_segment, tcp_gso_segment; lab: clamped
        and TTL-raised GSO packets, IPv4 and IPv6, delivered intact). One whose length changed would
        be segmented wrong: a core bug."""
        st = self.stats
        if info & NFQA_SKB_GSO:
            if len(new) == was:
                st.modified += 1
                return NF_ACCEPT, new
            st.core_errors += 1
            self._once("gso_rewrite", logging.ERROR, "the core changed the length of a GSO packet; it was "
                       + self._fail_word())
            if self.fail == FailMode.OPEN:
                st.accepted += 1
                return NF_ACCEPT, None
            st.dropped += 1
            return NF_DROP, None
        if info & NFQA_SKB_CSUMNOTREADY:
            buf = bytearray(new)
            if fill_tcp_checksum(buf):
                new = bytes(buf)
        st.modified += 1
        return NF_ACCEPT, new

    def _flush(self) -> None:
        """Send the gathered verdicts in one ``send``, then hand their frames to the sink.

        The sink is called after every send, with no frames too: a remote
        emitter (:mod:`mproxy.io.emitworker`) ships the ops gathered since.
        """
        t0s = self._t0
        if not t0s and not self._frames:
            return
        if t0s:
            st = self.stats
            try:
                self.sock.send(self._out)
                st.verdict_sends += 1
            except Exception:  # noqa: BLE001 - counted; the kernel keeps them until unbind (fail mode then)
                st.verdict_errors += len(t0s)
                self._once("verdict", logging.ERROR, "sending verdicts failed", exc=True)
            t1 = time.perf_counter_ns()
            lat, wait, h, wake = self.latency, self.wait_latency, self.histogram, self._wake
            for t0 in t0s:
                lat.add(t1 - t0)
                wait.add(t1 - wake)
                if h is not None:  # bisect: the same bucket as LatencyHistogram.observe, at C speed
                    sec = (t1 - t0) * 1e-9
                    h.counts[bisect_left(h.bounds, sec)] += 1
                    h.total += sec
                    h.n += 1
            self._out = bytearray()
            self._t0 = []
        if self.emit is not None:
            frames, self._frames = self._frames, []
            try:
                self.emit(frames)
            except Exception:  # noqa: BLE001
                self.stats.sink_errors += 1
                self._once("sink", logging.ERROR, "writing to the sink failed", exc=True)

    def watch_again(self, loop: Any) -> int:
        """Register the socket with the loop again and read what waits; returns the packets read."""
        before = self.stats.packets
        self.detach(loop)
        self.attach(loop)
        self._on_readable()
        return self.stats.packets - before

    # ------------------------------------------------------------------ reporting
    def _fail_word(self) -> str:
        return "accepted (fail open)" if self.fail == FailMode.OPEN else "dropped (fail closed)"

    def _truncated(self, indev: int, got: int, claimed: int) -> None:
        self._once("truncated", logging.WARNING,
                   f"queued packet copied only partly ({got} of {claimed} bytes; a queued packet holds at most "
                   f"{COPY_RANGE}); it arrived on {_ifname(indev)}. Keep GSO/GRO packets at most 64 KB on "
                   f"interfaces carrying MPTCP (no BIG TCP: gso_max_size/gro_max_size 65536); the packet was "
                   f"{self._fail_word()} unparsed, further ones are only counted")

    def _once(self, key: str, level: int, msg: str, exc: bool = False) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        log.log(level, msg)
        if exc:
            log.debug("%s", traceback.format_exc())
