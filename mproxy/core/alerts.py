"""External IDS alerts: one JSON line in, a 4-tuple and a reason out (sans-I/O).

Formats (auto-detected per line, so one follower can read either):

* Suricata ``eve.json``: ``{"event_type": "alert", "src_ip", "src_port",
  "dest_ip", "dest_port", "proto", "alert": {"signature_id", "signature", ...}}``.
  Other event types (flow, http, stats, ...) are ignored, not errors.
* Snort 3 ``alert_json``: ``{"src_ap": "ip:port", "dst_ap": "ip:port", "proto",
  "msg", "sid", "gid", "rev", ...}``; with ``fields`` configured differently
  ``src_addr``/``src_port``/``dst_addr``/``dst_port`` are read instead.
  IPv6 ``*_ap`` values are ``addr:port`` with the last colon splitting.

Anything else (not JSON, not an object, no usable addresses, a non-TCP
alert) is counted by kind and skipped: a feed the operator does not control
must never crash the gateway.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Alert", "AlertStats", "parse_alert_line"]


@dataclass(frozen=True, slots=True)
class Alert:
    src: bytes  # packed address
    sport: int
    dst: bytes
    dport: int
    sid: int | None
    msg: str
    source: str  # "suricata" | "snort"
    gid: int | None = None
    rev: int | None = None

    def reason(self) -> str:
        sid = f"sid {self.sid}" if self.sid is not None else "no sid"
        return f"{sid}: {self.msg}" if self.msg else sid


@dataclass(slots=True)
class AlertStats:
    lines: int = 0
    alerts: int = 0  # parsed alerts
    ignored: int = 0  # valid lines that are not alerts (other eve event types) or not TCP
    malformed: Counter[str] = field(default_factory=Counter)  # by reason
    unmatched: int = 0  # alerts naming no live MPTCP connection
    acted: int = 0  # alerts that led to an action

    def as_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "alerts": self.alerts, "ignored": self.ignored,
                "malformed": dict(self.malformed), "unmatched": self.unmatched, "acted": self.acted}


class _Bad(Exception):
    pass


def _addr(value: Any) -> bytes:
    if not isinstance(value, str):
        raise _Bad("address")
    try:
        return ipaddress.ip_address(value.strip("[]").split("%", 1)[0]).packed
    except ValueError:
        raise _Bad("address") from None


def _port(value: Any) -> int:
    if isinstance(value, bool):
        raise _Bad("port")
    try:
        p = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON Infinity
        raise _Bad("port") from None
    if not 0 <= p <= 65535:
        raise _Bad("port")
    return p


def _ap(value: Any) -> tuple[bytes, int]:
    """Snort's ``addr:port`` (IPv6: ``a:b::c:port``, or ``[a:b::c]:port``)."""
    if not isinstance(value, str) or ":" not in value:
        raise _Bad("address")
    host, _, port = value.rpartition(":")
    return _addr(host), _port(port)


def _opt_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON Infinity
        return None


def _is_tcp(proto: Any) -> bool:
    if proto is None:
        return True  # not stated: let the 4-tuple decide
    if isinstance(proto, int) and not isinstance(proto, bool):
        return proto == 6
    return str(proto).strip().upper() in ("TCP", "6")


def parse_alert_line(line: str | bytes, stats: AlertStats | None = None) -> Alert | None:
    """The alert on one line, or None (counted in ``stats`` as ignored or malformed)."""
    st = stats if stats is not None else AlertStats()
    st.lines += 1
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            st.malformed["not_utf8"] += 1
            return None
    line = line.strip()
    if not line:
        st.lines -= 1  # blank lines are not lines of the feed
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        st.malformed["not_json"] += 1
        return None
    if not isinstance(obj, dict):
        st.malformed["not_an_object"] += 1
        return None
    try:
        if "event_type" in obj:
            if obj.get("event_type") != "alert":
                st.ignored += 1
                return None
            al = obj.get("alert")
            if not isinstance(al, dict):
                raise _Bad("alert_field")
            if not _is_tcp(obj.get("proto")):
                st.ignored += 1
                return None
            a = Alert(_addr(obj.get("src_ip")), _port(obj.get("src_port")), _addr(obj.get("dest_ip")),
                      _port(obj.get("dest_port")), _opt_int(al.get("signature_id")), str(al.get("signature", "")),
                      "suricata", _opt_int(al.get("gid")), _opt_int(al.get("rev")))
        elif "src_ap" in obj or "src_addr" in obj:
            if not _is_tcp(obj.get("proto")):
                st.ignored += 1
                return None
            if "src_ap" in obj:
                src, sport = _ap(obj["src_ap"])
                dst, dport = _ap(obj.get("dst_ap"))
            else:
                src, sport = _addr(obj["src_addr"]), _port(obj.get("src_port"))
                dst, dport = _addr(obj.get("dst_addr")), _port(obj.get("dst_port"))
            a = Alert(src, sport, dst, dport, _opt_int(obj.get("sid")), str(obj.get("msg", "")), "snort",
                      _opt_int(obj.get("gid")), _opt_int(obj.get("rev")))
        else:
            st.malformed["unknown_format"] += 1
            return None
    except _Bad as e:
        st.malformed[str(e)] += 1
        return None
    if len(a.src) != len(a.dst):
        st.malformed["address"] += 1
        return None
    st.alerts += 1
    return a
