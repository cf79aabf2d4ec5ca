"""Three-namespace MPTCP lab: client (two paths) -- gateway -- server (two addresses).

The gateway is where mproxy will sit (NFQUEUE in FORWARD) and where captures
are taken, so every client<->server packet is routed through it::

    {prefix}-cli                    {prefix}-gw                     {prefix}-srv
    c0 198.18.1.2  ===path 0===  gc0 198.18.1.1
    c1 198.18.2.2  ===path 1===  gc1 198.18.2.1
                                    gs0 198.18.10.1 ===========  s0 198.18.10.2
                                    gs1 198.18.11.1 ===========  s1 198.18.11.2

IPv6 mirrors it in 2001:db8:{1,2,10,11}::/64.  Attributes (families keyed 4/6,
paths 0/1): ``client_addr[path][fam]``, ``server_addr[fam]``, ``server_addr2[fam]``,
``gw_client_addr[path][fam]``, ``gw_server_addr[fam]``, ``gw_server_addr2[fam]``;
interfaces ``client_if[path]``, ``gw_client_if[path]``, ``gw_server_if``,
``gw_server_if2``, ``server_if``, ``server_if2``; namespaces ``ns_cli``,
``ns_gw``, ``ns_srv``.  Only 198.18.0.0/15 and
2001:db8::/32 are ever routed (no default routes), so nothing can leave the
lab by mistake.  Interfaces are created directly inside their namespaces, so
several labs can run side by side with the same interface names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Lab",
    "LabAddresses",
    "LabError",
    "lab_available",
    "cleanup_stale",
    "NS_PREFIX",
    "list_netns",
]

NS_PREFIX = "mpx"
_NS_RE = re.compile(rf"^{NS_PREFIX}-(\d+)-([0-9a-f]{{4}})-(cli|gw|srv)$")
_ROLES = ("cli", "gw", "srv")
_TABLE = 101  # policy-routing table for the second address of client / server
_LAB_NET4 = "198.18.0.0/15"
_LAB_NET6 = "2001:db8::/32"

Family = int  # 4 or 6


class LabError(RuntimeError):
    """A lab command failed; carries the command and its stderr."""


def _check_tools() -> str | None:
    for tool in ("ip", "tc", "iptables", "ip6tables", "tcpdump", "tshark"):
        if shutil.which(tool) is None:
            return f"{tool} not found in PATH"
    return None


def lab_available() -> str | None:
    """Why the lab cannot run here, or None when it can (tests skip on the reason)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "not a POSIX system"
    if os.geteuid() != 0:
        return "lab needs root (network namespaces, iptables, tcpdump)"
    reason = _check_tools()
    if reason:
        return reason
    try:
        enabled = Path("/proc/sys/net/mptcp/enabled").read_text().strip()
    except OSError:
        return "kernel has no MPTCP (/proc/sys/net/mptcp/enabled missing)"
    if enabled != "1":
        return "MPTCP disabled (net.mptcp.enabled != 1)"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` unusable: {exc}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    try:  # a killed but not yet reaped creator is a zombie: its labs are stale too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def list_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_ns_pids(ns: str) -> None:
    """Kill processes left in one of *our* namespaces so its deletion really frees it."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout
    for tok in out.split():
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(tok), signal.SIGKILL)


def _delete_ns(ns: str) -> None:
    _kill_ns_pids(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def cleanup_stale() -> list[str]:
    """Delete lab namespaces whose creating process is gone (crashed runs).

    Only names of our own form (``mpx-PID-XXXX-role``) with a dead PID are touched,
    so concurrently running labs survive.
    """
    removed: list[str] = []
    for ns in list_netns():
        m = _NS_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _delete_ns(ns)
            removed.append(ns)
    return removed


@dataclass(slots=True, frozen=True)
class LabAddresses:
    """Plain-data snapshot of a lab's addressing; survives the lab's teardown.

    Families are keyed 4 and 6; paths are 0 and 1.
    """

    prefix: str
    ns_cli: str
    ns_gw: str
    ns_srv: str
    client_if: tuple[str, ...]
    gw_client_if: tuple[str, ...]
    gw_server_if: str
    gw_server_if2: str
    server_if: str
    server_if2: str
    client_addr: tuple[dict[Family, str], ...]
    gw_client_addr: tuple[dict[Family, str], ...]
    server_addr: dict[Family, str]
    server_addr2: dict[Family, str]
    gw_server_addr: dict[Family, str]
    gw_server_addr2: dict[Family, str]

    def path_of(self, client_ip: str) -> int | None:
        """Client path index that owns *client_ip*, if any."""
        for i, fams in enumerate(self.client_addr):
            if client_ip in fams.values():
                return i
        return None


@dataclass(slots=True)
class _Link:
    ns_a: str
    if_a: str
    ns_b: str
    if_b: str
    addr_a: dict[Family, str]
    addr_b: dict[Family, str]
    plen: dict[Family, int]


@dataclass(slots=True)
class Lab:
    """Context manager that builds (and always tears down) the lab namespaces.

    ``rate``: tbf rate on both directions of both client paths (e.g. "30mbit"),
    so the default min-RTT scheduler fills one path and spills onto the other;
    None disables shaping (benchmarks).  ``server_signal`` adds the server's
    second addresses as ``signal`` endpoints, so it announces them (ADD_ADDR).
    ``gso=False`` caps every veth at one MTU-sized segment per packet, so
    captures look like a real wire instead of carrying 64 KB GSO super-packets.
    ``wire_checksums=True`` has every veth end fill in its TCP checksums in software
    (``ethtool -K IF tx off``): a capture then carries the checksums a wire carries, not
    the unfilled ones of checksum offload.
    """

    rate: str | None = "30mbit"
    server_signal: bool = False
    client_subflow: bool = True
    gso: bool = True
    wire_checksums: bool = False
    prefix: str = field(default_factory=lambda: f"{NS_PREFIX}-{os.getpid()}-{secrets.token_hex(2)}")

    ns_cli: str = field(init=False)
    ns_gw: str = field(init=False)
    ns_srv: str = field(init=False)
    client_if: tuple[str, str] = field(init=False, default=("c0", "c1"))
    gw_client_if: tuple[str, str] = field(init=False, default=("gc0", "gc1"))
    gw_server_if: str = field(init=False, default="gs0")
    gw_server_if2: str = field(init=False, default="gs1")
    server_if: str = field(init=False, default="s0")
    server_if2: str = field(init=False, default="s1")
    client_addr: tuple[dict[Family, str], dict[Family, str]] = field(init=False)
    gw_client_addr: tuple[dict[Family, str], dict[Family, str]] = field(init=False)
    server_addr: dict[Family, str] = field(init=False)
    server_addr2: dict[Family, str] = field(init=False)
    gw_server_addr: dict[Family, str] = field(init=False)
    gw_server_addr2: dict[Family, str] = field(init=False)

    _links: list[_Link] = field(init=False, default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(init=False, default_factory=list)
    _loss_rules: dict[int, list[tuple[str, list[str]]]] = field(init=False, default_factory=dict)
    _up: bool = field(init=False, default=False)
    capture_drops: int = field(init=False, default=0)  # packets tcpdump said the kernel dropped

    def __post_init__(self) -> None:
        self.ns_cli, self.ns_gw, self.ns_srv = (f"{self.prefix}-{r}" for r in _ROLES)
        self.client_addr = ({4: "198.18.1.2", 6: "2001:db8:1::2"}, {4: "198.18.2.2", 6: "2001:db8:2::2"})
        self.gw_client_addr = ({4: "198.18.1.1", 6: "2001:db8:1::1"}, {4: "198.18.2.1", 6: "2001:db8:2::1"})
        self.server_addr = {4: "198.18.10.2", 6: "2001:db8:10::2"}
        self.server_addr2 = {4: "198.18.11.2", 6: "2001:db8:11::2"}
        self.gw_server_addr = {4: "198.18.10.1", 6: "2001:db8:10::1"}
        self.gw_server_addr2 = {4: "198.18.11.1", 6: "2001:db8:11::1"}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Lab:
        reason = lab_available()
        if reason:
            raise LabError(f"lab unavailable: {reason}")
        cleanup_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop our processes and delete the namespaces; safe to call twice."""
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.kill()
        for p in self._procs:
            with contextlib.suppress(subprocess.SubprocessError):
                p.wait(timeout=5)
            for pipe in (p.stdin, p.stdout, p.stderr):
                if pipe:
                    pipe.close()
        self._procs.clear()
        for ns in (self.ns_cli, self.ns_gw, self.ns_srv):
            if ns in list_netns():
                _delete_ns(ns)
        self._up = False

    def addresses(self) -> LabAddresses:
        return LabAddresses(
            prefix=self.prefix, ns_cli=self.ns_cli, ns_gw=self.ns_gw, ns_srv=self.ns_srv,
            client_if=tuple(self.client_if), gw_client_if=tuple(self.gw_client_if),
            gw_server_if=self.gw_server_if, gw_server_if2=self.gw_server_if2,
            server_if=self.server_if, server_if2=self.server_if2,
            client_addr=tuple(dict(d) for d in self.client_addr),
            gw_client_addr=tuple(dict(d) for d in self.gw_client_addr),
            server_addr=dict(self.server_addr), server_addr2=dict(self.server_addr2),
            gw_server_addr=dict(self.gw_server_addr), gw_server_addr2=dict(self.gw_server_addr2),
        )

    def mptcp_mib(self, ns: str) -> dict[str, int]:
        """The kernel's MPTCP counters (``MPTcpExt`` of /proc/net/netstat) in *ns* that are not 0:
        how the kernel itself saw the connections (fallbacks, resets, DSS corruption)."""
        text = self.run(ns, "cat", "/proc/net/netstat", check=False).stdout
        rows = [line.split() for line in text.splitlines() if line.startswith("MPTcpExt:")]
        if len(rows) != 2:
            return {}
        return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:]) if v.isdigit() and int(v)}

    # ------------------------------------------------------------------ commands
    def run(self, ns: str | None, *argv: str, check: bool = True, timeout: float = 30,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run *argv* inside namespace *ns* (None: the host); raise LabError on failure."""
        cmd = self._wrap(ns, argv)
        try:
            cp = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"timeout after {timeout}s: {' '.join(cmd)}") from exc
        res = subprocess.CompletedProcess(cmd, cp.returncode, cp.stdout.decode(errors="replace"),
                                          cp.stderr.decode(errors="replace"))
        if check and cp.returncode != 0:
            raise LabError(f"`{' '.join(cmd)}` exited {cp.returncode}: {res.stderr.strip()}")
        return res

    def popen(self, ns: str | None, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
        """Start *argv* in *ns*; the Popen's pid is the program itself (ip netns exec execs).

        The lab kills it at teardown if it is still running.
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        p: subprocess.Popen[bytes] = subprocess.Popen(self._wrap(ns, argv), **kw)  # type: ignore[call-overload]
        self._procs.append(p)
        return p

    @staticmethod
    def _wrap(ns: str | None, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)

    def ns(self, role: str) -> str:
        """Namespace name for a role: 'cli', 'gw' or 'srv'."""
        return {"cli": self.ns_cli, "gw": self.ns_gw, "srv": self.ns_srv}[role]

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        for ns in (self.ns_cli, self.ns_gw, self.ns_srv):
            self.run(None, "ip", "netns", "add", ns)
            self.run(ns, "ip", "link", "set", "lo", "up")
            for key, val in (
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv6.conf.all.keep_addr_on_down", "1"),
                ("net.ipv6.conf.default.keep_addr_on_down", "1"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                ("net.mptcp.enabled", "1"),
            ):
                self.run(ns, "sysctl", "-qw", f"{key}={val}")
        self.run(self.ns_gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.run(self.ns_gw, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

        plen = {4: 24, 6: 64}
        for i in range(2):
            self._links.append(_Link(self.ns_cli, self.client_if[i], self.ns_gw, self.gw_client_if[i],
                                     self.client_addr[i], self.gw_client_addr[i], plen))
        self._links.append(_Link(self.ns_srv, self.server_if, self.ns_gw, self.gw_server_if,
                                 self.server_addr, self.gw_server_addr, plen))
        self._links.append(_Link(self.ns_srv, self.server_if2, self.ns_gw, self.gw_server_if2,
                                 self.server_addr2, self.gw_server_addr2, plen))
        for ln in self._links:
            self.run(None, "ip", "link", "add", "name", ln.if_a, "netns", ln.ns_a, "type", "veth",
                     "peer", "name", ln.if_b, "netns", ln.ns_b)
            self._configure_link(ln)
            if not self.gso:
                for ns, ifname in ((ln.ns_a, ln.if_a), (ln.ns_b, ln.if_b)):
                    self.run(ns, "ip", "link", "set", "dev", ifname, "gso_max_size", "1500",
                             "gso_max_segs", "1")
            if self.wire_checksums:
                if shutil.which("ethtool") is None:
                    raise LabError("wire_checksums needs ethtool (Debian package ethtool)")
                for ns, ifname in ((ln.ns_a, ln.if_a), (ln.ns_b, ln.if_b)):
                    self.run(ns, "ethtool", "-K", ifname, "tx", "off")

        # Routes: only the lab prefixes, first path / first server address by default,
        # and policy routing so traffic from the second address leaves by its own link.
        self._routes()

        for ns in (self.ns_cli, self.ns_srv):
            self.run(ns, "ip", "mptcp", "limits", "set", "subflow", "8", "add_addr_accepted", "8")
        if self.client_subflow:
            for fam in (4, 6):
                self.run(self.ns_cli, "ip", "mptcp", "endpoint", "add", self.client_addr[1][fam],
                         "dev", self.client_if[1], "subflow")
        if self.server_signal:
            for fam in (4, 6):
                self.run(self.ns_srv, "ip", "mptcp", "endpoint", "add", self.server_addr2[fam],
                         "dev", self.server_if2, "signal")
        if self.rate:
            for i in range(2):
                self.shape(i, self.rate)
        self._up = True

    def _configure_link(self, ln: _Link) -> None:
        ends = ((ln.ns_a, ln.if_a, ln.addr_a), (ln.ns_b, ln.if_b, ln.addr_b))
        for ns, ifname, addrs in ends:
            self.run(ns, "ip", "addr", "replace", f"{addrs[4]}/{ln.plen[4]}", "dev", ifname)
            self.run(ns, "ip", "-6", "addr", "replace", f"{addrs[6]}/{ln.plen[6]}", "dev", ifname, "nodad")
            self.run(ns, "ip", "link", "set", ifname, "up")
        # Static neighbours: the first IPv6 neighbour solicitation on a fresh veth is
        # sometimes left unanswered, which delays a SYN (or an MP_JOIN) by the 1 s
        # ND retransmit timer.  Permanent entries make timing deterministic.
        macs = [self._mac(ns, ifname) for ns, ifname, _ in ends]
        for (ns, ifname, _), (_, _, peer), mac in ((ends[0], ends[1], macs[1]), (ends[1], ends[0], macs[0])):
            for fam in (4, 6):
                self.run(ns, "ip", f"-{fam}", "neigh", "replace", peer[fam], "lladdr", mac,
                         "dev", ifname, "nud", "permanent")

    def _mac(self, ns: str, ifname: str) -> str:
        out = self.run(ns, "ip", "-o", "link", "show", "dev", ifname).stdout
        m = re.search(r"link/ether ([0-9a-f:]{17})", out)
        if not m:
            raise LabError(f"no MAC for {ifname} in {ns}: {out}")
        return m.group(1)

    def _routes(self) -> None:
        for ns, ifs, mine, gws in (
            (self.ns_cli, self.client_if, self.client_addr, self.gw_client_addr),
            (self.ns_srv, (self.server_if, self.server_if2), (self.server_addr, self.server_addr2),
             (self.gw_server_addr, self.gw_server_addr2)),
        ):
            for fam, net in ((4, _LAB_NET4), (6, _LAB_NET6)):
                v = "-4" if fam == 4 else "-6"
                self.run(ns, "ip", v, "route", "replace", net, "via", gws[0][fam], "dev", ifs[0])
                self.run(ns, "ip", v, "route", "replace", net, "via", gws[1][fam], "dev", ifs[1],
                         "table", str(_TABLE))
                rules = self.run(ns, "ip", v, "rule", "show").stdout
                if f"from {mine[1][fam]} lookup {_TABLE}" not in rules:
                    self.run(ns, "ip", v, "rule", "add", "from", mine[1][fam], "table", str(_TABLE),
                             "priority", "100")

    # ------------------------------------------------------------------ knobs
    def shape(self, path: int, rate: str | None) -> None:
        """tbf both directions of client *path* at *rate*; None removes the shaping."""
        for ns, ifname in ((self.ns_cli, self.client_if[path]), (self.ns_gw, self.gw_client_if[path])):
            self.run(ns, "tc", "qdisc", "del", "dev", ifname, "root", check=False)
            if rate:
                self.run(ns, "tc", "qdisc", "add", "dev", ifname, "root", "tbf", "rate", rate,
                         "burst", "32kb", "latency", "40ms")

    def link(self, path: int, up: bool) -> None:
        """Cut (or restore) client *path* like a pulled cable.

        The gateway side goes admin-down, so the client keeps its address, routes
        and MPTCP endpoint (only the carrier drops): the subflow stalls and MPTCP must
        reinject its data on the other path.  Bringing it up re-applies addresses and
        routes, which the kernel drops with the link.
        """
        ln = self._links[path]
        self.run(ln.ns_b, "ip", "link", "set", ln.if_b, "up" if up else "down")
        if up:
            self._configure_link(ln)
            self._routes()

    def loss(self, path: int, probability: float, *, spare_syn: bool = False) -> None:
        """Random drop with *probability* both ways on client *path* at the gateway (0 removes).

        ``spare_syn`` keeps SYN and SYN/ACK packets (e.g. MP_JOIN handshakes), so a
        test that needs the second subflow is not at the mercy of a 1 s SYN timeout.
        """
        self.clear_loss(path)
        if probability <= 0:
            return
        gif = self.gw_client_if[path]
        match = ["-p", "tcp", "!", "--tcp-flags", "SYN", "SYN"] if spare_syn else []
        rules: list[tuple[str, list[str]]] = []
        for tool in ("iptables", "ip6tables"):
            for direction in ("-i", "-o"):
                spec = ["FORWARD", direction, gif, *match, "-m", "statistic", "--mode", "random",
                        "--probability", f"{probability:.4f}", "-j", "DROP"]
                self.run(self.ns_gw, tool, "-w", "-I", *spec)
                rules.append((tool, spec))
        self._loss_rules[path] = rules

    def clear_loss(self, path: int | None = None) -> None:
        """Remove loss rules of *path* (None: all paths)."""
        for p in [path] if path is not None else list(self._loss_rules):
            for tool, spec in self._loss_rules.pop(p, []):
                self.run(self.ns_gw, tool, "-w", "-D", *spec, check=False)

    @contextlib.contextmanager
    def fast_open(self, taken: bool = True) -> Iterator[None]:
        """TCP Fast Open for the block: the client sends data in its SYN without a cookie, and the
        server takes it (``taken``) or wants a cookie and refuses it; the sysctls are put back after."""
        knob = "net.ipv4.tcp_fastopen"
        old = {ns: self.run(ns, "sysctl", "-n", knob).stdout.strip() for ns in (self.ns_cli, self.ns_srv)}
        try:
            self.run(self.ns_srv, "sysctl", "-qw", f"{knob}={0x203 if taken else 0x3}")
            self.run(self.ns_cli, "sysctl", "-qw", f"{knob}=5")  # client on, no cookie needed
            yield
        finally:
            for ns, v in old.items():
                self.run(ns, "sysctl", "-qw", f"{knob}={v}")

    @contextlib.contextmanager
    def capture(self, path: str | os.PathLike[str], iface: str | Sequence[str] = "any",
                snaplen: int = 0, bpf: str = "tcp", ns: str | None = None, direction: str = "in") -> Iterator[Path]:
        """Record packets received at the gateway (``-Q in``: each forwarded packet once; ``direction``
        "inout" on a host's own interface records what it sends too).

        tcpdump is stopped with SIGINT on its own PID and waited for, so the pcap
        is complete.  Several interfaces mean several tcpdumps (``path`` gets an
        ``.IF`` suffix before the extension for each).
        """
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        ifaces = [iface] if isinstance(iface, str) else list(iface)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for ifn in ifaces:
                dest = out if len(ifaces) == 1 else out.with_suffix(f".{ifn}{out.suffix}")
                argv = ["tcpdump", "-i", ifn, "-Q", direction, "-w", str(dest), "-U", "-n",
                        "-s", str(snaplen), "-Z", "root"]
                if bpf:
                    argv.append(bpf)
                p = self.popen(ns or self.ns_gw, *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                procs.append(p)
                _wait_listening(p)
            yield out
        finally:
            # tcpdump stops reading on SIGINT without draining what the kernel still
            # holds for it, and with TPACKET_V3 libpcap sees a ring block only when it
            # fills or its 1 s timeout retires it: wait until the file has been quiet
            # for longer than that. (--immediate-mode would avoid the wait but makes
            # the kernel drop captured packets under load.)
            _wait_quiet([out if len(ifaces) == 1 else out.with_suffix(f".{i}{out.suffix}") for i in ifaces])
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            self.capture_drops = 0
            for p in procs:
                try:
                    _out, err = p.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    _out, err = p.communicate(timeout=5)
                m = re.search(rb"(\d+) packets? dropped by kernel", err or b"")
                if m:
                    self.capture_drops += int(m.group(1))


def _wait_quiet(paths: Sequence[Path], quiet: float = 1.3, limit: float = 6.0) -> None:
    """Return once the capture files have not grown for ``quiet`` seconds (or after ``limit``)."""
    deadline = time.monotonic() + limit
    last: list[int] = []
    since = time.monotonic()
    while time.monotonic() < deadline:
        sizes = [p.stat().st_size if p.exists() else 0 for p in paths]
        if sizes != last:
            last, since = sizes, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def _wait_listening(p: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Block until tcpdump says it is listening, so no early packet is missed."""
    import selectors

    assert p.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(p.stderr, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"listening on" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"tcpdump did not start: {buf.decode(errors='replace')}")
            if not sel.select(left):
                continue
            chunk = os.read(p.stderr.fileno(), 4096)
            if not chunk:
                raise LabError(f"tcpdump exited: {buf.decode(errors='replace')}")
            buf += chunk
    finally:
        sel.close()
