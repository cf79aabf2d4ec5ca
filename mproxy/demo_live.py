"""``make demo``: mproxy inline on a live namespace lab stops an attack split across two MPTCP paths.

Builds three network namespaces (client with two paths, gateway, server),
starts ``mproxy run`` on the gateway with the embedded inspector, sends a
benign HTTP exchange over both paths and then a request whose SQL injection
is split across the two paths (``...UNION+SELE`` on path 0, ``CT+password``
on path 1), and shows what happened: the subflows grouped into one
connection, the stream mproxy rebuilt, the signature hit, the MP_FASTCLOSE
each end received on every path, what the server application got, and the
Prometheus counters. Everything is torn down afterwards, also on Ctrl-C.

Needs root (namespaces, iptables, NFQUEUE). Only 198.18.0.0/15 and
2001:db8::/32 inside the lab's own namespaces are used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from .lab import http_attack as ha
from .lab.gateway import start_mproxy, stop_mproxy

QUEUE = 7
METRICS = "127.0.0.1:9464"
_REPO = Path(__file__).resolve().parents[1]
_BOLD, _RED, _GREEN, _DIM, _OFF = ("\033[1m", "\033[31m", "\033[32m", "\033[2m", "\033[0m") \
    if sys.stdout.isatty() else ("",) * 5


def say(text: str = "") -> None:
    print(text, flush=True)


def head(text: str) -> None:
    say(f"\n{_BOLD}== {text}{_OFF}")


def _show(data: bytes, limit: int = 200) -> str:
    out = []
    for b in data[:limit]:
        out.append("\\r" if b == 13 else "\\n" if b == 10 else chr(b) if 32 <= b < 127 else ".")
    return "".join(out) + ("..." if len(data) > limit else "")


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _ignore_signals(*_exc: object) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _restore_signals(sigint: Any, sigterm: Any) -> None:
    signal.signal(signal.SIGINT, sigint)
    signal.signal(signal.SIGTERM, sigterm)


@contextmanager
def _mproxy(lab: Any, d: Path) -> Iterator[Any]:
    cfg = d / "mproxy.toml"
    cfg.write_text(f"""
[queue]
num = {QUEUE}
[inspector]
mode = "on"
rules = "{_REPO / 'config' / 'mproxy.rules'}"
[actions]
on_match = "fastclose"
[sink]
pcap = "{d / 'emitted'}"
[log]
events = "{d / 'events.jsonl'}"
[metrics]
listen = "{METRICS}"
""")
    # its own session: Ctrl-C reaches the demo, which stops mproxy itself
    proc = start_mproxy(lab, cfg, d / "mproxy.err", start_new_session=True)
    try:
        yield proc
    finally:
        stop_mproxy(proc, 20)


def _records(d: Path) -> list[dict[str, Any]]:
    p = d / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def _wait_record(d: Path, pred: Any, timeout: float = 5.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in _records(d):
            if pred(r):
                return r
        time.sleep(0.1)
    return None


def _scrape(lab: Any) -> list[tuple[str, str]]:
    code = (f"import urllib.request as u; print(u.urlopen('http://{METRICS}/metrics', timeout=5).read().decode())")
    text = lab.run(lab.ns_gw, sys.executable, "-c", code, check=False).stdout
    out = []
    for line in text.splitlines():
        if line.startswith("mproxy_") and not line.startswith(("mproxy_build", "mproxy_verdict_latency")):
            name, _, value = line.rpartition(" ")
            try:
                if float(value) != 0:
                    out.append((name, value))
            except ValueError:
                continue
    return out


def _resets(pcap: Path) -> list[tuple[str, int, str, int, bool]]:
    """RSTs in a capture: 4-tuple and whether they carried MP_FASTCLOSE (our own parser)."""
    from .io.pcap import read_captures
    from .wire import mptcp as m
    from .wire.packet import RST, TcpSegment, mptcp_spans, parse_frame

    out = []
    for fr in read_captures([str(pcap)]):
        s = parse_frame(fr.linktype, fr.data, fr.ts)
        if not isinstance(s, TcpSegment) or not s.flags & RST:
            continue
        spans = mptcp_spans(s)
        fc = False
        if isinstance(spans, list):  # a WireError: options unreadable, so no MP_FASTCLOSE we could show
            fc = any(isinstance(m.decode(s.ip[o : o + n], s.flags), m.MpFastclose) for o, n in spans)
        out.append((s.src_text, s.sport, s.dst_text, s.dport, fc))
    return out


def _emitted(d: Path) -> dict[tuple[str, int, str, int], bytes]:
    from .io.pcap import read_captures
    from .wire.packet import TcpSegment, parse_frame

    flows: dict[tuple[str, int, str, int], bytearray] = {}
    pcaps = sorted(str(p) for p in d.glob("emitted.*.pcap"))
    if not pcaps:
        return {}
    for fr in read_captures(pcaps):
        s = parse_frame(fr.linktype, fr.data, fr.ts)
        if isinstance(s, TcpSegment) and s.payload_len:
            flows.setdefault((s.src_text, s.sport, s.dst_text, s.dport), bytearray()).extend(s.payload)
    return {k: bytes(v) for k, v in flows.items()}


def _live(stack: ExitStack, workdir: Path, d: Path) -> bool:
    """The part that needs the lab; everything it starts is registered on ``stack``."""
    from .lab.topology import Lab

    head("building the lab: client (2 paths) -- gateway (mproxy) -- server")
    lab = stack.enter_context(Lab(rate=None, gso=False))
    say(f"   namespaces {lab.ns_cli}, {lab.ns_gw}, {lab.ns_srv}")
    say(f"   client paths {lab.client_addr[0][4]} and {lab.client_addr[1][4]}, server {lab.server_addr[4]}:80")
    ha.prepare_steering(lab)
    stack.enter_context(_mproxy(lab, d))
    say(f"   mproxy run on the gateway: NFQUEUE {QUEUE}, embedded inspector with "
        f"{_REPO / 'config' / 'mproxy.rules'}, metrics http://{METRICS}/metrics (gateway namespace)")
    server = ha.Server(lab, workdir / "http", 80)
    stack.callback(server.stop)

    head("benign traffic: two requests, one per path")
    c = ha.Client(lab, server, 4)
    ha.steer(lab, 0)
    first_line = _show(ha.BENIGN.split(b"\r\n")[0])
    c.send(ha.BENIGN)
    say(f"   path 0: {first_line}  ->  {c.response()['status']}")
    ha.wait_subflows(lab, 80, 2)
    ha.steer(lab, 1)
    time.sleep(0.2)
    c.send(ha.BENIGN)
    say(f"   path 1: {first_line}  ->  {c.response()['status']}")
    c.cmd("close")
    c.close()
    rec = _wait_record(d, lambda r: r.get("event") == "mptcp_connection")
    if rec:
        say(f"   mproxy grouped {len(rec['subflows'])} subflows into MPTCP connection "
            f"{rec.get('conn_id', rec.get('id'))}: "
            + ", ".join(f"{sf['src']}:{sf['sport']} ({sf['role']})" for sf in rec["subflows"]))
        say(f"   rebuilt {rec['c2s']['bytes']} bytes client->server, {rec['s2c']['bytes']} server->client; "
            f"ended {rec['outcome']}; no signature hit")

    head("attack: SQL injection split across the two paths")
    say(f"   path 0 carries: {_show(ha.ATTACK_PART1)}")
    say(f"   path 1 carries: {_show(ha.ATTACK_PART2[:40])}")
    say("   a per-subflow IDS sees neither half contain UNION+SELECT")
    with lab.capture(workdir / "client.pcap", ns=lab.ns_cli), lab.capture(workdir / "server.pcap",
                                                                          ns=lab.ns_srv):
        a = ha.Client(lab, server, 4)
        res = ha.split_attack(lab, a, 80)
        try:
            send = server.wait_for(lambda e: e.get("ev") == "end" and e.get("conn") == a.conn, 5)
        except ha.ExchangeError:
            send = {"how": "still open"}
        a.close()
    act = _wait_record(d, lambda r: r.get("event") == "action" and r.get("action") == "fastclose")
    conn = _wait_record(d, lambda r: r.get("event") == "mptcp_connection" and r.get("outcome") == "fastclose")
    if act:
        say(f"   {_RED}signature hit{_OFF} on the rebuilt stream: {act['reason']}")
        drop = act.get("dropped", {})
        say(f"   the packet completing it ({drop.get('src')}:{drop.get('sport')} -> {drop.get('dst')}:"
            f"{drop.get('dport')}, {drop.get('len')} bytes) was dropped")
        say(f"   fast-closed ({act['mode']}): " + "; ".join(
            f"{sf['src']}:{sf['sport']} <-> {sf['dst']}:{sf['dport']}" for sf in act["subflows"]))
    else:
        say(f"   {_RED}no fastclose action was recorded{_OFF}")
    if conn:
        say(f"   subflows of the connection: {len(conn['subflows'])}; outcome {conn['outcome']}")
    got = server.received(a.conn)
    verdict = f"{_GREEN}never received UNION+SELECT{_OFF}" if ha.NEEDLE not in got else \
        f"{_RED}RECEIVED THE ATTACK{_OFF}"
    last = got[got.rfind(b"GET /search"):] if b"GET /search" in got else got
    say(f"   the server application received: {_show(last)} -> {verdict}")
    t0 = res["part2_sent"]
    ce = res["client"]
    say(f"   client socket: {ce.get('how')} after {1000 * (ce.get('t', t0) - t0):.0f} ms; "
        f"server socket: {send.get('how')} after {1000 * (send.get('t', t0) - t0):.0f} ms")
    for who, pcap in (("client", workdir / "client.pcap"), ("server", workdir / "server.pcap")):
        rs = _resets(pcap) if pcap.exists() else []
        ours = [r for r in rs if r[4]]
        say(f"   {who} received {len(ours)} RST+MP_FASTCLOSE: "
            + ", ".join(f"{r[0]}:{r[1]}->{r[2]}:{r[3]}" for r in ours))

    head("metrics (scraped from the gateway's /metrics)")
    for name, value in _scrape(lab):
        if any(k in name for k in ("fastclose", "actions", "verdicts", "connections", "subflows_joined",
                                    "rebuilt_bytes", "inspector", "match", "packets_total")):
            say(f"   {name} {value}")

    head("stopping mproxy, tearing the lab down")
    return bool(act) and ha.NEEDLE not in got


def demo(workdir: Path) -> int:
    t_start = time.monotonic()
    d = workdir / "mproxy"
    d.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        stack.callback(_restore_signals, signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
        try:
            ok = _live(stack, workdir, d)
        finally:
            _ignore_signals()  # teardown (mproxy stop, namespaces deleted) must not be cut short by Ctrl-C
    # the ExitStack stopped mproxy (its rules go) and deleted the namespaces
    emitted = _emitted(d)
    head("what the IDS sink received (rebuilt, one plain TCP conversation per MPTCP connection)")
    for (s, sp, dd, dp), data in emitted.items():
        if dp == 80:
            mark = f"{_RED}contains{_OFF}" if ha.NEEDLE in data else "does not contain"
            say(f"   {s}:{sp} -> {dd}:{dp}  {len(data)} bytes, {mark} UNION+SELECT")
            say(f"      {_DIM}{_show(data, 240)}{_OFF}")
    say(f"\n   done in {time.monotonic() - t_start:.1f} s; event log and captures in {workdir}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mproxy.demo_live", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", metavar="DIR", help="keep the event log, captures and emitted pcap here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("mproxy demo: needs root (network namespaces, iptables, NFQUEUE). Run `sudo make demo`, "
              "or `make replay-demo` for the offline demo on a shipped capture.", file=sys.stderr)
        return 2
    from .lab.topology import lab_available

    why = lab_available()
    if why:
        print(f"mproxy demo: the namespace lab cannot run here: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C tears the lab down even when started where SIGINT is inherited as ignored (a
    # background job of a script): Python then keeps it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mproxy-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return demo(workdir)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup already ran (ExitStack); stay quiet
        print("\nmproxy demo: interrupted; lab torn down", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - say what failed; the lab is already torn down
        print(f"\nmproxy demo: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
