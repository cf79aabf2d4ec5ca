"""Fuzz targets shared by the CI fuzz tests (hypothesis) and ``benchmarks/fuzz.py`` (long runs, atheris).

Every target takes one ``bytes`` input, so a coverage-guided engine (atheris)
and hypothesis drive the same code. A target returns normally when the code
under test behaved; anything it raises is a finding: an exception escaping
the code under test, or an ``AssertionError`` for a broken invariant (state
over its configured limit, an emitted frame with a wrong checksum, ...).

Why these invariants: the core runs inline on traffic an attacker controls,
so "never raises, never grows past its limits" is the security property, not
a nicety.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from mproxy.config import ConfigError, parse_config
from mproxy.core.events import Event
from mproxy.core.gateway import Gateway
from mproxy.core.pipeline import Pipeline
from mproxy.core.policy import Action, Policy
from mproxy.core.tracker import (
    _JOIN_FLOOD_KEYS, _MAX_MAPPINGS, _TOKEN_SHARERS, _UNMAPPED_SHED_RANGES, Tracker, TrackerConfig,
)
from mproxy.io.pcap import _XZ_MEMLIMIT, CaptureError, CaptureReader, PcapWriter, read_captures
from mproxy.wire import mptcp as m
from mproxy.wire.build import build_tcp, tcp_options
from mproxy.wire.checksum import ones_sum, pseudo_header_sum
from mproxy.wire.errors import WireError
from mproxy.wire.packet import ACK, FIN, PSH, RST, SYN, LinkType, TcpSegment, mptcp_spans, option_spans, \
    parse_frame

from tests.core.session import Session

Target = Callable[[bytes], None]


# --------------------------------------------------------------------------- input reader
class Reader:
    """Consumes a fuzz input as a stream of small integers (zeros once exhausted), like
    libFuzzer's FuzzedDataProvider: every byte string is a valid program."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "big")

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def pick(self, seq: Any) -> Any:
        return seq[self.u8() % len(seq)]

    def chance(self, in256: int) -> bool:
        return self.u8() < in256


# --------------------------------------------------------------------------- seeds
def link_wrap(linktype: int, ip: bytes) -> bytes:
    """``ip`` framed as ``linktype`` (what a capture of that type holds)."""
    v6 = ip[:1] and ip[0] >> 4 == 6
    et = b"\x86\xdd" if v6 else b"\x08\x00"
    if linktype == LinkType.ETHERNET:
        return b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01" + b"\x81\x00\x00\x07" + et + ip  # with a VLAN tag
    if linktype == LinkType.LINUX_SLL:
        return struct.pack("!HHH8s", 0, 1, 6, b"\x02\0\0\0\0\x01") + et + ip
    if linktype == LinkType.LINUX_SLL2:
        return et + b"\0\0" + struct.pack("!IHBB8s", 2, 1, 0, 6, b"\x02\0\0\0\0\x01") + ip
    if linktype == LinkType.NULL:
        return struct.pack("<I", 24 if v6 else 2) + ip
    if linktype == LinkType.LOOP:
        return struct.pack("!I", 24 if v6 else 2) + ip
    return ip


LINKTYPES = tuple(int(t) for t in LinkType)


def option_seeds() -> list[bytes]:
    """One encoded option of every subtype and shape."""
    k1, k2 = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    opts: list[m.MptcpOption] = [
        m.MpCapable(1, m.CAP_H_HMAC), m.MpCapable(0, 0x81, k1), m.MpCapable(1, 0x01, k1, k2),
        m.MpCapable(1, 0x81, k1, k2, 1000, 0xBEEF), m.MpCapable(1, 0x01, k1, k2, 7),
        m.MpJoin(m.JoinPhase.SYN, True, 3, 0xDEADBEEF, 0x1234), m.MpJoin(m.JoinPhase.SYN_ACK, False, 1, None, 9, b"12345678"),
        m.MpJoin(m.JoinPhase.ACK, hmac=bytes(range(20))),
        m.dss(5), m.dss(5, ack64=False), m.dss(1, 2, 3, 4), m.dss(None, 2**40, 1, 1460, checksum=0x1234),
        m.dss(7, 9, 0, 1, data_fin=True, dsn64=False, ack64=False),
        m.AddAddr(0, 2, bytes(4)), m.AddAddr(0, 2, bytes(16), 80), m.AddAddr(1, 5, bytes(4), None, False, 77),
        m.AddAddr(1, 5, bytes(16), 443, True), m.AddAddr(1, 1, bytes(4), 8080, False, 1),
        m.RemoveAddr((1, 2, 3)), m.MpPrio(True), m.MpPrio(False, 4), m.MpFail(2**63), m.MpFastclose(k2),
        m.MpTcpRst(1, 3),
    ]
    return [o.encode() for o in opts]


def packet_seeds() -> list[bytes]:
    """IP packets of real-looking MPTCP sessions (v0/v1, IPv4/IPv6, checksums, joins, data, FIN)."""
    out: list[bytes] = []
    for version, ipver, csum in ((1, 4, False), (0, 6, True), (1, 6, True)):
        s = Session(version, ipver, csum=csum)
        out += s.handshake()
        out += s.join(1)
        out.append(s.data(0, True, 0, b"GET / HTTP/1.1\r\n"))
        out.append(s.data(1, False, 0, b"HTTP/1.1 200 OK\r\n"))
        out.append(s.data_fin(0, True, 16))
        out.append(s.rst(1, False, [m.MpFastclose(s.ck).encode()]))
    return out


def capture_seeds() -> list[bytes]:
    """Small pcap and pcapng files (both byte orders) holding a short MPTCP session."""
    import io

    pkts = packet_seeds()[:9]
    caps: list[bytes] = []
    for lt in (LinkType.ETHERNET, LinkType.RAW, LinkType.LINUX_SLL2):
        buf = io.BytesIO()
        w = PcapWriter(buf, int(lt))
        for i, p in enumerate(pkts):
            w.write(1000.0 + i / 1000, link_wrap(lt, p))
        caps.append(buf.getvalue())
    for endian in "<>":
        caps.append(pcapng_bytes([(link_wrap(LinkType.ETHERNET, p), 1_000_000 + i) for i, p in enumerate(pkts)],
                                 endian))
    # compressed captures: the decoders' damage handling (gzip, xz; bzip2 takes the same path)
    import gzip
    import lzma

    caps += [gzip.compress(caps[0]), lzma.compress(caps[-1])]
    return caps


def _ng_block(btype: int, body: bytes, endian: str) -> bytes:
    body += bytes(-len(body) % 4)
    n = 12 + len(body)
    return struct.pack(endian + "II", btype, n) + body + struct.pack(endian + "I", n)


def pcapng_bytes(frames: list[tuple[bytes, int]], endian: str = "<", linktype: int = 1) -> bytes:
    """A pcapng section: SHB, one IDB (µs, with an if_tsresol option), EPBs and one SPB."""
    out = _ng_block(0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1), endian)
    opts = struct.pack(endian + "HH", 9, 1) + b"\x06\0\0\0" + struct.pack(endian + "HH", 0, 0)
    out += _ng_block(1, struct.pack(endian + "HHI", linktype, 0, 0) + opts, endian)
    for data, ticks in frames:
        out += _ng_block(6, struct.pack(endian + "IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data))
                         + data, endian)
    if frames:
        out += _ng_block(3, struct.pack(endian + "I", len(frames[0][0])) + frames[0][0], endian)
    return out


CONFIG_SEED = """
[queue]
num = 3
max_len = 128
fail = "closed"
[rules]
manage = false
hook = "FORWARD"
in_interfaces = ["eth0"]
[tracker]
max_connections = 10
idle_timeout = 60.0
ooo_limit = 65536
[policy]
default = "inspect"
trusted_networks = ["198.18.0.0/15", "2001:db8::/32"]
untrusted_join = "downgrade"
[[policy.rule]]
name = "web"
action = "verify-joins"
client = "198.18.1.0/24"
server = ["198.18.10.0/24"]
ports = [80, "8000-8080"]
[sink]
pcap = "/tmp/x"
pcap_keep = 2
[log]
events = "-"
level = "debug"
log_keys = false
[metrics]
listen = "127.0.0.1:9464"
[inspector]
mode = "off"
rules = "mproxy.rules"
window = 4096
[alerts]
files = ["/nonexistent/eve.json"]
poll_interval = 0.25
[actions]
on_match = ["fastclose", "log"]
on_alert = "log"
downgrade_host_seconds = 60.0
"""


ALERT_SEEDS = [
    b'{"timestamp":"2024-01-01T00:00:00.000000+0000","event_type":"alert","src_ip":"198.18.1.2","src_port":40000,'
    b'"dest_ip":"198.18.10.2","dest_port":80,"proto":"TCP","alert":{"signature_id":2000001,"rev":1,'
    b'"signature":"SQLi UNION SELECT","gid":1}}',
    b'{"event_type":"alert","src_ip":"2001:db8:1::2","src_port":"40000","dest_ip":"2001:db8:10::2",'
    b'"dest_port":443,"proto":"6","alert":{"signature_id":1}}',
    b'{"event_type":"flow","src_ip":"198.18.1.2"}',
    b'{"src_ap":"198.18.1.2:40000","dst_ap":"198.18.10.2:80","proto":"TCP","msg":"sqli","sid":1000001,"gid":1,'
    b'"rev":2}',
    b'{"src_ap":"2001:db8:1::2:40000","dst_ap":"[2001:db8:10::2]:80","proto":"TCP","msg":"x","sid":"5"}',
    b'{"src_addr":"198.18.1.2","src_port":1,"dst_addr":"198.18.10.2","dst_port":2,"proto":"TCP","msg":"m"}',
]


# --------------------------------------------------------------------------- mutation
def mutate(seed: bytes, r: Reader, rounds: int | None = None) -> bytes:
    """Byte-level mutations (flip, set, insert, delete, duplicate, truncate, interesting values)."""
    buf = bytearray(seed)
    n = r.u8() % 8 + 1 if rounds is None else rounds
    for _ in range(n):
        op = r.u8() % 8
        at = r.uint(3) % (len(buf) + 1)
        if op == 0 and buf:
            buf[at % len(buf)] ^= 1 << (r.u8() % 8)
        elif op == 1 and buf:
            buf[at % len(buf)] = r.u8()
        elif op == 2:
            buf[at:at] = r.take(r.u8() % 16)
        elif op == 3:
            del buf[at : at + r.u8() % 32 + 1]
        elif op == 4:
            piece = buf[at : at + r.u8() % 64]
            buf[at:at] = piece
        elif op == 5:
            del buf[at:]
        elif op == 6 and len(buf) >= 4:
            # a 32-bit field set to a boundary value: lengths that lie, counters that wrap
            val = r.pick((0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFF, 0x10000, 256 * 1024 + 1))
            at %= len(buf) - 3
            buf[at : at + 4] = val.to_bytes(4, r.pick(("big", "little")))
        elif op == 7 and len(buf) >= 2:
            at %= len(buf) - 1
            buf[at : at + 2] = r.pick((0, 1, 0xFFFF, 0x7FFF, 20, 40)).to_bytes(2, "big")
    return bytes(buf)


# --------------------------------------------------------------------------- wire
def check_segment(seg: TcpSegment) -> None:
    """Invariants of a parsed segment: every view lies inside the packet; option walks agree."""
    n = len(seg.ip)
    assert 0 <= seg.tcp_off and seg.tcp_off + 20 <= n, (seg.tcp_off, n)
    assert seg.payload_off + seg.payload_len <= n and seg.payload_len >= 0
    assert seg.hdr_len >= 20 and seg.payload_off == seg.tcp_off + seg.hdr_len
    assert len(seg.payload) == seg.payload_len
    assert seg.wire_payload_len >= 0
    assert len(seg.options) == seg.hdr_len - 20
    spans = mptcp_spans(seg)
    allspans = option_spans(seg.options)
    assert isinstance(spans, WireError) == isinstance(allspans, WireError), (spans, allspans)
    if isinstance(spans, WireError):
        return
    assert isinstance(allspans, list)
    assert [seg.tcp_off + 20 + s for k, s, _ in allspans if k == 30] == [o for o, _ in spans]
    for off, ln in spans:
        check_option(bytes(seg.ip[off : off + ln]), seg.flags)
    _ = seg.src_text, seg.dst_text, seg.truncated


def check_option(raw: bytes, flags: int) -> None:
    """Decode never raises; what decodes re-encodes to the same bytes (the codec is lossless)."""
    opt = m.decode(raw, flags)
    if isinstance(opt, WireError):
        assert str(opt)
        return
    assert m.encode(opt) == raw, (raw.hex(), opt)
    assert opt.length == len(raw)


def target_frame(data: bytes) -> None:
    """``parse_frame`` for every link type (first byte picks it; unknown numbers included)."""
    if not data:
        return
    lt = LINKTYPES[data[0] % len(LINKTYPES)] if data[0] < 200 else data[0] * 7
    res = parse_frame(lt, data[1:], 1.0)
    if isinstance(res, TcpSegment):
        check_segment(res)
    else:
        assert res is None or isinstance(res, WireError), res


def target_option(data: bytes) -> None:
    """``mptcp.decode`` on arbitrary option bytes (first byte: the TCP flags); kind and length
    byte forced right half of the time so the subtype parsers see most of the input."""
    if not data:
        return
    flags, raw = data[0], bytearray(data[1:42])
    if flags & 1 and len(raw) >= 2:
        raw[0], raw[1] = 30, len(raw)
    check_option(bytes(raw), flags >> 1 if flags & 1 else flags)


def frame_input(r: Reader) -> bytes:
    """A fuzz input for :func:`target_frame` built from a valid packet, mutated (for hypothesis)."""
    seeds = _SEEDS()
    lt = r.u8() % len(LINKTYPES)
    return bytes((lt,)) + mutate(link_wrap(LINKTYPES[lt], r.pick(seeds["packets"])), r)


# --------------------------------------------------------------------------- pcap
MAX_READ_SECONDS = 5.0


def target_capture(data: bytes) -> None:
    """``read_captures`` on a (damaged) capture file: frames or CaptureError, nothing else; no
    hang; memory bounded whatever the lengths in the file claim. The frames then go through
    the replay pipeline (their bytes are as hostile as the file)."""
    fd, path = tempfile.mkstemp(prefix="mproxy-fuzz-", suffix=".pcap")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        readers: list[CaptureReader] = []
        pipe = Pipeline(_small_config())
        t0 = time.monotonic()
        tracing = not tracemalloc.is_tracing()
        if tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        frames = 0
        try:
            for fr in read_captures([path], readers):
                frames += 1
                assert len(fr.data) <= 256 * 1024 + 64
                pipe.feed(fr.linktype, fr.data, fr.ts)
                assert time.monotonic() - t0 < MAX_READ_SECONDS, "capture reading does not finish"
            pipe.finish()
        except CaptureError as e:
            assert path in str(e)
        peak = tracemalloc.get_traced_memory()[1] - base
        if tracing:
            tracemalloc.stop()
        # one frame buffer (<= MAX_FRAME) plus the pipeline's small state; never what a length claims.
        # A compressed file adds its decoder: bzip2 up to ~3.6 MB, xz the dictionary the file asks for,
        # refused over _XZ_MEMLIMIT
        kinds = {r.compression for r in readers}
        decoder = _XZ_MEMLIMIT if "xz" in kinds else 4 * 1024 * 1024 if "bzip2" in kinds else 0
        assert peak < 4 * 1024 * 1024 + 8 * len(data) + decoder, f"{peak} bytes for a {len(data)}-byte file"
        decoded = max((r._decoded.out for r in readers if r._decoded is not None), default=0)
        assert frames <= max(len(data), decoded) // 12 + 1
        for r in readers:
            assert all(isinstance(p, str) for p in r.problems)
        check_bounded(pipe.tracker)
    finally:
        os.unlink(path)


def capture_input(r: Reader) -> bytes:
    return mutate(r.pick(_SEEDS()["captures"]), r)


# --------------------------------------------------------------------------- config
def target_config(data: bytes) -> None:
    """``parse_config`` on arbitrary text: a Config or ConfigError (naming something), nothing else."""
    from mproxy.io import netfilter

    text = data.decode("utf-8", "replace")
    try:
        cfg = parse_config(text, "fuzz.toml")
        netfilter.validate(cfg)
        netfilter.render(cfg)
    except ConfigError as e:
        assert str(e)
        return
    t = cfg.tracker
    for name in ("idle_timeout", "handshake_timeout", "closed_linger", "gap_grace", "join_flood_window"):
        v = getattr(t, name)
        assert v == v and v != float("inf"), f"[tracker] {name} = {v} accepted"
    Tracker(t)


def config_input(r: Reader) -> bytes:
    """The example config with TOML-level edits (values swapped for other types, keys renamed,
    lines dropped) and then byte mutations."""
    lines = CONFIG_SEED.strip().splitlines()
    values = ('"x"', "-1", "0", "1e309", "nan", "inf", "-inf", "true", "[]", "[1, 2]", "{a = 1}", '"65536"',
              "9223372036854775807", "-9223372036854775808", '"1-2-3"', '["not-a-net"]', "1979-05-27",
              '"::1:0"', '"[::1]:9464"', '"open"', '"closed"', '"allow"', '"a-b"', "[[1]]", '"0x4D50"', "0.5",
              '"5-3"', "[0]", "[65536]", '"udp"', "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]")
    for _ in range(r.u8() % 6):
        i = r.u8() % len(lines)
        op = r.u8() % 4
        if op == 0 and "=" in lines[i]:
            lines[i] = lines[i].split("=", 1)[0] + "= " + r.pick(values)
        elif op == 1:
            del lines[i]
            if not lines:
                lines = ["[queue]"]
        elif op == 2:
            lines.insert(i, r.pick(("[x]", "[tracker.y]", "[[policy.rule]]", "bogus = 1", "[policy]",
                                    "action = \"inspect\"", "ports = 80", "[queue]")))
        else:
            lines[i] = lines[i].replace("_", r.pick(("", "-", "__")))
    text = "\n".join(lines).encode()
    return mutate(text, r) if r.chance(96) else text


# --------------------------------------------------------------------------- alerts
def target_alert(data: bytes) -> None:
    """The IDS alert-line parser: an Alert or None (counted), never an exception."""
    from mproxy.core.alerts import Alert, AlertStats, parse_alert_line

    stats = AlertStats()
    for line in (data, data.decode("utf-8", "replace")):
        res = parse_alert_line(line, stats)
        assert res is None or isinstance(res, Alert), res
        if res is not None:
            assert len(res.src) in (4, 16) and len(res.dst) == len(res.src)
            assert 0 <= res.sport <= 65535 and 0 <= res.dport <= 65535
            res.reason()
    assert stats.lines <= 2 and stats.alerts + stats.ignored + sum(stats.malformed.values()) == stats.lines
    json.dumps(stats.as_dict())


def alert_input(r: Reader) -> bytes:
    """A seed line with a JSON value replaced by another type or a hostile string, then mutated."""
    seed = r.pick(ALERT_SEEDS)
    if r.chance(128):
        try:
            obj = json.loads(seed)
        except ValueError:
            obj = {}
        keys = list(obj)
        odd = (None, True, 1.5, -1, 2**70, "", "x" * 300, [], {}, {"a": []}, "198.18.1.2:99999", "::", "1.2.3.4%eth0",
               "[::1]:5", "nan", float("inf"), "65536", "TCP", 6, "tcp")
        for _ in range(r.u8() % 4 + 1):
            if keys:
                obj[r.pick(keys)] = copy.deepcopy(r.pick(odd))
            if isinstance(obj.get("alert"), dict):
                obj["alert"]["signature_id"] = copy.deepcopy(r.pick(odd))
        seed = json.dumps(obj).encode()
    return mutate(seed, r) if r.chance(128) else seed


# --------------------------------------------------------------------------- tracker + pipeline
def _small_config() -> TrackerConfig:
    """Tiny limits so a short input can reach every one of them."""
    return TrackerConfig(max_connections=4, max_subflows=10, max_subflows_per_connection=3, idle_timeout=20.0,
                         handshake_timeout=5.0, closed_linger=3.0, ooo_limit=4096, pending_limit=2048,
                         memcap=6000, history=512, history_memcap=2000, join_flood_threshold=4,
                         join_flood_window=2.0, syn_flood_threshold=2, syn_flood_window=2.0)


from mproxy.core.reassembler import GAPS_LISTED, PIECE_COST, SLACK  # noqa: E402
from mproxy.core.tracker import _MAX_HELD as MAX_HELD  # noqa: E402
from mproxy.core.tracker import _MAX_LATE as MAX_LATE  # noqa: E402
from mproxy.core.tracker import _MAX_OFO as MAX_OFO  # noqa: E402


def buffered_pieces(tr: Tracker) -> int:
    """Out-of-order chunks, unmapped pieces, kept past-the-edge packets, packets kept after a hole in
    their subflow and data kept past the connection-level window that the live connections hold
    (each pays PIECE_COST)."""
    return sum(len(st._chunks) for c in tr.connections.values() for st in c.streams) + sum(
        len(c.beyond or ()) for c in tr.connections.values()) + sum(
        len(sd.pending) + len(sd.late or ()) + len(sd.ofo or ())
        for c in tr.connections.values() for sf in c.subflows for sd in sf.dirs)


def check_bounded(tr: Tracker) -> None:
    """Every piece of tracker state is within its configured limit and internally consistent."""
    cfg = tr.config
    assert len(tr.connections) <= cfg.max_connections, len(tr.connections)
    assert len(tr._sf) <= 2 * cfg.max_subflows, len(tr._sf)
    assert len(tr._join_windows) <= _JOIN_FLOOD_KEYS
    live = set(tr.connections)
    for tok, lst in tr._tokens.items():
        assert lst, tok
        assert len(lst) <= _TOKEN_SHARERS, (tok, len(lst))
        for c in lst.values():
            assert c.id in live, f"token 0x{tok:x} keeps closed connection {c.id}"
    for bucket, cs in tr._dsn_index.items():
        assert cs, bucket
        for c in cs.values():
            assert c.id in live and bucket in c.dsn_at, (bucket, c.id)
    for entry, at in tr._announcers.items():
        assert at, entry
        for _seq, c in at.values():
            assert c.id in live and any(entry in ann.values() for ann in c.announced), (entry, c.id)
    assert len(tr._lingering) <= cfg.max_subflows and len(tr._lingering_unopened) <= cfg.max_subflows
    assert set(tr._half_open) <= live and all(not c.opened for c in tr._half_open.values())
    assert all(tr._sf.get(sf.key, (None,))[0] is sf and sf.conn is None for sf in tr._orphans.values())
    for conn in tr.connections.values():
        assert conn.closed is None
        assert len(conn.subflows) <= cfg.max_subflows_per_connection, (conn.id, len(conn.subflows))
        assert len(conn.held) <= MAX_HELD, len(conn.held)
        beyond = conn.beyond or ()
        assert conn.late == sum(len(sd.late or ()) for sf in conn.subflows for sd in sf.dirs) + len(beyond), conn.late
        assert conn.beyond is None or 0 < len(beyond) <= MAX_LATE, beyond
        for held in beyond:
            st = conn.streams[held.cdir]
            assert held.cost == len(held.data) + PIECE_COST and st.wnd_end is not None
        for cdir in (0, 1):
            assert sum(len(h.data) for h in beyond if h.cdir == cdir) <= conn.streams[cdir].ooo_limit
        for st in conn.streams:
            # held bytes (let through before their mapping) are placed past ooo_limit, under the budget
            assert 0 <= st.ooo_bytes <= max(st.ooo_limit, cfg.memcap + SLACK), (st.ooo_bytes, st.ooo_limit)
            assert st.ooo_bytes == sum(len(c) for c in st._chunks.values())
            assert sorted(st._starts) == st._starts and set(st._starts) == set(st._chunks)
            assert len(st._history) <= 2 * max(st.history_limit, 1)
            assert len(st.gaps) <= GAPS_LISTED and len(st._shed or ()) <= 64 and st.gap_bytes >= sum(g.length for g in st.gaps)
            if st.base is not None:
                assert st.base >= 0  # a position: starts at a 64-bit DSN, only grows (wraps are unwrapped)
    seen: set[int] = set()
    for sf, _d in tr._sf.values():
        if id(sf) in seen:
            continue
        seen.add(id(sf))
        for sd in sf.dirs:
            assert 0 <= sd.pending_bytes <= cfg.pending_limit, (sd.pending_bytes, cfg.pending_limit)
            assert sd.pending_bytes == sum(len(v) for v in sd.pending.values())
            assert len(sd.mappings) <= _MAX_MAPPINGS + 1, len(sd.mappings)
            assert sd.shed is None or 0 < len(sd.shed) <= _UNMAPPED_SHED_RANGES, sd.shed
            assert len(sd.placed) <= 17
            assert sd.late is None or 0 < len(sd.late) <= MAX_LATE, sd.late
            assert sd.late_bytes == sum(k.seg.payload_len for k in sd.late or ())
            assert sd.ofo is None or 0 < len(sd.ofo) <= MAX_OFO, sd.ofo
            assert sd.ofo_bytes == sum((h.end - h.seq) & 0xFFFFFFFF for h in sd.ofo or ())
            if sd.ofo:  # after the subflow's next byte, in sequence order, each starting after the last's start
                rn = sd.rcv_nxt if sd.rcv_nxt is not None else ((sd.isn or 0) + 1) & 0xFFFFFFFF
                starts = [(h.seq - rn) & 0xFFFFFFFF for h in sd.ofo]
                assert all(0 < x < 0x80000000 for x in starts) and starts == sorted(set(starts)), starts
                assert sf.conn is not None and sf in sf.conn.subflows  # (what it holds is in the budget)
            for mp in sd.mappings:
                assert mp.acc is None or len(mp.acc) <= 0xFFFF
    # the shared budget counts exactly what the live connections buffer (a drift either way would
    # starve reassembly or lift the cap), and only they buffer anything
    # (what must not be refused -- the mapping a stream waits for, held bytes let through -- may take
    # it past the cap by SLACK)
    assert tr.budget.used == sum(tr.buffered_bytes()) + PIECE_COST * buffered_pieces(tr) <= cfg.memcap + SLACK, \
        (tr.budget.used, tr.buffered_bytes(), buffered_pieces(tr))
    # histories: counted exactly, over their cap by at most what one packet released (the cap is
    # enforced before the next packet)
    hist = sum(len(st._history) for c in tr.connections.values() for st in c.streams)
    assert tr.history_budget.used == hist <= cfg.history_memcap + 4 * cfg.history, (tr.history_budget.used, hist)
    for sf in {id(sf): sf for sf, _d in tr._sf.values()}.values():
        if sf.conn is None or sf.conn.closed is not None:
            assert all(not sd.pending and not sd.late and all(mp.acc is None for mp in sd.mappings)
                       for sd in sf.dirs), sf.key
            if sf.conn is not None:
                assert all(st.ooo_bytes == 0 and not st._chunks and not st._history for st in sf.conn.streams), \
                    sf.conn.id
                assert sf.conn.beyond is None and not sf.conn.late, sf.conn.id


def check_frame(ts: float, frame: bytes) -> None:
    """An emitted frame is Ethernet + IP + TCP with exact checksums, no MPTCP option, <= 1460 bytes."""
    seg = parse_frame(LinkType.ETHERNET, frame, ts)
    assert isinstance(seg, TcpSegment), seg
    ip = seg.ip
    assert not seg.truncated
    tcp = bytes(ip[seg.tcp_off :])
    if seg.ipver == 4:
        assert ones_sum(ip[:20]) == 0xFFFF, "IPv4 header checksum"
    assert ones_sum(tcp, pseudo_header_sum(seg.src, seg.dst, 6, len(tcp))) == 0xFFFF, "TCP checksum"
    assert seg.payload_len <= 1460 and mptcp_spans(seg) == []


def _ops_packets(r: Reader) -> tuple[list[tuple[float, bytes]], int]:
    """Interpret the input as a program over up to three synthetic MPTCP sessions: handshakes,
    joins (forged or not), data with arbitrary mappings, acks, DATA_FIN, FIN/RST, duplicates,
    mutations, snaplen cuts, raw option junk, time jumps. Returns (ts, IP packet) pairs."""
    hdr = r.u8()
    sessions = []
    for i in range(hdr % 3 + 1):
        sessions.append(Session(version=(hdr >> 2) & 1, ipver=6 if (hdr >> 3) & 1 and i == 0 else 4,
                                csum=bool((hdr >> 4) & 1), dsn64=not (hdr >> 5) & 1, sport=40000 + 100 * i,
                                client_key=0x1122334455667788 + i * 0x1000, server_key=0x99AABBCCDDEEFF00 - i))
    out: list[tuple[float, bytes]] = []
    ts = 1000.0
    for _ in range(200):
        if r.left <= 0:
            break
        op = r.u8() % 16
        s = r.pick(sessions)
        ts += r.u8() / 1000
        try:
            pkts = _op(op, s, r, out)
        except (IndexError, ValueError, OverflowError, struct.error):
            continue  # the DSL refused (no such subflow, options too long): the program moves on
        if op == 15:
            ts += r.uint(2) * (1 if r.chance(200) else -1)  # time jumps, also backwards
        out.extend((ts, p) for p in pkts)
    return out, hdr


def _op(op: int, s: Session, r: Reader, out: list[tuple[float, bytes]]) -> list[bytes]:
    subs = s.subs
    if op in (0, 1) and len(subs) < 5:
        if op == 0 or not subs:
            return s.handshake() if len(subs) == 0 or r.chance(40) else s.handshake()[:r.u8() % 3]
        j = s.join(r.u8() % 3, bad_hmac=r.chance(40), token=r.uint(4) if r.chance(30) else None,
                   addr_id=r.u8(), backup=r.chance(60))
        return j[: r.u8() % 4] if r.chance(60) else j
    if not subs:
        return []
    sf = r.u8() % len(subs)
    c2s = r.chance(160)
    if op in (2, 3, 4, 5):  # data, mostly plausible offsets, sometimes anything
        offset = r.uint(2) if op != 5 else r.uint(8)
        n = r.u8() * (r.u8() % 8 + 1) % 1600
        payload = bytes((offset + i) & 0xFF for i in range(n)) if r.chance(220) else r.take(n).ljust(n, b"Z")
        kw: dict[str, Any] = {}
        if op == 3:
            kw["map_len"] = r.uint(2)
            kw["map_rel"] = r.uint(4) if r.chance(50) else None
        if op == 4:
            kw["rel"] = r.uint(4) if r.chance(60) else s.subs[sf].next_rel[0 if c2s else 1] - r.u8()
            kw["mapping"] = r.chance(200)
            kw["fin"] = r.chance(40)
        if r.chance(60):
            kw["data_ack"] = s.idsn[1 if c2s else 0] + r.uint(3)
        return [s.data(sf, c2s, offset, payload, **kw)]
    if op == 6:
        return [s.data_fin(sf, c2s, r.uint(2))]
    if op == 7:
        return [s.ack(sf, c2s, s.idsn[1 if c2s else 0] + r.uint(3) - 1000)]
    if op == 8:
        return [s.fin(sf, c2s) if r.chance(128) else s.rst(sf, c2s, [m.MpFastclose(s.sk).encode()] if r.chance(60)
                                                          else None)]
    if op == 9 and out:  # a duplicate of an earlier packet
        return [out[r.uint(2) % len(out)][1]]
    if op == 10 and out:  # a damaged copy of an earlier packet
        return [mutate(out[r.uint(2) % len(out)][1], r, rounds=r.u8() % 3 + 1)]
    if op == 11 and out:  # snaplen cut: captured bytes end before the IP length says
        p = out[r.uint(2) % len(out)][1]
        return [p[: max(40, len(p) - r.u8() - 1)]]
    if op == 12:  # raw option junk between the session's addresses
        sub = subs[sf]
        raw = b"\x1e" + bytes((r.u8() % 40,)) + r.take(r.u8() % 38)
        flags = r.pick((SYN, SYN | ACK, ACK, ACK | PSH, FIN | ACK, RST))
        return [build_tcp(sub.client[0], sub.server[0], sub.client[1], sub.server[1], r.uint(4), r.uint(4),
                          flags, r.uint(2), tcp_options(raw[:40]), r.take(r.u8() % 64))]
    if op == 13:  # MP_CAPABLE / ADD_ADDR / REMOVE_ADDR / MP_PRIO / MP_FAIL on a data packet
        opt = r.pick((m.AddAddr(1, r.u8(), s.addr(3, r.u8() % 3), None, r.chance(60), r.uint(8)),
                      m.RemoveAddr((r.u8(), r.u8())), m.MpPrio(r.chance(128)), m.MpFail(r.uint(8)),
                      m.MpCapable(s.version, 1, s.ck, s.sk, r.u8(), None), m.MpTcpRst(1, r.u8())))
        sub = subs[sf]
        return [s._pkt(sub, c2s, ACK, [opt.encode()], r.take(r.u8() % 32))]
    if op == 14:  # a SYN retransmission flood on one tuple
        sub = subs[sf]
        syn = m.MpCapable(s.version, 1, None if s.version else s.ck)
        return [s._pkt(sub, True, SYN, [syn.encode()])] * (r.u8() % 40 + 1)
    return []


def target_pipeline(data: bytes) -> None:
    """Tracker + pipeline (or the inline gateway with a policy) over a program of packets:
    never an exception, state within the limits after every packet, emitted frames valid,
    log records JSON-serialisable."""
    r = Reader(data)
    packets, hdr = _ops_packets(r)
    cfg = _small_config()
    use_gw = (hdr >> 6) & 1
    if use_gw:
        action = list(Action)[r.u8() % len(Action)]
        gw = Gateway(Policy(default=action), cfg, passthrough=False)
        tracker, pipe = gw.tracker, gw.pipeline
    else:
        pipe = Pipeline(cfg, passthrough=False)
        tracker = pipe.tracker
        if (hdr ^ (hdr >> 5)) & 1:  # replay --rules: the inspector on every rebuilt stream
            from mproxy.core.inspector import Inspector
            from mproxy.core.rules import parse_rules

            pipe.inspector = Inspector(parse_rules("\n".join(
                ln.replace("sid:", f"sid:{i}0") for i, ln in enumerate(INSPECT_RULES))), window=512)
    wrap = (hdr >> 7) & 1
    records: list[dict[str, Any]] = []
    for ts, p in packets:
        if use_gw:
            d = gw.packet(p, ts)
            frames = d.frames
            records += gw.drain_records()
        else:
            frames = []
            for piece in _fragmented(p):  # some packets arrive as IP fragments, last first
                frames += pipe.feed(LinkType.ETHERNET if wrap else LinkType.RAW,
                                    link_wrap(LinkType.ETHERNET, piece) if wrap else piece, ts)
            records += pipe.drain_records()
            assert pipe.defrag.held <= pipe.defrag.limit
        for f in frames:
            check_frame(*f)
        check_bounded(tracker)
    tail = gw.flush(packets[-1][0] + 100 if packets else 0) if use_gw else pipe.finish()
    for f in tail:
        check_frame(*f)
    records += gw.drain_records() if use_gw else pipe.drain_records()
    assert not tracker.connections
    for rec in records:
        json.dumps(rec)


def _fragmented(p: bytes) -> list[bytes]:
    """The packet as IP fragments, last first, for one packet in four that is long enough
    (chosen by its own last byte, so the programs read from the input mean what they meant)."""
    if len(p) < 200 or p[-1] & 3 or p[0] >> 4 not in (4, 6):
        return [p]
    from ..fragments import frag_v4, frag_v6

    return list(reversed(frag_v4(p, [64, 128]) if p[0] >> 4 == 4 else frag_v6(p, [64, 128])))


def pipeline_input(r: Reader) -> bytes:
    return r.take(r.left)


# --------------------------------------------------------------------------- inspector
INSPECT_RULES = (
    r'alert tcp any any -> any any (msg:"a"; content:"union"; nocase; content:"select"; nocase; '
    r'pcre:"/union\s+select/i"; sid:1;)',
    r'alert tcp any any -> any 80 (msg:"b"; content:"GET "; depth:4; content:"/adm"; distance:0; within:20; sid:2;)',
    r'alert tcp any any -> any any (msg:"c"; content:"ab"; content:"ba"; distance:-3; within:4; sid:3;)',
    r'alert tcp any any -> any any (msg:"d"; content:"|00 00|"; offset:2; depth:6; sid:4;)',
    r'alert tcp any any <> any any (msg:"e"; pcre:"/x{3,}y/"; flow:to_client; sid:5;)',
    r'alert tcp any any -> any any (msg:"f"; content:"a"; content:"a"; distance:1; content:"b"; within:3; sid:6;)',
    r'alert tcp any any -> any any (msg:"g"; content:"|0d 0a|"; content:"key="; content:"x"; distance:2; sid:7;)',
)
_INSPECT_ALPHABET = (b"a", b"b", b"ab", b"union ", b"SELECT", b"GET ", b"/adm", b"\x00\x00", b"xxx", b"y",
                     b"\r\n", b"key=", b".")


def _inspect_rules(r: Reader) -> str:
    lines = [r.pick(INSPECT_RULES) for _ in range(r.u8() % 4 + 1)]
    lines = [ln.replace("sid:", f"sid:{i}0") for i, ln in enumerate(lines)]  # unique sids
    text = "\n".join(lines)
    return mutate(text.encode(), r).decode("latin-1") if r.chance(64) else text


def target_inspect(data: bytes) -> None:
    """The embedded inspector over a program of chunks on a few connection directions, with rules
    (mutated ones too) reloaded at random points: only RuleError from the rules, never an
    exception from feeding, each rule fires at most once per direction (across reloads), and the
    kept match ends stay within the window and the per-content cap."""
    from mproxy.core.events import Direction
    from mproxy.core.inspector import _OCCURRENCES, Inspector
    from mproxy.core.rules import RuleError, parse_rules

    r = Reader(data)
    window = r.pick((8, 64, 512, 4096))

    def build() -> Inspector | None:
        try:
            return Inspector(parse_rules(_inspect_rules(r)), window=window, pcre_window=r.pick((4, 64, 1024)))
        except RuleError:
            return None

    ins = build()
    if ins is None:
        return
    ends = ((bytes((198, 18, 1, 2)), 40000), (bytes((198, 18, 10, 2)), 80))
    fired: set[tuple[int, int, int]] = set()
    for _ in range(r.u8() % 40 + 1):
        op = r.u8() % 16
        if op < 12:
            chunk = b"".join(r.pick(_INSPECT_ALPHABET) if r.chance(200) else r.take(r.u8() % 8)
                             for _ in range(r.u8() % 24))
            if r.chance(16):
                chunk = chunk * (r.u8() % 64 + 1)  # floods of one content, chunks past the window
            conn, d = r.u8() % 3, Direction(r.u8() & 1)
            for hit in ins.feed(conn, d, chunk, *ends):
                key = (conn, int(d), hit.sid)
                assert key not in fired, key  # once per direction, reloads included
                fired.add(key)
        elif op < 14:
            new = build()
            if new is not None:  # a reload with rules that do not load changes nothing
                new.adopt(ins)
                ins = new
                # a fired rule stays fired where the new rules have its sid for that direction (a rule
                # removed, then added back, is a new rule)
                applying = {d: {ins.rules[i].sid for i in range(len(ins.rules))
                                if ins._applies(ins._dir(d, *ends), i)} for d in (0, 1)}
                fired = {k for k in fired if k[2] in applying[k[1]]}
        elif op == 14:
            gone = r.u8() % 3
            ins.close(gone)
            fired = {k for k in fired if k[0] != gone}  # a connection id used again starts afresh
        else:
            live = r.u8() % 3
            ins.retain({live})
            fired = {k for k in fired if k[0] == live}
        for st_ in ins._flows.values():
            for eid, lst in st_.occ.items():
                assert 0 < len(lst) <= _OCCURRENCES and lst == sorted(lst), (eid, lst)
                assert lst[-1] <= st_.offset and lst[0] >= st_.offset - 2 * window - 64, (lst, st_.offset)
            assert st_.partial <= {i for i, rule in enumerate(ins.rules) if rule.pcre is not None}


def inspect_input(r: Reader) -> bytes:
    return r.take(r.left)


# --------------------------------------------------------------------------- registry
_seed_cache: dict[str, list[bytes]] = {}


def _SEEDS() -> dict[str, list[bytes]]:  # noqa: N802 - a cached constant
    if not _seed_cache:
        _seed_cache["packets"] = packet_seeds()
        _seed_cache["options"] = option_seeds()
        _seed_cache["captures"] = capture_seeds()
    return _seed_cache


def alerts_available() -> bool:
    try:
        from mproxy.core.alerts import parse_alert_line  # noqa: F401
    except ImportError:
        return False
    return True


# name -> (target, builder of a structured input from raw fuzz bytes, seed inputs for atheris corpora)
TARGETS: dict[str, tuple[Target, Callable[[Reader], bytes]]] = {
    "frame": (target_frame, frame_input),
    "option": (target_option, lambda r: bytes((r.u8(),)) + mutate(r.pick(_SEEDS()["options"]), r)),
    "capture": (target_capture, capture_input),
    "config": (target_config, config_input),
    "pipeline": (target_pipeline, pipeline_input),
    "alert": (target_alert, alert_input),
    "inspect": (target_inspect, inspect_input),
}

__all__ = ["TARGETS", "Reader", "mutate", "check_bounded", "buffered_pieces", "check_frame", "alerts_available",
           "Event"]
