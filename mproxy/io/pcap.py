"""pcap / pcapng reading (several files merged by time) and pcap writing.

File-level problems (not a capture, unsupported version) raise
:class:`CaptureError` before the first frame; damage later in a file (a
truncated last packet, a block with a lying length) ends that file's frames
and is recorded in :attr:`CaptureReader.problems` so callers can report it.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from struct import Struct, error as StructError
from typing import IO, BinaryIO, Iterator

from ..compiled import accelerator

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
MAX_FRAME = 256 * 1024  # larger claims are damage, not packets


_CHUNK = 256 * 1024  # classic pcap read size when records are sliced in C


class CaptureError(Exception):
    """A capture file that cannot be read at all (message names the file)."""


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
    position: int = 0

    def __iter__(self) -> Iterator[Frame]:
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise CaptureError(f"{self.path}: cannot open: {e.strerror or e}") from None
        with f:
            try:
                self.size = os.fstat(f.fileno()).st_size
            except OSError:
                self.size = 0
            head = f.read(4)
            if len(head) < 4:
                raise CaptureError(f"{self.path}: not a capture file (too short)")
            le = int.from_bytes(head, "little")
            be = int.from_bytes(head, "big")
            if le in (PCAP_MAGIC_US, PCAP_MAGIC_NS) or be in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
                yield from self._pcap(f, head)
            elif le == PCAPNG_SHB:
                yield from self._pcapng(f, head)
            else:
                raise CaptureError(f"{self.path}: not a pcap or pcapng file (magic {head.hex()})")

    # -- classic pcap ---------------------------------------------------
    def _pcap(self, f: BinaryIO, head: bytes) -> Iterator[Frame]:
        rest = f.read(20)
        if len(rest) < 20:
            raise CaptureError(f"{self.path}: truncated pcap header")
        endian = "<" if int.from_bytes(head, "little") in (PCAP_MAGIC_US, PCAP_MAGIC_NS) else ">"
        magic = Struct(endian + "I").unpack(head)[0]
        div = 1e9 if magic == PCAP_MAGIC_NS else 1e6
        major, _minor, _tz, _sig, snaplen, network = Struct(endian + "HHiIII").unpack(rest)
        if major != 2:
            raise CaptureError(f"{self.path}: unsupported pcap version {major}")
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
                self.problems.append(f"{self.path}: truncated record header at offset {pos}")
                return
            sec, frac, incl, orig = rec.unpack(hdr)
            if incl > MAX_FRAME:
                self.problems.append(f"{self.path}: record at offset {pos} claims {incl} bytes")
                return
            data = f.read(incl)
            if len(data) < incl:
                self.problems.append(f"{self.path}: truncated last packet at offset {pos}")
                return
            pos += 16 + incl
            self.position = pos
            yield Frame(sec + frac / div, linktype, data, orig, self.source)

    def _pcap_compiled(self, f: BinaryIO, little: bool, div: float, linktype: int) -> Iterator[Frame]:
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
                self.problems.append(f"{self.path}: record at offset {pos} claims {claim} bytes")
                return
            more = f.read(_CHUNK)
            if not more:
                rest = len(buf) - i
                if 0 < rest < 16:
                    self.problems.append(f"{self.path}: truncated record header at offset {pos}")
                elif rest:
                    self.problems.append(f"{self.path}: truncated last packet at offset {pos}")
                return
            buf = buf[i:] + more
            i = 0

    # -- pcapng -------------------------------------------------------
    def _pcapng(self, f: BinaryIO, head: bytes) -> Iterator[Frame]:
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
                self.problems.append(f"{self.path}: truncated block at offset {pos}")
                return
            lenb = f.read(4)
            if len(lenb) < 4:
                self.problems.append(f"{self.path}: truncated block at offset {pos}")
                return
            btype_le = int.from_bytes(bh, "little")
            if btype_le == PCAPNG_SHB:
                bom = f.read(4)
                if len(bom) < 4:
                    self.problems.append(f"{self.path}: truncated section header at offset {pos}")
                    return
                if int.from_bytes(bom, "little") == PCAPNG_BOM:
                    endian = "<"
                elif int.from_bytes(bom, "big") == PCAPNG_BOM:
                    endian = ">"
                else:
                    if pos == 0:
                        raise CaptureError(f"{self.path}: bad pcapng byte-order magic")
                    self.problems.append(f"{self.path}: bad section header at offset {pos}")
                    return
                blen = Struct(endian + "I").unpack(lenb)[0]
                if blen < 28 or blen % 4 or blen > MAX_FRAME:
                    if pos == 0:
                        raise CaptureError(f"{self.path}: bad pcapng section header length {blen}")
                    self.problems.append(f"{self.path}: bad section header length at offset {pos}")
                    return
                body = f.read(blen - 12)
                if len(body) < blen - 12:
                    self.problems.append(f"{self.path}: truncated section header at offset {pos}")
                    return
                ifaces = []
                pos += blen
                continue
            u32 = Struct(endian + "I")
            btype = u32.unpack(bh)[0]
            blen = u32.unpack(lenb)[0]
            if blen < 12 or blen % 4 or blen > MAX_FRAME + 64:
                self.problems.append(f"{self.path}: block at offset {pos} has bad length {blen}")
                return
            body = f.read(blen - 8)
            if len(body) < blen - 8:
                self.problems.append(f"{self.path}: truncated last block at offset {pos}")
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
                        self.problems.append(f"{self.path}: bad packet block at offset {pos - blen}")
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
                self.problems.append(f"{self.path}: short block type {btype} at offset {pos - blen}")


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
    """Frames of several captures merged by timestamp, numbered from 1.

    Pass ``readers`` (an empty list) to get the per-file readers back, e.g. to
    report their ``problems`` after iteration. Every file is opened (and its
    header checked) before the first frame is yielded, so a bad file fails early.
    """
    rs = [CaptureReader(p, i) for i, p in enumerate(paths)]
    if readers is not None:
        readers.extend(rs)
    its = []
    for r in rs:
        it = iter(r)
        try:
            first = next(it)
        except StopIteration:
            continue
        its.append(itertools.chain((first,), it))
    merged = its[0] if len(its) == 1 else heapq.merge(*its, key=lambda fr: fr.ts)
    for n, fr in enumerate(merged, 1):
        fr.number = n
        yield fr


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
