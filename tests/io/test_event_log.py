"""The JSON-lines event log: consistent records of every type, reopened after rotation."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from mproxy.core.gateway import Gateway
from mproxy.core.policy import Action, Policy, Rule
from mproxy.io.sinks import EventLog
from tests.core.session import Session

TUPLE = ("src", "sport", "dst", "dport")


def gateway_records() -> list[dict[str, Any]]:
    """A downgraded connection, an inspected one with a notice and a refused join, through the gateway."""
    policy = Policy((Rule(Action.DOWNGRADE, ports=frozenset({8080}), name="down"),), Action.VERIFY_JOINS)
    gw = Gateway(policy)
    ts = 1_700_000_000.0
    down = Session(1, dport=8080, sport=41000)
    s = Session(1)
    pk = down.handshake()[:1] + s.handshake() + s.join(1, bad_hmac=True)
    pk += [s.data(0, True, 0, b"benign request"), s.data(0, True, 0, b"UNION SELECT 1"),
           s.data_fin(0, True, 14), s.data_fin(0, False, 0)]
    for p in pk:
        ts += 0.001
        gw.packet(p, ts)
    gw.flush(ts + 1)
    return gw.drain_records()


def test_every_record_has_type_time_connection_and_4tuple() -> None:
    recs = gateway_records()
    kinds = {(r["event"], r.get("action") or r.get("type") or "") for r in recs}
    assert kinds >= {("action", "downgrade"), ("action", "join_refused"), ("notice", "join_hmac_failure"),
                     ("notice", "overlap_mismatch"), ("mptcp_connection", "")}, kinds
    for r in recs:
        assert isinstance(r["ts"], float) and r["ts"] > 1_700_000_000, r
        assert "conn_id" in r, r
        if r["event"] == "mptcp_connection":
            assert r["conn_id"] == 1 and r["ts"] == r["end"] and "id" not in r
        else:
            assert all(k in r for k in TUPLE), r
            for k in ("src", "dst"):
                ipaddress.ip_address(r[k])
        json.dumps(r)  # plain JSON types only
    (conn,) = [r for r in recs if r["event"] == "mptcp_connection"]
    for r in recs:  # every record about the connection names it by the same id
        if r["event"] != "mptcp_connection" and r.get("action") != "downgrade":
            assert r["conn_id"] == conn["conn_id"], r
    downgrade = next(r for r in recs if r.get("action") == "downgrade")
    assert downgrade["conn_id"] is None and downgrade["dport"] == 8080  # never tracked: decided on the SYN


def test_event_log_reopens_after_rotation_and_drops_keys(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path))
    log.write([{"event": "notice", "ts": 1.0, "n": 1}])
    log.flush()
    path.rename(tmp_path / "events.1.jsonl")  # logrotate moves the file ...
    log.write([{"event": "notice", "ts": 2.0, "n": 2}])  # ... mproxy still writes to the moved one
    log.reopen()  # SIGHUP
    log.write([{"event": "mptcp_connection", "ts": 3.0, "client_key": 7, "client_token": 9}])
    log.close()
    old = [json.loads(x) for x in (tmp_path / "events.1.jsonl").read_text().splitlines()]
    new = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["ts"] for r in old] == [1.0, 2.0] and [r["ts"] for r in new] == [3.0]
    assert "client_key" not in new[0] and new[0]["client_token"] == 9  # keys only with [log] log_keys
    assert log.records == 3 and log.errors == 0
    stdout = EventLog("-")
    stdout.reopen()  # nothing to reopen, no error
    stdout.close()
