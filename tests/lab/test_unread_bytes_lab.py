"""Segments a Linux receiver reads otherwise than at face value, on kernel MPTCP, each carrying a
DSS mapping for the DSNs the client then fills with other bytes.

The client writes ``GET /?q=``; on its join subflow a raw socket then sends, at that subflow's next
sequence number, ``BENIGN`` mapped at the next data-level bytes in one of these shapes; then the
client writes ``UNION SELECT ...``:

* the kernel never reads the bytes: an RST carrying them, a FIN followed by them, them with a
  timestamp 100 s older than the subflow's (PAWS), with a TCP checksum that fails (the lab fills
  checksums in software, so the capture's other checksums are good, as on a wire), with an ACK
  of 1 MB the server never sent, or 1 GB behind its last acknowledged point, or 1 byte behind it
  (the server sent nothing on that subflow: Linux bounds the look-back by the bytes acked),
  without ACK, or starting 1000 bytes past the right edge of the server's window, or exactly at
  it (``at_edge``: the server's ACK that follows holds no SACK block for it: dropped, not kept),
  or, while the server's window is closed (it reads nothing and its small buffer is full), at the
  next byte of the subflow that took the last bytes (``zero_window_next``), after a repeat of
  that last byte (``zero_window_tail``) or ten bytes further (``zero_window_hole``: no SACK block
  for it follows) -- the subflow's furthest edge may lie further on: MPTCP moves a subflow's edge
  back in its own sequence space;
* the kernel reads on: an MP_FASTCLOSE naming a key that is not the server's (ignored), an RST
  with MP_FASTCLOSE naming the server's key one byte past the join's next sequence number (a
  challenge ACK, RFC 5961; ``rst_off_fastclose``), an RST at it followed by BENIGN on the join (the
  join is gone: ``rst_then_data``), an RST with MP_FASTCLOSE naming the server's key at the end of
  BENIGN sent after a hole on the join, from a client that refused SACK (Linux takes an RST at its
  out-of-order edge only where SACK was negotiated: ``rst_sack_edge``), the same RST at the end of
  the highest of five pieces after a hole, sent first (Linux keeps four SACK blocks, the most
  recently changed, and takes an RST at the highest end among them: ``rst_sack_evicted``; at that
  end, ``rst_sack_max``, the server takes it and the connection ends), or a SYN
  with another ISN on the initial subflow's 4-tuple (discarded with a challenge ACK), before the
  client's next bytes;
* at the IP level (IPv4 options, IPv6 extension headers; ``IP_SHAPES``) and for TCP
  authentication options (``AUTH_SHAPES``: a TCP-MD5 signature is dropped, a malformed one and a
  TCP-AO option are read through by this kernel): as each shape's comment says;
* the kernel reads them: the DSS followed by an option whose length lies (Linux's option walk
  stops there, the DSS before it stands), or two DSS options of which the first maps them at
  those DSNs (the first wins), or a SACK block 1000 bytes past what the server sent (Linux
  discards the block; conntrack finds the segment INVALID, so only a rule queueing INVALID
  packets shows it to ``mproxy run``), or with URG set (an MPTCP socket reads urgent bytes
  inline);
* the kernel never sees them: BENIGN with a TTL that expires at the gateway (``ttl_at_gateway``)
  or after it (``ttl_beyond``: inline, mproxy raises the TTL back and the server reads BENIGN);
* the kernel never sees it: an ACK with the server's addresses sent from the client's side to the
  gateway (which forwards it back out), acknowledging past BENIGN sent after a hole in the join
  (``spoofed_ack``; the gateway's capture records which interface each packet came in on);
* the kernel reads them elsewhere: two DSS options of which the first maps them 100,000 bytes
  ahead, past the end of the stream;
* overlapping copies out of order at the data level (``OOO_SHAPES``), several segments at
  consecutive sequence numbers of the join, ended by a DATA_FIN: the kernel reads the copy that
  arrives in order, or of buffered copies the one whose segment starts first (the longer at the
  same start; a segment merged onto the one before counts as starting there); of a copy whose
  head it already read, it reads the new bytes; copies placed 300 kB ahead, past the
  connection-level window the server advertised, it drops; a FIN kept after a hole it drops when
  the copy that fills the hole runs past it.

Ground truth is what the server application read; the replayed stream, read back by tshark, must
be the same.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import pytest  # noqa: E402

from mproxy.lab.topology import lab_available  # noqa: E402

LAB_REASON = lab_available()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")]

PORT = 5001
PART1, PART2 = b"GET /?q=", b"UNION SELECT pw HTTP/1.1\r\n\r\n"
SERVER = f"""
import os, socket, sys, time
v6 = sys.argv[1] == "6"
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM, 262)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if len(sys.argv) > 2:  # a small receive buffer, not read until that file exists: its window closes
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
s.bind(("::" if v6 else "0.0.0.0", {PORT})); s.listen(8)
print("ready", flush=True)
c, _ = s.accept()
while len(sys.argv) > 2 and not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
c.settimeout(20)
data = b""
while True:
    try:
        b = c.recv(65536)
    except ConnectionResetError:  # (a shape the server takes as the connection's end: what it read)
        break
    if not b:
        break
    data += b
print(data.hex(), flush=True)
"""
CLIENT = f"""
import os, socket, sys, time
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_STREAM, 262)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.connect((sys.argv[1], {PORT}))
s.sendall({PART1!r})
print("part1", flush=True)
s.sendall(b"." * (int(sys.argv[4]) if len(sys.argv) > 4 else 0))  # (blocks while the server's window is closed)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
s.sendall({PART2!r} + b"." * (int(sys.argv[3]) if len(sys.argv) > 3 else 0))
s.shutdown(socket.SHUT_WR)
time.sleep(1)
"""


def _inject(spec: dict[str, Any]) -> None:
    """(In the client namespace.) One raw TCP packet on the join subflow, built by our encoder."""
    from mproxy.wire import mptcp as m
    from mproxy.wire.build import (build_tcp, sack_option, tcp_options, timestamp_option, with_ipv4_options,
                                   with_ipv6_headers)
    from mproxy.wire.packet import ACK, FIN, PSH, RST, SYN, URG

    payload = bytes.fromhex(spec["payload"])
    opts = [m.dss(spec["data_ack"], spec["dsn"], spec["ssn"], len(payload)).encode()] if payload else []
    if "join_token" in spec:  # an MP_JOIN SYN (on the join's own 4-tuple, another ISN)
        opts = [m.MpJoin(m.JoinPhase.SYN, False, 0, spec["join_token"], 0x5EED).encode()]
    if spec.get("data_ack_only"):  # a pure ACK whose DSS holds only a Data ACK
        opts = [m.dss(spec["data_ack"]).encode()]
    if spec.get("data_fin"):  # a bare DATA_FIN at ``dsn`` (data-level length 1)
        opts = [m.dss(spec["data_ack"], spec["dsn"], 0, 1, data_fin=True).encode()]
    if "fastclose_key" in spec:  # MP_FASTCLOSE naming a key that is not the server's
        opts = [m.MpFastclose(spec["fastclose_key"]).encode()]
    if "dsn2" in spec:  # a second DSS after the first (no Data ACK, so both fit)
        opts = [m.dss(None, spec["dsn"], spec["ssn"], len(payload)).encode(),
                m.dss(None, spec["dsn2"], spec["ssn"], len(payload)).encode()]
    if "sack" in spec:  # a SACK block (NOP NOP SACK): Linux discards a block it cannot use, reads the data
        left, right = spec["sack"]
        opts.append(sack_option((left, right)))
    if "tcp_option" in spec:  # another TCP option after the DSS (TCP-MD5, TCP-AO)
        opts.append(bytes.fromhex(spec["tcp_option"]))
    if spec.get("bad_tail"):  # an option whose length lies (1 < 2): a TCP stack stops reading there
        opts.append(bytes([253, 1]))
    if "tsval" in spec:  # Linux's layout: NOP NOP timestamp first
        opts.insert(0, timestamp_option(spec["tsval"], spec["tsecr"]))
    flags = {"rst": RST | ACK, "data": ACK, "fin": FIN | ACK, "noack": PSH, "syn": SYN,
             "urgent": URG | ACK}[spec["flags"]]
    fam = socket.AF_INET6 if ":" in spec["dst"] else socket.AF_INET
    pkt = build_tcp(socket.inet_pton(fam, spec["src"]), socket.inet_pton(fam, spec["dst"]), spec["sport"],
                    spec.get("dport", PORT), spec["seq"], spec["ack"], flags, 502, tcp_options(*opts), payload,
                    ttl=spec.get("ttl", 64))
    if spec.get("bad_csum"):  # the TCP checksum made wrong (the IPv4 header is 20 bytes)
        pkt = pkt[:36] + bytes([pkt[36] ^ 0x5A]) + pkt[37:]
    if "ip_options" in spec:
        pkt = with_ipv4_options(pkt, bytes.fromhex(spec["ip_options"]))
    if "ipv6_headers" in spec:
        pkt = with_ipv6_headers(pkt, [(t, bytes.fromhex(body)) for t, body in spec["ipv6_headers"]])
    if "l2" in spec:  # an Ethernet frame to the gateway's MAC on this interface: it forwards it on
        ifname, gw_mac = spec["l2"]
        with open(f"/sys/class/net/{ifname}/address") as f:
            own = bytes.fromhex(f.read().strip().replace(":", ""))
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind((ifname, 0))
            raw.send(bytes.fromhex(gw_mac.replace(":", "")) + own + (b"\x86\xdd" if fam == socket.AF_INET6 else b"\x08\x00")
                     + pkt)
        return
    # (IPPROTO_RAW: the header is ours, for IPv6 too)
    socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW).sendto(pkt, (spec["dst"], 0))


def _ipv6_options(*options: bytes) -> str:
    from mproxy.wire.build import ipv6_options_header

    return ipv6_options_header(*options).hex()


# IP-level shapes, each wrapped around the BENIGN segment (IPv4 options; IPv6 extension headers as
# (type, body after the next-header byte)); see mproxy/wire/iphdr.py for what Linux refuses and why
IP_SHAPES: dict[str, dict[str, Any]] = {
    "ip_bad_option": {"ip_options": bytes([7, 1]).hex()},  # a length below 2: the gateway drops it
    "ip_lsrr": {"ip_options": (bytes([131, 7, 4]) + bytes([198, 18, 10, 2])).hex()},  # source routing is off
    "v6_dstopt_discard": {"ipv6_headers": [(60, _ipv6_options(bytes([0x80, 4]) + bytes(4)))]},  # the server drops
    "v6_dstopt_skip": {"ipv6_headers": [(60, _ipv6_options(bytes([0x1E, 4]) + bytes(4)))]},  # the server reads
    "v6_padn": {"ipv6_headers": [(60, (bytes([0]) + bytes([1, 4, 0, 0, 7, 0])).hex())]},  # PadN not zero
    "v6_routing_left": {"ipv6_headers": [(43, (bytes([2, 0, 1]) + bytes(4) + bytes(16)).hex())]},  # one to go
    "v6_shim6": {"ipv6_headers": [(140, bytes(7).hex())]},  # no handler in Linux
    "v6_hbh_discard": {"ipv6_headers": [(0, _ipv6_options(bytes([0x80, 2, 0, 0])))]},  # the gateway drops
}
# TCP authentication options: Linux drops a segment with a TCP-MD5 signature when it holds no key
# for the peer (TCPMD5Unexpected; MPTCP never runs with one), and one whose auth options are
# malformed; a TCP-AO option it reads through when built without CONFIG_TCP_AO (as here)
AUTH_SHAPES: dict[str, str] = {
    "tcp_md5": (bytes([19, 18]) + bytes(range(16))).hex(),
    "tcp_md5_bad_len": (bytes([19, 10]) + bytes(8)).hex(),
    "tcp_ao": bytes([29, 6, 1, 1, 0, 0]).hex(),
}
# Overlapping copies at the data level, out of order (``(DSN offset from the client's next byte,
# bytes)``, sent in this order, at consecutive sequence numbers of the join), then a DATA_FIN at
# offset 20 -- or, with None, the client's own UNION SELECT ... that follows; and what the kernel reads
FILL = b"0123456789"
PAD = 320_000  # bytes after UNION SELECT ... for ooo_past_window: the stream reaches its copies
OOO_SHAPES: dict[str, tuple[list[tuple[Any, ...]], int | None, bytes]] = {
    "ooo_covered": ([(10, b"BENIGN")], None, PART2),
    "ooo_fill_covers": ([(10, b"BENIGN"), (0, FILL + b"UNION SELE")], 20, FILL + b"UNION SELE"),
    "ooo_replace": ([(10, b"BENIGN"), (10, b"UNION SELE"), (0, FILL)], 20, FILL + b"UNION SELE"),
    "ooo_cover_left": ([(12, b"BENIGN"), (10, b"UNION SELE"), (0, FILL)], 20, FILL + b"UNION SELE"),
    "ooo_partial": ([(14, b"BENIGN"), (10, b"UNION "), (0, FILL)], 20, FILL + b"UNION NIGN"),
    # the longer copy from the same place on the other (initial) subflow; then a copy inside it
    "ooo_replace_across": ([(10, b"BENIGN"), (10, b"UNION SELE", "initial"), (16, b"SELE"), (0, FILL)], 20,
                           FILL + b"UNION SELE"),
    # a copy whose head was already read: this kernel reads its new bytes (some drop it whole -- a
    # late-2025 patch changed that path -- and would read the x's after it instead)
    "partly_read": ([(0, FILL), (5, b"56789UNION SELE"), (10, b"x" * 10)], 20, FILL + b"UNION SELE"),
    "ooo_inside": ([(10, b"UNION SELE"), (12, b"BENIGN"), (0, FILL)], 20, FILL + b"UNION SELE"),
    "ooo_coalesced": ([(10, b"UNION"), (15, b" SELE"), (12, b"BENIGNxx"), (0, FILL)], 20, FILL + b"UNION SELE"),
    # 300 kB ahead: past the connection-level window the server advertised, so Linux drops them
    # (placed, they would win the client's bytes of every segment starting after them)
    "ooo_past_window": ([(300_000, b"B" * 1300), (301_300, b"B" * 1300)], None, PART2 + b"." * PAD),
    # ten subflow bytes after the join's next one, mapped where the client then sends its bytes:
    # the server's TCP keeps it out of order (until a copy of the hole's bytes comes, which then
    # wins), so it reads the client's bytes; read at once, it was the IDS's copy of those DSNs
    "ooo_after_hole": ([(0, b"BENIGN", "hole")], None, PART2),
    # a bare FIN ten subflow bytes after the join's next one, then a copy from the next byte that
    # runs past the FIN's place: the server's TCP keeps the FIN out of order, reads the copy whole
    # and drops the FIN as old; taken as it came, the FIN made the copy's last ten bytes void
    "fin_ahead": ([(10, b"", "fin"), (0, FILL + b"UNION SELE")], 20, FILL + b"UNION SELE"),
}
FORGERIES = ["spoofed_ack", "rst", "fin", "paws", "bad_csum", "ack_unsent", "ack_old", "ack_behind", "no_ack",
             "past_window", "at_edge", "zero_window_tail", "zero_window_next", "zero_window_hole",
             "fastclose_bad_key", "rst_off_fastclose", "rst_then_data", "rst_sack_edge", "rst_sack_evicted", "rst_sack_max",
             "ttl_at_gateway", "ttl_beyond", "syn_established", "urgent", "sack_unsent", "bad_tail", "two_dss", "two_dss_rev",
             *IP_SHAPES, *AUTH_SHAPES, *OOO_SHAPES]
ZW_FILL = 30_000  # bytes after GET /?q= for zero_window_tail: more than the server's small buffer takes
_READ = ("urgent", "sack_unsent", "bad_tail", "two_dss", "v6_dstopt_skip", "tcp_md5_bad_len", "tcp_ao")


def kernel_read(forgery: str, inline: bool = False) -> bytes:
    """What the server application reads when ``forgery`` is sent (the kernel's behaviour, shown by
    the replay test below); ``inline``: through ``mproxy run`` (which raises a low TTL back)."""
    if forgery == "ttl_beyond" and inline:  # (BENIGN reaches the server: its TTL was raised)
        return PART1 + b"BENIGN" + PART2[6:]
    if forgery in OOO_SHAPES:
        return PART1 + OOO_SHAPES[forgery][2]
    if forgery.startswith("zero_window"):
        return PART1 + b"." * ZW_FILL + PART2
    if forgery == "rst_sack_max":  # (the server takes RST + MP_FASTCLOSE: the connection ends there)
        return PART1
    return PART1 + b"BENIGN" + PART2[6:] if forgery in _READ else PART1 + PART2


def wait_for_join(cap: Path, join_ip: str, timeout: float = 10.0) -> None:
    """Until ``cap`` holds an MP_JOIN handshake from ``join_ip`` up to the server's ACK of its third
    packet (the join is established, and what the forgery reads of it is in the capture): a poll
    of the capture, not a fixed 2 s sleep. It takes ~1 s: the join is up within milliseconds, but
    tcpdump gets packets from the kernel's ring a block at a time, when the block retires."""
    from mproxy.io.pcap import CaptureError, read_captures
    from mproxy.wire.packet import ACK, SYN, TcpSegment, parse_frame

    want = socket.inet_pton(socket.AF_INET6 if ":" in join_ip else socket.AF_INET, join_ip)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        port = None
        try:
            for f in read_captures([str(cap)]):
                seg = parse_frame(f.linktype, f.data, f.ts)
                if not isinstance(seg, TcpSegment):
                    continue
                if port is None and seg.src == want and seg.flags & (SYN | ACK) == SYN:
                    port = seg.sport
                elif port is not None and seg.dst == want and seg.dport == port and seg.flags & (SYN | ACK) == ACK:
                    time.sleep(0.1)  # (what follows it on the wire, too)
                    return
        except CaptureError:
            pass  # (tcpdump has not written the file's header yet)
        time.sleep(0.05)
    raise AssertionError(f"no MP_JOIN from {join_ip} established in {cap} within {timeout:g} s")


def run_forgery(lab: Any, cap: Path, forgery: str, go: Path, pause: float = 0.0) -> bytes:
    """The exchange with ``forgery`` sent on the join (``"none"``: nothing), while ``cap`` records
    at the gateway (its keys and sequence numbers are read from there), the client idle for
    ``pause`` s more before the rest of its request; returns what the server application read.
    For ``rst_sack_edge`` the client's SYNs offer no SACK (its sysctl); for ``ttl_beyond`` the
    server drops packets that come with a TTL under 5, as four more routers between the gateway
    and the server would (each put back after)."""
    if forgery == "rst_sack_edge":
        knob = "net.ipv4.tcp_sack"  # (IPv6 too)
        old = lab.run(lab.ns_cli, "sysctl", "-n", knob).stdout.strip()
        lab.run(lab.ns_cli, "sysctl", "-qw", f"{knob}=0")
        undo = [lab.ns_cli, "sysctl", "-qw", f"{knob}={old}"]
    elif forgery == "ttl_beyond":
        hops = ["INPUT", "-m", "ttl", "--ttl-lt", "5", "-j", "DROP"]
        lab.run(lab.ns_srv, "iptables", "-w", "-I", *hops)
        undo = [lab.ns_srv, "iptables", "-w", "-D", *hops]
    else:
        return _run_forgery(lab, cap, forgery, go, pause)
    try:
        return _run_forgery(lab, cap, forgery, go, pause)
    finally:
        lab.run(*undo)


def _run_forgery(lab: Any, cap: Path, forgery: str, go: Path, pause: float) -> bytes:
    from mproxy import crypto
    from tests.oracles import tshark_fields

    a = lab.addresses()
    fam = 6 if forgery.startswith("v6_") else 4
    ipf = "ipv6" if fam == 6 else "ip"
    cli_ip, join_ip, srv_ip = a.client_addr[0][fam], a.client_addr[1][fam], a.server_addr[fam]
    zw = forgery.startswith("zero_window")
    srv = lab.popen(lab.ns_srv, sys.executable, "-c", SERVER, str(fam), *([str(go)] if zw else []),
                    stdout=subprocess.PIPE)
    assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
    pad = [str(PAD)] if forgery == "ooo_past_window" else ["0", str(ZW_FILL)] if zw else []
    cli = lab.popen(lab.ns_cli, sys.executable, "-c", CLIENT, srv_ip, str(go), *pad, stdout=subprocess.PIPE)
    assert cli.stdout is not None and cli.stdout.readline().strip() == b"part1"
    wait_for_join(cap, join_ip)
    (key,) = tshark_fields(cap, ["tcp.options.mptcp.sendkey"],
                           f"tcp.options.mptcp.subtype == 0 && tcp.flags.syn == 0 && {ipf}.src == {cli_ip}")[:1]
    idsn = crypto.key_idsn(int(key[0].split(",")[0]), 1)
    jport, jisn = (int(x) for x in tshark_fields(
        cap, ["tcp.srcport", "tcp.seq_raw"], f"tcp.flags.syn == 1 && tcp.flags.ack == 0 && {ipf}.src == {join_ip}")[0])
    seq, ln, ack, tsval, tsecr = (int(x) for x in tshark_fields(
        cap, ["tcp.seq_raw", "tcp.len", "tcp.ack_raw", "tcp.options.timestamp.tsval",
              "tcp.options.timestamp.tsecr"], f"tcp.srcport == {jport} && {ipf}.src == {join_ip}")[-1])
    nxt = (seq + ln) & 0xFFFFFFFF
    (win,) = (int(x) for x in tshark_fields(cap, ["tcp.window_size"],
                                            f"tcp.dstport == {jport} && {ipf}.dst == {join_ip}")[-1])
    # the gateway's MACs on the client's paths: forgeries are Ethernet frames sent to them
    macs = [lab.run(lab.ns_gw, "cat", f"/sys/class/net/{i}/address").stdout.strip() for i in lab.gw_client_if]
    common = {"src": join_ip, "dst": srv_ip, "sport": jport, "ack": ack, "data_ack": 0,
              "dsn": (idsn + 1 + len(PART1)) & ((1 << 64) - 1)}
    data = dict(common, flags="data", seq=nxt, payload=b"BENIGN".hex(), ssn=(nxt - jisn) & 0xFFFFFFFF)
    if forgery == "none":
        specs = []
    elif forgery == "rst":
        specs = [dict(data, flags="rst")]
    elif forgery == "paws":
        specs = [dict(data, tsval=(tsval - 100_000) & 0xFFFFFFFF, tsecr=tsecr)]
    elif forgery == "spoofed_ack":
        # BENIGN after a hole of ten bytes (as ooo_after_hole: kept until the hole fills), then an ACK
        # with the server's addresses that acknowledges past it, sent from the client's first path to
        # the gateway's MAC: the gateway forwards it on to the join's address, the server never sees
        # it, and its TCP keeps BENIGN out of order. Read on that ACK, BENIGN was the IDS's copy of
        # the DSNs where the server reads UNION SELECT
        h = (nxt + 10) & 0xFFFFFFFF
        sseq, sln = (int(x) for x in tshark_fields(
            cap, ["tcp.seq_raw", "tcp.len"], f"tcp.srcport == {PORT} && tcp.dstport == {jport} && {ipf}.src == {srv_ip}")[-1])
        specs = [dict(data, seq=h, ssn=(h - jisn) & 0xFFFFFFFF),
                 dict(common, src=srv_ip, dst=join_ip, sport=PORT, dport=jport, flags="data", payload="", ssn=0,
                      seq=(sseq + sln) & 0xFFFFFFFF, ack=(h + 6) & 0xFFFFFFFF, l2=[lab.client_if[0], macs[0]])]
    elif forgery == "ack_unsent":  # acknowledges 1 MB the server never sent
        specs = [dict(data, ack=(ack + 1_000_000) & 0xFFFFFFFF)]
    elif forgery == "ack_old":  # acknowledges a point 1 GB behind the server's
        specs = [dict(data, ack=(ack - 1_000_000_000) & 0xFFFFFFFF)]
    elif forgery == "ack_behind":  # one byte behind: on a subflow where the server sent nothing, too old
        specs = [dict(data, ack=(ack - 1) & 0xFFFFFFFF)]
    elif forgery in ("past_window", "at_edge"):  # starts 1000 bytes past the right edge the server
        # last advertised, or exactly at it (Linux drops data there too: over the window)
        at = (nxt + win + (1000 if forgery == "past_window" else 0)) & 0xFFFFFFFF
        specs = [dict(data, seq=at, ssn=(at - jisn) & 0xFFFFFFFF)]
    elif zw:
        # the server reads nothing until the end, and its small buffer fills: it advertises a zero
        # window. Then, on the subflow that carried the last bytes it took, BENIGN at the next
        # subflow byte and DSNs (zero_window_next), or after that last byte again (_tail): Linux
        # drops a segment that brings bytes into a closed window whole (tcp_data_queue), and reads
        # the client's own bytes there once it reads again. Read as inside the furthest edge the
        # subflow advertised (zero_window_next) or as a partial copy (_tail), BENIGN was the IDS's
        # copy of those DSNs
        specs = [_zero_window_spec(cap, ipf, srv_ip, common, forgery[12:])]
    elif forgery == "rst_off_fastclose":
        # an RST with MP_FASTCLOSE naming the server's own key, one byte past the join's next sequence
        # number: Linux answers it with a challenge ACK and reads on (RFC 5961), the option unread
        (skey,) = (int(x[0].split(",")[0]) for x in tshark_fields(
            cap, ["tcp.options.mptcp.recvkey"],
            f"tcp.options.mptcp.subtype == 0 && tcp.flags.syn == 0 && {ipf}.src == {cli_ip}")[:1])
        specs = [dict(common, flags="rst", seq=(nxt + 1) & 0xFFFFFFFF, payload="", ssn=0, fastclose_key=skey)]
    elif forgery == "rst_sack_edge":
        # BENIGN after a hole of ten bytes (kept out of order), then RST + MP_FASTCLOSE naming the
        # server's key at BENIGN's end: with SACK negotiated, the edge of the receiver's SACK block,
        # where Linux takes an RST; the client refused SACK, so the server answers with a challenge
        # ACK and reads on. Taken, it ended the IDS's stream at GET /?q=
        (skey,) = (int(x[0].split(",")[0]) for x in tshark_fields(
            cap, ["tcp.options.mptcp.recvkey"],
            f"tcp.options.mptcp.subtype == 0 && tcp.flags.syn == 0 && {ipf}.src == {cli_ip}")[:1])
        h = (nxt + 10) & 0xFFFFFFFF
        specs = [dict(data, seq=h, ssn=(h - jisn) & 0xFFFFFFFF),
                 dict(common, flags="rst", seq=(h + 6) & 0xFFFFFFFF, payload="", ssn=0, fastclose_key=skey)]
    elif forgery in ("rst_sack_evicted", "rst_sack_max"):
        # five pieces after a hole (mapped 100 kB ahead, never read), the highest first, then RST +
        # MP_FASTCLOSE naming the server's key: at the end of the highest, whose SACK block the four
        # later ones pushed out of the four Linux keeps (a challenge ACK; taken, it ended the IDS's
        # stream at GET /?q=), or at the highest end of the four it keeps (taken)
        (skey,) = (int(x[0].split(",")[0]) for x in tshark_fields(
            cap, ["tcp.options.mptcp.recvkey"],
            f"tcp.options.mptcp.subtype == 0 && tcp.flags.syn == 0 && {ipf}.src == {cli_ip}")[:1])
        specs = [dict(data, seq=(nxt + off) & 0xFFFFFFFF, ssn=(nxt + off - jisn) & 0xFFFFFFFF, payload=b.hex(),
                      dsn=(common["dsn"] + 100_000 + off) & ((1 << 64) - 1))
                 for off, b in ((100, b"BENIGN"), (20, b"xx"), (30, b"xx"), (40, b"xx"), (50, b"xx"))]
        at = 106 if forgery == "rst_sack_evicted" else 52
        specs.append(dict(common, flags="rst", seq=(nxt + at) & 0xFFFFFFFF, payload="", ssn=0, fastclose_key=skey))
    elif forgery in ("ttl_at_gateway", "ttl_beyond"):
        # BENIGN with TTL 1: the gateway drops it (time exceeded), after its capture recorded it; or
        # with TTL 3: the gateway forwards it with 2, and it expires before the server (four more
        # routers, emulated by the server's rule: see run_forgery). The server reads the client's
        # own bytes; read as it came, BENIGN was the IDS's copy of them (a TTL insertion)
        specs = [dict(data, ttl=1 if forgery == "ttl_at_gateway" else 3)]
    elif forgery == "rst_then_data":
        # an RST at the join's next sequence number (the server resets the join), then BENIGN on it:
        # no socket takes it, and the server reads the client's own bytes
        specs = [dict(common, flags="rst", seq=nxt, payload="", ssn=0), data]
    elif forgery == "fastclose_bad_key":  # an ACK with MP_FASTCLOSE: Linux ignores it (wrong key)
        specs = [dict(common, flags="data", seq=nxt, payload="", ssn=0, fastclose_key=0x0123456789ABCDEF)]
    elif forgery == "sack_unsent":  # SACKs 1000 bytes the server never sent
        specs = [dict(data, sack=[(ack + 1000) & 0xFFFFFFFF, (ack + 2000) & 0xFFFFFFFF])]
    elif forgery == "syn_established":
        # a SYN with another ISN on the initial subflow's 4-tuple (where the client's next bytes go):
        # Linux answers it with a challenge ACK and reads on
        first_syn = f"tcp.flags.syn == 1 && tcp.flags.ack == 0 && {ipf}.src == {cli_ip}"
        iport, iisn = (int(x) for x in tshark_fields(cap, ["tcp.srcport", "tcp.seq_raw"], first_syn)[0])
        specs = [dict(common, src=cli_ip, sport=iport, flags="syn", seq=(iisn + 0x40000000) & 0xFFFFFFFF, ack=0,
                      payload="", ssn=0, join_token=0x01020304)]
    elif forgery == "urgent":  # URG (pointer 0: the first byte): an MPTCP socket reads urgent bytes inline
        specs = [dict(data, flags="urgent")]
    elif forgery == "no_ack":
        specs = [dict(data, flags="noack")]
    elif forgery in ("bad_csum", "bad_tail"):
        specs = [dict(data, **{forgery: True})]
    elif forgery in AUTH_SHAPES:
        specs = [dict(data, data_ack=None, tcp_option=AUTH_SHAPES[forgery])]  # (no Data ACK: room for MD5)
    elif forgery in IP_SHAPES:
        specs = [dict(data, **IP_SHAPES[forgery])]
    elif forgery in OOO_SHAPES:
        pieces, fin, _ = OOO_SHAPES[forgery]
        specs, at = [], nxt
        for off, b, *on in pieces:
            dsn = (common["dsn"] + off) & ((1 << 64) - 1)
            if on == ["hole"]:
                h = (at + 10) & 0xFFFFFFFF
                specs.append(dict(data, seq=h, ssn=(h - jisn) & 0xFFFFFFFF, payload=b.hex(), dsn=dsn))
                continue
            if on == ["fin"]:  # a bare FIN ``off`` subflow bytes after the next one
                specs.append(dict(common, flags="fin", seq=(at + off) & 0xFFFFFFFF, payload="", ssn=0))
                continue
            if on:  # on the initial subflow (its MP_CAPABLE SYN's), at its next sequence number
                mpc_syn = "tcp.options.mptcp.subtype == 0 && tcp.flags.syn == 1 && tcp.flags.ack == 0"
                isrc, iport, iisn = tshark_fields(cap, [f"{ipf}.src", "tcp.srcport", "tcp.seq_raw"], mpc_syn)[0]
                # (MPTCP packets only: inline, the capture also has the emitted stream, on these addresses)
                iseq, iln, iack = (int(x) for x in tshark_fields(
                    cap, ["tcp.seq_raw", "tcp.len", "tcp.ack_raw"],
                    f"tcp.srcport == {iport} && {ipf}.src == {isrc} && tcp.options.mptcp.subtype")[-1])
                inxt = (iseq + iln) & 0xFFFFFFFF
                specs.append(dict(data, src=isrc, sport=int(iport), seq=inxt, ack=iack, payload=b.hex(), dsn=dsn,
                                  ssn=(inxt - int(iisn)) & 0xFFFFFFFF))
                continue
            specs.append(dict(data, seq=at, ssn=(at - jisn) & 0xFFFFFFFF, payload=b.hex(), dsn=dsn))
            at = (at + len(b)) & 0xFFFFFFFF
        if fin is not None:
            specs.append(dict(common, flags="data", seq=at, payload="", ssn=0, data_fin=True,
                              dsn=(common["dsn"] + fin) & ((1 << 64) - 1)))
    elif forgery.startswith("two_dss"):
        far = (common["dsn"] + 100_000) & ((1 << 64) - 1)
        first, second = (common["dsn"], far) if forgery == "two_dss" else (far, common["dsn"])
        specs = [dict(data, dsn=first, dsn2=second)]
    else:
        after = (nxt + 1) & 0xFFFFFFFF
        specs = [dict(common, flags="fin", seq=nxt, payload="", ssn=0),
                 dict(data, seq=after, ssn=(after - jisn) & 0xFFFFFFFF)]
    for spec in specs:
        # out of the interface of its source address, as the client's own packets of that subflow go
        # (a raw socket's route ignores the header's source: it left by the first path)
        spec.setdefault("l2", [lab.client_if[1], macs[1]] if spec["src"] == join_ip else [lab.client_if[0], macs[0]])
        lab.run(lab.ns_cli, sys.executable, __file__, "inject", json.dumps(spec))
        time.sleep(0.2)
    time.sleep(pause)
    go.touch()
    out, _ = srv.communicate(timeout=30)
    cli.wait(15)
    return bytes.fromhex(out.split()[-1].decode())


def _zero_window_spec(cap: Path, ipf: str, srv_ip: str, common: dict[str, Any], where: str,
                      timeout: float = 10.0) -> dict[str, Any]:
    """(zero_window_*) Once the capture holds the server's zero-window ACK: ``BENIGN`` at the server's
    DATA_ACK and the next byte of the subflow that carried the bytes before it (``where``:
    ``next``), after a repeat of that last byte (``tail``), or ten bytes further on both levels
    (``hole``)."""
    from tests.oracles import tshark_fields

    end = time.monotonic() + timeout
    while not tshark_fields(cap, ["frame.number"], f"{ipf}.src == {srv_ip} && tcp.window_size_value == 0"):
        assert time.monotonic() < end, "the server's window never closed"
        time.sleep(0.2)
    time.sleep(0.3)  # (the zero-window ACKs of both subflows)
    (fn, dack), *_ = tshark_fields(cap, ["frame.number", "tcp.options.mptcp.rawdataack"],
                                   f"{ipf}.src == {srv_ip} && tcp.window_size_value == 0")
    rows = tshark_fields(cap, [f"{ipf}.src", "tcp.srcport", "tcp.seq_raw", "tcp.len", "tcp.ack_raw",
                               "tcp.options.mptcp.rawdataseqno", "tcp.options.mptcp.datalvllen"],
                         f"tcp.dstport == {PORT} && tcp.len > 0 && frame.number < {fn}")
    # (the last packet whose mapping ends there: not a reinjection of earlier bytes)
    src, sport, seq, ln, ack, *_ = [r for r in rows if r[5] and int(r[5]) + int(r[6]) == int(dack)][-1]
    (isn,) = tshark_fields(cap, ["tcp.seq_raw"], f"tcp.srcport == {sport} && tcp.flags.syn == 1")[0]
    off = {"next": 0, "tail": -1, "hole": 10}[where]
    at = (int(seq) + int(ln) + off) & 0xFFFFFFFF
    return dict(common, src=src, sport=int(sport), flags="data", seq=at, ack=int(ack),
                payload=((b"." if where == "tail" else b"") + b"BENIGN").hex(), ssn=(at - int(isn)) & 0xFFFFFFFF,
                dsn=(int(dack) + off) & ((1 << 64) - 1))


@pytest.mark.parametrize("forgery", FORGERIES)
def test_the_rebuilt_stream_is_what_the_kernel_read_of_forged_segments(forgery: str, tmp_path: Path) -> None:
    from mproxy.cli import main
    from mproxy.lab.topology import Lab
    from tests.oracles import tshark_count, tshark_follow_raw

    cap = tmp_path / "cap.pcap"
    with Lab(rate="30mbit", wire_checksums=True) as lab:  # the capture's checksums are a wire's
        # (BPF's "tcp" matches IPv6 only when TCP follows the fixed header: extension headers too)
        with lab.capture(cap, bpf="tcp or (ip6 and not icmp6)"):
            read = run_forgery(lab, cap, forgery, tmp_path / "go")
    assert read == kernel_read(forgery), read
    if forgery == "at_edge":  # (dropped over the window: kept out of order, the server would SACK it)
        assert tshark_count(cap, "tcp.options.sack_le") == 0
    if forgery == "zero_window_hole":  # (the same into the closed window; a D-SACK of the fill may come)
        assert tshark_count(cap, "tcp.options.sack_le > tcp.ack") == 0
    if forgery == "rst_sack_edge":  # (the shape needs SACK refused: no SYN offered it)
        assert tshark_count(cap, "tcp.flags.syn == 1") >= 4 and tshark_count(cap, "tcp.options.sack_perm") == 0
    out_pcap, log = tmp_path / "out.pcap", tmp_path / "log.jsonl"
    pin = ["--pin-interfaces"] if forgery == "spoofed_ack" else []
    assert main(["replay", str(cap), "--out", str(out_pcap), "--log", str(log), "-q", *pin]) == 0
    (f,) = tshark_follow_raw(out_pcap)
    assert f.client_data == read
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    (rec,) = [r for r in recs if r["event"] == "mptcp_connection"]
    assert rec["c2s"]["sha256"] == hashlib.sha256(read).hexdigest()
    if forgery == "spoofed_ack":
        (n,) = [r for r in recs if r["event"] == "notice" and r["type"] == "wrong_interface"]
        assert n["sport"] == PORT
        # the control: without interface pinning the spoofed ACK makes mproxy read BENIGN
        assert main(["replay", str(cap), "--out", str(tmp_path / "nopin.pcap"), "-q"]) == 0
        (f,) = tshark_follow_raw(tmp_path / "nopin.pcap")
        assert f.client_data != read and b"BENIGN" in f.client_data, f.client_data


REQUEST = b"GET /payload HTTP/1.1\r\n\r\n"
REPLY = b"HTTP/1.1 200 OK\r\n\r\n" + bytes(range(256)) * 40 + b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR"
REPLY_SERVER = f"""
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT})); s.listen(8)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(20)
got = b""
while len(got) < {len(REQUEST)}:
    got += c.recv(65536)
while not os.path.exists(sys.argv[1]):
    pass
c.sendall({REPLY!r})
c.shutdown(socket.SHUT_WR)
while c.recv(65536):
    pass
print(got.hex(), flush=True)
"""
REPLY_CLIENT = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
s.connect((sys.argv[1], {PORT}))
s.sendall({REQUEST!r})
print("sent", flush=True)
s.settimeout(20)
got = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    got += b
s.close()
print(got.hex(), flush=True)
"""


def test_a_forged_data_ack_does_not_hide_the_servers_reply(tmp_path: Path) -> None:
    """The client sends a pure ACK whose DATA_ACK is 100 kB past anything the server sent (a
    forgery: the server ignores it, as past its snd_nxt), then the server replies. Within the loose
    bound mproxy applies (it cannot see paths it does not see), that ack made the reply's bytes a
    side channel: skipped, and the server's real bytes dropped as old when they came, so the IDS
    never read the reply. Now it is noticed and the stream waits: the replay's emitted stream holds
    the reply the client application read, byte for byte."""
    from mproxy import crypto
    from mproxy.cli import main
    from mproxy.lab.topology import Lab
    from tests.oracles import tshark_fields, tshark_follow_raw

    cap, go = tmp_path / "cap.pcap", tmp_path / "go"
    with Lab(rate="30mbit", wire_checksums=True) as lab, lab.capture(cap):
        a = lab.addresses()
        cli_ip, srv_ip = a.client_addr[0][4], a.server_addr[4]
        srv = lab.popen(lab.ns_srv, sys.executable, "-c", REPLY_SERVER, str(go), stdout=subprocess.PIPE)
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
        cli = lab.popen(lab.ns_cli, sys.executable, "-c", REPLY_CLIENT, srv_ip, stdout=subprocess.PIPE)
        assert cli.stdout is not None and cli.stdout.readline().strip() == b"sent"
        mine = f"ip.src == {cli_ip} && tcp.dstport == {PORT}"
        rows: list[list[str]] = []
        end = time.monotonic() + 10
        while time.monotonic() < end:  # (tcpdump writes the kernel ring's packets a block at a time)
            time.sleep(0.3)
            keys = tshark_fields(cap, ["tcp.options.mptcp.recvkey"],
                                 f"{mine} && tcp.options.mptcp.subtype == 0 && tcp.flags.syn == 0")
            rows = tshark_fields(cap, ["tcp.srcport", "tcp.seq_raw", "tcp.len", "tcp.ack_raw"], f"{mine} && tcp.len > 0")
            if keys and rows:
                break
        assert keys and rows, "the request is not in the capture"
        idsn = crypto.key_idsn(int(keys[0][0].split(",")[0]), 1)  # the server's
        sport, seq, ln, ack = (int(x) for x in rows[-1])
        forged = {"src": cli_ip, "dst": srv_ip, "sport": sport, "flags": "data", "seq": (seq + ln) & 0xFFFFFFFF,
                  "ack": ack, "payload": "", "ssn": 0, "dsn": None, "data_ack_only": True,
                  "data_ack": (idsn + 1 + 100_000) & ((1 << 64) - 1)}
        lab.run(lab.ns_cli, sys.executable, __file__, "inject", json.dumps(forged))
        time.sleep(0.3)
        go.touch()
        sout, _ = srv.communicate(timeout=30)
        cout, _ = cli.communicate(timeout=30)
        time.sleep(0.5)
    assert bytes.fromhex(sout.split()[-1].decode()) == REQUEST
    read = bytes.fromhex(cout.split()[-1].decode())
    assert read == REPLY, "the server's reply did not reach the client whole"
    assert tshark_fields(cap, ["frame.number"], f"{mine} && tcp.len == 0 && tcp.options.mptcp.rawdataack == {forged['data_ack']}"), \
        "the forged DATA_ACK is not in the capture"
    out_pcap, log = tmp_path / "out.pcap", tmp_path / "log.jsonl"
    assert main(["replay", str(cap), "--out", str(out_pcap), "--log", str(log), "-q"]) == 0
    (f,) = tshark_follow_raw(out_pcap)
    assert (f.client_data, f.server_data) == (REQUEST, read)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    (rec,) = [r for r in recs if r["event"] == "mptcp_connection"]
    assert rec["s2c"]["sha256"] == hashlib.sha256(read).hexdigest() and rec["s2c"]["gap_bytes"] == 0
    assert [r for r in recs if r["event"] == "notice" and r["type"] == "side_channel"], \
        "the forged DATA_ACK raised no notice"


def test_a_stream_goes_on_over_a_join_after_every_subflow_was_reset(tmp_path: Path) -> None:
    """The client's only subflow is reset (``ss -K``: an RST with MP_TCPRST) after ``GET /?q=UNION ``;
    Linux keeps the connection open (net.mptcp.close_timeout), and a subflow the client then joins
    (a new ``subflow`` endpoint) carries ``SELECT pw ...`` on: the server reads the request whole.
    mproxy ended the connection at the RST and the join came as an unknown token's: the IDS read
    the first half only. Now the replay emits one conversation holding what the server read."""
    from mproxy.cli import main
    from mproxy.lab.topology import Lab
    from tests.oracles import tshark_follow_raw

    cap, go = tmp_path / "cap.pcap", tmp_path / "go"
    with Lab(rate="30mbit", client_subflow=False, wire_checksums=True) as lab, lab.capture(cap):
        a = lab.addresses()
        srv_ip = a.server_addr[4]
        srv = lab.popen(lab.ns_srv, sys.executable, "-c", SERVER, "4", stdout=subprocess.PIPE)
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
        cli = lab.popen(lab.ns_cli, sys.executable, "-c", CLIENT, srv_ip, str(go), stdout=subprocess.PIPE)
        assert cli.stdout is not None and cli.stdout.readline().strip() == b"part1"
        time.sleep(0.3)
        lab.run(lab.ns_cli, "ss", "-K", "-t", "dst", srv_ip)  # the subflow (the MPTCP socket stays)
        assert "ESTAB" not in lab.run(lab.ns_cli, "ss", "-tn", "dst", srv_ip).stdout, "the subflow was not reset"
        lab.run(lab.ns_cli, "ip", "mptcp", "endpoint", "add", a.client_addr[1][4], "dev", lab.client_if[1], "subflow")
        end = time.monotonic() + 10
        while "ESTAB" not in lab.run(lab.ns_cli, "ss", "-tn", "src", a.client_addr[1][4], "dst", srv_ip).stdout:
            assert time.monotonic() < end, "no subflow joined after the reset"
            time.sleep(0.1)
        go.touch()
        out, _ = srv.communicate(timeout=30)
        cli.wait(15)
        mib = lab.mptcp_mib(lab.ns_srv)
        time.sleep(0.5)
    read = bytes.fromhex(out.split()[-1].decode())
    assert read == PART1 + PART2, read
    assert mib.get("MPJoinAckRx", 0) >= 1 and mib.get("MPRstRx", 0) >= 1, mib
    out_pcap, log = tmp_path / "out.pcap", tmp_path / "log.jsonl"
    assert main(["replay", str(cap), "--out", str(out_pcap), "--log", str(log), "-q"]) == 0
    (f,) = tshark_follow_raw(out_pcap)
    assert f.client_data == read
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    (rec,) = [r for r in recs if r["event"] == "mptcp_connection"]
    assert rec["c2s"]["sha256"] == hashlib.sha256(read).hexdigest()
    assert [(sf["role"], sf["reset"]) for sf in rec["subflows"]] == [("initial", True), ("join", False)]
    assert not [r for r in recs if r["event"] == "notice" and r["type"] == "join_unknown_token"]


if __name__ == "__main__" and sys.argv[1:2] == ["inject"]:
    _inject(json.loads(sys.argv[2]))
