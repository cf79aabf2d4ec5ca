"""Privilege and exposure, without the lab: MPTCP keys never reach a log unless ``[log] log_keys``,
the metrics endpoint listens on loopback by default, the systemd unit keeps only CAP_NET_ADMIN
and CAP_NET_RAW. (The live counterpart -- ``mproxy run`` as an unprivileged user holding only
those two capabilities -- is tests/lab/test_privilege_live.py.)

Why keys matter: with a connection's keys anyone can compute its tokens, IDSNs and join HMACs,
i.e. forge MP_JOINs into it or MP_FASTCLOSE it. A log is read by more people than the gateway is.
"""

from __future__ import annotations

import io
import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mproxy.config import Config, MetricsConfig, load_config, parse_config
from mproxy.core.gateway import Gateway
from mproxy.io.pcap import PcapWriter, read_captures
from mproxy.io.sinks import EventLog
from mproxy.replay import replay
from mproxy.wire import mptcp as m
from mproxy.wire.packet import TcpSegment, mptcp_spans, parse_frame
from tests.core.session import Session

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "mproxy" / "samples" / "split-attack.pcap"


def key_spellings(key: int) -> list[str]:
    """Every way a 64-bit key could be written into a text log."""
    return [str(key), f"{key:x}", f"{key:X}", f"{key:016x}", f"0x{key:x}", key.to_bytes(8, "big").hex()]


def keys_in_capture(path: Path) -> set[int]:
    """Every MPTCP key carried by MP_CAPABLE and MP_FASTCLOSE options of a capture (our decoder)."""
    keys: set[int] = set()
    for fr in read_captures([str(path)]):
        seg = parse_frame(fr.linktype, fr.data, fr.ts)
        if not isinstance(seg, TcpSegment):
            continue
        spans = mptcp_spans(seg)
        for off, ln in spans if isinstance(spans, list) else []:
            o = m.decode(seg.ip[off : off + ln], seg.flags)
            if isinstance(o, m.MpCapable):
                keys.update(k for k in (o.sender_key, o.receiver_key) if k is not None)
            elif isinstance(o, m.MpFastclose):
                keys.add(o.receiver_key)
    return keys


def assert_no_key(text: str, keys: set[int]) -> None:
    for k in keys:
        for spelled in key_spellings(k):
            assert spelled not in text, f"key {k:#x} written as {spelled!r}"


def session_capture(path: Path) -> set[int]:
    """A v1 and a v0 connection (joins, data, fast close) written as a pcap; returns their keys."""
    keys: set[int] = set()
    buf = io.BytesIO()
    w = PcapWriter(buf, 101)
    ts = 1000.0
    for version, sport, ck, sk in ((1, 40000, 0x1122334455667788, 0x99AABBCCDDEEFF00),
                                   (0, 40100, 0x0FEDCBA987654321, 0x0123456789ABCDEF)):
        s = Session(version, sport=sport, client_key=ck, server_key=sk)
        pk = s.handshake() + s.join(1) + [s.data(0, True, 0, b"GET /"), s.data(1, False, 0, b"200 OK")]
        pk.append(s.rst(1, True, [m.MpFastclose(sk).encode()]))
        for p in pk:
            ts += 0.001
            w.write(ts, p)
        keys |= {ck, sk}
    path.write_bytes(buf.getvalue())
    return keys


@pytest.mark.parametrize("which", ["session", "sample"])
def test_replay_log_never_holds_keys_unless_asked(tmp_path: Path, which: str) -> None:
    cap = tmp_path / "in.pcap"
    if which == "session":
        keys = session_capture(cap)
    else:
        cap = SAMPLE
        keys = keys_in_capture(SAMPLE)
    assert keys, "no key in the capture: nothing would be checked"
    assert keys <= keys_in_capture(cap)
    log = io.StringIO()
    res = replay([str(cap)], io.BytesIO(), log)
    assert res.connections >= 1
    assert_no_key(log.getvalue(), keys)
    recs = [json.loads(x) for x in log.getvalue().splitlines()]
    assert all(not k.endswith("_key") for r in recs for k in r)
    assert any(r.get("client_token") for r in recs)  # tokens are logged: they identify, they are not secrets
    # asked for: the connection records carry both keys
    log = io.StringIO()
    replay([str(cap)], io.BytesIO(), log, log_keys=True)
    logged = {r[k] for r in map(json.loads, log.getvalue().splitlines()) for k in ("client_key", "server_key")
              if r["event"] == "mptcp_connection" and r.get(k) is not None}
    assert logged and logged <= keys


def test_live_event_log_drops_keys_unless_log_keys(tmp_path: Path) -> None:
    """The gateway's records through the event log writer ``run`` uses, both settings."""
    s = Session(1, client_key=0x5EC12E7000000001, server_key=0x5EC12E7000000002)
    gw = Gateway()
    ts = 1_700_000_000.0
    for p in s.handshake() + s.join(1, bad_hmac=True) + [s.data(0, True, 0, b"x"), s.data_fin(0, True, 1),
                                                           s.data_fin(0, False, 0)]:
        ts += 0.001
        gw.packet(p, ts)
    gw.flush(ts + 1)
    recs = gw.drain_records()
    assert any(r["event"] == "mptcp_connection" for r in recs)
    for log_keys in (False, True):
        path = tmp_path / f"events-{log_keys}.jsonl"
        ev = EventLog(str(path), drop_keys=not log_keys)
        ev.write([dict(r) for r in recs])
        ev.close()
        text = path.read_text()
        if log_keys:
            assert str(s.ck) in text and str(s.sk) in text
        else:
            assert_no_key(text, {s.ck, s.sk})


def test_metrics_listen_on_loopback_by_default() -> None:
    for listen in (MetricsConfig().listen, Config().metrics.listen, parse_config("").metrics.listen,
                   load_config(str(ROOT / "config" / "mproxy.toml")).metrics.listen):
        host, _, port = listen.rpartition(":")
        assert ipaddress.ip_address(host.strip("[]")).is_loopback, listen
        assert port == "9464"


def _unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_systemd_unit_keeps_only_net_admin_and_net_raw(tmp_path: Path) -> None:
    unit = (ROOT / "deploy" / "mproxy.service").read_text()
    cfg = _unit_settings(unit)
    assert cfg["User"] == ["mproxy"] and cfg["NoNewPrivileges"] == ["yes"]
    for k in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert cfg[k] == ["CAP_NET_ADMIN CAP_NET_RAW"], (k, cfg[k])
    assert cfg["ProtectSystem"] == ["strict"] and "AF_PACKET" in cfg["RestrictAddressFamilies"][0]
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    # verify the unit as installed, its binaries replaced by one that exists here
    test_unit = tmp_path / "mproxy.service"
    test_unit.write_text(unit.replace("/opt/mproxy/bin/mproxy", "/bin/true"))
    cp = subprocess.run([tool, "verify", str(test_unit)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and not cp.stderr.strip(), cp.stderr
    cp = subprocess.run([tool, "security", "--offline=yes", str(test_unit)], capture_output=True, text=True,
                        timeout=60)
    mo = re.search(r"Overall exposure level for mproxy\.service: ([0-9.]+)", cp.stdout)
    assert mo, cp.stdout + cp.stderr
    assert float(mo.group(1)) <= 3.0, cp.stdout  # systemd's scale: 0 (locked down) .. 10 (exposed)
