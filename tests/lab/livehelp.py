"""Helpers for the live adversarial, failure and privilege tests: an ``mproxy run`` that can be
killed and restarted mid-transfer, a lab with the IDS-facing veth pair, raw-socket floods and a
plain-TCP transfer, all inside the lab's namespaces (198.18.0.0/15, 2001:db8::/32 only).

Run as a script inside a namespace it is the flood sender (``python livehelp.py flood ...``) and
the plain-TCP server/client (``plain-server``/``plain-client``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
from mproxy.lab.gateway import start_mproxy, stop_mproxy  # noqa: E402 - after the path is set

SINK_IF, IDS_IF = "sink0", "sink1"
QUEUE = 0


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(_ROOT), PYTHONUNBUFFERED="1")


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------- the lab
def open_lab(**kw: Any) -> Iterator[Any]:
    """A lab with the sink veth pair in the gateway (module fixtures ``yield from`` this)."""
    import pytest

    from mproxy.lab.topology import Lab, LabError

    try:
        import netfilterqueue  # noqa: F401
    except ImportError as e:
        pytest.skip(f"netfilterqueue not importable: {e}")
    kw.setdefault("rate", "30mbit")
    with Lab(**kw) as lab:
        lab.run(lab.ns_gw, "ip", "link", "add", SINK_IF, "type", "veth", "peer", "name", IDS_IF)
        for i in (SINK_IF, IDS_IF):
            lab.run(lab.ns_gw, "sysctl", "-qw", f"net.ipv6.conf.{i}.disable_ipv6=1")
            lab.run(lab.ns_gw, "ip", "link", "set", i, "mtu", "1600", "up")
        try:
            probe = ("-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "NFQUEUE",
                     "--queue-num", "9", "--queue-bypass")
            lab.run(lab.ns_gw, "iptables", "-w", *probe)
            lab.run(lab.ns_gw, "iptables", "-w", *("-D" if a == "-A" else a for a in probe))
        except LabError as e:
            pytest.skip(f"NFQUEUE target unavailable: {e}")
        yield lab


def transfer(lab: Any, d: Path, name: str, **kw: Any) -> Any:
    """``run_transfer``, asserted intact. A run in which a receiving kernel handed its application
    as many bytes as were sent but other ones is run once more, with a warning: mproxy on the path
    accepts or drops packets (a downgrade blanks an option of a SYN; no payload byte is ever
    rewritten), and none of that can change a byte that TCP delivers, so that is the kernel's
    (Linux 6.18 did it on this machine, see README "The lab")."""
    from mproxy.lab.scenarios import run_transfer

    kw.setdefault("timeout", 40.0)
    res = run_transfer(lab, d, name, **kw)
    if not res.ok and kernel_corrupted(res):
        warnings.warn(f"transfer {name}: a kernel delivered other bytes than were sent, run again: "
                      + "; ".join(res.problems()), stacklevel=2)
        res = run_transfer(lab, d, f"{name}-again", **kw)
    assert res.ok, "\n".join(res.problems())
    return res


def kernel_corrupted(res: Any) -> bool:
    """Every connection that is not intact was completed by both applications, with every byte
    count right and a SHA-256 that differs: only the bytes themselves changed."""
    bad = [c for c in res.connections if not c.intact]
    return bool(bad) and not res.unmatched and len(res.connections) == res.expected_connections and all(
        c.client_ok and c.server_ok and c.c2s_sent_bytes == c.c2s_recv_bytes and c.s2c_sent_bytes == c.s2c_recv_bytes
        and (c.c2s_sent_sha256 != c.c2s_recv_sha256 or c.s2c_sent_sha256 != c.s2c_recv_sha256) for c in bad)


# --------------------------------------------------------------------------- mproxy run
@dataclass
class Mproxy:
    """One ``mproxy run`` in the gateway namespace; ``start``/``stop``/``kill`` at will."""

    lab: Any
    dir: Path
    fail: str = "open"
    policy: str = "inspect"
    policy_extra: str = ""  # more lines in the [policy] table (e.g. clamp_window = false)
    max_len: int = 4096
    sock_rcvbuf: int = 8 << 20
    metrics: str = ""
    workers: int = 1
    extra: str = ""  # more TOML (e.g. a [tracker] table)
    inspector: str | None = 'mode = "off"'  # the [inspector] table's lines; None: no table (extra may have one)
    sink: bool = True  # the sink interface (the lab must have it: open_lab) and its pcap
    queue: int = QUEUE
    log_extra: str = ""  # more lines in the [log] table (e.g. log_keys = true)
    launcher: list[str] = field(default_factory=list)  # argv prefix *outside* the namespace (unshare ...)
    inside: list[str] = field(default_factory=list)  # argv prefix inside the namespace (setpriv ...)
    proc: subprocess.Popen[bytes] | None = None
    rc: int | None = None

    def config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "mproxy.toml"
        sink = f'[sink]\ninterface = "{SINK_IF}"\npcap = "{self.dir / "sink"}"\n' if self.sink else ""
        inspector = f"[inspector]\n{self.inspector}\n" if self.inspector is not None else ""
        cfg.write_text(f"""
[queue]
num = {self.queue}
workers = {self.workers}
max_len = {self.max_len}
sock_rcvbuf = {self.sock_rcvbuf}
fail = "{self.fail}"
[policy]
default = "{self.policy}"
{self.policy_extra}
{sink}[log]
events = "{self.dir / 'events.jsonl'}"
level = "debug"
{self.log_extra}
[metrics]
listen = "{self.metrics}"
{inspector}{self.extra}
""")
        return cfg

    @property
    def err(self) -> str:
        p = self.dir / "mproxy.err"
        return p.read_text(errors="replace") if p.exists() else ""

    def start(self, timeout: float = 20.0) -> Mproxy:
        """Start (again: a restart appends to the same stderr file and event log) and wait for ready."""
        self.proc = start_mproxy(self.lab, self.config(), self.dir / "mproxy.err", timeout=timeout, env=env(),
                                 launcher=self.launcher, inside=self.inside)
        return self

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.rc = stop_mproxy(self.proc, timeout)
        return self.rc

    def check_clean_stop(self) -> None:
        """Stopped with exit 0, no traceback, and no MPROXY rule left in the gateway's firewall."""
        assert self.rc == 0 and "Traceback" not in self.err, (self.rc, self.err)
        for tool in ("iptables", "ip6tables"):
            left = self.lab.run(self.lab.ns_gw, tool, "-w", "-t", "mangle", "-S").stdout
            assert "MPROXY" not in left, f"{tool} rules left after stop:\n{left}"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.rc = self.proc.wait(5)

    def records(self) -> list[dict[str, Any]]:
        ev = self.dir / "events.jsonl"
        if not ev.exists():
            return []
        return [json.loads(x) for x in ev.read_text().splitlines() if x.strip()]

    def stats(self) -> dict[str, Any]:
        return next(r for r in reversed(self.records()) if r["event"] == "stats")

    def connections(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["event"] == "mptcp_connection"]

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The metrics endpoint, read from inside the gateway namespace."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.lab.run(self.lab.ns_gw, sys.executable, "-c", "import urllib.request as u; print(u.urlopen("
                            f"'http://{self.metrics}/metrics', timeout=5).read().decode())").stdout
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


def rules_left(lab: Any) -> str:
    return "".join(lab.run(lab.ns_gw, t, "-w", "-t", "mangle", "-S").stdout for t in ("iptables", "ip6tables"))


def kernel_queues(lab: Any) -> dict[int, dict[str, int]]:
    """The gateway namespace's NFQUEUE counters, by queue number."""
    from mproxy.io.nfqueue import queue_table

    return queue_table(lab.run(lab.ns_gw, "cat", "/proc/net/netfilter/nfnetlink_queue").stdout)


def kernel_queue(lab: Any) -> dict[str, int] | None:
    return kernel_queues(lab).get(QUEUE)


def counter(lab: Any, spec: list[str]) -> int:
    """Packets counted by a target-less rule in the gateway's mangle POSTROUTING (added on first use)."""
    chk = lab.run(lab.ns_gw, "iptables", "-w", "-t", "mangle", "-C", "POSTROUTING", *spec, check=False)
    if chk.returncode:
        lab.run(lab.ns_gw, "iptables", "-w", "-t", "mangle", "-A", "POSTROUTING", *spec)
    out = lab.run(lab.ns_gw, "iptables", "-w", "-t", "mangle", "-L", "POSTROUTING", "-v", "-x", "-n").stdout
    want = spec[spec.index("--dport") + 1] if "--dport" in spec else spec[spec.index("--sport") + 1]
    for line in out.splitlines()[2:]:
        f = line.split()
        if f and f[0].isdigit() and f"pt:{want}" in line:
            return int(f[0])
    raise AssertionError(out)


# --------------------------------------------------------------------------- run in namespaces
def _flood(a: argparse.Namespace) -> int:
    """Raw SYNs from ``--src`` to ``--dst:--dport``: MP_CAPABLE (``--kind syn``) or MP_JOIN with
    random tokens (``--kind join``), ``--count`` of them paced over ``--seconds``."""
    from mproxy.wire import mptcp as m
    from mproxy.wire.build import build_tcp, tcp_options
    from mproxy.wire.packet import SYN

    src, dst = socket.inet_aton(a.src), socket.inet_aton(a.dst)
    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    rng = random.Random(a.seed)
    mss = b"\x02\x04\x05\xb4"
    t0 = time.monotonic()
    for i in range(a.count):
        opt = m.MpCapable(1, m.CAP_H_HMAC).encode() if a.kind == "syn" else \
            m.MpJoin(m.JoinPhase.SYN, False, rng.randrange(256), rng.getrandbits(32), rng.getrandbits(32)).encode()
        sport = (20000 if a.kind == "syn" else 42000) + i % 20000  # kinds never share a 4-tuple
        pkt = build_tcp(src, dst, sport, a.dport, rng.getrandbits(32), 0, SYN, 64240,
                        tcp_options(mss, opt))
        tx.sendto(pkt, (a.dst, 0))
        ahead = t0 + a.seconds * (i + 1) / a.count - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    print(json.dumps({"sent": a.count, "seconds": round(time.monotonic() - t0, 3)}))
    return 0


def _plain_server(a: argparse.Namespace) -> int:
    """Plain TCP (never MPTCP): accept one connection, read until EOF, print count and SHA-256."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((a.bind, a.port))
    ls.listen(4)
    ls.settimeout(a.timeout)
    print("READY", flush=True)
    c, _ = ls.accept()
    c.settimeout(a.timeout)
    h, n = hashlib.sha256(), 0
    while chunk := c.recv(65536):
        h.update(chunk)
        n += len(chunk)
    print(json.dumps({"bytes": n, "sha256": h.hexdigest()}), flush=True)
    return 0


def _plain_client(a: argparse.Namespace) -> int:
    data = random.Random(a.seed).randbytes(a.bytes)
    s = socket.create_connection((a.connect, a.port), timeout=a.timeout)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    print(json.dumps({"bytes": len(data), "sha256": sha(data)}))
    return 0


def plain_transfer(lab: Any, nbytes: int = 300_000, port: int = 5301, timeout: float = 15.0) -> tuple[dict, dict]:
    """A plain-TCP transfer client -> server through the gateway; (client record, server record)."""
    srv = lab.popen(lab.ns_srv, sys.executable, __file__, "plain-server", "--bind", lab.server_addr[4], "--port",
                    str(port), "--timeout", str(timeout), stdout=subprocess.PIPE, env=env())
    assert srv.stdout is not None
    assert srv.stdout.readline().strip() == b"READY"
    cp = lab.run(lab.ns_cli, sys.executable, __file__, "plain-client", "--connect", lab.server_addr[4], "--port",
                 str(port), "--bytes", str(nbytes), "--timeout", str(timeout), timeout=timeout + 5, check=False)
    out, _ = srv.communicate(timeout=timeout + 5)
    cli = json.loads(cp.stdout) if cp.returncode == 0 else {"error": cp.stderr}
    got = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {"error": "no server record"}
    return cli, got


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flood")
    f.add_argument("--src", required=True)
    f.add_argument("--dst", required=True)
    f.add_argument("--dport", type=int, default=5202)
    f.add_argument("--kind", choices=("syn", "join"), default="syn")
    f.add_argument("--count", type=int, default=1000)
    f.add_argument("--seconds", type=float, default=1.0)
    f.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("plain-server")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=5301)
    s.add_argument("--timeout", type=float, default=15.0)
    c = sub.add_parser("plain-client")
    c.add_argument("--connect", required=True)
    c.add_argument("--port", type=int, default=5301)
    c.add_argument("--bytes", type=int, default=300_000)
    c.add_argument("--seed", type=int, default=7)
    c.add_argument("--timeout", type=float, default=15.0)
    a = ap.parse_args()
    return {"flood": _flood, "plain-server": _plain_server, "plain-client": _plain_client}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
