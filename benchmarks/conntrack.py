"""What connection tracking costs plain TCP at the gateway, without mproxy.

mproxy's netfilter rules mark MPTCP connections with CONNMARK, which needs the
kernel's connection tracking for every packet, plain TCP included (no plain
TCP packet is queued). This measures, in one unshaped lab, plain TCP bulk
throughput forwarded by the kernel with no rule, with one ``-m connmark`` rule
that accepts (conntrack on), with a ``--tcp-flags`` rule instead, and with
mproxy's own chain as ``mproxy rules`` prints it (no process bound: plain TCP
matches none of its queue rules, but the rule that marks a connection again
reads every unmarked packet's TCP options): the share of the "plain TCP
through the gateway" figure (benchmarks/inline.py) that is conntrack's and
the rules', not mproxy's.

    .venv/bin/python benchmarks/conntrack.py [--seconds 5] [--repeat 3]   (root, kernel MPTCP)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import inline  # noqa: E402

CONNMARK = ("-p", "tcp", "-m", "connmark", "--mark", "0x4d50/0x4d50", "-j", "ACCEPT")
FLAGS = ("-p", "tcp", "-m", "tcp", "--tcp-flags", "SYN,ACK", "SYN", "-j", "ACCEPT")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from mproxy.lab.topology import Lab, lab_available

    why = lab_available()
    if why:
        print(f"lab unavailable: {why}", file=sys.stderr)
        return 2
    with Lab(rate=None) as lab:
        def best() -> float:
            return max(inline.bulk(lab, False, a.seconds).mbit for _ in range(a.repeat))

        def rule(op: str, spec: tuple[str, ...]) -> None:
            lab.run(lab.ns_gw, "iptables", "-w", "-t", "mangle", op, "FORWARD", *spec)

        base = best()
        rule("-A", CONNMARK)
        tracked = best()
        rule("-D", CONNMARK)
        rule("-A", FLAGS)
        flags = best()  # (nf_tables drops conntrack's hooks once no rule needs them)
        rule("-D", FLAGS)
        from mproxy.config import parse_config
        from mproxy.io import netfilter

        cfg = parse_config("[rules]\nipv6 = false\n")
        for c in netfilter.install_commands(cfg):
            lab.run(lab.ns_gw, *c.argv)
        chain = best()
        for c in netfilter.delete_commands(cfg):
            lab.run(lab.ns_gw, *c.argv, check=False)
    print(f"| plain TCP, kernel forwarding (best of {a.repeat} x {a.seconds:g} s) | Mbit/s | of no rule |")
    print("|---|---|---|")
    print(f"| no rule | {base:,.0f} | 100 % |")
    print(f"| one -m connmark rule (conntrack on) | {tracked:,.0f} | {tracked / base:.1%} |")
    print(f"| a --tcp-flags rule instead | {flags:,.0f} | {flags / base:.1%} |")
    print(f"| mproxy's chain (`mproxy rules`, no process bound) | {chain:,.0f} | {chain / base:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
