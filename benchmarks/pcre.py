"""What bounding pcre costs: the `regex` engine (with a timeout) next to Python `re`, per chunk.

Rule pcres run on the `regex` module since it takes a ``timeout`` (Python ``re``
cannot be stopped; see mproxy/core/rules.py, class Pcre). This measures, in one
run:

1. each shipped pcre (config/mproxy.rules) searched over whole chunks of HTTP
   requests that keep it busy (1448 and 65536 bytes), by ``re`` and by ``regex``
   with the timeout the inspector passes: µs per chunk, best of N;
2. a stream on which the inspector really runs a pcre on every chunk (requests
   carrying the SQL-injection rule's contents), through ``Inspector.feed``;
3. a backtracking pcre, ``(?:a|a)+b`` on n ``a``s then ``c ab``: ``re``'s time
   for growing n (it doubles per ``a``; 30 is extrapolated, not waited for)
   next to the inspector's verdict time with the default 20 ms budget;
4. a packet of 1,400 ``a``s sent again and again on one connection direction (200 packets,
   an SQL-injection attack in the last one): what the packets cost the
   inspector with ``pcre_strikes`` 3 (the default: the rule is given up after
   three searches out of time) and 0 (never given up), and whether the attack
   was found.
5. the same bait on many connections: new connections arrive at a fixed rate,
   each sending three baited packets (so each is given up after its three
   strikes); the inspector works through them as they come, idle in between.
   With ``pcre_share`` 1 (no bound), 0.5 (the default) and 0.25: the share of
   the time the inspector was busy, how far behind the arrivals it ended
   (a worker that falls behind stalls its queue), and what became of an attack
   sent on a last connection.

    .venv/bin/python benchmarks/pcre.py [--reps 5] [--stream-only]

--stream-only runs part 2 alone, with nothing but ``Inspector`` and ``load_rules``,
so the same command can be run in a checkout from before the engine change.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mproxy.core.events import Direction  # noqa: E402
from mproxy.core.inspector import Inspector  # noqa: E402
from mproxy.core.rules import load_rules, parse_rules  # noqa: E402

RULES = Path(__file__).resolve().parents[1] / "config" / "mproxy.rules"
CLI, SRV = (bytes((198, 18, 1, 2)), 40000), (bytes((198, 18, 10, 2)), 80)
REQ = (b"GET /search?q=1%27+UNION+SELECT+name+FROM+t--&or=1 HTTP/1.1\r\nHost: shop.example\r\n"
       b"User-Agent: curl/8 ../etc <script> select from where or 1=1\r\nAccept: */*\r\n\r\n")


def best(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    b = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        b = min(b, time.perf_counter() - t)
    return b


def per_pattern(reps: int) -> None:
    rs = load_rules(RULES)
    print("| sid | pcre | chunk bytes | re µs | regex µs | regex / re |")
    print("|---|---|---|---|---|---|")
    tot = {1448: [0.0, 0.0], 65536: [0.0, 0.0]}
    for r in rs.rules:
        if r.pcre is None or r.pcre.stdlib is None:
            continue
        for size in (1448, 65536):
            chunk = (REQ * (size // len(REQ) + 1))[:size]
            std, eng = r.pcre.stdlib, r.pcre.regex
            t_re = best(lambda: list(std.finditer(chunk)), reps)  # noqa: B023
            t_rx = best(lambda: list(eng.finditer(chunk, timeout=0.02)), reps)  # noqa: B023
            tot[size][0] += t_re
            tot[size][1] += t_rx
            print(f"| {r.sid} | `{r.pcre.source[:40]}` | {size} | {t_re * 1e6:,.1f} | {t_rx * 1e6:,.1f} | "
                  f"{t_rx / t_re:.2f} |")
    for size, (a, b) in tot.items():
        print(f"| all | (sum) | {size} | {a * 1e6:,.1f} | {b * 1e6:,.1f} | {b / a:.2f} |")


def stream(reps: int, mbytes: int = 2) -> None:
    rs = load_rules(RULES)
    size = mbytes << 20
    data = (REQ * (size // len(REQ) + 1))[:size]
    print(f"\n| shipped rules, pcre on every chunk ({mbytes} MiB of requests) | chunk bytes | Mbit/s | pcre runs |")
    print("|---|---|---|---|")
    for chunk in (1448, 65536):
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        t, runs = float("inf"), 0
        for _ in range(reps):
            ins = Inspector(rs)  # (its Hyperscan compile is not timed)
            t0 = time.perf_counter()
            for n, piece in enumerate(pieces):  # a new connection every 64 KiB: rules fire once per direction
                ins.feed(n * chunk >> 16, Direction.C2S, piece, CLI, SRV)
            t = min(t, time.perf_counter() - t0)
            runs = ins.stats.pcre_runs
        print(f"| requests | {chunk} | {len(data) * 8 / t / 1e6:,.0f} | {runs} |")


def backtracking() -> None:
    rx = re.compile(rb"(?:a|a)+b")
    print("\n| n (a's) | Python re s | inspector verdict s (budget 20 ms) |")
    print("|---|---|---|")
    ins = Inspector(parse_rules('alert tcp any any -> any any (content:"GET"; pcre:"/(?:a|a)+b/"; sid:1;)'))
    last = 0.0
    for n in (16, 18, 20, 22, 30):
        data = b"GET /?" + b"a" * n + b"c ab"
        if n <= 22:
            t0 = time.perf_counter()
            rx.search(data)
            last = time.perf_counter() - t0
            t_re = f"{last:.3f}"
        else:
            t_re = f"~{last * 2 ** (n - 22):,.0f} (extrapolated: x2 per a)"
        t0 = time.perf_counter()
        found = ins.feed(n, Direction.C2S, data, CLI, SRV)
        t_ins = time.perf_counter() - t0
        what = type(found[0]).__name__ if found else "nothing"
        print(f"| {n} | {t_re} | {t_ins:.3f} ({what}) |")


def bait_every_packet(packets: int = 200) -> None:
    rs = parse_rules('alert tcp any any -> any any (msg:"evil"; content:"GET"; pcre:"/(?:a|a)+b/"; sid:1;)\n'
                     'alert tcp any any -> any any (msg:"sqli"; content:"UNION"; pcre:"/UNION\\s+SELECT/"; sid:2;)\n')
    # a packet of a's: wherever a search of it (or of the 1 KiB before it) begins, it begins in a run
    # of a's long enough to backtrack past any budget (a shorter bait, where a search can begin near
    # the run's end, lets the search reach "ab": a real match, and the rule fires and is done)
    bait = b"GET /?" + b"a" * 1400 + b"c ab\r\n"
    print(f"\n| {packets} packets, each carrying the bait (the last also an attack) | s | packets/s | pcre limits "
          "| attack found |")
    print("|---|---|---|---|---|")
    for strikes in (3, 0):
        ins = Inspector(rs, pcre_strikes=strikes)
        t0 = time.perf_counter()
        found = []
        for i in range(packets):
            found += ins.feed(1, Direction.C2S, bait + (b" UNION SELECT pw FROM users" if i == packets - 1 else b""),
                              CLI, SRV)
        t = time.perf_counter() - t0
        hit = any(m.sid == 2 and type(m).__name__ == "Match" for m in found)
        print(f"| pcre_strikes = {strikes} | {t:.2f} | {packets / t:,.0f} | {ins.stats.pcre_limits} | {hit} |")


def bait_many_connections(rate: int = 50, seconds: float = 3.0) -> None:
    rs = parse_rules('alert tcp any any -> any any (msg:"evil"; content:"GET"; pcre:"/(?:a|a)+b/"; sid:1;)\n'
                     'alert tcp any any -> any any (msg:"sqli"; content:"UNION"; pcre:"/UNION\\s+SELECT/"; sid:2;)\n'
                     'alert tcp any any -> any any (msg:"plain"; content:"/etc/passwd"; sid:3;)\n')
    bait = b"GET /?" + b"a" * 1400 + b"c ab\r\n"
    attack = b"GET /etc/passwd UNION SELECT pw FROM users"
    conns = int(rate * seconds)
    print(f"\n| {rate} new connections/s for {seconds:g} s, 3 baited packets each, then an attack | busy | "
          "behind the arrivals at the end, s | pcre limits (starved) | attack: pcre rule / content rule |")
    print("|---|---|---|---|---|")
    for share in (1.0, 0.5, 0.25):
        ins = Inspector(rs, pcre_share=share)
        busy = 0.0
        start = time.perf_counter()
        for c in range(conns):
            due = start + c / rate
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            t0 = time.perf_counter()
            for _ in range(3):
                ins.feed(c, Direction.C2S, bait, CLI, SRV)
            busy += time.perf_counter() - t0
        lag = time.perf_counter() - (start + (conns - 1) / rate)
        wall = time.perf_counter() - start
        found = ins.feed(conns, Direction.C2S, attack, CLI, SRV)
        what = {m.sid: ("starved" if getattr(m, "starved", False) else "limit") if type(m).__name__ == "PcreLimit"
                else "found" for m in found}
        st = ins.stats
        print(f"| pcre_share = {share:g} | {busy / wall:.0%} | {max(lag, 0.0):.2f} | {st.pcre_limits} "
              f"({st.pcre_starved}) | {what.get(2, 'missed')} / {what.get(3, 'missed')} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stream-only", action="store_true")
    a = ap.parse_args()
    if not a.stream_only:
        per_pattern(a.reps)
    stream(a.reps)
    if not a.stream_only:
        backtracking()
        bait_every_packet()
        bait_many_connections()
    return 0


if __name__ == "__main__":
    sys.exit(main())
