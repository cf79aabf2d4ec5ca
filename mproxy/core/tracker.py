"""Subflow tracker: TCP subflows grouped into MPTCP connections, data mapped to DSNs.

Sans-I/O: ``Tracker.process(segment)`` takes one parsed TCP segment (its
``ts`` is the clock) and returns the events it caused. The same object runs
under ``mproxy replay`` and the live gateway.

Grouping: MP_JOIN tokens (disambiguated by the address the join goes to),
then ADD_ADDR-announced addresses, then — for subflows first seen mid-stream —
data-sequence proximity (64-bit DSNs start at random points, so a subflow whose
mappings land next to a connection's stream position belongs to it).

Mapping: each subflow direction keeps its recent DSS mappings (relative
subflow sequence -> DSN); payload bytes are mapped piecewise, bytes with no
mapping yet wait in a capped buffer, and everything meets in the
connection's :class:`~mproxy.core.reassembler.DataStream` per direction.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from struct import Struct
from typing import Any, TypeVar

from .. import crypto
from ..wire import mptcp as m
from ..wire.checksum import CSUM_UNFILLED, segment_checksum_state
from ..wire.errors import WireError
from ..wire.packet import ACK, FIN, RST, SYN, TcpSegment, addr_text, mptcp_spans, parse_ip, read_mptcp_spans, \
    read_option_spans, tcp_md5_signed
from .events import (
    ConnectionClosed,
    ConnectionOpened,
    DataFinished,
    DataReleased,
    Direction,
    Event,
    GapSkipped,
    Notice,
    NoticeType,
    Outcome,
    PassThrough,
    Role,
    SubflowJoined,
    SubflowRefused,
)
from .reassembler import MASK32, MASK64, PIECE_COST, SLACK, DataStream, MemBudget, expand32, max_pieces

_NO_EVENTS: list[Event] = []
_DIRS = (Direction.C2S, Direction.S2C)
# a subflow first seen mid-stream belongs to a connection when its DSN lies within 64 MiB of the
# sender's stream and its DATA_ACK that near the other; a 32-bit value within 8 MiB (one in 256
# unrelated ones falls that near, where 64 MiB took one in 32: lab, two connections of one host pair)
_PICKUP_DSN_WINDOW = 1 << 26
_PICKUP_DSN_WINDOW32 = 1 << 23
_MAX_MAPPINGS = 32
# a DATA_ACK further past the furthest byte seen from its sender than the largest TCP window plus
# what this rate could have carried since the connection began acknowledges data never sent
_MAX_WINDOW = 1 << 30
_MAX_RATE = 1 << 36  # bytes/s (~550 Gbit/s)
_UNMAPPED_SHED_RANGES = 8  # runs of shed unmapped bytes remembered per subflow direction
_MAX_HELD = 8  # handshake packets held per connection: a SYN retransmission flood must not grow it
# segments kept past a right edge per subflow direction (each later segment there scans them): a
# sender's overshoot is a few dozen; a flood of tiny forged ones must not cost a long scan per packet
_MAX_LATE = 256
_MAX_OFO = 4096  # segments kept after a hole in one subflow direction (a window of MSS segments fits)
# what keeping one costs beyond its packet's bytes and PIECE_COST: ~420 bytes in all for a 1-byte
# segment, measured (test_one_byte_segments_cannot_hold_many_times_the_memcap holds memory to the charge)
_OFO_COST = 256
_KEYLESS_BASE = 1 << 32  # where a stream with no known DSN is counted from (see Tracker._fall_back)
_JOIN_FLOOD_KEYS = 4096  # receivers (address + token) whose MP_JOIN rate is watched at once
_TOKEN_SHARERS = 16  # live connections one token finds (more share one only if a client re-uses its key)
# Mid-stream subflows are matched to a connection by DSN proximity. When every value the DSS carries is
# 64-bit (Linux's), candidates come from an index of the streams' positions, in buckets as wide as the
# window (a match lies in its value's bucket or a neighbour's); a 32-bit value needs a walk over the live
# connections. Anyone can send such segments from new 4-tuples, so the walks and the index's candidates
# together look at no more than _SCAN_RATE connections per second of packet time (a burst of one walk
# over a full table): about a tenth of a core when spent. Past it, such a subflow starts a connection
# of its own.
_SCAN_RATE = 100_000
_DSN_BUCKET_BITS = _PICKUP_DSN_WINDOW.bit_length() - 1  # buckets as wide as the window
_DSN_BUCKETS = 1 << (64 - _DSN_BUCKET_BITS)
_TCPOPT_WSCALE = 3
_TCPOPT_TIMESTAMP = 8
_TCPOPT_SACK_PERM = 4
_TCPOPT_SACK = 5
_SACK_BLOCKS = 4  # SACK blocks a Linux receiver keeps (TCP_NUM_SACKS)
_LOW_TTL = "its TTL is below its subflow direction's first packet's: it may have expired before the receiver"
_NOT_FAST = SYN | FIN | RST
CHECKSUM_MODES = ("auto", "verify", "count")  # [tracker] checksums
_TS_MPTCP = Struct("!4sI4xBBBB")  # NOP NOP kind 8 len 10, TSval, TSecr, then an MPTCP option's first 4 bytes
_NOP_NOP_TS = b"\x01\x01\x08\x0a"
_DSS_PLAIN = m.DSS_PLAIN
_MD5_UNREAD = "a TCP-MD5 signature, and the receiver holds no key (Linux: TCPMD5Unexpected)"


@dataclass(slots=True)
class TrackerConfig:
    """Limits and timeouts; every buffer the tracker keeps is bounded by one of these."""

    max_connections: int = 100_000
    max_subflows: int = 400_000
    max_subflows_per_connection: int = 16
    idle_timeout: float = 300.0
    handshake_timeout: float = 30.0
    closed_linger: float = 30.0
    ooo_limit: int = 4 * 1024 * 1024  # out-of-order bytes per connection direction
    pending_limit: int = 256 * 1024  # unmapped bytes per subflow direction
    # all buffered bytes together (out-of-order, unmapped, checksummed mappings being assembled)
    memcap: int = 256 * 1024 * 1024
    history: int = 64 * 1024  # released bytes kept to compare late copies against
    # all histories together; over it, the least recently active connections' histories go first
    history_memcap: int = 256 * 1024 * 1024
    gap_grace: float = 0.0  # seconds a DATA_ACKed hole may stay open before it is a gap
    # seconds an established connection whose subflows have all ended (RST or FIN, no DATA_FIN)
    # stays open for a new subflow, as Linux keeps it (net.mptcp.close_timeout); 0: it ends at once
    close_timeout: float = 60.0
    window_check: bool = True
    # read each subflow's bytes in subflow order, as the receiver's TCP hands them to MPTCP: data
    # after a hole waits for it (see _Ofo). False: as they come (mproxy before 2026-12-07)
    subflow_order: bool = True
    # each subflow direction keeps the interface its first packet came in on (live: NFQUEUE's
    # in-device; replay --pin-interfaces: a Linux cooked v2 capture's interface index): a later
    # packet of that direction on another interface is refused (inline: dropped) as a spoofed copy
    # -- a host on one side can send packets with the other side's addresses through the gateway
    # (an ACK that makes mproxy read bytes the receiver never took). False where a route change can
    # move a subflow's packets to another interface mid-connection.
    pin_interfaces: bool = True
    # MP_JOIN flood: more than ``join_flood_threshold`` join SYNs to one receiver (address + token;
    # unknown tokens share one counter per address) within ``join_flood_window`` seconds raises
    # one ``join_flood`` notice per window. 0 disables. A connection joins at most a few subflows.
    join_flood_threshold: int = 32
    join_flood_window: float = 10.0
    # SYN flood: at the connection limit half-open handshakes are evicted. More than
    # ``syn_flood_threshold`` evictions within ``syn_flood_window`` seconds raise one ``syn_flood``
    # notice, and the window's further evicted handshakes get no record (counted only), so the
    # event log does not grow at the flood's rate. 0: every eviction is recorded, no notice.
    syn_flood_threshold: int = 32
    syn_flood_window: float = 10.0
    # TCP (and IPv4 header) checksums of tracked subflows' segments. The receiver drops a segment
    # whose checksum fails, so its bytes, flags and options must not count either (else a forged
    # copy with a bad checksum inserts bytes the IDS reads and the server never does). But captures
    # taken on a sending host or on veth carry unfilled checksums (offload: the field holds the
    # pseudo-header's sum, for the NIC to finish), often beside good ones:
    #   "auto"   live: every checksum the kernel has filled in (not NFQA_SKB_CSUMNOTREADY) is judged;
    #            captures: a checksum is bad when it is neither right nor an unfilled one, in packets
    #            of at most 1500 bytes (bigger ones are GRO/TSO artifacts, never on a wire)
    #   "verify" as auto, and in captures an unfilled checksum is bad too (captures from a wire tap)
    #   "count"  nothing is dropped; bad checksums are counted and noticed
    checksums: str = "auto"


@dataclass(slots=True)
class Mapping:
    ssn: int  # relative subflow sequence number of the first byte (32-bit)
    dsn: int  # 64-bit DSN of the first byte
    length: int  # data bytes (DATA_FIN excluded); ignored when infinite
    infinite: bool = False
    checksum: int | None = None
    dll: int = 0
    acc: bytearray | None = None
    filled: list[tuple[int, int]] | None = None
    done: bool = False


@dataclass(slots=True, eq=False)
class _Ofo:
    """A data segment that came after a hole in its subflow's sequence space, kept until the hole
    fills. The receiver's TCP hands bytes to MPTCP only in subflow order, and a copy that fills
    the hole first wins over one kept after it (Linux tcp_data_queue, tcp_ofo_queue): read at
    once, a segment sent ahead of a hole could put its bytes in the IDS stream at DSNs the
    server then reads from another copy. The packet is kept as bytes and parsed again when read
    (a parsed segment costs several times a small packet's size)."""
    seq: int
    end: int
    ip: bytes  # b"" for a bare FIN (its options were read when it came)
    dss: m.Dss | None
    cost: int
    # it carries the FIN (at ``end``): processed when the segment is read in order, and never when
    # a copy the receiver reads first reaches past it (tcp_ofo_queue drops the segment as old)
    fin: bool = False


@dataclass(slots=True, eq=False)
class _Late:
    """A data segment that started past the right edge its receiver last advertised (the gateway's
    view), kept as it came until the receiver's acknowledgement says whether it took it. Compared
    by identity: two copies of one packet are two entries."""

    seq: int
    end: int  # seq + payload (32-bit)
    seg: TcpSegment  # over its own copy of the packet
    opts: _Opts
    dsn: int | None  # stream position of its first byte, by its own mapping (None: none, or unknown)
    skip: int  # bytes of its head the receiver already had (one into a zero window: see _into_closed)
    after: int  # the furthest subflow byte the gateway had seen before it: bytes past it came later
    cost: int  # what it holds of the memcap
    why: str  # the out-of-window detail, for the notice if it is refused in the end


@dataclass(slots=True, eq=False)
class _Beyond:
    """Out-of-order data whose end lies past the connection-level window its receiver advertised
    (the gateway's view), kept until the receiver's DATA_ACK says whether it took it (see
    ``Tracker._hold_beyond``). Compared by identity."""

    cdir: Direction
    dsn: int  # stream position of its first byte
    data: bytes
    cost: int  # what it holds of the memcap
    over: int  # how far its end lay past the edge when it came (for the notice)


@dataclass(slots=True, eq=False)  # identity: compared in lists and sets, never by value
class SubflowDir:
    """One direction of a subflow, seen from its sender."""

    isn: int | None = None
    wscale: int | None = None
    sack_perm: bool = False  # this direction's SYN offered SACK (both must, for either end to use it)
    peer_ack: int | None = None  # receiver's last TCP ack of this direction
    peer_win: int = 0  # receiver's last window, scaled (bytes)
    max_win: int = 0  # receiver's largest window so far: what Linux calls its peer's max_window
    edge: int | None = None  # furthest right edge (ack + window) the receiver advertised: it never shrinks
    # (acknowledged point, right edge) of the receiver's SYN/ACK: the window until its first ACK
    # (data from that edge on is dropped then as later). Only until then: Linux's first window after
    # the handshake can be smaller than its SYN/ACK's (lab: 65160 in the SYN/ACK, 64512 after)
    syn_window: tuple[int, int] | None = None
    mappings: list[Mapping] = field(default_factory=list)
    pending: dict[int, bytes] = field(default_factory=dict)  # abs seq -> bytes with no mapping yet
    pending_bytes: int = 0
    # unmapped bytes a limit kept out, [abs seq, length], until a mapping says which DSNs they had
    shed: list[list[int]] | None = None
    fin: bool = False
    fin_seq: int | None = None  # the sequence number the first FIN took: bytes from there on are never read
    # the receiver's PAWS state (RFC 7323; Linux tcp_paws_check): the last TSval it kept, 0 while none
    ts_recent: int = 0
    last_map_ssn: int | None = None
    last_end: int | None = None  # abs seq after the last segment seen
    # the receiver's next expected byte as the gateway saw it: the end of what it took in order (a
    # bare segment there is read even past the right edge: tcp_sequence allows rcv_nxt + a 0 window)
    rcv_nxt: int | None = None
    oow_noticed: bool = False
    rst: bool = False  # this direction's sender reset the subflow (an RST the receiver took)
    iface: int = 0  # the interface this direction's packets come in on (see pin_interfaces); 0: unknown
    # the TTL (hop limit) of this direction's first packet as it reached the gateway (0: none yet):
    # it reached the receiver, so a lower one may not (see Tracker._low_ttl)
    ttl: int = 0
    ttl_noticed: bool = False
    iface_noticed: bool = False
    unsent_ack_noticed: bool = False  # a DATA_ACK of data never sent was noticed (Tracker._ack_unsent)
    # data segments that start past ``edge``, kept until the receiver's acknowledgement shows whether
    # it took them (see Tracker._keep_late); None when there are none (the fast path's one check)
    late: list[_Late] | None = None
    late_bytes: int = 0
    # data segments after a hole in the sequence space, in sequence order, until it fills (see _Ofo);
    # None when there are none (the fast path's one check)
    ofo: list[_Ofo] | None = None
    ofo_bytes: int = 0
    # (sequence number, stream position): a segment after the hole holds the stream's next byte,
    # the position it waited at; None when none does (the fast path's one check; see _must_take)
    waits: tuple[int, int] | None = None
    # (sequence number, times): inline, segments at the receiver's next byte that the gateway dropped
    # for a buffer limit (on_memcap = "drop"), and how often in a row (see Tracker._must_take)
    refused: tuple[int, int] | None = None
    # the receiver's SACK blocks, [start, end] (32-bit), most recently changed first, at most 4 (see
    # _note_sack); meaningful while ``ofo`` holds segments
    sacks: list[list[int]] | None = None
    # where mapped subflow bytes went: [start, end, dsn - ssn] (relative ssn, 32-bit), newest last
    placed: list[list[int]] = field(default_factory=list)
    placed_end: int | None = None  # relative ssn after the furthest mapped byte
    placed_off: int = 0  # dsn - ssn (32-bit) of the furthest placement
    remap_noticed: bool = False
    bytes: int = 0


@dataclass(slots=True, eq=False)  # identity: compared in lists and sets, never by value
class Subflow:
    id: int
    key: tuple[bytes, int, bytes, int]  # initiator addr/port, responder addr/port
    role: Role
    ts: float
    conn: "Connection | None" = None
    flipped: int = 0  # 1 when the initiator is the connection's server
    addr_id: int | None = None
    backup: bool = False
    dirs: tuple[SubflowDir, SubflowDir] = field(default_factory=lambda: (SubflowDir(), SubflowDir()))
    plain: bool = False  # not MPTCP: pass packets through
    refused: bool = False  # join failed verification: its bytes never count
    established: bool = False
    # attached mid-stream (no handshake seen) to a connection whose handshake was seen: nothing shows
    # the receiver accepted such a subflow until it acknowledges bytes on it (see Tracker._unverified)
    unverified: bool = False
    reset: bool = False
    closed_ts: float | None = None
    join_token: int | None = None
    nonce_i: int | None = None  # initiator nonce
    nonce_r: int | None = None
    hmac_r: bytes | None = None
    last_ts: float = 0.0
    # a SYN with another ISN on this established subflow, kept (IP packet, time) until the peer
    # answers it: Linux discards it with a challenge ACK, unless the 4-tuple was free after all
    # (the end went unseen), when a SYN/ACK acknowledging it starts a new subflow
    reuse_syn: tuple[bytes, float] | None = None

    def tuple_text(self) -> dict[str, Any]:
        return {"src": addr_text(self.key[0]), "sport": self.key[1], "dst": addr_text(self.key[2]),
                "dport": self.key[3]}


@dataclass(slots=True, eq=False)  # identity: compared in lists and sets, never by value
class Connection:
    id: int
    ts: float
    client: tuple[bytes, int]
    server: tuple[bytes, int]
    version: int | None = None
    client_key: int | None = None
    server_key: int | None = None
    csum: bool = False
    pickup: bool = False
    opened: bool = False  # ConnectionOpened emitted (the emitter exists)
    subflows: list[Subflow] = field(default_factory=list)
    streams: tuple[DataStream, DataStream] = field(default_factory=lambda: (DataStream(), DataStream()))
    announced: tuple[dict[int, tuple[bytes, int | None]], dict[int, tuple[bytes, int | None]]] = field(
        default_factory=lambda: ({}, {}))
    held: list[PassThrough] = field(default_factory=list)  # handshake packets until MPTCP is confirmed
    fin_emitted: list[bool] = field(default_factory=lambda: [False, False])
    gap_since: list[float | None] = field(default_factory=lambda: [None, None])
    # per direction: the end of the acknowledged tail hole last noticed (_check_gaps); a hole that
    # starts before it was noticed with it
    tail_noticed: list[int | None] = field(default_factory=lambda: [None, None])
    mapped: list[bool] = field(default_factory=lambda: [False, False])
    closed: Outcome | None = None
    last_ts: float = 0.0
    notices: Counter[str] = field(default_factory=Counter)
    add_addr_repeats: int = 0  # identical ADD_ADDR seen again (retransmission): counted, not a notice
    # TCP Fast Open: the payload of the client's MP_CAPABLE SYN (RFC 8684 B.3). The server hands it
    # to the application ahead of the data-level stream (it has no DSN), so it is the start of the
    # client->server stream once the SYN/ACK acknowledges it. ``syn_len`` bytes; ``syn_data`` holds
    # them unless the memcap refused them; ``syn_taken``: how many the server took (None: not known yet)
    syn_data: bytes = b""
    syn_len: int = 0
    syn_taken: int | None = None
    # fell back to TCP after the handshake (infinite mapping, data without DSS, or an MP_CAPABLE-less
    # handshake ACK): like Linux, every later byte is taken in subflow order and DSS mappings are ignored
    fallen: bool = False
    late: int = 0  # segments kept past a right edge: its subflows' (SubflowDir.late) and ``beyond``
    # payload bytes its subflows keep after holes (SubflowDir.ofo), by direction: under ooo_limit too
    ofo_bytes: list[int] = field(default_factory=lambda: [0, 0])
    beyond: list[_Beyond] | None = None  # data kept past the connection-level window (_hold_beyond)
    beyond_noticed: int = 0  # directions (1 << cdir) whose refused kept data has been noticed
    # when its last subflow ended (None: one is live); it ends close_timeout later unless another joins
    dormant: float | None = None
    retired: int = 0  # ended subflows that left ``subflows`` to make room for new ones (see Tracker._full)
    # the tracker's packet count at its last packet: the connection table is in this order (LRU), so the
    # connections touched since a moment are its tail (Tracker._dsn_refresh)
    touched: int = 0
    dsn_at: tuple[int, ...] = ()  # the DSN buckets it is indexed under (Tracker._dsn_index)

    @property
    def ipver(self) -> int:
        return 4 if len(self.client[0]) == 4 else 6

    def client_token(self) -> int | None:
        return None if self.client_key is None else crypto.key_token(self.client_key, self.version or 0)

    def server_token(self) -> int | None:
        return None if self.server_key is None else crypto.key_token(self.server_key, self.version or 0)

    def summary(self) -> dict[str, Any]:
        """The ``mptcp_connection`` record of the event log."""
        dirs = {}
        for d, st in zip(("c2s", "s2c"), self.streams):
            dirs[d] = {
                "bytes": st.released,
                "sha256": None if st.sha is None else st.sha.hexdigest(),
                "gaps": [{"dsn": g.dsn & MASK64, "length": g.length, "acked": g.acked, "shed": g.shed}
                         for g in st.gaps],
                "gap_count": st.gap_count,
                "gap_bytes": st.gap_bytes,
                "data_fin": st.finished,
                "acked_bytes": None if st.acked is None or st.start is None else max(0, min(
                    st.acked - st.start, st.released + st.gap_bytes)),
                "duplicate_bytes": st.duplicate_bytes,
                "memcap_drops": st.memcap_drops,
            }
        return {
            "event": "mptcp_connection",
            "ts": round(self.last_ts, 6),
            "conn_id": self.id,
            "version": self.version,
            "client": addr_text(self.client[0]), "client_port": self.client[1],
            "server": addr_text(self.server[0]), "server_port": self.server[1],
            "client_token": self.client_token(), "server_token": self.server_token(),
            # the keys themselves: writers drop every "*_key" field unless [log] log_keys = true
            "client_key": self.client_key, "server_key": self.server_key,
            "checksum": self.csum,
            "pickup": self.pickup,
            "start": round(self.ts, 6), "end": round(self.last_ts, 6),
            "subflows": [
                dict(sf.tuple_text(), id=sf.id, role=sf.role.value, addr_id=sf.addr_id, backup=sf.backup,
                     established=sf.established,
                     initiator="server" if sf.flipped else "client", reset=sf.reset,
                     bytes_c2s=(sf.dirs[1] if sf.flipped else sf.dirs[0]).bytes,
                     bytes_s2c=(sf.dirs[0] if sf.flipped else sf.dirs[1]).bytes)
                for sf in self.subflows
            ],
            "announced": {
                side: [{"addr_id": i, "address": addr_text(a), "port": p} for i, (a, p) in ann.items()]
                for side, ann in zip(("client", "server"), self.announced)
            },
            "subflows_retired": self.retired,
            "notices": dict(self.notices),
            "add_addr_repeats": self.add_addr_repeats,
            "outcome": self.closed.value if self.closed else None,
            **dirs,
        }


@dataclass(slots=True)
class TrackerStats:
    packets: int = 0
    mptcp_packets: int = 0
    plain_packets: int = 0
    decode_errors: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    subflows: int = 0
    joins: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    memcap: Counter[str] = field(default_factory=Counter)
    out_of_window: int = 0
    # segments that started past the right edge the gateway saw, kept, and taken when the receiver
    # acknowledged them (those it never did count in out_of_window)
    past_edge_taken: int = 0
    past_window_taken: int = 0  # kept data past the connection-level window that the receiver DATA_ACKed
    subflow_order_kept: int = 0  # data segments kept after a hole in their subflow until it filled
    past_window_placed: int = 0  # data past it placed at once: over the limits for kept data
    wrong_interface: int = 0  # packets refused: their subflow direction came in on another interface
    low_ttl: int = 0  # packets whose TTL was below their subflow direction's first packet's
    notices: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    options: list[int] = field(default_factory=lambda: [0] * 9)  # decoded options by subtype
    rebuilt_bytes: list[int] = field(default_factory=lambda: [0, 0])  # released, by direction
    gap_bytes: Counter[str] = field(default_factory=Counter)  # side_channel / capture
    add_addr_repeats: int = 0  # identical ADD_ADDR retransmissions (benign: no notice)
    # segments of tracked subflows whose TCP or IPv4 header checksum fails, by what became of them:
    # dropped (as the receiver drops them), taken (checksums = "count")
    bad_checksums: Counter[str] = field(default_factory=Counter)
    unfilled_checksums: int = 0  # a capture's offloaded checksums (the pseudo-header's sum): not judged


_K = TypeVar("_K")


def _unindex(index: dict[_K, dict[int, Any]], key: _K, conn_id: int) -> bool:
    """Take a connection out of one entry of an index by id, and the entry out of the index when it
    empties (entries of ended connections would otherwise pile up): True when it did."""
    at = index.get(key)
    if at is None or at.pop(conn_id, None) is None or at:
        return False
    del index[key]
    return True


def _mapped_dsn(st: DataStream, dss: m.Dss | None, isn: int | None, seq: int, n: int) -> int | None:
    """The stream position where a segment's own DSS mapping puts its first byte, None without one
    that covers it. (ISN unknown, seen mid-stream: a segment of its mapping's length starts it, as
    _sync_pickup takes it.)"""
    if dss is None or dss.dsn is None or not dss.dll:
        return None
    off = (seq - isn - (dss.ssn or 0)) & MASK32 if isn is not None else 0 if n == dss.dll else MASK32
    if off >= dss.dll:
        return None
    first = dss.dsn if dss.dsn64 or st.base is None else expand32(dss.dsn, st.base)
    return st.unwrap((first + off) & MASK64)


def _note_waits(sfd: SubflowDir, st: DataStream, seq: int, dsn: int, n: int) -> None:
    """A segment kept or shed after its subflow's hole holds the stream's next byte: remembered, so
    the bytes that fill the hole are taken past the buffer limits (see Tracker._must_take)."""
    base = st.base
    if base is not None and dsn <= base < dsn + n:
        w = sfd.waits
        if w is None or w[1] != base or 0 < (w[0] - seq) & MASK32 < 0x80000000:
            sfd.waits = (seq, base)  # (the earliest such copy: the hole before it is the one to fill)


def _known_mapping(sfd: SubflowDir, ssn: int, dsn: int, length: int) -> Mapping | None:
    """The subflow direction's mapping of exactly these values, if it keeps one (a repeat)."""
    for old in reversed(sfd.mappings):
        if old.ssn == ssn and old.dsn == dsn and old.length == length:
            return old
    return None


def _rcv_next(sfd: SubflowDir) -> int:
    """The receiver's next subflow byte as the gateway saw it; before any data, the one after the SYN."""
    rn = sfd.rcv_nxt
    return ((sfd.isn or 0) + 1) & MASK32 if rn is None else rn


def _advance_rcv(sfd: SubflowDir, seq: int, end: int) -> None:
    """The receiver's TCP took subflow bytes ``[seq, end)``: its next byte moves when they start at or
    before it and end after it (whether MPTCP then reads them or not)."""
    rn = sfd.rcv_nxt
    if rn is None or (rn - seq) & MASK32 < 0x80000000 and 0 < (end - rn) & MASK32 < 0x80000000:
        sfd.rcv_nxt = end


def _overlap(a: "_Late", b: "_Late") -> bool:
    """Do two kept segments share subflow bytes?"""
    return (a.seq - b.end) & MASK32 >= 0x80000000 and (b.seq - a.end) & MASK32 >= 0x80000000


def _receiver_next(sfd: SubflowDir, pa: int | None) -> int | None:
    """The receiver's next subflow byte: the gateway's view, or the point it acknowledged (``pa``)
    when that lies ahead (it acknowledged bytes the gateway did not see)."""
    nxt = sfd.rcv_nxt
    if pa is None:
        return nxt
    return pa if nxt is None or 0 < (pa - nxt) & MASK32 < 0x80000000 else nxt


def _old_head(nxt: int, seg: TcpSegment) -> int:
    """How many bytes at the segment's start lie before the receiver's next byte ``nxt`` (0 when
    it starts there or after it, or has nothing past it)."""
    old = (nxt - seg.seq) & MASK32
    return old if old < seg.payload_len else 0


def _into_closed(sfd: SubflowDir, seg: TcpSegment, st: DataStream | None = None, dss: m.Dss | None = None) -> bool:
    """Does this data bring bytes past the receiver's next one while its window is closed (the last
    window it advertised ends at or before that byte)? Linux drops it whole, wherever it starts:
    at that byte (tcp_data_queue: zero window), before it ("drop tail of packet"), or after it
    (tcp_sequence). The last advertisement counts here, not the furthest: an MPTCP subflow
    advertises the connection's window, relative to the DATA_ACK, so in the subflow's own sequence
    space its edge moves back as other subflows' bytes fill the buffer (lab: 6432 bytes at the
    join's handshake, 1312 later, then 0 at the byte the join reached).

    With its direction's stream ``st`` and the segment's DSS: not closed when the connection-level
    window (the furthest DATA_ACK plus window any subflow advertised, which Linux never shrinks)
    reaches past the DSN of its first new byte. The lab shows Linux taking data on a subflow whose
    last window was 0 once another subflow's ACK opened the connection's window."""
    pa = sfd.peer_ack
    if pa is None:
        if sfd.syn_window is None:
            return False
        pa, last = sfd.syn_window
    else:
        last = (pa + sfd.peer_win) & MASK32
    n = seg.payload_len
    if not n:
        return False
    nxt = _receiver_next(sfd, pa)
    assert nxt is not None  # (pa is not None)
    if (nxt - last) & MASK32 >= 0x80000000 or not 0 < (seg.seq + n - nxt) & MASK32 < 0x80000000:
        return False
    if st is None or st.wnd_end is None:
        return True
    dsn = _mapped_dsn(st, dss, sfd.isn, seg.seq, n)
    if dsn is None:
        return True
    return dsn + _old_head(nxt, seg) >= st.wnd_end


def _sack_extend(b: list[int], seq: int, end: int) -> bool:
    """Grow block ``b`` by ``[seq, end)`` when they overlap or touch (Linux tcp_sack_extend)."""
    if (b[1] - seq) & MASK32 >= 0x80000000 or (end - b[0]) & MASK32 >= 0x80000000:
        return False
    if 0 < (b[0] - seq) & MASK32 < 0x80000000:
        b[0] = seq
    if 0 < (end - b[1]) & MASK32 < 0x80000000:
        b[1] = end
    return True


def _note_sack(sfd: SubflowDir, rn: int, seq: int, end: int) -> None:
    """The receiver queued ``[seq, end)`` out of order (kept, a copy of kept bytes, or shed here):
    its SACK blocks change as Linux's do (tcp_sack_new_ofo_skb). The block it extends moves to
    the front and swallows those it now reaches; a new one goes in front, and a fifth pushes the
    last out. Why: Linux takes an RST at the highest end among these blocks only, so one at the
    end of a block pushed out was taken here while the server read on (tcp_validate_incoming)."""
    blocks = sfd.sacks if sfd.ofo else None  # (an empty out-of-order queue holds no blocks)
    if blocks:
        blocks[:] = [b for b in blocks if 0 < (b[0] - rn) & MASK32 < 0x80000000]  # tcp_sack_remove
    if not blocks:
        sfd.sacks = [[seq, end]]
        return
    for i, b in enumerate(blocks):
        if _sack_extend(b, seq, end):
            blocks.insert(0, blocks.pop(i))
            j = 1
            while j < len(blocks):  # tcp_sack_maybe_coalesce
                if _sack_extend(b, *blocks[j]):
                    del blocks[j]
                else:
                    j += 1
            return
    if len(blocks) >= _SACK_BLOCKS:
        blocks.pop()
    blocks.insert(0, [seq, end])


def _take_fin(sf: Subflow, d: int, at: int, ts: float) -> None:
    """The receiver's TCP took the FIN of direction ``d`` at subflow sequence number ``at``: bytes
    from there on are never read, and with both FINs the subflow has ended."""
    sfd = sf.dirs[d]
    sfd.fin = True
    if sfd.fin_seq is None:
        sfd.fin_seq = at
    if sf.dirs[d ^ 1].fin and sf.closed_ts is None:
        sf.closed_ts = ts


def _take_ack(sfd: SubflowDir, other: SubflowDir, seg: TcpSegment) -> None:
    """An ACK from ``sfd``'s sender: the acknowledged point, window, largest window and right edge
    that the receiver of ``other`` (the opposite direction) must respect."""
    other.peer_ack = seg.ack
    ws = sfd.wscale
    if ws is None or other.wscale is None:
        ws = 14 if sfd.isn is None else 0
    other.peer_win = win = seg.window << ws
    if win > other.max_win:
        other.max_win = win
    e = (seg.ack + win) & MASK32
    if other.edge is None or (e - other.edge) & MASK32 < 0x80000000:
        other.edge = e


def _option(seg: TcpSegment, kind: int, length: int) -> memoryview | None:
    """A TCP option of ``kind`` and exactly ``length`` bytes, None without one (before a damaged
    option, as a stack reads them)."""
    opts = seg.options
    spans, _ = read_option_spans(opts)
    for k, start, ln in spans:
        if k == kind and ln == length:
            return opts[start : start + ln]
    return None


def _wscale(seg: TcpSegment) -> int | None:
    opt = _option(seg, _TCPOPT_WSCALE, 3)
    return None if opt is None else min(opt[2], 14)


def _ttl(seg: TcpSegment) -> int:
    """The IPv4 TTL or IPv6 hop limit the packet reached the gateway with."""
    return seg.ip[8] if seg.ipver == 4 else seg.ip[7]


def _sack_perm(seg: TcpSegment) -> bool:
    """The SYN offers SACK (RFC 2018): Linux takes the option only at its exact length, on a SYN."""
    return _option(seg, _TCPOPT_SACK_PERM, 2) is not None


def _furthest_seen(sfd: SubflowDir) -> int:
    """The end of the furthest subflow bytes the gateway has seen in this direction: read, kept
    out of order or kept past the edge."""
    far = _rcv_next(sfd)
    ends = [e for _, e in sfd.sacks or ()] + [k.end for k in sfd.late or ()]
    if sfd.last_end is not None:
        ends.append(sfd.last_end)
    for e in ends:
        if 0 < (e - far) & MASK32 < 0x80000000:
            far = e
    return far


def _holds_ofo(seg: TcpSegment) -> bool:
    """Does this ACK carry a SACK block above its cumulative acknowledgement, i.e. does its sender
    hold data out of order? (A D-SACK block reports a duplicate below it.)"""
    opts = seg.options
    spans, _ = read_option_spans(opts)
    for k, start, ln in spans:
        if k == _TCPOPT_SACK:
            for i in range(start + 2, start + ln - 7, 8):
                if 0 < (int.from_bytes(opts[i : i + 4], "big") - seg.ack) & MASK32 < 0x80000000:
                    return True
    return False


def _tsval(seg: TcpSegment) -> int | None:
    """The TSval of the timestamp option (RFC 7323)."""
    opt = _option(seg, _TCPOPT_TIMESTAMP, 10)
    return None if opt is None else int.from_bytes(opt[2:6], "big")


class Tracker:
    """Groups subflows into MPTCP connections and rebuilds their byte streams."""

    fast_path = True  # tests turn it off to hold the general path against it
    # set by the gateway for [policy] low_ttl = "raise": a packet whose TTL (hop limit) is below its
    # subflow direction's first packet's leaves with that TTL, so it reaches the receiver as the
    # others do and is read as they are. False (replay, "pass"): it may expire on the way (a TTL
    # insertion), so it is read only once the receiver's acknowledgement shows it took it
    raise_ttl = False
    # set by the gateway for [policy] on_memcap = "drop": a packet whose own bytes a buffer limit shed
    # is dropped inline, so its receiver never gets it (see _on_segment)
    drop_shed = False
    # SHA-256 of each rebuilt stream for the mptcp_connection record. False (set before the first
    # packet): the record's "sha256" is None and whoever consumes DataReleased computes it over the
    # same bytes (the replay's emitter process does, off the tracking process's per-packet path)
    stream_hash = True

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        if self.config.checksums not in CHECKSUM_MODES:
            raise ValueError(f"checksums: {self.config.checksums!r} (one of {', '.join(CHECKSUM_MODES)})")
        self._csum_drop = self.config.checksums != "count"
        self._csum_unfilled = self.config.checksums == "verify"  # captures: an unfilled checksum is bad too
        self._csum_quick = not self._csum_unfilled
        self._pin = self.config.pin_interfaces
        self.last_ttl_floor = 0  # the TTL the last low-TTL packet's direction came with (see _low_ttl)
        self._ofo_fin = False  # a FIN kept after a hole was taken: the connection may have ended
        self.stats = TrackerStats()
        self._sf: dict[tuple[bytes, int, bytes, int], tuple[Subflow, int]] = {}
        self.connections: OrderedDict[int, Connection] = OrderedDict()  # LRU by activity
        # token -> the live connections whose key hashes to it, by id, oldest first (the first _TOKEN_SHARERS)
        self._tokens: dict[int, dict[int, Connection]] = {}
        # announced (address, port or None) -> the live connections announcing it, by id, in the order
        # they (last) announced it: an MP_JOIN whose token is unknown goes to the latest (_find_by_address)
        self._announcers: dict[tuple[bytes, int | None], dict[int, tuple[int, Connection]]] = {}
        self._announcements = 0  # announcements indexed so far: their order across the entries
        self._scan_burst = float(max(_SCAN_RATE, self.config.max_connections))  # see _SCAN_RATE
        self._scan_left = self._scan_burst
        self._scan_ts = 0.0
        # DSN bucket (a stream position >> _DSN_BUCKET_BITS) -> the live connections with a stream there,
        # as of their packet count _dsn_fresh (refreshed at each lookup from the connections touched since)
        self._dsn_index: dict[int, dict[int, Connection]] = {}
        self._dsn_fresh = 0
        self._next_conn = 1
        self.conn_id_step = 1  # workers of one gateway number connections w+1, w+1+N, ... (unique ids)
        self._next_sf = 1
        self._last_expire = 0.0
        self._last_sweep = 0.0
        # subflow entries of ended connections, kept closed_linger to absorb their late packets:
        # (closed at, subflow), in the order they ended; those of connections that never opened
        # (a SYN flood's evicted handshakes) apart, as the first to go when the table is full
        self._lingering: deque[tuple[float, Subflow]] = deque()
        self._lingering_unopened: deque[tuple[float, Subflow]] = deque()
        self._dormant: deque[tuple[float, Connection]] = deque()  # (when, connection), see _check_end
        # join-flood windows, oldest first: (receiver address, token or None) -> [start, joins, noticed]
        self._join_windows: OrderedDict[tuple[bytes, int | None], list[Any]] = OrderedDict()
        self._evictions = [0.0, 0]  # SYN flood window: [start, evictions of half-open handshakes]
        # O(1) victims when a limit bites (a flood must not cost a scan of the tables per packet):
        # connections still in their handshake (LRU first) and subflows attached to no connection
        self._half_open: OrderedDict[int, Connection] = OrderedDict()
        self._orphans: OrderedDict[int, Subflow] = OrderedDict()
        self.now = 0.0
        self.budget = MemBudget(self.config.memcap)
        self.history_budget = MemBudget(self.config.history_memcap)
        # bytes kept out of the buffers by a limit, ever: a gateway compares it around process() to
        # drop the packet that carried them, so the sender sends them again once there is room
        self.shed_bytes = 0
        # placing unmapped bytes held earlier: they were let through to the receiver when they
        # arrived, so no limit may refuse them now (the IDS would never see bytes the server has)
        self._placing_held = False
        # placing a segment the stream must take or stall (see _must_take): past ooo_limit and the
        # memcap by up to SLACK each
        self._placing_urgent = False
        # (token, indexed?) as tokens come and go, when someone reads them (the worker of a
        # multi-worker gateway announces them to the control queue); None: not recorded
        self.token_log: list[tuple[int, bool]] | None = None

    def number_connections(self, first: int, step: int) -> None:
        """Connection ids first, first+step, ...: the workers of one gateway never share an id."""
        self._next_conn, self.conn_id_step = first, step

    # ------------------------------------------------------------------
    @property
    def active_subflows(self) -> int:
        """MPTCP subflows still open (entries kept only to absorb late packets are not counted)."""
        return sum(1 for sf, d in self._sf.values()
                   if d == 0 and sf.closed_ts is None and not sf.plain and not sf.refused)

    def buffered_bytes(self) -> tuple[int, int, int, int]:
        """(out-of-order, unmapped, checksummed-mapping, past-edge) bytes held right now, over all
        connections (past-edge: whole packets kept until their receiver acknowledges them).

        Their sum, plus ``PIECE_COST`` per out-of-order chunk, unmapped piece and past-edge packet,
        is what ``budget.used`` tracks incrementally; this walk is the slow truth."""
        ooo = unmapped = assembling = past_edge = 0
        for conn in self.connections.values():
            ooo += conn.streams[0].ooo_bytes + conn.streams[1].ooo_bytes
            unmapped += len(conn.syn_data)  # a Fast Open SYN's bytes, until the server has answered
            for sf in conn.subflows:
                for sd in sf.dirs:
                    unmapped += sd.pending_bytes
                    for mp in sd.mappings:
                        if mp.acc is not None:
                            assembling += mp.length
                    for kept in sd.late or ():
                        past_edge += kept.cost - PIECE_COST
                    for h in sd.ofo or ():
                        past_edge += h.cost - PIECE_COST
            for held in conn.beyond or ():
                past_edge += held.cost - PIECE_COST
        return ooo, unmapped, assembling, past_edge

    def process(self, seg: TcpSegment, csum_ready: bool = False, iface: int = 0) -> list[Event]:
        """Feed one segment; returns the events it caused (often none).

        ``csum_ready``: the kernel says the checksums are the sender's (live, not
        NFQA_SKB_CSUMNOTREADY), so they are judged exactly; False for captures.
        ``iface``: the interface it came in on (0: unknown); see ``pin_interfaces``.
        """
        st = self.stats
        st.packets += 1
        ts = seg.ts
        if ts > self.now:
            self.now = ts
        ev: list[Event] = []
        if ts - self._last_expire > 1.0:
            self._last_expire = ts
            self._expire(ts, ev)
        if self.history_budget.used > self.history_budget.limit:
            self._shrink_histories()
        hit = self._sf.get((seg.src, seg.sport, seg.dst, seg.dport))
        low = 0
        if hit is not None:
            sd = hit[0].dirs[hit[1]]
            if iface and sd.iface != iface and self._pin and self._wrong_iface(hit, seg, iface, ev):
                return ev
            ttl = seg.ip[8] if seg.ipver == 4 else seg.ip[7]
            if ttl < sd.ttl:
                # it may expire before the receiver (see _low_ttl); the gateway may give it this TTL back
                low = self.last_ttl_floor = sd.ttl
                st.low_ttl += 1
            elif not sd.ttl:
                sd.ttl = ttl  # (a direction whose first packet the gateway did not see: a pickup)
            # checksums (see _bad_checksum), the common case inlined: a whole wire-sized segment whose
            # checksums are good or, in a capture, left unfilled by offload
            end = seg.payload_off + seg.payload_len
            if seg.payload_len == seg.wire_payload_len and (csum_ready or end <= 1500):
                quick = self._csum_quick and not csum_ready  # a capture's field that looks unfilled is taken unread
                state = segment_checksum_state(seg.ip, seg.tcp_off, end, seg.ipver, quick)
                if state:
                    if quick and state == CSUM_UNFILLED:
                        self.stats.unfilled_checksums += 1
                    elif not self._bad_checksum(hit[0], seg, ev):
                        return ev
            if self.fast_path and not low and self._fast(hit[0], hit[1], seg, ev):
                return ev
        opts = self._options(seg, hit, ev)
        if hit is None:
            self.process_new(seg, opts, ev)
            if iface and self._pin:
                new = self._sf.get((seg.src, seg.sport, seg.dst, seg.dport))
                if new is not None and not new[0].dirs[new[1]].iface:
                    new[0].dirs[new[1]].iface = iface
            return ev
        sf, d = hit
        if seg.flags & SYN:
            if not seg.flags & ACK and self._stale(sf, d, seg):
                if not self._ended(sf):
                    # Linux discards a SYN on an established socket (a challenge ACK answers it):
                    # the subflow goes on, and the SYN waits to see whether the peer took it
                    sf.reuse_syn = (bytes(seg.ip), ts)
                    self._unread(sf.conn, sf.dirs[d], seg, "a SYN on an established subflow (Linux answers it "
                                 "with a challenge ACK)", ev)
                    return ev
                # a new connection re-using the 4-tuple of one that ended
                self._drop_subflow(sf)
                return self.process_new(seg, opts, ev)
            if sf.reuse_syn is not None and seg.flags & ACK:
                old = parse_ip(memoryview(sf.reuse_syn[0]), sf.reuse_syn[1])
                if isinstance(old, TcpSegment) and seg.ack == (old.seq + 1) & MASK32:
                    # the peer answered the kept SYN: the 4-tuple was free, its end went unseen
                    self._drop_subflow(sf)
                    ev += self.process(old)
                    ev += self.process(seg)
                    return ev
        sf.last_ts = ts
        if sf.refused:
            return ev
        if sf.plain:
            st.plain_packets += 1
            ev.append(PassThrough(bytes(seg.ip), seg.ipver, ts))
            return ev
        st.mptcp_packets += 1
        conn = sf.conn
        if conn is not None:
            conn.last_ts = ts
            if conn.closed is None:
                self.connections.move_to_end(conn.id)
                conn.touched = st.packets
                if not conn.opened and conn.id in self._half_open:
                    self._half_open.move_to_end(conn.id)
        self._on_segment(sf, d, seg, opts or _NO_OPTS, ev, low_ttl=low)
        return ev

    def _low_ttl(self, sf: Subflow, d: int, seg: TcpSegment, o: "_Opts", floor: int, ev: list[Event]) -> bool:
        """A packet whose TTL (hop limit) is below ``floor``, the one its subflow direction's first
        packet reached the gateway with, and that would change what mproxy reads: the packet may
        expire between the gateway and the receiver, and a sender that knows the hop count can make
        it (a TTL insertion: the IDS reads a copy the server never gets, then the server reads
        another). True when it is not taken as it came: its bytes are kept until the receiver
        shows it took them, and nothing else of it is taken. Inline the gateway raises its TTL back
        (``Tracker.raise_ttl``): then it is read as any other (False). Noticed once per subflow
        direction. A packet that brings nothing new -- a second copy of one already taken, as a
        router's ``-i any`` capture records each forwarded packet leaving with its TTL one lower --
        is not judged (False)."""
        sfd, other = sf.dirs[d], sf.dirs[d ^ 1]
        flags, n = seg.flags, seg.payload_len
        dss = o.dss
        conn = sf.conn
        new = bool(flags & RST or flags & FIN and sfd.fin_seq is None) \
            or bool(n) and 0 < (seg.seq + n - _rcv_next(sfd)) & MASK32 < 0x80000000 \
            or o.fastclose is not None or o.tcprst is not None or o.fail is not None or o.remove is not None \
            or flags & ACK and other.peer_ack is not None and 0 < (seg.ack - other.peer_ack) & MASK32 < 0x80000000 \
            or dss is not None and dss.data_fin and conn is not None \
            and conn.streams[_DIRS[d ^ sf.flipped]].fin_dsn is None
        if not new:
            return False
        raise_ = self.raise_ttl
        if not sfd.ttl_noticed and not sf.plain:
            sfd.ttl_noticed = True
            what = f"forwarded with TTL {floor}, so it reaches the receiver, and read" if raise_ else \
                "read only once the receiver acknowledges its bytes (a copy sent first, or none, refuses it)"
            self._notice(ev, NoticeType.LOW_TTL, conn,
                         f"a packet with TTL {_ttl(seg)}, below the {floor} of this subflow direction's first "
                         f"packet: it may expire before the receiver (a TTL insertion); {what}; every packet with "
                         "a lowered TTL counts in mproxy_low_ttl_packets_total", seg)
        if raise_:
            return False
        if not self._may_keep(conn, sfd, seg, edge=False) or not self._keep_late(sf, d, seg, o, ev, _LOW_TTL):
            self._unread(conn, sfd, seg, _LOW_TTL, ev)
        return True

    @staticmethod
    def _rst_taken(sf: Subflow, d: int, seg: TcpSegment) -> bool:
        """Does the receiver take this (in-window) RST? Linux (tcp_validate_incoming, RFC 5961 3.2)
        resets only at its next sequence number -- the FIN's or the one after it once the sender's
        FIN came -- or, where both SYNs offered SACK, at the highest end among the (at most four)
        SACK blocks it keeps for bytes held out of order (see _note_sack; a SYN/ACK the gateway
        missed counts as offering SACK); elsewhere
        it answers with a challenge ACK and discards it, MP_FASTCLOSE and all. Taken anywhere in the
        window, an RST one byte off ended the rebuilt stream (or the subflow's bytes) while the
        server read on. Handshakes, and subflows whose ISN the gateway never saw, are not judged."""
        sfd = sf.dirs[d]
        if not sf.established or sfd.isn is None:
            return True
        seq = seg.seq
        if sfd.fin_seq is not None:
            return seq == sfd.fin_seq or seq == (sfd.fin_seq + 1) & MASK32
        rn = _rcv_next(sfd)
        pa = sfd.peer_ack
        if pa is not None and 0 < (pa - rn) & MASK32 < 0x80000000:
            rn = pa  # (it acknowledged bytes the gateway did not see)
        if seq == rn:
            return True
        syn, synack = sf.dirs
        if not syn.sack_perm or not synack.sack_perm and synack.isn is not None:
            return False  # (the out-of-order edge counts only where SACK was negotiated: tcp_is_sack)
        if seq == sfd.last_end:  # (after bytes read at once past a hole: the highest SACK block's end)
            return True
        if sfd.ofo and sfd.sacks:  # (the blocks of kept segments, read yet or not, as tcp_sack_remove left them)
            ends = [e for b, e in sfd.sacks if 0 < (b - rn) & MASK32 < 0x80000000]
            return bool(ends) and seq == max(ends, key=lambda e: (e - rn) & MASK32)
        return False

    def _wrong_iface(self, hit: tuple[Subflow, int], seg: TcpSegment, iface: int, ev: list[Event]) -> bool:
        """A packet whose subflow direction came in on another interface before: True when it is
        refused. The first packet of a direction pins it; a SYN that starts a new connection on
        the 4-tuple of one that ended starts afresh.

        Why: the gateway forwards whatever reaches it, so a host on the client's side can send a
        packet with the server's addresses (to the gateway's MAC: it goes back out), and the server
        never sees it. An ACK that passes segments kept after a hole, or a DATA_ACK over a hole,
        would make mproxy read bytes the server never took. Strict reverse-path filtering
        (rp_filter) refuses such packets too, where routing is symmetric."""
        sf, d = hit
        sd = sf.dirs[d]
        if not sd.iface:
            sd.iface = iface
            return False
        if seg.flags & SYN and not seg.flags & ACK and self._ended(sf):
            return False  # (process drops the old subflow for the new one, which its next packet pins)
        self.stats.wrong_interface += 1
        if not sd.iface_noticed:
            sd.iface_noticed = True
            self._notice(ev, NoticeType.WRONG_INTERFACE, sf.conn,
                         f"a packet of this subflow direction came in on interface {iface}, its earlier ones "
                         f"on interface {sd.iface}: refused, as a copy spoofed from the wrong side of the "
                         "gateway (or a capture that records each packet twice, on a bridge or bond and on "
                         "its port: then set [tracker] pin_interfaces = false); later ones are counted in "
                         "mproxy_wrong_interface_packets_total",
                         seg)
        return True

    def _bad_checksum(self, sf: Subflow, seg: TcpSegment, ev: list[Event]) -> bool:
        """A judged segment whose checksum (TCP, or the IPv4 header's) fails: the receiver drops it,
        so False (it counts for nothing here either), unless ``checksums = "count"``. Which are
        judged is decided in ``process`` (see ``TrackerConfig.checksums``): whole segments only, in
        captures those a wire carries (GRO/TSO-sized ones are artifacts), and there an unfilled
        field is taken as offload unless ``verify``."""
        what = f"a {seg.payload_len}-byte segment (flags 0x{seg.flags:02x}) whose checksum fails: the receiver drops it"
        if self._csum_drop:
            self.stats.bad_checksums["dropped"] += 1
            self._notice(ev, NoticeType.BAD_CHECKSUM, sf.conn, what + "; so does mproxy", seg)
            return False
        self.stats.bad_checksums["taken"] += 1
        self._notice(ev, NoticeType.BAD_CHECKSUM, sf.conn, what + "; taken (checksums = count)", seg)
        return True

    def _fast(self, sf: Subflow, d: int, seg: TcpSegment, ev: list[Event]) -> bool:
        """The dominant packet, whole, in one frame: an in-window ACK on an established subflow of
        an open connection whose only MPTCP option is a plain DSS (Data ACK and/or a mapping of
        exactly this payload, at or beyond every placed byte), no checksums, nothing unmapped.

        Returns False, having changed nothing, for anything else: the general path
        (``_options`` -> ``_on_segment``) then does the work. When it returns True, state and
        events are what the general path would have produced (a hypothesis test holds the two
        side by side); it only inlines that path's steps in the same order.
        """
        flags = seg.flags
        if flags & _NOT_FAST or not flags & ACK or seg.hdr_len == 20:
            return False
        conn = sf.conn
        if conn is None or conn.closed is not None or not conn.opened or conn.csum or not sf.established \
                or sf.refused or sf.plain or conn.fallen or conn.late or sf.unverified or sf.reset:
            return False
        ip = seg.ip
        o = seg.tcp_off + 20
        tail = seg.hdr_len - 34  # bytes after NOP NOP timestamp MPTCP-header, minus the MPTCP option's length
        tsval = None
        if tail >= 0:
            head, tsval, kind, ln, sub, fl = _TS_MPTCP.unpack_from(ip, o)
            tail -= ln - 2
        if tail < 0 or head != _NOP_NOP_TS or kind != 30 or (tail and not (tail == 2 and (
                ip[o + 12 + ln] == 0 or (ip[o + 12 + ln] == 1 and ip[o + 13 + ln] <= 1)))):
            # not Linux's layout (NOP NOP timestamp, one MPTCP option, two bytes of NOP/EOL padding
            # or none; DSS lengths are even): walk the options
            if sf.dirs[d].ts_recent:
                return False  # the timestamp is somewhere else: the general path finds it for PAWS
            spans = mptcp_spans(seg)
            if type(spans) is not list or len(spans) != 1 or tcp_md5_signed(seg):
                return False
            off, ln = spans[0]
            if ln < 4:
                return False
            sub, fl = ip[off + 2], ip[off + 3]
            tsval = None
        else:
            off = o + 12
        if sub >> 4 != 2:
            return False
        layout = _DSS_PLAIN.get(fl & 0x1F)
        if layout is None or layout[0] != ln:
            return False
        n = seg.payload_len
        sfd = sf.dirs[d]
        tr = sfd.ts_recent
        if tr and n and tsval is not None and 1 < (tr - tsval) & MASK32 < 0x80000000:
            return False  # an older timestamp than the receiver keeps: PAWS drops it (general path)
        pa = wa = sfd.peer_ack
        edge = sfd.edge
        if wa is None and sfd.syn_window is not None:
            wa, edge = sfd.syn_window  # before the receiver's first ACK (see SubflowDir.syn_window)
        if wa is not None and self.config.window_check:  # _window_ok, inlined
            o = (seg.seq - wa) & MASK32
            if o >= 0x80000000:
                o -= 0x100000000
            win = sfd.peer_win if sfd.peer_win > 65535 else 65535
            if o < -(2 * win + 65535) or edge is not None and (seg.seq - edge) & MASK32 < 0x80000000 \
                    and (n or seg.seq != edge) or n and pa is not None and o >= sfd.peer_win:
                return False  # (the last: data into a closed window, as data here starts at rcv_nxt: _into_closed)
        other = sf.dirs[d ^ 1]
        if sfd.ofo is not None or other.ofo is not None:
            return False  # segments kept after a hole: this one may fill it, or its ack pass it
        una = other.peer_ack
        if una is not None:
            back = (una - seg.ack) & MASK32
            if back and (back < 0x80000000 or 0x100000000 - back > other.max_win + 1):
                return False  # an ack behind the last, or more than a window ahead of it: _ack_refused
        cdir = _DIRS[d ^ sf.flipped]
        streams = conn.streams
        have = layout[2]
        if have == 2:
            data_ack = None
            dsn, ssn, dll = layout[1].unpack_from(ip, off + 4)
        elif have == 3:
            data_ack, dsn, ssn, dll = layout[1].unpack_from(ip, off + 4)
        else:
            if n:
                return False  # payload without a mapping
            (data_ack,) = layout[1].unpack_from(ip, off + 4)
            dsn = ssn = dll = 0
        if have & 2:
            isn = sfd.isn
            if not n or n != dll or n != seg.wire_payload_len or isn is None or sfd.pending or sfd.fin \
                    or (seg.seq - isn) & MASK32 != ssn:
                return False
            hw = sfd.placed_end
            if hw is not None and (ssn - hw) & MASK32 >= 0x80000000:
                return False  # bytes before the furthest placed ones: _place checks them
            rn = sfd.rcv_nxt
            if rn is None:
                rn = seg.seq if sf.role == Role.PICKUP else (isn + 1) & MASK32
            if seg.seq != rn:
                return False  # after a hole in the subflow (_keep_ofo decides), or partly old (_window_ok)
            if pa is not None and 0 < (pa - rn) & MASK32 < 0x80000000:
                return False  # acknowledged past the gateway's next byte (a capture's loss): _ofo_acked moves it
            st = streams[cdir]
            if not fl & m.DSS_m and st.base is not None:
                dsn = expand32(dsn, st.base)
        # -- committed: from here on, the general path's steps in its order
        if tsval is not None and pa is not None and (tsval - tr) & MASK32 < 0x80000000 \
                and (pa - seg.seq) & MASK32 < 0x80000000 and (seg.seq + n - pa) & MASK32 < 0x80000000:
            sfd.ts_recent = tsval  # _keep_ts, inlined
        ts = seg.ts
        sf.last_ts = ts
        self.stats.mptcp_packets += 1
        self.stats.options[2] += 1
        conn.last_ts = ts
        self.connections.move_to_end(conn.id)
        conn.touched = self.stats.packets
        _take_ack(sfd, other, seg)
        if data_ack is not None:
            rst = streams[cdir ^ 1]
            rb = rst.base
            if rb is not None:
                if not fl & m.DSS_a:  # expand32, inlined (its final "& MASK64" is the unwrap's too)
                    cand = (rb & ~MASK32) | data_ack
                    diff = cand - rb
                    if diff > 0x80000000:
                        cand -= 0x100000000
                    elif diff < -0x80000000:
                        cand += 0x100000000
                    data_ack = cand
                diff = (data_ack - rb) & MASK64  # DataStream.unwrap, inlined
                data_ack = rb + diff if diff < 1 << 63 else rb + diff - (1 << 64)
                if data_ack - rb > _MAX_WINDOW and self._ack_unsent(conn, sf, d, rst, data_ack, seg, ev):
                    data_ack = None
            if data_ack is not None:
                if rst.acked is None or data_ack > rst.acked:
                    rst.acked = data_ack
                if rb is not None:  # the connection-level right edge (see _hold_beyond)
                    we = data_ack + other.peer_win
                    if rst.wnd_end is None or we > rst.wnd_end:
                        rst.wnd_end = we
        if have & 2:
            # _fast_data with the mapping covering exactly this payload; _place's in-order case
            moff = (dsn - ssn) & MASK32
            end = (ssn + n) & MASK32
            pl = sfd.placed
            if pl and pl[-1][1] == ssn and pl[-1][2] == moff:
                pl[-1][1] = end
            else:
                pl.append([ssn, end, moff])
                if len(pl) > 16:
                    del pl[0]
            sfd.placed_end = end
            sfd.placed_off = moff
            conn.mapped[cdir] = True
            sfd.last_map_ssn = ssn
            seq_end = (seg.seq + n) & MASK32  # _seen
            if sfd.last_end is None or ((seq_end - sfd.last_end) & MASK32) < 0x80000000:
                sfd.last_end = seq_end
            rn = sfd.rcv_nxt
            if rn is None or (rn - seg.seq) & MASK32 < 0x80000000 and 0 < (seq_end - rn) & MASK32 < 0x80000000:
                sfd.rcv_nxt = seq_end
            sfd.bytes += n
            payload = ip[seg.payload_off : seg.payload_off + n]
            base = st.base
            starts = st._starts
            if base is not None and (dsn - base) & MASK64 == 0 and st.fin_dsn is None \
                    and (not starts or starts[0] > base + n):
                # DataStream.insert at its base, nothing buffered that it reaches: _advance, inlined
                out = bytes(payload)
                st.base = base + n
                st.released += n
                if st.sha is not None:
                    st.sha.update(out)
                if st.history_limit:
                    h = st._history
                    h += out
                    if len(h) > 2 * st.history_limit:
                        cut = len(h) - st.history_limit
                        del h[:cut]
                        self.history_budget.used += n - cut
                    else:
                        self.history_budget.used += n
                self.stats.rebuilt_bytes[cdir] += n
                ev.append(DataReleased(conn.id, cdir, out, ts))
            else:
                shed = self.shed_bytes
                self._placing_urgent = (sfd.waits is not None or sfd.refused is not None) \
                    and self._must_take(st, sfd, seg)
                try:
                    self._deliver(conn, cdir, dsn, payload, ts, ev)
                finally:
                    self._placing_urgent = False
                if self.shed_bytes != shed and self.drop_shed:
                    self._limit_dropped(conn, sfd, rn, seg, ev)
        s0, s1 = streams
        if (s0.acked is not None and s0.base is not None and s0.acked > s0.base) or (
                s1.acked is not None and s1.base is not None and s1.acked > s1.base):
            self._check_gaps(conn, ts, ev)
        if s0.finished or s1.finished:
            self._check_end(conn, ts, ev)
        return True

    def process_new(self, seg: TcpSegment, opts: "_Opts | None", ev: list[Event]) -> list[Event]:
        """A segment of no tracked subflow: plain TCP, or the start of a subflow."""
        if opts is None:
            self.stats.plain_packets += 1
            ev.append(PassThrough(bytes(seg.ip), seg.ipver, seg.ts))
            return ev
        self.stats.mptcp_packets += 1
        if tcp_md5_signed(seg):
            self._unread(None, None, seg, _MD5_UNREAD, ev)  # the receiver drops it (see _on_segment): no subflow
            return ev
        self._new_subflow(seg, opts, ev)
        return ev

    @staticmethod
    def _ended(sf: Subflow) -> bool:
        """Has the subflow (or its connection) ended, or never opened, so that its 4-tuple is free?"""
        return sf.closed_ts is not None or sf.refused or not sf.established or sf.reset \
            or (sf.conn is not None and sf.conn.closed is not None)

    @staticmethod
    def _stale(sf: Subflow, d: int, seg: TcpSegment) -> bool:
        """Is this SYN the start of a new connection rather than a retransmission?"""
        if sf.closed_ts is not None or sf.refused or (sf.conn is not None and sf.conn.closed is not None):
            return True
        isn = sf.dirs[d].isn
        if isn is not None and d == 0 and sf.role == Role.INITIAL and sf.conn is not None and sf.conn.syn_taken:
            isn = (isn - sf.conn.syn_taken) & MASK32  # moved past the Fast Open bytes the server took
        return isn is not None and isn != seg.seq

    def _drop_subflow(self, sf: Subflow) -> None:
        k = sf.key
        for key in (k, (k[2], k[3], k[0], k[1])):
            hit = self._sf.get(key)
            if hit is not None and hit[0] is sf:
                del self._sf[key]
        self._orphans.pop(sf.id, None)
        conn = sf.conn
        if conn is not None and sf in conn.subflows:
            if conn.closed is None:
                sf.closed_ts = sf.closed_ts or sf.last_ts
            else:
                # its record is written: unlinked, so that an ended connection goes with its last entry by
                # reference counting (a connection <-> subflow cycle waits for a full garbage collection)
                conn.subflows.remove(sf)

    def flush(self, now: float | None = None) -> list[Event]:
        """End of input: release what can be released (holes become gaps) and close all."""
        ts = self.now if now is None else now
        ev: list[Event] = []
        for conn in list(self.connections.values()):
            self._close(conn, Outcome.END_OF_INPUT, False, ts, ev)
        return ev

    def expire(self, now: float) -> list[Event]:
        ev: list[Event] = []
        self._expire(now, ev)
        return ev

    # ------------------------------------------------------------------
    def _options(self, seg: TcpSegment, hit: tuple[Subflow, int] | None, ev: list[Event]) -> "_Opts | None":
        if seg.hdr_len == 20:
            return None
        spans, err = read_mptcp_spans(seg)
        if err is not None:
            # counted and reported, but the options before the damaged one stand, as Linux reads them
            self._decode_error(err, seg, hit, ev)
        if not spans:
            return None
        o = _Opts()
        ip = seg.ip
        flags = seg.flags
        counts = self.stats.options
        if len(spans) == 1:
            off, ln = spans[0]
            opt = m.decode(ip[off : off + ln], flags)
            if isinstance(opt, m.Dss):
                counts[2] += 1
                o.dss = opt
                return o
            if isinstance(opt, WireError):
                self._decode_error(opt, seg, hit, ev)
                return None
            counts[opt.subtype] += 1
            o.add(opt)
            return o
        for off, ln in spans:
            opt = m.decode(ip[off : off + ln], flags)
            if isinstance(opt, WireError):
                self._decode_error(opt, seg, hit, ev)
                continue
            counts[opt.subtype] += 1
            o.add(opt)
        return o

    def _decode_error(self, err: WireError, seg: TcpSegment, hit: tuple[Subflow, int] | None,
                      ev: list[Event]) -> None:
        self.stats.decode_errors[err.kind.value] += 1
        conn = hit[0].conn if hit else None
        self._notice(ev, NoticeType.INVALID_OPTION, conn, str(err), seg)

    def _notice(self, ev: list[Event], t: NoticeType, conn: Connection | None, detail: str,
                seg: TcpSegment | None = None, ts: float | None = None) -> None:
        """Count and emit a notice. Its 4-tuple is the packet's when a packet caused it, else the
        connection's initial subflow (client -> server): the addresses the IDS sees the emitted
        conversation under, so an analyst can match the two."""
        self.stats.notices[t.value] += 1
        if conn is not None:
            conn.notices[t.value] += 1
        if seg is not None:
            ev.append(Notice(t, conn.id if conn else None, detail, seg.ts, seg.src_text, seg.sport,
                             seg.dst_text, seg.dport))
        elif conn is not None:
            ev.append(Notice(t, conn.id, detail, self.now if ts is None else ts, addr_text(conn.client[0]),
                             conn.client[1], addr_text(conn.server[0]), conn.server[1]))
        else:
            ev.append(Notice(t, None, detail, self.now if ts is None else ts))

    # -- subflow creation -------------------------------------------------
    def _new_subflow(self, seg: TcpSegment, o: "_Opts", ev: list[Event]) -> None:
        flags = seg.flags
        ts = seg.ts
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        if len(self._sf) // 2 >= self.config.max_subflows:
            self.stats.memcap["subflows"] += 1  # the limit bit: counted however room is made
            self._make_room(ts, ev)
            if len(self._sf) // 2 >= self.config.max_subflows:
                self.stats.refused["subflow_limit"] += 1
                ev.append(SubflowRefused("subflow_limit", ts))
                ev.append(PassThrough(bytes(seg.ip), seg.ipver, ts))
                return
        if flags & SYN and not flags & ACK:
            if o.cap is not None:
                conn = self._new_connection(seg, ts, ev)
                if conn is None:
                    ev.append(PassThrough(bytes(seg.ip), seg.ipver, ts))
                    return
                cap = o.cap
                conn.version = cap.version
                conn.csum = bool(cap.flags & m.CAP_A_CHECKSUM)
                if cap.sender_key is not None:
                    conn.client_key = cap.sender_key
                    self._index_token(conn, conn.client_key)
                    self._set_base(conn, Direction.C2S)
                sf = self._add_subflow(key, Role.INITIAL, ts, conn, False)
                sf.dirs[0].isn = seg.seq
                sf.dirs[0].wscale = _wscale(seg)
                sf.dirs[0].sack_perm = _sack_perm(seg)
                sf.dirs[0].ttl = _ttl(seg)
                sf.dirs[0].ts_recent = _tsval(seg) or 0  # what the server keeps from the SYN
                conn.held.append(PassThrough(bytes(seg.ip), seg.ipver, ts))
                if seg.payload_len:
                    self._keep_syn_data(conn, seg)
                return
            if o.join is not None and o.join.phase == m.JoinPhase.SYN:
                self._join_syn(seg, key, o.join, ev)
                return
            ev.append(PassThrough(bytes(seg.ip), seg.ipver, ts))
            return
        if flags & SYN:
            # SYN/ACK for a SYN we never saw: the handshake began before we looked.
            if o.cap is None and o.join is None:
                ev.append(PassThrough(bytes(seg.ip), seg.ipver, ts))
                return
        elif not seg.payload_len and not o.rare and (o.dss is None or o.dss.dsn is None):
            # a bare (DATA_)ACK or FIN of a subflow we do not track: typically the last packets of a
            # connection whose entries already went (closed_linger, or a full table under a flood).
            # Nothing to rebuild: absorbed, instead of resurrecting it as an empty pickup connection.
            return
        self._pickup(seg, key, o, ev)

    def _new_connection(self, seg: TcpSegment, ts: float, ev: list[Event], *, client_is_src: bool = True,
                        pickup: bool = False) -> Connection | None:
        if len(self.connections) >= self.config.max_connections:
            self._expire(ts, ev)  # (ended connections' lingering subflows hold no connection slot)
            if len(self.connections) >= self.config.max_connections:
                # evict the least recently active connection still in its handshake, else refuse
                victim = next(iter(self._half_open.values()), None)
                if victim is None:
                    self.stats.refused["connection_limit"] += 1
                    self.stats.memcap["connections"] += 1
                    ev.append(SubflowRefused("connection_limit", ts))
                    return None
                self.stats.memcap["connections"] += 1
                self._close(victim, Outcome.EVICTED, True, ts, ev, record=self._eviction_recorded(seg, ev))
        a, b = (seg.src, seg.sport), (seg.dst, seg.dport)
        cfg = self.config
        conn = Connection(self._next_conn, ts, a if client_is_src else b, b if client_is_src else a,
                          pickup=pickup, last_ts=ts, touched=self.stats.packets,
                          streams=(DataStream(ooo_limit=cfg.ooo_limit, history_limit=cfg.history,
                                              sha=hashlib.sha256() if self.stream_hash else None,
                                              budget=self.budget, history_budget=self.history_budget),
                                   DataStream(ooo_limit=cfg.ooo_limit, history_limit=cfg.history,
                                              sha=hashlib.sha256() if self.stream_hash else None,
                                              budget=self.budget, history_budget=self.history_budget)))
        self._next_conn += self.conn_id_step
        self.connections[conn.id] = conn
        self._half_open[conn.id] = conn
        self.stats.connections += 1
        return conn

    def _add_subflow(self, key: tuple[bytes, int, bytes, int], role: Role, ts: float,
                     conn: Connection | None, flipped: bool) -> Subflow:
        sf = Subflow(self._next_sf, key, role, ts, conn, flipped, last_ts=ts)
        self._next_sf += 1
        self._sf[key] = (sf, 0)
        self._sf[(key[2], key[3], key[0], key[1])] = (sf, 1)
        self.stats.subflows += 1
        if conn is not None:
            conn.subflows.append(sf)
            conn.dormant = None
        else:
            self._orphans[sf.id] = sf
        return sf

    def _index_token(self, conn: Connection, key: int) -> None:
        tok = crypto.key_token(key, conn.version or 0)
        lst = self._tokens.setdefault(tok, {})
        if conn.id in lst:
            return
        if len(lst) >= _TOKEN_SHARERS:
            # a host's stack keeps its tokens unique (Linux: mptcp_token_new_connect), so many live
            # connections sharing one means an endpoint re-using its key on purpose: each join with that
            # token would look at all of them. The first ones stay found by it (a join prefers the
            # oldest that owns its address), later ones are not.
            self.stats.memcap["token_sharers"] += 1
            return
        lst[conn.id] = conn
        if self.token_log is not None:
            self.token_log.append((tok, True))

    def _set_base(self, conn: Connection, d: Direction) -> None:
        key = conn.client_key if d == Direction.C2S else conn.server_key
        st = conn.streams[d]
        if key is not None and st.base is None:
            # bytes the server took from a Fast Open SYN come first, ahead of IDSN+1 (see syn_data)
            pre = (conn.syn_taken or 0) if d == Direction.C2S else 0
            st.base = st.start = (crypto.key_idsn(key, conn.version or 0) + 1 - pre) & MASK64

    def _join_syn(self, seg: TcpSegment, key: tuple[bytes, int, bytes, int], j: m.MpJoin, ev: list[Event]) -> None:
        ts = seg.ts
        conn, flipped = self._find_by_token(j.token or 0, seg.dst)
        by_token = conn is not None
        if conn is None:
            conn, flipped = self._find_by_address(seg.src, seg.dst, seg.dport)
        # while a receiver is flooded, its joins are summed up in the one join_flood notice
        flooded = bool(self.config.join_flood_threshold) and self._count_join(
            seg, j.token if by_token else None, conn, ev)
        if not flooded:
            if conn is None:
                self._notice(ev, NoticeType.JOIN_UNKNOWN_TOKEN, None, f"token 0x{j.token:08x}", seg)
            elif not self._knows_address(conn, seg.dst, flipped):
                self._notice(ev, NoticeType.JOIN_UNKNOWN_ADDRESS, conn,
                             f"join to {seg.dst_text} never announced", seg)
        if conn is not None and self._full(conn):
            self.stats.refused["per_connection_limit"] += 1
            ev.append(SubflowRefused("per_connection_limit", ts))
            conn = None
        sf = self._add_subflow(key, Role.JOIN, ts, conn, flipped)
        sf.addr_id = j.addr_id
        sf.backup = j.backup
        sf.join_token = j.token
        sf.nonce_i = j.nonce
        sf.dirs[0].isn = seg.seq
        sf.dirs[0].wscale = _wscale(seg)
        sf.dirs[0].sack_perm = _sack_perm(seg)
        sf.dirs[0].ttl = _ttl(seg)
        sf.dirs[0].ts_recent = _tsval(seg) or 0

    def _count_join(self, seg: TcpSegment, token: int | None, conn: Connection | None, ev: list[Event]) -> bool:
        """MP_JOIN flood detection: join SYNs per receiver (address + token) in a fixed window.

        Joins with unknown tokens share one counter per address, so spraying random tokens at
        one host is a flood too. Returns whether the receiver is over the threshold in this
        window. State is bounded: at most ``_JOIN_FLOOD_KEYS`` windows, the oldest dropped
        first; windows that ended are pruned by :meth:`_expire`.
        """
        cfg = self.config
        ts = seg.ts
        key = (seg.dst, token)
        wins = self._join_windows
        w = wins.get(key)
        if w is None or ts - w[0] >= cfg.join_flood_window:
            if w is None and len(wins) >= _JOIN_FLOOD_KEYS:
                wins.popitem(last=False)
            w = [ts, 0, False]
            wins[key] = w
            wins.move_to_end(key)
        w[1] += 1
        if w[1] <= cfg.join_flood_threshold:
            return False
        if not w[2]:
            w[2] = True  # once per window: a flood must not flood the event log too
            tok = "unknown tokens" if token is None else f"token 0x{token:08x}"
            self._notice(ev, NoticeType.JOIN_FLOOD, conn,
                         f"more than {cfg.join_flood_threshold} MP_JOIN SYNs to {seg.dst_text} ({tok}) "
                         f"within {cfg.join_flood_window:g} s", seg)
        return True

    def _eviction_recorded(self, seg: TcpSegment, ev: list[Event]) -> bool:
        """SYN flood detection at the connection limit; returns whether this eviction gets a record.

        Each eviction of a half-open handshake would otherwise write one ``mptcp_connection`` record,
        so a flood would grow the event log at its own packet rate. The first
        ``syn_flood_threshold`` evictions of a window are recorded (the flood's first sources stay
        visible), the next one raises the notice, the rest are only counted (outcome ``evicted``).
        """
        cfg = self.config
        if not cfg.syn_flood_threshold:
            return True
        ts = seg.ts
        w = self._evictions
        if w[1] == 0 or ts - w[0] >= cfg.syn_flood_window:
            w[0], w[1] = ts, 0
        w[1] += 1
        if w[1] <= cfg.syn_flood_threshold:
            return True
        if w[1] == cfg.syn_flood_threshold + 1:
            self._notice(ev, NoticeType.SYN_FLOOD, None,
                         f"more than {cfg.syn_flood_threshold} half-open MPTCP handshakes evicted at the connection "
                         f"limit ({cfg.max_connections}) within {cfg.syn_flood_window:g} s; further evictions in "
                         "this window are counted, not recorded (the 4-tuple is the SYN that caused this eviction)", seg)
        return False

    def _find_by_token(self, token: int, dst: bytes) -> tuple[Connection | None, bool]:
        cands = self._tokens.get(token)
        if not cands:
            return None, False
        live = [c for c in cands.values() if c.closed is None]
        if not live:
            return None, False
        best = None
        for c in live:  # the token names the join's receiver: prefer the one owning dst
            owner_is_server = c.server_token() == token
            if self._knows_address(c, dst, not owner_is_server):
                best = c
                break
        if best is None:
            best = live[-1]
        return best, best.server_token() != token

    def _knows_address(self, conn: Connection, addr: bytes, flipped: bool) -> bool:
        """Is ``addr`` an address of the join's receiver (server unless flipped)?"""
        side = 0 if flipped else 1
        own = conn.client[0] if flipped else conn.server[0]
        if addr == own:
            return True
        return any(a == addr for a, _p in conn.announced[side].values())

    def _find_by_address(self, src: bytes, dst: bytes, dport: int) -> tuple[Connection | None, bool]:
        """Fallback grouping when the token is unknown: the join goes to an announced address, of the
        live connection that announced it last (a client joins an address soon after it is announced).
        An index, not a walk over the connections: anyone can send joins with made-up tokens."""
        latest: tuple[int, Connection] | None = None
        for entry in ((dst, dport), (dst, None)):
            at = self._announcers.get(entry)
            if at:
                last = next(reversed(at.values()))
                if latest is None or last[0] > latest[0]:
                    latest = last
        if latest is None:
            return None, False
        best = latest[1]
        # (the index holds what the connection announces: the client, side 0, or the server)
        return best, any(a == dst and (p is None or p == dport) for a, p in best.announced[0].values())

    def _pickup(self, seg: TcpSegment, key: tuple[bytes, int, bytes, int], o: "_Opts", ev: list[Event]) -> None:
        """A subflow first seen mid-stream: attach by DSN proximity or start a pickup connection."""
        ts = seg.ts
        conn, flipped = self._find_by_dsn(o.dss, seg)
        if conn is not None and self._full(conn):
            # over the per-connection limit: tracked as an orphan (bounded by max_subflows), never attached
            self.stats.refused["per_connection_limit"] += 1
            ev.append(SubflowRefused("per_connection_limit", ts))
            self._add_subflow(key, Role.PICKUP, ts, None, flipped)
            return
        if conn is None:
            client_is_src = seg.dport < seg.sport if seg.dport != seg.sport else True
            conn = self._new_connection(seg, ts, ev, client_is_src=client_is_src, pickup=True)
            if conn is None:
                ev.append(PassThrough(bytes(seg.ip), seg.ipver, ts))
                return
            flipped = not client_is_src
            if o.cap is not None:
                conn.version = o.cap.version
        sf = self._add_subflow(key, Role.PICKUP, ts, conn, flipped)
        sf.established = True
        sf.unverified = not conn.pickup
        if not conn.opened:
            self._open(conn, ts, ev)
        else:
            ev.append(SubflowJoined(conn.id, sf.id, ts))
        self._on_segment(sf, 0, seg, o, ev)
        if conn.closed is None:
            self._dsn_reindex(conn)  # (its streams moved with no packet of its own subflows)

    def _find_by_dsn(self, dss: m.Dss | None, seg: TcpSegment) -> tuple[Connection | None, bool]:
        """The live connection a mid-stream subflow's DSS places it in, and whether its sender is that
        connection's server. Every value the DSS carries must agree: the DSN with the sender's stream,
        the DATA_ACK with the other one (where the connection knows a position to compare). One
        alone joined another connection between the same hosts to this one (lab: a 32-bit DATA_ACK
        near the new connection's, a 64-bit DSN nowhere near it)."""
        if dss is None:
            return None, False
        probes: list[tuple[int, int, bool]] = []  # (value, stream index if the sender is the client, 64-bit)
        if dss.dsn is not None:
            probes.append((dss.dsn, 0, dss.dsn64))
        if dss.data_ack is not None:
            probes.append((dss.data_ack, 1, dss.ack64))
        if not probes:
            return None, False
        left = min(self._scan_burst, self._scan_left + max(0.0, seg.ts - self._scan_ts) * _SCAN_RATE)
        self._scan_ts = max(self._scan_ts, seg.ts)
        near = [(val, k, MASK64 if wide else MASK32, _PICKUP_DSN_WINDOW if wide else _PICKUP_DSN_WINDOW32)
                for val, k, wide in probes]
        if all(wide for _v, _k, wide in probes):
            # every match has a stream within the window of a value: in its bucket or a neighbour's
            self._dsn_refresh()
            found: dict[int, Connection] = {}
            for val, _k, _w in probes:
                b = val >> _DSN_BUCKET_BITS
                for bb in (b - 1, b, b + 1):
                    at = self._dsn_index.get(bb % _DSN_BUCKETS)
                    if at:
                        found.update(at)
            cands: Iterable[Connection] = sorted(found.values(), key=lambda c: c.touched, reverse=True)
        else:
            cands = reversed(self.connections.values())
        for conn in cands:  # most recently active first
            left -= 1
            if left < 0:
                self._scan_left = 0.0
                self.stats.memcap["pickup_walk"] += 1
                return None, False
            if conn.closed is not None:
                continue
            streams = conn.streams
            for flipped in (False, True):
                agreed = 0
                for val, k, mask, window in near:
                    st = streams[k ^ flipped]
                    # a stream picked up mid-stream may have no byte in order yet (its first data
                    # waits for a mapping to anchor it) but already knows the peer's DATA_ACK
                    ref = st.base if st.base is not None else st.acked
                    if ref is None:
                        continue
                    dist = (val - ref) & mask  # modular: streams cross 2**32 and 2**64
                    if dist >= window and mask + 1 - dist >= window:
                        agreed = -1
                        break
                    agreed += 1
                if agreed > 0:
                    self._scan_left = left
                    return conn, flipped
        self._scan_left = left
        return None, False

    def _dsn_refresh(self) -> None:
        """Index again the connections that had packets since the last refresh (the connection table's
        tail: it is in the order of their last packets), so that each lookup sees every stream where
        it is now. Each connection costs this once per lookup that follows its packets."""
        fresh = self._dsn_fresh
        for conn in reversed(self.connections.values()):
            if conn.touched <= fresh:
                break
            self._dsn_reindex(conn)
        self._dsn_fresh = self.stats.packets

    def _dsn_reindex(self, conn: Connection, ended: bool = False) -> None:
        at: tuple[int, ...] = ()
        if not ended:
            s0, s1 = conn.streams
            r0 = s0.base if s0.base is not None else s0.acked
            r1 = s1.base if s1.base is not None else s1.acked
            if r0 is not None:
                r0 >>= _DSN_BUCKET_BITS
                at = (r0,) if r1 is None or r1 >> _DSN_BUCKET_BITS == r0 else (r0, r1 >> _DSN_BUCKET_BITS)
            elif r1 is not None:
                at = (r1 >> _DSN_BUCKET_BITS,)
        if at == conn.dsn_at:
            return
        index = self._dsn_index
        for b in conn.dsn_at:
            _unindex(index, b, conn.id)
        for b in at:
            index.setdefault(b, {})[conn.id] = conn
        conn.dsn_at = at

    # -- per-segment work ---------------------------------------------------
    def _on_segment(self, sf: Subflow, d: int, seg: TcpSegment, o: "_Opts", ev: list[Event],
                    late: bool = False, low_ttl: int = 0) -> None:
        """One segment of a tracked subflow; ``late``: a kept past-the-edge one the receiver has now
        acknowledged (judged when it came: see ``_keep_late``); ``low_ttl``: the TTL of its
        direction's first packet, which its own is below (see ``_low_ttl``)."""
        flags = seg.flags
        ts = seg.ts
        sfd = sf.dirs[d]
        conn = sf.conn
        other = sf.dirs[d ^ 1]
        tsval = _tsval(seg) if seg.hdr_len > 20 else None
        if late:
            if other.peer_ack is None or (seg.ack - other.peer_ack) & MASK32 < 0x80000000:
                _take_ack(sfd, other, seg)  # unless a later segment's ack has been taken since
        else:
            if tcp_md5_signed(seg):
                # Linux drops it before anything else (tcp_inbound_hash): no key on an MPTCP socket
                self._unread(conn, sfd, seg, _MD5_UNREAD, ev)
                return
            if flags & SYN:
                self._on_syn(sf, d, seg, o, ev)
                return
            if sf.reset:
                # neither end has a socket for the subflow any more: nothing on it is read (its sender
                # gets an RST back). Bytes the end that sent the RST sends after it are counted and
                # noticed; the other end's, sent before the RST reached it, are only ignored
                if seg.payload_len and sfd.rst:
                    self._unread(conn, sfd, seg, "on a subflow after its sender reset it (no socket takes them)",
                                 ev)
                return
            past = not self._window_ok(sfd, seg, None if conn is None else conn.streams[_DIRS[d ^ sf.flipped]], o.dss)
            if past and not self._may_keep(conn, sfd, seg):
                # judged as a whole: an off-path packet must not move the tracked ack or
                # window, add a mapping, or carry a DATA_ACK that would make us skip real
                # bytes as a "gap" (and then discard them as duplicates)
                if self._bare_past_edge(conn, sfd, seg, o):
                    self.stats.out_of_window += 1  # (ignored, not noticed: see _bare_past_edge)
                else:
                    self._out_of_window(conn, sfd, seg, ev)
                return
            if flags & RST and conn is not None and conn.closed is None and not self._rst_taken(sf, d, seg):
                self._unread(conn, sfd, seg, "an RST off the receiver's next sequence number: Linux answers it with "
                             "a challenge ACK and reads on (RFC 5961 3.2), its options (MP_FASTCLOSE) unread", ev)
                return
            if tsval is not None and not flags & RST and not self._paws_ok(conn, sfd, seg, tsval, ev):
                return  # the receiver drops it whole, options and all (an RST it takes whatever its timestamp)
            if not flags & RST:
                # Linux discards, whole, a segment without ACK, and one whose ACK acknowledges data the
                # receiver never sent or lies more than a window behind its last (tcp_ack; RFC 5961 5.2)
                why = "no ACK flag" if not flags & ACK else self._ack_refused(sf, d, seg)
                if why is not None:
                    self._unread(conn, sfd, seg, why, ev)
                    return
            if low_ttl and not past and self._low_ttl(sf, d, seg, o, low_ttl, ev):
                return  # (kept until the receiver shows it took it, or unread)
            if past:  # judged as it came; read once the receiver shows it took it (see _keep_late)
                if not self._keep_late(sf, d, seg, o, ev):
                    self._out_of_window(conn, sfd, seg, ev)
                return
            if sfd.late is not None and seg.payload_len and not sf.unverified:
                self._late_superseded(conn, sfd, seg, ev)
            if flags & ACK and not flags & RST:  # (Linux reads neither a RST's ACK field nor its window)
                _take_ack(sfd, other, seg)  # this packet's ack/window govern the other direction's data
                if other.ofo is not None:
                    self._ofo_acked(sf, d ^ 1, ts, ev)
                if sf.unverified and other.last_end is not None and (seg.ack - other.last_end) & MASK32 < 0x80000000:
                    sf.unverified = False  # the receiver acknowledged the bytes sent on it: the subflow is real
                if other.late is not None:
                    self._late_acked(sf, d ^ 1, seg, ts, ev)
        if conn is None:
            # a join whose connection is unknown: try again with its data
            if o.dss is not None:
                c, flipped = self._find_by_dsn(o.dss, seg)
                if c is not None and not self._full(c):
                    self._attach(sf, c, flipped ^ bool(d), ts, ev)
                    sf.unverified = not c.pickup  # (a join whose token is not this connection's)
                    conn = c
            if conn is None:
                if seg.payload_len:
                    self.stats.refused["orphan_data"] += 1
                return
        if conn.closed is not None:
            return
        if sf.unverified and not late:
            self._unverified(sf, d, seg, o, ev)
            return
        if not sf.established:
            if sf.role == Role.INITIAL and o.cap is not None and d == 0:  # only the client sends it now
                self._on_cap_ack(conn, sf, o.cap, seg, ev)
            elif sf.role == Role.INITIAL and o is _NO_OPTS and d == 0 and not sf.flipped and conn.opened \
                    and sf.dirs[1].isn is not None and self._keyless(conn, Direction.C2S) and not conn.mapped[0]:
                # v1 handshake ACK with no MPTCP option at all: the server falls back to TCP (Linux:
                # MPCapableFallbackACK), whatever the client sends after it
                self._fall_back(conn, sf, sfd, Direction.C2S,
                                "handshake ACK without MP_CAPABLE: TCP fallback", seg, ts, ev)
            elif sf.role == Role.JOIN and o.join is not None and o.join.phase == m.JoinPhase.ACK:
                self._on_join_ack(conn, sf, o.join, seg, ev)
                if sf.refused:
                    return
            if not sf.established and sf.role != Role.PICKUP and sf.dirs[1].isn is not None:
                sf.established = True  # SYN/ACK seen and now an ACK: the handshake completed
                if sf.role == Role.JOIN:
                    ev.append(SubflowJoined(conn.id, sf.id, ts))
                    self.stats.joins += 1
        cdir = _DIRS[d ^ sf.flipped]
        if o.rare:
            self._rare_options(conn, sf, sfd, cdir, o, seg, ev)
        dss = o.dss
        if conn.fallen and dss is not None:
            dss = None  # after a fallback Linux ignores DSS: bytes go in subflow order
        if flags & RST:
            dss = None  # Linux reads neither an RST's payload nor its DSS (tcp_validate_incoming)
        # bytes the receiver never reads place nothing: an RST's, and those at or after the FIN
        # (Linux discards them, and resets the subflow): else a peer could put bytes in the
        # rebuilt stream that the server never got, ahead of the ones it did
        void = flags & RST or (seg.payload_len and sfd.fin_seq is not None
                               and (seg.seq - sfd.fin_seq) & MASK32 < 0x80000000)
        if dss is not None and dss.data_ack is not None:
            rst = conn.streams[cdir ^ 1]
            ack = dss.data_ack
            if not dss.flags & m.DSS_a and rst.base is not None:
                ack = expand32(ack, rst.base)
            ack = rst.unwrap(ack)  # DSNs wrap at 2**64, stream positions do not
            if not self._ack_unsent(conn, sf, d, rst, ack, seg, ev):
                if rst.acked is None or ack > rst.acked:
                    rst.acked = ack
                if flags & ACK and rst.base is not None:  # the connection-level right edge (see _hold_beyond)
                    we = ack + other.peer_win
                    if rst.wnd_end is None or we > rst.wnd_end:
                        rst.wnd_end = we
                if conn.beyond is not None:
                    self._beyond_acked(conn, Direction(cdir ^ 1), rst.acked, ts, ev)
        fin_kept = False
        if not void:
            n = seg.payload_len
            # a FIN after a hole waits in the receiver's out-of-order queue with its segment, and a
            # copy read first that reaches past it drops it (tcp_ofo_queue): taken at once, the bytes
            # the server then reads past it were void here
            kept = bool(n or flags & FIN) and self._keep_ofo(sf, d, seg, dss, ev)
            fin_kept = kept and bool(flags & FIN)
            if conn.closed is not None:
                return
            if not kept or not n:  # (a bare FIN kept: its options count as it comes, as Linux reads them)
                shed, rn = self.shed_bytes, sfd.rcv_nxt
                self._placing_urgent = bool(n) and (sfd.waits is not None or sfd.refused is not None) \
                    and self._must_take(conn.streams[cdir], sfd, seg)
                try:
                    self._take_data(conn, sf, sfd, cdir, seg, dss, late, ev)
                finally:
                    self._placing_urgent = False
                if n and self.shed_bytes != shed and self.drop_shed and not late:
                    self._limit_dropped(conn, sfd, rn, seg, ev)
                else:
                    if n:
                        _advance_rcv(sfd, seg.seq, (seg.seq + n) & MASK32)  # (its bytes read or not)
                    if sfd.ofo is not None:
                        self._ofo_release(sf, d, ts, ev)  # the hole before them may have filled
        if o.fastclose is not None:
            # Linux takes an MP_FASTCLOSE only when it carries its own (the receiver's) key: a forged
            # one would otherwise end the rebuilt stream while the server reads on
            key = conn.server_key if cdir == Direction.C2S else conn.client_key
            if key is None or o.fastclose.receiver_key == key:
                self._close(conn, Outcome.FASTCLOSE, True, ts, ev)
                return
            self._notice(ev, NoticeType.INVALID_OPTION, conn, "MP_FASTCLOSE with a key that is not the "
                         "receiver's: ignored, as the receiver ignores it", seg)
        if tsval is not None:
            self._keep_ts(sfd, seg, tsval)
        ending = self._ofo_fin
        if flags & (FIN | RST) and not fin_kept:
            if flags & RST:
                sfd.fin = sfd.fin or bool(flags & FIN)
                sf.reset = sfd.rst = True
                if sf.closed_ts is None:
                    sf.closed_ts = ts
            else:
                _take_fin(sf, d, (seg.seq + seg.payload_len) & MASK32, ts)
            ending = True
        s0, s1 = conn.streams
        if (s0.acked is not None and s0.base is not None and s0.acked > s0.base) or (
                s1.acked is not None and s1.base is not None and s1.acked > s1.base):
            self._check_gaps(conn, ts, ev)
        if ending or s0.finished or s1.finished:
            self._ofo_fin = False
            self._check_end(conn, ts, ev)

    def _rare_options(self, conn: Connection, sf: Subflow, sfd: SubflowDir, cdir: Direction, o: "_Opts",
                      seg: TcpSegment, ev: list[Event]) -> None:
        """Everything but DSS: seldom present, kept off the per-packet path."""
        if o.cap is not None and o.cap.data_len is not None and sf.role == Role.INITIAL:
            self._on_cap_data(conn, sfd, cdir, o.cap, seg, ev)
        if o.add_addr is not None and not o.add_addr.echo:
            self._on_add_addr(conn, cdir, o.add_addr, seg, ev)
        if o.remove is not None:
            ann = conn.announced[cdir]
            for i in o.remove.addr_ids:
                gone = ann.pop(i, None)
                if gone is not None:
                    self._unannounce(conn, gone)
        if o.prio is not None:
            sf.backup = o.prio.backup
        if o.fail is not None:
            self._notice(ev, NoticeType.MP_FAIL, conn, f"MP_FAIL dsn {o.fail.dsn}", seg)

    def _on_syn(self, sf: Subflow, d: int, seg: TcpSegment, o: "_Opts", ev: list[Event]) -> None:
        ts = seg.ts
        conn = sf.conn
        sfd = sf.dirs[d]
        if conn is not None and conn.closed is not None:
            return  # a late SYN/ACK of an expired handshake must not re-index (and leak) the closed connection
        if not seg.flags & ACK:  # retransmitted SYN
            if conn is not None and o.cap is not None and o.cap.sender_key is not None \
                    and conn.client_key is not None and o.cap.sender_key != conn.client_key:
                self._notice(ev, NoticeType.KEY_CHANGE, conn, "MP_CAPABLE key changed in SYN retransmission", seg)
            if conn is not None and not conn.opened and len(conn.held) < _MAX_HELD:
                conn.held.append(PassThrough(bytes(seg.ip), seg.ipver, ts))
            return
        if d != 1:
            return
        if sfd.isn is not None and sfd.isn != seg.seq:
            # a SYN/ACK with another ISN than the first: the client took the first (established, it
            # answers a challenge ACK); taken, it moved the sequence space under bytes already kept
            self._unread(conn, sfd, seg, "a SYN/ACK with another ISN than the subflow's (Linux discards it)", ev)
            return
        sfd.isn = seg.seq
        sfd.wscale = _wscale(seg)
        sfd.sack_perm = _sack_perm(seg)
        sfd.ttl = _ttl(seg)
        sfd.ts_recent = _tsval(seg) or 0  # what the client keeps from the SYN/ACK
        if seg.flags & ACK:
            # the server's window for the client's first bytes, unscaled in a SYN (RFC 7323 2.2); see
            # SubflowDir.syn_window
            sf.dirs[0].syn_window = (seg.ack, (seg.ack + seg.window) & MASK32)
        if sf.role == Role.INITIAL and conn is not None and conn.syn_len and conn.syn_taken is None:
            self._syn_data_taken(conn, sf, seg.ack)
        if sf.role == Role.INITIAL and conn is not None and not conn.opened:
            if o.cap is None:
                # the server did not echo MP_CAPABLE: plain TCP from here on
                self._fallback_plain(conn, sf, seg, ev)
                return
            cap = o.cap
            if cap.sender_key is not None:
                if conn.server_key is not None and conn.server_key != cap.sender_key:
                    self._notice(ev, NoticeType.KEY_CHANGE, conn, "server key changed", seg)
                conn.server_key = cap.sender_key
                self._index_token(conn, cap.sender_key)
                self._set_base(conn, Direction.S2C)
            conn.csum = conn.csum or bool(cap.flags & m.CAP_A_CHECKSUM)
            conn.held.clear()
            self._open(conn, ts, ev)
        elif sf.role == Role.JOIN and o.join is not None and o.join.phase == m.JoinPhase.SYN_ACK:
            sf.nonce_r = o.join.nonce
            sf.hmac_r = o.join.hmac
            if conn is not None:
                ki, kr = self._join_keys(conn, sf)
                if ki is not None and kr is not None and sf.nonce_i is not None and o.join.hmac is not None:
                    if not crypto.verify_join_synack(kr, ki, o.join.nonce or 0, sf.nonce_i, o.join.hmac,
                                                     conn.version or 0):
                        self._notice(ev, NoticeType.JOIN_HMAC_FAILURE, conn, "SYN/ACK HMAC", seg)
                        self._refuse(sf, "join_hmac", ts, ev)

    def _join_keys(self, conn: Connection, sf: Subflow) -> tuple[int | None, int | None]:
        """(initiator key, responder key) of a join subflow."""
        if sf.flipped:
            return conn.server_key, conn.client_key
        return conn.client_key, conn.server_key

    def _on_cap_ack(self, conn: Connection, sf: Subflow, cap: m.MpCapable, seg: TcpSegment, ev: list[Event]) -> None:
        if cap.sender_key is None:
            return
        if conn.client_key is not None and cap.sender_key != conn.client_key:
            self._notice(ev, NoticeType.KEY_CHANGE, conn, "client key differs from the SYN", seg)
        if conn.server_key is not None and cap.receiver_key is not None and cap.receiver_key != conn.server_key:
            self._notice(ev, NoticeType.KEY_CHANGE, conn, "server key differs from the SYN/ACK", seg)
        if conn.client_key is None:
            conn.client_key = cap.sender_key
            self._index_token(conn, cap.sender_key)
        if conn.server_key is None and cap.receiver_key is not None:
            conn.server_key = cap.receiver_key
            self._index_token(conn, cap.receiver_key)
            self._set_base(conn, Direction.S2C)
        if conn.syn_len and conn.syn_taken is None and sf.dirs[0].isn is not None \
                and (seg.src, seg.sport) == conn.client:
            # the SYN/ACK went unseen: the client's next sequence number says what the server took
            self._syn_data_taken(conn, sf, seg.seq)
        self._set_base(conn, Direction.C2S)
        sf.established = True
        if not conn.opened:
            self._open(conn, seg.ts, ev)
        if conn.syn_taken:
            self._place_syn_data(conn, seg.ts, ev)

    def _keep_syn_data(self, conn: Connection, seg: TcpSegment) -> None:
        """Hold a Fast Open SYN's payload until the server says whether it took it. It counts
        against the memcap; refused, only its length is kept, and taken it becomes a gap."""
        n = seg.payload_len
        if conn.syn_len:
            return  # a retransmitted SYN: the first one's bytes stand
        conn.syn_len = n
        if self.budget.take(n):
            conn.syn_data = bytes(seg.payload)
        else:
            self.stats.memcap["global"] += 1
            self.shed_bytes += n

    def _syn_data_taken(self, conn: Connection, sf: Subflow, nxt: int) -> None:
        """The server took the SYN's bytes up to (not including) client sequence number ``nxt``
        (its SYN/ACK's ack, or the client's next sequence number). Like Linux
        (``mptcp_fastopen_subflow_synack_set_params``) they then lie outside the subflow's
        mapped sequence space: relative subflow sequence 1 is the byte after them, so the ISN
        the mappings count from moves by that many bytes. Bytes the server did not take are sent
        again after the handshake as ordinary data (and Linux then falls back to TCP)."""
        sfd = sf.dirs[0]
        if sfd.isn is None:
            return
        took = (nxt - sfd.isn - 1) & MASK32
        if not 0 < took <= conn.syn_len:
            took = 0
        conn.syn_taken = took
        if took:
            sfd.isn = (sfd.isn + took) & MASK32
            st = conn.streams[Direction.C2S]
            if st.base is not None and st.base == st.start and not st.released:
                st.base = st.start = (st.base - took) & MASK64  # v0: the key came with the SYN
        if took < conn.syn_len:
            self._drop_syn_data(conn, took)

    def _drop_syn_data(self, conn: Connection, keep: int = 0) -> None:
        if conn.syn_data:
            self.budget.give(len(conn.syn_data) - keep)
            conn.syn_data = conn.syn_data[:keep]
        conn.syn_len = keep

    def _place_syn_data(self, conn: Connection, ts: float, ev: list[Event]) -> None:
        """The bytes the server took from the SYN, at the start of the client->server stream."""
        st = conn.streams[Direction.C2S]
        n, data = conn.syn_len, conn.syn_data
        if st.base is None or not n or st.base != st.start:
            return
        start = st.base
        conn.syn_data, conn.syn_len = b"", 0
        if data:
            self.budget.give(len(data))
            self._deliver(conn, Direction.C2S, start, data, ts, ev)
        else:  # the memcap refused them: a gap of bytes mproxy saw, not a side channel
            st.note_shed(start, start + n)
            self._skip_holes(conn, Direction.C2S, start + n, True, ts, ev)

    def _on_cap_data(self, conn: Connection, sfd: SubflowDir, cdir: Direction, cap: m.MpCapable, seg: TcpSegment,
                     ev: list[Event]) -> None:
        """v1 MP_CAPABLE on the first data packet: an implicit mapping at IDSN+1, SSN 1 (RFC 8684 3.1).
        Placed like any mapping, so data without DSS right after it reads as a fallback."""
        if cap.sender_key is None or not cap.data_len:
            return
        dsn = (crypto.key_idsn(cap.sender_key, conn.version or 1) + 1) & MASK64
        conn.mapped[cdir] = True
        for old in sfd.mappings:
            if old.ssn == 1 and old.dsn == dsn:
                return
        if self._place(conn, sfd, 1, dsn, cap.data_len, seg, ev) != 0:
            return  # contradicts an earlier mapping: the first placement stands, as for a DSS
        cs = cap.checksum if conn.csum and cap.checksum is not None else None
        sfd.mappings.append(Mapping(1, dsn, cap.data_len, False, cs, cap.data_len))

    def _on_join_ack(self, conn: Connection, sf: Subflow, j: m.MpJoin, seg: TcpSegment, ev: list[Event]) -> None:
        ki, kr = self._join_keys(conn, sf)
        if ki is None or kr is None or sf.nonce_i is None or sf.nonce_r is None or j.hmac is None:
            return
        if not crypto.verify_join_ack(ki, kr, sf.nonce_i, sf.nonce_r, j.hmac, conn.version or 0):
            self._notice(ev, NoticeType.JOIN_HMAC_FAILURE, conn, "ACK HMAC", seg)
            self._refuse(sf, "join_hmac", seg.ts, ev)

    def _refuse(self, sf: Subflow, reason: str, ts: float, ev: list[Event]) -> None:
        """Detach a subflow that failed verification: the endpoint will reset it, and its bytes must
        never reach the rebuilt stream (a forged join is an injection attempt)."""
        self._detach(sf)
        sf.closed_ts = ts
        self._orphans[sf.id] = sf
        self.stats.refused[reason] += 1
        ev.append(SubflowRefused(reason, ts))

    def _detach(self, sf: Subflow) -> None:
        """Take a subflow out of its connection for good: what it buffers goes back, and its later
        packets are ignored (``refused``)."""
        sf.refused = True
        self._release_subflow(sf)
        if sf.conn is not None and sf in sf.conn.subflows:
            sf.conn.subflows.remove(sf)
        sf.conn = None

    def subflow_of(self, seg: TcpSegment) -> tuple[Subflow, int] | None:
        """The tracked subflow (and direction index) a segment belongs to, if any."""
        return self._sf.get((seg.src, seg.sport, seg.dst, seg.dport))

    def join_target(self, token: int, dst: bytes) -> Connection | None:
        """The live connection an MP_JOIN with ``token`` sent to ``dst`` would join."""
        return self._find_by_token(token, dst)[0]

    def _on_add_addr(self, conn: Connection, cdir: Direction, a: m.AddAddr, seg: TcpSegment, ev: list[Event]) -> None:
        ann = conn.announced[cdir]
        prev = ann.get(a.addr_id)
        if prev is not None:
            if prev != (a.address, a.port):
                self._notice(ev, NoticeType.ADD_ADDR_ID_REUSE, conn,
                             f"address id {a.addr_id} re-used for {addr_text(a.address)} (was "
                             f"{addr_text(prev[0])})", seg)
            else:
                # the same announcement again: Linux retransmits ADD_ADDR until it is echoed, so
                # this is normal protocol behaviour -- counted, never a notice
                conn.add_addr_repeats += 1
                self.stats.add_addr_repeats += 1
        ann[a.addr_id] = (a.address, a.port)
        if prev is not None and prev != (a.address, a.port):
            self._unannounce(conn, prev)
        at = self._announcers.setdefault((a.address, a.port), {})
        at.pop(conn.id, None)
        self._announcements += 1
        at[conn.id] = (self._announcements, conn)  # announced (again) last

    def _unannounce(self, conn: Connection, entry: tuple[bytes, int | None], ended: bool = False) -> None:
        """``entry`` left ``conn``'s announcements (or ``conn`` ``ended``): out of the index unless it
        still announces it."""
        if not ended and any(entry in ann.values() for ann in conn.announced):
            return
        _unindex(self._announcers, entry, conn.id)

    def _open(self, conn: Connection, ts: float, ev: list[Event]) -> None:
        conn.opened = True
        conn.held.clear()
        self._half_open.pop(conn.id, None)
        ev.append(ConnectionOpened(conn.id, ts))

    def _full(self, conn: Connection) -> bool:
        """Is the connection at its subflow limit? Ended subflows make room: Linux limits the live
        ones, so a connection may reset its subflows and join new ones any number of times (see
        _check_end), and a limit counting every subflow ever joined let the joins past it carry
        bytes the IDS never read. The oldest ended join leaves the connection's list (its record's
        ``subflows``; ``subflows_retired`` counts them) and lingers as a closed connection's do,
        its late packets ignored."""
        sfs = conn.subflows
        if len(sfs) < self.config.max_subflows_per_connection:
            return False
        for sf in sfs:
            if sf.closed_ts is not None and sf.role != Role.INITIAL:
                self._detach(sf)  # (its late packets are ignored, as a closed 4-tuple's are)
                conn.retired += 1
                self._lingering.append((sf.closed_ts, sf))
                return False
        return True

    def _attach(self, sf: Subflow, conn: Connection, flipped: bool, ts: float, ev: list[Event]) -> None:
        sf.conn = conn
        sf.flipped = flipped
        conn.subflows.append(sf)
        conn.dormant = None
        self._orphans.pop(sf.id, None)
        ev.append(SubflowJoined(conn.id, sf.id, ts))
        self.stats.joins += 1

    def _fallback_plain(self, conn: Connection, sf: Subflow, seg: TcpSegment, ev: list[Event]) -> None:
        ev.extend(conn.held)
        conn.held.clear()
        ev.append(PassThrough(bytes(seg.ip), seg.ipver, seg.ts))
        sf.plain = True
        self._release_subflow(sf)  # it leaves the connection's list; _forget gives back the rest
        conn.subflows.remove(sf)
        sf.conn = None
        conn.closed = Outcome.FALLBACK
        self.stats.outcomes[Outcome.FALLBACK.value] += 1
        self._forget(conn)

    # -- mappings and payload -------------------------------------------------
    def _on_mapping(self, conn: Connection, sf: Subflow, sfd: SubflowDir, cdir: Direction, dss: m.Dss,
                    seg: TcpSegment, ev: list[Event], late: bool = False) -> int | None:
        """Take a DSS mapping. Returns how many of the segment's first bytes not to read (0 but when
        the mapping's head keeps an earlier placement: see _place), None when it contradicts an
        earlier one (the segment's bytes are ignored).
        ``late``: of a kept past-the-edge segment the receiver has now acknowledged (see _keep_late)."""
        st = conn.streams[cdir]
        skip = 0
        dsn = dss.dsn or 0
        if not dss.dsn64:
            if st.base is not None:
                dsn = expand32(dsn, st.base)
        dll = dss.dll or 0
        ssn = dss.ssn or 0
        if seg.payload_len and not late and not self._window_ok(sfd, seg, st, dss):
            return 0  # an off-path insertion must not plant mappings; its bytes are refused later
        conn.mapped[cdir] = True
        if dss.data_fin:
            if dll == 1 and ssn == 0:  # bare DATA_FIN: consumes one DSN, no payload
                st.set_fin(st.unwrap(dsn))
                self._after_fin(conn, cdir, seg.ts, ev)
                return 0
            if dll >= 1:
                st.set_fin(st.unwrap(dsn) + dll - 1)
        if dll == 0:
            if not any(mp.infinite for mp in sfd.mappings):
                self._notice(ev, NoticeType.INFINITE_MAPPING, conn, f"infinite mapping at dsn {dsn}", seg)
            mp = Mapping(ssn, dsn, 0, True)
            if self._alone(conn, sf):
                conn.fallen = True  # RFC 8684 3.7: no more DSS from here on; Linux ignores any that come
        else:
            length = dll - (1 if dss.data_fin else 0)
            if length <= 0:
                self._after_fin(conn, cdir, seg.ts, ev)
                return 0
            known = _known_mapping(sfd, ssn, dsn, length)
            if known is not None:
                mp = known
            else:
                cut = self._place(conn, sfd, ssn, dsn, length, seg, ev, not conn.csum and sfd.isn is not None)
                if cut is None:
                    return None  # the first placement of these subflow bytes stands
                if cut:  # ... for the mapping's head: the rest is the subflow's current mapping
                    ssn, dsn, length, dll = (ssn + cut) & MASK32, (dsn + cut) & MASK64, length - cut, dll - cut
                    rel = (seg.seq - (sfd.isn or 0)) & MASK32
                    skip = min((ssn - rel) & MASK32, seg.payload_len) if 0 < (ssn - rel) & MASK32 < 0x80000000 else 0
                known = _known_mapping(sfd, ssn, dsn, length) if cut else None  # (the trimmed one, kept)
                if known is not None:
                    mp = known
                else:
                    cs = dss.checksum if conn.csum and dss.checksum is not None else None
                    mp = Mapping(ssn, dsn, length, False, cs, dll)
                    sfd.mappings.append(mp)
                    if len(sfd.mappings) > _MAX_MAPPINGS:
                        self._evict_mapping(sfd)
            if sfd.isn is None:
                self._sync_pickup(sfd, seg, mp)
        if mp.infinite:
            sfd.mappings.append(mp)
        sfd.last_map_ssn = ssn
        if sfd.pending and sfd.isn is not None:
            self._resolve_pending(conn, sfd, cdir, seg.ts, ev)
        if sfd.shed:
            self._place_shed(conn, sfd, cdir, mp.ssn, mp.dsn, None if mp.infinite else mp.length)
        return skip

    def _sync_pickup(self, sfd: SubflowDir, seg: TcpSegment, mp: Mapping) -> None:
        """Infer the ISN of a subflow seen mid-stream from a segment that starts a mapping."""
        starts = seg.payload_len == mp.length or (
            sfd.last_map_ssn is not None and sfd.last_map_ssn != mp.ssn and sfd.last_end == seg.seq)
        if starts and seg.payload_len:
            sfd.isn = (seg.seq - mp.ssn) & MASK32

    def _window_ok(self, sfd: SubflowDir, seg: TcpSegment, st: DataStream | None = None,
                   dss: m.Dss | None = None) -> bool:
        """Does the segment lie inside the receiver's TCP window (no side effects)? ``st`` and
        ``dss``: its direction's stream and its DSS, for the connection-level window (_into_closed)."""
        if not self.config.window_check:
            return True
        pa, edge = sfd.peer_ack, sfd.edge
        if pa is None:
            if sfd.syn_window is None:
                return True
            pa, edge = sfd.syn_window
        off = (seg.seq - pa) & MASK32
        if off >= 0x80000000:
            off -= 0x100000000
        win = max(sfd.peer_win, 65535)
        if off < -(2 * win + 65535):
            return False  # long before the acknowledged point (old bytes are compared as copies before that)
        # Linux drops a segment that starts past the right edge it advertised (tcp_sequence), and data
        # that starts at it (tcp_data_queue: over the window, or a zero window at its next byte); that
        # edge never shrinks, and the gateway sees each advertisement before the sender can use it
        if edge is None:
            return True
        past = (seg.seq - edge) & MASK32
        if past >= 0x80000000:
            # (before the edge: in the window unless it is closed, at both levels)
            return not _into_closed(sfd, seg, st, dss)
        if not past and not seg.payload_len and not seg.flags & FIN:
            return True  # (a bare ACK at the edge, which tcp_sequence lets through)
        # ... unless it starts at or before the receiver's next byte: tcp_sequence allows rcv_nxt plus
        # a window of 0. An MPTCP sender gets there on one subflow with the connection-level window
        # another subflow advertised (Linux raises the subflow's send window to it); the data of such
        # a segment is dropped for the zero window, a bare one (ACK, FIN, DATA_FIN) is read. A FIN at
        # the edge past that byte is over the window (tcp_data_queue), as data is
        if seg.payload_len:
            return False
        nxt = _receiver_next(sfd, pa)
        assert nxt is not None  # (pa is not None)
        return (nxt - seg.seq) & MASK32 < 0x80000000

    def _paws_ok(self, conn: Connection | None, sfd: SubflowDir, seg: TcpSegment, tsval: int,
                 ev: list[Event]) -> bool:
        """PAWS (RFC 7323), as Linux applies it: a segment with data (not an RST) whose TSval is
        older, by more than one, than the last one the receiver kept is dropped whole. Else a peer
        could send bytes with a stale timestamp that the server drops and the IDS would read,
        ahead of the bytes the server does read."""
        tr = sfd.ts_recent
        if not tr or not seg.payload_len or seg.flags & RST or not 1 < (tr - tsval) & MASK32 < 0x80000000:
            return True
        self.stats.out_of_window += 1
        if not sfd.oow_noticed:
            sfd.oow_noticed = True
            self._notice(ev, NoticeType.OUT_OF_WINDOW, conn, f"{seg.payload_len} bytes with timestamp {tsval}, older "
                         f"than the receiver's last ({tr}): dropped by PAWS", seg)
        return False

    @staticmethod
    def _keep_ts(sfd: SubflowDir, seg: TcpSegment, tsval: int) -> None:
        """The receiver keeps a TSval not older than its last from a segment it takes that starts at or
        before the point it last acknowledged and does not end before it (Linux
        tcp_replace_ts_recent, after tcp_sequence). The gateway's view of that point lags the
        receiver's, so the TSval kept here is never newer than the receiver's: PAWS here drops no
        segment the receiver would take."""
        pa = sfd.peer_ack
        if pa is not None and (tsval - sfd.ts_recent) & MASK32 < 0x80000000 \
                and (pa - seg.seq) & MASK32 < 0x80000000 and (seg.seq + seg.payload_len - pa) & MASK32 < 0x80000000:
            sfd.ts_recent = tsval

    def _ack_unsent(self, conn: Connection, sf: Subflow, d: int, st: DataStream, ack: int, seg: TcpSegment,
                    ev: list[Event]) -> bool:
        """Does this DATA_ACK (a stream position of ``st``, the other direction) acknowledge data its
        sender cannot have sent? Linux's sender ignores such a DATA_ACK (ack_update_msk: past its
        snd_nxt), and so does mproxy, but it does not know what was sent on paths it does not see (a
        side channel, which such an ack reveals): only an ack further past the furthest byte seen
        from that sender, or the furthest right edge its receiver advertised, than the largest TCP
        window plus what ``_MAX_RATE`` could have carried since the connection began is ignored.
        Taken, one (a forged DATA_ACK of 0) skipped 2**60 bytes as a side channel, which
        ``on_side_channel`` may act on, and pushed the record's ``acked_bytes`` there. (The fast
        path makes the first test inline, and calls this only past it.)"""
        if st.base is None or ack - st.base <= _MAX_WINDOW:
            return False  # within a window of the next byte to read: nothing further to weigh
        seen = st.furthest()
        if seen is None:
            return False
        if st.wnd_end is not None and st.wnd_end > seen:
            seen = st.wnd_end
        ahead = ack - seen
        if ahead <= _MAX_WINDOW + _MAX_RATE * max(0.0, seg.ts - conn.ts):
            return False
        sfd = sf.dirs[d]
        if not sfd.unsent_ack_noticed:
            sfd.unsent_ack_noticed = True
            self._notice(ev, NoticeType.INVALID_OPTION, conn, f"DATA_ACK {ahead} bytes past anything its "
                         "sender can have sent: ignored, as the sender ignores it", seg)
        return True

    @staticmethod
    def _ack_refused(sf: Subflow, d: int, seg: TcpSegment) -> str | None:
        """Why the receiver discards this segment for its ACK field, None when it does not (Linux
        tcp_ack: an ACK of data it never sent; one before its last acknowledged point by more than
        the largest window its peer advertised or than the bytes it has had acknowledged, RFC 5961
        5.2). The receiver's view is the gateway's:
        its last acknowledged point is the sender's last ACK seen, and what it sent is bounded by
        that plus the largest window the sender advertised, or by the furthest sequence seen from
        it -- never tighter than the receiver's own, so no segment it takes is refused, whatever
        packets a capture lost."""
        other = sf.dirs[d ^ 1]
        una = other.peer_ack
        mw = other.max_win
        if una is None or not mw or not sf.established:
            return None
        back = (una - seg.ack) & MASK32
        if back < 0x80000000:
            # Linux bounds the look-back by the bytes the receiver has had acknowledged too (its
            # SYN counts when it opened the subflow): on a subflow it sent nothing on, any ACK behind
            # its last is too old. Past 2 GiB the count is taken as large.
            if other.isn is not None:
                acked = (una - other.isn - (d == 0)) & MASK32
                if acked < 0x80000000 and acked < mw:
                    mw = acked
            return None if back <= mw else f"ack {back} bytes behind the receiver's last, more than it may " \
                                            f"look back ({mw})"
        ahead = (seg.ack - una) & MASK32
        end = other.last_end
        for kept in other.late or ():  # sent too, kept until the receiver acknowledges them
            if end is None or 0 < (kept.end - end) & MASK32 < 0x80000000:
                end = kept.end
        if ahead <= mw + 1 or end is not None and (end + 1 - seg.ack) & MASK32 < 0x80000000:
            return None
        return f"ack {ahead} bytes past the receiver's last acknowledged point: data it never sent"

    def _unread(self, conn: Connection | None, sfd: SubflowDir | None, seg: TcpSegment, why: str,
                ev: list[Event]) -> None:
        """A segment the receiver discards whole: counted with the out-of-window ones, noticed once per
        subflow direction (each time when it belongs to none)."""
        self.stats.out_of_window += 1
        if sfd is None or not sfd.oow_noticed:
            if sfd is not None:
                sfd.oow_noticed = True
            self._notice(ev, NoticeType.OUT_OF_WINDOW, conn, f"{seg.payload_len} bytes discarded: {why}", seg)

    @staticmethod
    def _window_text(sfd: SubflowDir, seg: TcpSegment) -> str:
        off = (seg.seq - (sfd.peer_ack or 0)) & MASK32
        if off >= 0x80000000:
            off -= 0x100000000
        edge = "" if sfd.edge is None else f", right edge at {(sfd.edge - (sfd.peer_ack or 0)) & MASK32:+d}"
        closed = " (closed at the receiver's next byte)" if _into_closed(sfd, seg) else ""
        return f"{seg.payload_len} bytes at {off:+d} from the acked point, window {sfd.peer_win}{closed}{edge}"

    def _out_of_window(self, conn: Connection | None, sfd: SubflowDir, seg: TcpSegment, ev: list[Event],
                       detail: str | None = None) -> None:
        """Subflow check: only bytes inside the receiver's TCP window count (off-path insertion guard);
        this segment's do not. Counted; noticed once per subflow direction."""
        self.stats.out_of_window += 1
        if not sfd.oow_noticed:
            sfd.oow_noticed = True
            self._notice(ev, NoticeType.OUT_OF_WINDOW, conn, detail or self._window_text(sfd, seg), seg)

    def _unverified(self, sf: Subflow, d: int, seg: TcpSegment, o: "_Opts", ev: list[Event]) -> None:
        """A segment (its TCP checks passed, its ACK taken) of a subflow first seen mid-stream and
        attached by its DSNs to a connection whose handshake was seen. Linux reads data only on
        subflows whose join it accepted; a made-up "subflow" carrying the next DSNs with other bytes
        (the server answers it with a RST) was what the IDS read, while the server read the real
        subflow's bytes. Nothing shows the subflow is real until its receiver acknowledges bytes on
        it, so its data segments are kept as past-the-edge ones are (``_keep_late``: the receiver's
        ACK of them takes them, and verifies the subflow) and its other MPTCP signals (DATA_ACK,
        DATA_FIN, addresses) count for nothing until then. A RST from the receiver refuses them."""
        conn = sf.conn
        assert conn is not None
        sfd = sf.dirs[d]
        if seg.flags & RST:
            for dd in (d, d ^ 1):
                for kept in list(sf.dirs[dd].late or ()):
                    self._late_refused(conn, sf.dirs[dd], kept, "its subflow was reset before the receiver "
                                       "acknowledged bytes on it", ev, seg.ts)
            return
        if not seg.payload_len:
            return
        end = (seg.seq + seg.payload_len) & MASK32
        if sfd.last_end is None or (end - sfd.last_end) & MASK32 < 0x80000000:
            sfd.last_end = end  # (the receiver's ACK there verifies the subflow)
        why = f"{seg.payload_len} bytes on a subflow whose handshake was not seen, attached mid-stream by its DSNs"
        if not self._keep_late(sf, d, seg, o, ev, why):
            self._out_of_window(conn, sfd, seg, ev, why + ": over the limit for bytes kept until the receiver "
                                "acknowledges them")

    # -- past the right edge ------------------------------------------------------------------
    @staticmethod
    def _may_keep(conn: Connection | None, sfd: SubflowDir, seg: TcpSegment, edge: bool = True) -> bool:
        """Is this segment, outside the receiver's window, one ``_keep_late`` may keep: data (no RST)
        of a live connection starting past the right edge, by less than twice the largest window
        the receiver has offered (further is not a sender's doing)? ``edge=False``: wherever it
        starts (one with a low TTL)."""
        return conn is not None and conn.closed is None and bool(seg.payload_len) and not seg.flags & RST \
            and (not edge or Tracker._overshoot(sfd, seg) or _into_closed(sfd, seg))

    @staticmethod
    def _overshoot(sfd: SubflowDir, seg: TcpSegment) -> bool:
        """Does the segment start at or past the right edge its receiver advertised, by less than twice
        the largest window it has offered (as far as a sender's overshoot reaches)?"""
        edge, pa = sfd.edge, sfd.peer_ack
        if pa is None and sfd.syn_window is not None:
            pa, edge = sfd.syn_window
        if edge is None or pa is None or (seg.seq - edge) & MASK32 >= 0x80000000:
            return False
        return (seg.seq - pa) & MASK32 <= 2 * max(sfd.max_win, 65535)

    @staticmethod
    def _bare_past_edge(conn: Connection | None, sfd: SubflowDir, seg: TcpSegment, o: "_Opts") -> bool:
        """A segment with nothing to read (no payload, SYN, FIN, RST or DATA_FIN) past the right edge
        as far as ``_may_keep`` allows data: a sender's bare ACK after the data it sent past the edge
        the gateway last saw (lab, Fast Open through the tbf queue: 13.7 kB past it), which the
        receiver, its window grown meanwhile, takes. Its ACK and DATA_ACK are ignored all the same
        (later packets carry newer ones), but it raises no ``out_of_window``: it inserts nothing."""
        return conn is not None and not seg.payload_len and not seg.flags & (SYN | FIN | RST) \
            and (o.dss is None or not o.dss.flags & m.DSS_F) and Tracker._overshoot(sfd, seg)

    def _keep_late(self, sf: Subflow, d: int, seg: TcpSegment, o: "_Opts", ev: list[Event],
                   why: str | None = None) -> bool:
        """A data segment that starts past the right edge the gateway last saw its receiver advertise
        (``_may_keep``), and that passed the checks the receiver makes as it comes (PAWS, its ACK field).

        The receiver may take it all the same, because its window grew in an ACK still on its way:
        an MPTCP sender uses on one subflow the connection-level window advertised on another
        (Linux raises the subflow's send window to it, MPTCP_MIB_SNDWNDSHARED), so it sends past
        the edge this subflow advertised, and by the time the segment arrives that edge has often
        moved (lab: fragments, every few runs). Which happened shows later: the receiver's
        acknowledgement of these subflow bytes (or DATA_ACK of their DSNs) before any other copy
        of them came means it took this copy. So the segment is kept, judged as it came (PAWS, its
        ACK field), until then; another copy first, or the connection's end, refuses it.

        False: not kept (over a limit): refused now."""
        conn = sf.conn
        assert conn is not None  # (_may_keep)
        sfd = sf.dirs[d]
        n = seg.payload_len
        if sfd.late_bytes + n > 2 * max(sfd.max_win, 65535) or sfd.late is not None and len(sfd.late) >= _MAX_LATE:
            return False
        st = conn.streams[_DIRS[d ^ sf.flipped]]
        dsn = None if conn.fallen else _mapped_dsn(st, o.dss, sfd.isn, seg.seq, n)
        cost = len(seg.ip) + PIECE_COST
        if not self.budget.take(cost):
            # shed like any bytes the memcap keeps out (inline, on_memcap = "drop" drops the packet)
            self._shed(conn, "global", n, f"buffered bytes over the memcap ({self.budget.limit})", seg.ts, ev, seg)
            if dsn is not None:
                st.note_shed(dsn, dsn + n)
            return True
        nxt = _receiver_next(sfd, sfd.peer_ack)
        kept = _Late(seg.seq, (seg.seq + n) & MASK32, replace(seg, ip=memoryview(bytes(seg.ip))), o, dsn,
                     0 if nxt is None else _old_head(nxt, seg), _furthest_seen(sfd), cost,
                     why or self._window_text(sfd, seg))
        if sfd.late is None:
            sfd.late = []
        sfd.late.append(kept)
        sfd.late_bytes += n
        conn.late += 1
        return True

    def _late_drop(self, conn: Connection | None, sfd: SubflowDir, kept: _Late) -> None:
        """Forget a kept segment (its memcap share goes back)."""
        late = sfd.late
        if late is not None:
            late.remove(kept)
            if not late:
                sfd.late = None
        sfd.late_bytes -= kept.seg.payload_len
        if conn is not None:
            conn.late -= 1
        self.budget.give(kept.cost)

    def _late_refused(self, conn: Connection | None, sfd: SubflowDir, kept: _Late, why: str,
                      ev: list[Event], ts: float) -> None:
        """A kept segment the receiver did not take: out of window after all."""
        self._late_drop(conn, sfd, kept)
        self._out_of_window(conn, sfd, replace(kept.seg, ts=ts), ev, f"{kept.why}: {why}")

    def _late_superseded(self, conn: Connection | None, sfd: SubflowDir, seg: TcpSegment, ev: list[Event]) -> None:
        """An in-window segment carries subflow bytes a kept one has: the receiver reads them from this
        one (the kept copy was dropped, or this is a duplicate of the same bytes; a sender resends
        a segment only when no acknowledgement came for it)."""
        end = (seg.seq + seg.payload_len) & MASK32
        for kept in list(sfd.late or ()):
            if (kept.seq - end) & MASK32 >= 0x80000000 and (seg.seq - kept.end) & MASK32 >= 0x80000000:
                self._late_refused(conn, sfd, kept, "another copy of its subflow bytes came before the receiver "
                                   "acknowledged them", ev, seg.ts)

    def _late_acked(self, sf: Subflow, d: int, seg: TcpSegment, ts: float, ev: list[Event]) -> None:
        """The receiver of direction ``d`` acknowledged subflow bytes up to ``seg.ack``: the kept
        segments whose new bytes start before it were taken (it takes a segment whole or not at
        all, and no other copy came). They are read now, in the order they came.

        A kept segment after a hole it does not reach was dropped when the ACK acknowledges bytes
        that passed the gateway after it (so the receiver sent it after it had the segment: one
        path, in order) and, SACK negotiated, holds no SACK block above its acknowledgement (the
        receiver holds nothing out of order). Lab: BENIGN ten bytes after a join's next byte into
        a closed window, then the client's own bytes there, kept too (past the furthest edge the
        join advertised) and taken by the receiver: one ACK covered both, and BENIGN, the first
        to come, was read."""
        sfd = sf.dirs[d]
        ack = seg.ack
        syn, synack = sf.dirs
        # the evidence that the receiver holds nothing out of order: SACK negotiated, no block above
        # the acknowledgement, and no acknowledgement past the furthest byte seen (the capture's loss)
        empty = syn.sack_perm and (synack.sack_perm or synack.isn is None) \
            and (_furthest_seen(sfd) - ack) & MASK32 < 0x80000000 and not _holds_ofo(seg)
        for kept in list(sfd.late or ()):
            if kept not in (sfd.late or ()):
                continue  # (refused or taken with an earlier one)
            if empty and 0 < (kept.seq - ack) & MASK32 < 0x80000000 and 0 < (ack - kept.after) & MASK32 < 0x80000000:
                self._late_refused(sf.conn, sfd, kept, "the receiver acknowledged bytes that came after it and "
                                   "holds none out of order", ev, ts)
                continue
            if 0 < (ack - kept.seq - kept.skip) & MASK32 < 0x80000000:
                if 0 < (kept.end - ack) & MASK32 < 0x80000000:
                    # acknowledged to a point inside it. Another kept copy of its bytes that the ACK
                    # covers whole is the one the receiver took, as it takes a segment whole (lab: a
                    # probe at the next byte of a closed window, taken once the window opened, after
                    # BENIGN there was dropped). Without one, an ACK past its end decides: a GSO or GRO
                    # packet is acknowledged segment by segment
                    if any(other is not kept and 0 < (ack - other.seq - other.skip) & MASK32 < 0x80000000
                           and (ack - other.end) & MASK32 < 0x80000000 and _overlap(other, kept)
                           for other in sfd.late or ()):
                        self._late_refused(sf.conn, sfd, kept, "the receiver took another copy of its bytes", ev, ts)
                    continue
                sf.unverified = False  # the receiver took bytes on it: the subflow is real
                self._late_take(sf, d, kept, ts, ev)

    def _late_dsn_acked(self, conn: Connection, cdir: Direction, limit: int, ts: float, ev: list[Event]) -> None:
        """The receiver DATA_ACKed stream positions up to ``limit`` that the stream lacks: a kept segment
        whose bytes (by its own mapping) fill only such a hole is the copy it took -- its subflow's
        ACK may come later, on a subflow the receiver answers second. One whose positions the
        stream has from another copy is left to its subflow's ACK: the receiver may have read that
        other copy, which came inside its window."""
        st = conn.streams[cdir]
        for sf in list(conn.subflows):
            d = int(cdir) ^ sf.flipped
            sfd = sf.dirs[d]
            for kept in list(sfd.late or ()):
                if kept.dsn is not None and kept.dsn + kept.skip < limit \
                        and st.lacks(kept.dsn + kept.skip, kept.dsn + kept.seg.payload_len) \
                        and sfd.late is not None and kept in sfd.late:
                    self._late_take(sf, d, kept, ts, ev)

    def _late_take(self, sf: Subflow, d: int, kept: _Late, ts: float, ev: list[Event]) -> None:
        self._late_drop(sf.conn, sf.dirs[d], kept)
        if sf.conn is None or sf.conn.closed is not None:
            return
        self.stats.past_edge_taken += 1
        held, self._placing_held = self._placing_held, True  # (let through when it came: see _ofo_release)
        try:
            self._on_segment(sf, d, replace(kept.seg, ts=ts), kept.opts, ev, late=True)
        finally:
            self._placing_held = held

    def _late_end(self, conn: Connection, ts: float, ev: list[Event]) -> None:
        """The connection ends: kept segments never acknowledged were not taken."""
        for held in list(conn.beyond or ()):
            self._beyond_refused(conn, held, "never acknowledged by the receiver", ts, ev)
        for sf in conn.subflows:
            for sfd in sf.dirs:
                for kept in list(sfd.late or ()):
                    self._late_refused(conn, sfd, kept, "never acknowledged by the receiver", ev, ts)

    # -- past the connection-level window ------------------------------------------------------
    def _hold_beyond(self, conn: Connection, cdir: Direction, pos: int, data: memoryview | bytes, ts: float,
                     ev: list[Event]) -> bool:
        """Out-of-order data (it starts after the next byte to release) whose end lies past the
        connection-level window the gateway saw the receiver advertise: the highest DATA_ACK plus
        the window of the packet carrying it (``DataStream.wnd_end``).

        Linux drops such data (mptcp_data_queue_ofo: past ``rcv_wnd_sent``, MIB NoDSSInWindow);
        its subflow still acknowledges the segment. Placed, a forged copy far ahead would be what
        the IDS reads at those DSNs while the receiver reads the real bytes that come later. But
        the edge seen here lags the receiver's (it never pulls its edge back, and it grows in ACKs
        still on their way), so senders do put data past it that the receiver takes (a plain
        check here refused such bytes in five lab scenarios: Fast Open, IPv6, workers). So the data is
        kept aside, and read when the receiver DATA_ACKs its first byte (it takes an skb whole or
        not at all); refused when the connection ends first, or when another copy of its DSNs
        with other bytes comes inside the window (the receiver reads that one: a sender resends
        DSNs only when they were not acknowledged). Identical copies leave it be: that is a
        reinjection. Until then the stream waits at it, a round trip more for the IDS.

        False: over the limits for kept data (256 pieces a connection, the out-of-order limit a
        direction): placed at once, as any out-of-order data. The edge seen here can trail the
        sender's by a large window, and refusing what a receiver took would lose it for the IDS;
        a forged copy placed so raises ``overlap_mismatch`` when the real bytes come."""
        n = len(data)
        held = conn.beyond
        if held is not None and (len(held) >= _MAX_LATE or sum(
                len(h.data) for h in held if h.cdir == cdir) + n > conn.streams[cdir].ooo_limit):
            self.stats.past_window_placed += 1
            return False
        cost = n + PIECE_COST
        if not self.budget.take(cost):
            # shed like any bytes the memcap keeps out (inline, on_memcap = "drop" drops the packet)
            self._shed(conn, "global", n, f"buffered bytes over the memcap ({self.budget.limit})", ts, ev)
            conn.streams[cdir].note_shed(pos, pos + n)
            return True
        if held is None:
            held = conn.beyond = []
        held.append(_Beyond(cdir, pos, bytes(data), cost, pos + n - (conn.streams[cdir].wnd_end or 0)))
        conn.late += 1
        return True

    def _beyond_drop(self, conn: Connection, held: _Beyond) -> None:
        """Forget kept data (its memcap share goes back)."""
        lst = conn.beyond
        if lst is not None:
            lst.remove(held)
            if not lst:
                conn.beyond = None
        conn.late -= 1
        self.budget.give(held.cost)

    def _beyond_acked(self, conn: Connection, cdir: Direction, acked: int | None, ts: float,
                      ev: list[Event]) -> None:
        """The receiver of ``cdir`` DATA_ACKed up to ``acked``: kept data starting before it was taken."""
        if acked is None:
            return
        for held in list(conn.beyond or ()):
            if held.cdir == cdir and held.dsn < acked and conn.beyond is not None and held in conn.beyond:
                self._beyond_take(conn, held, ts, ev)

    def _beyond_covered(self, conn: Connection, cdir: Direction) -> None:
        """The stream has read past kept data from other copies, which matched it (a copy with other
        bytes refuses it as it comes): whichever the receiver took, nothing is left to decide."""
        st = conn.streams[cdir]
        base = st.base
        for held in list(conn.beyond or ()):
            if held.cdir == cdir and base is not None and held.dsn + len(held.data) <= base:
                self._beyond_drop(conn, held)
                st.duplicate_bytes += len(held.data)

    def _beyond_take(self, conn: Connection, held: _Beyond, ts: float, ev: list[Event]) -> None:
        """The receiver DATA_ACKed kept data's first byte: it took it. Placed now, as it arrives."""
        self._beyond_drop(conn, held)
        self.stats.past_window_taken += 1
        self._deliver(conn, held.cdir, held.dsn, held.data, ts, ev, taken=True)

    def _beyond_refused(self, conn: Connection, held: _Beyond, why: str, ts: float, ev: list[Event]) -> None:
        """Kept data the receiver did not take: counted, noticed once per connection direction."""
        self._beyond_drop(conn, held)
        self.stats.out_of_window += 1
        bit = 1 << held.cdir
        if not conn.beyond_noticed & bit:
            conn.beyond_noticed |= bit
            start = conn.streams[held.cdir].start or 0
            self._notice(ev, NoticeType.OUT_OF_WINDOW, conn,
                         f"{len(held.data)} bytes at stream offset {held.dsn - start} ended {held.over} bytes past "
                         f"the connection-level window the receiver had advertised when they came: {why}", None, ts)

    def _beyond_superseded(self, conn: Connection, cdir: Direction, pos: int, data: memoryview | bytes,
                           ts: float, ev: list[Event]) -> None:
        """Another copy of kept data's DSNs, inside the window: where the bytes differ, the receiver
        reads this one (see _hold_beyond)."""
        end = pos + len(data)
        for held in list(conn.beyond or ()):
            lo, hi = max(pos, held.dsn), min(end, held.dsn + len(held.data))
            if held.cdir == cdir and lo < hi and \
                    bytes(data[lo - pos : hi - pos]) != held.data[lo - held.dsn : hi - held.dsn]:
                self._beyond_refused(conn, held, "another copy of its DSNs, with other bytes, came inside the "
                                     "window before the receiver acknowledged them", ts, ev)

    @staticmethod
    def _seen(sfd: SubflowDir, seg: TcpSegment) -> None:
        n = seg.payload_len
        end = (seg.seq + n) & MASK32
        if sfd.last_end is None or ((end - sfd.last_end) & MASK32) < 0x80000000:
            sfd.last_end = end
        _advance_rcv(sfd, seg.seq, end)
        sfd.bytes += n

    def _place(self, conn: Connection, sfd: SubflowDir, ssn: int, dsn: int, length: int, seg: TcpSegment,
               ev: list[Event], trim: bool = False) -> int | None:
        """Record where a mapping puts subflow bytes. Returns how many of its first bytes keep an
        earlier, other placement (0: none), or None when it is refused whole.

        A TCP receiver keeps the first copy of subflow bytes and the Linux MPTCP receiver resets a
        subflow whose mapping contradicts the current one (MIB DSSNoMatch); honouring a second
        placement would let one copy land twice in the rebuilt stream -- an evasion. So the first
        placement stands and a ``bad_mapping`` notice is raised (once per subflow direction).
        ``trim``: when the earlier placements cover only the mapping's head, the rest is placed.
        That is what Linux reads when the earlier bytes came in subflow order (a forged segment
        at the subflow's next sequence number): TCP drops the head of the real segment as old,
        and the new mapping, the subflow's current one by then, places its tail.
        In-order traffic costs one comparison; the last 16 placements are remembered.
        """
        off = (dsn - ssn) & MASK32
        end = (ssn + length) & MASK32
        pl = sfd.placed
        hw = sfd.placed_end
        if hw is None or (ssn - hw) & MASK32 < 0x80000000:  # at or beyond everything placed so far
            if pl and pl[-1][1] == ssn and pl[-1][2] == off:
                pl[-1][1] = end
            else:
                pl.append([ssn, end, off])
                if len(pl) > 16:
                    del pl[0]
            sfd.placed_end = end
            sfd.placed_off = off
            return 0
        other: list[tuple[int, int, int]] = []  # earlier placements elsewhere: (from, to) relative to ssn, offset
        for start, stop, o in reversed(pl):
            if (ssn - start) & MASK32 >= (stop - start) & MASK32 and (start - ssn) & MASK32 >= length:
                continue  # no subflow byte in common
            if o == off:
                if (ssn - start) & MASK32 <= (stop - start) & MASK32 and (end - start) & MASK32 <= (
                        stop - start) & MASK32:
                    return 0  # a repeat of (part of) this placement: the usual retransmission
                continue
            rs, re = (start - ssn) & MASK32, (stop - ssn) & MASK32
            other.append((0 if rs >= 0x80000000 else rs, min(re, length), o))
        if not other:
            pl.append([ssn, end, off])  # bytes before the furthest ones, seen for the first time
            if len(pl) > 16:
                del pl[0]
            if 0 < (end - hw) & MASK32 < 0x80000000:  # (and some beyond them)
                sfd.placed_end = end
                sfd.placed_off = off
            return 0
        cut = 0
        for rs, re, _ in sorted(other):
            if rs > cut:
                cut = -1  # not a head: bytes after this gap keep another placement
                break
            cut = max(cut, re)
        if not sfd.remap_noticed:
            sfd.remap_noticed = True
            o = other[0][2]
            self._notice(ev, NoticeType.BAD_MAPPING, conn,
                         f"subflow bytes at ssn {ssn} mapped to dsn {dsn}; they were mapped to dsn "
                         f"{(dsn - off + o) & MASK64}", seg)
        if not trim or not 0 < cut < length:
            return None
        return cut if self._place(conn, sfd, (ssn + cut) & MASK32, (dsn + cut) & MASK64, length - cut, seg, ev) == 0 \
            else None

    def _fast_data(self, conn: Connection, sfd: SubflowDir, cdir: Direction, dss: m.Dss, seg: TcpSegment,
                   ev: list[Event]) -> bool:
        """The common case: one mapping covering exactly this in-order payload. No mapping is
        kept (a retransmission carries its mapping again), checksums are verified here.
        (Out-of-window segments never get here: _on_segment judges them whole.)
        False: the mapping's head keeps an earlier placement; the general path trims the segment."""
        st = conn.streams[cdir]
        dsn = dss.dsn or 0
        ssn = dss.ssn or 0
        if not dss.flags & m.DSS_m and st.base is not None:
            dsn = expand32(dsn, st.base)
        dll = dss.dll or 0
        cut = self._place(conn, sfd, ssn, dsn, dll, seg, ev, not conn.csum)
        if cut is None:
            return True
        if cut:
            return False
        conn.mapped[cdir] = True
        sfd.last_map_ssn = ssn
        if sfd.shed:
            self._place_shed(conn, sfd, cdir, ssn, dsn, dll)
        if seg.payload_len != dll:
            # the mapping reaches beyond this packet: keep it for segments that do not repeat it
            maps = sfd.mappings
            if not maps or maps[-1].ssn != ssn or maps[-1].dsn != dsn:
                maps.append(Mapping(ssn, dsn, dll, False, None, dll))
                if len(maps) > _MAX_MAPPINGS:
                    self._evict_mapping(sfd)
            dsn = (dsn + ((seg.seq - (sfd.isn or 0) - ssn) & MASK32)) & MASK64
        self._seen(sfd, seg)
        payload = seg.payload
        if conn.csum and dss.checksum is not None and not crypto.dss_checksum_ok(
                dsn, dss.ssn or 0, dss.dll or 0, dss.checksum, payload):
            self._notice(ev, NoticeType.DSS_CHECKSUM_FAILURE, conn,
                         f"mapping dsn {dsn} ssn {dss.ssn} len {dss.dll}", seg)
            return True
        self._deliver(conn, cdir, dsn, payload, seg.ts, ev)
        return True

    def _take_data(self, conn: Connection, sf: Subflow, sfd: SubflowDir, cdir: Direction, seg: TcpSegment,
                   dss: m.Dss | None, late: bool, ev: list[Event], eaten: int = 0) -> None:
        """A segment's mapping and bytes, in subflow order. ``eaten``: leading bytes the receiver
        already had (a kept segment the copy that filled the hole before it overlapped)."""
        n = seg.payload_len
        skip = eaten
        if dss is not None and dss.dsn is not None:
            isn = sfd.isn
            if n and not eaten and isn is not None and not dss.flags & m.DSS_F and not sfd.pending and not sfd.fin \
                    and n == seg.wire_payload_len \
                    and (seg.seq - isn - (dss.ssn or 0)) & MASK32 <= (dss.dll or 0) - n \
                    and (n == dss.dll or not conn.csum) and self._fast_data(conn, sfd, cdir, dss, seg, ev):
                return
            cut = self._on_mapping(conn, sf, sfd, cdir, dss, seg, ev, late)
            if cut is None:
                return  # a mapping contradicting an earlier one: its bytes are not taken
            skip = max(skip, cut)
        if n > skip:
            self._on_payload(conn, sf, sfd, cdir, seg, ev, dss is None or dss.dsn is None, skip)

    def _keep_ofo(self, sf: Subflow, d: int, seg: TcpSegment, dss: m.Dss | None, ev: list[Event]) -> bool:
        """Keep a data segment that starts after a hole in its subflow's sequence space until the
        hole fills (see _Ofo); True when kept, or shed. Only where the gateway sees the receiver's
        acknowledgements (or its SYN): they say when it has bytes the gateway did not see (a
        capture's loss), and the hole is then filled. These are out-of-order bytes of their
        connection direction, under ``ooo_limit`` and ``memcap``, and at most _MAX_OFO segments
        and twice the receiver's largest window per subflow direction: past a limit the segment
        is shed, never read out of subflow order (inline with on_memcap = "drop" the packet is
        dropped, and its copy comes again once the hole has filled)."""
        sfd = sf.dirs[d]
        conn = sf.conn
        isn, pa = sfd.isn, sfd.peer_ack
        rn = sfd.rcv_nxt
        if not self.config.subflow_order or conn is None or isn is None or pa is None and sf.dirs[d ^ 1].isn is None \
                or rn is None and sf.role == Role.PICKUP:
            return False  # (no acknowledgement from the receiver seen yet, nor its SYN: a one-way capture)
        self._ofo_acked(sf, d, seg.ts, ev)  # (the receiver has the bytes before its acknowledgement)
        if conn.closed is not None:
            return True  # (nothing more to read)
        rn = _rcv_next(sfd)
        if not 0 < (seg.seq - rn) & MASK32 < 0x80000000:
            return False
        n = seg.payload_len
        fin = bool(seg.flags & FIN)
        _note_sack(sfd, rn, seg.seq, (seg.seq + n + fin) & MASK32)
        ip = bytes(seg.ip) if n else b""  # (a bare FIN's options are read as it comes)
        cost = len(ip) + PIECE_COST + _OFO_COST
        held = sfd.ofo
        cdir = _DIRS[d ^ sf.flipped]
        st = conn.streams[cdir]
        if held is not None and len(held) >= _MAX_OFO or sfd.ofo_bytes + n > 2 * max(sfd.max_win, 65535):
            limit, why = "subflow_order", f"segments kept after a hole in their subflow over {_MAX_OFO}, or over " \
                                          "twice the receiver's window"
        elif st.ooo_bytes + conn.ofo_bytes[cdir] + n > st.ooo_limit:
            limit, why = "out_of_order", f"out-of-order bytes over {st.ooo_limit}"
        elif not self.budget.take(cost):
            limit, why = "global", f"buffered bytes over the memcap ({self.budget.limit})"
        else:
            limit = ""
        if limit:
            self._shed(conn, limit, n, why, seg.ts, ev, seg)
            if limit != "subflow_order":  # (counted in the record as the data level's buffer limits are)
                st.memcap_drops += 1
                st.memcap_bytes += n
                st.budget_drops += limit == "global"
            dsn = _mapped_dsn(st, dss, isn, seg.seq, n) if not conn.fallen and n else None
            if dsn is not None:
                st.note_shed(dsn, dsn + n)
                _note_waits(sfd, st, seg.seq, dsn, n)
            return True
        if held is None:
            held = sfd.ofo = []
        start = (seg.seq - rn) & MASK32
        end = start + n + fin  # (a FIN takes a sequence number)
        i = len(held)
        while i and (held[i - 1].seq - rn) & MASK32 > start:
            i -= 1
        # Linux's rules for overlapping copies kept after a hole (tcp_data_queue_ofo): one inside a
        # kept one is dropped, one from the same byte and longer replaces it, one covering later
        # ones whole replaces them; other overlaps keep both, and the earlier start wins the overlap
        if i:
            p = held[i - 1]
            ps = (p.seq - rn) & MASK32
            pe = ps + ((p.end - p.seq) & MASK32) + p.fin
            if start < pe:
                if end <= pe:
                    self.budget.give(cost)
                    return True  # all its bytes are kept already: dropped
                if start == ps:
                    i -= 1
                    self._ofo_drop(sf, d, i)
        while i < len(held):
            q = held[i]
            qs = (q.seq - rn) & MASK32
            if qs >= end or qs + ((q.end - q.seq) & MASK32) + q.fin > end:
                break
            self._ofo_drop(sf, d, i)
        held.insert(i, _Ofo(seg.seq, (seg.seq + n) & MASK32, ip, dss if n else None, cost, fin))
        if n and not conn.fallen:
            dsn = _mapped_dsn(st, dss, isn, seg.seq, n)
            if dsn is not None:
                _note_waits(sfd, st, seg.seq, dsn, n)
        sfd.ofo = held  # (again, if those it replaced were all it held)
        sfd.ofo_bytes += n
        conn.ofo_bytes[cdir] += n
        self.stats.subflow_order_kept += 1
        return True

    def _limit_dropped(self, conn: Connection, sfd: SubflowDir, rn: int | None, seg: TcpSegment,
                       ev: list[Event]) -> None:
        """Inline (on_memcap = "drop"), a limit shed this segment's bytes and the gateway drops its
        packet: the receiver never gets it, so its subflow's next byte goes back to ``rn`` until the
        copy comes again (moved on, a segment kept after it would be read, and that copy taken as
        old). The refusal is counted per byte, so a resend refused again is known (see _must_take);
        refused a third time, past the slack, the connection may wait for it for good: told once
        (``memcap_stall``)."""
        sfd.rcv_nxt = rn
        if rn is None:
            return
        r = sfd.refused
        times = r[1] + 1 if r is not None and r[0] == rn else 1
        sfd.refused = (rn, times)
        if times == 3 and not conn.notices[NoticeType.MEMCAP_STALL.value]:
            self._notice(ev, NoticeType.MEMCAP_STALL, conn,
                         f"the resend of the subflow's next bytes (seq {rn}) refused {times} times, past the "
                         f"{SLACK} bytes of slack the buffer limits give it ({self.budget.used} bytes buffered, "
                         f"memcap {self.budget.limit}): the connection waits for bytes after them, and may stall",
                         seg)

    @staticmethod
    def _must_take(st: DataStream, sfd: SubflowDir, seg: TcpSegment) -> bool:
        """True for a segment in its subflow's order whose bytes are placed past ``ooo_limit`` and
        past the memcap, by up to SLACK each (DataStream.insert's ``urgent``). Refused, every resend
        of it would be refused as well, and inline (on_memcap = "drop") the connection would stall,
        since the receiver reads nothing on the subflow after it while the stream's next byte is there:
        - a later segment on the subflow holds the stream's next byte (``SubflowDir.waits``): a
          path failed holding it, and the sender reinjected it behind a packet the memcap dropped;
        - the memcap refused this segment's first byte twice already (``SubflowDir.refused``): the
          sender is in its retransmission timeout, and sends nothing new on the subflow -- such as
          that reinjection -- until this hole fills (the lab's stalls, both directions)."""
        r = sfd.refused
        if r is not None:
            if (r[0] - seg.seq) & MASK32 < seg.payload_len:
                if r[1] >= 2:
                    return True
            elif (seg.seq - r[0]) & MASK32 < 0x80000000:
                sfd.refused = None  # (the subflow has moved on past it)
        w = sfd.waits
        if w is None:
            return False
        if st.base != w[1]:
            sfd.waits = None  # (the stream has moved on)
            return False
        return 0 < (w[0] - seg.seq) & MASK32 < 0x80000000

    def _ofo_drop(self, sf: Subflow, d: int, i: int) -> None:
        sfd = sf.dirs[d]
        held = sfd.ofo
        assert held is not None
        h = held.pop(i)
        n = (h.end - h.seq) & MASK32
        sfd.ofo_bytes -= n
        if sf.conn is not None:
            sf.conn.ofo_bytes[_DIRS[d ^ sf.flipped]] -= n
        self.budget.give(h.cost)
        if not held:
            sfd.ofo = None

    def _ofo_acked(self, sf: Subflow, d: int, ts: float, ev: list[Event]) -> None:
        """The receiver acknowledged bytes of direction ``d``: past a hole, it had the hole's bytes
        from a copy the gateway did not see, and read what was kept after it."""
        sfd = sf.dirs[d]
        pa = sfd.peer_ack
        if pa is not None and 0 < (pa - _rcv_next(sfd)) & MASK32 < 0x80000000:
            self._ofo_release(sf, d, ts, ev, upto=pa)

    def _ofo_dsn_acked(self, sf: Subflow, d: int, limit: int, ts: float, ev: list[Event]) -> None:
        """The receiver DATA_ACKed up to stream position ``limit``: a kept segment whose mapping puts
        its first byte before it was read, so the receiver had every subflow byte before its end
        (from copies the gateway did not see): those kept up to there are read."""
        sfd = sf.dirs[d]
        conn = sf.conn
        isn = sfd.isn
        if conn is None or isn is None:
            return
        st = conn.streams[_DIRS[d ^ sf.flipped]]
        upto = None
        for h in sfd.ofo or ():
            dsn = _mapped_dsn(st, h.dss, isn, h.seq, (h.end - h.seq) & MASK32)
            if dsn is not None and dsn < limit:
                upto = h.end
        if upto is not None:
            self._ofo_release(sf, d, ts, ev, upto=upto)

    def _ofo_release(self, sf: Subflow, d: int, ts: float, ev: list[Event], upto: int | None = None,
                     every: bool = False) -> None:
        """Read the kept segments whose hole has filled, in sequence order, each without the bytes
        the receiver had by then, at ``ts`` (when they become readable: the emitted stream's
        timestamps keep their order). ``upto``: the receiver acknowledged up to there, so holes
        before it were filled by bytes the gateway did not see; ``every``: all of them, the
        holes taken as filled so (the connection ends normally)."""
        sfd = sf.dirs[d]
        conn = sf.conn
        cdir = _DIRS[d ^ sf.flipped]
        while sfd.ofo and conn is not None and conn.closed is None:
            h = sfd.ofo[0]
            rn = _rcv_next(sfd)
            ahead = (h.seq - rn) & MASK32
            if 0 < ahead < 0x80000000:
                if not every and (upto is None or not 0 < (upto - h.seq) & MASK32 < 0x80000000):
                    break
                sfd.rcv_nxt = rn = h.seq  # the hole, filled by bytes the gateway did not see
            self._ofo_drop(sf, d, 0)
            eaten = (rn - h.seq) & MASK32
            n = (h.end - h.seq) & MASK32
            if eaten >= n + h.fin:
                continue  # the receiver had all its bytes (and its FIN's place): TCP drops it as old
            if sfd.fin_seq is not None and (h.seq - sfd.fin_seq) & MASK32 < 0x80000000:
                continue  # at or after the FIN (see _on_segment's void)
            if eaten < n:
                seg = parse_ip(memoryview(h.ip), ts)
                assert isinstance(seg, TcpSegment)  # (it was one when kept)
                # let through when it came, and buffered since: placed whatever ooo_limit says (shed
                # now, its bytes were lost for good, and the packet that filled the hole was dropped
                # for it under on_memcap = "drop": the liveness test's stall)
                held, self._placing_held = self._placing_held, True
                try:
                    self._take_data(conn, sf, sfd, cdir, seg, h.dss, True, ev, eaten)
                finally:
                    self._placing_held = held
                _advance_rcv(sfd, h.seq, h.end)
            if h.fin and conn.closed is None:
                _take_fin(sf, d, h.end, ts)
                self._ofo_fin = True  # (_on_segment checks whether the connection ended)
        if upto is not None:
            nxt = sfd.rcv_nxt
            if nxt is None or 0 < (upto - nxt) & MASK32 < 0x80000000:
                sfd.rcv_nxt = upto
                if sfd.ofo is not None:
                    self._ofo_release(sf, d, ts, ev)  # one starting there is in order now

    def _on_payload(self, conn: Connection, sf: Subflow, sfd: SubflowDir, cdir: Direction, seg: TcpSegment,
                    ev: list[Event], bare: bool = False, skip: int = 0) -> None:
        """``skip``: leading bytes not to read (their subflow bytes keep an earlier placement)."""
        self._seen(sfd, seg)
        payload = seg.payload
        if sfd.fin_seq is not None and (sfd.fin_seq - seg.seq) & MASK32 < len(payload):
            payload = payload[: (sfd.fin_seq - seg.seq) & MASK32]  # up to the FIN (the rest: see void)
        if sfd.isn is None:
            # no ISN yet (picked up mid-stream): hold until a mapping anchors the sequence space
            self._hold(conn, sfd, seg.seq, payload, seg, ev)
            return
        rel = (seg.seq - sfd.isn + skip) & MASK32
        self._map_bytes(conn, sf, sfd, cdir, rel, payload[skip:] if skip else payload, seg.ts, ev, seg, bare)

    def _map_bytes(self, conn: Connection, sf: Subflow, sfd: SubflowDir, cdir: Direction, rel: int,
                   data: memoryview | bytes, ts: float, ev: list[Event], seg: TcpSegment | None,
                   bare: bool = False) -> None:
        """Place subflow bytes by their mappings. ``bare``: the segment carried no DSS mapping."""
        st = conn.streams[cdir]
        pos = 0
        n = len(data)
        maps = sfd.mappings
        fell_back = False
        while pos < n:
            r = (rel + pos) & MASK32
            found = None
            for mp in reversed(maps):
                off = (r - mp.ssn) & MASK32
                if mp.infinite:
                    if off < 0x80000000:
                        found, take = mp, n - pos
                        break
                elif off < mp.length:
                    found, take = mp, min(n - pos, mp.length - off)
                    break
            if found is None:
                if not conn.mapped[cdir] and sf.role == Role.INITIAL and r == 1 and not maps \
                        and (st.base is not None or self._keyless(conn, cdir)):
                    # first data without any DSS: fallback to TCP (RFC 8684 3.7)
                    self._fall_back(conn, sf, sfd, cdir, "data without DSS: TCP fallback", seg, ts, ev)
                    continue
                if bare and (fb := self._bare_mapping(conn, sf, sfd, cdir, r)) is not None:
                    if fb.infinite:
                        self._notice(ev, NoticeType.INFINITE_MAPPING, conn,
                                     f"data without DSS after the mapping ending at dsn {fb.dsn}: TCP fallback",
                                     seg, ts)
                        fell_back = conn.fallen = True
                    maps.append(fb)
                    if len(maps) > _MAX_MAPPINGS:
                        self._evict_mapping(sfd)
                    continue
                # bytes with no mapping yet: hold until one arrives
                seq = (r + (sfd.isn or 0)) & MASK32
                nxt = n
                self._hold(conn, sfd, seq, data[pos:nxt], seg, ev, ts)
                return
            piece = data[pos : pos + take]
            off = (r - found.ssn) & MASK32
            if found.checksum is not None:
                self._accumulate(conn, found, cdir, off, piece, ts, ev)
            else:
                self._deliver(conn, cdir, (found.dsn + off) & MASK64, piece, ts, ev)
            pos += take
        if fell_back and sfd.pending:
            self._resolve_pending(conn, sfd, cdir, ts, ev)  # bytes held beyond: the fallback maps them

    @staticmethod
    def _keyless(conn: Connection, cdir: Direction) -> bool:
        """A v1 client whose key never came (no MP_CAPABLE on its handshake ACK or first data):
        its server falls back to TCP, and the stream needs no DSN, so it can still be placed."""
        return cdir == Direction.C2S and conn.version == 1 and conn.client_key is None and not conn.pickup

    def _fall_back(self, conn: Connection, sf: Subflow, sfd: SubflowDir, cdir: Direction, detail: str,
                   seg: TcpSegment | None, ts: float, ev: list[Event]) -> None:
        """This direction falls back to TCP from relative subflow byte 1 (nothing mapped before).
        Like Linux after a fallback, every later byte of the connection is then taken in subflow
        order and DSS mappings are ignored: a peer that went on sending mappings the receiver
        ignores must not make mproxy place bytes where the receiver does not."""
        st = conn.streams[cdir]
        if st.base is None:
            # no key, so no DSN: count the stream from an arbitrary one (after the Fast Open bytes)
            st.base = st.start = (_KEYLESS_BASE - (conn.syn_taken or 0)) & MASK64
            if conn.syn_taken:
                self._place_syn_data(conn, ts, ev)
        self._notice(ev, NoticeType.INFINITE_MAPPING, conn, detail, seg, ts)
        sfd.mappings.append(Mapping(1, st.base, 0, True))
        conn.mapped[cdir] = True
        if self._alone(conn, sf):
            conn.fallen = True

    @staticmethod
    def _alone(conn: Connection, sf: Subflow) -> bool:
        """The initial subflow with no join up: where Linux lets a connection fall back to TCP."""
        return sf.role == Role.INITIAL and not any(o.role == Role.JOIN and o.established for o in conn.subflows)

    @staticmethod
    def _bare_mapping(conn: Connection, sf: Subflow, sfd: SubflowDir, cdir: Direction, r: int) -> Mapping | None:
        """A mapping for subflow byte ``r`` of a segment without DSS, as a Linux receiver sees it.

        Bytes a mapping placed before (a retransmission without DSS, as after a fallback) are
        copies: mapped as they were, compared, not taken twice. Otherwise Linux
        (``subflow_check_data_avail``) takes in-order data with no mapping as a fallback to TCP,
        mapped at its data-level ack (right after the last mapped byte when nothing is missing),
        when fallback is still allowed: the initial subflow, no join ever established, no DSS
        checksums; its peer then stops sending DSS too. "In order" is the byte right after the
        furthest mapped one; anything beyond a hole still waits for a mapping (a lost segment's
        retransmission brings one). With one subflow every byte has had the same DSN - SSN
        offset, so copies whose placement was forgotten take the furthest one's.
        """
        st = conn.streams[cdir]
        if st.base is None:
            return None
        for start, stop, off in reversed(sfd.placed):
            n = (stop - start) & MASK32
            if (r - start) & MASK32 < n:
                return Mapping(start, expand32((start + off) & MASK32, st.base), n, False, None, n)
        end = sfd.placed_end
        if end is None or conn.csum or not Tracker._alone(conn, sf):
            return None
        dsn = expand32((r + sfd.placed_off) & MASK32, st.base)
        if st.fin_dsn is not None and st.unwrap(dsn) >= st.fin_dsn:
            return None  # past the DATA_FIN: the stream has ended
        if r == end:
            return Mapping(r, dsn, 0, True)
        behind = (end - r) & MASK32
        if behind < 0x80000000:
            return Mapping(r, dsn, behind, False, None, behind)
        return None

    def _accumulate(self, conn: Connection, mp: Mapping, cdir: Direction, off: int, piece: memoryview | bytes,
                    ts: float, ev: list[Event]) -> None:
        """Checksummed mappings are only accepted whole and verified, as the Linux receiver does."""
        if mp.done:
            self._deliver(conn, cdir, (mp.dsn + off) & MASK64, piece, ts, ev)  # a late copy: compare only
            return
        if mp.acc is None:
            st = conn.streams[cdir]
            lo = st.unwrap(mp.dsn)
            # the mapping the stream waits for may go past the memcap (by SLACK >= one mapping): the
            # bytes buffered behind it can keep the budget full, and refusing it would refuse every
            # resend (a stall under on_memcap = "drop"); so may held bytes, already let through
            waits = self._placing_held or self._placing_urgent or (st.base is not None
                                                                   and lo <= st.base < lo + mp.length)
            if not self.budget.take(mp.length, SLACK if waits else 0):
                self._shed(conn, "global", len(piece), f"buffered bytes over the memcap ({self.budget.limit})",
                           ts, ev)
                pos = st.unwrap((mp.dsn + off) & MASK64)
                st.note_shed(pos, pos + len(piece))
                return
            mp.acc = bytearray(mp.length)
            mp.filled = []
        mp.acc[off : off + len(piece)] = piece
        iv = mp.filled
        assert iv is not None
        iv.append((off, off + len(piece)))
        iv.sort()
        merged: list[tuple[int, int]] = []
        for a, b in iv:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        mp.filled = merged
        if len(merged) == 1 and merged[0] == (0, mp.length):
            mp.done = True
            data = bytes(mp.acc)
            self._drop_acc(mp)
            if crypto.dss_checksum_ok(mp.dsn, mp.ssn, mp.dll, mp.checksum or 0, data):
                self._deliver(conn, cdir, mp.dsn, data, ts, ev)
            else:
                self._notice(ev, NoticeType.DSS_CHECKSUM_FAILURE, conn,
                             f"mapping dsn {mp.dsn} ssn {mp.ssn} len {mp.length}", None, ts)

    def _hold(self, conn: Connection, sfd: SubflowDir, seq: int, data: memoryview | bytes,
              seg: TcpSegment | None, ev: list[Event], ts: float | None = None) -> None:
        if seq in sfd.pending and len(sfd.pending[seq]) >= len(data):
            return
        if sfd.pending_bytes + len(data) > self.config.pending_limit or (
                seq not in sfd.pending and len(sfd.pending) >= max_pieces(self.config.pending_limit)):
            limit, detail = "pending", (f"unmapped bytes over {self.config.pending_limit} (or pieces over "
                                        f"{max_pieces(self.config.pending_limit)})")
        else:
            old = sfd.pending.get(seq)
            grow = len(data) - (len(old) if old is not None else 0)
            if self.budget.take(grow + (PIECE_COST if old is None else 0)):
                sfd.pending[seq] = bytes(data)
                sfd.pending_bytes += grow
                return
            limit, detail = "global", f"buffered bytes over the memcap ({self.budget.limit})"
        self._shed(conn, limit, len(data), detail, ts, ev, seg)
        self._note_unmapped_shed(sfd, seq, len(data))

    @staticmethod
    def _note_unmapped_shed(sfd: SubflowDir, seq: int, n: int) -> None:
        """Remember subflow bytes a limit kept out before their mapping was known (their DSNs are not
        known yet): the newest ``_UNMAPPED_SHED_RANGES`` runs, contiguous ones merged."""
        rs = sfd.shed
        if rs is None:
            rs = sfd.shed = []
        if rs and (rs[-1][0] + rs[-1][1]) & MASK32 == seq:
            rs[-1][1] += n
            return
        rs.append([seq, n])
        if len(rs) > _UNMAPPED_SHED_RANGES:
            del rs[0]

    def _place_shed(self, conn: Connection, sfd: SubflowDir, cdir: Direction, ssn: int, dsn: int,
                    length: int | None) -> None:
        """A mapping (``length`` None: infinite) says where unmapped bytes that were shed belonged:
        their DSNs are noted as shed, so a gap over them reads as mproxy's own shedding, not as
        bytes that travelled on a path the gateway does not see (side_channel). Runs the mapping
        covers whole are forgotten."""
        rs, isn = sfd.shed, sfd.isn
        if not rs or isn is None:
            return
        st = conn.streams[cdir]
        keep = []
        for r in rs:
            a = (r[0] - isn - ssn) & MASK32  # the run's offset in the mapping, signed
            if a >= 0x80000000:
                a -= 0x100000000
            b = a + r[1]
            lo, hi = max(a, 0), b if length is None else min(b, length)
            if hi > lo:
                pos = st.unwrap((dsn + lo) & MASK64)
                st.note_shed(pos, pos + hi - lo)
            if lo != a or hi != b:
                keep.append(r)
        sfd.shed = keep or None

    def _shed(self, conn: Connection, limit: str, n: int, detail: str, ts: float | None, ev: list[Event],
              seg: TcpSegment | None = None) -> None:
        """Bytes a limit kept out of a buffer: counted by limit, added to ``shed_bytes``, noticed."""
        self.stats.memcap[limit] += 1
        self.shed_bytes += n
        self._memcap_notice(conn, detail, seg, ts, ev)

    def _memcap_notice(self, conn: Connection, detail: str, seg: TcpSegment | None, ts: float | None,
                       ev: list[Event]) -> None:
        """One memcap notice per connection: a limit that bites usually bites on every following
        packet, and the log must not grow at packet rate (the metrics and the connection record
        count every hit)."""
        if not conn.notices[NoticeType.MEMCAP.value]:
            self._notice(ev, NoticeType.MEMCAP, conn, detail, seg, ts)

    def _drop_acc(self, mp: Mapping) -> None:
        """A checksummed mapping's accumulator goes (completed, evicted, released): its bytes go back."""
        if mp.acc is not None:
            mp.acc = None
            self.budget.give(mp.length)

    def _drop_pending(self, sfd: SubflowDir) -> None:
        """Unmapped bytes go (mapped now, or released): their bytes and pieces go back."""
        self.budget.give(sfd.pending_bytes + PIECE_COST * len(sfd.pending))
        sfd.pending.clear()
        sfd.pending_bytes = 0

    def _evict_mapping(self, sfd: SubflowDir) -> None:
        self._drop_acc(sfd.mappings.pop(0))

    def _release_subflow(self, sf: Subflow) -> None:
        """Give back what a subflow holds (unmapped bytes, mappings being assembled)."""
        for d, sd in enumerate(sf.dirs):
            for kept in list(sd.late or ()):
                self._late_drop(sf.conn, sd, kept)
            while sd.ofo:
                self._ofo_drop(sf, d, len(sd.ofo) - 1)
            if sd.pending:
                self._drop_pending(sd)
            for mp in sd.mappings:
                self._drop_acc(mp)

    def _release(self, conn: Connection) -> None:
        """A connection ends: every byte it still buffers goes back to the budget."""
        self._drop_syn_data(conn)
        for held in list(conn.beyond or ()):
            self._beyond_drop(conn, held)
        for st in conn.streams:
            st.release()
            st.drop_history()
        for sf in conn.subflows:
            self._release_subflow(sf)

    def _shrink_histories(self) -> None:
        """All histories together are over ``history_memcap``: empty those of the least recently
        active connections (late copies of their old bytes are the least likely) until a quarter
        of the limit is free again, so this walk happens once per that much released data."""
        hb = self.history_budget
        target = hb.limit - hb.limit // 4
        for conn in self.connections.values():
            for st in conn.streams:
                if st._history:
                    st.drop_history()
                    self.stats.memcap["history"] += 1
            if hb.used <= target:
                break

    def _resolve_pending(self, conn: Connection, sfd: SubflowDir, cdir: Direction, ts: float,
                         ev: list[Event]) -> None:
        items = sorted(sfd.pending.items(), key=lambda kv: (kv[0] - (sfd.isn or 0)) & MASK32)
        self._drop_pending(sfd)
        sf = next((s for s in conn.subflows if sfd in s.dirs), None)
        if sf is None:
            return
        self._placing_held = True  # their budget was just given back: taking it again is no growth
        try:
            for seq, data in items:
                rel = (seq - (sfd.isn or 0)) & MASK32
                self._map_bytes(conn, sf, sfd, cdir, rel, data, ts, ev, None)
        finally:
            self._placing_held = False

    def _deliver(self, conn: Connection, cdir: Direction, dsn: int, data: memoryview | bytes, ts: float,
                 ev: list[Event], taken: bool = False) -> None:
        """Put bytes at their DSN in the stream. ``taken``: kept data past the connection-level window
        that the receiver has now acknowledged (see _hold_beyond)."""
        st = conn.streams[cdir]
        pos = st.unwrap(dsn)
        if not taken:
            we, base = st.wnd_end, st.base
            # out of order and past the connection-level edge: kept for the DATA_ACK (_hold_beyond); not
            # when already DATA_ACKed (the receiver has it), nor after a fallback to TCP (bytes then come
            # in subflow order, and no DATA_ACK follows)
            if we is not None and base is not None and pos > base and pos + len(data) > we and not conn.fallen \
                    and (st.acked is None or pos >= st.acked) and self._hold_beyond(conn, cdir, pos, data, ts, ev):
                return
            if conn.beyond is not None:
                self._beyond_superseded(conn, cdir, pos, data, ts, ev)
        before = len(st.overlaps), st.memcap_drops, st.budget_drops, st.memcap_bytes
        out = st.insert(pos, data, self._placing_held, self._placing_urgent)
        if conn.beyond is not None and out:
            self._beyond_covered(conn, cdir)
        if len(st.overlaps) != before[0]:
            for ov in st.overlaps[before[0]:]:
                self._notice(ev, NoticeType.OVERLAP_MISMATCH, conn,
                             f"{ov.length} bytes at dsn {ov.dsn} differ from the "
                             + ("accepted copy (already released)" if ov.released else
                                "buffered copy (the new copy is read, as Linux reads it)" if ov.replaced else
                                "buffered copy (which is read, as Linux reads it)"), None, ts)
            del st.overlaps[:]
        if st.memcap_drops != before[1]:
            by_budget = st.budget_drops - before[2]
            self.stats.memcap["out_of_order"] += st.memcap_drops - before[1] - by_budget
            self.stats.memcap["global"] += by_budget
            self.shed_bytes += st.memcap_bytes - before[3]
            self._memcap_notice(conn, f"buffered bytes over the memcap ({self.budget.limit})" if by_budget
                                else f"out-of-order bytes over {st.ooo_limit} (or pieces over "
                                f"{max_pieces(st.ooo_limit)})", None, ts, ev)
        if out:
            if not conn.opened:
                self._open(conn, ts, ev)
            self.stats.rebuilt_bytes[cdir] += len(out)
            ev.append(DataReleased(conn.id, cdir, out, ts))
        self._after_fin(conn, cdir, ts, ev)

    def _after_fin(self, conn: Connection, cdir: Direction, ts: float, ev: list[Event]) -> None:
        st = conn.streams[cdir]
        if st.finished and not conn.fin_emitted[cdir]:
            conn.fin_emitted[cdir] = True
            ev.append(DataFinished(conn.id, cdir, ts))

    def _check_gaps(self, conn: Connection, ts: float, ev: list[Event]) -> None:
        for cdir in (Direction.C2S, Direction.S2C):
            st = conn.streams[cdir]
            if st.acked is None or st.base is None or st.finished:
                continue
            limit = st.acked
            if st.fin_dsn is not None:
                limit = min(limit, st.fin_dsn)
            if limit <= st.base:
                conn.gap_since[cdir] = None
                continue
            for sf in conn.subflows:
                d = cdir ^ sf.flipped  # (the direction index carrying cdir's data on it)
                if sf.dirs[d].ofo is not None:
                    self._ofo_dsn_acked(sf, d, limit, ts, ev)
            if conn.late and conn.closed is None and not (st.finished or st.base is None or limit <= st.base):
                self._late_dsn_acked(conn, cdir, limit, ts, ev)
            if conn.closed is not None:
                return
            if st.finished or st.base is None or limit <= st.base:
                conn.gap_since[cdir] = None
                continue
            since = conn.gap_since[cdir]
            if since is None:
                conn.gap_since[cdir] = since = ts
            if ts - since < self.config.gap_grace:
                continue
            conn.gap_since[cdir] = None
            # only holes the sender is seen to have sent past (data or a DATA_FIN beyond them) are
            # skipped. A DATA_ACK past everything seen may be forged (within the loose bound of
            # _ack_unsent): skipping that tail would drop the sender's real bytes as old when they
            # come, and blind the IDS to them. So the tail is noticed now (the alert is as timely)
            # and the stream waits there: bytes that come are read, data beyond skips it.
            end = st.furthest()
            if end is not None and end > st.base:
                self._skip_holes(conn, cdir, min(limit, end), True, ts, ev)
            base = st.base
            tn = conn.tail_noticed[cdir]
            if base is not None and limit > base and not st.finished and (tn is None or base >= tn):
                conn.tail_noticed[cdir] = limit
                self._gap_notices(conn, cdir, base, limit, 0, True, ts, ev, tail=True)

    def _skip_tails(self, conn: Connection, ts: float, ev: list[Event]) -> None:
        """The connection ends: acknowledged holes no data came past (see _check_gaps) are gaps
        after all, counted as the others (noticed already unless they came within the grace)."""
        for cdir in (Direction.C2S, Direction.S2C):
            st = conn.streams[cdir]
            if st.acked is None or st.base is None or st.finished:
                continue
            limit = st.acked if st.fin_dsn is None else min(st.acked, st.fin_dsn)
            if limit > st.base:
                self._skip_holes(conn, cdir, limit, True, ts, ev)

    def _skip_holes(self, conn: Connection, cdir: Direction, limit: int, acked: bool, ts: float,
                    ev: list[Event]) -> None:
        st = conn.streams[cdir]
        while st.base is not None and st.base < limit and not st.finished:
            nb = st.next_buffered()
            target = limit if nb is None or nb >= limit else nb
            start = st.base
            out = st.skip_to(target, acked)
            if target > start:
                # bytes mproxy saw but a buffer limit kept out are its own doing, not a side channel
                # or a capture loss: counted apart, and only the rest raises the notice
                shed = st.skipped_shed
                if shed:
                    self.stats.gap_bytes["memcap"] += shed
                ev.append(GapSkipped(conn.id, cdir, start, target - start, acked, ts))
                tn = conn.tail_noticed[cdir]
                self._gap_notices(conn, cdir, start, target, shed, acked, ts, ev,
                                  quiet=acked and tn is not None and start < tn)
            if out:
                self.stats.rebuilt_bytes[cdir] += len(out)
                ev.append(DataReleased(conn.id, cdir, out, ts))
            self._after_fin(conn, cdir, ts, ev)
            if nb is None or nb >= limit:
                break

    def _gap_notices(self, conn: Connection, cdir: Direction, start: int, target: int, shed: int, acked: bool,
                     ts: float, ev: list[Event], *, tail: bool = False, quiet: bool = False) -> None:
        """Classify the stream positions [start, target), never seen (``shed`` of them seen but kept
        out by a buffer limit): count them by kind and notice them. ``tail``: an acknowledged hole
        nothing came past yet, only noticed (see _check_gaps); ``quiet``: counted only, its tail
        was noticed."""
        unseen = target - start - shed
        # acknowledged bytes that a subflow the gateway sees carried, and its receiver acked
        # there, crossed the gateway unseen: lost by the capture or passed by a full queue,
        # not a path mproxy does not see
        crossed = min(unseen, self._crossed_unseen(conn, cdir, start, target)) if acked and unseen else 0
        side = unseen - crossed if acked else 0
        lost = crossed or (0 if acked else unseen)
        if not tail:
            if side:
                self.stats.gap_bytes["side_channel"] += side
            if lost:
                self.stats.gap_bytes["capture"] += lost
        if quiet:
            return
        extra = f" ({shed} were seen but kept out by a buffer limit)" if shed else ""
        wait = " (none seen past them yet: the stream waits there, and reads them if they come)" if tail else ""
        if side:
            self._notice(ev, NoticeType.SIDE_CHANNEL, conn, (f"{side} of " if side != target - start else "")
                         + f"{target - start} bytes at dsn {start} acknowledged by the peer but never seen"
                         + (f" ({crossed} crossed the gateway on a subflow it sees)" if crossed else "")
                         + extra + wait, None, ts)
        if lost:
            self._notice(ev, NoticeType.CAPTURE_GAP, conn, (f"{lost} of " if lost != target - start else "")
                         + f"{target - start} bytes at dsn {start} "
                         + ("acknowledged by the peer, sent on a subflow the gateway sees but never seen "
                            "(lost by the capture, or passed by a full queue)" if crossed else "never seen")
                         + ("" if side else extra + wait), None, ts)

    @staticmethod
    def _crossed_unseen(conn: Connection, cdir: Direction, start: int, end: int) -> int:
        """How many of the stream positions [start, end), never seen, were carried by a subflow the
        gateway sees, whose receiver's TCP ack is past them: a mapping seen on it covers their DSNs
        (one DSS covers a whole TSO burst, and a lost packet takes only its own copy), or they lie in
        a hole of its subflow sequence between two placements of one mapping offset (a lost packet
        that carried its own mapping). A receiver acks only subflow bytes it got on that subflow, so
        they crossed the gateway's path (a capture that lost them, a full queue that passed them);
        bytes sent on a path it does not see are acked on no subflow it sees. Only the last 16
        placements are known: older ones are not found."""
        spans: list[tuple[int, int]] = []
        n = end - start

        def note(ssn: int, off: int, length: int) -> None:  # subflow bytes [ssn, +length) at ssn + off
            lo = (ssn + off - start) & MASK32  # their DSNs, from start (mod 2**32)
            lo = lo - 0x100000000 if lo >= 0x80000000 else lo
            if lo + length > 0 and lo < n:
                spans.append((max(lo, 0), min(lo + length, n)))

        for sf in conn.subflows:
            sfd = sf.dirs[int(cdir) ^ sf.flipped]
            if sf.refused or sfd.isn is None or sfd.peer_ack is None or not sfd.placed:
                continue
            acked = (sfd.peer_ack - sfd.isn) & MASK32

            def rel(x: int) -> int:  # subflow position against the ack, signed (wraps at 2**32)
                r = (x - acked) & MASK32
                return r - 0x100000000 if r >= 0x80000000 else r

            placed = sorted((rel(a), rel(a) + ((b - a) & MASK32), o) for a, b, o in sfd.placed)
            reach, off = placed[0][0], placed[0][2]  # furthest placed byte so far, and its offset
            for a, b, o in placed:
                if a > reach and o == off and a <= 0:  # a hole between placements of one offset, acked
                    note(reach + acked, o, a - reach)
                if min(b, 0) > a:  # the acked part of a mapping
                    note(a + acked, o, min(b, 0) - a)
                if b > reach:
                    reach, off = b, o
        total, last = 0, 0
        for lo, hi in sorted(spans):  # their union
            lo = max(lo, last)
            if hi > lo:
                total += hi - lo
                last = hi
        return total

    def _check_end(self, conn: Connection, ts: float, ev: list[Event]) -> None:
        s0, s1 = conn.streams
        if s0.finished and s1.finished:
            self._close(conn, Outcome.DATA_FIN, False, ts, ev)
            return
        sfs = conn.subflows
        if sfs and conn.dormant is None and all(sf.closed_ts is not None for sf in sfs):
            if self.config.close_timeout > 0 and conn.opened and not conn.fallen and s0.fin_dsn is None \
                    and s1.fin_dsn is None and (not conn.pickup or s0.base is not None or s1.base is not None):
                # Linux keeps an established connection whose subflows all ended open for
                # close_timeout, and a new subflow may join it and carry the stream on: closed here, the
                # rest of the stream came as an unknown token's join, which the IDS never read
                conn.dormant = ts
                for sf in sfs:  # what only a subflow could complete (unmapped bytes, mappings) goes
                    self._release_subflow(sf)
                dq = self._dormant
                dq.append((ts, conn))
                if len(dq) > self.config.max_connections:  # (entries of joins and resets in a loop)
                    t, c = dq.popleft()
                    if c.closed is None and c.dormant == t:
                        self._close(c, *self._subflows_ended(c), ts, ev)
                return
            self._close(conn, *self._subflows_ended(conn), ts, ev)

    @staticmethod
    def _subflows_ended(conn: Connection) -> tuple[Outcome, bool]:
        """The outcome of a connection whose subflows all ended, and whether they were reset."""
        if all(sf.reset for sf in conn.subflows):
            return Outcome.RESET, True
        return Outcome.FIN, False

    # -- closing and expiry ---------------------------------------------------
    def _close(self, conn: Connection, outcome: Outcome, reset: bool, ts: float, ev: list[Event], *,
               record: bool = True) -> None:
        if conn.closed is not None:
            return
        if conn.dormant is not None and outcome in (Outcome.IDLE, Outcome.END_OF_INPUT):
            outcome, reset = self._subflows_ended(conn)  # it was waiting for a join: it ended with its subflows
        if outcome not in (Outcome.FASTCLOSE, Outcome.RESET, Outcome.EVICTED):
            for sf in conn.subflows:  # segments kept after holes in subflows (see _Ofo)
                for d in (0, 1):
                    if sf.dirs[d].ofo is not None and not sf.reset:
                        self._ofo_release(sf, d, ts, ev, every=True)
        self._ofo_fin = False  # (a FIN read there changes nothing now)
        if conn.late:
            self._late_end(conn, ts, ev)
        if outcome not in (Outcome.FASTCLOSE, Outcome.RESET, Outcome.EVICTED):
            for cdir in (Direction.C2S, Direction.S2C):
                st = conn.streams[cdir]
                # holes before buffered data were never seen: release what follows them
                while st.next_buffered() is not None and not st.finished:
                    self._skip_holes(conn, cdir, st.next_buffered() or 0, bool(st.acked and st.acked > (st.base or 0)),
                                     ts, ev)
                    if st.next_buffered() is not None and st.next_buffered() == st.base:
                        break
        self._skip_tails(conn, ts, ev)
        conn.closed = outcome
        if conn.dormant is None:  # (else its record ends with its last subflow, not close_timeout later)
            conn.last_ts = max(conn.last_ts, ts)
        self.stats.outcomes[outcome.value] += 1
        if not record:
            ev.append(ConnectionClosed(conn.id, outcome, reset, ts))
        elif conn.opened or conn.subflows:
            ev.append(ConnectionClosedSummary(conn.id, outcome, reset, ts, conn.summary()))
        if conn.held and not conn.opened:
            ev.extend(conn.held)
            conn.held.clear()
        self._release(conn)
        self.connections.pop(conn.id, None)
        self._half_open.pop(conn.id, None)
        lq = self._lingering if conn.opened else self._lingering_unopened
        for sf in conn.subflows:
            if sf.closed_ts is None:
                sf.closed_ts = ts
            lq.append((ts, sf))
        while len(lq) > self.config.max_subflows:
            # more than the table holds (entries a reused 4-tuple or the sweep already took stay
            # queued until their time): the oldest go, so that a flood cannot grow the queue
            self._drop_subflow(lq.popleft()[1])
        self._forget_tokens(conn)

    def _forget(self, conn: Connection) -> None:
        self._release(conn)
        self.connections.pop(conn.id, None)
        self._half_open.pop(conn.id, None)
        self._forget_tokens(conn)

    def _forget_tokens(self, conn: Connection) -> None:
        """Out of the indexes that find a live connection for a join or a mid-stream subflow: tokens,
        announced addresses, stream positions."""
        self._dsn_reindex(conn, ended=True)
        for ann in conn.announced:
            for entry in ann.values():
                self._unannounce(conn, entry, ended=True)
        for key in (conn.client_key, conn.server_key):
            if key is None:
                continue
            tok = crypto.key_token(key, conn.version or 0)
            if _unindex(self._tokens, tok, conn.id) and self.token_log is not None:
                self.token_log.append((tok, False))

    def _make_room(self, ts: float, ev: list[Event]) -> None:
        """At the subflow limit: entries go, as few as it takes, least worth first. Those whose time
        is up (the sweep of loose ones included); the lingering ones of handshakes that never
        completed (a SYN flood's); subflows no connection claimed (joins with unknown tokens: a
        join flood), oldest first, so that a flood cannot keep new connections from being
        tracked; then the lingering ones of connections that ended. Those go last: without them
        a late retransmission of an ended connection comes back as a new connection picked up
        mid-stream, a second conversation for the IDS with bytes the receiver already had."""
        self._expire(ts, ev)
        limit = self.config.max_subflows
        sfs = self._sf
        if len(sfs) // 2 >= limit:
            self._sweep(ts, force=True)
        lq = self._lingering_unopened
        while len(sfs) // 2 >= limit and lq:
            self._drop_subflow(lq.popleft()[1])
        orphans = self._orphans
        while len(sfs) // 2 >= limit and orphans:
            self._drop_subflow(orphans.popitem(last=False)[1])
        lq = self._lingering
        while len(sfs) // 2 >= limit and lq:
            self._drop_subflow(lq.popleft()[1])

    def _expire(self, now: float, ev: list[Event]) -> None:
        cfg = self.config
        wins = self._join_windows
        while wins and now - next(iter(wins.values()))[0] >= cfg.join_flood_window:
            wins.popitem(last=False)
        # connections, least recently active first
        while self.connections:
            conn = next(iter(self.connections.values()))
            limit = cfg.idle_timeout if conn.opened else cfg.handshake_timeout
            if now - conn.last_ts < limit:
                break
            self._close(conn, Outcome.IDLE, False, now, ev)
        # connections whose subflows all ended, and none joined since (see _check_end)
        dq = self._dormant
        while dq and now - dq[0][0] >= cfg.close_timeout:
            t, conn = dq.popleft()
            if conn.closed is None and conn.dormant == t:
                if now - conn.last_ts < cfg.close_timeout:
                    # packets still come on its subflows (an RST the receiver took for a stale one, with
                    # a challenge ACK): it waits close_timeout after the last of them
                    conn.dormant = conn.last_ts
                    dq.append((conn.last_ts, conn))
                    continue
                self._close(conn, *self._subflows_ended(conn), now, ev)
        # subflow entries of ended connections: after a linger, in the order they ended
        for lq in (self._lingering_unopened, self._lingering):
            while lq and now - lq[0][0] >= cfg.closed_linger:
                _t, sf = lq.popleft()
                if now - max(_t, sf.last_ts) < cfg.closed_linger:
                    lq.append((sf.last_ts, sf))  # still receiving late packets: look again later
                    break
                self._drop_subflow(sf)
        self._sweep(now)

    def _sweep(self, now: float, force: bool = False) -> None:
        """Loose entries (no connection, or plain TCP after a fallback) past their time: every 30 s,
        or at a limit (``force``) at most once a second: the sweep is O(table), and a flood hits
        the limit on every packet."""
        cfg = self.config
        if (force and now - self._last_sweep >= 1.0) or now - self._last_sweep >= 30.0:
            self._last_sweep = now
            dead = []
            for key, (sf, d) in self._sf.items():
                if d:
                    continue
                if sf.conn is not None and sf.conn.closed is None:
                    continue
                ref = sf.closed_ts if sf.closed_ts is not None else sf.last_ts
                linger = cfg.closed_linger if sf.closed_ts is not None else cfg.idle_timeout
                if sf.conn is None and not sf.plain:
                    linger = cfg.handshake_timeout
                if now - max(ref, sf.last_ts) >= linger:
                    dead.append(key)
            for key in dead:
                hit = self._sf.pop(key, None)
                self._sf.pop((key[2], key[3], key[0], key[1]), None)
                if hit is not None:
                    self._orphans.pop(hit[0].id, None)

    # -- read-only helpers (reactions: alerts, fast-close) ----------------------
    def connection_at(self, src: bytes, sport: int, dst: bytes, dport: int) -> Connection | None:
        """The live connection owning the subflow with this 4-tuple (either orientation), if any.

        An IDS alert names the emitted conversation, i.e. the initial subflow's 4-tuple.
        """
        hit = self._sf.get((src, sport, dst, dport))
        if hit is None or hit[0].conn is None or hit[0].conn.closed is not None:
            return None
        return hit[0].conn


@dataclass(frozen=True, slots=True)
class ConnectionClosedSummary(ConnectionClosed):
    """ConnectionClosed with the connection's log record attached."""

    summary: dict[str, Any] = field(default_factory=dict)


class _Opts:
    """The MPTCP options of one segment, by subtype (first of each kind wins)."""

    __slots__ = ("cap", "join", "dss", "add_addr", "remove", "prio", "fail", "fastclose", "tcprst", "rare")

    def __init__(self) -> None:
        self.rare = False  # any option but DSS
        self.cap: m.MpCapable | None = None
        self.join: m.MpJoin | None = None
        self.dss: m.Dss | None = None
        self.add_addr: m.AddAddr | None = None
        self.remove: m.RemoveAddr | None = None
        self.prio: m.MpPrio | None = None
        self.fail: m.MpFail | None = None
        self.fastclose: m.MpFastclose | None = None
        self.tcprst: m.MpTcpRst | None = None

    def add(self, opt: m.MptcpOption) -> None:
        if isinstance(opt, m.Dss):
            if self.dss is None:
                self.dss = opt
            return
        self.rare = True
        if isinstance(opt, m.MpCapable):
            self.cap = self.cap or opt
        elif isinstance(opt, m.MpJoin):
            self.join = self.join or opt
        elif isinstance(opt, m.AddAddr):
            self.add_addr = self.add_addr or opt
        elif isinstance(opt, m.RemoveAddr):
            self.remove = self.remove or opt
        elif isinstance(opt, m.MpPrio):
            self.prio = self.prio or opt
        elif isinstance(opt, m.MpFail):
            self.fail = self.fail or opt
        elif isinstance(opt, m.MpFastclose):
            self.fastclose = self.fastclose or opt
        elif isinstance(opt, m.MpTcpRst):
            self.tcprst = self.tcprst or opt


_NO_OPTS = _Opts()
