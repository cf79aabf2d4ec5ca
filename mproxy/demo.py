"""``make demo``: replay the shipped capture of an attack split across MPTCP subflows.

Shows what an IDS sees without mproxy (each subflow carries only a fragment
of the request) and with it (one plain TCP stream holding the whole request).
Needs no root: it runs the offline replay on a capture our lab recorded.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from .core.inspector import Inspector
from .core.rules import load_rules
from .io.pcap import read_captures
from .wire.packet import TcpSegment, parse_frame
from .replay import replay, summary_lines

SAMPLE = Path(__file__).resolve().parent / "samples" / "split-attack.pcap"
RULES = Path(__file__).resolve().parents[1] / "config" / "mproxy.rules"
NEEDLE = b"UNION+SELECT"


def _show(data: bytes, limit: int = 160) -> str:
    """Printable rendering: CR/LF spelt out, other control and high bytes as dots."""
    out = []
    for b in data[:limit]:
        if b == 13:
            out.append("\\r")
        elif b == 10:
            out.append("\\n\n      ")
        else:
            out.append(chr(b) if 32 <= b < 127 else ".")
    return "".join(out) + ("..." if len(data) > limit else "")


def _payload_by_flow(path: str) -> dict[tuple[str, int, str, int], bytearray]:
    """TCP payload of a capture concatenated per 4-tuple, in capture order."""
    flows: dict[tuple[str, int, str, int], bytearray] = defaultdict(bytearray)
    for fr in read_captures([path]):
        seg = parse_frame(fr.linktype, fr.data, fr.ts)
        if isinstance(seg, TcpSegment) and seg.payload_len:
            flows[(seg.src_text, seg.sport, seg.dst_text, seg.dport)] += seg.payload
    return flows


def _report(flows: dict[tuple[str, int, str, int], bytearray], limit: int) -> None:
    for (s, sp, d, dp), data in flows.items():
        if sp > dp:  # client -> server (ephemeral port to service port)
            found = "contains" if NEEDLE in data else "does NOT contain"
            print(f"   {s}:{sp} -> {d}:{dp}  {len(data)} bytes, {found} {NEEDLE.decode()}")
            print(f"      {_show(bytes(data), limit)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("capture", nargs="?", default=str(SAMPLE))
    ap.add_argument("--out", help="keep the emitted pcap here")
    args = ap.parse_args(argv)
    cap = args.capture

    print(f"== input: {cap}")
    print("   what a per-connection IDS reassembles, subflow by subflow (client -> server):")
    _report(_payload_by_flow(cap), 160)

    out_path = args.out or tempfile.mktemp(suffix=".pcap", prefix="mproxy-demo-")
    log = io.StringIO()
    with open(out_path, "wb") as out:
        res = replay([cap], out, log, inspector=Inspector(load_rules(RULES)) if RULES.is_file() else None)
    print(f"\n== mproxy replay {cap} --out {out_path}" + (f" --rules {RULES}" if RULES.is_file() else ""))
    for line in summary_lines(res):
        print(f"   {line}")
    print("   what the IDS reads from the emitted stream (client -> server):")
    _report(_payload_by_flow(out_path), 400)
    for rec in map(json.loads, log.getvalue().splitlines()):
        if rec["event"] == "signature":
            print(f"   the shipped rules on the rebuilt stream: sid {rec['sid']} \"{rec['msg']}\" "
                  f"({rec['direction']}, ends at byte {rec['stream_offset']})")
    print(f"\n   Read the emitted stream with any IDS or: tshark -r {out_path} -q -z follow,tcp,ascii,0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
