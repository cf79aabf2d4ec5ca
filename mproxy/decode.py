"""The ``decode`` job: every MPTCP option of some captures as a flat record.

Records are plain dicts with the contract keys of ``mproxy decode --json``;
absent fields are left out rather than set to null.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from . import crypto
from .io.pcap import Frame
from .wire import mptcp as m
from .wire.errors import WireError
from .wire.packet import TcpSegment, mptcp_spans, parse_frame

_SUBTYPE_NAMES = {s.value: s.name for s in m.Subtype}


def option_fields(opt: m.MptcpOption) -> dict[str, Any]:
    """Contract fields of one decoded option (without the packet's addresses)."""
    if isinstance(opt, m.Dss):
        d: dict[str, Any] = {"subtype": "DSS", "flags": opt.flags}
        if opt.data_ack is not None:
            d["data_ack"] = opt.data_ack
            d["ack64"] = opt.ack64
        if opt.dsn is not None:
            d["dsn"] = opt.dsn
            d["dsn64"] = opt.dsn64
            d["ssn"] = opt.ssn
            d["dll"] = opt.dll
            if opt.checksum is not None:
                d["checksum"] = opt.checksum
        d["data_fin"] = opt.data_fin
        return d
    if isinstance(opt, m.MpCapable):
        d = {"subtype": "MP_CAPABLE", "version": opt.version, "flags": opt.flags}
        if opt.sender_key is not None:
            d["sender_key"] = opt.sender_key
            d["token"] = crypto.key_token(opt.sender_key, opt.version)
        if opt.receiver_key is not None:
            d["receiver_key"] = opt.receiver_key
        if opt.data_len is not None:
            d["data_len"] = opt.data_len
        if opt.checksum is not None:
            d["checksum"] = opt.checksum
        return d
    if isinstance(opt, m.MpJoin):
        d = {"subtype": "MP_JOIN", "phase": opt.phase.name}
        if opt.phase != m.JoinPhase.ACK:
            d["addr_id"] = opt.addr_id
            d["backup"] = opt.backup
        if opt.token is not None:
            d["token"] = opt.token
        if opt.nonce is not None:
            d["nonce"] = opt.nonce
        if opt.hmac is not None:
            d["hmac"] = opt.hmac.hex()
        return d
    if isinstance(opt, m.AddAddr):
        d = {"subtype": "ADD_ADDR", "version": opt.version, "addr_id": opt.addr_id,
             "address": _addr(opt.address), "echo": opt.echo}
        if opt.port is not None:
            d["port"] = opt.port
        if opt.hmac is not None:
            d["hmac"] = f"{opt.hmac:016x}"
        return d
    if isinstance(opt, m.RemoveAddr):
        return {"subtype": "REMOVE_ADDR", "addr_ids": list(opt.addr_ids)}
    if isinstance(opt, m.MpPrio):
        d = {"subtype": "MP_PRIO", "backup": opt.backup}
        if opt.addr_id is not None:
            d["addr_id"] = opt.addr_id
        return d
    if isinstance(opt, m.MpFail):
        return {"subtype": "MP_FAIL", "dsn": opt.dsn}
    if isinstance(opt, m.MpFastclose):
        return {"subtype": "MP_FASTCLOSE", "receiver_key": opt.receiver_key}
    return {"subtype": "MP_TCPRST", "reason": opt.reason, "transient": opt.transient, "flags": opt.flags}


def _addr(a: bytes) -> str:
    from .wire.packet import addr_text

    return addr_text(a)


@dataclass(slots=True)
class DecodeStats:
    """Counts for the closing summary: frames, TCP segments, options, errors by kind."""

    frames: int = 0
    tcp: int = 0
    options: int = 0
    errors: Counter[str] = field(default_factory=Counter)


def decode_frames(frames: Iterable[Frame], stats: DecodeStats | None = None) -> Iterator[dict[str, Any]]:
    """One record per MPTCP option (or malformed option) in ``frames``."""
    st = stats if stats is not None else DecodeStats()
    for fr in frames:
        st.frames += 1
        seg = parse_frame(fr.linktype, fr.data, fr.ts)
        if seg is None:
            continue
        if isinstance(seg, WireError):
            st.errors[seg.kind.value] += 1
            continue
        st.tcp += 1
        spans = mptcp_spans(seg)
        if isinstance(spans, WireError):
            st.errors[spans.kind.value] += 1
            # the options area is damaged; MPTCP options before the damage are
            # not reported either, as a TCP stack would drop the lot
            continue
        for off, ln in spans:
            yield _record(fr, seg, off, ln, st)


def _record(fr: Frame, seg: TcpSegment, off: int, ln: int, st: DecodeStats) -> dict[str, Any]:
    raw = seg.ip[off : off + ln]
    opt = m.decode(raw, seg.flags)
    base: dict[str, Any] = {
        "frame": fr.number, "ts": round(fr.ts, 6), "src": seg.src_text, "sport": seg.sport,
        "dst": seg.dst_text, "dport": seg.dport,
    }
    if isinstance(opt, WireError):
        st.errors[opt.kind.value] += 1
        if ln >= 3:
            base["subtype"] = _SUBTYPE_NAMES.get(raw[2] >> 4, f"UNKNOWN_{raw[2] >> 4}")
        base["length"] = ln
        base["error"] = str(opt)
        base["raw"] = bytes(raw).hex()
        return base
    st.options += 1
    base.update(option_fields(opt))
    return base


def human_line(rec: dict[str, Any]) -> str:
    """One readable line per option: frame, 4-tuple, subtype, then its fields."""
    head = f"{rec['frame']:>7} {rec['src']}.{rec['sport']} > {rec['dst']}.{rec['dport']} {rec.get('subtype', '?')}"
    skip = {"frame", "ts", "src", "sport", "dst", "dport", "subtype"}
    parts = []
    for k, v in rec.items():
        if k in skip:
            continue
        if k in ("sender_key", "receiver_key") or (k == "token" and rec.get("subtype") == "MP_CAPABLE"):
            v = f"0x{v:016x}" if k != "token" else f"0x{v:08x}"
        elif k in ("token", "nonce", "checksum") and isinstance(v, int):
            v = f"0x{v:x}"
        parts.append(f"{k}={v}")
    return head + (" " + " ".join(parts) if parts else "")
