"""Inline gateway: throughput and added latency through ``mproxy run`` vs plain kernel forwarding.

Run (root, kernel MPTCP): .venv/bin/python benchmarks/inline.py [--seconds 5] [--repeat 2] [--profile]
                                  [--workers 2] [--conns 4] [--rate] [--mproxy-root DIR]

In one unshaped namespace lab (``Lab(rate=None)``), the same run measures:

* bulk throughput client -> server for ``--seconds``, over MPTCP (two client
  paths, as the lab configures) and over plain TCP, first with the gateway
  forwarding in the kernel (no rules, no mproxy), then through ``mproxy run``
  with policy ``inspect`` and the emitted stream written to a sink interface;
* the round-trip time of 64-byte request/response exchanges over MPTCP (TCP_NODELAY),
  with and without mproxy: each round trip crosses the queue twice, so half the
  difference of the medians is the added latency per queued packet;
* inside mproxy (its ``stats`` record): the time from the callback's entry to
  the verdict, and from the socket becoming readable to the verdict (this one
  includes waiting behind the packets before it in the same batch).

* ``--conns`` parallel MPTCP bulk transfers (aggregate Mbit/s) with kernel
  forwarding, through one ``mproxy run`` process and through ``--workers``
  worker processes (``[queue] workers``): workers spread connections, not one
  transfer, over cores.

``--profile`` samples the mproxy process with py-spy during the MPTCP bulk
run and prints where the time goes (self time per function).

``--rate`` runs only this instead: short MPTCP connections (connect, a 100-byte
request, a 512-byte response, close; ``--conns`` client threads, each opening
the next as soon as one ends) for ``--seconds``, with kernel forwarding and
through ``mproxy run`` with one worker and with ``--workers``: connections per
second, and whether mproxy wrote a record for every one of them. A gateway
sees mostly short connections; this is its rate of new connections.

``--flood UNIT`` runs only this instead: one MPTCP bulk transfer to port 80
(where the shipped rules apply) whose payload is UNIT repeated (``"or "``: a
content a pcre rule needs, matched every 3 bytes), with kernel forwarding,
through ``mproxy run`` with the compiled content scan, and with
``MPROXY_NO_ACCEL=1`` (the ``hyperscan`` binding's Python match handler): what
a flood of rule contents costs the live gateway, and how many packets then
pass uninspected (fail open).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mproxy.lab.gateway import start_mproxy, stop_mproxy  # noqa: E402 - after the path is set

IPPROTO_MPTCP = 262
PORT = 5301
PING_PORT = 5302
RATE_PORT = 5303
MPROXY_ROOT = ROOT  # the checkout whose mproxy runs (--mproxy-root: compare two in one run)
RATE_REQUEST = b"GET /rate HTTP/1.1\r\nHost: server\r\nUser-Agent: mproxy-bench\r\n" + b"x" * 30 + b"\r\n\r\n"
RATE_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 474\r\n\r\n" + b"y" * 474
FLOOD_PORT = 80  # in the shipped rules' HTTP_PORTS


# --------------------------------------------------------------------------- traffic (run in namespaces)
def _serve_bulk(args: argparse.Namespace) -> int:
    """Accept ``--conns`` connections, drain them concurrently; payload bytes over the span of all of them."""
    import threading

    proto = IPPROTO_MPTCP if args.mptcp else socket.IPPROTO_TCP
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", args.port))
    ls.listen(max(4, args.conns))
    print("READY", flush=True)
    ls.settimeout(30)
    done: list[tuple[int, float, float, bool]] = []

    def drain(conn: socket.socket) -> None:
        buf = bytearray(1 << 20)
        n, first = 0, None
        while True:
            k = conn.recv_into(buf)
            if not k:
                break
            if first is None:
                first = time.monotonic()
            n += k
        t1 = time.monotonic()
        mptcp = bool(conn.getsockopt(socket.IPPROTO_TCP, 43)) if args.mptcp else False
        conn.close()
        done.append((n, first or t1, t1, mptcp))

    threads = []
    for _ in range(args.conns):
        conn, _ = ls.accept()
        t = threading.Thread(target=drain, args=(conn,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    n = sum(d[0] for d in done)
    span = max(d[2] for d in done) - min(d[1] for d in done)
    print(json.dumps({"bytes": n, "seconds": span, "mptcp": all(d[3] for d in done)}), flush=True)
    return 0


def _send_bulk(args: argparse.Namespace) -> int:
    import threading

    proto = IPPROTO_MPTCP if args.mptcp else socket.IPPROTO_TCP
    end = time.monotonic() + args.seconds
    unit = args.unit.encode()
    buf = unit * ((1 << 18) // len(unit)) if unit else os.urandom(1 << 18)
    failed: list[BaseException] = []

    def send() -> None:
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
            s.settimeout(30)
            s.connect((args.connect, args.port))
            while time.monotonic() < end:
                s.sendall(buf)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
            s.close()
        except OSError as e:
            failed.append(e)

    threads = [threading.Thread(target=send) for _ in range(args.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        print(f"sender: {failed[0]}", file=sys.stderr)
    return 1 if failed else 0


def _serve_ping(args: argparse.Namespace) -> int:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", args.port))
    ls.listen(4)
    print("READY", flush=True)
    ls.settimeout(30)
    conn, _ = ls.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = conn.recv(64)
        if not d:
            break
        while len(d) < 64:
            more = conn.recv(64 - len(d))
            if not more:
                return 0
            d += more
        conn.sendall(d)
    conn.close()
    return 0


def _send_ping(args: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    s.settimeout(10)
    s.connect((args.connect, args.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    rtts = []
    for i in range(args.count):
        t0 = time.perf_counter_ns()
        s.sendall(msg)
        got = 0
        while got < 64:
            d = s.recv(64 - got)
            if not d:
                raise SystemExit("server closed")
            got += len(d)
        rtts.append(time.perf_counter_ns() - t0)
        time.sleep(0.0005)  # one exchange in flight at a time, no batching effects
    s.close()
    print(json.dumps({"rtt_ns": rtts}), flush=True)
    return 0


def _serve_rate(args: argparse.Namespace) -> int:
    """Answer short MPTCP connections on ``--conns`` threads until SIGTERM; then print how many, and
    how many were MPTCP to the end (TCP_IS_MPTCP)."""
    import threading

    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", args.port))
    ls.listen(1024)
    ls.settimeout(0.5)
    stop = threading.Event()
    served = [0, 0]  # connections answered, of which MPTCP
    lock = threading.Lock()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = ls.accept()
            except (TimeoutError, socket.timeout):
                continue
            try:
                conn.settimeout(10)
                got = b""
                while not got.endswith(b"\r\n\r\n"):
                    d = conn.recv(512)
                    if not d:
                        break
                    got += d
                conn.sendall(RATE_RESPONSE)
                mptcp = bool(conn.getsockopt(socket.IPPROTO_TCP, 43))
                with lock:
                    served[0] += 1
                    served[1] += mptcp
            except OSError:
                pass
            finally:
                conn.close()

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(args.conns)]
    for t in threads:
        t.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    while not stop.is_set():
        stop.wait(0.2)
    for t in threads:
        t.join(5)
    print(json.dumps({"served": served[0], "mptcp": served[1]}), flush=True)
    return 0


def _send_rate(args: argparse.Namespace) -> int:
    """``--conns`` threads open short MPTCP connections one after another for ``--seconds``: each sends
    the request, reads the whole response and closes."""
    import threading

    end = time.monotonic() + args.seconds
    done = [0, 0]  # complete exchanges, failures
    lock = threading.Lock()

    def run() -> None:
        while time.monotonic() < end:
            ok = False
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
            try:
                s.settimeout(10)
                s.connect((args.connect, args.port))
                s.sendall(RATE_REQUEST)
                got = bytearray()
                while True:
                    d = s.recv(4096)
                    if not d:
                        break
                    got += d
                ok = bytes(got) == RATE_RESPONSE
            except OSError:
                pass
            finally:
                s.close()
            with lock:
                done[0 if ok else 1] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(args.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"conns": done[0], "failed": done[1], "seconds": time.monotonic() - t0}), flush=True)
    return 0


# --------------------------------------------------------------------------- orchestration
@dataclass
class Bulk:
    mbit: float
    mptcp: bool


def _py(lab, ns: str, *argv: str, **kw):  # type: ignore[no-untyped-def]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return lab.popen(ns, sys.executable, str(Path(__file__).resolve()), *argv, env=env, **kw)


def _ready(p: subprocess.Popen[bytes]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline().decode().strip()
    if line != "READY":
        raise RuntimeError(f"server said {line!r}")


def bulk(lab, mptcp: bool, seconds: float, conns: int = 1, port: int = PORT,  # type: ignore[no-untyped-def]
         unit: str = "") -> Bulk:
    """``conns`` parallel transfers for ``seconds``: random bytes, or ``unit`` repeated."""
    flag = ["--mptcp"] if mptcp else []
    srv = _py(lab, lab.ns_srv, "_serve_bulk", "--port", str(port), "--conns", str(conns), *flag,
              stdout=subprocess.PIPE)
    _ready(srv)
    cli = _py(lab, lab.ns_cli, "_send_bulk", "--connect", lab.server_addr[4], "--port", str(port),
              "--seconds", str(seconds), "--conns", str(conns), "--unit", unit, *flag)
    cli.wait(seconds + 60)
    out, _ = srv.communicate(timeout=60)
    res = json.loads(out.decode().strip().splitlines()[-1])
    if cli.returncode != 0:
        raise RuntimeError("bulk client failed")
    return Bulk(res["bytes"] * 8 / res["seconds"] / 1e6, res["mptcp"])


def ping(lab, count: int) -> list[int]:  # type: ignore[no-untyped-def]
    srv = _py(lab, lab.ns_srv, "_serve_ping", "--port", str(PING_PORT), stdout=subprocess.PIPE)
    _ready(srv)
    cli = _py(lab, lab.ns_cli, "_send_ping", "--connect", lab.server_addr[4], "--port", str(PING_PORT),
              "--count", str(count), stdout=subprocess.PIPE)
    out, _ = cli.communicate(timeout=120)
    srv.wait(30)
    rtts = json.loads(out.decode().strip().splitlines()[-1])["rtt_ns"]
    return rtts[50:]  # skip warm-up (handshake, join, first allocations)


class Mproxy:
    """``mproxy run`` in the gateway namespace, policy inspect, emitted stream to a veth sink."""

    def __init__(self, lab, work: Path, tag: str, profile: bool = False,  # type: ignore[no-untyped-def]
                 workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.lab, self.work, self.tag, self.profile, self.workers = lab, work, tag, profile, workers
        self.env = env or {}
        self.events = work / f"{tag}.events.jsonl"
        self.err = work / f"{tag}.mproxy.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spy: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Mproxy:
        cfg = self.work / f"{self.tag}.toml"
        cfg.write_text(f'[queue]\nnum = 7\nworkers = {self.workers}\n[sink]\ninterface = "sink0"\n'
                       f'[log]\nevents = "{self.events}"\n[metrics]\nlisten = ""\n')
        self.err.unlink(missing_ok=True)
        self.proc = start_mproxy(self.lab, cfg, self.err, cwd=str(MPROXY_ROOT),
                                 env=dict(os.environ, PYTHONPATH=str(MPROXY_ROOT), **self.env))
        if self.profile:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            self.spy = subprocess.Popen([spy, "record", "-p", str(self.proc.pid), "-r", "250", "--format",
                                         "raw", "-o", str(self.work / f"{self.tag}.pyspy.txt"), "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.spy is not None:
            self.spy.send_signal(signal.SIGINT)
            self.spy.wait(30)
        assert self.proc is not None
        stop_mproxy(self.proc)

    def all_stats(self) -> list[dict]:  # type: ignore[type-arg]
        """Every ``stats`` record (one per worker process with ``workers`` > 1)."""
        return [r for r in map(json.loads, self.events.read_text().splitlines()) if r["event"] == "stats"]

    def missed(self) -> int:
        """Packets that went past mproxy uninspected: bypassed a queue (counted by the process that
        manages the rules: the ``stats`` record, or the control process's last log line) or were
        queued but never handed over (every process's ``stats``)."""
        bypassed = [r["bypassed"] for r in self.all_stats() if r.get("bypassed")]
        found = re.search(r"'bypassed': (\{[^}]*\})", self.err.read_text(errors="replace"))
        if found:
            bypassed.append(ast.literal_eval(found.group(1)))
        return sum(sum(b.values()) for b in bypassed) + sum(r["queue"]["undelivered"] for r in self.all_stats())

    def records(self, event: str) -> int:
        return sum(1 for r in map(json.loads, self.events.read_text().splitlines()) if r["event"] == event)

    def stats(self) -> dict:  # type: ignore[type-arg]
        for line in reversed(self.events.read_text().splitlines()):
            rec = json.loads(line)
            if rec["event"] == "stats":
                return rec
        raise RuntimeError("no stats record")


def profile_table(raw: Path, top: int = 16) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) from py-spy's collapsed stacks, by self time."""
    import re

    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [re.sub(r" \((?:.*/)?([^/]+?):\d+\)$", r" (\1)", f) for f in stack.split(";")]
        total += int(n)
        own[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    if not total:
        return []
    return [(f, 100.0 * c / total, 100.0 * incl[f] / total) for f, c in own.most_common(top)]


def _null_queue(args: argparse.Namespace) -> int:
    """The adapter with a core that accepts everything: the floor of NFQUEUE and our queue reader."""
    import asyncio

    from mproxy.config import parse_config
    from mproxy.core.gateway import Decision, Verdict
    from mproxy.io.netfilter import Rules
    from mproxy.io.nfqueue import QueueAdapter

    accept = Decision(Verdict.ACCEPT)
    qa = QueueAdapter(7, lambda data, ts, csum_ready, iface: accept)
    qa.open()
    rules = Rules(parse_config("[queue]\nnum = 7\n"))
    rules.install()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        qa.attach(loop)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("READY", flush=True)
        await stop.wait()
        qa.detach(loop)

    try:
        import uvloop

        uvloop.run(serve())
    finally:
        rules.remove()
        qa.close()
    print(json.dumps({"packets": qa.stats.packets, "latency": qa.latency.summary()}), flush=True)
    return 0


def flood(lab, work: Path, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    """The ``--flood`` table: kernel forwarding, compiled content scan, binding's Python handler."""
    def best() -> Bulk:
        return max((bulk(lab, True, args.seconds, port=FLOOD_PORT, unit=args.flood) for _ in range(args.repeat)),
                   key=lambda b: b.mbit)

    rows: list[tuple[str, Bulk, dict | None, int]] = [("kernel forwarding", best(), None, 0)]  # type: ignore[type-arg]
    for tag, label, env in (("flood-c", "mproxy, content scan compiled", {}),
                            ("flood-py", "mproxy, MPROXY_NO_ACCEL=1 (binding, Python handler)", {"MPROXY_NO_ACCEL": "1"})):
        with Mproxy(lab, work, tag, env=env) as mp:
            res = best()
        rows.append((label, res, mp.stats(), mp.missed()))
    print(f"\n## flood of {args.flood!r} to port {FLOOD_PORT} (shipped rules apply), MPTCP, "
          f"{args.seconds:g} s, best of {args.repeat}\n")
    print("| gateway | Mbit/s | inspected MB (c2s) | inspector chunks | packets queued | passed uninspected |")
    print("|---|---|---|---|---|---|")
    for label, b, st, lost in rows:
        if st is None:
            print(f"| {label} | {b.mbit:,.0f} | | | | |")
            continue
        ins = st["reactions"]["inspector"] or {}
        print(f"| {label} | {b.mbit:,.0f} | {ins.get('bytes', {}).get('c2s', 0) / 1e6:,.0f} | "
              f"{ins.get('chunks', 0):,} | {st['queue']['packets']:,} | {lost:,} |")
    print(f"\n(logs, configs: {work})")
    return 0


def rate(lab, work: Path, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    """Short MPTCP connections per second: kernel forwarding, then mproxy with one worker and with
    ``--workers``. Each mproxy run must have written one ``mptcp_connection`` record per connection."""

    def once() -> dict:  # type: ignore[type-arg]
        srv = _py(lab, lab.ns_srv, "_serve_rate", "--port", str(RATE_PORT), "--conns", str(args.conns),
                  stdout=subprocess.PIPE)
        _ready(srv)
        cli = _py(lab, lab.ns_cli, "_send_rate", "--connect", lab.server_addr[4], "--port", str(RATE_PORT),
                  "--seconds", str(args.seconds), "--conns", str(args.conns), stdout=subprocess.PIPE)
        out, _ = cli.communicate(timeout=args.seconds + 120)
        time.sleep(0.5)  # the last connections' final ACKs
        srv.send_signal(signal.SIGTERM)
        sout, _ = srv.communicate(timeout=30)
        res: dict = json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[type-arg]
        res.update(json.loads(sout.decode().strip().splitlines()[-1]))
        return res

    def best() -> dict:  # type: ignore[type-arg]
        return max((once() for _ in range(args.repeat)), key=lambda r: r["conns"] / r["seconds"])

    rows: list[tuple[str, dict, int | None, int | None]] = [("kernel forwarding", best(), None, None)]  # type: ignore[type-arg]
    for n in sorted({1, args.workers or 1}):
        with Mproxy(lab, work, f"rate-w{n}", args.profile and n == 1, workers=n) as mp:
            runs = [once() for _ in range(args.repeat)]
        # every run's connections are in the one event log (written as they close, the rest at stop)
        total = sum(r["served"] for r in runs)
        res = max(runs, key=lambda r: r["conns"] / r["seconds"])
        rows.append((f"mproxy run, {n} worker{'s' if n > 1 else ''}", res,
                     mp.records("mptcp_connection") - total, mp.missed()))
    base = rows[0][1]["conns"] / rows[0][1]["seconds"]
    print(f"\n## inline connection rate\n\n{args.conns} client threads, {args.seconds:g} s, best of {args.repeat}; "
          f"each connection: MPTCP handshake (+ a join to the second path), {len(RATE_REQUEST)} B request, "
          f"{len(RATE_RESPONSE)} B response, close.\n")
    print("| gateway | connections/s | of kernel forwarding | failed | MPTCP at the server | records - connections "
          "| passed uninspected |")
    print("|---|---|---|---|---|---|---|")
    for label, r, extra, missed in rows:
        cps = r["conns"] / r["seconds"]
        print(f"| {label} | {cps:,.0f} | {100 * cps / base:.1f} % | {r['failed']} | {r['mptcp']:,} of {r['served']:,} "
              f"| {'' if extra is None else f'{extra:+d}'} | {'' if missed is None else f'{missed:,}'} |")
    prof = work / "rate-w1.pyspy.txt"
    if args.profile and prof.exists():
        print("\nprofile of mproxy (one worker) during the connection-rate run (py-spy, self time):\n")
        print("| function | self % | inclusive % |")
        print("|---|---|---|")
        for fn, own, inc in profile_table(prof, 30):
            print(f"| `{fn}` | {own:.1f} | {inc:.1f} |")
    print(f"\n(logs, configs: {work}; mproxy from {MPROXY_ROOT})")
    return 0


def _pct(xs: list[int], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] / 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    for name in ("_serve_bulk", "_send_bulk", "_serve_ping", "_send_ping", "_null_queue", "_serve_rate",
                 "_send_rate"):
        sp = sub.add_parser(name)
        sp.add_argument("--port", type=int, default=PORT)
        sp.add_argument("--connect", default="")
        sp.add_argument("--seconds", type=float, default=5)
        sp.add_argument("--count", type=int, default=2000)
        sp.add_argument("--mptcp", action="store_true")
        sp.add_argument("--conns", type=int, default=1)
        sp.add_argument("--unit", default="")
    ap.add_argument("--seconds", type=float, default=5.0, help="per bulk transfer")
    ap.add_argument("--repeat", type=int, default=2, help="bulk transfers per mode (best is reported)")
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="py-spy the MPTCP bulk run")
    ap.add_argument("--workers", type=int, default=2,
                    help="also run --conns parallel MPTCP transfers through 1 and through this many workers "
                         "(0: skip)")
    ap.add_argument("--conns", type=int, default=4, help="parallel connections for the workers comparison")
    ap.add_argument("--keep", help="directory for configs, logs and profiles (default: temp)")
    ap.add_argument("--flood", metavar="UNIT", help='only the flood comparison: UNIT repeated to port 80 (e.g. "or ")')
    ap.add_argument("--rate", action="store_true",
                    help="only the connection rate: short MPTCP connections from --conns threads for --seconds")
    ap.add_argument("--mproxy-root", type=Path, default=ROOT, help="the checkout whose mproxy runs (default: this one)")
    args = ap.parse_args(argv)
    if args.cmd:
        return {"_serve_bulk": _serve_bulk, "_send_bulk": _send_bulk, "_serve_ping": _serve_ping,
                "_send_ping": _send_ping, "_null_queue": _null_queue, "_serve_rate": _serve_rate,
                "_send_rate": _send_rate}[args.cmd](args)
    global MPROXY_ROOT
    MPROXY_ROOT = args.mproxy_root.resolve()

    from mproxy.lab.topology import Lab, lab_available

    why = lab_available()
    if why:
        print(f"lab unavailable: {why}", file=sys.stderr)
        return 2
    work = Path(args.keep or tempfile.mkdtemp(prefix="mproxy-inline-"))
    work.mkdir(parents=True, exist_ok=True)
    with Lab(rate=None) as lab:
        lab.run(lab.ns_gw, "ip", "link", "add", "sink0", "type", "veth", "peer", "name", "sink1")
        for i in ("sink0", "sink1"):
            lab.run(lab.ns_gw, "sysctl", "-qw", f"net.ipv6.conf.{i}.disable_ipv6=1")
            lab.run(lab.ns_gw, "ip", "link", "set", i, "mtu", "1600", "up")
        if args.flood:
            return flood(lab, work, args)
        if args.rate:
            return rate(lab, work, args)

        def best(mptcp: bool, conns: int = 1) -> Bulk:
            runs = [bulk(lab, mptcp, args.seconds, conns) for _ in range(args.repeat)]
            return max(runs, key=lambda b: b.mbit)

        k_mptcp, k_tcp = best(True), best(False)
        k_rtt = ping(lab, args.pings)
        with Mproxy(lab, work, "bulk-mptcp", args.profile) as mp:
            m_mptcp = best(True)
        s_bulk = mp.stats()
        mp_bulk_missed = mp.missed()
        with Mproxy(lab, work, "bulk-tcp") as mp:
            m_tcp = best(False)
        s_tcp = mp.stats()
        with Mproxy(lab, work, "ping") as mp:
            m_rtt = ping(lab, args.pings)
        s_ping = mp.stats()
        null = _py(lab, lab.ns_gw, "_null_queue", stdout=subprocess.PIPE)
        _ready(null)
        n_mptcp = best(True)
        null.send_signal(signal.SIGTERM)
        null_out, _ = null.communicate(timeout=30)
        null_stats = json.loads(null_out.decode().strip().splitlines()[-1])
        missed = {"MPTCP bulk": mp_bulk_missed}
        multi: list[tuple[str, Bulk, int, int]] = []  # (label, result, packets queued, passed uninspected)
        if args.workers:
            multi.append(("kernel forwarding", best(True, args.conns), 0, 0))
            for n in sorted({1, args.workers}):
                with Mproxy(lab, work, f"multi-w{n}", workers=n) as mp:
                    res = best(True, args.conns)
                queued = sum(r["queue"]["packets"] for r in mp.all_stats())
                multi.append((f"mproxy, {n} worker{'s' if n > 1 else ''}", res, queued, mp.missed()))

    def tp(k: Bulk, m: Bulk) -> str:
        return f"{k.mbit:,.0f} | {m.mbit:,.0f} | {100 * m.mbit / k.mbit:.1f} %"

    print("\n## inline results\n")
    print(f"{args.seconds:g} s bulk client->server, best of {args.repeat}; Mbit/s of application payload.\n")
    print("| transfer | kernel forwarding Mbit/s | through mproxy Mbit/s | ratio | target |")
    print("|---|---|---|---|---|")
    target_m = min(0.5 * k_mptcp.mbit, 1000.0)
    print(f"| MPTCP (2 paths), inspect | {tp(k_mptcp, m_mptcp)} | ≥ {target_m:,.0f} Mbit/s "
          f"({'met' if m_mptcp.mbit >= target_m else 'MISSED'}) |")
    print(f"| plain TCP | {tp(k_tcp, m_tcp)} | ≥ 95 % "
          f"({'met' if m_tcp.mbit >= 0.95 * k_tcp.mbit else 'MISSED'}) |")
    print(f"| MPTCP, queue with a no-op core (NFQUEUE + queue reader floor) | {tp(k_mptcp, n_mptcp)} | "
          f"(reference) |")
    q = s_bulk["queue"]
    print(f"\nMPTCP run through mproxy: {q['packets']:,} packets queued, {q['wakeups']:,} reader wake-ups, "
          f"{q['full_batches']} full batches, truncated {q['truncated']}, core errors {q['core_errors']}; "
          f"kernel queue {s_bulk['kernel_queue']}; passed uninspected (bypassed the queue or never handed "
          f"over) {missed['MPTCP bulk']:,}; plain-TCP run queued {s_tcp['queue']['packets']} packets.")
    print("\n| latency (µs) | p50 | p90 | p99 | max |")
    print("|---|---|---|---|---|")
    print(f"| RTT 64 B over MPTCP, kernel forwarding | {_pct(k_rtt, .5):.0f} | {_pct(k_rtt, .9):.0f} | "
          f"{_pct(k_rtt, .99):.0f} | {max(k_rtt) / 1000:.0f} |")
    print(f"| RTT 64 B over MPTCP, through mproxy | {_pct(m_rtt, .5):.0f} | {_pct(m_rtt, .9):.0f} | "
          f"{_pct(m_rtt, .99):.0f} | {max(m_rtt) / 1000:.0f} |")
    added = [(_pct(m_rtt, p) - _pct(k_rtt, p)) / 2 for p in (.5, .9, .99)]
    print(f"| added per queued packet (half the RTT difference) | {added[0]:.0f} | {added[1]:.0f} | "
          f"{added[2]:.0f} | |")
    nl = null_stats["latency"]
    print(f"| no-op core, MPTCP bulk: callback entry -> verdict | {nl['p50']} | {nl['p90']} | {nl['p99']} | "
          f"{nl['max']} |")
    for label, s in (("ping run", s_ping), ("MPTCP bulk run", s_bulk)):
        for key, what in (("verdict_latency_us", "callback entry -> verdict"),
                          ("wait_latency_us", "socket readable -> verdict")):
            lat = s[key]
            print(f"| in mproxy, {label}: {what} | {lat['p50']} | {lat['p90']} | {lat['p99']} | {lat['max']} |")
    if multi:
        base = multi[0][1].mbit
        print(f"\n{args.conns} parallel MPTCP transfers (2 paths each), inspect, sink interface:\n")
        print("| gateway | Mbit/s (all connections) | of kernel forwarding | packets queued | passed uninspected |")
        print("|---|---|---|---|---|")
        for label, b, queued, lost in multi:
            print(f"| {label} | {b.mbit:,.0f} | {100 * b.mbit / base:.1f} % | {queued:,} | {lost:,} |")
    if args.profile:
        prof = work / "bulk-mptcp.pyspy.txt"
        if prof.exists():
            print("\nprofile of mproxy during the MPTCP bulk run (py-spy, self time):\n")
            print("| function | self % | inclusive % |")
            print("|---|---|---|")
            for fn, own, inc in profile_table(prof):
                print(f"| `{fn}` | {own:.1f} | {inc:.1f} |")
    print(f"\n(logs, configs{', profile' if args.profile else ''}: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
