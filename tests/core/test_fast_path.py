"""The tracker's fast path (``Tracker._fast``) against its general path, side by side.

The fast path inlines the general path's steps for the dominant packet; these
tests feed the same packets to a tracker with it and one without it and
require identical events after every packet and identical state at the end.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from mproxy.core.tracker import Tracker, TrackerConfig
from mproxy.wire import mptcp as m
from mproxy.wire.packet import TcpSegment, parse_ip
from tests.fuzz.targets import Reader, _ops_packets, _small_config

from .session import MASK64, Session

_SETTINGS: dict[str, Any] = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _state(tr: Tracker) -> Any:
    """Everything a later packet or the log could see, as comparable values."""
    conns = []
    for c in tr.connections.values():
        streams = [(s.base, s.start, s.released, s.ooo_bytes, s.duplicate_bytes, s.fin_dsn, s.finished, s.acked,
                    list(s._starts), dict(s._chunks), bytes(s._history), s.sha.hexdigest(), list(s.gaps))
                   for s in c.streams]
        sfs = [(sf.id, sf.last_ts, sf.established, sf.closed_ts,
                [(sd.isn, sd.peer_ack, sd.peer_win, [(mp.ssn, mp.dsn, mp.length) for mp in sd.mappings],
                  dict(sd.pending), sd.last_map_ssn, sd.last_end, sd.placed, sd.placed_end, sd.bytes, sd.fin)
                 for sd in sf.dirs]) for sf in c.subflows]
        conns.append((c.id, c.last_ts, c.mapped, c.fin_emitted, c.gap_since, dict(c.notices), streams, sfs))
    st = tr.stats
    return (list(tr.connections), conns, st.packets, st.mptcp_packets, st.plain_packets, st.options,
            st.rebuilt_bytes, dict(st.notices), dict(st.decode_errors), st.out_of_window, tr.now)


def _twins(config: TrackerConfig | None = None) -> tuple[Tracker, Tracker]:
    fast, slow = Tracker(config), Tracker(config)
    slow.fast_path = False
    return fast, slow


def _side_by_side(packets: list[tuple[float, bytes]], config: TrackerConfig | None = None) -> None:
    """Feed both trackers the same packets: same events each time, same state, same flush."""
    fast, slow = _twins(config)
    for ts, p in packets:
        a, b = parse_ip(memoryview(p), ts), parse_ip(memoryview(p), ts)
        if not isinstance(a, TcpSegment) or not isinstance(b, TcpSegment):
            continue
        assert fast.process(a) == slow.process(b)
        assert _state(fast) == _state(slow)
    now = packets[-1][0] + 1000 if packets else 0.0
    assert fast.flush(now) == slow.flush(now)


_PROGRAMS = st.one_of(st.binary(min_size=16, max_size=3000),  # long programs come from a seed, as in test_fuzz
                      st.randoms(use_true_random=False).map(lambda r: r.randbytes(r.randint(500, 3000))))


@settings(max_examples=400, **_SETTINGS)
@given(_PROGRAMS, st.booleans())
def test_adversarial_programs_same_events_and_state(data: bytes, small: bool) -> None:
    """The fuzz target's programs (forged joins, arbitrary mappings, duplicates, mutations,
    snaplen cuts, time jumps): the fast path changes nothing observable."""
    packets, _hdr = _ops_packets(Reader(data))
    _side_by_side(packets, _small_config() if small else None)


@settings(max_examples=100, **_SETTINGS)
@given(
    c2s_len=st.integers(1, 40000),  # sizes, not st.binary: hypothesis keeps binaries short
    s2c_len=st.integers(0, 6000),
    nsub=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    version=st.sampled_from([0, 1]),
    dsn64=st.booleans(),
    disorder=st.sampled_from([0.0, 0.02, 0.1, 0.3]),
    reinject=st.sampled_from([0.0, 0.05, 0.3]),
    skew=st.sampled_from([0.0, 3.0, 12.0]),
    timestamps=st.booleans(),
    ack64=st.booleans(),
)
def test_mostly_in_order_traffic_same_events_and_state(c2s_len: int, s2c_len: int, nsub: int, seed: int, version: int,
                                                       dsn64: bool, disorder: float, reinject: float,
                                                       skew: float, timestamps: bool, ack64: bool) -> None:
    """Realistic traffic (mostly in order, Data ACKs, some reordering and reinjection, streams
    over 32-bit DSNs too): where the fast path takes most packets, it matches."""
    rnd = random.Random(seed)
    c2s, s2c = rnd.randbytes(c2s_len), rnd.randbytes(s2c_len)
    s = Session(version, dsn64=dsn64, client_key=0x1122334455667788 + seed, timestamps=timestamps, ack64=ack64)
    pk = s.handshake()
    for i in range(1, nsub):
        pk += s.join(i, addr_id=i)
    sent: list[tuple[int, bytes]] = []  # (subflow, packet)
    offs = [0, 0]
    streams = (c2s, s2c)
    while offs[0] < len(c2s) or offs[1] < len(s2c):
        d = 0 if offs[1] >= len(s2c) or (offs[0] < len(c2s) and rnd.random() < 0.8) else 1
        n = rnd.randint(1, rnd.choice((100, 1400)))
        chunk = streams[d][offs[d]: offs[d] + n]
        sf = rnd.randrange(nsub)
        sent.append((sf, s.data(sf, d == 0, offs[d], chunk, data_ack=s.idsn[d ^ 1] + offs[d ^ 1])))
        if rnd.random() < reinject and nsub > 1:
            sent.append(((sf + 1) % nsub, s.data((sf + 1) % nsub, d == 0, offs[d], chunk)))
        if rnd.random() < 0.3:
            sent.append((sf, s.ack(sf, d != 0, s.idsn[d] + offs[d] + len(chunk))))
        offs[d] += len(chunk)
    for i in range(len(sent) - 1):
        if rnd.random() < disorder:
            sent[i], sent[i + 1] = sent[i + 1], sent[i]
    # paths of different delay: one subflow's packets overtake another's, as on real multi-path links
    delay = [rnd.uniform(0, skew) for _ in range(nsub)]
    order = sorted(range(len(sent)), key=lambda i: i + delay[sent[i][0]])
    data = [sent[i][1] for i in order]
    data += [s.data_fin(0, True, len(c2s)), s.data_fin(0, False, len(s2c))]
    ts = 1000.0
    packets = []
    for p in pk + data:
        ts += 0.0001
        packets.append((ts, p))
    fast, slow = _twins()
    hits = 0
    real = fast._fast

    def counting(*a: Any) -> bool:
        nonlocal hits
        r = real(*a)
        hits += r
        return r

    fast._fast = counting  # type: ignore[method-assign]
    for t, p in packets:
        a, b = parse_ip(memoryview(p), t), parse_ip(memoryview(p), t)
        assert isinstance(a, TcpSegment) and isinstance(b, TcpSegment)
        assert fast.process(a) == slow.process(b)
    assert _state(fast) == _state(slow)
    assert fast.flush() == slow.flush()
    if not disorder and not reinject and not skew:
        assert hits >= len(data) - 2  # everything but the DATA_FINs


def test_in_order_packet_that_reaches_a_buffered_chunk_releases_both() -> None:
    """The second path's chunk arrives first and waits; the first path's packet fills the hole
    right up to it: one release of both, through the general path's drain."""
    s = Session(1)
    pk = s.handshake() + s.join(1)
    pk += [s.data(1, True, 100, b"b" * 100), s.data(0, True, 0, b"a" * 100), s.data(0, True, 200, b"c" * 50)]
    ts = 1000.0
    fast, slow = _twins()
    for p in pk:
        ts += 0.001
        a, b = parse_ip(memoryview(p), ts), parse_ip(memoryview(p), ts)
        assert isinstance(a, TcpSegment) and isinstance(b, TcpSegment)
        ea = fast.process(a)
        assert ea == slow.process(b)
    assert [len(e.data) for e in ea] == [50]
    assert _state(fast) == _state(slow) and fast.connections[1].streams[0].released == 250


@pytest.mark.parametrize("timestamps", [False, True])
def test_fast_path_takes_clean_traffic(timestamps: bool) -> None:
    """A plain in-order transfer goes through the fast path (or the benchmark means nothing)."""
    s = Session(1, timestamps=timestamps)
    pk = s.handshake()
    body = bytes(range(256)) * 40
    data = [s.data(0, True, off, body[off:off + 1000]) for off in range(0, len(body), 1000)]
    data.append(s.ack(0, False, s.idsn[0] + len(body)))
    fast = Tracker()
    calls: list[bool] = []
    real = fast._fast
    fast._fast = lambda *a: calls.append(real(*a)) or calls[-1]  # type: ignore[method-assign]
    ts = 1000.0
    for p in pk + data:
        ts += 0.001
        seg = parse_ip(memoryview(p), ts)
        assert isinstance(seg, TcpSegment)
        fast.process(seg)
    assert calls[-len(data):] == [True] * len(data)


@settings(max_examples=300, **_SETTINGS)
@given(st.integers(0, 0xFF), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 0xFFFF), st.integers(0, 15))
def test_dss_plain_layouts_read_what_decode_reads(flags: int, ack: int, dsn: int, ssn: int, dll: int,
                                                  rsv: int) -> None:
    """Every layout of ``DSS_PLAIN`` yields the fields ``mptcp.decode`` yields."""
    layout = m.DSS_PLAIN.get(flags & 0x1F)
    if layout is None:
        return
    ln, fmt, have = layout
    if not flags & m.DSS_a:
        ack &= 0xFFFFFFFF
    if not flags & m.DSS_m:
        dsn &= 0xFFFFFFFF
    fields = [v for v, bit in ((ack, 1), (dsn, 2), (ssn, 2), (dll, 2)) if have & bit]
    opt = bytes((30, ln, 0x20 | rsv, flags)) + fmt.pack(*fields)
    assert len(opt) == ln
    d = m.decode(opt, 0x10)
    assert isinstance(d, m.Dss) and not d.data_fin and d.checksum is None
    assert (d.data_ack, d.dsn, d.ssn, d.dll) == (ack if have & 1 else None, *((dsn, ssn, dll) if have & 2 else
                                                                              (None, None, None)))
    assert list(fmt.unpack_from(opt, 4)) == fields
    # two bytes longer is a DSS with a checksum: not a plain layout
    assert m.DSS_PLAIN[flags & 0x1F][0] != len(opt) + 2
    struct.calcsize(fmt.format)


@settings(max_examples=500, **_SETTINGS)
@given(flags=st.sampled_from(sorted(m.DSS_PLAIN)) | st.integers(0, 0xFF), bad_len=st.sampled_from([0, 0, 0, -2, 2, 1]),
       tail=st.lists(st.sampled_from([0, 1, 1, 2, 4, 30]), max_size=6).map(bytes) | st.binary(max_size=6), mutate=st.one_of(st.none(), st.none(), st.tuples(st.integers(0, 40),
                                                                                      st.integers(0, 255))),
       payload=st.sampled_from([0, 1, 100]))
@example(flags=0x0F, bad_len=0, tail=b"\x01\x05", mutate=None, payload=100)  # NOP, then a kind without length
@example(flags=0x0F, bad_len=0, tail=b"\x05\x02", mutate=None, payload=100)  # a 2-byte option after the DSS
@example(flags=0x0D, bad_len=0, tail=b"\x00\x1e", mutate=None, payload=100)  # EOL: the rest is ignored
@example(flags=0x03, bad_len=0, tail=b"\x01\x01\x01\x01", mutate=None, payload=0)  # more padding than Linux's
@example(flags=0x0F, bad_len=0, tail=b"", mutate=(2, 5), payload=100)  # not a timestamp option
@example(flags=0x0F, bad_len=0, tail=b"", mutate=(12, 5), payload=100)  # not an MPTCP option
@example(flags=0x0F, bad_len=0, tail=b"", mutate=(0, 0), payload=100)  # EOL first: no options at all
def test_option_layouts_same_as_the_option_walk(flags: int, bad_len: int, tail: bytes,
                                                mutate: tuple[int, int] | None, payload: int) -> None:
    """The fast path reads Linux's option layout (NOP NOP timestamp, one MPTCP option, NOP/EOL
    padding) without walking the options; any other bytes (EOL, junk, a second option, wrong
    lengths) must give what the walk gives."""
    from mproxy.wire.build import build_tcp

    s = Session(1, timestamps=True)
    pk = s.handshake()
    sub = s.subs[0]
    body = bytes(range(payload))
    dss = m.Dss(flags, s.idsn[1] & (MASK64 if flags & m.DSS_a else 0xFFFFFFFF) if flags & m.DSS_A else None,
                s.idsn[0] & (MASK64 if flags & m.DSS_m else 0xFFFFFFFF) if flags & m.DSS_M else None,
                1 if flags & m.DSS_M else None, payload if flags & m.DSS_M else None).encode()
    if bad_len:
        dss = (dss[:1] + bytes(((len(dss) + bad_len) & 0xFF,)) + dss[2:]).ljust(len(dss) + bad_len, b"\0")
        dss = dss[:max(len(dss) + bad_len, 2)]
    ts = b"\x01\x01\x08\x0a" + bytes(8)
    opts = bytearray(ts + dss + tail)
    opts += b"\x01" * (-len(opts) % 4)
    if mutate is not None and mutate[0] < len(opts):
        opts[mutate[0]] = mutate[1]
    if len(opts) > 40:
        return
    pk.append(build_tcp(sub.client[0], sub.server[0], sub.client[1], sub.server[1], sub.isn[0] + 1, sub.isn[1] + 1,
                        0x10, 65535, bytes(opts), body))
    sub.next_rel[0] += payload
    pk.append(s.data(0, True, payload, b"next", data_ack=s.idsn[1]))
    _side_by_side([(1000.0 + i, p) for i, p in enumerate(pk)])


@pytest.mark.parametrize("dsn64", [True, False])
@pytest.mark.parametrize("ack64", [True, False])
def test_streams_across_the_2_64_wrap(dsn64: bool, ack64: bool) -> None:
    """DSNs and Data ACKs crossing 2**64 (and 2**32 with 32-bit values on the wire): positions
    keep growing in both paths (the stream is picked up just below the wrap)."""
    s = Session(1, dsn64=dsn64, ack64=ack64)
    s.handshake()
    s.join(1)
    start = MASK64 - 2999
    off0 = (start - s.idsn[0]) & MASK64
    data = random.Random(7).randbytes(8000)
    pk = []
    for i in range(0, 8000, 500):
        pk.append(s.data(i // 500 % 2, True, off0 + i, data[i: i + 500]))
        ack = m.dss((start + i + 500) & (MASK64 if ack64 else 0xFFFFFFFF), ack64=ack64)
        pk.append(s._pkt(s.subs[i // 500 % 2], False, 0x10, [ack.encode()]))
    pk.append(s.data_fin(0, True, off0 + 8000))
    _side_by_side([(1000.0 + i / 100, p) for i, p in enumerate(pk)])
