"""``mproxy decode --json`` against tshark, field by field, on fresh kernel MPTCP captures.

tshark is the independent oracle: for every frame of every capture, the MPTCP
options it dissects must be ours, in the same order, with the same values.
The captures come from the lab: the session scenarios ``two_paths``, ``ipv6``,
``add_addr`` (ADD_ADDR of an IPv4 *and* an IPv6 address, joins to both sides)
and ``path_failure``, plus an "option zoo" run here for IPv4 and IPv6 that
makes Linux send what plain transfers never do: DSS checksums
(``net.mptcp.checksum_enabled``), ADD_ADDR with a port, MP_PRIO (endpoint
changed to backup, both ends), REMOVE_ADDR (endpoints deleted, both ends) and
MP_FASTCLOSE + MP_TCPRST (close with unread data and SO_LINGER 0).

tshark is read through PDML (``-T pdml``), not ``-T ek``/``-T fields``: in ek
output two MPTCP options of one packet collide on the same JSON key, and
``-T fields`` cannot tell which option an occurrence belongs to when options
carry different fields.  PDML keeps one ``<proto name="mptcp">`` element per
option with its position, so options line up exactly.

Differences of tshark 4.0 (Debian 4.0.17) found here, and how they are handled:

* DSS checksum: never dissected.  The dissector tests
  ``optlen >= offset - start + 4`` after the data-level length, i.e. wants 4
  more bytes where the checksum has 2, so ``tcp.options.mptcp.checksum`` is
  absent even when the option is 24 bytes.  Compared instead on tshark's own
  option framing: presence from ``tcp.option_len`` against the length its
  flag bits imply, value from the last two bytes of the option as tshark
  delimits it (``tcp.options`` bytes at the ``mptcp`` element's ``pos``).
* MP_CAPABLE data-level length (22/24-byte ACK with data) *is* dissected
  (``tcp.options.mptcp.datalvllen``); its checksum is not: same treatment as
  the DSS checksum.
* ``tcp.options.mptcp.flags`` is the whole subtype byte for MP_JOIN, MP_PRIO
  and MP_TCPRST (e.g. ``0x51`` for MP_PRIO backup), the flags byte for
  MP_CAPABLE and DSS.  Only the latter two are compared as a byte; for the
  others the individual bits (backup, U/V/W/T) are.
* ADD_ADDR: tshark 4.0 shows the v1 E (echo) bit and the truncated HMAC
  (``addaddrtrunchmac``) but no version and never checks the HMAC; it picks
  IPv4/IPv6 from the length.  The HMAC is verified here against the keys of
  the MP_CAPABLE handshake with :func:`mproxy.crypto.add_addr_hmac`.
* MP_TCPRST reason is shown as hex text (``0x00``); MP_JOIN HMACs are shown,
  not verified (verified here with :mod:`mproxy.crypto`).
* MP_FAIL cannot be produced by a healthy kernel path (it needs a DSS
  checksum failure); its comparison (``rawdataseqno``) is written but no
  capture here exercises it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mproxy import crypto
from mproxy.lab import Lab
from mproxy.lab.scenarios import ScenarioResult

from .conftest import LAB_REASON

pytestmark = [pytest.mark.lab, pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")]

SCENARIO_CAPTURES = ["two_paths", "ipv6", "add_addr", "path_failure"]
ZOO_CAPTURES = ["zoo4", "zoo6"]
ALL_CAPTURES = SCENARIO_CAPTURES + ZOO_CAPTURES
SUBTYPES = {"MP_CAPABLE": 0, "MP_JOIN": 1, "DSS": 2, "ADD_ADDR": 3, "REMOVE_ADDR": 4, "MP_PRIO": 5,
            "MP_FAIL": 6, "MP_FASTCLOSE": 7, "MP_TCPRST": 8}
P = "tcp.options.mptcp."


# --------------------------------------------------------------------------- tshark side
@dataclass(slots=True)
class TsOption:
    """One MPTCP option as tshark dissected it: field name -> shown values, plus its raw bytes."""

    fields: dict[str, list[str]]
    raw: bytes

    def get(self, name: str) -> str | None:
        v = self.fields.get(name)
        return v[0] if v else None

    def int(self, name: str) -> int | None:
        v = self.get(name)
        return None if v is None else int(v, 0)


@dataclass(slots=True)
class TsFrame:
    number: int
    src: str
    sport: int
    dst: str
    dport: int
    options: list[TsOption] = field(default_factory=list)


def tshark_mptcp(cap: Path) -> dict[int, TsFrame]:
    """Every TCP frame of *cap* with its MPTCP options, streamed from ``tshark -T pdml``."""
    proc = subprocess.Popen(["tshark", "-n", "-r", str(cap), "-T", "pdml"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    frames: dict[int, TsFrame] = {}
    try:
        for _ev, el in ET.iterparse(proc.stdout, events=("end",)):
            if el.tag != "packet":
                continue
            fr = _pdml_packet(el)
            if fr is not None:
                frames[fr.number] = fr
            el.clear()
    finally:
        proc.stdout.close()
        assert proc.wait(60) == 0, f"tshark failed on {cap}"
    return frames


def _show(el: ET.Element, name: str) -> str | None:
    f = el.find(f".//field[@name='{name}']")
    return None if f is None else f.get("show")


def _pdml_packet(pkt: ET.Element) -> TsFrame | None:
    tcp = pkt.find("proto[@name='tcp']")
    if tcp is None:
        return None
    number = int(_show(pkt, "frame.number") or 0)
    src = _show(pkt, "ip.src") or _show(pkt, "ipv6.src") or ""
    dst = _show(pkt, "ip.dst") or _show(pkt, "ipv6.dst") or ""
    fr = TsFrame(number, src, int(_show(tcp, "tcp.srcport") or 0), dst, int(_show(tcp, "tcp.dstport") or 0))
    opts_el = tcp.find(".//field[@name='tcp.options']")
    if opts_el is None:
        return fr
    opts_pos = int(opts_el.get("pos", "0"))
    opts_raw = bytes.fromhex(opts_el.get("value", ""))
    for opt in opts_el.iter("proto"):
        if opt.get("name") != "mptcp" or opt.find(f"field[@name='{P}subtype']") is None:
            continue
        fields: dict[str, list[str]] = defaultdict(list)
        for f in opt.iter("field"):
            fields[f.get("name", "")].append(f.get("show", ""))
        start = int(opt.get("pos", "0")) - opts_pos
        fr.options.append(TsOption(dict(fields), opts_raw[start:start + int(opt.get("size", "0"))]))
    return fr


# --------------------------------------------------------------------------- our side
def mproxy_decode(cap: Path) -> dict[int, list[dict[str, Any]]]:
    """``mproxy decode --json`` (the real command) grouped by frame number."""
    cp = subprocess.run([sys.executable, "-m", "mproxy.cli", "decode", "--json", "-q", str(cap)],
                        capture_output=True, text=True, timeout=300, check=True)
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line in cp.stdout.splitlines():
        rec = json.loads(line)
        out[rec["frame"]].append(rec)
    return dict(out)


# --------------------------------------------------------------------------- comparison
def _same(errs: list[str], what: str, theirs: object, ours: object) -> None:
    if theirs != ours:
        errs.append(f"{what}: tshark {theirs!r} != ours {ours!r}")


def _flag(t: TsOption, name: str) -> bool | None:
    v = t.get(P + name)
    return None if v is None else v not in ("0", "False", "false")


def _dss_len(flags: int) -> int:
    n = 4
    if flags & 0x01:
        n += 8 if flags & 0x02 else 4
    if flags & 0x04:
        n += (8 if flags & 0x08 else 4) + 6
    return n


def _hexint(v: str | None) -> int | None:
    return None if v is None else int(v, 16)


def compare_option(t: TsOption, o: dict[str, Any]) -> list[str]:
    """Mismatches between tshark's and our view of one option (empty when they agree)."""
    e: list[str] = []
    if "error" in o:
        return [f"we report a decode error: {o['error']}"]
    st = t.int(P + "subtype")
    _same(e, "subtype", st, SUBTYPES.get(o["subtype"]))
    if e:
        return e
    optlen = int(t.get("tcp.option_len") or 0)
    _same(e, "length (tshark framing vs raw)", optlen, len(t.raw))
    if st == 0:  # MP_CAPABLE
        _same(e, "version", t.int(P + "version"), o["version"])
        _same(e, "flags", t.int(P + "flags"), o["flags"])
        _same(e, "sender_key", t.int(P + "sendkey"), o.get("sender_key"))
        _same(e, "receiver_key", t.int(P + "recvkey"), o.get("receiver_key"))
        _same(e, "token (mptcp.expected_token)", t.int("mptcp.expected_token"), o.get("token"))
        _same(e, "data_len", t.int(P + "datalvllen"), o.get("data_len"))
        csum = t.int(P + "checksum")  # not dissected by 4.0: take tshark's option bytes
        if csum is None and optlen == 24:
            csum = struct.unpack_from("!H", t.raw, 22)[0]
        _same(e, "checksum", csum, o.get("checksum"))
    elif st == 1:  # MP_JOIN
        phase = {12: "SYN", 16: "SYN_ACK", 24: "ACK"}.get(optlen)
        _same(e, "phase", phase, o["phase"])
        if phase in ("SYN", "SYN_ACK"):
            _same(e, "backup", _flag(t, "backup.flag"), o["backup"])
            _same(e, "addr_id", t.int(P + "addrid"), o["addr_id"])
            _same(e, "nonce", t.int(P + "sendrand"), o.get("nonce"))
        _same(e, "token", t.int(P + "recvtok"), o.get("token"))
        if phase == "SYN_ACK":
            _same(e, "hmac (64-bit)", t.int(P + "sendtrunchmac"), _hexint(o.get("hmac")))
        elif phase == "ACK":
            _same(e, "hmac (160-bit)", (t.get(P + "sendhmac") or "").replace(":", ""), o.get("hmac"))
        else:
            _same(e, "hmac", None, o.get("hmac"))
    elif st == 2:  # DSS
        fl = t.int(P + "flags") or 0
        _same(e, "flags", fl, o["flags"])
        _same(e, "data_fin", _flag(t, "datafin.flag"), o["data_fin"])
        _same(e, "data_ack", t.int(P + "rawdataack"), o.get("data_ack"))
        if "data_ack" in o:
            _same(e, "ack64", _flag(t, "dataack8.flag"), o["ack64"])
        _same(e, "dsn", t.int(P + "rawdataseqno"), o.get("dsn"))
        _same(e, "ssn", t.int(P + "subflowseqno"), o.get("ssn"))
        _same(e, "dll", t.int(P + "datalvllen"), o.get("dll"))
        if "dsn" in o:
            _same(e, "dsn64", _flag(t, "dseqn8.flag"), o["dsn64"])
        has_csum = bool(fl & 0x04) and optlen == _dss_len(fl) + 2
        _same(e, "checksum present", has_csum, "checksum" in o)
        if has_csum:
            _same(e, "checksum", struct.unpack_from("!H", t.raw, optlen - 2)[0], o.get("checksum"))
    elif st == 3:  # ADD_ADDR
        if t.get(P + "echo") is not None:  # tshark took it for v1
            _same(e, "version", 1, o["version"])
            _same(e, "echo", _flag(t, "echo"), o["echo"])
        else:
            _same(e, "version", 0, o["version"])
            _same(e, "ipver", t.int(P + "ipver"), 4 if ":" not in o["address"] else 6)
        _same(e, "addr_id", t.int(P + "addrid"), o["addr_id"])
        addr = t.get(P + "ipv4") or t.get(P + "ipv6")
        _same(e, "address", addr and ipaddress.ip_address(addr), ipaddress.ip_address(o["address"]))
        _same(e, "port", t.int(P + "port"), o.get("port"))
        _same(e, "hmac", t.int(P + "addaddrtrunchmac"), _hexint(o.get("hmac")))
    elif st == 4:  # REMOVE_ADDR
        _same(e, "addr_ids", [int(x) for x in t.fields.get(P + "addrid", [])], o["addr_ids"])
        _same(e, "count", t.int("mptcp.rm_addr.count"), len(o["addr_ids"]))
    elif st == 5:  # MP_PRIO
        _same(e, "backup", _flag(t, "backup.flag"), o["backup"])
        _same(e, "addr_id", t.int(P + "addrid"), o.get("addr_id"))
    elif st == 6:  # MP_FAIL
        _same(e, "dsn", t.int(P + "rawdataseqno"), o.get("dsn"))
    elif st == 7:  # MP_FASTCLOSE
        _same(e, "receiver_key", t.int(P + "recvkey"), o["receiver_key"])
    elif st == 8:  # MP_TCPRST
        bits = [_flag(t, f"flag_{b}.flag") for b in "UVWT"]
        nib = sum(1 << (3 - i) for i, b in enumerate(bits) if b)
        _same(e, "flags (U V W T)", nib, o["flags"])
        _same(e, "transient", bits[3], o["transient"])
        _same(e, "reason", t.int(P + "rst_reason"), o["reason"])
    return e


def compare_capture(cap: Path) -> tuple[list[str], Counter[str]]:
    """All disagreements in *cap*, and how many options of each subtype were compared."""
    theirs, ours = tshark_mptcp(cap), mproxy_decode(cap)
    errs: list[str] = []
    seen: Counter[str] = Counter()
    for num in sorted(set(ours) - set(theirs)):
        errs.append(f"frame {num}: we report options in a frame tshark has no TCP for")
    for num, fr in sorted(theirs.items()):
        mine = ours.get(num, [])
        if len(fr.options) != len(mine):
            errs.append(f"frame {num}: tshark sees {len(fr.options)} MPTCP options "
                        f"({[o.get(P + 'subtype') for o in fr.options]}), we see {len(mine)} "
                        f"({[r.get('subtype') for r in mine]})")
            continue
        for i, (t, o) in enumerate(zip(fr.options, mine)):
            where = f"frame {num} option {i} ({o.get('subtype')})"
            e: list[str] = []
            _same(e, "src", (ipaddress.ip_address(fr.src), fr.sport), (ipaddress.ip_address(o["src"]), o["sport"]))
            _same(e, "dst", (ipaddress.ip_address(fr.dst), fr.dport), (ipaddress.ip_address(o["dst"]), o["dport"]))
            e += compare_option(t, o)
            errs.extend(f"{where}: {x}" for x in e)
            seen[o.get("subtype", "?")] += 1
    return errs, seen


# --------------------------------------------------------------------------- option zoo
_ZOO_APP = r'''
import socket, struct, sys, time
role, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "server":
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 262)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port)); ls.listen(8); ls.settimeout(30)
    print("READY", flush=True)
    c, _ = ls.accept(); c.settimeout(30)
    try:
        while c.recv(65536):
            c.sendall(b"r" * 1000)   # the client leaves these unread
    except OSError:
        pass                         # the fast-close RST
    time.sleep(1); ls.close()
else:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM, 262)
    s.settimeout(30)
    s.connect((addr, port))
    s.sendall(b"q" * 20000)
    print("UP", flush=True)
    for line in sys.stdin:
        if line.startswith("send"):
            s.sendall(b"q" * int(line.split()[1]))
        elif line.startswith("close"):
            time.sleep(0.2)          # replies arrive unread: close() fast-closes (MP_FASTCLOSE)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            print("OK", flush=True)
            break
        print("OK", flush=True)
'''
ZOO_PORT, ZOO_JOIN_PORT = 5201, 5301


def _line(p: subprocess.Popen[bytes], timeout: float = 15) -> str:
    from mproxy.lab.scenarios import _readline

    return _readline(p, timeout)


def _endpoint_id(lab: Lab, ns: str, addr: str) -> str:
    for ln in lab.run(ns, "ip", "mptcp", "endpoint", "show").stdout.splitlines():
        parts = ln.split()
        if parts and parts[0] == addr and "id" in parts:
            return parts[parts.index("id") + 1]
    raise AssertionError(f"no endpoint {addr} in {ns}")


def _wait_subflows(lab: Lab, n: int, timeout: float = 5.0) -> None:
    """Until the client has *n* established TCP subflows to the server's ports."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.run(lab.ns_cli, "ss", "-tnH", "state", "established").stdout
        if sum(1 for ln in out.splitlines() if f":{ZOO_PORT}" in ln or f":{ZOO_JOIN_PORT}" in ln) >= n:
            return
        time.sleep(0.05)


def run_option_zoo(out_dir: Path, family: int) -> Path:
    """One MPTCP connection that makes Linux send every option subtype it can (see module doc)."""
    cap = out_dir / f"zoo{family}.pcap"
    other = 6 if family == 4 else 4
    with Lab(rate=None) as lab:
        for ns in (lab.ns_cli, lab.ns_srv):
            lab.run(ns, "sysctl", "-qw", "net.mptcp.checksum_enabled=1")
        srv2 = lab.server_addr2
        lab.run(lab.ns_srv, "ip", "mptcp", "endpoint", "add", srv2[family], "dev", lab.server_if2,
                "port", str(ZOO_JOIN_PORT), "signal")
        lab.run(lab.ns_srv, "ip", "mptcp", "endpoint", "add", srv2[other], "dev", lab.server_if2, "signal")
        srv_id = _endpoint_id(lab, lab.ns_srv, srv2[family])
        cli_id = _endpoint_id(lab, lab.ns_cli, lab.client_addr[1][family])
        with lab.capture(cap):
            srv = lab.popen(lab.ns_srv, sys.executable, "-c", _ZOO_APP, "server", "::", str(ZOO_PORT),
                            stdout=subprocess.PIPE)
            assert _line(srv) == "READY"
            cli = lab.popen(lab.ns_cli, sys.executable, "-c", _ZOO_APP, "client", lab.server_addr[family],
                            str(ZOO_PORT), stdout=subprocess.PIPE, stdin=subprocess.PIPE)
            assert _line(cli) == "UP"
            assert cli.stdin is not None

            def step(cmd: str) -> None:
                assert cli.stdin is not None
                cli.stdin.write(f"{cmd}\n".encode())
                cli.stdin.flush()
                assert _line(cli) == "OK"
                time.sleep(0.3)

            _wait_subflows(lab, 3)  # initial + join from path 1 + join to the announced addr:port
            lab.run(lab.ns_cli, "ip", "mptcp", "endpoint", "change", "id", cli_id, "backup")  # MP_PRIO
            step("send 5000")
            lab.run(lab.ns_srv, "ip", "mptcp", "endpoint", "change", "id", srv_id, "backup")  # MP_PRIO
            step("send 5000")
            lab.run(lab.ns_srv, "ip", "mptcp", "endpoint", "delete", "id", srv_id)  # REMOVE_ADDR
            step("send 5000")
            lab.run(lab.ns_cli, "ip", "mptcp", "endpoint", "delete", "id", cli_id)  # REMOVE_ADDR
            step("send 5000")
            step("close")  # MP_FASTCLOSE + MP_TCPRST
            with contextlib.suppress(subprocess.TimeoutExpired):
                srv.wait(10)
            time.sleep(0.2)
    return cap


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def capture(scenario: Callable[[str], ScenarioResult],
            tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``capture(name)``: a session scenario's pcap, or an option zoo run once per module."""
    zoo: dict[str, Path | BaseException] = {}

    def get(name: str) -> Path:
        if name in SCENARIO_CAPTURES:
            res = scenario(name)
            assert res.ok, "\n".join(res.problems())
            return res.capture
        if name not in zoo:
            try:
                zoo[name] = run_option_zoo(tmp_path_factory.mktemp(name), int(name[-1]))
            except Exception as exc:  # noqa: BLE001 - fail each test using it, run once
                zoo[name] = exc
        got = zoo[name]
        if isinstance(got, BaseException):
            raise got
        return got

    return get


_compared: dict[str, Counter[str]] = {}


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ALL_CAPTURES)
def test_decode_agrees_with_tshark(name: str, capture: Callable[[str], Path]) -> None:
    errs, seen = compare_capture(capture(name))
    assert not errs, f"{len(errs)} disagreements with tshark in {name}:\n" + "\n".join(errs[:40])
    assert seen["MP_CAPABLE"] >= 3 and seen["MP_JOIN"] >= 3, seen
    assert seen["DSS"] > (100 if name in SCENARIO_CAPTURES else 10), seen
    _compared[name] = seen
    if name == "add_addr":
        assert seen["ADD_ADDR"] >= 2, seen


def test_every_subtype_linux_sends_was_compared(capture: Callable[[str], Path]) -> None:
    """The zoo must really have produced every subtype (else the comparison proved little)."""
    total: Counter[str] = Counter()
    for name in ZOO_CAPTURES:
        if name not in _compared:
            errs, _compared[name] = compare_capture(capture(name))
            assert not errs, errs[:20]
        total.update(_compared[name])
    missing = set(SUBTYPES) - {"MP_FAIL"} - {k for k, v in total.items() if v}
    assert not missing, f"never compared: {missing} ({dict(total)})"
    # and the variants: DSS checksums, ADD_ADDR with a port, of both families
    recs = [r for name in ZOO_CAPTURES for rs in mproxy_decode(capture(name)).values() for r in rs]
    assert any(r["subtype"] == "DSS" and "checksum" in r for r in recs)
    adds = [r for r in recs if r["subtype"] == "ADD_ADDR" and not r["echo"]]
    assert any("port" in r for r in adds)
    assert {4, 6} <= {ipaddress.ip_address(r["address"]).version for r in adds}


# --------------------------------------------------------------------------- crypto on real traffic
@dataclass(slots=True)
class _Conn:
    client_key: int
    server_key: int


@dataclass(slots=True)
class _Keys:
    """Keys of every MPTCP connection in a capture, found by subflow and by token."""

    by_tuple: dict[tuple[str, int, str, int], _Conn] = field(default_factory=dict)  # client->server
    by_token: dict[int, _Conn] = field(default_factory=dict)


def _keys(recs: list[dict[str, Any]]) -> _Keys:
    ks = _Keys()
    for r in recs:
        if r["subtype"] == "MP_CAPABLE" and "receiver_key" in r:  # the third ACK: client, server key
            c = _Conn(r["sender_key"], r["receiver_key"])
            ks.by_tuple[(r["src"], r["sport"], r["dst"], r["dport"])] = c
            ks.by_token[crypto.key_token(c.client_key)] = c
            ks.by_token[crypto.key_token(c.server_key)] = c
    for r in recs:
        if r["subtype"] == "MP_JOIN" and r["phase"] == "SYN" and r["token"] in ks.by_token:
            ks.by_tuple[(r["src"], r["sport"], r["dst"], r["dport"])] = ks.by_token[r["token"]]
    return ks


def _conn_of(ks: _Keys, r: dict[str, Any]) -> tuple[_Conn, bool] | None:
    """The connection of the subflow *r* travels on, and whether *r* goes client -> server."""
    fwd = (r["src"], r["sport"], r["dst"], r["dport"])
    if fwd in ks.by_tuple:
        return ks.by_tuple[fwd], True
    rev = (r["dst"], r["dport"], r["src"], r["sport"])
    if rev in ks.by_tuple:
        return ks.by_tuple[rev], False
    return None


def _flat(cap: Path) -> list[dict[str, Any]]:
    return [r for _n, rs in sorted(mproxy_decode(cap).items()) for r in rs]


@pytest.mark.parametrize("name", ["add_addr", *ZOO_CAPTURES])
def test_add_addr_hmac_matches_linux(name: str, capture: Callable[[str], Path]) -> None:
    """RFC 8684 ADD_ADDR HMAC, key = announcer's key || peer's key, equals what Linux sent."""
    recs = _flat(capture(name))
    ks = _keys(recs)
    checked = 0
    for r in recs:
        if r["subtype"] != "ADD_ADDR" or r["echo"]:
            continue
        found = _conn_of(ks, r)
        assert found, f"ADD_ADDR on an unknown subflow: {r}"
        conn, c2s = found
        sender, receiver = (conn.client_key, conn.server_key) if c2s else (conn.server_key, conn.client_key)
        addr = ipaddress.ip_address(r["address"]).packed
        want = crypto.add_addr_hmac(sender, receiver, r["addr_id"], addr, r.get("port"))
        assert f"{want:016x}" == r["hmac"], r
        # the pre-RFC (leftmost bits) form must not match: we really verified the RFC form
        assert crypto.add_addr_hmac_legacy(sender, receiver, r["addr_id"], addr, r.get("port")) != want
        checked += 1
    # Linux announces an IPv6 address on an IPv4 connection (dual-stack listener), not the reverse
    assert checked >= (1 if name == "zoo6" else 2), f"only {checked} ADD_ADDR announcements in {name}"


@pytest.mark.parametrize("name", ALL_CAPTURES)
def test_join_hmacs_match_linux(name: str, capture: Callable[[str], Path]) -> None:
    """Each real MP_JOIN handshake verifies: SYN/ACK (64-bit) and third ACK (160-bit) HMACs."""
    recs = _flat(capture(name))
    ks = _keys(recs)
    syns: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    synacks: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    verified = 0
    for r in recs:
        if r["subtype"] != "MP_JOIN":
            continue
        t = (r["src"], r["sport"], r["dst"], r["dport"])
        rev = (r["dst"], r["dport"], r["src"], r["sport"])
        if r["phase"] == "SYN":
            syns[t] = r
        elif r["phase"] == "SYN_ACK":
            synacks[rev] = r
        elif t in syns and t in synacks:
            syn, sa = syns[t], synacks[t]
            conn = ks.by_token[syn["token"]]
            # the responder owns the token in the SYN; the initiator holds the other key
            responder = conn.server_key if crypto.key_token(conn.server_key) == syn["token"] else conn.client_key
            initiator = conn.client_key if responder == conn.server_key else conn.server_key
            assert crypto.verify_join_synack(responder, initiator, sa["nonce"], syn["nonce"],
                                             bytes.fromhex(sa["hmac"])), (syn, sa)
            assert crypto.verify_join_ack(initiator, responder, syn["nonce"], sa["nonce"],
                                          bytes.fromhex(r["hmac"])), (syn, sa, r)
            verified += 1
    assert verified >= (2 if name in ("add_addr", *ZOO_CAPTURES) else 1), f"{verified} joins verified in {name}"
