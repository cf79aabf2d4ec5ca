"""A lab middlebox that strips DSS options mid-connection, so real kernels fall back to TCP.

Some middleboxes drop TCP options they do not know once a connection is under
way. Linux then meets in-order data with no DSS mapping and, while it still
may (no join yet, no checksums), falls back to plain TCP on both ends
(MIB ``DssFallback``): the rest of the connection is TCP without MPTCP options.
This reproduces that on demand: ``python -m mproxy.lab.strip_dss --queue N
--after BYTES`` reads an NFQUEUE (in the namespace the rule lives in), passes
packets unchanged until BYTES of TCP payload went by, then turns every DSS
option (kind 30, subtype 2) into kind 253, an experimental kind receivers
ignore (the length stays, so the option list still parses), and fixes the TCP
checksum. Lab use only: one queue, the rule chooses the packets.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mproxy.wire.packet import TcpSegment, mptcp_spans, parse_ip
from mproxy.wire.rewrite import fill_tcp_checksum

EXPERIMENTAL_KIND = 253  # RFC 4727: experimental, ignored by receivers that do not know it


def strip_dss(ip: bytearray, seg: TcpSegment) -> bool:
    """Rewrite the DSS options of ``ip`` (parsed as ``seg``) in place; True if any was found.

    The TCP checksum is computed in full, as the kernel would send it (packets leaving a
    local socket may carry only the pseudo-header sum).
    """
    spans = mptcp_spans(seg)
    if not isinstance(spans, list):
        return False  # a damaged option area: left as it is
    changed = False
    for off, length in spans:
        if length > 2 and ip[off + 2] >> 4 == 2:  # subtype 2: DSS
            ip[off] = EXPERIMENTAL_KIND
            changed = True
    return changed and fill_tcp_checksum(ip)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mproxy.lab.strip_dss", description=__doc__.splitlines()[0])
    ap.add_argument("--queue", type=int, required=True, help="NFQUEUE number the iptables rule sends to")
    ap.add_argument("--after", type=int, default=0, help="TCP payload bytes to pass untouched first")
    args = ap.parse_args(argv)
    from netfilterqueue import NetfilterQueue  # only here: the lab's own tool, never the core

    seen = 0

    def on_packet(pkt: object) -> None:
        nonlocal seen
        ip = bytearray(pkt.get_payload())  # type: ignore[attr-defined]
        seg = parse_ip(memoryview(ip))
        if isinstance(seg, TcpSegment) and seg.payload_len:
            seen += seg.payload_len
            if seen > args.after and strip_dss(ip, seg):
                pkt.set_payload(bytes(ip))  # type: ignore[attr-defined]
        pkt.accept()  # type: ignore[attr-defined]

    q = NetfilterQueue()
    q.bind(args.queue, on_packet)
    print("ready", flush=True)
    try:
        q.run()
    except KeyboardInterrupt:
        pass
    finally:
        q.unbind()
    return 0


if __name__ == "__main__":
    sys.exit(main())
