"""The emitted stream contract: frames that parse, exact checksums, and tshark
(an independent TCP implementation) reading the conversations back whole."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st

from mproxy.core.emitter import CLIENT_MAC, SERVER_MAC, TcpEmitter, ethernet_frame
from mproxy.io.pcap import PcapWriter, read_captures
from mproxy.wire.packet import ACK, FIN, PSH, RST, SYN, TcpSegment, parse_frame

V4 = (bytes([192, 0, 2, 10]), bytes([198, 51, 100, 20]))
V6 = (bytes.fromhex("20010db8000000000000000000000a01"), bytes.fromhex("20010db80000000000000000000b0002"))
ADDRS = {4: V4, 6: V6}

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark not installed: the independent oracle is missing")


# -- naive reference checksum: deliberately the slow textbook loop -------------
def ref_sum(data: bytes) -> int:
    """RFC 1071 one's-complement sum, one 16-bit word at a time with end-around carry."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\x00"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_tcp_ok(seg: TcpSegment) -> bool:
    tcp = bytes(seg.ip[seg.tcp_off :])
    n = len(tcp)
    pseudo = seg.src + seg.dst + (bytes(3) + b"\x06" + n.to_bytes(4, "big") if seg.ipver == 6 else b"\x00\x06" + n.to_bytes(2, "big"))
    if ref_sum(pseudo + tcp) != 0xFFFF:
        return False
    zeroed = tcp[:16] + b"\x00\x00" + tcp[18:]
    return (~ref_sum(pseudo + zeroed)) & 0xFFFF == int.from_bytes(tcp[16:18], "big")


def check_frame(frame: bytes, ipver: int, slow: bool = True) -> TcpSegment:
    """Parse and fully validate one emitted frame; return the segment."""
    assert isinstance(frame, bytes)
    seg = parse_frame(1, frame)
    assert isinstance(seg, TcpSegment), seg
    assert seg.ipver == ipver
    assert frame[12:14] == (b"\x08\x00" if ipver == 4 else b"\x86\xdd")
    assert {frame[0:6], frame[6:12]} == {CLIENT_MAC, SERVER_MAC}
    ip = bytes(seg.ip)
    assert len(frame) == 14 + len(ip)  # nothing after the IP packet
    if ipver == 4:
        assert ip[0] == 0x45 and int.from_bytes(ip[2:4], "big") == len(ip)
        assert ip[6:8] == b"\x40\x00" and ip[8] == 64 and ip[9] == 6  # DF, TTL, TCP
        if slow:
            assert ref_sum(ip[:20]) == 0xFFFF
    else:
        assert ip[0] >> 4 == 6 and int.from_bytes(ip[4:6], "big") == len(ip) - 40
        assert ip[6] == 6 and ip[7] == 64
    assert seg.window == 65535
    assert seg.hdr_len == (24 if seg.flags & SYN else 20)
    if slow:
        assert ref_tcp_ok(seg)
    return seg


def emitter(ipver: int, cport: int = 40000, sport: int = 80, **kw) -> TcpEmitter:
    c, s = ADDRS[ipver]
    return TcpEmitter(c, cport, s, sport, **kw)


def streams(frames: list[tuple[float, bytes]], ipver: int, slow: bool = False) -> tuple[bytes, bytes]:
    """Rebuild both directions by sequence number, checking every ACK on the way."""
    segs = [check_frame(f, ipver, slow) for _, f in frames]
    client = (segs[0].src, segs[0].sport)
    out = {True: bytearray(), False: bytearray()}
    nxt: dict[bool, int] = {}
    for seg in segs:
        c = (seg.src, seg.sport) == client
        if seg.flags & SYN:
            nxt[c] = (seg.seq + 1) & 0xFFFFFFFF
            continue
        assert seg.seq == nxt[c], "segments must be contiguous"
        assert seg.flags & ACK and seg.ack == nxt[not c], "each segment acks everything the other side sent"
        out[c] += seg.payload
        nxt[c] = (seg.seq + seg.payload_len + (1 if seg.flags & FIN else 0)) & 0xFFFFFFFF
    return bytes(out[True]), bytes(out[False])


# -- frames and checksums ------------------------------------------------------
@pytest.mark.parametrize("ipver", [4, 6])
def test_handshake_and_options(ipver: int) -> None:
    e = emitter(ipver, mss=1400)
    assert not e.opened and not e.is_open and not e.closed
    fr = e.open(1.5)
    assert e.open(2.0) == []
    assert e.opened and e.is_open
    segs = [check_frame(f, ipver) for _, f in fr]
    assert [ts for ts, _ in fr] == [1.5] * 3
    assert [s.flags for s in segs] == [SYN, SYN | ACK, ACK]
    syn, synack, ack = segs
    assert bytes(syn.options) == b"\x02\x04\x05\x78" == bytes(synack.options)
    assert (syn.seq, synack.ack) == (e.client_isn, e.client_isn + 1)
    assert (ack.seq, ack.ack) == (e.client_isn + 1, e.server_isn + 1)
    c, s = ADDRS[ipver]
    assert (syn.src, syn.dst, syn.sport, syn.dport) == (c, s, 40000, 80)
    assert (synack.src, synack.dst, synack.sport, synack.dport) == (s, c, 80, 40000)
    assert fr[0][1][:12] == SERVER_MAC + CLIENT_MAC and fr[1][1][:12] == CLIENT_MAC + SERVER_MAC


@pytest.mark.parametrize("ipver", [4, 6])
@pytest.mark.parametrize("size", [1, 2, 3, 255, 1459, 1460, 1461, 2920, 2921, 5000])
def test_segments_checksums_against_naive_loop(ipver: int, size: int) -> None:
    rnd = random.Random(size)
    payload = rnd.randbytes(size)
    e = emitter(ipver)
    fr = e.data(True, payload, 3.0) + e.data(False, payload[::-1], 4.0)
    segs = [check_frame(f, ipver) for _, f in fr]  # includes the slow reference checks
    data = [s for s in segs[3:] if s.payload_len]
    acks = [s for s in segs[3:] if not s.payload_len]
    assert len(data) == len(acks) == 2 * ((size + 1459) // 1460)
    assert all(s.payload_len <= 1460 for s in data)
    for i, s in enumerate(segs[3:]):  # strictly data, ack, data, ack ...
        assert bool(s.payload_len) == (i % 2 == 0)
    # PSH on the last segment of each data() call only.
    half = len(data) // 2
    for part in (data[:half], data[half:]):
        assert [bool(s.flags & PSH) for s in part] == [False] * (len(part) - 1) + [True]
    assert streams(fr, ipver) == (payload, payload[::-1])
    assert e.client_bytes == e.server_bytes == size


@pytest.mark.parametrize("ipver", [4, 6])
@pytest.mark.parametrize("pad", [0, 1, 1460])
def test_negative_zero_sum_gives_0000_checksum(ipver: int, pad: int) -> None:
    """A segment whose words sum to 0xFFFF must carry 0x0000 (tshark flags 0xFFFF)."""

    def data_seg(word: bytes) -> TcpSegment:
        e = emitter(ipver, client_isn=123, server_isn=456)  # same state both times
        return check_frame(e.data(True, b"\x00" * pad + word, 0.0)[-2][1], ipver)  # last data segment

    probe = data_seg(b"\x00\x00")
    assert probe.payload_len == (pad + 2) - (pad + 2 - 1) // 1460 * 1460
    csum = bytes(probe.ip[probe.tcp_off + 16 : probe.tcp_off + 18])
    # Putting the checksum itself into the payload makes the sum exactly 0xFFFF
    # (byte-swapped at an odd offset, where its bytes straddle two words).
    seg = data_seg(csum[::-1] if (pad % 1460) & 1 else csum)  # check_frame verifies it with the naive loop
    assert bytes(seg.ip[seg.tcp_off + 16 : seg.tcp_off + 18]) == b"\x00\x00"


@settings(max_examples=60, deadline=None)
@given(
    ipver=st.sampled_from([4, 6]),
    cisn=st.integers(0, 2**32 - 1) | st.integers(2**32 - 3000, 2**32 - 1),
    sisn=st.integers(0, 2**32 - 1),
    mss=st.integers(1, 1500),
    chunks=st.lists(st.tuples(st.booleans(), st.binary(min_size=0, max_size=3000)), max_size=6),
)
def test_random_conversations(ipver: int, cisn: int, sisn: int, mss: int, chunks: list[tuple[bool, bytes]]) -> None:
    e = emitter(ipver, mss=mss, client_isn=cisn, server_isn=sisn)
    fr = e.open(0.0)
    for i, (fc, b) in enumerate(chunks):
        fr += e.data(fc, b, float(i))
    fr += e.close(9.0, from_client=bool(len(chunks) % 2))
    segs = [check_frame(f, ipver) for _, f in fr]
    assert all(s.payload_len <= mss for s in segs)
    c, s = streams(fr, ipver)
    assert c == b"".join(b for fc, b in chunks if fc)
    assert s == b"".join(b for fc, b in chunks if not fc)
    assert e.closed and e.client_fin and e.server_fin


def test_ip_ids_increment_per_sender() -> None:
    e = emitter(4)
    fr = e.data(True, bytes(5000), 0.0)
    ids = {True: [], False: []}
    for _, f in fr:
        ids[f[6:12] == CLIENT_MAC].append(int.from_bytes(f[18:20], "big"))
    for seq in ids.values():
        assert all((b - a) & 0xFFFF == 1 for a, b in zip(seq, seq[1:]))


def test_deterministic_and_distinct() -> None:
    def run(port: int) -> list[bytes]:
        e = emitter(4, cport=port)
        return [f for _, f in e.data(True, b"abc" * 1000, 1.0) + e.close(2.0)]

    assert run(1234) == run(1234)
    assert run(1234) != run(1235)
    a, b = emitter(4, cport=1), emitter(4, cport=2)
    assert (a.client_isn, a.server_isn) != (b.client_isn, b.server_isn)
    assert emitter(6, client_isn=5, server_isn=2**32 + 7).server_isn == 7


def test_memoryview_and_bytearray_payloads() -> None:
    base = bytes(range(256)) * 20
    ref = emitter(6).data(True, base, 0.0)
    assert emitter(6).data(True, memoryview(base), 0.0) == ref
    assert emitter(6).data(True, bytearray(base), 0.0) == ref
    assert emitter(6).data(True, memoryview(bytearray(base)).cast("H"), 0.0) == ref


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        TcpEmitter(V4[0], 1, V6[1], 2)
    with pytest.raises(ValueError):
        TcpEmitter(b"\x01\x02\x03", 1, b"\x01\x02\x03", 2)
    with pytest.raises(ValueError):
        TcpEmitter(*V4[:1], 70000, V4[1], 2)
    with pytest.raises(ValueError):
        emitter(4, mss=0)
    with pytest.raises(ValueError):
        emitter(4).skip(True, -1)
    with pytest.raises(ValueError):
        ethernet_frame(b"", 5)


# -- closing -----------------------------------------------------------------
@pytest.mark.parametrize("from_client", [True, False])
def test_fin_close_sequence_and_idempotence(from_client: bool) -> None:
    e = emitter(4)
    fr = e.data(True, b"x" * 10, 0.0) + e.data(False, b"y" * 20, 0.5)
    end = e.close(1.0, from_client=from_client)
    assert e.close(2.0) == [] and e.close(2.0, reset=True) == []
    assert e.closed and not e.is_open and not e.was_reset
    segs = [check_frame(f, 4) for _, f in end]
    fin_a, fin_b, last = segs
    assert (fin_a.sport == 40000) == from_client
    assert fin_a.flags == FIN | ACK and fin_b.flags == FIN | ACK and last.flags == ACK
    assert fin_b.ack == fin_a.seq + 1 and last.ack == fin_b.seq + 1 and last.seq == fin_a.seq + 1
    assert streams(fr + end, 4) == (b"x" * 10, b"y" * 20)
    assert e.data(True, b"late", 3.0) == [] and e.discarded == 4


def test_half_close_then_close() -> None:
    e = emitter(6)
    fr = e.data(True, b"request", 0.0)
    hc = e.half_close(True, 1.0)
    assert [check_frame(f, 6).flags for _, f in hc] == [FIN | ACK, ACK]
    assert e.client_fin and not e.server_fin and e.is_open
    assert e.half_close(True, 1.5) == []
    assert e.data(True, b"more", 1.6) == [] and e.discarded == 4
    fr += hc + e.data(False, b"response" * 400, 2.0)
    end = e.close(3.0, from_client=True)  # client already finished: server FIN, client ACK
    assert [check_frame(f, 6).flags for _, f in end] == [FIN | ACK, ACK]
    assert [check_frame(f, 6).sport for _, f in end] == [80, 40000]
    assert e.closed and e.close(4.0) == []
    assert streams(fr + end, 6) == (b"request", b"response" * 400)


def test_half_close_both_sides_closes() -> None:
    e = emitter(4)
    fr = e.half_close(False, 0.0) + e.half_close(True, 1.0)
    assert e.closed and e.close(2.0) == []
    assert [check_frame(f, 4).flags for _, f in fr] == [SYN, SYN | ACK, ACK, FIN | ACK, ACK, FIN | ACK, ACK]
    assert streams(fr, 4) == (b"", b"")


@pytest.mark.parametrize("from_client", [True, False])
def test_reset(from_client: bool) -> None:
    e = emitter(4)
    fr = e.data(True, b"abc", 0.0)
    rst = e.close(1.0, reset=True, from_client=from_client)
    assert len(rst) == 1 and e.closed and e.was_reset
    seg = check_frame(rst[0][1], 4)
    assert seg.flags == RST | ACK and (seg.sport == 40000) == from_client
    assert seg.seq == e.next_seq(from_client) and seg.ack == e.next_seq(not from_client)
    assert e.close(2.0) == [] and e.half_close(True, 2.0) == [] and e.data(False, b"z", 2.0) == []
    streams(fr + rst, 4)


def test_close_unopened_emits_whole_conversation() -> None:
    e = emitter(6)
    fr = e.close(5.0)
    assert [check_frame(f, 6).flags for _, f in fr] == [SYN, SYN | ACK, ACK, FIN | ACK, FIN | ACK, ACK]
    assert e.data(True, b"x", 6.0) == []


def test_skip_leaves_sequence_hole() -> None:
    e = emitter(4)
    e.skip(True, 7)  # before the handshake: the first client byte is already missing
    fr = e.data(True, b"abc", 0.0)
    e.skip(True, 100)
    fr += e.data(True, b"def", 1.0)
    segs = [check_frame(f, 4) for _, f in fr]
    d1, a1, d2, a2 = segs[3:]
    assert d1.seq == e.client_isn + 1 + 7 and d2.seq == d1.seq + 3 + 100
    assert a1.ack == d1.seq + 3 and a2.ack == d2.seq + 3  # the receiver got them: it acks past the hole
    assert e.client_bytes == 6 and e.client_skipped == 107 and e.server_skipped == 0


def test_ethernet_frame_passthrough() -> None:
    e = emitter(4)
    _, f = e.data(True, b"payload", 0.0)[3]
    ip = f[14:]
    assert ethernet_frame(ip, 4) == f
    assert ethernet_frame(memoryview(ip), 4) == f
    seg = emitter(6).data(False, b"x", 0.0)[3][1]
    out = ethernet_frame(seg[14:], 6)
    assert out[12:14] == b"\x86\xdd" and out[14:] == seg[14:]
    assert isinstance(parse_frame(1, out), TcpSegment)


# -- tshark as the independent oracle -------------------------------------------
def write_pcap(path: Path, frames: list[tuple[float, bytes]]) -> None:
    with open(path, "wb") as f:
        w = PcapWriter(f)
        for ts, fr in frames:
            w.write(ts, fr)


def tshark(*args: str) -> str:
    assert TSHARK is not None
    p = subprocess.run([TSHARK, "-n", *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return p.stdout


def follow_raw(out: str) -> dict[int, tuple[bytes, bytes]]:
    """Parse ``-z follow,tcp,raw,N`` blocks: stream N -> (node 0 bytes, node 1 bytes).

    tshark prints several blocks in no promised order, hence the dict.
    """
    res = {}
    for block in out.split("Follow: tcp,raw")[1:]:
        a, b = bytearray(), bytearray()
        lines = block.splitlines()
        stream = int(next(line for line in lines if line.startswith("Filter: tcp.stream eq ")).rsplit(" ", 1)[1])
        i = next(i for i, line in enumerate(lines) if line.startswith("Node 1:")) + 1
        for line in lines[i:]:
            if line.startswith("====="):
                break
            if line.startswith("\t"):
                b += bytes.fromhex(line.strip())
            elif line:
                a += bytes.fromhex(line)
        res[stream] = (bytes(a), bytes(b))
    return res


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


CHECKSUM_OPTS = ("-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE")
ANALYSIS_PROBLEMS = "tcp.analysis.flags && !tcp.analysis.window_update"


def conversation(ipver: int, cport: int, seed: int, per_dir: int, t0: float) -> tuple[list[tuple[float, bytes]], bytes, bytes]:
    """Random data both ways in uneven chunks, interleaved, then a FIN close."""
    rnd = random.Random(seed)
    sizes = [1, 1459, 1460, 1461, 100_000, 2, 2920, 2921, 65_535, 3, 700]
    e = emitter(ipver, cport=cport, sport=443)
    frames = e.open(t0)
    sent = {True: bytearray(), False: bytearray()}
    ts = t0
    while len(sent[True]) < per_dir or len(sent[False]) < per_dir:
        fc = rnd.random() < 0.5
        if len(sent[fc]) >= per_dir:
            fc = not fc
        chunk = rnd.randbytes(rnd.choice(sizes))
        ts += 0.001
        frames += e.data(fc, chunk, ts)
        sent[fc] += chunk
    frames += e.close(ts + 0.001, from_client=bool(seed % 2))
    assert e.client_bytes == len(sent[True]) and e.server_bytes == len(sent[False])
    return frames, bytes(sent[True]), bytes(sent[False])


@needs_tshark
def test_tshark_reads_multi_megabyte_conversations(tmp_path: Path) -> None:
    f4, c4, s4 = conversation(4, 50000, 1, 3_000_000, 1000.0)
    f6, c6, s6 = conversation(6, 50001, 2, 3_000_000, 1000.0005)
    # Interleave the two conversations by time as a capture would.
    frames = sorted(f4 + f6, key=lambda x: x[0])
    for _, f in frames[:: max(1, len(frames) // 200)]:  # slow reference checksums on a sample
        check_frame(f, 4 if f[12:14] == b"\x08\x00" else 6)
    out = tmp_path / "two.pcap"
    write_pcap(out, frames)
    assert sum(1 for _ in read_captures([str(out)])) == len(frames)

    got = follow_raw(tshark("-r", str(out), "-q", "-z", "follow,tcp,raw,0", "-z", "follow,tcp,raw,1"))
    assert len(got) == 2
    want = {(sha(c4), sha(s4)), (sha(c6), sha(s6))}
    assert {(sha(a), sha(b)) for a, b in got.values()} == want

    assert tshark("-r", str(out), "-Y", ANALYSIS_PROBLEMS) == ""
    assert tshark("-r", str(out), *CHECKSUM_OPTS, "-Y", "tcp.checksum.status == 0 or ip.checksum.status == 0") == ""
    # Stricter: every frame was verified good (not merely "unverified").
    bad = "!(tcp.checksum.status == 1) or (ip && !(ip.checksum.status == 1))"
    assert tshark("-r", str(out), *CHECKSUM_OPTS, "-Y", bad) == ""
    conv = tshark("-r", str(out), "-q", "-z", "conv,tcp")
    assert conv.count("<->") == 2


@needs_tshark
def test_tshark_http_request_in_tiny_chunks(tmp_path: Path) -> None:
    req = b"GET /search?q=1%20UNION%20SELECT%20password%20FROM%20users HTTP/1.1\r\nHost: example.test\r\nUser-Agent: t\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
    rnd = random.Random(7)
    e = emitter(4)
    frames = e.open(0.0)
    ts = 0.0
    for body, fc in ((req, True), (resp, False)):
        i = 0
        while i < len(body):
            n = rnd.randint(1, 3)
            ts += 0.0001
            frames += e.data(fc, body[i : i + n], ts)
            i += n
    frames += e.close(ts + 1)
    out = tmp_path / "http.pcap"
    write_pcap(out, frames)
    uris = tshark("-r", str(out), "-Y", "http.request", "-T", "fields", "-e", "http.request.method", "-e", "http.request.uri")
    assert uris.splitlines() == ["GET\t/search?q=1%20UNION%20SELECT%20password%20FROM%20users"]
    codes = tshark("-r", str(out), "-Y", "http.response", "-T", "fields", "-e", "http.response.code", "-e", "http.file_data")
    assert codes.split("\t")[0] == "200"
    assert tshark("-r", str(out), "-Y", ANALYSIS_PROBLEMS) == ""


@needs_tshark
def test_tshark_reset_and_half_close(tmp_path: Path) -> None:
    a = emitter(4, cport=1001)
    fa = a.data(True, b"hello", 0.0) + a.data(False, b"world" * 1000, 0.1) + a.close(0.2, reset=True, from_client=False)
    b = emitter(6, cport=1002)
    fb = b.data(True, b"GET", 0.0) + b.half_close(True, 0.1) + b.data(False, b"R" * 4000, 0.15) + b.close(0.2)
    c = emitter(4, cport=1003)
    fc = c.data(False, b"banner", 0.0) + c.half_close(False, 0.05) + c.data(True, b"Q" * 3000, 0.1) + c.close(0.3, from_client=True)
    out = tmp_path / "close.pcap"
    write_pcap(out, sorted(fa + fb + fc, key=lambda x: x[0]))
    assert tshark("-r", str(out), "-Y", ANALYSIS_PROBLEMS) == ""
    rst = tshark("-r", str(out), "-Y", "tcp.flags.reset == 1", "-T", "fields", "-e", "tcp.srcport", "-e", "tcp.seq", "-e", "tcp.ack")
    assert rst.splitlines() == ["80\t5001\t6"]  # relative seq/ack: after 5000 bytes, and acking "hello"
    fins = tshark("-r", str(out), "-Y", "tcp.flags.fin == 1", "-T", "fields", "-e", "tcp.stream")
    assert sorted(fins.split()) == ["1", "1", "2", "2"]
    got = follow_raw(tshark("-r", str(out), "-q", *(x for n in range(3) for x in ("-z", f"follow,tcp,raw,{n}"))))
    assert sorted(got.values()) == sorted([(b"hello", b"world" * 1000), (b"GET", b"R" * 4000), (b"Q" * 3000, b"banner")])


@needs_tshark
def test_tshark_sees_skip_as_missing_segment(tmp_path: Path) -> None:
    rnd = random.Random(3)
    before, hole, after = rnd.randbytes(3000), rnd.randbytes(1000), rnd.randbytes(2000)
    e = emitter(4)
    frames = e.data(True, before, 0.0)
    e.skip(True, len(hole))
    frames += e.data(True, after, 1.0) + e.data(False, b"ok", 1.5) + e.close(2.0)
    out = tmp_path / "skip.pcap"
    write_pcap(out, frames)
    lost = tshark("-r", str(out), "-Y", "tcp.analysis.lost_segment", "-T", "fields", "-e", "tcp.seq", "-e", "tcp.len")
    assert lost.splitlines() == ["4001\t1460"]  # relative seq: 3000 bytes + 1000 missing
    cli, srv = follow_raw(tshark("-r", str(out), "-q", "-z", "follow,tcp,raw,0"))[0]
    assert srv == b"ok"
    assert hole not in cli and hole[:64] not in cli
    # tshark stands a text marker in for the bytes it never saw.
    assert cli == before + b"[1000 bytes missing in capture file]\x00" + after
    # The only analysis notes are the hole and the ACK that covers it.
    flagged = tshark("-r", str(out), "-Y", ANALYSIS_PROBLEMS, "-T", "fields", "-e", "tcp.analysis.lost_segment", "-e", "tcp.analysis.ack_lost_segment")
    assert len(flagged.splitlines()) == 2


@settings(max_examples=60, deadline=None)
@given(
    ipver=st.sampled_from([4, 6]),
    mss=st.integers(1, 1500),
    opened=st.booleans(),
    runs=st.lists(st.tuples(st.booleans(), st.lists(st.binary(min_size=0, max_size=3000), max_size=5)), max_size=5),
    fin=st.sampled_from([None, True, False]),
)
def test_data_runs_equal_one_data_call_per_payload(ipver: int, mss: int, opened: bool,
                                                   runs: list[tuple[bool, list[bytes]]], fin: bool | None) -> None:
    """A run of payloads is the frames of one ``data`` call each, in order; after a FIN, all discarded."""
    one, many = emitter(ipver, mss=mss), emitter(ipver, mss=mss)
    want, got = [], []
    if opened:
        want += one.open(0.5)
        got += many.open(0.5)
    if fin is not None:
        want += one.half_close(fin, 0.7)
        got += many.half_close(fin, 0.7)
    for i, (fc, payloads) in enumerate(runs):
        for j, p in enumerate(payloads):
            want += one.data(fc, p, i + j / 10)
        got += many.data_runs(fc, [(memoryview(p) if j % 2 else p, i + j / 10) for j, p in enumerate(payloads)])
    want += one.close(9.0)
    got += many.close(9.0)
    assert got == want
    assert (many.client_bytes, many.server_bytes, many.discarded) == (one.client_bytes, one.server_bytes,
                                                                       one.discarded)


from mproxy.core import emitter as emitter_module  # noqa: E402


@pytest.mark.skipif(emitter_module._emit_data is None, reason="accelerator not built (or MPROXY_NO_ACCEL)")
@settings(max_examples=300, deadline=None)
@given(
    ipver=st.sampled_from([4, 6]),
    isns=st.tuples(st.integers(0, 2**32 - 1) | st.integers(2**32 - 5000, 2**32 - 1), st.integers(0, 2**32 - 1)),
    mss=st.sampled_from([1, 2, 3, 536, 1460, 1500, 9000]) | st.integers(1, 1600),
    chunks=st.lists(st.tuples(st.booleans(), st.integers(0, 5000), st.integers(0, 255)), max_size=8),
    cport=st.integers(0, 0xFFFF),
)
def test_compiled_segment_loop_equals_the_python_loop(ipver: int, isns: tuple[int, int], mss: int,
                                                     chunks: list[tuple[bool, int, int]], cport: int) -> None:
    """mproxy/_accel.c's emit_data makes the frames data_runs' own loop makes, byte for byte
    (odd lengths, sequence and IP ID wraps, every mss); checksums verified the naive way."""
    def run() -> list[tuple[float, bytes]]:
        e = emitter(ipver, cport=cport, mss=mss, client_isn=isns[0], server_isn=isns[1])
        fr = []
        for i, (fc, n, fill) in enumerate(chunks):
            payload = bytes((fill + j * 7) & 0xFF for j in range(n))
            fr += e.data_runs(fc, [(payload, float(i)), (memoryview(payload)[: n // 2], i + 0.5)])
        return fr + e.close(99.0)

    compiled = run()
    with mock.patch.object(emitter_module, "_emit_data", None):
        reference = run()
    assert compiled == reference
    for _, f in compiled[:40]:
        check_frame(f, ipver, slow=True)
