"""Make ``mproxy/samples/split-attack.pcap``: an SQL injection split across two MPTCP subflows.

    python -m mproxy.lab.make_sample OUT.pcap      (root: builds a throw-away lab)

One real kernel MPTCP connection from the client's two paths to an HTTP server
on port 80, captured at the lab's gateway: a benign request and its response,
then a request whose URI carries ``1' UNION SELECT password FROM users--``
with the first part on the initial subflow (path 0) and the rest on the join
subflow (path 1), then the response.  Any per-TCP-connection reassembler sees
``...UNION+SELE`` on one subflow and ``CT+password...`` on the other; only a
data-level (MPTCP) reassembler sees the whole string.

The kernel scheduler decides which subflow carries a write; it is steered by
endpoint *backup* flags (``ip mptcp endpoint change ... backup``, which also
makes the kernel send MP_PRIO): part 1 while path 1 is backup, part 2 after
path 0 became backup and path 1 not.  Each part is written only once the
previous bytes reached the server.  The result is checked with tshark (per
subflow payloads) and generation is retried when the split did not happen.
The same module runs the HTTP client and server inside the namespaces
(``--role``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mproxy.lab.topology import Lab

IPPROTO_MPTCP = 262
HTTP_PORT = 80
HOST = "shop.example"
BENIGN = f"GET /index.html HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: sample/1\r\n\r\n".encode()
ATTACK_PART1 = b"GET /search?q=1%27+UNION+SELE"
ATTACK_PART2 = f"CT+password+FROM+users-- HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: sample/1\r\n\r\n".encode()
ATTACK_NEEDLE = b"UNION+SELECT"
ATTACK_URI = "/search?q=1%27+UNION+SELECT+password+FROM+users--"
_REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- apps (in a namespace)
def _http_response(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nServer: sample/1\r\nContent-Type: text/html\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _server(port: int) -> int:
    """Answer HTTP requests on one MPTCP connection; print ``RECV total`` after each read."""
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, IPPROTO_MPTCP)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port))
    ls.listen(8)
    ls.settimeout(30)
    print("READY", flush=True)
    conn, _ = ls.accept()
    conn.settimeout(30)
    buf, total = b"", 0
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            total += len(data)
            print(f"RECV {total}", flush=True)
            buf += data
            while b"\r\n\r\n" in buf:
                head, buf = buf.split(b"\r\n\r\n", 1)
                uri = head.split(b"\r\n", 1)[0].split(b" ")[1]
                if uri.startswith(b"/search"):
                    body = b"<html><body><h1>Search</h1><p>No products found.</p></body></html>\n"
                else:
                    body = b"<html><body><h1>Shop</h1><p>Welcome to the example shop.</p></body></html>\n"
                conn.sendall(_http_response(body))
    time.sleep(0.5)  # the listener outlives the connection, so late MP_JOINs are not reset
    ls.close()
    return 0


def _client(addr: str, port: int) -> int:
    """Connect, then obey stdin: ``send HEX``, ``response`` (read one), ``close``; print ``OK ...``."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM, IPPROTO_MPTCP)
    s.settimeout(20)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect((addr, port))
    print("OK connected", flush=True)
    pending = b""
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "send":
            s.sendall(bytes.fromhex(arg))
            print("OK sent", flush=True)
        elif cmd == "response":
            while b"\r\n\r\n" not in pending:
                pending += s.recv(65536)
            head, pending = pending.split(b"\r\n\r\n", 1)
            length = next(int(h.split(b":", 1)[1]) for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length:"))
            while len(pending) < length:
                pending += s.recv(65536)
            pending = pending[length:]
            print("OK " + head.split(b"\r\n", 1)[0].decode(), flush=True)
        elif cmd == "close":
            s.close()
            print("OK closed", flush=True)
            return 0
    return 1


# --------------------------------------------------------------------------- orchestration
class SampleError(RuntimeError):
    """The capture did not come out as wanted (e.g. the kernel did not split the request)."""


def _app_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _endpoint_id(lab: Lab, ns: str, addr: str) -> str:
    for ln in lab.run(ns, "ip", "mptcp", "endpoint", "show").stdout.splitlines():
        parts = ln.split()
        if parts and parts[0] == addr and "id" in parts:
            return parts[parts.index("id") + 1]
    raise SampleError(f"no MPTCP endpoint {addr} in {ns}")


def generate(out: Path) -> None:
    """One attempt: build a lab, run the exchange, write the gateway capture to *out*."""
    from mproxy.lab.scenarios import _readline
    from mproxy.lab.topology import Lab

    py, env = sys.executable, _app_env()
    me = [py, "-m", "mproxy.lab.make_sample"]
    with Lab(rate=None, gso=False) as lab:
        c0, c1 = lab.client_addr[0][4], lab.client_addr[1][4]
        # An endpoint for the initial subflow's address, so its backup flag can be changed too.
        lab.run(lab.ns_cli, "ip", "mptcp", "endpoint", "add", c0, "dev", lab.client_if[0])
        id0, id1 = _endpoint_id(lab, lab.ns_cli, c0), _endpoint_id(lab, lab.ns_cli, c1)
        lab.run(lab.ns_cli, "ip", "mptcp", "endpoint", "change", "id", id1, "backup")
        with lab.capture(out, snaplen=0):
            srv = lab.popen(lab.ns_srv, *me, "--role", "server", "--port", str(HTTP_PORT),
                            stdout=subprocess.PIPE, env=env)
            if _readline(srv, 15) != "READY":
                raise SampleError("server did not start")
            cli = lab.popen(lab.ns_cli, *me, "--role", "client", "--connect", lab.server_addr[4],
                            "--port", str(HTTP_PORT), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            assert cli.stdin is not None
            if not _readline(cli, 15).startswith("OK"):
                raise SampleError("client did not connect")
            sent = 0

            def do(cmd: str) -> str:
                assert cli.stdin is not None
                cli.stdin.write(f"{cmd}\n".encode())
                cli.stdin.flush()
                reply = _readline(cli, 15)
                if not reply.startswith("OK"):
                    raise SampleError(f"client: {reply}")
                return reply

            def send(data: bytes) -> None:
                nonlocal sent
                do(f"send {data.hex()}")
                sent += len(data)
                while True:  # until the server has read every byte so far
                    line = _readline(srv, 15)
                    if line == f"RECV {sent}":
                        return

            send(BENIGN)
            do("response")
            _wait_subflows(lab, 2)  # the join starts once the connection is fully established
            send(ATTACK_PART1)
            # Path 1 becomes the only non-backup subflow (MP_PRIO both ways on the wire).
            lab.run(lab.ns_cli, "ip", "mptcp", "endpoint", "change", "id", id1, "nobackup")
            lab.run(lab.ns_cli, "ip", "mptcp", "endpoint", "change", "id", id0, "backup")
            time.sleep(0.2)
            send(ATTACK_PART2)
            do("response")
            do("close")
            srv.wait(15)
            time.sleep(0.3)


def _wait_subflows(lab: Lab, n: int, timeout: float = 5.0) -> None:
    """Until the client has *n* established TCP subflows to the HTTP port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.run(lab.ns_cli, "ss", "-tnH", "state", "established").stdout
        if sum(1 for ln in out.splitlines() if f":{HTTP_PORT} " in ln or ln.rstrip().endswith(f":{HTTP_PORT}")) >= n:
            return
        time.sleep(0.05)
    raise SampleError(f"fewer than {n} subflows came up")


def _tshark(pcap: Path, *args: str) -> str:
    cp = subprocess.run(["tshark", "-n", "-r", str(pcap), *args], capture_output=True, text=True, timeout=120)
    if cp.returncode != 0:
        raise SampleError(f"tshark {' '.join(args)}: {cp.stderr.strip()}")
    return cp.stdout


def subflow_payloads(pcap: Path) -> dict[int, bytes]:
    """Client-to-server bytes of each TCP stream as tshark's follow rebuilds it (node 0's side)."""
    streams = sorted({int(x) for x in _tshark(pcap, "-T", "fields", "-e", "tcp.stream").split()})
    args: list[str] = ["-q"]
    for s in streams:
        args += ["-z", f"follow,tcp,raw,{s}"]
    out: dict[int, bytes] = {}
    cur: int | None = None
    hexes: list[str] = []
    for line in _tshark(pcap, *args).splitlines():
        if line.startswith("Filter:"):
            if cur is not None:
                out[cur] = bytes.fromhex("".join(hexes))
            cur, hexes = int(line.split()[-1]), []
        elif line and not line.startswith(("\t", "=", "Follow:", "Node ")):
            hexes.append(line.strip())
    if cur is not None:
        out[cur] = bytes.fromhex("".join(hexes))
    return out


def check(pcap: Path) -> list[str]:
    """Why *pcap* is not the wanted sample (empty list: it is)."""
    problems: list[str] = []
    if not _tshark(pcap, "-Y", "mptcp", "-c", "1").strip():
        problems.append("no MPTCP in the capture")
    payloads = subflow_payloads(pcap)
    with_p1 = [s for s, b in payloads.items() if ATTACK_PART1 in b]
    with_p2 = [s for s, b in payloads.items() if ATTACK_PART2 in b]
    whole = [s for s, b in payloads.items() if ATTACK_NEEDLE in b or b"UNION SELECT" in b]
    if len(payloads) < 2:
        problems.append(f"{len(payloads)} TCP streams, want two subflows")
    if whole:
        problems.append(f"TCP stream(s) {whole} carry the attack whole: the kernel did not split it")
    if not with_p1 or not with_p2:
        problems.append(f"attack parts missing: part 1 in {with_p1}, part 2 in {with_p2}")
    elif set(with_p1) & set(with_p2):
        problems.append("both parts on the same subflow")
    if not any(BENIGN in b for b in payloads.values()):
        problems.append("benign request missing")
    return problems


def make(out: Path, attempts: int = 5) -> None:
    """Generate until :func:`check` passes (the scheduler is steered, not commanded)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    last: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mproxy-sample-") as tmp:
        for i in range(attempts):
            cand = Path(tmp) / f"try{i}.pcap"
            try:
                generate(cand)
                last = check(cand)
            except Exception as exc:  # noqa: BLE001 - a failed attempt is retried
                last = [f"{type(exc).__name__}: {exc}"]
            if not last:
                shutil.copyfile(cand, out)
                return
            print(f"make_sample: attempt {i + 1} failed: {'; '.join(last)}", file=sys.stderr)
    raise SampleError(f"no good sample after {attempts} attempts: {'; '.join(last)}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mproxy.lab.make_sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="output pcap (e.g. mproxy/samples/split-attack.pcap)")
    p.add_argument("--attempts", type=int, default=5)
    p.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    p.add_argument("--connect", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=HTTP_PORT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "server":
        return _server(args.port)
    if args.role == "client":
        return _client(args.connect, args.port)
    if not args.out:
        p.error("OUT.pcap is required")
    from mproxy.lab.topology import lab_available

    reason = lab_available()
    if reason:
        print(f"make_sample: {reason}", file=sys.stderr)
        return 2
    try:
        make(Path(args.out), args.attempts)
    except SampleError as exc:
        print(f"make_sample: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    print(f"make_sample: wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
