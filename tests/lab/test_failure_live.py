"""Live-mode failure behaviour, end to end: ``mproxy run`` killed and restarted under traffic, the
fail modes while it is down, and a full queue counted by mproxy itself.

What tests/lab/test_gateway_live.py already covers is not repeated (SIGKILL with fail open keeps
traffic flowing; a stalled reader fills the queue and the kernel passes or drops by fail mode).
Added here: tracking resumes mid-stream after a restart (``pickup: true``, rebuilt bytes equal to
the tail of what the application sent); fail closed stops MPTCP but not plain TCP while mproxy is
down, and MPTCP recovers after the restart; queue overflow shows in mproxy's metrics and stats.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mproxy.lab.topology import lab_available
from tests.lab.livehelp import Mproxy, counter, open_lab, plain_transfer, rules_left, sha, transfer

LAB_REASON = lab_available()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")]

MPTCP_PORT = ["-p", "tcp", "--dport", "5201"]  # client -> server packets of the lab apps
PLAIN_PORT = ["-p", "tcp", "--dport", "5301"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    yield from open_lab()


def check_pickup_record(mp: Mproxy, c: Any) -> dict[str, Any]:
    """The restarted mproxy's record of the connection: picked up mid-stream, and what it rebuilt
    is exactly the tail of what each application sent (the stream ends at DATA_FIN, so a rebuilt
    stream without gaps of N bytes is the last N bytes sent)."""
    from mproxy.lab.apps import pattern_bytes

    recs = [r for r in mp.connections() if r["server_port"] == 5201 and r["server"] == c.server_addr]
    (rec,) = recs
    assert rec["pickup"] is True and rec["outcome"] == "data_fin", rec
    assert {sf["role"] for sf in rec["subflows"]} == {"pickup"}
    for d, seed, total in (("c2s", c.seed, c.c2s_sent_bytes), ("s2c", c.reply_seed, c.s2c_sent_bytes)):
        n = rec[d]["bytes"]
        assert 0 < n <= total, (d, n, total)
        if not rec[d]["gaps"]:
            assert rec[d]["sha256"] == sha(pattern_bytes(seed, total)[total - n:]), d
    assert rec["c2s"]["bytes"] < c.c2s_sent_bytes  # really picked up mid-stream
    return rec


def test_fail_open_kill_and_restart_resumes_tracking_mid_stream(lab: Any, tmp_path: Path) -> None:
    mp = Mproxy(lab, tmp_path / "mproxy", fail="open").start()
    state: dict[str, float] = {}

    def hook(pct: int) -> None:
        if pct >= 30 and "killed" not in state:
            mp.kill()
            state["killed"] = time.monotonic()
        elif pct >= 60 and "killed" in state and "restarted" not in state:
            mp.start()  # clears the rules the killed instance left, queues the marked flow again
            state["restarted"] = time.monotonic()

    try:
        res = transfer(lab, tmp_path, "restart", c2s_bytes=3_000_000, s2c_bytes=300_000, rate=700_000,
                       on_progress=hook)
    finally:
        rc = mp.stop()
    assert rc == 0 and "Traceback" not in mp.err, mp.err
    assert "MPROXY" not in rules_left(lab)
    (c,) = res.connections
    assert c.mptcp is True and "restarted" in state
    check_pickup_record(mp, c)
    st = mp.stats()
    assert st["queue"]["core_errors"] == 0 and st["tracker"]["connections"] >= 1


def test_fail_closed_stops_mptcp_not_plain_tcp_then_recovers(lab: Any, tmp_path: Path) -> None:
    mp = Mproxy(lab, tmp_path / "mproxy", fail="closed").start()
    state: dict[str, Any] = {}

    def hook(pct: int) -> None:
        if pct >= 20 and "down" not in state:
            mp.kill()
            time.sleep(0.3)  # packets already past the queue
            before, plain_before = counter(lab, MPTCP_PORT), counter(lab, PLAIN_PORT)
            state["plain"] = plain_transfer(lab, 300_000)
            time.sleep(1.0)
            state["down"] = (before, counter(lab, MPTCP_PORT))
            state["plain_forwarded"] = counter(lab, PLAIN_PORT) - plain_before
            mp.start()

    try:
        res = transfer(lab, tmp_path, "closed", c2s_bytes=2_000_000, s2c_bytes=200_000, rate=500_000,
                       on_progress=hook)
    finally:
        rc = mp.stop()
        for spec in (MPTCP_PORT, PLAIN_PORT):
            lab.run(lab.ns_gw, "iptables", "-w", "-t", "mangle", "-D", "POSTROUTING", *spec, check=False)
    assert rc == 0 and "Traceback" not in mp.err, mp.err
    before, after = state["down"]
    assert after == before, f"{after - before} MPTCP packets forwarded while mproxy was down (fail closed)"
    cli, srv = state["plain"]
    assert "error" not in cli and cli == srv, (cli, srv)  # plain TCP never queued: it flowed
    assert state["plain_forwarded"] > 10  # GSO: ~80 packets carry the 300 KB
    (c,) = res.connections  # and the MPTCP transfer recovered once mproxy was back
    assert c.mptcp is True
    check_pickup_record(mp, c)


def test_full_queue_fail_closed_is_counted_by_mproxy(lab: Any, tmp_path: Path) -> None:
    """The kernel's queue-full drops (fail closed) appear in mproxy's own metrics and stats record."""
    mp = Mproxy(lab, tmp_path / "mproxy", fail="closed", max_len=8, metrics="127.0.0.1:9464").start()
    state: dict[str, Any] = {}

    def stall(pct: int) -> None:
        if pct >= 20 and "stalled" not in state:
            assert mp.proc is not None
            mp.proc.send_signal(signal.SIGSTOP)
            state["stalled"] = True
            time.sleep(1.5)
            mp.proc.send_signal(signal.SIGCONT)

    try:
        res = transfer(lab, tmp_path, "overload", c2s_bytes=1_200_000, s2c_bytes=100_000, rate=1_000_000,
                       on_progress=stall)
        m = mp.scrape()
    finally:
        assert mp.proc is not None
        mp.proc.send_signal(signal.SIGCONT)
        rc = mp.stop()
    assert rc == 0
    assert res.connections[0].mptcp is True
    full = [v for (name, labels), v in m.items() if name.startswith("mproxy_queue")
            and dict(labels).get("reason", dict(labels).get("kind")) in ("queue_full", "kernel_dropped")]
    assert full and full[0] > 0, sorted(k for k in m if k[0].startswith("mproxy_queue"))
    st = mp.stats()
    assert st["kernel_queue"]["dropped"] > 0 and st["fail"] == "closed"
    assert st["queue"]["core_errors"] == 0


def test_a_dead_emitter_process_is_replaced_and_the_ids_keeps_seeing_the_connections(
        lab: Any, tmp_path: Path) -> None:
    """The process that writes the IDS sinks (and hashes the rebuilt streams) is killed mid-transfer.
    Traffic passes; another one is started (``mproxy_sink_process_up`` 1 again,
    ``mproxy_sink_process_restarts_total`` 1); the connection in progress goes on in the emitted
    stream with a new handshake, which tshark reads as a TCP conversation of its own carrying the tail
    of what the client sent and the whole reply; its record has sha256 null. A connection opened
    afterwards is emitted and hashed whole."""
    import os
    import subprocess

    from mproxy.lab.apps import pattern_bytes
    from tests.oracles import tshark_follow_raw

    mp = Mproxy(lab, tmp_path / "mproxy", metrics="127.0.0.1:9464").start()
    killed: list[int] = []

    def emitter() -> list[str]:
        assert mp.proc is not None
        return Path(f"/proc/{mp.proc.pid}/task/{mp.proc.pid}/children").read_text().split()

    def kill(pct: int) -> None:
        if pct >= 20 and not killed:
            (child,) = emitter()  # one worker: its emitter process only
            os.kill(int(child), signal.SIGKILL)
            killed.append(int(child))

    try:
        assert mp.scrape()[("mproxy_sink_process_up", ())] == 1.0
        during = transfer(lab, tmp_path, "during", c2s_bytes=4_000_000, s2c_bytes=200_000, rate=1_000_000,
                          on_progress=kill)
        deadline = time.monotonic() + 10
        while True:
            m = mp.scrape()
            if m[("mproxy_sink_process_up", ())] == 1.0 and m[("mproxy_sink_process_restarts_total", ())] == 1.0:
                break
            assert time.monotonic() < deadline, "no emitter process was started again"
            time.sleep(0.2)
        assert killed and [int(c) for c in emitter()] != killed
        after = transfer(lab, tmp_path, "after", c2s_bytes=400_000, s2c_bytes=100_000, seed=7)
    finally:
        rc = mp.stop()
    assert rc == 0 and "Traceback" not in mp.err, mp.err
    assert "the emitted stream stops (verdicts go on) until another is started" in mp.err
    assert "started again (restart 1): connections in progress (1)" in mp.err
    (d,), (a,) = during.connections, after.connections
    recs = {r["client_port"]: r for r in mp.connections()}
    assert recs[d.client_port]["c2s"]["sha256"] is None and recs[d.client_port]["c2s"]["bytes"] == d.c2s_sent_bytes
    assert (recs[a.client_port]["c2s"]["sha256"], recs[a.client_port]["s2c"]["sha256"]) == \
        (a.c2s_sent_sha256, a.s2c_sent_sha256)
    assert mp.stats()["sink_restarts"] == 1

    files = sorted(mp.dir.glob("sink.*.pcap"), key=lambda f: int(f.name.split(".")[1]))
    assert len(files) == 2, files  # the second process wrote a file of its own
    joined = tmp_path / "sink.pcap"
    subprocess.run(["mergecap", "-a", "-w", str(joined), *map(str, files)], check=True)
    by_port: dict[int, list[Any]] = {}
    for st in tshark_follow_raw(joined):
        by_port.setdefault(st.client[1], []).append(st)
    sent = pattern_bytes(d.seed, d.c2s_sent_bytes)
    assert sha(sent) == d.c2s_sent_sha256
    # what the killed process had written (flushed at each tick; what it buffered since died with
    # it), then the conversation taken over: tshark reads the new handshake as a conversation of its own
    *before, resumed = by_port[d.client_port]
    assert len(before) <= 1 and all(sent.startswith(b.client_data) for b in before)
    assert sent.endswith(resumed.client_data) and 0 < len(resumed.client_data) < len(sent)
    assert sha(resumed.server_data) == d.s2c_sent_sha256  # the reply came after the restart: whole
    (whole,) = by_port[a.client_port]
    assert (sha(whole.client_data), sha(whole.server_data)) == (a.c2s_sent_sha256, a.s2c_sent_sha256)
