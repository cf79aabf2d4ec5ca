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

from mproxy.wire.checksum import tcp_checksum

EXPERIMENTAL_KIND = 253  # RFC 4727: experimental, ignored by receivers that do not know it


def strip_dss(ip: bytearray) -> bool:
    """Rewrite the DSS options of one IPv4/IPv6 TCP packet in place; True if any was found."""
    if not ip:
        return False
    if ip[0] >> 4 == 4:
        tcp_off, src, dst = (ip[0] & 15) * 4, bytes(ip[12:16]), bytes(ip[16:20])
        if len(ip) < 20 or ip[9] != 6:
            return False
    elif ip[0] >> 4 == 6 and len(ip) >= 40 and ip[6] == 6:  # no extension headers in the lab
        tcp_off, src, dst = 40, bytes(ip[8:24]), bytes(ip[24:40])
    else:
        return False
    if len(ip) < tcp_off + 20:
        return False
    end = min(len(ip), tcp_off + (ip[tcp_off + 12] >> 4) * 4)
    i, changed = tcp_off + 20, False
    while i < end:
        kind = ip[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or ip[i + 1] < 2:
            break
        if kind == 30 and i + 2 < end and ip[i + 2] >> 4 == 2:
            ip[i] = EXPERIMENTAL_KIND
            changed = True
        i += ip[i + 1]
    if changed:
        ip[tcp_off + 16 : tcp_off + 18] = b"\0\0"
        ip[tcp_off + 16 : tcp_off + 18] = tcp_checksum(src, dst, bytes(ip[tcp_off:])).to_bytes(2, "big")
    return changed


def payload_len(ip: bytes | bytearray) -> int:
    if not ip:
        return 0
    if ip[0] >> 4 == 4 and len(ip) >= 20:
        off = (ip[0] & 15) * 4
    elif ip[0] >> 4 == 6 and len(ip) >= 40:
        off = 40
    else:
        return 0
    if len(ip) < off + 13:
        return 0
    return max(0, len(ip) - off - (ip[off + 12] >> 4) * 4)


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
        n = payload_len(ip)
        seen += n
        if n and seen > args.after and strip_dss(ip):
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
