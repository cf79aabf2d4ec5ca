"""``make demo``: replay the shipped capture of an attack split across MPTCP subflows.

Shows what an IDS sees without mproxy (each subflow carries only a fragment
of the request) and with it (one plain TCP stream holding the whole request).
Needs no root: it runs the offline replay on a capture our lab recorded.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from .io.pcap import read_captures
from .wire.packet import TcpSegment, parse_frame
from .replay import replay, summary_lines

SAMPLE = Path(__file__).resolve().parent / "samples" / "split-attack.pcap"
NEEDLE = b"UNION+SELECT"


def _show(data: bytes, limit: int = 160) -> str:
    text = data[:limit].decode("latin-1")
    return text.replace("\r", "\\r").replace("\n", "\\n\n      ") + ("..." if len(data) > limit else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("capture", nargs="?", default=str(SAMPLE))
    ap.add_argument("--out", help="keep the emitted pcap here")
    args = ap.parse_args(argv)
    cap = args.capture

    print(f"== input: {cap}")
    per_subflow: dict[tuple[str, int, str, int], bytearray] = defaultdict(bytearray)
    for fr in read_captures([cap]):
        seg = parse_frame(fr.linktype, fr.data, fr.ts)
        if isinstance(seg, TcpSegment) and seg.payload_len:
            per_subflow[(seg.src_text, seg.sport, seg.dst_text, seg.dport)] += seg.payload
    print("   what a per-connection IDS reassembles, subflow by subflow (client -> server):")
    for (s, sp, d, dp), data in per_subflow.items():
        if dp in (80, 8080, 5201) or sp > dp:
            found = "contains" if NEEDLE in data else "does NOT contain"
            print(f"   {s}:{sp} -> {d}:{dp}  {len(data)} bytes, {found} {NEEDLE.decode()}")
            print(f"      {_show(bytes(data))}")

    out_path = args.out or tempfile.mktemp(suffix=".pcap", prefix="mproxy-demo-")
    log = io.StringIO()
    with open(out_path, "wb") as out:
        res = replay([cap], out, log)
    print(f"\n== mproxy replay {cap} --out {out_path}")
    for line in summary_lines(res):
        print(f"   {line}")
    # read the emitted pcap back: one plain TCP conversation per MPTCP connection
    emitted: dict[tuple[str, int, str, int], bytearray] = defaultdict(bytearray)
    for fr in read_captures([out_path]):
        seg = parse_frame(fr.linktype, fr.data, fr.ts)
        if isinstance(seg, TcpSegment) and seg.payload_len:
            emitted[(seg.src_text, seg.sport, seg.dst_text, seg.dport)] += seg.payload
    print("   what the IDS reads from the emitted stream (client -> server):")
    for (s, sp, d, dp), data in emitted.items():
        if sp > dp:
            found = "contains" if NEEDLE in data else "does not contain"
            print(f"   {s}:{sp} -> {d}:{dp}  {len(data)} bytes, {found} {NEEDLE.decode()}")
            print(f"      {_show(bytes(data), 400)}")
    print(f"\n   Read the emitted stream with any IDS or: tshark -r {out_path} -q -z follow,tcp,ascii,0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
