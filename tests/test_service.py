"""The ``run`` service's parts that need no queue: rules reload on SIGHUP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from mproxy.config import load_config
from mproxy.io.sinks import EventLog
from mproxy.service import Service

from .core.session import Session

OLD = 'alert tcp any any -> any any (msg:"union"; content:"UNION SELECT"; nocase; sid:1;)\n'
NEW = OLD + 'alert tcp any any -> any any (msg:"shell"; content:"xp_cmdshell"; sid:2;)\n'


def _matches(svc: Service) -> list[str]:
    return [r["reason"] for r in svc.gateway.drain_records() if r.get("trigger") == "inspector"]


async def _settle(svc: Service) -> None:
    for _ in range(500):
        if not svc._reloading:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the reload did not finish")


def _service(tmp_path: Path) -> tuple[Service, Path]:
    """A gateway service (no queue) with the inspector on OLD's rules, matches only logged."""
    rules = tmp_path / "mproxy.rules"
    rules.write_text(OLD)
    cfg = tmp_path / "mproxy.toml"
    cfg.write_text(f'[inspector]\nmode = "on"\nrules = "{rules}"\n[actions]\non_match = "log"\n')
    svc = Service(load_config(str(cfg)))
    svc.events = EventLog(str(tmp_path / "events.jsonl"))
    return svc, rules


async def test_sighup_reloads_the_rules_for_live_connections_and_a_bad_file_keeps_them(tmp_path: Path) -> None:
    svc, rules = _service(tmp_path)
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
    svc._reopen()  # what SIGHUP calls: the file is read in a thread, put in force by the loop
    assert svc._reloading
    await _settle(svc)
    gw.packet(s.data(0, True, at[1], reqs[1]), 1002.0)
    assert _matches(svc) == ["sid 2: shell"]  # the connection opened before the reload is inspected with it
    # a broken file: refused with the reason, the rules in force stay
    rules.write_text(NEW + "alert tcp any any -> (broken\n")
    rec = svc.reload_rules()
    assert rec is not None and rec["ok"] is False and "mproxy.rules" in rec["error"] and rec["rules"] == 2
    gw.packet(s.data(0, True, at[2], reqs[2]), 1003.0)
    assert _matches(svc) == ["sid 1: union"]
    ins = gw.responder.inspector
    assert ins is not None and (ins.stats.reloads, ins.stats.reload_errors) == (1, 1) and len(ins.rules) == 2
    svc.events.close()
    recs = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(r["event"], r["ok"], r["rules"], r["previous"]) for r in recs] == [
        ("rules_reload", True, 2, 1), ("rules_reload", False, 2, 2)]


async def test_sighups_during_a_reload_make_one_more_reload(tmp_path: Path) -> None:
    svc, rules = _service(tmp_path)
    svc._reopen()
    rules.write_text(NEW)  # changed while the first reload may already have read it
    svc._reopen()
    svc._reopen()
    await _settle(svc)
    await _settle(svc)  # (the second starts from the first one's completion)
    ins = svc.gateway.responder.inspector
    assert ins is not None and len(ins.rules) == 2 and ins.stats.reloads == 2


def test_reload_without_the_inspector_does_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "mproxy.toml"
    cfg.write_text('[inspector]\nmode = "off"\n')
    svc = Service(load_config(str(cfg)))
    assert svc.reload_rules() is None
