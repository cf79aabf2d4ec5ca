"""MPTCP option codec, v0 (RFC 6824) and v1 (RFC 8684): decode and encode.

Every subtype is a frozen slotted dataclass holding the raw wire values
(32- or 64-bit as sent), plus any reserved bits, so ``encode(decode(x)) == x``
byte for byte. Decoding takes the TCP flags because several subtypes are
only meaningful in a SYN, SYN/ACK or ACK; inconsistent input returns a
:class:`~mproxy.wire.errors.WireError` value instead of raising.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from struct import Struct
from typing import ClassVar, Union

from .errors import ErrorKind, WireError
from .packet import ACK, SYN, TCPOPT_MPTCP

_U16 = Struct("!H")
_U32 = Struct("!I")
_U64 = Struct("!Q")
_HDR = Struct("!BBB")


class Subtype(IntEnum):
    MP_CAPABLE = 0
    MP_JOIN = 1
    DSS = 2
    ADD_ADDR = 3
    REMOVE_ADDR = 4
    MP_PRIO = 5
    MP_FAIL = 6
    MP_FASTCLOSE = 7
    MP_TCPRST = 8


class JoinPhase(IntEnum):
    """Which packet of the MP_JOIN three-way handshake (decided by length)."""

    SYN = 12
    SYN_ACK = 16
    ACK = 24


# MP_CAPABLE flag bits (RFC 8684 3.1)
CAP_A_CHECKSUM = 0x80
CAP_B_EXTENSIBILITY = 0x40
CAP_C_NO_SOURCE = 0x20
CAP_H_HMAC = 0x01

# DSS flag bits
DSS_A = 0x01  # Data ACK present
DSS_a = 0x02  # Data ACK is 8 octets
DSS_M = 0x04  # DSN, SSN, data-level length (and checksum) present
DSS_m = 0x08  # DSN is 8 octets
DSS_F = 0x10  # DATA_FIN

# MP_TCPRST flag bits
TCPRST_T = 0x01  # transient


def _hdr(length: int, subtype: int, nibble: int) -> bytes:
    return _HDR.pack(TCPOPT_MPTCP, length, (subtype << 4) | (nibble & 0x0F))


@dataclass(frozen=True, slots=True)
class MpCapable:
    """MP_CAPABLE. Which keys are present depends on version and packet.

    v0: SYN and SYN/ACK carry the sender's key (12), the ACK both keys (20).
    v1: SYN carries no key (4), SYN/ACK the server's key (12), the ACK both
    keys (20), and the first data-carrying ACK both keys plus the data-level
    length (22) and the DSS checksum when negotiated (24).
    """

    subtype: ClassVar[Subtype] = Subtype.MP_CAPABLE
    version: int
    flags: int
    sender_key: int | None = None
    receiver_key: int | None = None
    data_len: int | None = None
    checksum: int | None = None

    @property
    def length(self) -> int:
        if self.sender_key is None:
            return 4
        if self.receiver_key is None:
            return 12
        if self.data_len is None:
            return 20
        return 22 if self.checksum is None else 24

    def encode(self) -> bytes:
        out = _hdr(self.length, 0, self.version) + bytes((self.flags,))
        if self.sender_key is not None:
            out += _U64.pack(self.sender_key)
        if self.receiver_key is not None:
            out += _U64.pack(self.receiver_key)
        if self.data_len is not None:
            out += _U16.pack(self.data_len)
        if self.checksum is not None:
            out += _U16.pack(self.checksum)
        return out


@dataclass(frozen=True, slots=True)
class MpJoin:
    """MP_JOIN: SYN (token, nonce), SYN/ACK (64-bit truncated HMAC, nonce), ACK (160-bit HMAC)."""

    subtype: ClassVar[Subtype] = Subtype.MP_JOIN
    phase: JoinPhase
    backup: bool = False
    addr_id: int = 0
    token: int | None = None
    nonce: int | None = None
    hmac: bytes | None = None
    rsv: int = 0  # reserved bits: nibble bits 1-3 (SYN, SYN/ACK) or 12 bits (ACK)

    @property
    def length(self) -> int:
        return int(self.phase)

    def encode(self) -> bytes:
        if self.phase == JoinPhase.ACK:
            return _hdr(24, 1, self.rsv >> 8) + bytes((self.rsv & 0xFF,)) + (self.hmac or b"").ljust(20, b"\0")[:20]
        nib = (self.rsv << 1) | int(self.backup)
        head = _hdr(self.length, 1, nib) + bytes((self.addr_id,))
        if self.phase == JoinPhase.SYN:
            return head + _U32.pack(self.token or 0) + _U32.pack(self.nonce or 0)
        return head + (self.hmac or b"").ljust(8, b"\0")[:8] + _U32.pack(self.nonce or 0)


@dataclass(slots=True)  # not frozen: built once per packet, and frozen init is 2x slower
class Dss:
    """DSS: optional Data ACK and optional mapping (DSN, relative SSN, data-level length, checksum).

    ``flags`` is the raw flags byte (reserved high bits kept). A DSN or Data
    ACK is stored as sent; ``dsn64``/``ack64`` say whether it was 8 octets.
    """

    subtype: ClassVar[Subtype] = Subtype.DSS
    flags: int
    data_ack: int | None = None
    dsn: int | None = None
    ssn: int | None = None
    dll: int | None = None
    checksum: int | None = None
    rsv: int = 0  # reserved low nibble of the subtype byte

    @property
    def ack64(self) -> bool:
        return bool(self.flags & DSS_a)

    @property
    def dsn64(self) -> bool:
        return bool(self.flags & DSS_m)

    @property
    def data_fin(self) -> bool:
        return bool(self.flags & DSS_F)

    @property
    def has_map(self) -> bool:
        return self.dsn is not None

    @property
    def length(self) -> int:
        n = 4
        if self.data_ack is not None:
            n += 8 if self.flags & DSS_a else 4
        if self.dsn is not None:
            n += (8 if self.flags & DSS_m else 4) + 6
            if self.checksum is not None:
                n += 2
        return n

    def encode(self) -> bytes:
        out = bytearray(_hdr(self.length, 2, self.rsv))
        out.append(self.flags)
        if self.data_ack is not None:
            out += _U64.pack(self.data_ack) if self.flags & DSS_a else _U32.pack(self.data_ack)
        if self.dsn is not None:
            out += _U64.pack(self.dsn) if self.flags & DSS_m else _U32.pack(self.dsn)
            out += _U32.pack(self.ssn or 0) + _U16.pack(self.dll or 0)
            if self.checksum is not None:
                out += _U16.pack(self.checksum)
        return bytes(out)


def dss(
    data_ack: int | None = None,
    dsn: int | None = None,
    ssn: int = 0,
    dll: int = 0,
    *,
    checksum: int | None = None,
    data_fin: bool = False,
    ack64: bool = True,
    dsn64: bool = True,
) -> Dss:
    """Build a DSS with flags derived from what is present (for encoders and tests)."""
    flags = 0
    if data_ack is not None:
        flags |= DSS_A | (DSS_a if ack64 else 0)
    if dsn is not None:
        flags |= DSS_M | (DSS_m if dsn64 else 0)
    if data_fin:
        flags |= DSS_F
    return Dss(flags, data_ack, dsn, ssn if dsn is not None else None, dll if dsn is not None else None,
               checksum if dsn is not None else None)


# DSS layouts read without building a Dss (the tracker's per-packet fast path): flags byte & 0x1F
# -> (option length, struct of the fields after the flags byte, fields present: 1 Data ACK,
# 2 mapping, 3 both). DATA_FIN and DSS checksums are absent here on purpose: those go through
# :func:`decode`, as does any length that does not match.
DSS_PLAIN: dict[int, tuple[int, Struct, int]] = {
    DSS_A: (8, Struct("!I"), 1),
    DSS_A | DSS_a: (12, Struct("!Q"), 1),
    DSS_M: (14, Struct("!IIH"), 2),
    DSS_M | DSS_m: (18, Struct("!QIH"), 2),
    DSS_A | DSS_M: (18, Struct("!IIIH"), 3),
    DSS_A | DSS_a | DSS_M: (22, Struct("!QIIH"), 3),
    DSS_A | DSS_M | DSS_m: (22, Struct("!IQIH"), 3),
    DSS_A | DSS_a | DSS_M | DSS_m: (26, Struct("!QQIH"), 3),
}


@dataclass(frozen=True, slots=True)
class AddAddr:
    """ADD_ADDR. v0: IPVer nibble, no HMAC. v1: E (echo) bit, 64-bit HMAC unless an echo."""

    subtype: ClassVar[Subtype] = Subtype.ADD_ADDR
    version: int
    addr_id: int
    address: bytes  # 4 or 16 bytes
    port: int | None = None
    echo: bool = False
    hmac: int | None = None
    rsv: int = 0  # v1 nibble bits 1-3

    @property
    def length(self) -> int:
        n = 4 + len(self.address)
        if self.port is not None:
            n += 2
        if self.hmac is not None:
            n += 8
        return n

    def encode(self) -> bytes:
        if self.version == 0:
            nib = 4 if len(self.address) == 4 else 6
        else:
            nib = (self.rsv << 1) | int(self.echo)
        out = _hdr(self.length, 3, nib) + bytes((self.addr_id,)) + self.address
        if self.port is not None:
            out += _U16.pack(self.port)
        if self.hmac is not None:
            out += _U64.pack(self.hmac)
        return out


@dataclass(frozen=True, slots=True)
class RemoveAddr:
    subtype: ClassVar[Subtype] = Subtype.REMOVE_ADDR
    addr_ids: tuple[int, ...]
    rsv: int = 0

    @property
    def length(self) -> int:
        return 3 + len(self.addr_ids)

    def encode(self) -> bytes:
        return _hdr(self.length, 4, self.rsv) + bytes(self.addr_ids)


@dataclass(frozen=True, slots=True)
class MpPrio:
    """MP_PRIO: backup flag; v0 may name an address ID (length 4)."""

    subtype: ClassVar[Subtype] = Subtype.MP_PRIO
    backup: bool
    addr_id: int | None = None
    rsv: int = 0

    @property
    def length(self) -> int:
        return 3 if self.addr_id is None else 4

    def encode(self) -> bytes:
        out = _hdr(self.length, 5, (self.rsv << 1) | int(self.backup))
        return out if self.addr_id is None else out + bytes((self.addr_id,))


@dataclass(frozen=True, slots=True)
class MpFail:
    subtype: ClassVar[Subtype] = Subtype.MP_FAIL
    dsn: int
    rsv: int = 0  # 12 reserved bits

    length: ClassVar[int] = 12

    def encode(self) -> bytes:
        return _hdr(12, 6, self.rsv >> 8) + bytes((self.rsv & 0xFF,)) + _U64.pack(self.dsn)


@dataclass(frozen=True, slots=True)
class MpFastclose:
    subtype: ClassVar[Subtype] = Subtype.MP_FASTCLOSE
    receiver_key: int
    rsv: int = 0

    length: ClassVar[int] = 12

    def encode(self) -> bytes:
        return _hdr(12, 7, self.rsv >> 8) + bytes((self.rsv & 0xFF,)) + _U64.pack(self.receiver_key)


class ResetReason(IntEnum):
    """MP_TCPRST reason codes (RFC 8684 3.6)."""

    UNSPECIFIED = 0
    MPTCP_SPECIFIC = 1
    LACK_OF_RESOURCES = 2
    ADMINISTRATIVELY_PROHIBITED = 3
    TOO_MUCH_OUTSTANDING_DATA = 4
    UNACCEPTABLE_PERFORMANCE = 5
    MIDDLEBOX_INTERFERENCE = 6


@dataclass(frozen=True, slots=True)
class MpTcpRst:
    subtype: ClassVar[Subtype] = Subtype.MP_TCPRST
    flags: int  # U V W T bits; T (0x1) = transient
    reason: int

    length: ClassVar[int] = 4

    @property
    def transient(self) -> bool:
        return bool(self.flags & TCPRST_T)

    def encode(self) -> bytes:
        return _hdr(4, 8, self.flags) + bytes((self.reason,))


MptcpOption = Union[MpCapable, MpJoin, Dss, AddAddr, RemoveAddr, MpPrio, MpFail, MpFastclose, MpTcpRst]


def _err(kind: ErrorKind, detail: str) -> WireError:
    return WireError(kind, detail)


def decode(opt: bytes | memoryview, tcp_flags: int) -> MptcpOption | WireError:
    """Decode one MPTCP option (kind, length, body) seen in a segment with ``tcp_flags``."""
    n = len(opt)
    if n < 3:
        return _err(ErrorKind.MPTCP_TOO_SHORT, f"{n} bytes")
    if opt[0] != TCPOPT_MPTCP or opt[1] != n:
        return _err(ErrorKind.MPTCP_BAD_LENGTH, f"length byte {opt[1]} for {n} bytes")
    st = opt[2] >> 4
    nib = opt[2] & 0x0F
    syn = tcp_flags & SYN
    ack = tcp_flags & ACK
    if st == 2:  # DSS: the hot path, first
        if n < 4:
            return _err(ErrorKind.MPTCP_BAD_LENGTH, f"DSS length {n}")
        if syn:
            return _err(ErrorKind.MPTCP_DSS_ON_SYN, "DSS in a SYN")
        fl = opt[3]
        want = 4
        if fl & DSS_A:
            want += 8 if fl & DSS_a else 4
        if fl & DSS_M:
            want += (8 if fl & DSS_m else 4) + 6
            if n == want + 2:
                want += 2
        if n != want:
            return _err(ErrorKind.MPTCP_BAD_LENGTH, f"DSS flags 0x{fl:02x} length {n}")
        i = 4
        data_ack = dsn = ssn = dll = csum = None
        if fl & DSS_A:
            if fl & DSS_a:
                (data_ack,) = _U64.unpack_from(opt, i)
                i += 8
            else:
                (data_ack,) = _U32.unpack_from(opt, i)
                i += 4
        if fl & DSS_M:
            if fl & DSS_m:
                (dsn,) = _U64.unpack_from(opt, i)
                i += 8
            else:
                (dsn,) = _U32.unpack_from(opt, i)
                i += 4
            (ssn,) = _U32.unpack_from(opt, i)
            (dll,) = _U16.unpack_from(opt, i + 4)
            i += 6
            if i < n:
                (csum,) = _U16.unpack_from(opt, i)
        return Dss(fl, data_ack, dsn, ssn, dll, csum, nib)
    if st == 0:
        if n < 4:
            return _err(ErrorKind.MPTCP_BAD_LENGTH, f"MP_CAPABLE length {n}")
        if nib > 1:
            return _err(ErrorKind.MPTCP_UNKNOWN_VERSION, f"MP_CAPABLE version {nib}")
        fl = opt[3]
        if n == 4:
            if nib != 1:
                return _err(ErrorKind.MPTCP_BAD_LENGTH, "keyless MP_CAPABLE in v0")
            if not syn or ack:
                return _err(ErrorKind.MPTCP_WRONG_TCP_FLAGS, "keyless MP_CAPABLE outside a SYN")
            return MpCapable(nib, fl)
        if n == 12:
            if not syn:
                return _err(ErrorKind.MPTCP_WRONG_TCP_FLAGS, "one-key MP_CAPABLE without SYN")
            if nib == 1 and not ack:
                return _err(ErrorKind.MPTCP_WRONG_TCP_FLAGS, "v1 MP_CAPABLE with key in a SYN")
            return MpCapable(nib, fl, _U64.unpack_from(opt, 4)[0])
        if n in (20, 22, 24):
            if syn or not ack:
                return _err(ErrorKind.MPTCP_WRONG_TCP_FLAGS, "two-key MP_CAPABLE outside an ACK")
            if n > 20 and nib == 0:
                return _err(ErrorKind.MPTCP_BAD_LENGTH, f"v0 MP_CAPABLE length {n}")
            sk, rk = _U64.unpack_from(opt, 4)[0], _U64.unpack_from(opt, 12)[0]
            if n == 20:
                return MpCapable(nib, fl, sk, rk)
            dl = _U16.unpack_from(opt, 20)[0]
            cs = _U16.unpack_from(opt, 22)[0] if n == 24 else None
            return MpCapable(nib, fl, sk, rk, dl, cs)
        return _err(ErrorKind.MPTCP_BAD_LENGTH, f"MP_CAPABLE length {n}")
    if st == 1:
        if n == 12:
            if not syn or ack:
                return _err(ErrorKind.MPTCP_WRONG_TCP_FLAGS, "MP_JOIN SYN form outside a SYN")
            return MpJoin(JoinPhase.SYN, bool(nib & 1), opt[3], _U32.unpack_from(opt, 4)[0],
                          _U32.unpack_from(opt, 8)[0], None, nib >> 1)
        if n == 16:
            if not (syn and ack):
                return _err(ErrorKind.MPTCP_WRONG_TCP_FLAGS, "MP_JOIN SYN/ACK form outside a SYN/ACK")
            return MpJoin(JoinPhase.SYN_ACK, bool(nib & 1), opt[3], None, _U32.unpack_from(opt, 12)[0],
                          bytes(opt[4:12]), nib >> 1)
        if n == 24:
            if syn or not ack:
                return _err(ErrorKind.MPTCP_WRONG_TCP_FLAGS, "MP_JOIN ACK form outside an ACK")
            return MpJoin(JoinPhase.ACK, False, 0, None, None, bytes(opt[4:24]), (nib << 8) | opt[3])
        return _err(ErrorKind.MPTCP_BAD_LENGTH, f"MP_JOIN length {n}")
    if st == 3:
        if n < 4:
            return _err(ErrorKind.MPTCP_BAD_LENGTH, f"ADD_ADDR length {n}")
        if nib in (4, 6):  # v0: IPVer
            alen = 4 if nib == 4 else 16
            if n == 4 + alen:
                port = None
            elif n == 6 + alen:
                port = _U16.unpack_from(opt, 4 + alen)[0]
            else:
                return _err(ErrorKind.MPTCP_BAD_LENGTH, f"v0 ADD_ADDR IPv{nib} length {n}")
            return AddAddr(0, opt[3], bytes(opt[4 : 4 + alen]), port)
        echo = bool(nib & 1)
        shape = _ADD_ADDR_V1.get(n)
        if shape is None:
            return _err(ErrorKind.MPTCP_BAD_LENGTH, f"ADD_ADDR length {n}")
        alen, has_port, has_hmac = shape
        i = 4 + alen
        port = hm = None
        if has_port:
            port = _U16.unpack_from(opt, i)[0]
            i += 2
        if has_hmac:
            hm = _U64.unpack_from(opt, i)[0]
        return AddAddr(1, opt[3], bytes(opt[4 : 4 + alen]), port, echo, hm, nib >> 1)
    if st == 4:
        if n < 4:
            return _err(ErrorKind.MPTCP_BAD_LENGTH, f"REMOVE_ADDR length {n}")
        return RemoveAddr(tuple(opt[3:n]), nib)
    if st == 5:
        if n == 3:
            return MpPrio(bool(nib & 1), None, nib >> 1)
        if n == 4:
            return MpPrio(bool(nib & 1), opt[3], nib >> 1)
        return _err(ErrorKind.MPTCP_BAD_LENGTH, f"MP_PRIO length {n}")
    if st == 6:
        if n != 12:
            return _err(ErrorKind.MPTCP_BAD_LENGTH, f"MP_FAIL length {n}")
        return MpFail(_U64.unpack_from(opt, 4)[0], (nib << 8) | opt[3])
    if st == 7:
        if n != 12:
            return _err(ErrorKind.MPTCP_BAD_LENGTH, f"MP_FASTCLOSE length {n}")
        return MpFastclose(_U64.unpack_from(opt, 4)[0], (nib << 8) | opt[3])
    if st == 8:
        if n != 4:
            return _err(ErrorKind.MPTCP_BAD_LENGTH, f"MP_TCPRST length {n}")
        return MpTcpRst(nib, opt[3])
    return _err(ErrorKind.MPTCP_UNKNOWN_SUBTYPE, f"subtype {st}")


# v1 ADD_ADDR: length -> (address length, port present, HMAC present)
_ADD_ADDR_V1: dict[int, tuple[int, bool, bool]] = {
    8: (4, False, False),
    10: (4, True, False),
    16: (4, False, True),
    18: (4, True, True),
    20: (16, False, False),
    22: (16, True, False),
    28: (16, False, True),
    30: (16, True, True),
}


def encode(opt: MptcpOption) -> bytes:
    return opt.encode()
