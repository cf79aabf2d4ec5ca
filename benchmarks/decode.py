"""Decode throughput: packets parsed/s and MPTCP options decoded/s, next to tshark in the same run.

Run: .venv/bin/python benchmarks/decode.py [PCAP ...] [--min-seconds 2] [--tshark-packets 150000]

Default input: the bigger of ../shared/captures/v0-*-4subflows.pcap (a real
MPTCP v0 session, Linux cooked capture), repeated in memory until a pass
takes at least ``--min-seconds``. Three numbers for mproxy:

* parse: ``parse_frame`` over every packet (link + IP + TCP header),
* options: ``mptcp_spans`` + ``decode`` of every MPTCP option of those packets,
* pass: both together, i.e. what ``mproxy decode`` does per packet minus
  output; plus ``end-to-end``: the same from the file through the pcap reader.

tshark does the comparable pass (full dissection, MPTCP subtype field) on a
temporary pcap holding the same packets repeated ``--tshark-packets`` times
over, so its start-up (reported separately) is a small share of the time;
its rate is given with and without start-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mproxy.io.pcap import PcapWriter, read_captures  # noqa: E402
from mproxy.wire.errors import WireError  # noqa: E402
from mproxy.wire.mptcp import decode  # noqa: E402
from mproxy.wire.packet import TcpSegment, mptcp_spans, parse_frame  # noqa: E402

CAPTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "captures"


def default_input() -> list[str]:
    cands = sorted(CAPTURES.glob("v0-*-4subflows.pcap"), key=lambda p: p.stat().st_size, reverse=True)
    if not cands:
        sys.exit(f"no capture given and none in {CAPTURES.resolve()}")
    return [str(cands[0])]


def load(paths: list[str]):
    return [(fr.linktype, fr.data, fr.ts) for fr in read_captures(paths)]


def bench_parse(frames, reps: int) -> float:
    pf = parse_frame
    t0 = time.perf_counter()
    for _ in range(reps):
        for lt, data, ts in frames:
            pf(lt, data, ts)
    return time.perf_counter() - t0


def bench_options(segs, reps: int) -> tuple[float, int]:
    """Decode every MPTCP option of already-parsed segments."""
    dec, spans_of = decode, mptcp_spans
    n = 0
    t0 = time.perf_counter()
    for _ in range(reps):
        for seg in segs:
            spans = spans_of(seg)
            if spans.__class__ is list:
                ip, fl = seg.ip, seg.flags
                for off, ln in spans:
                    dec(ip[off : off + ln], fl)
                    n += 1
    return time.perf_counter() - t0, n


def bench_pass(frames, reps: int) -> tuple[float, int]:
    """parse + option decode per packet, as ``mproxy decode`` does (without output)."""
    pf, dec, spans_of = parse_frame, decode, mptcp_spans
    n = 0
    t0 = time.perf_counter()
    for _ in range(reps):
        for lt, data, ts in frames:
            seg = pf(lt, data, ts)
            if seg.__class__ is not TcpSegment:
                continue
            spans = spans_of(seg)
            if spans.__class__ is list:
                ip, fl = seg.ip, seg.flags
                for off, ln in spans:
                    dec(ip[off : off + ln], fl)
                    n += 1
    return time.perf_counter() - t0, n


def bench_end_to_end(paths: list[str], reps: int) -> tuple[float, int]:
    n = 0
    t0 = time.perf_counter()
    for _ in range(reps):
        for fr in read_captures(paths):
            seg = parse_frame(fr.linktype, fr.data, fr.ts)
            if seg.__class__ is not TcpSegment:
                continue
            spans = mptcp_spans(seg)
            if spans.__class__ is list:
                for off, ln in spans:
                    decode(seg.ip[off : off + ln], seg.flags)
            n += 1
    return time.perf_counter() - t0, n


def reps_for(fn, frames, min_seconds: float) -> int:
    dt = max(fn(frames, 1) if fn is bench_parse else fn(frames, 1)[0], 1e-6)
    return max(1, int(min_seconds / dt) + 1)


def tshark_rate(frames, target_packets: int) -> tuple[float, float, float, int] | None:
    """(packets/s incl. start-up, packets/s excl. start-up, start-up s, packets) of a tshark pass."""
    exe = shutil.which("tshark")
    if exe is None:
        return None
    copies = max(1, target_packets // len(frames))
    linktypes = {lt for lt, _, _ in frames}
    if len(linktypes) != 1:
        return None
    (lt,) = linktypes
    with tempfile.TemporaryDirectory() as d:
        big = os.path.join(d, "big.pcap")
        one = os.path.join(d, "one.pcap")
        with open(big, "wb") as f:
            w = PcapWriter(f, linktype=lt)
            span = frames[-1][2] - frames[0][2] + 1.0
            for c in range(copies):
                for _, data, ts in frames:
                    w.write(ts + c * span, data)
        with open(one, "wb") as f:
            PcapWriter(f, linktype=lt).write(frames[0][2], frames[0][1])
        cmd = [exe, "-n", "-T", "fields", "-e", "frame.number", "-e", "tcp.options.mptcp.subtype", "-r"]

        def run(path: str) -> tuple[float, int]:
            t0 = time.perf_counter()
            out = subprocess.run(cmd + [path], capture_output=True, check=True).stdout
            return time.perf_counter() - t0, out.count(b"\n")

        startup = min(run(one)[0] for _ in range(3))
        dt, lines = run(big)
        n = len(frames) * copies
        assert lines == n, (lines, n)
        return n / dt, n / max(dt - startup, 1e-9), startup, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pcap", nargs="*", help="captures (merged); default: the bigger v0-*-4subflows.pcap")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="each timed pass runs at least this long")
    ap.add_argument("--tshark-packets", type=int, default=150_000, help="packets in tshark's pass")
    ap.add_argument("--no-tshark", action="store_true")
    a = ap.parse_args(argv)
    paths = a.pcap or default_input()
    frames = load(paths)
    if not frames:
        sys.exit("no packets")
    segs = []
    errors = 0
    for lt, data, ts in frames:
        s = parse_frame(lt, data, ts)
        if isinstance(s, TcpSegment):
            segs.append(s)
        elif isinstance(s, WireError):
            errors += 1

    r = reps_for(bench_parse, frames, a.min_seconds)
    parse_dt = bench_parse(frames, r)
    parse_rate = len(frames) * r / parse_dt

    ro = reps_for(bench_options, segs, a.min_seconds)
    opt_dt, n_opts = bench_options(segs, ro)
    opt_rate = n_opts / opt_dt

    rp = reps_for(bench_pass, frames, a.min_seconds)
    pass_dt, _ = bench_pass(frames, rp)
    pass_rate = len(frames) * rp / pass_dt

    t0 = time.perf_counter()
    bench_end_to_end(paths, 1)
    re_ = max(1, int(a.min_seconds / max(time.perf_counter() - t0, 1e-6)) + 1)
    e2e_dt, _ = bench_end_to_end(paths, re_)
    e2e_rate = len(frames) * re_ / e2e_dt

    names = ", ".join(Path(p).name for p in paths)
    print(f"input: {names}: {len(frames)} packets, {len(segs)} TCP, {n_opts // ro} MPTCP options, "
          f"{errors} parse errors; python {sys.version.split()[0]}")
    print(f"mproxy parse_frame: {parse_rate:,.0f} packets/s ({r} x {len(frames)} packets)")
    print(f"mproxy option decode: {opt_rate:,.0f} options/s ({ro} x {n_opts // ro} options)")
    print(f"mproxy parse + decode: {pass_rate:,.0f} packets/s")
    print(f"mproxy end-to-end from the file (pcap reader + parse + decode): {e2e_rate:,.0f} packets/s")
    ts = None if a.no_tshark else tshark_rate(frames, a.tshark_packets)
    if ts is None:
        print("tshark: not run")
        ts_text, ratio = "n/a", "n/a"
    else:
        with_start, without_start, startup, n = ts
        print(f"tshark -T fields -e frame.number -e tcp.options.mptcp.subtype: {with_start:,.0f} packets/s over "
              f"{n} packets ({without_start:,.0f}/s without its {startup:.2f} s start-up)")
        ratio = f"{pass_rate / without_start:.1f}x ({e2e_rate / without_start:.1f}x end-to-end)"
        ts_text = f"{without_start:,.0f}"
        print(f"ratio mproxy parse+decode / tshark: {ratio}")
    print()
    print("| input | packets | MPTCP options | parse_frame pkt/s | options/s | parse+decode pkt/s "
          "| end-to-end pkt/s | tshark pkt/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {names} | {len(frames)} | {n_opts // ro} | {parse_rate:,.0f} | {opt_rate:,.0f} | {pass_rate:,.0f} "
          f"| {e2e_rate:,.0f} | {ts_text} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
