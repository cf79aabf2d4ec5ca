"""MPTCP options rendered as tcpdump (master) prints them inside ``options [...]``.

A presentation layer for cross-checks against tcpdump's reference decodes:
the fields come from :func:`mproxy.wire.mptcp.decode`. tcpdump is more
lenient than the decoder in a few places (it checks lengths and some TCP
flags, never the version/IPVer nibble against the length); there the option is
decoded again in the most permissive context the decoder has (same bytes,
other TCP flags or nibble), so the values are still the decoder's.

Where tcpdump's printer rejects an option it prints ``[bad opt]`` straight
after whatever it had printed so far (``mptcp 3 dss[bad opt]``) and stops
printing the packet; :func:`render_options` follows that.

An MP_CAPABLE of an unknown version (nibble > 1) that passes the length/flags
check prints `` Unknown Version (N)`` and nothing more, as tcpdump master does.

Known differences of Debian's tcpdump 4.99 (not modelled here; checked by
tests/wire/test_tcpdump_oracle.py when that tcpdump is installed): MP_CAPABLE
prints no ``flags [...]`` and no ``data_len``/``csum=``; MP_TCPRST (subtype 8)
is ``unknown``.
"""

from __future__ import annotations

import dataclasses
from struct import Struct

from .errors import WireError
from .mptcp import (
    AddAddr,
    Dss,
    MpCapable,
    MpFail,
    MpFastclose,
    MpJoin,
    MpPrio,
    MptcpOption,
    MpTcpRst,
    RemoveAddr,
    decode,
)
from .packet import ACK, SYN, TCPOPT_EOL, TCPOPT_MPTCP, TCPOPT_NOP, addr_text

BAD = "[bad opt]"

_NAMES = ("capable", "join", "dss", "add-addr", "rem-addr", "prio", "fail", "fast-close", "tcprst")
_CAP_LETTERS = tuple(zip((0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01), "ABCDEFGH"))
_RST_LETTERS = ((0x8, "U"), (0x4, "V"), (0x2, "W"), (0x1, "T"))
_RST_REASONS = {
    0: "Unspecified error",
    1: "MPTCP-specific error",
    2: "Lack of resources",
    3: "Administratively prohibited",
    4: "Too much outstanding data",
    5: "Unacceptable performance",
    6: "Middlebox interference",
}
_ADDR_LABELS = {0: "v1", 1: "v1-echo", 4: "v0-ip4", 6: "v0-ip6"}
_ADD_ADDR_LENGTHS = frozenset((8, 10, 16, 18, 20, 22, 28, 30))
_U16 = Struct("!H")
_U32 = Struct("!I")


def _bits(value: int, table: tuple[tuple[int, str], ...]) -> str:
    s = "".join(letter for bit, letter in table if value & bit)
    return s or "none"


def _redecode(raw: bytes, nibble: int | None, flags: int) -> MptcpOption | WireError:
    """Decode ``raw`` with its low nibble replaced (when given) under ``flags``."""
    if nibble is not None:
        raw = raw[:2] + bytes(((raw[2] & 0xF0) | nibble,)) + raw[3:]
    return decode(raw, flags)


def render_option(raw: bytes | memoryview, tcp_flags: int) -> str:
    """One MPTCP option (kind, length, body) as tcpdump master prints it.

    ``raw`` is the option as found in the header; its length byte should
    match ``len(raw)`` (a length byte that is below 2 or longer than ``raw``
    gives ``[bad opt]`` without a name, as tcpdump's option walker does).
    """
    raw = bytes(raw)
    if len(raw) < 2 or raw[1] < 2 or raw[1] > len(raw):
        return BAD
    raw = raw[: raw[1]]
    n = len(raw)
    if n < 3:
        return "mptcp" + BAD
    st = raw[2] >> 4
    nib = raw[2] & 0x0F
    head = f"mptcp {n} {_NAMES[st] if st < len(_NAMES) else 'unknown'}"
    if st >= len(_NAMES):
        return head
    body = _BODY[st](raw, n, nib, tcp_flags)
    return head + (BAD if body is None else body)


# Each body printer returns the text after the name, or None when tcpdump
# rejects the option before printing anything; partial output + BAD is
# returned as a string ending in BAD.


def _capable(raw: bytes, n: int, nib: int, tf: int) -> str | None:
    syn_ok = n in (4, 12) and tf & SYN
    ack_ok = n in (20, 22, 24) and (tf & (SYN | ACK)) == ACK
    if not (syn_ok or ack_ok):
        return None
    if nib > 1:
        return f" Unknown Version ({nib})"
    opt = decode(raw, tf)
    if not isinstance(opt, MpCapable):
        # tcpdump does not tie the version to the length or to ACK in a SYN:
        # decode the same bytes as the v1 form of that length.
        opt = _redecode(raw, 1, SYN if n == 4 else SYN | ACK if n == 12 else ACK)
        if not isinstance(opt, MpCapable):  # pragma: no cover - the permissive form always decodes
            return None
        opt = dataclasses.replace(opt, version=nib)
    out = f" v{opt.version} flags [{_bits(opt.flags, _CAP_LETTERS)}]"
    csum = bool(opt.flags & 0x80)
    if csum:
        out += " csum"
    if opt.sender_key is not None:
        out += f" {{0x{opt.sender_key:x}"
        if opt.receiver_key is not None:
            out += f",0x{opt.receiver_key:x}"
        if (n == 22 and not csum) or n == 24:
            out += f",data_len={opt.data_len}"
        if n == 24 and csum:
            out += f",csum=0x{opt.checksum:x}"
        out += "}"
    return out


def _join(raw: bytes, n: int, nib: int, tf: int) -> str | None:
    if not ((n == 12 and tf & SYN) or (n == 16 and (tf & (SYN | ACK)) == (SYN | ACK)) or (n == 24 and tf & ACK)):
        return None
    opt = decode(raw, tf)
    if not isinstance(opt, MpJoin):
        # tcpdump also takes the SYN form in a SYN/ACK and the ACK form in a SYN/ACK
        opt = decode(raw, {12: SYN, 16: SYN | ACK, 24: ACK}[n])
        if not isinstance(opt, MpJoin):  # pragma: no cover - the permissive form always decodes
            return None
    out = ""
    if n != 24:
        if opt.backup:
            out += " backup"
        out += f" id {opt.addr_id}"
    if n == 12:
        out += f" token 0x{opt.token:x} nonce 0x{opt.nonce:x}"
    elif n == 16:
        out += f" hmac 0x{int.from_bytes(opt.hmac or b'', 'big'):x} nonce 0x{opt.nonce:x}"
    else:
        out += f" hmac 0x{(opt.hmac or b'').hex()}"
    return out


def _dss(raw: bytes, n: int, nib: int, tf: int) -> str | None:
    if n < 4 or tf & SYN:
        return None
    opt = decode(raw, tf)
    if isinstance(opt, Dss):
        out = " fin" if opt.data_fin else ""
        if opt.data_ack is not None:
            out += f" ack {opt.data_ack}"
        if opt.dsn is not None:
            out += f" seq {opt.dsn} subseq {opt.ssn} len {opt.dll}"
            if opt.checksum is not None:
                out += f" csum 0x{opt.checksum:x}"
        return out
    # The decoder rejected the lengths. tcpdump prints the fields one by one
    # and gives up at the first that does not fit (or on bytes left over).
    return _dss_partial(raw, n)


def _dss_partial(raw: bytes, n: int) -> str:
    fl = raw[3]
    out = " fin" if fl & 0x10 else ""
    i = 4
    if fl & 0x01:
        out += " ack "
        w = 8 if fl & 0x02 else 4
        if n - i < w:
            return out + BAD
        out += str(int.from_bytes(raw[i : i + w], "big"))
        i += w
    if fl & 0x04:
        out += " seq "
        w = 8 if fl & 0x08 else 4
        if n - i < w:
            return out + BAD
        out += str(int.from_bytes(raw[i : i + w], "big"))
        i += w
        if n - i < 4:
            return out + BAD
        out += f" subseq {_U32.unpack_from(raw, i)[0]}"
        i += 4
        if n - i < 2:
            return out + BAD
        out += f" len {_U16.unpack_from(raw, i)[0]}"
        i += 2
        if n - i >= 2:
            out += f" csum 0x{_U16.unpack_from(raw, i)[0]:x}"
            i += 2
    if i != n:
        return out + BAD
    return out  # pragma: no cover - the decoder accepts exactly these


def _add_addr(raw: bytes, n: int, nib: int, tf: int) -> str | None:
    if n not in _ADD_ADDR_LENGTHS:
        return None
    opt = decode(raw, tf)
    if not isinstance(opt, AddAddr):
        # tcpdump reads the shape from the length alone (v0 IPVer nibble not
        # checked against it): decode as the v1 form of that length.
        opt = _redecode(raw, 0, tf)
        if not isinstance(opt, AddAddr):  # pragma: no cover - the permissive form always decodes
            return None
    out = f" {_ADDR_LABELS.get(nib, '[bad version/echo]')} id {opt.addr_id} {addr_text(opt.address)}"
    if n in (10, 18, 22, 30):
        out += f":{opt.port}"
    if n in (16, 18, 28, 30):
        out += f" hmac 0x{opt.hmac:x}"
    return out


def _rem_addr(raw: bytes, n: int, nib: int, tf: int) -> str | None:
    opt = decode(raw, tf)
    if not isinstance(opt, RemoveAddr):
        return None
    return " id" + "".join(f" {i}" for i in opt.addr_ids)


def _prio(raw: bytes, n: int, nib: int, tf: int) -> str | None:
    opt = decode(raw, tf)
    if not isinstance(opt, MpPrio):
        return None
    return (" backup" if opt.backup else " non-backup") + ("" if opt.addr_id is None else f" id {opt.addr_id}")


def _fail(raw: bytes, n: int, nib: int, tf: int) -> str | None:
    opt = decode(raw, tf)
    return f" seq {opt.dsn}" if isinstance(opt, MpFail) else None


def _fastclose(raw: bytes, n: int, nib: int, tf: int) -> str | None:
    opt = decode(raw, tf)
    return f" key 0x{opt.receiver_key:x}" if isinstance(opt, MpFastclose) else None


def _tcprst(raw: bytes, n: int, nib: int, tf: int) -> str | None:
    opt = decode(raw, tf)
    if not isinstance(opt, MpTcpRst):
        return None
    reason = _RST_REASONS.get(opt.reason, f"unknown (0x{opt.reason:02x})")
    return f" flags [{_bits(opt.flags, _RST_LETTERS)}] reason {reason}"


_BODY = (_capable, _join, _dss, _add_addr, _rem_addr, _prio, _fail, _fastclose, _tcprst)


def render_options(opts: bytes | memoryview, tcp_flags: int) -> list[str]:
    """The MPTCP fragments tcpdump prints for a TCP option area, in order.

    Walks the options as tcpdump does: a bad option length ends the walk
    (tcpdump prints ``[bad opt]`` and nothing more of the packet); so does an
    MPTCP option its printer rejects. Only ``mptcp ...`` fragments (and a
    nameless ``[bad opt]`` that ends the walk) are returned.
    """
    opts = bytes(opts)
    out: list[str] = []
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind in (TCPOPT_EOL, TCPOPT_NOP):
            i += 1
            continue
        if i + 1 >= n or opts[i + 1] < 2 or i + opts[i + 1] > n:
            out.append(BAD)
            break
        ln = opts[i + 1]
        if kind == TCPOPT_MPTCP:
            text = render_option(opts[i : i + ln], tcp_flags)
            out.append(text)
            if text.endswith(BAD):
                break
        i += ln
    return out


__all__ = ["BAD", "render_option", "render_options"]
