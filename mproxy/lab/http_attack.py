"""An HTTP exchange over real kernel MPTCP whose attack request is split across the two client paths.

Used by the fast-close lab tests and ``make demo``. The server and client run
inside the lab's namespaces (``python -m mproxy.lab.http_attack --role ...``)
and talk to the orchestrator in JSON lines; the server writes every byte it
receives to a file as it arrives, so a test can say exactly what reached the
application, and both report *how* their connection ended (``reset``, ``eof``)
and when (``time.time()``; one clock, the namespaces share it).

Steering: the kernel scheduler picks the subflow for each write; endpoint
backup flags steer it (as in :mod:`mproxy.lab.make_sample`): :meth:`Exchange.steer`
makes one path the only non-backup one, and each part is sent only after the
previous bytes reached the server application.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mproxy.lab.topology import Lab

IPPROTO_MPTCP = 262
_REPO = Path(__file__).resolve().parents[2]
HOST = "shop.example"
BENIGN = f"GET /index.html HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: demo/1\r\n\r\n".encode()
ATTACK_PART1 = b"GET /search?q=1%27+UNION+SELE"
ATTACK_PART2 = f"CT+password+FROM+users-- HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: demo/1\r\n\r\n".encode()
NEEDLE = b"UNION+SELECT"


def _emit(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


# --------------------------------------------------------------------------- apps (in a namespace)
def _response(uri: bytes) -> bytes:
    body = (b"<html><body><h1>Search</h1><p>No products found.</p></body></html>\n" if uri.startswith(b"/search")
            else b"<html><body><h1>Shop</h1><p>Welcome to the example shop.</p></body></html>\n")
    return (f"HTTP/1.1 200 OK\r\nServer: demo/1\r\nContent-Type: text/html\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


def _serve_one(conn: socket.socket, n: int, record: str) -> None:
    total = 0
    sha = hashlib.sha256()
    how = "eof"
    buf = b""
    with conn, open(f"{record}.{n}", "wb") as out:
        conn.settimeout(60)
        while True:
            try:
                data = conn.recv(65536)
            except ConnectionResetError:
                how = "reset"
                break
            except OSError as e:
                how = f"error {e.errno}"
                break
            if not data:
                break
            out.write(data)
            out.flush()
            total += len(data)
            sha.update(data)
            _emit(ev="recv", conn=n, total=total)
            buf += data
            while b"\r\n\r\n" in buf:
                head, buf = buf.split(b"\r\n\r\n", 1)
                parts = head.split(b"\r\n", 1)[0].split(b" ")
                try:
                    conn.sendall(_response(parts[1] if len(parts) > 1 else b"/"))
                except OSError:
                    pass
    _emit(ev="end", conn=n, how=how, t=time.time(), total=total, sha256=sha.hexdigest())


def run_server(port: int, record: str) -> int:
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, IPPROTO_MPTCP)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    # TCP Fast Open allowed (it takes effect only where net.ipv4.tcp_fastopen enables the server side)
    ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
    ls.bind(("::", port))
    ls.listen(16)
    _emit(ev="ready")
    n = 0
    while True:
        conn, peer = ls.accept()
        n += 1
        _emit(ev="accept", conn=n, peer=peer[0], port=peer[1])
        threading.Thread(target=_serve_one, args=(conn, n, record), daemon=True).start()


def run_client(addr: str, port: int, fast_open: bytes = b"") -> int:
    """Obey stdin: ``send HEX``, ``response``, ``wait SECONDS``, ``close``; one JSON line per command.
    ``fast_open``: bytes sent in the SYN (TCP Fast Open) instead of a plain connect."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM, IPPROTO_MPTCP)
    s.settimeout(20)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if fast_open:
        s.sendto(fast_open, socket.MSG_FASTOPEN, (addr, port))
    else:
        s.connect((addr, port))
    local = s.getsockname()
    _emit(ok=True, ev="connected", sport=local[1])
    pending = b""
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "send":
                s.sendall(bytes.fromhex(arg))
                _emit(ok=True, ev="sent", t=time.time())
            elif cmd == "response":
                while b"\r\n\r\n" not in pending:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionAbortedError("eof")
                    pending += chunk
                head, pending = pending.split(b"\r\n\r\n", 1)
                length = next(int(h.split(b":", 1)[1]) for h in head.split(b"\r\n")
                              if h.lower().startswith(b"content-length:"))
                while len(pending) < length:
                    pending += s.recv(65536)
                pending = pending[length:]
                _emit(ok=True, ev="response", status=head.split(b"\r\n", 1)[0].decode())
            elif cmd == "wait":
                s.settimeout(float(arg))
                how = "timeout"
                try:
                    while True:
                        if not s.recv(65536):
                            how = "eof"
                            break
                except ConnectionResetError:
                    how = "reset"
                except TimeoutError:
                    how = "timeout"
                _emit(ok=True, ev="ended", how=how, t=time.time())
            elif cmd == "close":
                s.close()
                _emit(ok=True, ev="closed")
                return 0
        except ConnectionResetError:
            _emit(ok=False, ev="ended", how="reset", t=time.time())
        except OSError as e:
            _emit(ok=False, ev="error", error=str(e), t=time.time())
    return 0


# --------------------------------------------------------------------------- orchestration
class ExchangeError(RuntimeError):
    pass


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _reader(p: subprocess.Popen[bytes], q: queue.Queue[dict[str, Any]]) -> None:
    assert p.stdout is not None
    for raw in p.stdout:
        try:
            q.put(json.loads(raw))
        except ValueError:
            q.put({"ev": "garbage", "line": raw.decode(errors="replace")})
    q.put({"ev": "exit"})


def prepare_steering(lab: Lab) -> None:
    """Endpoints for both client paths (the initial one too, so its backup flag can change); path 1 backup."""
    for fam in (4, 6):
        lab.run(lab.ns_cli, "ip", "mptcp", "endpoint", "add", lab.client_addr[0][fam], "dev", lab.client_if[0],
                check=False)
    steer(lab, 0)


def _endpoint_ids(lab: Lab) -> dict[str, str]:
    ids = {}
    for ln in lab.run(lab.ns_cli, "ip", "mptcp", "endpoint", "show").stdout.splitlines():
        parts = ln.split()
        if parts and "id" in parts:
            ids[parts[0]] = parts[parts.index("id") + 1]
    return ids


def steer(lab: Lab, path: int) -> None:
    """Make client ``path`` the only non-backup one (MP_PRIO goes out on the wire)."""
    ids = _endpoint_ids(lab)
    for p in (path, 1 - path):  # un-backup first, so there is always a usable path
        for fam in (4, 6):
            eid = ids.get(lab.client_addr[p][fam])
            if eid is not None:
                lab.run(lab.ns_cli, "ip", "mptcp", "endpoint", "change", "id", eid,
                        "nobackup" if p == path else "backup")


class Server:
    """The recording HTTP server in the server namespace (one per lab; serves many connections)."""

    def __init__(self, lab: Lab, record_dir: Path, port: int = 80) -> None:
        self.lab, self.port = lab, port
        self.record = record_dir / "server-received"
        record_dir.mkdir(parents=True, exist_ok=True)
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.proc = lab.popen(lab.ns_srv, sys.executable, "-m", "mproxy.lab.http_attack", "--role", "server",
                              "--port", str(port), "--record", str(self.record), stdout=subprocess.PIPE, env=_env(),
                              start_new_session=True)  # a Ctrl-C is for the orchestrator, not the apps
        threading.Thread(target=_reader, args=(self.proc, self.q), daemon=True).start()
        self.wait_for(lambda e: e.get("ev") == "ready", 15)

    def wait_for(self, pred: Any, timeout: float) -> dict[str, Any]:
        for e in self.events:
            if pred(e):
                return e
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExchangeError(f"server: timeout waiting (events {self.events[-5:]})")
            try:
                e = self.q.get(timeout=left)
            except queue.Empty:
                continue
            self.events.append(e)
            if e.get("ev") == "exit":
                raise ExchangeError("server exited")
            if pred(e):
                return e

    def drain(self, quiet: float = 0.5) -> list[dict[str, Any]]:
        """Every event so far: those already read, and the rest until none came for ``quiet`` s."""
        while True:
            try:
                self.events.append(self.q.get(timeout=quiet))
            except queue.Empty:
                return self.events

    def received(self, conn: int | None) -> bytes:
        """What the server application read on connection ``conn`` (None: one it never accepted)."""
        if conn is None:
            return b""
        p = Path(f"{self.record}.{conn}")
        return p.read_bytes() if p.exists() else b""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class Client:
    def __init__(self, lab: Lab, server: Server, family: int = 4, fast_open: bytes = b"") -> None:
        self.lab, self.server = lab, server
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = lab.popen(lab.ns_cli, sys.executable, "-m", "mproxy.lab.http_attack", "--role", "client",
                              "--connect", lab.server_addr[family], "--port", str(server.port),
                              "--fast-open", fast_open.hex(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env(), start_new_session=True)
        threading.Thread(target=_reader, args=(self.proc, self.q), daemon=True).start()
        hello = self._reply(15)
        if hello.get("ev") != "connected":
            raise ExchangeError(f"client did not connect: {hello}")
        self.sport = int(hello["sport"])
        self.conn: int | None = None
        if not fast_open:  # (a Fast Open SYN an inline gateway drops may never be accepted at all)
            self.conn = server.wait_for(lambda e: e.get("ev") == "accept" and e.get("port") == self.sport,
                                        10)["conn"]
        self.sent = 0

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            e = self.q.get(timeout=timeout)
        except queue.Empty:
            raise ExchangeError("client: no reply") from None
        if e.get("ev") == "exit":
            raise ExchangeError("client exited")
        return e

    def cmd(self, line: str, timeout: float = 15) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()
        return self._reply(timeout)

    def send(self, data: bytes, *, until_received: bool = True) -> dict[str, Any]:
        r = self.cmd(f"send {data.hex()}")
        self.sent += len(data)
        if until_received and r.get("ok"):
            total = self.sent
            self.server.wait_for(lambda e: e.get("ev") == "recv" and e.get("conn") == self.conn
                                 and e.get("total", 0) >= total, 10)
        return r

    def response(self) -> dict[str, Any]:
        return self.cmd("response")

    def wait_end(self, seconds: float) -> dict[str, Any]:
        return self.cmd(f"wait {seconds}", timeout=seconds + 10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd("close", 5)
            except (ExchangeError, OSError):
                pass
            self.proc.kill()
            self.proc.wait(5)


def wait_subflows(lab: Lab, port: int, n: int, timeout: float = 5.0) -> None:
    """Until the client has ``n`` established TCP subflows to ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.run(lab.ns_cli, "ss", "-tnH", "state", "established").stdout
        if sum(1 for ln in out.splitlines() if ln.split() and ln.split()[-1].rsplit(":", 1)[-1] == str(port)) >= n:
            return
        time.sleep(0.05)
    raise ExchangeError(f"fewer than {n} subflows came up")


def benign_first(lab: Lab, client: Client, port: int = 80) -> dict[str, Any]:
    """A benign request and its response on path 0, then wait until the connection has its second
    subflow (on path 1): how every exchange of the lab tests begins. Returns the response."""
    steer(lab, 0)
    client.send(BENIGN)
    resp = client.response()
    wait_subflows(lab, port, 2)
    return resp


def split_attack(lab: Lab, client: Client, port: int = 80, part2: bytes = ATTACK_PART2) -> dict[str, Any]:
    """Benign request/response, then the attack: part 1 on path 0, ``part2`` on path 1; then wait for the end.

    Returns ``{"part2_sent": t, "client": {...how it ended...}}``.
    """
    benign_first(lab, client, port)
    client.send(ATTACK_PART1)
    steer(lab, 1)
    time.sleep(0.2)  # MP_PRIO reaches the server and the scheduler
    r = client.send(part2, until_received=False)
    t_sent = float(r.get("t", time.time()))
    end = r if r.get("ev") == "ended" else client.wait_end(3.0)
    return {"part2_sent": t_sent, "client": end}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mproxy.lab.http_attack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("server", "client"), required=True)
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--record", default="/tmp/mproxy-http-received")
    ap.add_argument("--connect")
    ap.add_argument("--fast-open", default="", help="client: hex bytes to send in the SYN (TCP Fast Open)")
    a = ap.parse_args(argv)
    if a.role == "server":
        return run_server(a.port, a.record)
    return run_client(a.connect, a.port, bytes.fromhex(a.fast_open))


if __name__ == "__main__":
    sys.exit(main())
