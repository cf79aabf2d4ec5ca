"""The iptables/ip6tables rules that send MPTCP connections, and nothing else, to mproxy.

Only MPTCP needs user space, so the kernel decides what to queue:

* a TCP SYN (without ACK) carrying option 30 (MP_CAPABLE or MP_JOIN) sets the
  ``[rules] connmark`` bits on its conntrack entry;
* so does a later packet carrying option 30 of a connection without them:
  conntrack keeps the mark only as long as its entry, and an entry lost to a
  timeout (an idle subflow), a flush or table pressure comes back through a
  mid-stream pickup without it; every MPTCP packet Linux sends carries a DSS,
  so the next one marks the connection again and mproxy goes on with what it
  tracks (and a connection opened before mproxy started is picked up);
* every packet of a connection with those bits goes to ``NFQUEUE``;
* so does every TCP packet conntrack finds INVALID (``[rules] queue_invalid``).

Why INVALID packets: conntrack keeps no state for them, so they carry no
connmark and the rule above misses them, yet its TCP window check is not the
receiver's. A segment carrying a SACK block past what the receiver sent is
INVALID to conntrack ("ACK is over upper bound") while Linux discards the
block and reads the data; forwarded unqueued, its bytes would reach the server
and never the IDS. Queued, the tracker judges them with the receiver's rules
(and passes plain TCP's untouched). They are rare in clean traffic.

Plain TCP is looked at by a few cheap rules (one reads its TCP options) and
never leaves the kernel. The SYN decides once per connection (conntrack keeps
the mark), so both directions and every later packet follow without
re-parsing options (the connmark is tested first); a join is a new TCP
connection with its own SYN, so it is marked the same way.
``--tcp-flags SYN,ACK SYN`` (not ``SYN SYN``) keeps a SYN/ACK from marking a
connection whose SYN was not queued (e.g. it arrived outside
``in_interfaces``): mproxy would see it without its handshake.

With ``[queue] workers`` > 1 the first SYN of a connection (no worker bits
in its conntrack or packet mark) goes to the control queue instead; it comes
back (``NF_REPEAT``) with its worker's bits in the packet mark, which are
saved into the conntrack mark, and one rule per worker queues every packet of
a connection carrying that worker's bits to the worker's queue. A later MPTCP
packet of a connection without worker bits (its entry was lost) goes to the
control queue too, and so does an INVALID packet (no conntrack entry, so no
saved bits); the control repeats each with the bits of the worker that got
its subflow's SYN. The first kind has them saved again like a SYN; the second
is queued by a rule per worker on its packet mark, and that worker clears the
bits in its verdict.

Fail-open adds ``--queue-bypass`` (no process bound: accept); a *full* queue
is a property of the bound queue, set over netlink by
:mod:`mproxy.io.nfqueue`. The default table is ``mangle``: an NFQUEUE accept
verdict ends the current table's traversal for that hook, so in ``mangle``
the operator's ``filter`` rules still see every packet mproxy accepted; a jump
from ``filter`` would let queued traffic skip the filter rules after it.

The same command list is printed (``mproxy rules``) and executed (``mproxy
run`` with ``[rules] manage = true``), so what an operator reads is exactly
what mproxy does.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable

from ..config import Config, ConfigError
from ..core.marks import worker_bits

__all__ = ["Command", "RulesError", "Rules", "SavedRuleHits", "validate", "install_commands", "delete_commands",
           "render"]

_TABLE_HOOKS = {
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
}


class RulesError(RuntimeError):
    """An iptables command failed; the message holds the command and its stderr."""


@dataclass(frozen=True, slots=True)
class Command:
    argv: tuple[str, ...]
    optional: bool = False  # cleanup of something that may not exist: failure is fine

    def shell(self) -> str:
        return shlex.join(self.argv)


def validate(cfg: Config) -> None:
    """Checks only the live gateway needs (``mproxy check`` and ``run`` call it)."""
    r = cfg.rules
    hooks = _TABLE_HOOKS.get(r.table)
    if hooks is None:
        raise ConfigError(f"[rules] table: {r.table!r} cannot be used: the connmark match needs conntrack, "
                          "which runs after the raw table (use \"mangle\")")
    if r.hook not in hooks:
        raise ConfigError(f"[rules] hook: table {r.table} has no {r.hook} hook (it has {', '.join(hooks)})")
    for name in r.in_interfaces:
        if not name or len(name) > 15 or any(c in name for c in " /\t"):
            raise ConfigError(f"[rules] in_interfaces: {name!r} is not an interface name")


def _tools(cfg: Config) -> tuple[str, ...]:
    return ("iptables", "ip6tables") if cfg.rules.ipv6 else ("iptables",)


def _chain_rules(cfg: Config) -> list[list[str]]:
    r, q = cfg.rules, cfg.queue
    mark = f"0x{r.connmark:x}/0x{r.connmark:x}"
    bypass = ["--queue-bypass"] if q.fail == "open" else []
    syn = ["-p", "tcp", "-m", "tcp", "--tcp-flags", "SYN,ACK", "SYN", "--tcp-option", "30"]
    # a later MPTCP packet of a connection without the mark: its conntrack entry was lost (timeout,
    # flush, table pressure) and a new one picked it up, or it was opened before mproxy started;
    # with in_interfaces, only in the direction of whoever opened it (as conntrack knows it)
    later = ["-p", "tcp", "-m", "tcp", "--tcp-flags", "SYN", "NONE", "--tcp-option", "30"]
    if r.in_interfaces:
        later += ["-m", "conntrack", "--ctdir", "ORIGINAL"]
    invalid = ["-m", "conntrack", "--ctstate", "INVALID"]

    def each_interface(spec: list[str]) -> list[list[str]]:
        return [["-i", i, *spec] for i in r.in_interfaces] or [spec]

    if q.workers == 1:
        rules = each_interface([*syn, "-j", "CONNMARK", "--set-xmark", mark])
        rules += each_interface(["-m", "connmark", "!", "--mark", mark, *later,
                                 "-j", "CONNMARK", "--set-xmark", mark])
        rules.append(["-m", "connmark", "--mark", mark, "-j", "NFQUEUE", "--queue-num", str(q.num), *bypass])
        if r.queue_invalid:
            rules.append([*invalid, "-j", "NFQUEUE", "--queue-num", str(q.num), *bypass])
        return rules
    # workers: the first SYN of a connection (no worker in its conntrack or packet mark yet) goes
    # to the control queue, which repeats it with its worker's bits in the packet mark; those are
    # saved in the conntrack mark, and every packet of the connection goes to that worker's queue
    wm = r.worker_mask
    none = f"0/0x{wm:x}"
    unsteered = ["-m", "connmark", "--mark", none, "-m", "mark", "--mark", none]
    to_control = ["-j", "NFQUEUE", "--queue-num", str(q.num), *bypass]
    rules = each_interface([*syn, *unsteered, *to_control])
    rules += each_interface([*unsteered, *later, *to_control])  # steered by its subflow's SYN, or hashed
    if r.queue_invalid:
        # no conntrack entry, so no saved worker bits: the control finds the worker by the 4-tuple
        # and repeats the packet with its bits in the packet mark, which queue it (before the
        # CONNMARK rules below, which cannot save a mark without an entry)
        rules.append([*invalid, "-m", "mark", "--mark", none, "-j", "NFQUEUE", "--queue-num", str(q.num),
                      *bypass])
        rules += [[*invalid, "-m", "mark", "--mark", f"0x{worker_bits(w, wm):x}/0x{wm:x}", "-j", "NFQUEUE",
                   "--queue-num", str(q.num + 1 + w), *bypass] for w in range(q.workers)]
    steered = ["-m", "mark", "!", "--mark", none]
    rules += [
        [*steered, "-j", "CONNMARK", "--save-mark", "--nfmask", f"0x{wm:x}", "--ctmask", f"0x{wm:x}"],
        [*steered, "-j", "CONNMARK", "--set-xmark", mark],  # the "MPTCP" bits, as with one worker
        [*steered, "-j", "MARK", "--set-xmark", none],  # the worker bits do not leave the chain
    ]
    for w in range(q.workers):
        rules.append(["-m", "connmark", "--mark", f"0x{worker_bits(w, wm):x}/0x{wm:x}", "-j", "NFQUEUE",
                      "--queue-num", str(q.num + 1 + w), *bypass])
    return rules


def _jump(cfg: Config) -> list[str]:
    return ["-p", "tcp", "-j", cfg.rules.chain]


def install_commands(cfg: Config) -> list[Command]:
    r = cfg.rules
    out: list[Command] = []
    for tool in _tools(cfg):
        base = (tool, "-w", "-t", r.table)
        out.append(Command((*base, "-N", r.chain)))
        out += [Command((*base, "-A", r.chain, *spec)) for spec in _chain_rules(cfg)]
        out.append(Command((*base, "-I", r.hook, "1", *_jump(cfg))))
    return out


def delete_commands(cfg: Config) -> list[Command]:
    r = cfg.rules
    out: list[Command] = []
    for tool in _tools(cfg):
        base = (tool, "-w", "-t", r.table)
        out.append(Command((*base, "-D", r.hook, *_jump(cfg)), optional=True))
        out.append(Command((*base, "-F", r.chain), optional=True))
        out.append(Command((*base, "-X", r.chain), optional=True))
    return out


def render(cfg: Config, *, delete: bool = False, source: str = "") -> str:
    """The commands as a shell script (what ``mproxy rules`` prints)."""
    r, q = cfg.rules, cfg.queue
    head = [
        f"# mproxy netfilter rules{' for ' + source if source else ''}"
        f"{' (removal)' if delete else ''}",
    ]
    if q.workers == 1:
        head += [
            f"# TCP SYNs with option 30 (MPTCP) mark their connection with connmark bits 0x{r.connmark:x}",
            "# (so does a later packet with option 30 of a connection whose conntrack entry lost the mark);",
            f"# every packet of a marked connection goes to NFQUEUE {q.num}; plain TCP stays in the kernel.",
        ]
        if r.queue_invalid:
            head.append(f"# TCP packets conntrack finds INVALID (no conntrack entry, so no connmark) go to NFQUEUE "
                        f"{q.num} too.")
    else:
        head += [
            f"# The first TCP SYN with option 30 (MPTCP) of a connection goes to control NFQUEUE {q.num}, which "
            f"picks the worker",
            f"# (MP_JOIN: the worker owning its token) and repeats the SYN with the worker in mark bits "
            f"0x{r.worker_mask:x};",
            f"# they are saved in the connmark and every packet of the connection goes to NFQUEUE "
            f"{q.num + 1}..{q.num + q.workers}",
            "# (one per worker); plain TCP stays in the kernel. A later packet with option 30 of a connection "
            "whose conntrack entry",
            "# lost its worker bits goes to the control queue too.",
        ]
        if r.queue_invalid:
            head.append("# TCP packets conntrack finds INVALID go to the control queue too, which repeats them "
                        "to the worker of their subflow's SYN.")
    head += [
        f"# fail {q.fail}: " + ("--queue-bypass accepts while no mproxy is bound; mproxy also sets the "
                                "queue's fail-open flag (a full queue accepts)" if q.fail == "open" else
                                "no --queue-bypass: MPTCP is dropped while no mproxy is bound or the queue "
                                "is full"),
    ]
    cmds = delete_commands(cfg) if delete else install_commands(cfg)
    return "\n".join(head + [c.shell() + (" 2>/dev/null || true" if c.optional else "") for c in cmds]) + "\n"


def queue_hits_of(listing: str) -> dict[int, int]:
    """``iptables -S CHAIN -v`` read: queue number -> packets its NFQUEUE rules matched.

    ``-S -v`` prints each rule as ``-A CHAIN ... -c PACKETS BYTES -j NFQUEUE --queue-num N``; one
    form for every iptables backend, unlike ``-L``'s columns.
    """
    hits: dict[int, int] = {}
    for line in listing.splitlines():
        f = line.split()
        if "NFQUEUE" not in f or "--queue-num" not in f or "-c" not in f:
            continue
        try:
            q = int(f[f.index("--queue-num") + 1])
            n = int(f[f.index("-c") + 1])
        except (ValueError, IndexError):
            continue
        hits[q] = hits.get(q, 0) + n
    return hits


def saved_queue_rules(dump: str, family: str = "") -> tuple[list[tuple[tuple[str, ...], int, int]], set[int]]:
    """``iptables-save -c`` read: ``(rule key, queue, packets)`` of every NFQUEUE rule, and the queues
    that ``--queue-balance`` rules spread packets over (their hits cannot be told apart by queue).

    The key (family, table, the rule without its counters, which of identical rules) follows a rule
    from one reading to the next, so that a rule zeroed or re-made is noticed as such.
    """
    rules: list[tuple[tuple[str, ...], int, int]] = []
    spread: set[int] = set()
    table = ""
    seen: dict[tuple[str, str], int] = {}
    for line in dump.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if not line.startswith("[") or "NFQUEUE" not in line:
            continue
        counts, _, rule = line.partition("] ")
        f = rule.split()
        if "-j" not in f or f[f.index("-j") + 1:f.index("-j") + 2] != ["NFQUEUE"]:
            continue
        try:
            packets = int(counts[1:].split(":")[0])
            if "--queue-balance" in f:
                lo, _, hi = f[f.index("--queue-balance") + 1].partition(":")
                spread.update(range(int(lo), int(hi or lo) + 1))
                continue
            q = int(f[f.index("--queue-num") + 1]) if "--queue-num" in f else 0
        except (ValueError, IndexError):
            continue
        n = seen.get((table, rule), 0)
        seen[(table, rule)] = n + 1
        rules.append(((family, table, rule, str(n)), q, packets))
    return rules, spread


Runner = Callable[[tuple[str, ...]], "subprocess.CompletedProcess[str]"]


def _run(argv: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


class Rules:
    """Installs and removes mproxy's rules; removal is idempotent and also clears stale leftovers."""

    def __init__(self, cfg: Config, runner: Runner = _run) -> None:
        self.cfg = cfg
        self._runner = runner
        self.installed = False

    def install(self) -> None:
        for tool in _tools(self.cfg):
            if shutil.which(tool) is None and self._runner is _run:
                raise RulesError(f"{tool} not found in PATH (set [rules] ipv6 = false for IPv4 only)"
                                 if tool == "ip6tables" else f"{tool} not found in PATH")
        self.remove(quiet=True)  # a previous run killed with SIGKILL leaves its chain behind
        try:
            for cmd in install_commands(self.cfg):
                self._exec(cmd)
        except RulesError:
            self.remove(quiet=True)
            raise
        self.installed = True

    def detach(self) -> list[str]:
        """Delete only the jump(s) into the chain: no new packet is queued, and what the queues hold
        stays there for its verdict. Flushing the chain (``remove``) would not wait: with the nf_tables
        backend, deleting the NFQUEUE rules drops every packet still queued (our verdicts then get
        ENOENT). Returns problems (never raises)."""
        return self._delete([c for c in delete_commands(self.cfg) if "-D" in c.argv])

    def remove(self, *, quiet: bool = False) -> list[str]:
        """Delete the jump(s), flush and delete the chain; returns problems (never raises)."""
        problems = self._delete(delete_commands(self.cfg))
        if not quiet:
            problems += self._leftovers()
        self.installed = False
        return problems

    def _delete(self, cmds: list[Command]) -> list[str]:
        problems: list[str] = []
        for cmd in cmds:
            repeat = 8 if "-D" in cmd.argv else 1  # the jump may have been added more than once
            for _ in range(repeat):
                try:
                    cp = self._runner(cmd.argv)
                except (OSError, subprocess.SubprocessError) as e:
                    problems.append(f"{cmd.shell()}: {e}")
                    break
                if cp.returncode != 0:
                    break
        return problems

    def _leftovers(self) -> list[str]:
        out = []
        for tool in _tools(self.cfg):
            try:
                cp = self._runner((tool, "-w", "-t", self.cfg.rules.table, "-S", self.cfg.rules.chain))
            except (OSError, subprocess.SubprocessError):
                continue
            if cp.returncode == 0:
                out.append(f"{tool}: chain {self.cfg.rules.chain} still present in table {self.cfg.rules.table}")
        return out

    def _exec(self, cmd: Command) -> None:
        try:
            cp = self._runner(cmd.argv)
        except (OSError, subprocess.SubprocessError) as e:
            raise RulesError(f"`{cmd.shell()}` failed: {e}") from None
        if cp.returncode != 0 and not cmd.optional:
            raise RulesError(f"`{cmd.shell()}` exited {cp.returncode}: {cp.stderr.strip()}")

    def queue_hits(self) -> dict[int, int] | None:
        """Packets each queue's NFQUEUE rules sent to it (IPv4 and IPv6 rules summed), or None when
        a tool could not list the chain (the caller then keeps its last figures)."""
        hits: dict[int, int] = {}
        for tool in _tools(self.cfg):
            try:
                cp = self._runner((tool, "-w", "-t", self.cfg.rules.table, "-S", self.cfg.rules.chain, "-v"))
            except (OSError, subprocess.SubprocessError):
                return None
            if cp.returncode != 0:
                return None
            for q, n in queue_hits_of(cp.stdout).items():
                hits[q] = hits.get(q, 0) + n
        return hits

    def counters(self, tool: str = "iptables") -> list[tuple[int, int, str]]:
        """(packets, bytes, rule text) of the chain's rules, for diagnostics and tests."""
        cp = self._runner((tool, "-w", "-t", self.cfg.rules.table, "-L", self.cfg.rules.chain,
                           "-v", "-x", "-n"))
        rows = []
        for line in cp.stdout.splitlines()[2:]:
            parts = line.split(None, 2)
            if len(parts) == 3 and parts[0].isdigit():
                rows.append((int(parts[0]), int(parts[1]), parts[2]))
        return rows


class SavedRuleHits:
    """Packets each queue's NFQUEUE rules matched, for rules mproxy did not install (``[rules]
    manage = false``): every table of ``iptables-save -c`` (and ``ip6tables-save -c``).

    The operator's rules were counting before mproxy started and may be zeroed (``iptables -Z``),
    deleted or made again while it runs. Each rule's counter is followed on its own: one that went
    down was reset, and what it had counted is kept; a rule gone keeps its last count. Hits between
    a reading and a reset are lost, so a figure can only fall short. Queues that a
    ``--queue-balance`` rule feeds are left out (``spread``): no figure for them beats a wrong one.
    Rules made with nft itself (not through iptables) are not read.
    """

    def __init__(self, cfg: Config, runner: Runner = _run) -> None:
        self._tools = tuple(f"{t}-save" for t in _tools(cfg))
        self._runner = runner
        self._last: dict[tuple[str, ...], tuple[int, int]] = {}  # rule -> (queue, packets) last read
        self._kept: dict[int, int] = {}  # queue -> counts of rules reset or gone
        self.spread: set[int] = set()

    def read(self) -> dict[int, int] | None:
        """Queue -> packets matched since these rules exist (None when a tool failed: keep the last)."""
        rules: list[tuple[tuple[str, ...], int, int]] = []
        spread: set[int] = set()
        for tool in self._tools:
            try:
                cp = self._runner((tool, "-c"))
            except (OSError, subprocess.SubprocessError):
                return None
            if cp.returncode != 0:
                return None
            r, sp = saved_queue_rules(cp.stdout, tool)
            rules += r
            spread |= sp
        now = {key: (q, n) for key, q, n in rules}
        for key, (q, n) in self._last.items():
            cur = now.get(key)
            if cur is None or cur[1] < n:  # gone, or zeroed / made again: what it counted stays
                self._kept[q] = self._kept.get(q, 0) + n
        self._last = now
        self.spread = spread
        hits = dict(self._kept)
        for q, n in now.values():
            hits[q] = hits.get(q, 0) + n
        for q in spread:
            hits.pop(q, None)
        return hits
