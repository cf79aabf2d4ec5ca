"""End-to-end MPTCP scenarios in a fresh lab, captured at the gateway.

Each scenario builds its own :class:`Lab`, runs the traffic apps in the client
and server namespaces while tcpdump records at the gateway, tears the lab
down and returns a :class:`ScenarioResult`: the pcap, the per-connection
records of both ends merged on the initial subflow's 4-tuple, and the lab's
addresses.  These captures are the ground truth for mproxy's offline replay
tests: every byte each application sent, with its SHA-256, is known.

Note: the capture is taken on the gateway's *input*, before iptables, so in
the ``loss`` scenario it also holds the packets the gateway then dropped.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mproxy.lab.topology import Lab, LabAddresses, LabError

__all__ = [
    "Connection",
    "ScenarioResult",
    "ScenarioError",
    "run_transfer",
    "two_paths",
    "path_failure",
    "loss",
    "ipv6",
    "add_addr",
    "concurrent",
    "bidirectional",
    "dss_stripped",
    "fast_open",
    "fast_open_refused",
    "fragments",
    "bulk",
    "SCENARIOS",
]

PORT = 5201
_REPO = Path(__file__).resolve().parents[2]
TINY_CHUNKS = (1, 7, 100, 1460, 16384, 65536)


class ScenarioError(LabError):
    """The scenario's traffic could not run (apps failed to start, timeouts)."""


@dataclass(slots=True)
class Connection:
    """One application connection as both ends saw it (c2s: client to server)."""

    client_addr: str
    client_port: int
    server_addr: str
    server_port: int
    c2s_sent_bytes: int
    c2s_sent_sha256: str
    c2s_recv_bytes: int | None
    c2s_recv_sha256: str | None
    s2c_sent_bytes: int | None
    s2c_sent_sha256: str | None
    s2c_recv_bytes: int
    s2c_recv_sha256: str
    client_ok: bool
    server_ok: bool
    client_error: str | None = None
    server_error: str | None = None
    mptcp: bool | None = None
    client_token: int | None = None
    server_token: int | None = None
    subflows: list[tuple[str, int, str, int]] = field(default_factory=list)
    mptcp_bytes_retrans: int | None = None  # client's data-level reinjected bytes
    seed: int = 0
    reply_seed: int | None = None

    @property
    def intact(self) -> bool:
        """Both ends finished and every byte arrived unchanged, both ways."""
        return (
            self.client_ok and self.server_ok
            and self.c2s_sent_bytes == self.c2s_recv_bytes
            and self.c2s_sent_sha256 == self.c2s_recv_sha256
            and self.s2c_sent_bytes == self.s2c_recv_bytes
            and self.s2c_sent_sha256 == self.s2c_recv_sha256
        )

    @property
    def four_tuple(self) -> tuple[str, int, str, int]:
        return (self.client_addr, self.client_port, self.server_addr, self.server_port)


@dataclass(slots=True)
class ScenarioResult:
    """What a scenario produced; ``events`` are (unix time, what) so they can be put
    next to pcap timestamps."""

    name: str
    capture: Path
    connections: list[Connection]
    addresses: LabAddresses
    family: int
    duration: float
    client_json: Path
    server_json: Path
    expected_connections: int
    events: list[tuple[float, str]] = field(default_factory=list)
    unmatched: list[dict[str, Any]] = field(default_factory=list)
    capture_drops: int = 0  # packets tcpdump reported dropped by the kernel
    # the kernels' own MPTCP counters after the run (non-zero ones), "client" and "server"
    mib: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (not self.unmatched and len(self.connections) == self.expected_connections
                and all(c.intact for c in self.connections))

    def problems(self) -> list[str]:
        """Human-readable reasons why :attr:`ok` is false (for assertion messages)."""
        out = [f"unmatched record: {u}" for u in self.unmatched]
        if len(self.connections) != self.expected_connections:
            out.append(f"{len(self.connections)} connections, expected {self.expected_connections}")
        for c in self.connections:
            if not c.intact:
                out.append(f"{c.four_tuple}: client_ok={c.client_ok} ({c.client_error}) "
                           f"server_ok={c.server_ok} ({c.server_error}) "
                           f"c2s {c.c2s_sent_bytes}->{c.c2s_recv_bytes} "
                           f"sha256 {'same' if c.c2s_sent_sha256 == c.c2s_recv_sha256 else 'DIFFERS'} "
                           f"s2c {c.s2c_sent_bytes}->{c.s2c_recv_bytes} "
                           f"sha256 {'same' if c.s2c_sent_sha256 == c.s2c_recv_sha256 else 'DIFFERS'}")
        if out and self.mib:
            out.append(f"kernel MPTCP counters: {self.mib}")
        return out


# --------------------------------------------------------------------------- runner
def _app_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _readline(p: subprocess.Popen[bytes], timeout: float) -> str:
    assert p.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise ScenarioError(f"no line from {p.args!r} within {timeout}s")
            ch = os.read(p.stdout.fileno(), 1)
            if not ch:
                raise ScenarioError(f"{p.args!r} exited ({p.wait()}) before printing a line")
            buf += ch
    finally:
        sel.close()
    return buf.decode().strip()


def _merge(client: list[dict[str, Any]], server: list[dict[str, Any]]
           ) -> tuple[list[Connection], list[dict[str, Any]]]:
    """Join client and server records on the initial subflow's 4-tuple."""
    by_tuple = {(s["peer_addr"], s["peer_port"], s["local_addr"], s["local_port"]): s for s in server}
    conns: list[Connection] = []
    unmatched: list[dict[str, Any]] = []
    for c in client:
        key = (c["local_addr"], c["local_port"], c["remote_addr"], c["remote_port"])
        s = by_tuple.pop(key, None)
        if s is None:
            unmatched.append({"side": "client", **c})
            if not c.get("local_port"):
                continue  # never connected: nothing to pair
        conns.append(Connection(
            client_addr=c["local_addr"], client_port=c["local_port"],
            server_addr=c["remote_addr"], server_port=c["remote_port"],
            c2s_sent_bytes=c["sent_bytes"], c2s_sent_sha256=c["sent_sha256"],
            c2s_recv_bytes=s["recv_bytes"] if s else None, c2s_recv_sha256=s["recv_sha256"] if s else None,
            s2c_sent_bytes=s["sent_bytes"] if s else None, s2c_sent_sha256=s["sent_sha256"] if s else None,
            s2c_recv_bytes=c["recv_bytes"], s2c_recv_sha256=c["recv_sha256"],
            client_ok=c["ok"], server_ok=bool(s and s["ok"]),
            client_error=c["error"], server_error=s["error"] if s else "no server record",
            mptcp=c.get("mptcp"), client_token=c.get("token"), server_token=s.get("token") if s else None,
            subflows=[tuple(x) for x in c.get("subflows", [])],  # type: ignore[misc]
            mptcp_bytes_retrans=c.get("mptcp_bytes_retrans"),
            seed=c["seed"], reply_seed=s.get("reply_seed") if s else None,
        ))
    unmatched.extend({"side": "server", **s} for s in by_tuple.values())
    return conns, unmatched


def run_transfer(
    lab: Lab,
    keep: str | os.PathLike[str],
    name: str,
    *,
    family: int = 4,
    connections: int = 1,
    c2s_bytes: int = 1_000_000,
    s2c_bytes: int = 1_000_000,
    chunks: Sequence[int] | None = None,
    server_chunks: Sequence[int] | None = None,
    nodelay: bool = False,
    concurrent_reply: bool = False,
    rate: float = 0.0,
    on_progress: Callable[[int], None] | None = None,
    timeout: float = 60.0,
    snaplen: int = 0,
    capture_iface: str | Sequence[str] = "any",
    seed: int = 1,
    fast_open: bool = False,
    capture_ns: str | None = None,
    capture_direction: str = "in",
    connect: str | None = None,
) -> ScenarioResult:
    """Run the client/server apps once in *lab* while capturing at its gateway.

    *on_progress(pct)* is called from a helper thread each time the client has
    written another 10% (with *rate* pacing that is a clock you can act on,
    e.g. to cut a path mid-transfer).
    """
    out = Path(keep)
    out.mkdir(parents=True, exist_ok=True)
    cap, cjson, sjson = out / f"{name}.pcap", out / f"{name}.client.json", out / f"{name}.server.json"
    for f in (cap, cjson, sjson):
        f.unlink(missing_ok=True)
    py, env = sys.executable, _app_env()
    common = ["--port", str(PORT), "--timeout", str(timeout), "--io-timeout", str(min(timeout, 20.0))]
    if nodelay:
        common.append("--nodelay")
    if fast_open:
        common.append("--fast-open")
    server_argv = [py, "-m", "mproxy.lab.apps", "server", *common, "--connections", str(connections),
                   "--reply-bytes", str(s2c_bytes), "--out", str(sjson)]
    if server_chunks:
        server_argv += ["--chunks", ",".join(map(str, server_chunks))]
    if concurrent_reply:
        server_argv.append("--concurrent-reply")
    target = connect or lab.server_addr[family]
    client_argv = [py, "-m", "mproxy.lab.apps", "client", *common, "--connect", target,
                   "--connections", str(connections), "--bytes", str(c2s_bytes),
                   "--seed", str(seed), "--out", str(cjson), "--progress"]
    if chunks:
        client_argv += ["--chunks", ",".join(map(str, chunks))]
    if rate:
        client_argv += ["--rate", str(rate)]

    events: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with lab.capture(cap, iface=capture_iface, snaplen=snaplen, ns=capture_ns, direction=capture_direction):
        srv = lab.popen(lab.ns_srv, *server_argv, stdout=subprocess.PIPE, env=env)
        line = _readline(srv, 15)
        if not line.startswith("READY"):
            raise ScenarioError(f"server said {line!r}")
        events.append((time.time(), "server ready"))
        cli = lab.popen(lab.ns_cli, *client_argv, stdout=subprocess.PIPE, env=env)
        hook_errors: list[BaseException] = []

        def pump() -> None:
            assert cli.stdout is not None
            for raw in cli.stdout:
                parts = raw.decode(errors="replace").split()
                if len(parts) == 2 and parts[0] == "PROGRESS" and on_progress:
                    try:
                        on_progress(int(parts[1]))
                    except BaseException as exc:  # noqa: BLE001 - re-raised below
                        hook_errors.append(exc)

        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        try:
            try:
                cli.wait(timeout + 15)
            except subprocess.TimeoutExpired as exc:
                raise ScenarioError(f"client did not finish within {timeout + 15}s") from exc
            pumper.join(5)
            try:
                srv.wait(10)
            except subprocess.TimeoutExpired:
                srv.send_signal(signal.SIGTERM)  # it writes what it has, flagged unfinished
                srv.wait(10)
            time.sleep(0.2)  # let the last FIN/ACKs cross the gateway into the pcap
        finally:
            for p in (cli, srv):
                if p.stdout and p.poll() is not None:
                    p.stdout.close()
        if hook_errors:
            raise hook_errors[0]
    duration = time.monotonic() - t0
    mib = {"client": lab.mptcp_mib(lab.ns_cli), "server": lab.mptcp_mib(lab.ns_srv)}
    try:
        cdata = json.loads(cjson.read_text())["connections"]
        sdata = json.loads(sjson.read_text())["connections"]
    except (OSError, ValueError, KeyError) as exc:
        raise ScenarioError(f"missing or bad app output in {out}: {exc}") from exc
    conns, unmatched = _merge(cdata, sdata)
    return ScenarioResult(name=name, capture=cap, connections=conns, addresses=lab.addresses(),
                          family=family, duration=duration, client_json=cjson, server_json=sjson,
                          expected_connections=connections, events=events, unmatched=unmatched,
                          capture_drops=lab.capture_drops, mib=mib)


# --------------------------------------------------------------------------- scenarios
def two_paths(keep: str | os.PathLike[str], *, family: int = 4, size: int = 2_000_000,
              rate: str = "30mbit", name: str = "two_paths") -> ScenarioResult:
    """One connection, both directions ~2 MB over two shaped paths: both subflows carry data."""
    with Lab(rate=rate) as lab:
        return run_transfer(lab, keep, name, family=family, c2s_bytes=size, s2c_bytes=size)


def ipv6(keep: str | os.PathLike[str]) -> ScenarioResult:
    """two_paths over IPv6 (subflow endpoint and policy routing on the v6 addresses)."""
    return two_paths(keep, family=6, name="ipv6")


def path_failure(keep: str | os.PathLike[str], *, cut_path: int = 1, size: int = 3_000_000,
                 at_pct: int = 30) -> ScenarioResult:
    """Cut one client path once *at_pct* % is written; MPTCP must reinject and finish.

    The client is paced (~1.5 s for the upload) so the cut lands mid-transfer
    whatever the socket buffers absorb.  The reply (after the upload) can only
    use the surviving path.
    """
    with Lab(rate="20mbit") as lab:
        done = threading.Event()
        events: list[tuple[float, str]] = []

        def cut(pct: int) -> None:
            if pct >= at_pct and not done.is_set():
                done.set()
                lab.link(cut_path, up=False)
                events.append((time.time(), f"link {cut_path} down"))

        res = run_transfer(lab, keep, "path_failure", c2s_bytes=size, s2c_bytes=1_000_000,
                           rate=4_000_000, on_progress=cut)
        res.events.extend(events)
        if not done.is_set():
            raise ScenarioError("path was never cut (no progress reported)")
        return res


def loss(keep: str | os.PathLike[str], *, probability: float = 0.02,
         size: int = 1_000_000) -> ScenarioResult:
    """Random drop on both paths, both directions, at the gateway (after capture).

    SYNs are spared so the join subflow reliably comes up and the loss hits data
    and ACKs on both subflows (a lost join SYN would leave a one-path transfer).
    """
    with Lab(rate="30mbit") as lab:
        for p in (0, 1):
            lab.loss(p, probability, spare_syn=True)
        return run_transfer(lab, keep, "loss", c2s_bytes=size, s2c_bytes=size)


def add_addr(keep: str | os.PathLike[str], *, size: int = 1_500_000,
             family: int = 4) -> ScenarioResult:
    """Server announces its second address (ADD_ADDR); the client joins to it."""
    with Lab(rate="30mbit", server_signal=True) as lab:
        return run_transfer(lab, keep, "add_addr", family=family, c2s_bytes=size, s2c_bytes=size)


def mixed_families(keep: str | os.PathLike[str], *, size: int = 1_500_000) -> ScenarioResult:
    """One connection over IPv4 and IPv6 subflows: a dual-stack client socket (AF_INET6) connects
    to the server's IPv4 address as ``::ffff:198.18.10.2`` (its initial subflow is IPv4 on the
    wire), the server announces its second addresses of both families (ADD_ADDR), and the client
    joins them, IPv6 to IPv6 (Linux lets an IPv6 MPTCP socket mix families)."""
    with Lab(rate="30mbit", server_signal=True) as lab:
        return run_transfer(lab, keep, "mixed_families", c2s_bytes=size, s2c_bytes=size,
                            connect=f"::ffff:{lab.server_addr[4]}")


def concurrent(keep: str | os.PathLike[str], *, connections: int = 12,
               size: int = 200_000) -> ScenarioResult:
    """12 connections at once, written in mixed tiny/large chunks with TCP_NODELAY."""
    with Lab(rate="40mbit") as lab:
        return run_transfer(lab, keep, "concurrent", connections=connections, c2s_bytes=size,
                            s2c_bytes=size, chunks=TINY_CHUNKS, server_chunks=TINY_CHUNKS[::-1],
                            nodelay=True)


def bidirectional(keep: str | os.PathLike[str], *, size: int = 2_000_000) -> ScenarioResult:
    """Both ends send ~2 MB at the same time (server replies while still reading)."""
    with Lab(rate="30mbit") as lab:
        return run_transfer(lab, keep, "bidirectional", c2s_bytes=size, s2c_bytes=size,
                            concurrent_reply=True)


def dss_stripped(keep: str | os.PathLike[str], *, after: int = 300_000, size: int = 1_000_000,
                 attempts: int = 3) -> ScenarioResult:
    """A middlebox on the client's path strips DSS options once *after* bytes went by: both
    kernels fall back to TCP mid-connection (MIB ``DssFallback``), the rest is plain TCP.

    One client path (Linux cannot fall back once a join is up); both ends send at once, so
    the server's data after its fallback carries no DSS either (a client that never gets bare
    data never falls back and stalls: such a run is tried again, up to *attempts* times).
    The gateway captures what the middlebox let through, as an IDS behind it would see.
    Seen on Linux 6.18: in most runs one receiver gets fewer bytes than its peer wrote, with
    no error on either side -- the kernel loses data in this fallback; the ground truth for
    what crossed is then what the receiving application read.
    """
    queue = 7
    res: ScenarioResult | None = None
    for attempt in range(1, attempts + 1):
        with Lab(rate="30mbit", client_subflow=False, gso=False) as lab:
            for tool in ("iptables", "ip6tables"):
                lab.run(lab.ns_cli, tool, "-w", "-t", "mangle", "-A", "POSTROUTING", "-p", "tcp", "--dport",
                        str(PORT), "-j", "NFQUEUE", "--queue-num", str(queue))
            box = lab.popen(lab.ns_cli, sys.executable, "-m", "mproxy.lab.strip_dss", "--queue", str(queue),
                            "--after", str(after), stdout=subprocess.PIPE, env=_app_env())
            line = _readline(box, 15)
            if line.strip() != "ready":
                raise ScenarioError(f"the DSS-stripping middlebox said {line!r}")
            res = run_transfer(lab, keep, "dss_stripped", c2s_bytes=size, s2c_bytes=size, concurrent_reply=True,
                               timeout=20)
        res.events.append((time.time(), f"attempt {attempt}"))
        both = all(res.mib.get(end, {}).get("DssFallback", 0) for end in ("client", "server"))
        if both and res.connections and all(c.client_ok and c.server_ok for c in res.connections):
            return res
    assert res is not None
    return res


def fast_open(keep: str | os.PathLike[str], *, taken: bool = True, size: int = 1_000_000,
              name: str | None = None) -> ScenarioResult:
    """TCP Fast Open on MPTCP (RFC 8684 B.3): the client's SYN carries the first bytes of its
    request (``FAST_OPEN_HEAD`` of mproxy.lab.apps, an SQL injection), then ~1 MB over two
    shaped paths. ``taken``: the server accepts data in a SYN without a cookie and takes
    them (they reach its application ahead of the data-level stream, with no DSN); else it
    wants a cookie and refuses them, the client sends them again after the handshake and
    Linux 6.18 falls back to TCP there (its handshake ACK carries no MP_CAPABLE)."""
    with Lab(rate="30mbit") as lab, lab.fast_open(taken):
        return run_transfer(lab, keep, name or ("fast_open" if taken else "fast_open_refused"), c2s_bytes=size,
                            s2c_bytes=size // 4, fast_open=True)


def fragments(keep: str | os.PathLike[str], *, size: int = 1_500_000, mtu: int = 1000) -> ScenarioResult:
    """IP fragments on the wire: the client's stack does not set DF (``ip_no_pmtu_disc``) and the
    gateway forwards onto a link to the server with a smaller MTU (the server announces the MSS
    of a 1500-byte link all the same): every full client-to-server packet, on both subflows,
    crosses that link as fragments. Captured where a sensor behind that link would
    see them: arriving at the server, before its stack reassembles them."""
    from mproxy.lab.topology import _LAB_NET4

    with Lab(rate="30mbit") as lab:
        lab.run(lab.ns_cli, "sysctl", "-qw", "net.ipv4.ip_no_pmtu_disc=1")
        # the link's two ends take no frame over the MTU: the server sends segments that fit, but
        # still announces the MSS of a 1500-byte link so that the client's do not
        for ns, dev in ((lab.ns_gw, lab.gw_server_if), (lab.ns_srv, lab.server_if)):
            lab.run(ns, "ip", "link", "set", "dev", dev, "mtu", str(mtu))
        lab.run(lab.ns_srv, "ip", "-4", "route", "replace", _LAB_NET4, "via", lab.gw_server_addr[4], "dev",
                lab.server_if, "advmss", "1460")
        return run_transfer(lab, keep, "fragments", c2s_bytes=size, s2c_bytes=size // 3,
                            capture_ns=lab.ns_srv, capture_iface=lab.server_if, capture_direction="inout")


def fast_open_refused(keep: str | os.PathLike[str]) -> ScenarioResult:
    """fast_open with a server that refuses the SYN's bytes (see there)."""
    return fast_open(keep, taken=False)


def bulk(size_mb: float, shaped: bool = False, *, keep: str | os.PathLike[str] | None = None,
         connections: int = 2, gso: bool = True, rate: str = "400mbit") -> ScenarioResult:
    """A large multi-path capture for benchmarks (``size_mb`` MB client to server in total).

    Unshaped by default (fast, but the joins carry only ~1-10% of the data);
    ``shaped`` applies *rate* per path, which spreads ~40% onto the joins.  Full
    packets are captured (snaplen 0).  *keep* defaults to a fresh temp dir.
    """
    if keep is None:
        keep = tempfile.mkdtemp(prefix="mproxy-bulk-")
    per_conn = int(size_mb * 1_000_000 / connections)
    with Lab(rate=rate if shaped else None, gso=gso) as lab:
        return run_transfer(lab, keep, "bulk", connections=connections, c2s_bytes=per_conn,
                            s2c_bytes=min(per_conn, 1_000_000), timeout=max(60.0, size_mb * 2),
                            snaplen=0)


SCENARIOS: dict[str, Callable[[str | os.PathLike[str]], ScenarioResult]] = {
    "two_paths": two_paths,
    "path_failure": path_failure,
    "loss": loss,
    "ipv6": ipv6,
    "add_addr": add_addr,
    "mixed_families": mixed_families,
    "concurrent": concurrent,
    "bidirectional": bidirectional,
    "dss_stripped": dss_stripped,
    "fast_open": fast_open,
    "fast_open_refused": fast_open_refused,
    "fragments": fragments,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mproxy.lab.scenarios NAME [KEEP]``: run one scenario and print a summary."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in {*SCENARIOS, "bulk"}:
        print(f"usage: NAME [KEEP_DIR]; NAME in {', '.join([*SCENARIOS, 'bulk'])}", file=sys.stderr)
        return 2
    keep = args[1] if len(args) > 1 else tempfile.mkdtemp(prefix="mproxy-lab-")
    res = bulk(50, keep=keep) if args[0] == "bulk" else SCENARIOS[args[0]](keep)
    print(json.dumps({"name": res.name, "ok": res.ok, "capture": str(res.capture),
                      "duration": round(res.duration, 2), "problems": res.problems(),
                      "connections": [c.four_tuple for c in res.connections]}, indent=1))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
