"""pcap / pcapng reading (several files merged by time) and pcap writing.

File-level problems (not a capture, unsupported version) raise
:class:`CaptureError` before the first frame; damage later in a file (a
truncated last packet, a block with a lying length) ends that file's frames
and is recorded in :attr:`CaptureReader.problems` so callers can report it.

Captures compressed with gzip, bzip2 or xz (``tcpdump -z gzip`` rotations,
archived evidence) are read as they are, streamed through the standard
library's decompressors, as Wireshark reads them; damaged compressed data ends
the file's frames like any other damage.
"""

from __future__ import annotations

import bz2
import heapq
import lzma
import os
import stat
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from struct import Struct, error as StructError
from typing import IO, Any, BinaryIO, Generator, Iterator, Protocol

from ..compiled import accelerator

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
MAX_FRAME = 256 * 1024  # larger claims are damage, not packets


_CHUNK = 256 * 1024  # classic pcap read size when records are sliced in C


class CaptureError(Exception):
    """A capture file that cannot be read at all (message names the file)."""


# compressed inputs, by their first bytes: the standard library's decoders read these
_DECODERS: tuple[tuple[bytes, str, Callable[[], Any]], ...] = (
    (b"\x1f\x8b", "gzip", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    (b"BZh", "bzip2", bz2.BZ2Decompressor),
    (b"\xfd7zX", "xz", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)),
)
# an xz file says how large a dictionary it needs (xz -9: 64 MiB); a file that claims more is refused
_XZ_MEMLIMIT = 128 * 1024 * 1024
_RAW_CHUNK = 64 * 1024
# and these it does not (the error says how to get a capture out of them)
_UNSUPPORTED = ((b"\x28\xb5\x2f\xfd", "zstd-compressed", "zstd -dc"), (b"\x04\x22\x4d\x18", "lz4-compressed", "lz4 -dc"),
                (b"PK\x03\x04", "a zip archive", "unzip -p"))
_DECODE_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


class _Source(Protocol):
    """What the record loops read from: a file, or a compressed file's decoded content."""

    def read(self, n: int, /) -> bytes: ...


class _Decoded:
    """A compressed file's content, streamed for the record loops: full reads as from a file, at
    most what was asked decoded at a time (a small file that expands to gigabytes costs time, not
    memory); concatenated members (gzip, bzip2, xz streams; zero padding between them) read on.
    Damaged or cut compressed data ends the content, recorded once as a problem, with every byte
    decoded before the damage kept."""

    __slots__ = ("raw", "make", "dec", "feed", "reader", "kind", "consumed", "out", "failed")

    def __init__(self, raw: BinaryIO, head: bytes, make: Callable[[], Any], reader: CaptureReader,
                 kind: str) -> None:
        self.raw, self.make, self.dec, self.feed = raw, make, make(), head
        self.reader, self.kind = reader, kind
        self.consumed = len(head)  # compressed bytes taken from the file
        self.out = 0  # decoded bytes handed out
        self.failed = False

    def _more(self) -> bytes:
        data = self.raw.read(_RAW_CHUNK)
        self.consumed += len(data)
        return data

    def _read1(self, n: int) -> bytes:
        """Up to ``n`` decoded bytes, b"" at the end; the decoders' errors, or EOFError when the
        compressed data stops before its end marker."""
        while True:
            d = self.dec
            if d.eof:
                rest = d.unused_data or self._more()
                while rest and not rest.strip(b"\0"):  # padding after a member
                    rest = self._more()
                if not rest:
                    return b""
                self.dec = d = self.make()
                self.feed = rest.lstrip(b"\0")
            out = d.decompress(self.feed, n)
            self.feed = getattr(d, "unconsumed_tail", b"")  # zlib hands back what it did not take
            if out:
                return out  # type: ignore[no-any-return]
            if d.eof:
                continue
            more = self._more()
            if not more:
                raise EOFError("the compressed data ends before its end-of-stream marker")
            self.feed += more

    def fill(self, n: int, parts: list[bytes]) -> None:
        """Decoded bytes into ``parts`` until there are ``n`` or the content ends; the decoders'
        errors propagate, and what was decoded before them stays in ``parts``."""
        while n > 0:
            b = self._read1(n)
            if not b:
                return
            parts.append(b)
            n -= len(b)

    def read(self, n: int) -> bytes:
        if self.failed:
            return b""
        parts: list[bytes] = []
        try:
            self.fill(n, parts)
        except _DECODE_ERRORS as e:
            self.failed = True
            self.reader.problems.append(f"{self.reader.name}: {self.kind} data damaged after "
                                        f"{self.out + sum(map(len, parts))} decompressed bytes: {e}")
        data = b"".join(parts)
        self.out += len(data)
        return data


@dataclass(slots=True)
class Frame:
    ts: float
    linktype: int
    data: bytes
    orig_len: int
    source: int = 0  # index of the input file
    number: int = 0  # 1-based index in the merged input (set by merge)


@dataclass(slots=True)
class CaptureReader:
    """Iterates the frames of one pcap or pcapng file."""

    path: str
    source: int = 0
    problems: list[str] = field(default_factory=list)
    size: int = 0
    position: int = 0  # offset in the capture (decompressed, for a compressed file)
    compression: str | None = None  # "gzip", "bzip2", "xz"
    _decoded: _Decoded | None = field(default=None, init=False, repr=False)

    def progress(self) -> int:
        """How far into the file (of ``size`` bytes, as stored) reading has come."""
        return self.position if self._decoded is None else self._decoded.consumed

    @property
    def name(self) -> str:
        """The file as messages name it."""
        return "standard input" if self.path == "-" else self.path

    def __iter__(self) -> Generator[Frame, None, None]:
        if self.path == "-":  # a pipe (zstd -dc x.zst | mproxy replay -), not closed after
            stdin = getattr(sys.stdin, "buffer", None)
            if stdin is None:
                raise CaptureError("standard input: not available")
            yield from self._read(stdin)
            return
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise CaptureError(f"{self.name}: cannot open: {e.strerror or e}") from None
        with f:
            yield from self._read(f)

    def _read(self, f: BinaryIO) -> Iterator[Frame]:
        try:
            st = os.fstat(f.fileno())
            self.size = st.st_size if stat.S_ISREG(st.st_mode) else 0  # 0: a pipe, size unknown
        except (OSError, ValueError):
            self.size = 0
        head = f.read(4)
        if len(head) < 4:
            raise CaptureError(f"{self.name}: not a capture file (too short)")
        for magic, kind, make in _DECODERS:
            if head.startswith(magic):
                yield from self._decompress(f, head, kind, make)
                return
        yield from self._capture(f, head)

    def _capture(self, f: _Source, head: bytes) -> Iterator[Frame]:
        le = int.from_bytes(head, "little")
        be = int.from_bytes(head, "big")
        if le in (PCAP_MAGIC_US, PCAP_MAGIC_NS) or be in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            yield from self._pcap(f, head)
        elif le == PCAPNG_SHB:
            yield from self._pcapng(f, head)
        else:
            for magic, what, how in _UNSUPPORTED:
                if head.startswith(magic):
                    raise CaptureError(f"{self.name}: {what}, not a capture: unpack it, or pipe it in as '-' "
                                       f"({how} FILE | mproxy replay - ...)")
            inner = f" ({self.compression}-compressed)" if self.compression else ""
            raise CaptureError(f"{self.name}: not a pcap or pcapng file{inner} (magic {head.hex()})")

    def _decompress(self, f: BinaryIO, head: bytes, kind: str, make: Callable[[], Any]) -> Iterator[Frame]:
        self.compression = kind
        self._decoded = src = _Decoded(f, head, make, self, kind)
        parts: list[bytes] = []
        try:
            src.fill(4, parts)  # (damage this early means it is no capture: an error, not a problem)
        except _DECODE_ERRORS as e:
            raise CaptureError(f"{self.name}: not a readable {kind} file: {e}") from None
        inner = b"".join(parts)
        if len(inner) < 4:
            raise CaptureError(f"{self.name}: {kind}-compressed, but not a capture file (too short)")
        src.out = len(inner)
        yield from self._capture(src, inner)

    # -- classic pcap ---------------------------------------------------
    def _pcap(self, f: _Source, head: bytes) -> Iterator[Frame]:
        rest = f.read(20)
        if len(rest) < 20:
            raise CaptureError(f"{self.name}: truncated pcap header")
        endian = "<" if int.from_bytes(head, "little") in (PCAP_MAGIC_US, PCAP_MAGIC_NS) else ">"
        magic = Struct(endian + "I").unpack(head)[0]
        div = 1e9 if magic == PCAP_MAGIC_NS else 1e6
        major, _minor, _tz, _sig, snaplen, network = Struct(endian + "HHiIII").unpack(rest)
        if major != 2:
            raise CaptureError(f"{self.name}: unsupported pcap version {major}")
        linktype = network & 0x0FFFFFFF
        if _pcap_records is not None:
            yield from self._pcap_compiled(f, endian == "<", div, linktype)
            return
        rec = Struct(endian + "IIII")
        pos = 24
        while True:
            hdr = f.read(16)
            if not hdr:
                return
            if len(hdr) < 16:
                self.problems.append(f"{self.name}: truncated record header at offset {pos}")
                return
            sec, frac, incl, orig = rec.unpack(hdr)
            if incl > MAX_FRAME:
                self.problems.append(f"{self.name}: record at offset {pos} claims {incl} bytes")
                return
            data = f.read(incl)
            if len(data) < incl:
                self.problems.append(f"{self.name}: truncated last packet at offset {pos}")
                return
            pos += 16 + incl
            self.position = pos
            yield Frame(sec + frac / div, linktype, data, orig, self.source)

    def _pcap_compiled(self, f: _Source, little: bool, div: float, linktype: int) -> Iterator[Frame]:
        """_pcap's record loop with the records of each 256 KiB read sliced into Frames in C
        (``mproxy/_accel.c``); the same frames and the same problems, at the same offsets."""
        assert _pcap_records is not None
        buf = b""
        i = 0
        pos = 24  # file offset of buf[i]
        while True:
            frames, j, claim = _pcap_records(buf, i, little, div, linktype, self.source, MAX_FRAME)
            if frames:
                pos += j - i
                self.position = pos
                yield from frames
            i = j
            if claim:
                self.problems.append(f"{self.name}: record at offset {pos} claims {claim} bytes")
                return
            more = f.read(_CHUNK)
            if not more:
                rest = len(buf) - i
                if 0 < rest < 16:
                    self.problems.append(f"{self.name}: truncated record header at offset {pos}")
                elif rest:
                    self.problems.append(f"{self.name}: truncated last packet at offset {pos}")
                return
            buf = buf[i:] + more
            i = 0

    # -- pcapng -------------------------------------------------------
    def _pcapng(self, f: _Source, head: bytes) -> Iterator[Frame]:
        endian = "<"
        ifaces: list[tuple[int, float]] = []  # (linktype, seconds per tick)
        pos = 0
        first = True
        while True:
            bh = head if first else f.read(4)
            first = False
            if not bh:
                return
            if len(bh) < 4:
                self.problems.append(f"{self.name}: truncated block at offset {pos}")
                return
            lenb = f.read(4)
            if len(lenb) < 4:
                self.problems.append(f"{self.name}: truncated block at offset {pos}")
                return
            btype_le = int.from_bytes(bh, "little")
            if btype_le == PCAPNG_SHB:
                bom = f.read(4)
                if len(bom) < 4:
                    self.problems.append(f"{self.name}: truncated section header at offset {pos}")
                    return
                if int.from_bytes(bom, "little") == PCAPNG_BOM:
                    endian = "<"
                elif int.from_bytes(bom, "big") == PCAPNG_BOM:
                    endian = ">"
                else:
                    if pos == 0:
                        raise CaptureError(f"{self.name}: bad pcapng byte-order magic")
                    self.problems.append(f"{self.name}: bad section header at offset {pos}")
                    return
                blen = Struct(endian + "I").unpack(lenb)[0]
                if blen < 28 or blen % 4 or blen > MAX_FRAME:
                    if pos == 0:
                        raise CaptureError(f"{self.name}: bad pcapng section header length {blen}")
                    self.problems.append(f"{self.name}: bad section header length at offset {pos}")
                    return
                body = f.read(blen - 12)
                if len(body) < blen - 12:
                    self.problems.append(f"{self.name}: truncated section header at offset {pos}")
                    return
                ifaces = []
                pos += blen
                continue
            u32 = Struct(endian + "I")
            btype = u32.unpack(bh)[0]
            blen = u32.unpack(lenb)[0]
            if blen < 12 or blen % 4 or blen > MAX_FRAME + 64:
                self.problems.append(f"{self.name}: block at offset {pos} has bad length {blen}")
                return
            body = f.read(blen - 8)
            if len(body) < blen - 8:
                self.problems.append(f"{self.name}: truncated last block at offset {pos}")
                return
            pos += blen
            self.position = pos
            body = body[:-4]  # trailing length copy
            try:
                if btype == 1:  # Interface Description Block
                    linktype, _r, _snap = Struct(endian + "HHI").unpack_from(body, 0)
                    ifaces.append((linktype, _if_tsresol(body[8:], endian)))
                elif btype == 6:  # Enhanced Packet Block
                    ifid, tsh, tsl, cap, orig = Struct(endian + "IIIII").unpack_from(body, 0)
                    if ifid >= len(ifaces) or 20 + cap > len(body):
                        self.problems.append(f"{self.name}: bad packet block at offset {pos - blen}")
                        continue
                    lt, tick = ifaces[ifid]
                    yield Frame(((tsh << 32) | tsl) * tick, lt, body[20 : 20 + cap], orig, self.source)
                elif btype == 3:  # Simple Packet Block
                    if not ifaces:
                        continue
                    (orig,) = u32.unpack_from(body, 0)
                    cap = min(orig, len(body) - 4)
                    yield Frame(0.0, ifaces[0][0], body[4 : 4 + cap], orig, self.source)
                elif btype == 2:  # obsolete Packet Block
                    ifid, _drops, tsh, tsl, cap, orig = Struct(endian + "HHIIII").unpack_from(body, 0)
                    if ifid >= len(ifaces) or 20 + cap > len(body):
                        continue
                    lt, tick = ifaces[ifid]
                    yield Frame(((tsh << 32) | tsl) * tick, lt, body[20 : 20 + cap], orig, self.source)
            except StructError:
                self.problems.append(f"{self.name}: short block type {btype} at offset {pos - blen}")


def _accelerated() -> Callable[..., tuple[list[Frame], int, int]] | None:
    """The compiled record slicer (``mproxy/_accel.c``), if :func:`~mproxy.compiled.accelerator` has it."""
    _accel = accelerator()
    if _accel is None:
        return None
    try:
        _accel.init_frame(Frame, tuple(f.name for f in fields(Frame)))
    except (AttributeError, TypeError):
        return None
    return _accel.pcap_records  # type: ignore[no-any-return]


_pcap_records = _accelerated()


def _if_tsresol(opts: bytes, endian: str) -> float:
    """Seconds per timestamp tick from an IDB's if_tsresol option (default µs)."""
    i = 0
    hdr = Struct(endian + "HH")
    while i + 4 <= len(opts):
        code, olen = hdr.unpack_from(opts, i)
        if code == 0:
            break
        if code == 9 and olen >= 1 and i + 5 <= len(opts):
            v = opts[i + 4]
            return 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
        i += 4 + ((olen + 3) & ~3)
    return 1e-6


def read_captures(paths: list[str], readers: list[CaptureReader] | None = None) -> Iterator[Frame]:
    """Frames of several captures merged by timestamp (ties: the earlier file first), numbered
    from 1.

    Pass ``readers`` (an empty list) to get the per-file readers back, e.g. to
    report their ``problems`` after iteration. Every file is opened (and its
    header checked) before the first frame is yielded, so a bad file fails early.
    A file is then held open only from its first frame's time on: rotated
    captures (``tcpdump -C``/``-G``, ring buffers: hundreds of files, one after
    the other) cost one or two open files and read buffers, not one per file.
    """
    if paths.count("-") > 1:
        raise CaptureError("standard input ('-') can be read only once")
    rs = [CaptureReader(p, i) for i, p in enumerate(paths)]
    if readers is not None:
        readers.extend(rs)
    if len(rs) == 1:
        merged: Iterator[Frame] = iter(rs[0])
    else:
        merged = _merge(rs)
    for n, fr in enumerate(merged, 1):
        fr.number = n
        yield fr


def _merge(rs: list[CaptureReader]) -> Iterator[Frame]:
    heap: list[tuple[float, int, Frame, Iterator[Frame]]] = []  # (ts, source) is unique: one entry a file
    waiting: list[tuple[float, int, CaptureReader]] = []  # files read again from their first frame's time
    for r in rs:
        probe = r.__iter__()
        first = next(probe, None)  # opens the file and checks it (CaptureError now, not mid-merge)
        if first is None:
            continue
        if r.path == "-":  # a pipe cannot be read twice: it stays open
            heap.append((first.ts, r.source, first, probe))
        else:
            probe.close()  # closes the file; its frames start again when their time comes
            r.position, r._decoded = 0, None  # (progress: nothing of it read yet)
            waiting.append((first.ts, r.source, r))
    heapq.heapify(heap)
    waiting.sort(key=lambda w: (w[0], w[1]), reverse=True)  # the next to open last
    while heap or waiting:
        while waiting and (not heap or waiting[-1][:2] < heap[0][:2]):
            r = waiting.pop()[2]
            r.problems.clear()  # what the first look recorded is recorded again
            frames = iter(r)
            first = next(frames, None)
            if first is not None:
                heapq.heappush(heap, (first.ts, r.source, first, frames))
        if not heap:
            break  # (files that came up empty the second time)
        _ts, src, fr, it = heap[0]
        yield fr
        nxt = next(it, None)
        if nxt is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (nxt.ts, src, nxt, it))


def _sec_usec(ts: float) -> tuple[int, int]:
    """A record's timestamp: whole seconds and rounded microseconds (never 1,000,000)."""
    sec = int(ts)
    usec = int(round((ts - sec) * 1e6))
    if usec >= 1_000_000:
        sec, usec = sec + 1, usec - 1_000_000
    return sec, usec


class PcapWriter:
    """Writes classic pcap (µs) records; Ethernet by default (what IDS readers want)."""

    _rec = Struct("<IIII")

    def __init__(self, f: IO[bytes], linktype: int = 1, snaplen: int = 262144) -> None:
        self._f = f
        f.write(Struct("<IHHiIII").pack(PCAP_MAGIC_US, 2, 4, 0, 0, snaplen, linktype))

    def write(self, ts: float, frame: bytes) -> None:
        sec, usec = _sec_usec(ts)
        self._f.write(self._rec.pack(sec, usec, len(frame), len(frame)) + frame)

    def write_frames(self, frames: list[tuple[float, bytes]]) -> None:
        """Many records in one write; the same bytes as :meth:`write` for each in turn (frames
        of one release share a timestamp, so its conversion is done once per run)."""
        pack = self._rec.pack
        parts: list[bytes] = []
        append = parts.append
        last = None
        sec = usec = 0
        for ts, frame in frames:
            if ts != last:
                last = ts
                sec, usec = _sec_usec(ts)
            n = len(frame)
            append(pack(sec, usec, n, n))
            append(frame)
        self._f.write(b"".join(parts))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()
