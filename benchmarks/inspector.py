"""The embedded inspector's per-connection costs as the rule set grows, and its throughput.

What the gateway pays for the inspector beyond scanning bytes: setting up a new
connection direction (which rules apply to its addresses and ports), and a rules
reload (SIGHUP) with many connections open: the switch itself, then each
carried direction's first bytes under the new rules. Then the bytes per second
one direction is inspected at with the shipped rules (config/mproxy.rules), on
HTTP requests and on random bytes, in MSS-sized and 64 KiB (GSO) chunks, and on
floods of one rule content; each with the compiled content scan and with the
binding's Python match handler, in the same run.

    .venv/bin/python benchmarks/inspector.py [--rules 50,500,5000] [--connections 10000] [--mbytes 4]
                                             [--startup 5000]

--startup N: the gateway's start-up with N rules (configuration, rules file,
Service with its inspector), the file parsed once (load_with_rules, as `mproxy
run` does) next to parsed twice (load, then Service: as it did before).

Rules are synthetic: one content each (6-14 random letters, nocase), every
fifth with a pcre, spread over ten different port headers (rule sets have a few
dozen distinct headers for thousands of rules).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mproxy.core.events import Direction  # noqa: E402
from mproxy.core.inspector import Inspector  # noqa: E402
from mproxy.core.rules import RuleSet, parse_rules  # noqa: E402

PORTS = ["80", "443", "[80,81,8000:8100]", "any", "[80,8080]", "1024:", "21", "25", "53", "445"]
SERVER = (bytes((198, 18, 10, 2)), 80)
REQUEST = b"GET /index.html HTTP/1.1\r\nHost: shop.example\r\n\r\n"
# the two ways the inspector's content matches reach it, both timed by the throughput and floods tables
_SCANS = ("Mbit/s: the compiled content scan where it is built (mproxy/_hsscan.c: matches filed in C), "
          "Python handler: the hyperscan binding calling Python per match (MPROXY_NO_ACCEL=1)")


def ruleset(n: int) -> RuleSet:
    return parse_rules(rule_lines(n))


def rule_lines(n: int) -> str:
    rnd = random.Random(1)
    lines = []
    for i in range(n):
        w = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(6, 14)))
        pcre = f' pcre:"/{w}[0-9]+x/i";' if i % 5 == 0 else ""
        lines.append(f'alert tcp any any -> any {PORTS[i % len(PORTS)]} (msg:"r{i}"; content:"{w}"; nocase;{pcre} '
                     f'sid:{i + 1};)')
    return "\n".join(lines) + "\n"


def client(c: int) -> tuple[bytes, int]:
    return ipaddress.ip_address(0xC6120000 + c).packed, 40000 + c % 20000


def feed_all(ins: Inspector, n: int, data: bytes) -> float:
    """Seconds to feed one chunk to the client->server direction of connections 0..n-1."""
    t = time.perf_counter()
    for c in range(n):
        ins.feed(c, Direction.C2S, data, client(c), SERVER)
    return time.perf_counter() - t


def throughput(mbytes: int) -> None:
    from mproxy.core.rules import load_rules

    rs = load_rules(Path(__file__).resolve().parents[1] / "config" / "mproxy.rules")
    req = b"GET /search?q=hello+world&page=2 HTTP/1.1\r\nHost: example\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n"
    size = mbytes << 20
    streams = {"HTTP requests": (req * (size // len(req) + 1))[:size], "random bytes": random.Random(2).randbytes(size)}
    print(f"\nshipped rules ({len(rs)}), one direction, {mbytes} MiB, best of 3; {_SCANS}:\n")
    print("| stream | chunk bytes | Mbit/s | Mbit/s, Python handler | pcre runs |")
    print("|---|---|---|---|---|")
    for name, data in streams.items():
        for chunk in (1448, 65536):
            best, runs = one_direction(rs, data, chunk)
            pure, _runs = one_direction(rs, data, chunk, pure=True)
            print(f"| {name} | {chunk} | {len(data) * 8 / best / 1e6:,.0f} | {len(data) * 8 / pure / 1e6:,.0f} "
                  f"| {runs} |")
    floods(rs, size)



def one_direction(rs: RuleSet, data: bytes, chunk: int, reps: int = 3, pure: bool = False) -> tuple[float, int]:
    """Best of ``reps``: seconds to feed ``data`` in ``chunk``-byte pieces to a new inspector (its
    Hyperscan compile not timed), and the pcre searches it ran. ``pure``: the inspector built with
    ``MPROXY_NO_ACCEL`` set (the binding's Python match handler, the reference)."""
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    best, runs = float("inf"), 0
    for _ in range(reps):
        ins = _inspector(rs, pure)
        t = time.perf_counter()
        for piece in pieces:
            ins.feed(1, Direction.C2S, piece, client(1), SERVER)
        best = min(best, time.perf_counter() - t)
        runs = ins.stats.pcre_runs
    return best, runs


def _inspector(rs: RuleSet, pure: bool) -> Inspector:
    if not pure:
        return Inspector(rs)
    saved = os.environ.get("MPROXY_NO_ACCEL")
    os.environ["MPROXY_NO_ACCEL"] = "1"
    try:
        return Inspector(rs)
    finally:
        if saved is None:
            del os.environ["MPROXY_NO_ACCEL"]
        else:
            os.environ["MPROXY_NO_ACCEL"] = saved


def floods(rs: RuleSet, size: int) -> None:
    """One content repeated over the whole stream (a flood meant to slow the inspector down): of a
    rule with that content alone ("../../", "<script": one report per scan), and of contents pcre
    rules need ("union ", "or ": a report per match)."""
    print(f"\nfloods of one content, shipped rules, one direction, {size >> 20} MiB, best of 3:\n")
    print("| content repeated | chunk bytes | Mbit/s | Mbit/s, Python handler |")
    print("|---|---|---|---|")
    for unit in (b"../../", b"<script", b"union ", b"or "):
        data = unit * (size // len(unit))
        for chunk in (1448, 65536):
            best, _runs = one_direction(rs, data, chunk)
            pure, _runs = one_direction(rs, data, chunk, pure=True)
            print(f"| `{unit.decode()}` | {chunk} | {len(data) * 8 / best / 1e6:,.0f} | {len(data) * 8 / pure / 1e6:,.0f} |")


def startup(n: int, reps: int = 5) -> None:
    """Best of ``reps``: seconds to build the gateway's Service from a config naming ``n`` rules."""
    import tempfile

    from mproxy.service import Service, load, load_with_rules

    def twice(path: str) -> Service:
        return Service(load(path), path)

    def once(path: str) -> Service:
        cfg, rs = load_with_rules(path)
        return Service(cfg, path, rs)

    with tempfile.TemporaryDirectory() as d:
        rules, cfg = Path(d) / "bench.rules", Path(d) / "mproxy.toml"
        rules.write_text(rule_lines(n))
        cfg.write_text(f'[inspector]\nmode = "on"\nrules = "{rules}"\n[actions]\non_match = "log"\n'
                       'on_alert = "log"\n')
        print(f"\n| start-up, {n:,} rules | s (best of {reps}) |\n|---|---|")
        for name, build in (("rules parsed twice (load, then Service)", twice),
                            ("rules parsed once (load_with_rules)", once)):
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                build(str(cfg))
                best = min(best, time.perf_counter() - t)
            print(f"| {name} | {best:.3f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", default="50,500,5000", help="rule set sizes, comma-separated")
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--mbytes", type=int, default=4, help="stream size of the throughput part (0: skip it)")
    ap.add_argument("--startup", type=int, default=0, metavar="N", help="also time start-up with N rules")
    a = ap.parse_args()
    n = a.connections
    print(f"python {sys.version.split()[0]}; {n:,} connections; one {len(REQUEST)}-byte chunk per direction\n")
    print("| rules | header groups | compile s | new direction µs | next chunk µs | reload switch ms "
          "| first chunk after reload µs |")
    print("|---|---|---|---|---|---|---|")
    for size in (int(x) for x in a.rules.split(",")):
        rs = ruleset(size)
        t = time.perf_counter()
        ins = Inspector(rs)
        compile_s = time.perf_counter() - t
        new_dir = feed_all(ins, n, REQUEST) / n
        again = feed_all(ins, n, REQUEST) / n
        fresh = Inspector(rs)
        t = time.perf_counter()
        fresh.adopt(ins)
        switch = time.perf_counter() - t
        after = feed_all(fresh, n, REQUEST) / n
        print(f"| {size:,} | {len(fresh._heads)} | {compile_s:.3f} | {new_dir * 1e6:.1f} | {again * 1e6:.1f} "
              f"| {switch * 1e3:.2f} | {after * 1e6:.1f} |")
    if a.mbytes:
        throughput(a.mbytes)
    if a.startup:
        startup(a.startup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
