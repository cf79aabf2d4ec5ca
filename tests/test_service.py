"""The ``run`` service's parts that need no queue: the SIGHUP reload of configuration and rules, the
warnings about packets that went past mproxy, and the records that wait for the emitter process's
stream digests."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from hashlib import sha256
from pathlib import Path

import pytest

from mproxy.config import load_config, parse_config
from mproxy.core.gateway import Decision, Verdict
from mproxy.io.nfqueue import QueueAdapter
from mproxy.io.sinks import EventLog
from mproxy import service
from mproxy.service import LossWarning, Service

from .core.session import Session
from .io.test_nfqueue import Kernel, tcp4

OLD = 'alert tcp any any -> any any (msg:"union"; content:"UNION SELECT"; nocase; sid:1;)\n'
NEW = OLD + 'alert tcp any any -> any any (msg:"shell"; content:"xp_cmdshell"; sid:2;)\n'
CONFIG = '[inspector]\nmode = "on"\nrules = "{rules}"\n[actions]\non_match = "log"\non_alert = "log"\n'


def _matches(svc: Service) -> list[str]:
    return [r["reason"] for r in svc.gateway.drain_records() if r.get("trigger") == "inspector"]


async def _settle(svc: Service) -> None:
    for _ in range(500):
        if not svc._reloading:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the reload did not finish")


def _service(tmp_path: Path) -> tuple[Service, Path, Path]:
    """``run``'s service (no queue) from a config file: the inspector on OLD's rules, matches logged."""
    rules = tmp_path / "mproxy.rules"
    rules.write_text(OLD)
    cfg = tmp_path / "mproxy.toml"
    cfg.write_text(CONFIG.format(rules=rules))
    svc = Service(load_config(str(cfg)), str(cfg))
    svc.events = EventLog(str(tmp_path / "events.jsonl"))
    return svc, rules, cfg


def _records(svc: Service, tmp_path: Path) -> list[dict]:
    assert svc.events is not None
    svc.events.flush()
    return [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]


async def test_sighup_reloads_the_rules_for_live_connections_and_a_bad_file_keeps_them(tmp_path: Path) -> None:
    svc, rules, _cfg = _service(tmp_path)
    s = Session(1)
    gw = svc.gateway
    for p in s.handshake():
        gw.packet(p, 1000.0)
    reqs = [b"GET /?a=xp_cmdshell HTTP/1.1\r\n", b"GET /?b=xp_cmdshell HTTP/1.1\r\n", b"GET /?c=union select 1\r\n"]
    at = [0, len(reqs[0]), len(reqs[0]) + len(reqs[1])]
    gw.packet(s.data(0, True, at[0], reqs[0]), 1001.0)
    assert _matches(svc) == []
    # the operator adds a rule and sends SIGHUP (logrotate's reload does the same)
    rules.write_text(NEW)
    svc._reopen()  # what SIGHUP calls: the files are read in a thread, put in force by the loop
    assert svc._reloading
    await _settle(svc)
    gw.packet(s.data(0, True, at[1], reqs[1]), 1002.0)
    assert _matches(svc) == ["sid 2: shell"]  # the connection opened before the reload is inspected with it
    # a broken file: refused with the reason, the rules in force stay
    rules.write_text(NEW + "alert tcp any any -> (broken\n")
    rec = svc.reload()
    assert rec["ok"] is False and "mproxy.rules" in rec["error"] and rec["rules"] == 2
    gw.packet(s.data(0, True, at[2], reqs[2]), 1003.0)
    assert _matches(svc) == ["sid 1: union"]
    ins = gw.responder.inspector
    assert ins is not None and len(ins.rules) == 2 and svc.reloads == {"ok": 1, "error": 1}
    assert [(r["event"], r["ok"], r["rules"], r["previous_rules"]) for r in _records(svc, tmp_path)] == [
        ("reload", True, 2, 1), ("reload", False, 2, 2)]
    text = svc.exposition().decode()
    assert 'mproxy_reloads_total{result="ok"} 1.0' in text and 'mproxy_reloads_total{result="error"} 1.0' in text


async def test_sighups_during_a_reload_make_one_more_reload(tmp_path: Path) -> None:
    svc, rules, _cfg = _service(tmp_path)
    svc._reopen()
    rules.write_text(NEW)  # changed while the first reload may already have read it
    svc._reopen()
    svc._reopen()
    await _settle(svc)
    ins = svc.gateway.responder.inspector
    assert ins is not None and len(ins.rules) == 2 and svc.reloads["ok"] == 2


def test_reload_puts_a_new_policy_in_force_for_new_connections(tmp_path: Path) -> None:
    """[policy] and [actions] change on reload (new connections get the new policy; open ones keep
    theirs); the inspector can be turned off; sections that need a restart are named, not applied."""
    svc, _rules, cfg = _service(tmp_path)
    gw = svc.gateway
    s1 = Session(1)
    assert [gw.packet(p, 1000.0).verdict for p in s1.handshake()] == [Verdict.ACCEPT] * 3
    cfg.write_text('[policy]\ndefault = "downgrade"\n[inspector]\nmode = "off"\n[queue]\nmax_len = 999\n')
    rec = svc.reload()  # ([actions] back to the default fastclose: no raw socket was opened, so not now)
    assert rec["ok"] is True and rec["restart_needed"] == ["queue", "actions"] and rec["rules"] is None
    assert svc.cfg.actions.on_match == ["log"]
    assert gw.responder.inspector is None and svc.cfg.queue.max_len != 999
    s2 = Session(1, sport=41000, client_key=0x77, server_key=0x88)
    assert gw.packet(s2.handshake()[0], 1001.0).verdict == Verdict.ACCEPT_MODIFIED  # MP_CAPABLE removed
    assert gw.packet(s1.data(0, True, 0, b"still tracked"), 1002.0).verdict == Verdict.ACCEPT
    assert len(gw.tracker.connections) == 1  # the first connection, still rebuilt; the second is plain TCP
    # an invalid configuration changes nothing
    cfg.write_text('[policy]\ndefault = "no-such-action"\n')
    rec = svc.reload()
    assert rec["ok"] is False and "[policy]" in rec["error"] and svc.cfg.policy.default.value == "downgrade"


def test_reload_without_a_config_file_reads_the_rules_again(tmp_path: Path) -> None:
    cfg = tmp_path / "mproxy.toml"
    cfg.write_text('[inspector]\nmode = "off"\n')
    svc = Service(load_config(str(cfg)))  # no source path: the configuration in force is kept
    rec = svc.reload()
    assert rec["ok"] is True and rec["config"] is None and rec["rules"] is None


def test_a_worker_reloads_its_own_share_of_the_configuration(tmp_path: Path) -> None:
    """With [queue] workers > 1 the control process passes SIGHUP on; each worker reads the file again
    as its own worker configuration, so an unchanged file changes nothing and needs no restart."""
    from mproxy.service import load
    from mproxy.workers import worker_config

    cfg = tmp_path / "mproxy.toml"
    base = '[queue]\nworkers = 2\n[sink]\npcap = "/tmp/x"\n[inspector]\nmode = "off"\n[actions]\non_match = "log"\non_alert = "log"\n'
    cfg.write_text(base)
    svc = Service(worker_config(load(str(cfg)), 1), str(cfg), worker=1, workers_total=2)
    rec = svc.reload()
    assert rec["ok"] is True and rec["restart_needed"] == []
    cfg.write_text(base.replace("workers = 2", "workers = 2\nmax_len = 999") + '[policy]\ndefault = "block-joins"\n')
    rec = svc.reload()
    assert rec["restart_needed"] == ["queue"] and svc.gateway.policy.default.value == "block-joins"
    assert svc.cfg.queue.max_len != 999 and svc.cfg.sink.pcap == "/tmp/x.w1"  # (the worker's own file)


def test_a_reload_with_skip_bad_rules_counts_what_it_left_out(tmp_path: Path) -> None:
    svc, rules, cfg = _service(tmp_path)
    cfg.write_text(CONFIG.format(rules=rules).replace('mode = "on"\n', 'mode = "on"\nskip_bad_rules = true\n'))
    rules.write_text(NEW + 'alert tcp any any -> any any (msg:"uri"; content:"x"; http_uri; sid:3;)\n')
    rec = svc.reload()
    assert rec["ok"] is True and rec["rules"] == 2 and rec["skipped_rules"] == 1 and rec["previous_rules"] == 1
    ins = svc.gateway.responder.inspector
    assert ins is not None and (ins.stats.rules, ins.stats.skipped_rules) == (2, 1)
    rules.write_text(NEW)
    rec = svc.reload()
    assert "skipped_rules" not in rec and (ins.stats.rules, ins.stats.skipped_rules) == (2, 0)


def test_start_up_parses_the_rules_file_once(tmp_path: Path, monkeypatch) -> None:
    """``run`` and each worker validate the configuration, rules included, before opening anything;
    the Service then builds its inspector from those rules instead of parsing the file again
    (with a large third-party rule set that is a noticeable part of start-up)."""
    import mproxy.core.inspector as inspector
    from mproxy.service import load_with_rules

    rules = tmp_path / "mproxy.rules"
    rules.write_text(NEW)
    cfg = tmp_path / "mproxy.toml"
    cfg.write_text(CONFIG.format(rules=rules))
    parsed = []
    real = inspector.load_rules
    monkeypatch.setattr(inspector, "load_rules", lambda *a: parsed.append(a) or real(*a))
    conf, rs = load_with_rules(str(cfg))
    svc = Service(conf, str(cfg), rs)
    ins = svc.gateway.responder.inspector
    assert len(parsed) == 1 and ins is not None and ins.ruleset is rs
    assert [r.sid for r in ins.rules] == [1, 2]


async def test_a_reload_takes_up_ids_alert_files_without_a_restart(tmp_path: Path) -> None:
    """[alerts] is put in force by a reload (a restart would leave every open connection
    untracked): the first file named starts the follower, alerts in it act on live connections,
    and a file no longer named is let go."""
    import json as _json

    svc, rules, cfg = _service(tmp_path)
    svc._stop = asyncio.Event()  # serving (the queue itself plays no part here)
    s = Session(1)
    for p in s.handshake():
        svc.gateway.packet(p, 1000.0)
    eve = tmp_path / "eve.json"
    alert = {"event_type": "alert", "proto": "TCP", "src_ip": "198.18.1.2", "src_port": 40000,
             "dest_ip": "198.18.9.2", "dest_port": 80, "alert": {"signature_id": 7, "signature": "seen by the IDS"}}
    eve.write_text(_json.dumps(alert) + "\n")  # written before the reload: history, not acted on
    cfg.write_text(CONFIG.format(rules=rules) + f'[alerts]\nfiles = ["{eve}"]\npoll_interval = 0.02\n')
    try:
        svc._reopen()  # what SIGHUP calls: read in a thread, put in force by the loop
        await _settle(svc)
        (rec,) = [r for r in _records(svc, tmp_path) if r["event"] == "reload"]
        assert rec["ok"] is True and rec["restart_needed"] == [] and svc.follower is not None
        assert svc.cfg.alerts.files == [str(eve)]
        with eve.open("a") as f:
            f.write(_json.dumps(alert) + "\n")
        for _ in range(100):
            if svc.alert_feed is not None and svc.alert_feed.stats.acted:
                break
            await asyncio.sleep(0.02)
        logged = [r for r in _records(svc, tmp_path) if r.get("trigger") == "alert"]
        assert [r["reason"] for r in logged] == ["sid 7: seen by the IDS"]
        cfg.write_text(CONFIG.format(rules=rules))
        assert svc.reload()["restart_needed"] == [] and svc.follower.tails == []
    finally:
        assert svc._follow is not None
        svc._follow.cancel()


def test_packets_past_mproxy_are_warned_about_at_once_then_once_a_minute(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: now[0])
    w = LossWarning(service.BYPASSED)
    with caplog.at_level(logging.WARNING, "mproxy"):
        w.update(0, "open")  # nothing yet: quiet
        w.update(40, "open", " (by queue: 0: 40)")
        now[0] += 30
        w.update(90, "open")  # within the minute: counted, not logged
        now[0] += 31
        w.update(95, "open")
        w.update(96, "closed", final=True)  # at stop: whatever is left, whenever
        w.update(96, "closed", final=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "40 MPTCP packets bypassed the queue (it was full, or no mproxy was bound to it) since the last warning "
        "and were accepted uninspected (fail open); 40 in all (by queue: 0: 40)",
        "55 MPTCP packets bypassed the queue (it was full, or no mproxy was bound to it) since the last warning "
        "and were accepted uninspected (fail open); 95 in all",
        "1 MPTCP packets bypassed the queue (it was full, or no mproxy was bound to it) since the last warning "
        "and were dropped (fail closed); 96 in all",
    ]


def test_a_socket_the_loop_stopped_watching_is_watched_again(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """libuv stops watching a descriptor for good after an error event on it: packets then wait in
    the kernel unread. A tick that finds packets waiting and none read watches the socket again."""
    svc = Service(parse_config('[inspector]\nmode = "off"\n'))
    qa = QueueAdapter(0, lambda d, t, c, i: Decision(Verdict.ACCEPT))
    k = Kernel(qa)
    qa._fd = qa.sock.fileno()
    svc.queue = qa
    row = {"portid": 1, "waiting": 2, "dropped": 0, "user_dropped": 0, "id_sequence": 2}
    monkeypatch.setattr(service, "kernel_queue_table", lambda: {0: row})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        qa.attach(loop)
        loop.remove_reader(qa.fd)  # what libuv does after EPOLLERR
        k.queue(tcp4(), tcp4())
        await asyncio.sleep(0.05)
        assert qa.stats.packets == 0  # nobody reads them
        svc._watch_kernel_queue()  # a tick: 2 waiting
        svc._watch_kernel_queue()  # the next: still 2 waiting, nothing read -> watched again
        assert qa.stats.packets == 2 and qa.stats.rewatched == 1
        k.queue(tcp4())
        await asyncio.sleep(0.05)
        assert qa.stats.packets == 3  # the loop reads by itself again
        qa.detach(loop)

    with caplog.at_level(logging.WARNING, "mproxy"):
        asyncio.run(main())
    assert "watching it again read 2" in caplog.text
    assert [v for a in k.answers() for _, v, _ in a] == [1, 1, 1]
    k.close()


def test_a_slow_rule_reading_does_not_hold_the_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    """iptables waits for the xtables lock, which a firewall manager may hold for long: a scrape waits
    for the reading a bounded time, and a slower one is applied when it ends (never twice at once)."""
    import threading
    import time as _time

    from mproxy.io.bypass import Bypass

    watch = service.BypassWatch(Bypass([0]), "open")
    watch.bypass.baseline({0: {"portid": 1, "waiting": 0, "dropped": 0, "user_dropped": 0, "id_sequence": 0}})
    release, calls = threading.Event(), []

    def slow_read() -> tuple[dict[int, int], dict[int, dict[str, int]]]:
        calls.append(1)
        release.wait(5)
        return {0: 7}, {0: {"portid": 1, "waiting": 0, "dropped": 0, "user_dropped": 0, "id_sequence": 4}}

    monkeypatch.setattr(service.BypassWatch, "_read", lambda self: slow_read())

    async def main() -> None:
        t0 = _time.monotonic()
        await watch.refresh(wait=0.1)
        await watch.refresh(wait=0.1)  # the first reading still runs: no second one
        assert _time.monotonic() - t0 < 1.0 and watch.counts() == {0: 0} and len(calls) == 1
        release.set()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if watch.counts()[0]:
                break
        assert watch.counts() == {0: 3}  # 7 hits, 4 numbered: applied when the reading ended
        await watch.refresh(wait=1.0)  # and the next scrape starts a new one
        assert len(calls) == 2

    asyncio.run(main())


def test_the_emitter_process_hashes_and_the_records_wait_for_its_digests(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With the sinks in the emitter process, that process hashes the rebuilt streams: a connection's
    record waits for the round trip that brings its digests, and says what the tracker would have. If
    the process dies, held records go out with sha256 null and the tracker hashes new connections until
    another process is started; that one hashes the connections that open after it."""
    from mproxy.core.gateway import Gateway

    def conn(sport: int) -> list[bytes]:
        s = Session(1, sport=sport)
        return s.handshake() + [s.data(0, True, 0, b"GET / HTTP/1.1\r\n\r\n" * 50), s.data(0, False, 0, b"ok" * 900),
                                s.data_fin(0, True, 900), s.data_fin(0, False, 1800), s.fin(0, True), s.fin(0, False)]

    ref = Gateway()
    for p in conn(41000) + conn(41001):
        ref.packet(p, 1000.0)
    want = {r["client_port"]: (r["c2s"]["sha256"], r["s2c"]["sha256"])
            for r in ref.drain_records() if r["event"] == "mptcp_connection"}

    events = tmp_path / "events.jsonl"
    svc = Service(parse_config(f'[inspector]\nmode = "off"\n[sink]\npcap = "{tmp_path / "sink"}"\n'
                               f'[log]\nevents = "{events}"\n'))
    svc._open_outputs()
    try:
        assert svc.gateway.pipeline.tracker.stream_hash is False
        for p in conn(41000):
            svc.sinks.write(svc.gateway.packet(p, 1000.0).frames)
            svc._after_batch()
        assert not [line for line in events.read_text().splitlines() if "mptcp_connection" in line]  # held
        svc._settle_digests()  # a tick
        with caplog.at_level(logging.WARNING, "mproxy"):
            svc.sinks._proc.kill()  # type: ignore[attr-defined]
            svc.sinks._proc.wait(5)  # type: ignore[attr-defined]
            assert svc._sink_process_up() is False  # noticed without anything sent (mproxy_sink_process_up 0)
            opened = conn(41001)
            for p in opened[:3]:  # open while the process dies: its digests are lost
                svc.gateway.packet(p, 1000.0)
            svc._settle_digests()
            for p in opened[3:]:
                svc.sinks.write(svc.gateway.packet(p, 1000.0).frames)
                svc._after_batch()
            svc._settle_digests()
            after = conn(41002)  # opened after: hashed by the tracker
            for p in after:
                svc.sinks.write(svc.gateway.packet(p, 1000.0).frames)
                svc._after_batch()
            svc._settle_digests()
            assert svc.sinks.revive(time.monotonic() + 60)  # type: ignore[attr-defined]  # (the tick does this)
            svc._settle_digests()
            assert svc.gateway.pipeline.tracker.stream_hash is False  # the new process hashes again
            for p in conn(41003):
                svc.sinks.write(svc.gateway.packet(p, 1000.0).frames)
                svc._after_batch()
            svc._settle_digests()
        assert "connections open now are logged without sha256" in caplog.text
        assert "started again (restart 1)" in caplog.text
    finally:
        svc.stop()
    recs = [json.loads(line) for line in events.read_text().splitlines()]
    got = {r["client_port"]: (r["c2s"]["sha256"], r["s2c"]["sha256"])
           for r in recs if r["event"] == "mptcp_connection"}
    assert got[41000] == want[41000] and want[41000][0] is not None
    assert got[41001] == (None, None)
    assert [(r["sink_process"], r["sink_restarts"]) for r in recs if r["event"] == "stats"] == [(True, 1)]
    assert got[41002] == want[41000]  # the same bytes
    assert got[41003] == want[41000]  # hashed by the process started again


@pytest.mark.parametrize("bound", ["number", "age"])
def test_held_records_are_settled_before_the_tick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  bound: str) -> None:
    """Records held for their digests are bounded in number (HELD_RECORDS_MAX) and in age
    (HELD_RECORDS_WAIT: what a crash could lose of the log): past either, a round trip settles them."""
    clock = [500.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: clock[0])
    if bound == "number":
        monkeypatch.setattr(service, "HELD_RECORDS_MAX", 3)
    events = tmp_path / "events.jsonl"
    svc = Service(parse_config(f'[inspector]\nmode = "off"\n[sink]\npcap = "{tmp_path / "sink"}"\n'
                               f'[log]\nevents = "{events}"\n'))
    svc._open_outputs()
    try:
        for n in range(7):
            s = Session(1, sport=42000 + n, client_key=0x1000 + n, server_key=0x2000 + n)
            for p in s.handshake() + [s.data(0, True, 0, b"x" * 100), s.data_fin(0, True, 100),
                                      s.data_fin(0, False, 0), s.fin(0, True), s.fin(0, False)]:
                svc.sinks.write(svc.gateway.packet(p, 1000.0 + n).frames)
                svc._after_batch()
            assert svc._awaiting is not None
            if bound == "number":
                assert len(svc._awaiting.held) < 3
            else:
                # a close every 0.12 s: the third finds the first held 0.24 s and settles all three
                assert len(svc._awaiting.held) == (n + 1) % 3
                clock[0] += 0.12
    finally:
        svc.stop()
    recs = [json.loads(line) for line in events.read_text().splitlines()]
    conns = [r for r in recs if r["event"] == "mptcp_connection"]
    assert len(conns) == 7 and all(r["c2s"]["sha256"] == sha256(b"x" * 100).hexdigest() for r in conns)


@pytest.mark.parametrize("worker", [True, False])
@pytest.mark.parametrize("logged", [True, False])
def test_streams_are_hashed_once_and_only_for_an_event_log(tmp_path: Path, worker: bool, logged: bool) -> None:
    """The digests are in the mptcp_connection records only: with no event log none are made; with one,
    exactly one process makes them (the emitter process when there is one)."""
    log = f'[log]\nevents = "{tmp_path / "events.jsonl"}"\n' if logged else ""
    svc = Service(parse_config(f'[inspector]\nmode = "off"\n[sink]\npcap = "{tmp_path / "sink"}"\n'
                               f'worker = {str(worker).lower()}\n{log}'))
    svc._open_outputs()
    try:
        in_child = getattr(svc.sinks, "hash_streams", False)
        assert (svc.gateway.pipeline.tracker.stream_hash, in_child) == (logged and not worker, logged and worker)
        assert (svc._awaiting is not None) == (logged and worker)
    finally:
        svc.stop()
