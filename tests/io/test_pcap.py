"""pcap / pcapng reading: formats, byte orders, resolutions, damage, merging; the reference captures."""

from __future__ import annotations

import bz2
import gzip
import heapq
import lzma
import os
import random
import struct
import tracemalloc
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mproxy.io.pcap import CaptureError, CaptureReader, PcapWriter, read_captures
from mproxy.wire.packet import LinkType

CAPTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "captures"

PKT_A = bytes(range(60))
PKT_B = b"\xaa" * 33
PKT_C = b"\x55" * 1500


def pcap_bytes(records, *, endian: str = "<", ns: bool = False, linktype: int = 1, version: int = 2) -> bytes:
    magic = 0xA1B23C4D if ns else 0xA1B2C3D4
    out = struct.pack(endian + "IHHiIII", magic, version, 4, 0, 0, 65535, linktype)
    for sec, frac, data, *orig in records:
        out += struct.pack(endian + "IIII", sec, frac, len(data), orig[0] if orig else len(data)) + data
    return out


def _pad(b: bytes) -> bytes:
    return b + bytes(-len(b) % 4)


def ng_block(btype: int, body: bytes, endian: str = "<") -> bytes:
    body = _pad(body)
    n = 12 + len(body)
    return struct.pack(endian + "II", btype, n) + body + struct.pack(endian + "I", n)


def ng_shb(endian: str = "<") -> bytes:
    return ng_block(0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1), endian)


def ng_opt(code: int, value: bytes, endian: str = "<") -> bytes:
    return struct.pack(endian + "HH", code, len(value)) + _pad(value)


def ng_idb(linktype: int, tsresol: int | None = None, endian: str = "<") -> bytes:
    opts = b""
    if tsresol is not None:
        opts += ng_opt(2, b"eth0", endian) + ng_opt(9, bytes((tsresol,)), endian) + ng_opt(0, b"", endian)
    return ng_block(1, struct.pack(endian + "HHI", linktype, 0, 0) + opts, endian)


def ng_epb(ifid: int, ticks: int, data: bytes, endian: str = "<", orig: int | None = None) -> bytes:
    return ng_block(6, struct.pack(endian + "IIIII", ifid, ticks >> 32, ticks & 0xFFFFFFFF, len(data),
                                   len(data) if orig is None else orig) + data, endian)


def write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def frames_of(path: str):
    r = CaptureReader(path)
    return list(r), r


# ------------------------------------------------------------------ classic pcap


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("ns", [False, True])
def test_pcap_resolutions_and_byte_orders(tmp_path: Path, endian: str, ns: bool) -> None:
    frac = 123456789 if ns else 123456
    path = write(tmp_path, "a.pcap", pcap_bytes([(1000, frac, PKT_A), (1001, 0, PKT_B, 99)], endian=endian, ns=ns,
                                                linktype=113))
    frames, r = frames_of(path)
    assert [f.data for f in frames] == [PKT_A, PKT_B]
    assert frames[0].ts == pytest.approx(1000.123456789 if ns else 1000.123456, abs=1e-9)
    assert frames[1].ts == 1001.0
    assert [f.orig_len for f in frames] == [60, 99]
    assert {f.linktype for f in frames} == {113}
    assert r.problems == []
    assert r.position == r.size == Path(path).stat().st_size


def test_pcap_empty_but_valid(tmp_path: Path) -> None:
    frames, r = frames_of(write(tmp_path, "e.pcap", pcap_bytes([])))
    assert frames == [] and r.problems == []


@pytest.mark.parametrize("cut", [1, 10, 16, 17, 40])
def test_pcap_truncated_last_packet(tmp_path: Path, cut: int) -> None:
    data = pcap_bytes([(1, 0, PKT_A), (2, 0, PKT_C)])
    path = write(tmp_path, "t.pcap", data[:-cut] if cut <= len(PKT_C) else data[: 24 + 16 + 60 + (16 - cut)])
    frames, r = frames_of(path)
    assert [f.data for f in frames] == [PKT_A]
    assert len(r.problems) == 1 and "t.pcap" in r.problems[0]


def test_pcap_absurd_record_length(tmp_path: Path) -> None:
    data = pcap_bytes([(1, 0, PKT_A)]) + struct.pack("<IIII", 2, 0, 0x7FFFFFFF, 0x7FFFFFFF) + PKT_B
    frames, r = frames_of(write(tmp_path, "big.pcap", data))
    assert len(frames) == 1 and "claims" in r.problems[0]


@pytest.mark.parametrize(
    "data,msg",
    [
        (b"", "too short"),
        (b"\x00\x01", "too short"),
        (b"GET / HTTP/1.1\r\n\r\n" * 4, "not a pcap or pcapng"),
        (bytes(200), "not a pcap or pcapng"),
        (struct.pack("<I", 0xA1B2C3D4) + bytes(5), "truncated pcap header"),
        (pcap_bytes([], version=3), "unsupported pcap version"),
        (struct.pack("<II", 0x0A0D0D0A, 28) + b"\xde\xad\xbe\xef" + bytes(16), "byte-order"),
        (struct.pack("<II", 0x0A0D0D0A, 7) + struct.pack("<I", 0x1A2B3C4D) + bytes(16), "section header length"),
    ],
)
def test_garbage_is_a_capture_error(tmp_path: Path, data: bytes, msg: str) -> None:
    path = write(tmp_path, "junk.bin", data)
    with pytest.raises(CaptureError, match=msg) as ei:
        list(CaptureReader(path))
    assert "junk.bin" in str(ei.value)


def test_missing_file_is_a_capture_error(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="cannot open"):
        list(CaptureReader(str(tmp_path / "nope.pcap")))
    with pytest.raises(CaptureError):
        list(read_captures([str(tmp_path / "nope.pcap")]))


# ------------------------------------------------------------------ pcapng


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcapng_interfaces_linktypes_and_resolutions(tmp_path: Path, endian: str) -> None:
    data = (ng_shb(endian)
            + ng_idb(LinkType.ETHERNET, None, endian)  # default µs
            + ng_idb(LinkType.LINUX_SLL, 9, endian)  # ns
            + ng_idb(LinkType.RAW, 0x80 | 10, endian)  # 2^-10 s
            + ng_epb(0, 5_000_000, PKT_A, endian)
            + ng_epb(1, 5_500_000_000, PKT_B, endian, orig=100)
            + ng_epb(2, 6 * 1024 + 512, PKT_C, endian)
            + ng_block(5, b"\x00" * 8, endian))  # an interface statistics block: ignored
    frames, r = frames_of(write(tmp_path, "m.pcapng", data))
    assert [(f.linktype, f.data) for f in frames] == [(1, PKT_A), (113, PKT_B), (101, PKT_C)]
    assert [f.ts for f in frames] == [pytest.approx(5.0), pytest.approx(5.5), pytest.approx(6.5)]
    assert frames[1].orig_len == 100
    assert r.problems == []


def test_pcapng_second_section_resets_interfaces(tmp_path: Path) -> None:
    data = (ng_shb() + ng_idb(1) + ng_epb(0, 1, PKT_A)
            + ng_shb(">") + ng_idb(113, 9, ">") + ng_epb(0, 2_000_000_000, PKT_B, ">"))
    frames, r = frames_of(write(tmp_path, "s.pcapng", data))
    assert [(f.linktype, f.data, f.ts) for f in frames] == [(1, PKT_A, pytest.approx(1e-6)), (113, PKT_B, 2.0)]
    assert r.problems == []


def test_pcapng_simple_and_obsolete_packet_blocks(tmp_path: Path) -> None:
    spb = ng_block(3, struct.pack("<I", len(PKT_B)) + PKT_B)
    pb = ng_block(2, struct.pack("<HHIIII", 0, 0, 0, 3_000_000, len(PKT_A), len(PKT_A)) + PKT_A)
    frames, r = frames_of(write(tmp_path, "o.pcapng", ng_shb() + ng_idb(1) + spb + pb))
    assert [f.data for f in frames] == [PKT_B, PKT_A]
    assert frames[1].ts == pytest.approx(3.0)


def test_pcapng_bad_interface_id_is_recorded_and_skipped(tmp_path: Path) -> None:
    data = ng_shb() + ng_idb(1) + ng_epb(3, 1, PKT_B) + ng_epb(0, 2, PKT_A)
    frames, r = frames_of(write(tmp_path, "i.pcapng", data))
    assert [f.data for f in frames] == [PKT_A]
    assert len(r.problems) == 1 and "bad packet block" in r.problems[0]


@pytest.mark.parametrize("cut", [1, 4, 20, 100])
def test_pcapng_truncated_last_block(tmp_path: Path, cut: int) -> None:
    data = ng_shb() + ng_idb(1) + ng_epb(0, 1, PKT_A) + ng_epb(0, 2, PKT_C)
    frames, r = frames_of(write(tmp_path, "tr.pcapng", data[:-cut]))
    assert [f.data for f in frames] == [PKT_A]
    assert len(r.problems) == 1 and "truncated" in r.problems[0]


def test_pcapng_lying_block_length(tmp_path: Path) -> None:
    data = ng_shb() + ng_idb(1) + ng_epb(0, 1, PKT_A) + struct.pack("<II", 6, 13) + bytes(20)
    frames, r = frames_of(write(tmp_path, "l.pcapng", data))
    assert [f.data for f in frames] == [PKT_A] and "bad length" in r.problems[0]


def test_pcapng_short_block_body(tmp_path: Path) -> None:
    # an EPB too short for its fixed fields: recorded, reading goes on
    data = ng_shb() + ng_idb(1) + ng_block(6, bytes(8)) + ng_epb(0, 1, PKT_A)
    frames, r = frames_of(write(tmp_path, "sb.pcapng", data))
    assert [f.data for f in frames] == [PKT_A] and "short block" in r.problems[0]


# ------------------------------------------------------------------ compressed captures

COMPRESS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}


def _described(frames) -> list[tuple]:
    return [(f.ts, f.linktype, f.data, f.orig_len) for f in frames]


def _two_formats() -> dict[str, bytes]:
    return {"pcap": pcap_bytes([(1, 0, PKT_A), (2, 5, PKT_B), (3, 7, PKT_C)] * 50),
            "pcapng": ng_shb() + ng_idb(113, 9) + b"".join(ng_epb(0, 10**9 * i, p)
                                                           for i, p in enumerate([PKT_A, PKT_C] * 50))}


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_compressed_captures_read_as_the_plain_file(tmp_path: Path, kind: str) -> None:
    """gzip/bzip2/xz captures (tcpdump -z rotations, archived evidence) give the plain file's frames;
    concatenated members with zero padding between them read on; progress is in stored bytes."""
    for fmt, data in _two_formats().items():
        plain, _ = frames_of(write(tmp_path, f"p.{fmt}", data))
        packed = COMPRESS[kind](data)
        frames, r = frames_of(write(tmp_path, f"c.{fmt}", packed))
        assert _described(frames) == _described(plain) and r.problems == []
        assert r.compression == kind and r.progress() == r.size == len(packed)
        third = len(data) // 3
        members = COMPRESS[kind](data[:third]) + bytes(8) + COMPRESS[kind](data[third : 2 * third]) \
            + COMPRESS[kind](data[2 * third :]) + bytes(4)
        frames, r = frames_of(write(tmp_path, f"m.{fmt}", members))
        assert _described(frames) == _described(plain) and r.problems == []


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_cut_or_damaged_compressed_data_ends_the_frames_with_a_problem(tmp_path: Path, kind: str) -> None:
    rnd = random.Random(7)
    data = pcap_bytes([(i, 0, rnd.randbytes(1000)) for i in range(400)])
    plain, _ = frames_of(write(tmp_path, "p.pcap", data))
    packed = bz2.compress(data, 1) if kind == "bzip2" else COMPRESS[kind](data)  # bzip2: 100 kB blocks
    frames, r = frames_of(write(tmp_path, "cut", packed[: len(packed) * 2 // 3]))
    assert _described(frames) == _described(plain[: len(frames)]) and len(frames) < len(plain)
    assert "data damaged" in r.problems[0] and "ends before its end-of-stream marker" in r.problems[0]
    bad = bytearray(packed)
    for i in range(len(bad) // 2, len(bad) // 2 + 16):
        bad[i] ^= 0x5A
    frames, r = frames_of(write(tmp_path, "bad", bytes(bad)))  # garbage frames maybe, never an exception
    assert r.problems


def test_compressed_files_that_are_no_captures_are_clear_errors(tmp_path: Path) -> None:
    cases = {
        b"\x1f\x8b" + bytes(range(40)): "not a readable gzip file",
        lzma.compress(b"hello, world"): "not a pcap or pcapng file (xz-compressed)",
        gzip.compress(b"ab"): "gzip-compressed, but not a capture file (too short)",
        b"\x28\xb5\x2f\xfd" + bytes(20): "zstd-compressed, not a capture: unpack it, or pipe it in as '-' "
                                       "(zstd -dc FILE | mproxy replay - ...)",
        b"\x04\x22\x4d\x18" + bytes(20): "lz4-compressed",
        b"PK\x03\x04" + bytes(20): "a zip archive",
    }
    for i, (data, msg) in enumerate(cases.items()):
        path = write(tmp_path, f"x{i}", data)
        with pytest.raises(CaptureError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
            list(CaptureReader(path))
        assert path in str(e.value)


def test_a_small_file_that_expands_to_much_more_is_streamed(tmp_path: Path) -> None:
    """Decoding goes as far as the record loop asks: 40 MB of content from a 40 kB gzip file is read
    in bounded memory, not decoded whole."""
    big = 200_000
    content = pcap_bytes([]) + b"".join(struct.pack("<IIII", i, 0, big, big) + bytes(big) for i in range(200))
    path = write(tmp_path, "bomb.pcap.gz", gzip.compress(content, 9))
    assert len(content) > 500 * (tmp_path / "bomb.pcap.gz").stat().st_size
    tracemalloc.start()
    try:
        n = sum(len(f.data) for f in CaptureReader(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 200 * big and peak < 4 * 1024 * 1024, peak


def test_xz_dictionary_claims_over_the_limit_are_refused(tmp_path: Path) -> None:
    import mproxy.io.pcap as pcap

    path = write(tmp_path, "big-dict.pcap.xz", lzma.compress(_two_formats()["pcap"], preset=0))  # 256 KiB
    with mock.patch.object(pcap, "_XZ_MEMLIMIT", 64 * 1024):
        with pytest.raises(CaptureError, match="not a readable xz file"):
            list(CaptureReader(path))
    assert len(list(CaptureReader(path))) == 150


# ------------------------------------------------------------------ merging


def test_merge_by_timestamp_with_numbering(tmp_path: Path) -> None:
    a = write(tmp_path, "a.pcap", pcap_bytes([(1, 0, b"a1"), (3, 0, b"a3"), (5, 0, b"a5")]))
    b = write(tmp_path, "b.pcapng", ng_shb() + ng_idb(113, 9) + ng_epb(0, 2_000_000_000, b"b2")
              + ng_epb(0, 3_000_000_000, b"b3") + ng_epb(0, 9_000_000_000, b"b9"))
    readers: list[CaptureReader] = []
    frames = list(read_captures([a, b], readers))
    assert [f.data for f in frames] == [b"a1", b"b2", b"a3", b"b3", b"a5", b"b9"]  # ties: first file first
    assert [f.number for f in frames] == [1, 2, 3, 4, 5, 6]
    assert [f.source for f in frames] == [0, 1, 0, 1, 0, 1]
    assert [f.linktype for f in frames] == [1, 113, 1, 113, 1, 113]
    assert [r.path for r in readers] == [a, b]


def test_merge_with_an_empty_file_and_a_damaged_one(tmp_path: Path) -> None:
    empty = write(tmp_path, "empty.pcap", pcap_bytes([]))
    damaged = write(tmp_path, "dmg.pcap", pcap_bytes([(2, 0, b"d2"), (4, 0, PKT_C)])[:-5])
    ok = write(tmp_path, "ok.pcap", pcap_bytes([(1, 0, b"o1"), (3, 0, b"o3")]))
    readers: list[CaptureReader] = []
    frames = list(read_captures([empty, damaged, ok], readers))
    assert [(f.number, f.data) for f in frames] == [(1, b"o1"), (2, b"d2"), (3, b"o3")]
    assert [len(r.problems) for r in readers] == [0, 1, 0]
    assert list(read_captures([empty])) == []


def test_merge_fails_early_on_a_bad_file(tmp_path: Path) -> None:
    ok = write(tmp_path, "ok.pcap", pcap_bytes([(1, 0, b"o1")]))
    bad = write(tmp_path, "bad.pcap", b"garbage garbage garbage")
    it = read_captures([ok, bad])
    with pytest.raises(CaptureError, match="bad.pcap"):
        next(it)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.lists(st.integers(0, 12), max_size=6), min_size=2, max_size=5))
def test_merge_is_the_merge_of_all_files_held_open(tmp_path: Path, files: list[list[int]]) -> None:
    """Each file opened only when its first frame's time comes: the same order as a merge of all files
    held open (heapq.merge: by time, ties to the earlier file), timestamps out of order in a file too."""
    paths = [write(tmp_path, f"f{i}.pcap", pcap_bytes([(t, 0, bytes([i, k])) for k, t in enumerate(tss)]))
             for i, tss in enumerate(files)]
    held = heapq.merge(*[list(CaptureReader(p, i)) for i, p in enumerate(paths)], key=lambda f: f.ts)
    assert [f.data for f in read_captures(paths)] == [f.data for f in held]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_rotated_captures_are_read_one_after_the_other(tmp_path: Path) -> None:
    """300 rotated files (tcpdump -C/-G, ring buffers): one open at a time (two where they overlap),
    not 300 files and 300 read buffers."""
    paths = [write(tmp_path, f"r{i:03}.pcap", pcap_bytes([(100 + 10 * i + k, 0, bytes([i % 256, k])) for k in range(5)]))
             for i in range(300)]
    base = len(os.listdir("/proc/self/fd"))
    most, frames = 0, []
    for fr in read_captures(paths):
        most = max(most, len(os.listdir("/proc/self/fd")) - base)
        frames.append((fr.number, fr.source, fr.data))
    assert frames == [(5 * i + k + 1, i, bytes([i % 256, k])) for i in range(300) for k in range(5)]
    assert most <= 2, most


# ------------------------------------------------------------------ writer


def test_writer_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "w.pcap"
    with p.open("wb") as f:
        w = PcapWriter(f, linktype=101)
        w.write(10.25, PKT_A)
        w.write(10.9999997, PKT_B)  # rounds up into the next second
        w.flush()
    frames, r = frames_of(str(p))
    assert [(f.linktype, f.data) for f in frames] == [(101, PKT_A), (101, PKT_B)]
    assert frames[0].ts == 10.25 and frames[1].ts == 11.0


def test_write_frames_writes_what_write_writes(tmp_path: Path) -> None:
    frames = [(10.25, PKT_A), (10.25, PKT_B), (10.9999997, PKT_A), (11.0000004, PKT_B), (3.0, PKT_A)]
    one, many = tmp_path / "one.pcap", tmp_path / "many.pcap"
    with one.open("wb") as f:
        w = PcapWriter(f)
        for ts, fr in frames:
            w.write(ts, fr)
    with many.open("wb") as f:
        w = PcapWriter(f)
        w.write_frames(frames[:2])
        w.write_frames([])
        w.write_frames(frames[2:])
    assert one.read_bytes() == many.read_bytes()


# ------------------------------------------------------------------ the reference captures


REFERENCE = {
    # name: (frames, link type)
    "tcp-only.pcap": (2798, 113),
    "v0-client-4subflows.pcap": (2884, 113),
    "v0-server-4subflows.pcap": (None, 113),
    "mptcp-v0.pcap": (264, 1),
    "mptcp-v1.pcap": (20, 113),
    "mptcp-tcprst.pcap": (2, 101),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_captures(name: str) -> None:
    path = CAPTURES / name
    if not path.exists():
        pytest.skip("reference captures absent")
    count, lt = REFERENCE[name]
    frames, r = frames_of(str(path))
    assert r.problems == []
    if count is not None:
        assert len(frames) == count
    assert {f.linktype for f in frames} == {lt}
    ts = [f.ts for f in frames]
    assert all(t > 1e9 for t in ts)
    assert all(len(f.data) <= f.orig_len for f in frames)


def test_reference_pcapng_merge() -> None:
    paths = [CAPTURES / "v0-client-4subflows.pcap", CAPTURES / "v0-server-4subflows.pcap"]
    if not all(p.exists() for p in paths):
        pytest.skip("reference captures absent")
    singles = [list(CaptureReader(str(p), i)) for i, p in enumerate(paths)]
    merged = list(read_captures([str(p) for p in paths]))
    assert len(merged) == sum(map(len, singles))
    assert [f.number for f in merged] == list(range(1, len(merged) + 1))
    # (these files are not in strict time order themselves, so the merge is
    # only ordered where both files are)
    # each file's own order is kept
    for i in (0, 1):
        assert [f.data for f in merged if f.source == i] == [f.data for f in singles[i]]


# ------------------------------------------------------------------ the compiled record slicer


from mproxy.io import pcap as pcap_module  # noqa: E402


def _read_both(path: str) -> tuple[object, object]:
    """(frames + problems) through the compiled slicer and through the Python loop."""
    def one() -> object:
        r = CaptureReader(path)
        try:
            frames = [(f.ts, f.linktype, f.data, f.orig_len, f.source, f.number) for f in r]
        except CaptureError as e:
            return ("error", str(e))
        return frames, r.problems, r.position

    got = one()
    with mock.patch.object(pcap_module, "_pcap_records", None):
        want = one()
    return got, want


@pytest.mark.skipif(pcap_module._pcap_records is None, reason="accelerator not built (or MPROXY_NO_ACCEL)")
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=300),
                                  st.integers(0, 2**32 - 1)), max_size=12),
       endian=st.sampled_from("<>"), ns=st.booleans(), cut=st.integers(0, 400), big=st.integers(0, 3),
       junk=st.binary(max_size=20))
def test_compiled_records_equal_the_python_loop(tmp_path: Path, records: list[tuple[int, int, bytes, int]],
                                                endian: str, ns: bool, cut: int, big: int, junk: bytes) -> None:
    """Same frames (timestamps to the bit), problems and offsets, for whole, cut, lying (> MAX_FRAME)
    and junk-tailed captures of both byte orders and resolutions, across the 256 KiB reads."""
    data = pcap_bytes(records, endian=endian, ns=ns, linktype=276)
    if big:  # records spanning the slicer's reads
        data += b"".join(struct.pack(endian + "IIII", 7, 8, n, n) + bytes((n % 251,)) * n
                         for n in (200_000, 150_000, 262_144)[:big])
    if cut < 200:
        data = data[: max(24, len(data) - cut)]
    elif cut < 300:
        data += struct.pack(endian + "IIII", 1, 2, 300_000, 5) + junk  # claims more than MAX_FRAME
    else:
        data += junk
    path = tmp_path / "c.pcap"
    path.write_bytes(data)
    got, want = _read_both(str(path))
    assert got == want
    if records and cut >= 300:
        assert isinstance(got, tuple) and len(got[0]) >= len(records)


def test_compiled_records_on_the_reference_captures() -> None:
    if pcap_module._pcap_records is None or not CAPTURES.is_dir():
        pytest.skip("accelerator or reference captures missing")
    for p in sorted(CAPTURES.glob("*.pcap")):
        got, want = _read_both(str(p))
        assert got == want and got[0], p.name  # type: ignore[index]
