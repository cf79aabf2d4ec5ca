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


def test_a_dead_emitter_process_is_reported_and_verdicts_and_hashes_go_on(lab: Any, tmp_path: Path) -> None:
    """The process that writes the IDS sinks (and hashes the rebuilt streams) dies: traffic still
    passes, ``mproxy_sink_process_up`` reads 0 within a tick, the log says so, and a connection that
    opens afterwards is hashed in the worker: its record's sha256 is what the applications sent."""
    import os

    mp = Mproxy(lab, tmp_path / "mproxy", metrics="127.0.0.1:9464").start()
    try:
        assert mp.proc is not None
        assert mp.scrape()[("mproxy_sink_process_up", ())] == 1.0
        children = Path(f"/proc/{mp.proc.pid}/task/{mp.proc.pid}/children").read_text().split()
        assert len(children) == 1, children  # one worker: its emitter process only
        os.kill(int(children[0]), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while mp.scrape()[("mproxy_sink_process_up", ())] != 0.0:
            assert time.monotonic() < deadline, "the dead emitter process was not noticed"
            time.sleep(0.2)
        time.sleep(1.5)  # a tick: the tracker hashes new connections again
        res = transfer(lab, tmp_path, "after", c2s_bytes=400_000, s2c_bytes=100_000)
    finally:
        rc = mp.stop()
    assert rc == 0 and "Traceback" not in mp.err, mp.err
    assert "the emitted stream stops (verdicts go on)" in mp.err
    assert "the emitter process is gone" in mp.err
    (c,) = res.connections
    (rec,) = [r for r in mp.connections() if r["client_port"] == c.client_port]
    assert (rec["c2s"]["bytes"], rec["c2s"]["sha256"]) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
    assert (rec["s2c"]["bytes"], rec["s2c"]["sha256"]) == (c.s2c_sent_bytes, c.s2c_sent_sha256)
