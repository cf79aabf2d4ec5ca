"""The heaviest adversarial case end to end: SYN and MP_JOIN floods through ``mproxy run`` with
small limits, while and after which a legitimate MPTCP connection must be tracked and rebuilt
exactly (the applications' SHA-256 against the event log and against tshark reading the sink).

The flood comes from a raw socket in the client namespace (the lab's own addresses only) to a port
the server silently drops, so for mproxy every flood SYN stays a half-open connection or an
unclaimed join subflow -- the state a flood is meant to exhaust. The sans-I/O versions (and the
per-packet cost) are in tests/core/test_adversarial.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mproxy.lab.topology import lab_available
from tests.lab.livehelp import Mproxy, env, open_lab, sha, transfer

_ROOT = Path(__file__).resolve().parents[2]
LAB_REASON = lab_available()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")]

MAX_CONNECTIONS, MAX_SUBFLOWS = 200, 400
FLOOD = 2500  # SYNs of each kind


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    yield from open_lab()


def test_syn_and_join_floods_are_bounded_and_legit_connections_rebuilt(lab: Any, tmp_path: Path) -> None:
    from tests.oracles import tcp_streams, tshark_follow_raw

    drop = ["INPUT", "-p", "tcp", "--dport", "5202", "-j", "DROP"]
    lab.run(lab.ns_srv, "iptables", "-w", "-A", *drop)
    extra = f"[tracker]\nmax_connections = {MAX_CONNECTIONS}\nmax_subflows = {MAX_SUBFLOWS}\n"
    mp = Mproxy(lab, tmp_path / "mproxy", metrics="127.0.0.1:9464", extra=extra).start()
    floods: list[subprocess.Popen[bytes]] = []
    try:
        for seed, kind in enumerate(("syn", "join")):
            floods.append(lab.popen(lab.ns_cli, sys.executable, str(_ROOT / "tests/lab/livehelp.py"), "flood",
                                    "--src", lab.client_addr[0][4], "--dst", lab.server_addr[4], "--kind", kind,
                                    "--count", str(FLOOD), "--seconds", "4", "--seed", str(seed),
                                    stdout=subprocess.PIPE, env=env()))
        time.sleep(1.0)  # the tables are full by now
        during = transfer(lab, tmp_path, "during", c2s_bytes=400_000, s2c_bytes=200_000)
        sent = [json.loads(p.communicate(timeout=30)[0]) for p in floods]
        m = mp.scrape()
        after = transfer(lab, tmp_path, "after", c2s_bytes=200_000, s2c_bytes=100_000)
    finally:
        for p in floods:
            if p.poll() is None:
                p.kill()
        rc = mp.stop()
        lab.run(lab.ns_srv, "iptables", "-w", "-D", *drop, check=False)
    assert rc == 0 and "Traceback" not in mp.err, mp.err
    assert [s["sent"] for s in sent] == [FLOOD, FLOOD]
    # bounded and counted
    assert m[("mproxy_connections_active", ())] <= MAX_CONNECTIONS
    hits = {dict(k[1])["limit"]: v for k, v in m.items() if k[0] == "mproxy_memcap_hits_total"}
    assert hits["connections"] > 0 and hits["subflows"] > 0, hits
    st = mp.stats()
    assert st["tracker"]["memcap"]["connections"] > 0 and st["tracker"]["memcap"]["subflows"] > 0
    assert st["queue"]["core_errors"] == 0
    recs = mp.records()
    assert any(r["event"] == "notice" and r["type"] == "join_flood" for r in recs)
    # the SYN flood is one notice per window, and only the window's first evictions get a record
    assert any(r["event"] == "notice" and r["type"] == "syn_flood" for r in recs)
    evicted = sum(r["event"] == "mptcp_connection" and r["outcome"] == "evicted" for r in recs)
    assert 0 < evicted <= 2 * 32 < st["tracker"]["outcomes"]["evicted"], (evicted, st["tracker"]["outcomes"])
    # the legitimate connections: tracked from their handshake and rebuilt byte for byte
    sink = sorted((tmp_path / "mproxy").glob("sink.*.pcap"))
    for res in (during, after):
        (c,) = res.connections
        assert c.mptcp is True
        (rec,) = [r for r in recs if r["event"] == "mptcp_connection" and r["client_port"] == c.client_port
                  and r["server_port"] == 5201]
        assert rec["pickup"] is False and rec["outcome"] == "data_fin", rec
        assert (rec["c2s"]["bytes"], rec["c2s"]["sha256"]) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
        assert (rec["s2c"]["bytes"], rec["s2c"]["sha256"]) == (c.s2c_sent_bytes, c.s2c_sent_sha256)
        ids = tcp_streams(sink[-1], f"tcp.port == {c.client_port} && tcp.port == 5201")
        (f,) = tshark_follow_raw(sink[-1], ids)
        assert (len(f.client_data), sha(f.client_data)) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
        assert (len(f.server_data), sha(f.server_data)) == (c.s2c_sent_bytes, c.s2c_sent_sha256)


def test_memcap_drops_packets_and_the_kernel_resends_them(lab: Any, tmp_path: Path) -> None:
    """Real kernel MPTCP over two paths of very different speed: the fast path runs ahead, so the
    gateway has to buffer data out of DSN order, and with a 64 KiB memcap it cannot buffer it all.
    Packets it cannot buffer are dropped (on_memcap = "drop"); the kernels resend them, the transfer
    completes, and the stream the IDS gets is byte for byte what the applications sent. (Windows
    as the receivers sent them: clamped, the fast path could not run that far ahead.)"""
    from tests.oracles import tcp_streams, tshark_follow_raw

    extra = "[tracker]\nmemcap = 65536\n"
    mp = Mproxy(lab, tmp_path / "mproxy", metrics="127.0.0.1:9464", extra=extra,
                policy_extra="clamp_window = false").start()
    lab.shape(1, "3mbit")
    try:
        res = transfer(lab, tmp_path, "memcap", c2s_bytes=1_500_000, s2c_bytes=300_000, timeout=60.0)
        m = mp.scrape()
    finally:
        lab.shape(1, lab.rate)
        rc = mp.stop()
    assert rc == 0 and "Traceback" not in mp.err, mp.err
    hits = {dict(k[1])["limit"]: v for k, v in m.items() if k[0] == "mproxy_memcap_hits_total"}
    actions = {dict(k[1])["action"]: v for k, v in m.items() if k[0] == "mproxy_actions_total"}
    assert hits["global"] > 0 and actions["memcap_drop"] > 0, (hits, actions)
    assert m[("mproxy_shed_bytes_total", ())] > 0 and m[("mproxy_buffer_limit_bytes", (("limit", "memcap"),))] == 65536
    waiting = [v for k, v in m.items() if k[0] == "mproxy_buffered_bytes" and dict(k[1])["buffer"] != "history"]
    assert len(waiting) == 4 and sum(waiting) == 0  # all given back
    (c,) = res.connections
    recs = mp.connections()
    (rec,) = [r for r in recs if r["client_port"] == c.client_port and r["server_port"] == 5201]
    assert len(rec["subflows"]) >= 2 and rec["outcome"] == "data_fin", rec
    assert not rec["c2s"]["gaps"] and not rec["s2c"]["gaps"]
    assert (rec["c2s"]["bytes"], rec["c2s"]["sha256"]) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
    assert (rec["s2c"]["bytes"], rec["s2c"]["sha256"]) == (c.s2c_sent_bytes, c.s2c_sent_sha256)
    assert sum(rec[d]["memcap_drops"] for d in ("c2s", "s2c")) > 0
    notices = [r for r in mp.records() if r["event"] == "notice" and r["type"] == "memcap"]
    assert len(notices) == 1 and notices[0]["conn_id"] == rec["conn_id"], notices
    sink = sorted((tmp_path / "mproxy").glob("sink.*.pcap"))
    (f,) = tshark_follow_raw(sink[-1], tcp_streams(sink[-1], f"tcp.port == {c.client_port} && tcp.port == 5201"))
    assert (len(f.client_data), sha(f.client_data)) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
    assert (len(f.server_data), sha(f.server_data)) == (c.s2c_sent_bytes, c.s2c_sent_sha256)


@pytest.mark.parametrize("family, both", [(4, False), (4, True), (6, True)])
def test_a_path_cut_under_a_small_memcap_completes_with_windows_clamped(lab: Any, tmp_path: Path, family: int,
                                                                         both: bool) -> None:
    """One of two paths fails a third of the way into a transfer, under a 64 KiB memcap: a reply
    after the request, or (``both``) both directions at once. Windows as the receivers sent them
    (clamp_window = false), the sender ran hundreds of KB ahead of the stream's next bytes, which
    the dead path held: the memcap refused the bytes before their reinjection on the other subflow
    for good (memcap_stall), in 2 of 6 runs here. With the default clamp to memcap / 4 (16 KiB) no
    sender gets that far ahead. Both directions at once, data one way carries the window of the
    other in GSO packets: left as sent, they opened the windows again (4 of 4 runs failed); they
    are clamped too, and the kernel segments them. Both directions arrive whole, and the emitted
    stream read by tshark is byte for byte what the applications sent."""
    from tests.oracles import tcp_streams, tshark_follow_raw

    mp = Mproxy(lab, tmp_path / "mproxy", metrics="127.0.0.1:9464", extra="[tracker]\nmemcap = 65536\n").start()
    lab.shape(1, "3mbit")
    cut: list[int] = []

    def hook(pct: int) -> None:
        if pct >= 30 and not cut:
            lab.link(1, False)
            cut.append(pct)

    try:
        res = transfer(lab, tmp_path, "pathcut", family=family, concurrent_reply=both, c2s_bytes=1_500_000,
                       s2c_bytes=1_000_000 if both else 300_000, rate=1_000_000, on_progress=hook)
        m = mp.scrape()
    finally:
        lab.link(1, True)
        lab.shape(1, lab.rate)
        rc = mp.stop()
    assert rc == 0 and "Traceback" not in mp.err, mp.err
    assert cut, "the path was never cut"
    actions = {dict(k[1])["action"]: v for k, v in m.items() if k[0] == "mproxy_actions_total"}
    assert actions["window_clamped"] > 0, actions
    queue = mp.stats()["queue"]
    assert queue["core_errors"] == 0 and (not both or queue["gso"] > 0), queue
    (c,) = res.connections
    (rec,) = [r for r in mp.connections() if r["client_port"] == c.client_port and r["server_port"] == 5201]
    assert len(rec["subflows"]) >= 2 and rec["outcome"] == "data_fin", rec
    assert not rec["c2s"]["gaps"] and not rec["s2c"]["gaps"]
    assert (rec["c2s"]["bytes"], rec["c2s"]["sha256"]) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
    assert (rec["s2c"]["bytes"], rec["s2c"]["sha256"]) == (c.s2c_sent_bytes, c.s2c_sent_sha256)
    assert not [r for r in mp.records() if r["event"] == "notice" and r["type"] == "memcap_stall"]
    sink = sorted((tmp_path / "mproxy").glob("sink.*.pcap"))
    (f,) = tshark_follow_raw(sink[-1], tcp_streams(sink[-1], f"tcp.port == {c.client_port} && tcp.port == 5201"))
    assert (len(f.client_data), sha(f.client_data)) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
    assert (len(f.server_data), sha(f.server_data)) == (c.s2c_sent_bytes, c.s2c_sent_sha256)


@pytest.mark.parametrize("family", [4, 6])
def test_a_path_whose_ttl_drops_mid_transfer_is_raised_back_merged_packets_too(lab: Any, tmp_path: Path,
                                                                              family: int) -> None:
    """From a third of the way into a transfer on, the client's packets on its first path leave
    with TTL (hop limit) 4 (a mangle rule in its namespace), and the server drops what comes with
    less than 5, as routers past the gateway would. mproxy gives each its subflow direction's
    first TTL back, the packets the kernel queued merged (GSO) too, rewritten in place: the server
    drops none. Before, GSO packets left with the low TTL and died past the gateway: 4 of 4 runs
    failed here (IPv4 and IPv6), 19 or 20 packets dropped at the server in each."""
    ipt = "iptables" if family == 4 else "ip6tables"
    low = ["-j", "TTL", "--ttl-set", "4"] if family == 4 else ["-j", "HL", "--hl-set", "4"]
    lower = ["POSTROUTING", "-o", lab.client_if[0], "-p", "tcp", "--dport", "5201", *low]
    beyond = ["INPUT", "-p", "tcp", *(["-m", "ttl", "--ttl-lt", "5"] if family == 4 else ["-m", "hl", "--hl-lt", "5"]),
              "-j", "DROP"]

    def counted(ns: str, table: str, chain: str) -> int:
        text = lab.run(ns, ipt, "-w", "-t", table, "-L", chain, "-v", "-x", "-n").stdout
        return sum(int(f[0]) for f in (ln.split() for ln in text.splitlines()[2:]) if f and f[0].isdigit()
                   and ("TTL" in f or "HL" in f or "DROP" in f))

    lowered: list[int] = []

    def hook(pct: int) -> None:
        if pct >= 30 and not lowered:
            lab.run(lab.ns_cli, ipt, "-w", "-t", "mangle", "-A", *lower)
            lowered.append(pct)

    mp = Mproxy(lab, tmp_path / "mproxy", metrics="127.0.0.1:9464").start()
    lab.run(lab.ns_srv, ipt, "-w", "-I", *beyond)
    lab.shape(0, None)  # (tbf splits what exceeds its burst: unshaped, the first path's packets stay merged)
    try:
        res = transfer(lab, tmp_path, "lowttl", family=family, c2s_bytes=4_000_000, s2c_bytes=100_000,
                       rate=2_000_000, on_progress=hook)
        m = mp.scrape()
        sent_low, dropped = counted(lab.ns_cli, "mangle", "POSTROUTING"), counted(lab.ns_srv, "filter", "INPUT")
    finally:
        lab.run(lab.ns_cli, ipt, "-w", "-t", "mangle", "-D", *lower, check=False)
        lab.run(lab.ns_srv, ipt, "-w", "-D", *beyond, check=False)
        lab.shape(0, lab.rate)
        rc = mp.stop()
    assert rc == 0 and "Traceback" not in mp.err, mp.err
    assert lowered and sent_low > 0, "no packet left with the low TTL"
    actions = {dict(k[1])["action"]: v for k, v in m.items() if k[0] == "mproxy_actions_total"}
    queue = mp.stats()["queue"]
    assert queue["core_errors"] == 0 and queue["gso"] > 0, queue
    assert actions.get("ttl_raised", 0) > 0 and dropped == 0, (actions, dropped, sent_low, queue)
    (c,) = res.connections
    (rec,) = [r for r in mp.connections() if r["client_port"] == c.client_port and r["server_port"] == 5201]
    assert (rec["c2s"]["bytes"], rec["c2s"]["sha256"]) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
    assert any(r["event"] == "notice" and r["type"] == "low_ttl" for r in mp.records())
