"""MPTCP traffic applications for the lab, run inside a namespace.

    python -m mproxy.lab.apps server --port 5201 --connections 4 --reply-bytes 1000000 --out s.json
    python -m mproxy.lab.apps client --connect 198.18.10.2 --port 5201 --connections 4 \
        --bytes 1000000 --out c.json

Both ends record, per connection, the initial subflow's 4-tuple (what
getsockname/getpeername return on an MPTCP socket) and the byte count and
SHA-256 of each direction, so a test can check that every byte sent arrived
and can match the records against what the gateway captured (or what mproxy
rebuilt).  The payload is seeded pseudo-random data, so it is reproducible and
does not compress or repeat.  Every blocking call has a timeout: a broken path
fails a scenario instead of hanging it.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1
MPTCP_SUBFLOW_ADDRS = 3
TCP_IS_MPTCP = 43
BLOCK = 65536


# --------------------------------------------------------------------------- data
def pattern(seed: int, size: int, chunks: Sequence[int] = (BLOCK,)) -> Iterator[bytes]:
    """Yield *size* bytes of seeded pseudo-random data, cut in the cycling *chunks* sizes.

    The bytes depend only on (seed, size), never on the chunking, so a sender
    using 1-byte writes and a checker using one block agree.
    """
    rng = random.Random(seed)
    block = b""
    pos = 0
    ci = 0
    left = size
    while left > 0:
        want = min(chunks[ci % len(chunks)], left)
        ci += 1
        out = bytearray()
        while len(out) < want:
            if pos >= len(block):
                block, pos = rng.randbytes(BLOCK), 0
            take = min(want - len(out), len(block) - pos)
            out += block[pos:pos + take]
            pos += take
        left -= want
        yield bytes(out)


def pattern_bytes(seed: int, size: int) -> bytes:
    """The whole pattern at once (for checks)."""
    return b"".join(pattern(seed, size))


def _norm(addr: str) -> str:
    """Strip IPv4-mapped IPv6 (dual-stack listeners report ::ffff:a.b.c.d)."""
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def _parse_sockaddr(raw: bytes) -> tuple[str, int] | None:
    fam = struct.unpack_from("=H", raw, 0)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if fam == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if fam == socket.AF_INET6:
        return _norm(socket.inet_ntop(socket.AF_INET6, raw[8:24])), port
    return None


def _getsockopt(sock: socket.socket, level: int, opt: int, buf: bytes) -> bytes:
    """getsockopt with an *input* buffer (Python's only passes a zeroed one)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    cbuf = ctypes.create_string_buffer(buf, len(buf))
    ln = ctypes.c_uint32(len(buf))
    if libc.getsockopt(sock.fileno(), level, opt, cbuf, ctypes.byref(ln)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return cbuf.raw[: ln.value]


def mptcp_state(sock: socket.socket) -> dict[str, Any]:
    """Best-effort MPTCP facts of a socket: still MPTCP?, local token, subflow 4-tuples.

    Lets tests tell a fallback to plain TCP from a real multipath connection,
    and lets mproxy tests match its tokens and subflows against the kernel's.
    """
    st: dict[str, Any] = {"mptcp": None, "token": None, "subflows": [], "bytes_retrans": None}
    try:
        st["mptcp"] = bool(sock.getsockopt(socket.IPPROTO_TCP, TCP_IS_MPTCP))
    except OSError:
        pass
    try:
        info = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 256)
        if len(info) >= 16:
            st["token"] = struct.unpack_from("=I", info, 12)[0]
        if len(info) >= 56:  # mptcpi_bytes_retrans (Linux >= 6.5): data-level reinjections
            st["bytes_retrans"] = struct.unpack_from("=Q", info, 48)[0]
    except OSError:
        pass
    try:
        esz, n = 256, 16
        hdr = struct.pack("=IIII", 16, 0, 0, esz)
        raw = _getsockopt(sock, SOL_MPTCP, MPTCP_SUBFLOW_ADDRS, hdr + bytes(esz * n))
        _, num, _, _ = struct.unpack_from("=IIII", raw, 0)
        for i in range(min(num, n)):
            base = 16 + i * esz
            if base + esz > len(raw):
                break
            loc = _parse_sockaddr(raw[base:base + 128])
            rem = _parse_sockaddr(raw[base + 128:base + 256])
            if loc and rem:
                st["subflows"].append([loc[0], loc[1], rem[0], rem[1]])
    except (OSError, struct.error):
        pass
    return st


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _write_json(path: str | None, obj: dict[str, Any]) -> None:
    if not path:
        json.dump(obj, sys.stdout, indent=1)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def _chunks(spec: str) -> list[int]:
    sizes = [int(x) for x in spec.split(",") if x.strip()]
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError("chunk sizes must be positive integers")
    return sizes


class _Pacer:
    """Sleep so at most *rate* bytes/s leave (0: unlimited); lets a test act mid-transfer."""

    __slots__ = ("rate", "t0", "sent")

    def __init__(self, rate: float) -> None:
        self.rate, self.t0, self.sent = rate, time.monotonic(), 0

    def account(self, n: int) -> None:
        if self.rate <= 0:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.t0)
        if ahead > 0.002:
            time.sleep(ahead)


def _send(sock: socket.socket, seed: int, size: int, chunks: Sequence[int], rate: float,
          progress: _Progress | None = None, head: bytes = b"") -> tuple[int, str]:
    """Write ``size`` pattern bytes; ``head``: bytes already written before them (counted)."""
    h = hashlib.sha256(head)
    n = len(head)
    pacer = _Pacer(rate)
    for piece in pattern(seed, size, chunks):
        sock.sendall(piece)
        h.update(piece)
        n += len(piece)
        pacer.account(len(piece))
        if progress:
            progress.add(len(piece))
    return n, h.hexdigest()


def _recv_all(sock: socket.socket, limit: int | None = None) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while limit is None or n < limit:
        want = BLOCK if limit is None else min(BLOCK, limit - n)
        data = sock.recv(want)
        if not data:
            break
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


class _Progress:
    """Prints ``PROGRESS pct`` lines at 10% steps so a runner can act mid-transfer."""

    __slots__ = ("total", "done", "next_pct", "lock")

    def __init__(self, total: int) -> None:
        self.total, self.done, self.next_pct, self.lock = max(total, 1), 0, 10, threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            pct = self.done * 100 // self.total
            while pct >= self.next_pct and self.next_pct <= 100:
                print(f"PROGRESS {self.next_pct}", flush=True)
                self.next_pct += 10


# --------------------------------------------------------------------------- server
@dataclass(slots=True)
class ServerRecord:
    index: int
    peer_addr: str
    peer_port: int
    local_addr: str
    local_port: int
    reply_seed: int
    recv_bytes: int = 0
    recv_sha256: str = ""
    sent_bytes: int = 0
    sent_sha256: str = ""
    ok: bool = False
    error: str | None = None
    mptcp: bool | None = None
    token: int | None = None
    mptcp_bytes_retrans: int | None = None
    subflows: list[list[Any]] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0


def _serve_conn(conn: socket.socket, rec: ServerRecord, args: argparse.Namespace) -> None:
    rec.start = time.time()
    writer_err: list[BaseException] = []

    def write() -> None:
        try:
            rec.sent_bytes, rec.sent_sha256 = _send(conn, rec.reply_seed, args.reply_bytes,
                                                    args.chunks, args.rate)
            conn.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # noqa: BLE001 - recorded, not raised
            writer_err.append(exc)

    try:
        conn.settimeout(args.io_timeout)
        if args.nodelay:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wt = threading.Thread(target=write, daemon=True)
        if args.concurrent_reply:
            wt.start()
        rec.recv_bytes, rec.recv_sha256 = _recv_all(conn, args.request_bytes)
        if not args.concurrent_reply:
            wt.start()
        wt.join(args.timeout)
        if wt.is_alive():
            raise TimeoutError("reply writer did not finish")
        if writer_err:
            raise writer_err[0]
        if args.request_bytes is not None and args.drain:
            _recv_all(conn)  # consume the rest, so close() does not RST on unread data
        st = mptcp_state(conn)
        rec.mptcp, rec.token, rec.subflows = st["mptcp"], st["token"], st["subflows"]
        rec.mptcp_bytes_retrans = st["bytes_retrans"]
        rec.ok = True
    except BaseException as exc:  # noqa: BLE001
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.end = time.time()
        conn.close()


def run_server(args: argparse.Namespace) -> int:
    fam = _family(args.bind)
    ls = socket.socket(fam, socket.SOCK_STREAM, IPPROTO_MPTCP)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if args.fast_open:
        ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 64)
    ls.bind((args.bind, args.port))
    ls.listen(128)
    ls.settimeout(0.2)
    port = ls.getsockname()[1]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"READY {port}", flush=True)

    records: list[ServerRecord] = []
    threads: list[threading.Thread] = []
    deadline = time.monotonic() + args.timeout
    while not stop.is_set() and time.monotonic() < deadline:
        if args.connections and len(records) >= args.connections:
            break
        try:
            conn, peer = ls.accept()
        except TimeoutError:
            continue
        local = conn.getsockname()
        rec = ServerRecord(len(records), _norm(peer[0]), peer[1], _norm(local[0]), local[1],
                           args.reply_seed + len(records))
        records.append(rec)
        t = threading.Thread(target=_serve_conn, args=(conn, rec, args), daemon=True)
        t.start()
        threads.append(t)
    # The listener must outlive the connections: MP_JOIN SYNs are looked up on it,
    # and closing it right after accept() makes the kernel RST late joins.
    for t in threads:
        while t.is_alive() and not stop.is_set() and time.monotonic() < deadline:
            t.join(0.2)
        if stop.is_set():
            t.join(1.0)
    ls.close()
    for rec in records:
        if not rec.ok and rec.error is None:
            rec.error = "unfinished (timeout or SIGTERM)"
    complete = bool(args.connections) and len(records) >= args.connections
    _write_json(args.out, {"role": "server", "port": port, "complete": complete,
                           "connections": [asdict(r) for r in records]})
    return 0 if records and all(r.ok for r in records) else 1


# --------------------------------------------------------------------------- client
@dataclass(slots=True)
class ClientRecord:
    index: int
    seed: int
    local_addr: str = ""
    local_port: int = 0
    remote_addr: str = ""
    remote_port: int = 0
    sent_bytes: int = 0
    sent_sha256: str = ""
    recv_bytes: int = 0
    recv_sha256: str = ""
    ok: bool = False
    error: str | None = None
    mptcp: bool | None = None
    token: int | None = None
    mptcp_bytes_retrans: int | None = None
    subflows: list[list[Any]] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    fast_open_bytes: int = 0  # of the head, how many the SYN carried (TCP Fast Open)


# what --fast-open sends first: a request line an IDS rule must see, whichever packet carries it
FAST_OPEN_HEAD = b"GET /login.php?user=admin%27%20UNION%20SELECT%20password%20FROM%20users-- HTTP/1.1\r\n"


def _client_conn(rec: ClientRecord, args: argparse.Namespace, progress: _Progress | None) -> None:
    rec.start = time.time()
    sock = socket.socket(_family(args.connect), socket.SOCK_STREAM, IPPROTO_MPTCP)
    writer_err: list[BaseException] = []
    head = FAST_OPEN_HEAD if args.fast_open else b""

    def write() -> None:
        try:
            rec.sent_bytes, rec.sent_sha256 = _send(sock, rec.seed, args.bytes, args.chunks,
                                                    args.rate, progress, head)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # noqa: BLE001
            writer_err.append(exc)

    try:
        sock.settimeout(args.io_timeout)
        if args.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if args.bind:
            sock.bind((args.bind, 0))
        if head:
            # TCP Fast Open: the head rides in the SYN, as much of it as the kernel puts there
            rec.fast_open_bytes = sock.sendto(head, socket.MSG_FASTOPEN, (args.connect, args.port))
            sock.sendall(head[rec.fast_open_bytes:])
        else:
            sock.connect((args.connect, args.port))
        la, ra = sock.getsockname(), sock.getpeername()
        rec.local_addr, rec.local_port = _norm(la[0]), la[1]
        rec.remote_addr, rec.remote_port = _norm(ra[0]), ra[1]
        wt = threading.Thread(target=write, daemon=True)
        wt.start()
        rec.recv_bytes, rec.recv_sha256 = _recv_all(sock)
        wt.join(args.timeout)
        if wt.is_alive():
            raise TimeoutError("writer did not finish")
        if writer_err:
            raise writer_err[0]
        st = mptcp_state(sock)
        rec.mptcp, rec.token, rec.subflows = st["mptcp"], st["token"], st["subflows"]
        rec.mptcp_bytes_retrans = st["bytes_retrans"]
        rec.ok = True
    except BaseException as exc:  # noqa: BLE001
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.end = time.time()
        sock.close()


def run_client(args: argparse.Namespace) -> int:
    records = [ClientRecord(i, args.seed + i) for i in range(args.connections)]
    progress = _Progress(args.bytes * args.connections) if args.progress else None
    threads = [threading.Thread(target=_client_conn, args=(r, args, progress), daemon=True)
               for r in records]
    deadline = time.monotonic() + args.timeout
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.01))
    for rec in records:
        if not rec.ok and rec.error is None:
            rec.error = "unfinished (timeout)"
    _write_json(args.out, {"role": "client", "connect": args.connect, "port": args.port,
                           "connections": [asdict(r) for r in records]})
    return 0 if all(r.ok for r in records) else 1


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mproxy.lab.apps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--port", type=int, default=5201)
        sp.add_argument("--chunks", type=_chunks, default=[BLOCK],
                        help="comma-separated write sizes, cycled (e.g. 1,7,1460,65536)")
        sp.add_argument("--rate", type=float, default=0.0, help="pace writes to B/s per connection")
        sp.add_argument("--nodelay", action="store_true", help="TCP_NODELAY: tiny writes stay tiny")
        sp.add_argument("--timeout", type=float, default=60.0, help="overall deadline (s)")
        sp.add_argument("--io-timeout", type=float, default=20.0, help="per socket operation (s)")
        sp.add_argument("--out", help="JSON output file (default stdout)")
        sp.add_argument("--fast-open", action="store_true",
                        help="TCP Fast Open (server: accept it; client: send FAST_OPEN_HEAD in the SYN first)")

    s = sub.add_parser("server", help="accept MPTCP connections, read the request, reply")
    common(s)
    s.add_argument("--bind", default="::", help="listen address (:: = dual-stack)")
    s.add_argument("--connections", type=int, default=0, help="exit after this many (0: until SIGTERM)")
    s.add_argument("--reply-bytes", type=int, default=0)
    s.add_argument("--reply-seed", type=int, default=1_000_000)
    s.add_argument("--request-bytes", type=int, default=None, help="read this many bytes, not to EOF")
    s.add_argument("--drain", action="store_true", help="with --request-bytes: still read to EOF")
    s.add_argument("--concurrent-reply", action="store_true", help="reply while still reading")

    c = sub.add_parser("client", help="open K MPTCP connections, send M bytes each, read reply")
    common(c)
    c.add_argument("--connect", required=True)
    c.add_argument("--bind", default=None, help="source address of the initial subflow")
    c.add_argument("--connections", type=int, default=1)
    c.add_argument("--bytes", type=int, default=1_000_000)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--progress", action="store_true", help="print PROGRESS pct lines to stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_server(args) if args.role == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())
