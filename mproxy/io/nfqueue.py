"""NFQUEUE adapter: queued packets in, verdicts out, on an asyncio (uvloop) reader.

The kernel hands each queued packet to netfilterqueue's netlink socket; the
event loop watches that socket's file descriptor and, when it is readable,
lets netfilterqueue dispatch what is waiting to :meth:`QueueAdapter._on_packet`,
which runs the sans-I/O core and issues the verdict before returning. There
is no thread and no blocking loop.

Two deliberate deviations from ``loop.add_reader(fd, lambda: nfq.run(block=False))``:

* batches are bounded: ``nfq.run()`` only returns once the socket is empty,
  which under sustained load can be never, starving signal handlers (SIGTERM)
  and timers. :meth:`NetfilterQueue.run_socket` reads through any object with
  ``recv``; ours raises ``EAGAIN`` after :attr:`QueueAdapter.batch` packets,
  and the (level-triggered) reader fires again on the next loop iteration;
* the queue's fail-open flag is set over netlink on netfilterqueue's own
  socket (:func:`set_fail_open`): netfilterqueue does not expose it, and the
  kernel only accepts a queue's configuration from the socket bound to it.

Every packet gets a verdict, whatever happens: a core exception or a packet
the kernel copied only partly is accepted (fail open) or dropped (fail closed),
counted, and logged once.

Workers (``[queue] workers`` > 1) are refused for now. ``--queue-balance``
spreads packets over queues by a hash of the address pair, but the subflows
of one MPTCP connection use different addresses (that is the point of
MPTCP), so they would land on different workers whose trackers each see a
fragment. A correct design steers by *connection*, which only the MPTCP
layer knows: (1) one control queue receives every SYN carrying option 30;
its owner learns each connection's tokens (from the SYN/ACK key) and assigns
a worker W on MP_CAPABLE, looks W up by token on MP_JOIN, and returns the SYN
with verdict ``NF_REPEAT`` and packet mark W; (2) the rules then save the
packet mark into worker bits of the connmark (``CONNMARK --save-mark`` with
a mask) and queue every later packet of the connection with ``-m connmark
--mark W/WMASK -j NFQUEUE --queue-num BASE+W``, one rule per worker. Each
worker owns its queue (verdicts must come from the bound socket) and its
own Gateway; the control process keeps only the token -> worker table.
"""

from __future__ import annotations

import errno
import logging
from bisect import bisect_left
import os
import socket
import struct
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from ..core.gateway import Decision, Verdict
from ..core.pipeline import Frames

__all__ = [
    "FailMode", "QueueStats", "Latency", "QueueAdapter", "QueueError", "set_fail_open", "fail_open_message",
    "kernel_queue_state", "oversize_interfaces", "COPY_LIMIT", "SAFE_MTU",
]

log = logging.getLogger("mproxy.nfqueue")

# netfilterqueue copies at most 4096 - 80 bytes of a packet and receives into a
# 4096-byte buffer: a netlink message larger than that is cut and the packet in
# it never gets a verdict. ~200 bytes of attributes (timestamp, devices, MAC,
# mark, cap length, VLAN) leave room for packets up to SAFE_MTU bytes.
COPY_LIMIT = 4096 - 80
SAFE_MTU = 3800

# nfnetlink_queue configuration (linux/netfilter/nfnetlink_queue.h)
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("!BBH")
_NLATTR_BE32 = struct.Struct("=HH")
_CONFIG_SEQ = 0x6D707278  # "mprx": tells our ACK from libnfnetlink's
_SO_RCVBUFFORCE = 33  # not exported by Python's socket module


class FailMode(str, Enum):
    OPEN = "open"  # accept when mproxy cannot decide
    CLOSED = "closed"  # drop when mproxy cannot decide


class QueueError(RuntimeError):
    """The queue could not be bound or configured (message says why and what to check)."""


class _Packet(Protocol):  # the part of netfilterqueue.Packet we use (tests pass fakes)
    indev: int

    def get_payload(self) -> bytes: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...
    def set_payload(self, payload: bytes) -> None: ...


@dataclass(slots=True)
class QueueStats:
    packets: int = 0
    accepted: int = 0
    dropped: int = 0
    modified: int = 0  # accepted with a rewritten payload
    core_errors: int = 0  # the core raised: verdict by fail mode
    truncated: int = 0  # the kernel copied less than the IP packet: verdict by fail mode
    verdict_errors: int = 0  # issuing the verdict itself failed
    sink_errors: int = 0
    enobufs: int = 0  # the socket overflowed (kernel accepted/dropped those by fail mode)
    wakeups: int = 0
    full_batches: int = 0  # batches cut at the budget (sustained load)

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


def _mtu(name: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{name}/mtu").read_text())
    except (OSError, ValueError):
        return None


def oversize_interfaces(names: list[str] | None = None) -> list[tuple[str, int]]:
    """Interfaces (given, or all but loopback) whose MTU is above :data:`SAFE_MTU`."""
    if not names:
        try:
            names = sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name != "lo")
        except OSError:
            return []
    out = []
    for n in names:
        mtu = _mtu(n)
        if mtu is not None and mtu > SAFE_MTU:
            out.append((n, mtu))
    return out


def fail_open_message(queue_num: int, fail_open: bool, *, ack: bool = True, seq: int = _CONFIG_SEQ) -> bytes:
    """NFQNL_MSG_CONFIG setting (or clearing) NFQA_CFG_F_FAIL_OPEN on ``queue_num``.

    Attributes are big-endian u32 (the kernel reads them with ``ntohl``);
    ``res_id`` in the nfgenmsg header is the queue number in network order.
    """
    flags = NFQA_CFG_F_FAIL_OPEN if fail_open else 0
    attrs = (_NLATTR_BE32.pack(8, NFQA_CFG_MASK) + struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)
             + _NLATTR_BE32.pack(8, NFQA_CFG_FLAGS) + struct.pack("!I", flags))
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue_num) + attrs
    msg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
    return _NLMSG.pack(_NLMSG.size + len(body), msg_type, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq, 0) + body


def set_fail_open(fd: int, queue_num: int, fail_open: bool, timeout: float = 1.0) -> bool | None:
    """Set the queue's fail-open flag through the bound socket ``fd``; True when the kernel confirmed.

    Must run right after binding, before anything is queued: the kernel's ACK
    is read here. Returns None when a queued packet arrived first (its
    message is left for netfilterqueue; the ACK then reaches libnfnetlink,
    which ignores it) so the outcome is unconfirmed. Raises QueueError when
    the kernel refused the setting.
    """
    import select

    sock = socket.fromfd(fd, socket.AF_NETLINK, socket.SOCK_RAW)  # a dup: same socket, same port id
    try:
        sock.send(fail_open_message(queue_num, fail_open))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                return None
            head = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            if len(head) < _NLMSG.size:
                return None
            _ln, mtype, _fl, seq, _pid = _NLMSG.unpack_from(head)
            if mtype != NLMSG_ERROR or seq != _CONFIG_SEQ:
                return None
            sock.recv(65536, socket.MSG_DONTWAIT)  # consume our ACK
            err = -struct.unpack_from("=i", head, _NLMSG.size)[0] if len(head) >= _NLMSG.size + 4 else 0
            if err:
                raise QueueError(f"kernel refused the fail-open setting of queue {queue_num}: "
                                 f"{os.strerror(err)}")
            return True
    finally:
        sock.close()


def kernel_queue_state(queue_num: int) -> dict[str, int] | None:
    """The kernel's counters for the queue (``/proc/net/netfilter/nfnetlink_queue``), or None.

    ``waiting``: packets handed to us without a verdict yet; ``dropped``: dropped because the
    queue was full (fail closed); ``user_dropped``: could not be sent to the socket.
    """
    try:
        text = Path("/proc/net/netfilter/nfnetlink_queue").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == str(queue_num):
            return {"portid": int(f[1]), "waiting": int(f[2]), "dropped": int(f[5]),
                    "user_dropped": int(f[6]), "id_sequence": int(f[7])}
    return None


class _BudgetSocket:
    """``recv`` for :meth:`NetfilterQueue.run_socket` that ends a batch after ``budget`` messages."""

    __slots__ = ("sock", "budget", "left", "stats")

    def __init__(self, sock: socket.socket, budget: int, stats: QueueStats) -> None:
        self.sock = sock
        self.budget = budget
        self.left = budget
        self.stats = stats

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            self.stats.full_batches += 1
            raise BlockingIOError(errno.EAGAIN, "batch budget used")
        self.left -= 1
        try:
            return self.sock.recv(size, socket.MSG_DONTWAIT)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                self.stats.enobufs += 1
            raise


Handler = Callable[[bytes, float], Decision]
FrameSink = Callable[[Frames], None]


@dataclass(slots=True)
class QueueAdapter:
    """One bound NFQUEUE driving a handler (``Gateway.packet``) from an event loop."""

    num: int
    handler: Handler
    emit: FrameSink | None = None  # the emitted stream goes here, after the verdict
    after_batch: Callable[[], None] | None = None
    fail: FailMode = FailMode.OPEN
    max_len: int = 4096
    sock_rcvbuf: int = 8 * 1024 * 1024
    batch: int = 256
    clock: Callable[[], float] = time.time
    stats: QueueStats = field(default_factory=QueueStats)
    latency: Latency = field(default_factory=Latency)  # callback entry -> verdict issued
    wait_latency: Latency = field(default_factory=Latency)  # socket readable -> verdict issued
    fail_open_confirmed: bool | None = None
    histogram: Any = None  # optional mproxy.io.metrics.LatencyHistogram (callback entry -> verdict)
    _nfq: Any = None
    _sock: socket.socket | None = None
    _reader: _BudgetSocket | None = None
    _wake: int = 0
    _logged: set[str] = field(default_factory=set)
    _fd: int = -1

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Bind the queue and configure it (copy mode, length, buffer, fail-open flag)."""
        import warnings

        from netfilterqueue import NetfilterQueue

        try:
            nfq = NetfilterQueue()
        except OSError as e:
            raise QueueError(f"cannot open nfnetlink: {e} (needs root or CAP_NET_ADMIN)") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rcvbuf is forced below
            try:
                nfq.bind(self.num, self._on_packet, max_len=self.max_len, sock_len=self.sock_rcvbuf // 2)
            except OSError as e:
                raise QueueError(f"cannot bind NFQUEUE {self.num}: {e} (another process bound to it? "
                                 "root or CAP_NET_ADMIN?)") from None
        self._nfq = nfq
        self._fd = nfq.get_fd()
        self._sock = socket.fromfd(self._fd, socket.AF_NETLINK, socket.SOCK_RAW)
        try:  # SO_RCVBUFFORCE ignores net.core.rmem_max (we hold CAP_NET_ADMIN)
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.sock_rcvbuf)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.sock_rcvbuf)
        self._reader = _BudgetSocket(self._sock, self.batch, self.stats)
        try:
            self.fail_open_confirmed = set_fail_open(self._fd, self.num, self.fail == FailMode.OPEN)
        except QueueError:
            self.close()
            raise

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
        if self._reader is None:
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
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._reader = None
        self._fd = -1

    # ------------------------------------------------------------------ hot path
    def _on_readable(self) -> None:
        reader = self._reader
        if reader is None:
            return
        self.stats.wakeups += 1
        self._wake = time.perf_counter_ns()
        reader.left = reader.budget
        try:
            self._nfq.run_socket(reader)
        except OSError as e:  # recv failed for another reason than EAGAIN/ENOBUFS
            self._once("recv", logging.ERROR, f"reading the queue failed: {e}")
        if self.after_batch is not None:
            try:
                self.after_batch()
            except Exception:  # noqa: BLE001
                self._once("after_batch", logging.ERROR, "writing records failed", exc=True)

    def _on_packet(self, pkt: _Packet) -> None:
        t0 = time.perf_counter_ns()
        st = self.stats
        st.packets += 1
        decision: Decision | None = None
        try:
            data = pkt.get_payload()
            claimed = _claimed_length(data)
            if claimed > len(data):
                st.truncated += 1
                self._truncated(pkt, len(data), claimed)
            else:
                decision = self.handler(data, self.clock())
        except Exception:  # noqa: BLE001 - the verdict below must happen whatever the core did
            st.core_errors += 1
            self._once("core", logging.WARNING,
                       f"the core raised on a packet; it was {self._fail_word()} and further errors are "
                       "only counted (traceback at debug level)", exc=True)
            decision = None
        try:
            if decision is None:
                if self.fail == FailMode.OPEN:
                    pkt.accept()
                    st.accepted += 1
                else:
                    pkt.drop()
                    st.dropped += 1
            else:
                v = decision.verdict
                if v is Verdict.ACCEPT:
                    pkt.accept()
                    st.accepted += 1
                elif v is Verdict.DROP:
                    pkt.drop()
                    st.dropped += 1
                else:
                    pkt.set_payload(decision.payload)
                    pkt.accept()
                    st.modified += 1
        except Exception:  # noqa: BLE001
            st.verdict_errors += 1
            self._once("verdict", logging.ERROR, "issuing a verdict failed", exc=True)
        t1 = time.perf_counter_ns()
        self.latency.add(t1 - t0)
        self.wait_latency.add(t1 - self._wake)
        h = self.histogram
        if h is not None:  # bisect: the same bucket as LatencyHistogram.observe, at C speed
            sec = (t1 - t0) * 1e-9
            h.counts[bisect_left(h.bounds, sec)] += 1
            h.total += sec
            h.n += 1
        if decision is not None and decision.frames and self.emit is not None:
            try:
                self.emit(decision.frames)
            except Exception:  # noqa: BLE001
                st.sink_errors += 1
                self._once("sink", logging.ERROR, "writing to the sink failed", exc=True)

    # ------------------------------------------------------------------ reporting
    def _fail_word(self) -> str:
        return "accepted (fail open)" if self.fail == FailMode.OPEN else "dropped (fail closed)"

    def _truncated(self, pkt: _Packet, got: int, claimed: int) -> None:
        if "truncated" in self._logged:
            return
        name = _ifname(getattr(pkt, "indev", 0))
        mtu = _mtu(name)
        self._once("truncated", logging.WARNING,
                   f"queued packet copied only partly ({got} of {claimed} bytes; netfilterqueue copies at most "
                   f"{COPY_LIMIT}); it arrived on {name}{f' (MTU {mtu})' if mtu else ''}. Lower the MTU of "
                   f"interfaces carrying MPTCP to at most {SAFE_MTU} bytes and disable LRO; the packet was "
                   f"{self._fail_word()} unparsed, further ones are only counted")

    def _once(self, key: str, level: int, msg: str, exc: bool = False) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        log.log(level, msg)
        if exc:
            log.debug("%s", traceback.format_exc())
