"""Replay throughput and memory on a ≥50 MB multi-path lab capture, next to tshark's MPTCP analysis.

Run: .venv/bin/python benchmarks/replay.py [CAPTURE] [--workdir /tmp/mproxy-bench] [--reps 5]

Without CAPTURE the capture is ``WORKDIR/bulk.pcap``, made once by the lab
(``bulk(size_mb, shaped=True, gso=False)``: two MPTCP connections, each over
two shaped paths, MTU-sized packets as on a wire; needs root) and reused by
later runs.  In one run it measures:

* ``mproxy replay CAPTURE --out OUT --log LOG`` as a child process, wall
  clock, best of ``--reps``: packets/s and input MB/s, with and without the
  interpreter's start-up (timed on a one-packet capture); by default that is
  two processes (tracking, and the emitter process) with the compiled
  accelerator if it is built; the same again with ``--no-emit-process`` (one
  process), with ``MPROXY_NO_ACCEL=1`` (pure Python), and with both;
* the child's peak RSS (``os.wait4`` rusage of that child and its emitter
  process, not of earlier children);
* tshark's MPTCP analysis of the same file (mappings, MPTCP analysis and
  inter-subflow retransmission prefs on), two ways: a stats-only pass
  (``-q -z conv,tcp``) and a field pass that prints the analysis results
  (``-T fields -e mptcp.stream -e mptcp.dsn -e mptcp.reinjection_of``);
  best of ``--tshark-reps``, start-up likewise subtracted;
* the floor: the parts of the replay no tracker can avoid, timed in this
  process (best of ``--reps``): reading the frames in a Python loop, reading
  and parsing them, SHA-256 over the capture's bytes; then reading, parsing
  and tracking with emission left out. With the start-up, they bound how close
  any replay built this way (Python driving the loop) can come to tshark.
* memory flatness: peak RSS of replaying the first half of the capture, the
  whole, and the capture followed by a copy of itself 60 s later with the
  client ports renumbered (twice the packets and connections).

Prints markdown tables (for benchmarks/README.md ``## replay``).  ``--profile``
adds a pyinstrument profile of one replay in a single process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mproxy.io.pcap import PcapWriter, read_captures  # noqa: E402
from mproxy.wire.packet import TcpSegment, parse_frame  # noqa: E402

MIN_BYTES = 50_000_000
TSHARK_PREFS = ["-o", "mptcp.analyze_mappings:TRUE", "-o", "mptcp.analyze_mptcp:TRUE",
                "-o", "mptcp.intersubflows_retransmission:TRUE"]


@dataclass(slots=True)
class Run:
    seconds: float
    maxrss_kb: int
    stderr: str


def run_child(argv: list[str], stdout: int | None = subprocess.DEVNULL, env: dict[str, str] | None = None) -> Run:
    """Run *argv*; wall time and the peak RSS of that child (with its own children: the replay's
    emitter process) alone, not of earlier children."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, cwd=ROOT,
                         env=None if env is None else {**os.environ, **env})
    assert p.stderr is not None
    err = p.stderr.read().decode(errors="replace")  # small: replay -q / tshark warnings
    _pid, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {p.returncode}: {err.strip()[-2000:]}")
    return Run(dt, ru.ru_maxrss, err)


def best(argv: list[str], reps: int, env: dict[str, str] | None = None) -> Run:
    runs = [run_child(argv, env=env) for _ in range(reps)]
    return min(runs, key=lambda r: r.seconds)


def count_packets(path: Path) -> int:
    return sum(1 for _ in read_captures([str(path)]))


# --------------------------------------------------------------------------- capture
def get_capture(args: argparse.Namespace) -> Path:
    """The given capture, the cached one in the workdir, or a fresh lab capture."""
    if args.capture:
        cap = Path(args.capture)
        if not cap.is_file():
            raise SystemExit(f"no such capture: {cap}")
        return cap
    work = Path(args.workdir)
    cap = work / "bulk.pcap"
    if cap.is_file() and cap.stat().st_size >= MIN_BYTES and not args.regen:
        return cap
    from mproxy.lab import lab_available
    from mproxy.lab.scenarios import bulk

    reason = lab_available()
    if reason:
        raise SystemExit(f"no capture in {work} and the lab cannot make one: {reason}")
    work.mkdir(parents=True, exist_ok=True)
    print(f"generating a {args.size_mb} MB multi-path capture in {work} ...", file=sys.stderr)
    res = bulk(args.size_mb, shaped=True, keep=work, gso=False)
    if not res.ok:
        raise SystemExit("lab transfer failed: " + "; ".join(res.problems()))
    (work / "bulk.meta.json").write_text(json.dumps(
        {"size_mb": args.size_mb, "shaped": True, "gso": False, "duration": res.duration,
         "connections": [c.four_tuple for c in res.connections]}, indent=1))
    if res.capture.stat().st_size < MIN_BYTES:
        print(f"warning: capture is only {res.capture.stat().st_size / 1e6:.1f} MB", file=sys.stderr)
    return res.capture


def _write(path: Path, linktype: int, frames: Iterable[tuple[float, bytes]]) -> int:
    n = 0
    with open(path, "wb") as f:
        w = PcapWriter(f, linktype=linktype)
        for ts, data in frames:
            w.write(ts, data)
            n += 1
    return n


def _csum_replace(csum: int, old: int, new: int) -> int:
    """RFC 1624 incremental update of a 16-bit one's complement checksum."""
    s = (~csum & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _renumbered_copy(cap: Path, shift: float, used: set[int]) -> Iterator[tuple[float, bytes]]:
    """*cap* again, *shift* seconds later, every client port moved to an unused one.

    Same keys and data, but new 4-tuples: the tracker must open new connections
    (a copy on the old 4-tuples would hit the first copy's closed subflows).
    """
    server_ports = {5201, 80}
    offset = next(o for o in range(1000, 60000, 997)
                  if not {((p - 1024 + o) % 64000) + 1024 for p in used - server_ports} & used)
    for fr in read_captures([str(cap)]):
        data = bytearray(fr.data)
        seg = parse_frame(fr.linktype, fr.data, fr.ts)
        if isinstance(seg, TcpSegment):
            off = bytes(data).find(bytes(seg.ip[:seg.tcp_off + 20])) + seg.tcp_off
            if off >= seg.tcp_off:
                csum = int.from_bytes(data[off + 16:off + 18], "big")
                for pos in (off, off + 2):
                    port = int.from_bytes(data[pos:pos + 2], "big")
                    if port not in server_ports:
                        new = ((port - 1024 + offset) % 64000) + 1024
                        data[pos:pos + 2] = new.to_bytes(2, "big")
                        csum = _csum_replace(csum, port, new)
                data[off + 16:off + 18] = csum.to_bytes(2, "big")
        yield fr.ts + shift, bytes(data)


def derived(cap: Path, work: Path, packets: int) -> tuple[Path, Path, Path]:
    """First half, capture + a renumbered time-shifted copy, and a one-packet file (for start-up)."""
    half, double, one = work / f"{cap.stem}.half.pcap", work / f"{cap.stem}.double.pcap", work / "one.pcap"
    frames = read_captures([str(cap)])
    first = next(iter(read_captures([str(cap)])))
    lt = first.linktype
    _write(one, lt, [(first.ts, bytes(first.data))])
    _write(half, lt, ((fr.ts, bytes(fr.data)) for i, fr in zip(range(packets // 2), frames)))
    used: set[int] = set()
    last = first.ts
    for fr in read_captures([str(cap)]):
        seg = parse_frame(fr.linktype, fr.data, fr.ts)
        last = max(last, fr.ts)
        if isinstance(seg, TcpSegment):
            used.update((seg.sport, seg.dport))
    # shifted past the tracker's closed_linger (30 s) and idle timeouts do not matter: new 4-tuples
    shift = last - first.ts + 60
    orig = ((fr.ts, bytes(fr.data)) for fr in read_captures([str(cap)]))
    _write(double, lt, itertools.chain(orig, _renumbered_copy(cap, shift, used)))
    return half, double, one


# --------------------------------------------------------------------------- measures
def replay_argv(cap: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "mproxy.cli", "replay", str(cap), "--out", str(work / "replay-out.pcap"),
            "--log", str(work / "replay-log.jsonl"), "-q"]


def tshark_argvs(cap: Path) -> dict[str, list[str]]:
    base = ["tshark", "-n", "-r", str(cap), *TSHARK_PREFS]
    return {
        "tshark -q -z conv,tcp": [*base, "-q", "-z", "conv,tcp"],
        "tshark -T fields (mptcp.stream, dsn, reinjection_of)":
            [*base, "-T", "fields", "-e", "frame.number", "-e", "mptcp.stream", "-e", "mptcp.dsn",
             "-e", "mptcp.reinjection_of"],
    }


def log_summary(work: Path) -> tuple[int, int, float]:
    """Connections, joined subflows, share of client->server bytes on joins (from the replay log)."""
    conns = joins = 0
    join_bytes = total = 0
    for line in (work / "replay-log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") != "mptcp_connection":
            continue
        conns += 1
        for sf in rec["subflows"]:
            total += sf.get("bytes_c2s", 0)
            if sf["role"] == "join":
                joins += 1
                join_bytes += sf.get("bytes_c2s", 0)
    return conns, joins, join_bytes / total if total else 0.0


def profile(cap: Path, work: Path) -> str:
    """pyinstrument text profile of one replay in a single process (self-contained child): the
    default run splits the work over two processes, a profiler would only see one of them."""
    code = (
        "import sys; from pyinstrument import Profiler; from mproxy.replay import replay\n"
        "p = Profiler(interval=0.0005); p.start()\n"
        f"out = open({str(work / 'prof-out.pcap')!r}, 'wb')\n"
        f"replay([{str(cap)!r}], out, None, emit_process=False); out.close()\n"
        "p.stop(); print(p.output_text(unicode=False, color=False, show_all=False))\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return cp.stdout


def floor(cap: Path, reps: int) -> list[tuple[str, float]]:
    """What a replay costs before any MPTCP work (in this process, best of ``reps``): the frames read in
    a Python loop, then also parsed; SHA-256 over as many bytes as the capture holds (the log's
    digests hash about that much); and reading + parsing + tracking without emission."""
    import hashlib

    from mproxy.core.pipeline import Pipeline
    from mproxy.gcpolicy import tune

    tune()  # the collector's settings of the mproxy command

    def read() -> None:
        for _f in read_captures([str(cap)]):
            pass

    def parse() -> None:
        for f in read_captures([str(cap)]):
            parse_frame(f.linktype, f.data, f.ts)

    blob = cap.read_bytes()

    def digest() -> None:
        hashlib.sha256(blob).digest()

    def track() -> None:
        p = Pipeline()
        p.remote = []  # ops gathered and dropped: no emission
        for f in read_captures([str(cap)]):
            p.feed(f.linktype, f.data, f.ts)
            if len(p.remote) > 256:
                p.remote = []
            if p.records:
                p.records = []
        p.finish()

    rows = []
    for label, fn in (("read the frames (Python loop over the C record slicer)", read),
                      ("read + parse (C parse_frame)", parse),
                      ("SHA-256 over the capture's bytes", digest),
                      ("read + parse + track, no emission", track)):
        secs = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            secs = min(secs, time.perf_counter() - t0)
        rows.append((label, secs))
    return rows


def fmt(n: float) -> str:
    return f"{n:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("capture", nargs="?", help="existing capture to use instead of the lab's")
    ap.add_argument("--workdir", default="/tmp/mproxy-bench", help="cache for the capture and outputs")
    ap.add_argument("--size-mb", type=float, default=52.0, help="client->server MB when generating")
    ap.add_argument("--regen", action="store_true", help="make a new lab capture even if one is cached")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tshark-reps", type=int, default=3)
    ap.add_argument("--no-tshark", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also print a pyinstrument profile")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cap = get_capture(args)
    size = cap.stat().st_size
    packets = count_packets(cap)
    half, double, one = derived(cap, work, packets)

    # bytecode as an installed package has it (pip compiles at install): with PYTHONDONTWRITEBYTECODE
    # set, a checkout would compile every module changed since its last .pyc again at each start
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "mproxy")], check=True)
    start_run = best(replay_argv(one, work), args.reps)
    startup = start_run.seconds
    whole = best(replay_argv(cap, work), args.reps)
    conns, joins, join_share = log_summary(work)
    rate = packets / whole.seconds
    # the same replay on one core, and without the compiled accelerator (the pure-Python reference)
    variants = [("mproxy replay --no-emit-process (one process)",
                 best([*replay_argv(cap, work), "--no-emit-process"], args.reps)),
                ("mproxy replay, MPROXY_NO_ACCEL=1 (pure Python)",
                 best(replay_argv(cap, work), args.reps, env={"MPROXY_NO_ACCEL": "1"})),
                ("mproxy replay --no-emit-process, MPROXY_NO_ACCEL=1",
                 best([*replay_argv(cap, work), "--no-emit-process"], args.reps, env={"MPROXY_NO_ACCEL": "1"}))]

    mem_rows: list[tuple[str, int, int, int]] = [("one packet (start-up)", 1, start_run.maxrss_kb, 0)]
    for label, path in (("first half", half), ("whole", cap), ("whole + renumbered copy", double)):
        n = packets if path == cap else count_packets(path)
        r = whole if path == cap else best(replay_argv(path, work), 1)
        c = conns if path == cap else log_summary(work)[0]  # (the workdir's log is the last replay's)
        mem_rows.append((label, n, r.maxrss_kb, c))
    best(replay_argv(cap, work), 1)  # leave the whole capture's output and log in the workdir

    ts_rows: list[tuple[str, float, float]] = []
    if not args.no_tshark and shutil.which("tshark"):
        ts_start = best(["tshark", "-n", "-r", str(one), *TSHARK_PREFS, "-q", "-z", "conv,tcp"],
                        args.tshark_reps).seconds
        for label, tv in tshark_argvs(cap).items():
            r = best(tv, args.tshark_reps)
            ts_rows.append((label, r.seconds, r.seconds - ts_start))

    print(f"\ncapture: {cap} ({size / 1e6:.1f} MB, {fmt(packets)} packets, {conns} MPTCP connections, "
          f"{joins} joined subflows carrying {join_share:.0%} of the client->server bytes)")
    from mproxy.wire.packet import ACCELERATED

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; best of {args.reps} "
          f"(tshark: {args.tshark_reps}); start-up: mproxy {startup:.3f} s; "
          f"compiled accelerator: {'built' if ACCELERATED else 'NOT built'}\n")
    print("| tool | wall s | packets/s | MB/s | packets/s w/o start-up | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for label, r in [("mproxy replay", whole), *variants]:
        print(f"| {label} | {r.seconds:.2f} | {fmt(packets / r.seconds)} | {size / 1e6 / r.seconds:.1f} | "
              f"{fmt(packets / max(r.seconds - startup, 1e-9))} | {r.maxrss_kb / 1024:.0f} |")
    for label, secs, net in ts_rows:
        print(f"| {label} | {secs:.2f} | {fmt(packets / secs)} | {size / 1e6 / secs:.1f} | "
              f"{fmt(packets / max(net, 1e-9))} | |")
    if ts_rows:
        fastest = min(s for _l, s, _n in ts_rows)
        slowest = max(s for _l, s, _n in ts_rows)
        print(f"\nratio mproxy/tshark (packets/s, wall): {fastest / whole.seconds:.2f}x against the fastest "
              f"tshark pass, {slowest / whole.seconds:.2f}x against the field pass; "
              f"targets: >= 100,000 packets/s ({'met' if rate >= 100_000 else 'MISSED'}), "
              f">= 5x tshark ({'met' if fastest / whole.seconds >= 5 else 'MISSED'})")
    floor_rows = floor(cap, args.reps)
    print("\n| floor (in-process, best of reps) | s |")
    print("|---|---|")
    print(f"| start-up (interpreter + imports, one-packet replay) | {startup:.3f} |")
    for label, secs in floor_rows:
        print(f"| {label} | {secs:.3f} |")
    if ts_rows:
        least = startup + floor_rows[1][1]
        print(f"\nstart-up + read + parse = {least:.3f} s, before any MPTCP work: at most "
              f"{fastest / least:.1f}x the fastest tshark pass for a replay whose loop runs in Python; "
              f"5x needs {fastest / 5:.3f} s")
    print("\n| replay input | packets | MPTCP connections | peak RSS MB |")
    print("|---|---|---|---|")
    for label, n, kb, c in mem_rows:
        print(f"| {label} | {fmt(n)} | {c} | {kb / 1024:.1f} |")
    if len(mem_rows) >= 3:
        lo, hi = mem_rows[1], mem_rows[-1]
        growth = (hi[2] - lo[2]) / 1024
        per_kpkt = growth / max((hi[1] - lo[1]) / 1000, 1e-9)
        flat = growth < max(0.1 * lo[2] / 1024, 5.0)
        print(f"\nmemory: {growth:+.1f} MB from {fmt(lo[1])} to {fmt(hi[1])} packets "
              f"({per_kpkt * 1024:+.1f} KB per 1000 packets): {'flat' if flat else 'NOT flat'}")
    if args.profile:
        print("\n```\n" + profile(cap, work) + "```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
