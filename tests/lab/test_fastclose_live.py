"""Closing the loop on real kernel MPTCP: ``mproxy run`` kills an attacking connection on every subflow.

One lab (client with two paths, gateway, server) for the module; each test
starts ``mproxy run`` in the gateway namespace with a config it writes. The
HTTP server application records every byte it receives
(:mod:`mproxy.lab.http_attack`), both applications report how and when their
connection ended, and tcpdump in the client and server namespaces records what
each end received — tshark then says which subflows got an RST and whether it
carried MP_FASTCLOSE. The attack request is split across the two client paths
(``...UNION+SELE`` on path 0, ``CT+password...`` on path 1).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mproxy.lab.topology import lab_available

_ROOT = Path(__file__).resolve().parents[2]
LAB_REASON = lab_available()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")]

QUEUE = 3
PORT = 80


@contextlib.contextmanager
def mproxy(lab: Any, d: Path, extra: str = "") -> Iterator[dict[str, Any]]:
    """``mproxy run`` in the gateway namespace; yields a dict that gets ``records`` after the stop."""
    from tests.lab.livehelp import Mproxy

    mp = Mproxy(lab, d, queue=QUEUE, inspector=None, sink=False, extra=extra).start()
    out: dict[str, Any] = {"proc": mp.proc, "records": []}
    try:
        yield out
    finally:
        mp.stop()
        out["records"] = mp.records()
        mp.check_clean_stop()


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    from mproxy.lab.http_attack import prepare_steering
    from mproxy.lab.topology import Lab

    try:
        import netfilterqueue  # noqa: F401
    except ImportError as e:
        pytest.skip(f"netfilterqueue not importable: {e}")
    with Lab(rate=None, gso=False) as lab:
        prepare_steering(lab)
        yield lab


@pytest.fixture(scope="module")
def server(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from mproxy.lab.http_attack import Server

    srv = Server(lab, tmp_path_factory.mktemp("http"), PORT)
    yield srv
    srv.stop()


def resets(pcap: Path) -> dict[tuple[str, int, str, int], set[str]]:
    """4-tuple (src, sport, dst, dport) of each RST in the capture -> kinds ('rst', 'mp_fastclose')."""
    from tests.oracles import tshark_fields

    rows = tshark_fields(pcap, ["ip.src", "ipv6.src", "tcp.srcport", "ip.dst", "ipv6.dst", "tcp.dstport",
                                "tcp.options.mptcp.subtype", "tcp.options.mptcp.recvkey"], "tcp.flags.reset == 1")
    out: dict[tuple[str, int, str, int], set[str]] = {}
    for r in rows:
        src, dst = r[0] or r[1], r[3] or r[4]
        kinds = out.setdefault((src, int(r[2]), dst, int(r[5])), set())
        kinds.add("rst")
        if "7" in r[6].split(","):
            kinds.add("mp_fastclose")
    return out


def subflow_tuples(lab: Any, family: int, records: list[dict[str, Any]]) -> list[tuple[str, int, str, int]]:
    (conn,) = [r for r in records if r["event"] == "mptcp_connection" and r.get("outcome") == "fastclose"]
    return [(sf["src"], sf["sport"], sf["dst"], sf["dport"]) for sf in conn["subflows"]]


def check_killed(lab: Any, tmp: Path, family: int, cli_pcap: Path, srv_pcap: Path, records: list[dict[str, Any]],
                 t0: float, client_end: dict[str, Any], server_end: dict[str, Any]) -> None:
    # both applications saw the connection reset, within a second of the trigger
    assert client_end.get("how") == "reset", client_end
    assert server_end.get("how") == "reset", server_end
    assert client_end["t"] - t0 < 1.0, (client_end, t0)
    assert server_end["t"] - t0 < 1.0, (server_end, t0)
    # every subflow got its RST carrying MP_FASTCLOSE, at both ends
    tuples = subflow_tuples(lab, family, records)
    assert len(tuples) >= 2, tuples
    paths = {lab.addresses().path_of(t[0]) for t in tuples}
    assert paths == {0, 1}, tuples  # the subflows really used both client paths
    at_server, at_client = resets(srv_pcap), resets(cli_pcap)
    for src, sport, dst, dport in tuples:
        assert "mp_fastclose" in at_server.get((src, sport, dst, dport), set()), (at_server, tuples)
        assert "mp_fastclose" in at_client.get((dst, dport, src, sport), set()), (at_client, tuples)
    (act,) = [r for r in records if r["event"] == "action" and r["action"] == "fastclose"]
    assert act["mode"] == "mp_fastclose" and act["version"] == 1 and len(act["subflows"]) == len(tuples), act
    assert all(sf["to_responder"] == sf["to_initiator"] == "rst+mp_fastclose" for sf in act["subflows"])


@pytest.mark.parametrize("family", [4, 6])
def test_inspector_blocks_split_attack_and_fastcloses(lab: Any, server: Any, tmp_path: Path, family: int) -> None:
    from mproxy.lab.http_attack import NEEDLE, ATTACK_PART1, Client, split_attack

    cli_pcap, srv_pcap = tmp_path / "client.pcap", tmp_path / "server.pcap"
    with mproxy(lab, tmp_path / "mproxy", '[inspector]\nmode = "on"\n') as mp:
        with lab.capture(cli_pcap, ns=lab.ns_cli), lab.capture(srv_pcap, ns=lab.ns_srv):
            client = Client(lab, server, family)
            try:
                res = split_attack(lab, client, PORT)
                end = server.wait_for(lambda e: e.get("ev") == "end" and e.get("conn") == client.conn, 5)
            finally:
                client.close()
    got = server.received(client.conn)
    assert ATTACK_PART1 in got  # part 1 alone is harmless and was delivered
    assert NEEDLE not in got and b"CT+password" not in got, got  # the bytes completing the attack never arrived
    check_killed(lab, tmp_path, family, cli_pcap, srv_pcap, mp["records"], res["part2_sent"], res["client"], end)
    (act,) = [r for r in mp["records"] if r["event"] == "action"]
    assert act["trigger"] == "inspector" and act["sid"] == 1000002, act
    assert act["dropped"]["len"] > 0


def test_an_attack_in_a_fast_open_syn_never_reaches_the_server(lab: Any, server: Any, tmp_path: Path) -> None:
    """The whole attack in a TCP Fast Open SYN: the server's application would read it at accept,
    before any later packet. mproxy judges the SYN's bytes before the SYN passes and drops it;
    the client's kernel sends the SYN again without them and then the bytes as data, which are
    inspected like every stream: the server never reads the attack."""
    from mproxy.lab.http_attack import ATTACK_PART1, ATTACK_PART2, NEEDLE, Client

    with lab.fast_open(), mproxy(lab, tmp_path / "mproxy", '[inspector]\nmode = "on"\n') as mp:
        client = Client(lab, server, 4, fast_open=ATTACK_PART1 + ATTACK_PART2)
        try:
            ended = client.wait_end(3.0)  # the client's socket: reset (or still waiting)
        finally:
            client.close()
    # whatever the server accepted from this client port (the SYN sent again is killed in the
    # handshake, before any accept, when its bytes follow as data), it never read the attack
    mine = [e["conn"] for e in server.drain() if e.get("ev") == "accept" and e.get("port") == client.sport]
    assert all(NEEDLE not in server.received(n) for n in mine), [server.received(n) for n in mine]
    acts = [r for r in mp["records"] if r["event"] == "action" and r["action"] == "fastclose"]
    assert any(a["trigger"] == "inspector" and a["sid"] == 1000002 and "Fast Open SYN" in a["reason"]
               and a["dropped"]["len"] == len(ATTACK_PART1 + ATTACK_PART2) for a in acts), acts
    assert ended.get("how") == "reset", ended  # the client learnt its connection is dead


def test_a_later_copy_of_a_content_does_not_hide_the_split_attack(lab: Any, server: Any, tmp_path: Path) -> None:
    """Evasion regression: part 2 carries, after the end of the attack, padding beyond the inspector
    window and one more "union", in one segment. An inspector that kept only each content's last
    match saw "union" and "select" too far apart and let the attack through."""
    from mproxy.lab.http_attack import ATTACK_PART1, ATTACK_PART2, NEEDLE, Client, split_attack

    part2 = ATTACK_PART2.replace(b" HTTP/1.1", b"&pad=" + b"x" * 700 + b"&again=union HTTP/1.1", 1)
    assert len(part2) < 1400  # one segment: one chunk for the inspector
    cli_pcap, srv_pcap = tmp_path / "client.pcap", tmp_path / "server.pcap"
    with mproxy(lab, tmp_path / "mproxy", '[inspector]\nmode = "on"\nwindow = 512\n') as mp:
        with lab.capture(cli_pcap, ns=lab.ns_cli), lab.capture(srv_pcap, ns=lab.ns_srv):
            client = Client(lab, server, 4)
            try:
                res = split_attack(lab, client, PORT, part2)
                end = server.wait_for(lambda e: e.get("ev") == "end" and e.get("conn") == client.conn, 5)
            finally:
                client.close()
    got = server.received(client.conn)
    assert ATTACK_PART1 in got and NEEDLE not in got and b"&again=union" not in got, got
    check_killed(lab, tmp_path, 4, cli_pcap, srv_pcap, mp["records"], res["part2_sent"], res["client"], end)
    (act,) = [r for r in mp["records"] if r["event"] == "action"]
    assert act["trigger"] == "inspector" and act["sid"] == 1000002, act


@pytest.mark.parametrize("by_reload", [False, True], ids=["at-start", "added-by-sighup"])
def test_ids_alert_fastcloses_every_subflow(lab: Any, server: Any, tmp_path: Path, by_reload: bool) -> None:
    """An external IDS alert on the emitted stream kills the connection on every subflow; the alert
    file may be named at start or added later by a reload (a restart would leave the connection
    unqueued)."""
    from mproxy.lab.http_attack import NEEDLE, Client

    eve = tmp_path / "eve.json"
    eve.write_text('{"event_type":"stats","stats":{}}\n')
    cli_pcap, srv_pcap = tmp_path / "client.pcap", tmp_path / "server.pcap"
    alerts = f'[alerts]\nfiles = ["{eve}"]\npoll_interval = 0.1\n'
    d = tmp_path / "mproxy"
    with mproxy(lab, d, '[inspector]\nmode = "off"\n' + ("" if by_reload else alerts)) as mp:
        with lab.capture(cli_pcap, ns=lab.ns_cli), lab.capture(srv_pcap, ns=lab.ns_srv):
            client = Client(lab, server, 4)
            try:
                res = split_attack_no_wait(lab, client)
                # the attack went through (no embedded inspector): the IDS alerts on the emitted stream
                assert NEEDLE in server.received(client.conn)
                if by_reload:
                    cfg = d / "mproxy.toml"
                    cfg.write_text(cfg.read_text() + alerts)
                    mp["proc"].send_signal(signal.SIGHUP)
                    deadline = time.monotonic() + 10
                    while f"reload: following {eve}" not in (d / "mproxy.err").read_text(errors="replace"):
                        assert time.monotonic() < deadline, (d / "mproxy.err").read_text(errors="replace")
                        time.sleep(0.05)
                alert = {"timestamp": "2025-01-01T00:00:00.000000+0000", "event_type": "alert", "proto": "TCP",
                         "src_ip": lab.client_addr[0][4], "src_port": client.sport, "dest_ip": lab.server_addr[4],
                         "dest_port": PORT, "alert": {"signature_id": 2006446, "signature": "ET WEB_SERVER "
                                                      "Possible SQL Injection Attempt UNION SELECT", "rev": 1}}
                with eve.open("a") as f:
                    f.write("this is not json\n")
                    t0 = time.time()
                    f.write(json.dumps(alert) + "\n")
                cend = client.wait_end(3.0)
                send = server.wait_for(lambda e: e.get("ev") == "end" and e.get("conn") == client.conn, 5)
            finally:
                client.close()
    assert res
    check_killed(lab, tmp_path, 4, cli_pcap, srv_pcap, mp["records"], t0, cend, send)
    (act,) = [r for r in mp["records"] if r["event"] == "action"]
    assert act["trigger"] == "alert" and act["sid"] == 2006446 and act["ids"] == "suricata", act
    st = next(r for r in mp["records"] if r["event"] == "stats")["reactions"]
    assert st["alerts"]["acted"] == 1 and st["alerts"]["malformed"] == {"not_json": 1}, st
    assert st["alerts"]["ignored"] == 0  # the stats line was before the start (followed from the end)
    reloads = [r for r in mp["records"] if r["event"] == "reload"]
    assert [(r["ok"], r["restart_needed"]) for r in reloads] == ([(True, [])] if by_reload else [])


def split_attack_no_wait(lab: Any, client: Any) -> bool:
    from mproxy.lab.http_attack import ATTACK_PART1, ATTACK_PART2, benign_first, steer

    benign_first(lab, client, PORT)
    client.send(ATTACK_PART1)
    steer(lab, 1)
    time.sleep(0.2)
    client.send(ATTACK_PART2)
    client.response()
    return True


def test_benign_transfer_untouched(lab: Any, server: Any, tmp_path: Path) -> None:
    from mproxy.lab.http_attack import BENIGN, Client, benign_first, steer

    with mproxy(lab, tmp_path / "mproxy", '[inspector]\nmode = "on"\n') as mp:
        client = Client(lab, server, 4)
        try:
            assert benign_first(lab, client, PORT)["status"] == "HTTP/1.1 200 OK"
            steer(lab, 1)
            time.sleep(0.2)
            client.send(BENIGN)
            assert client.response()["status"] == "HTTP/1.1 200 OK"
            client.cmd("close")
            end = server.wait_for(lambda e: e.get("ev") == "end" and e.get("conn") == client.conn, 5)
        finally:
            client.close()
    assert end["how"] == "eof" and server.received(client.conn) == BENIGN * 2
    recs = mp["records"]
    assert not [r for r in recs if r["event"] == "action"], recs
    (conn,) = [r for r in recs if r["event"] == "mptcp_connection"]
    assert conn["outcome"] in ("data_fin", "fin") and len(conn["subflows"]) >= 2
    st = next(r for r in recs if r["event"] == "stats")
    assert st["verdicts"].get("drop", 0) == 0
    assert st["reactions"]["inspector"]["bytes"]["c2s"] == 2 * len(BENIGN)


def test_rules_reloaded_on_sighup_catch_the_attack_on_an_open_connection(lab: Any, server: Any,
                                                                         tmp_path: Path) -> None:
    """Signatures are updated with SIGHUP while a connection is open: the rest of that connection is
    inspected with the new rules (a restart would leave it uninspected: it is no longer queued)."""
    from mproxy.lab.http_attack import ATTACK_PART1, ATTACK_PART2, NEEDLE, Client, benign_first, steer

    rules = tmp_path / "live.rules"
    rules.write_text('alert tcp any any -> any any (msg:"placeholder"; content:"no-such-bytes-here"; sid:1;)\n')
    shipped = (_ROOT / "config" / "mproxy.rules").read_text()
    extra = f'[inspector]\nmode = "on"\nrules = "{rules}"\n[actions]\non_match = "fastclose"\n'
    err = tmp_path / "mproxy" / "mproxy.err"
    with mproxy(lab, tmp_path / "mproxy", extra) as mp:
        client = Client(lab, server, 4)
        try:
            benign_first(lab, client, PORT)
            client.send(ATTACK_PART1)
            rules.write_text(shipped)
            mp["proc"].send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "rules from" not in err.read_text(errors="replace").split("event log reopened", 1)[-1]:
                assert time.monotonic() < deadline, err.read_text(errors="replace")
                time.sleep(0.05)
            steer(lab, 1)
            time.sleep(0.2)
            r = client.send(ATTACK_PART2, until_received=False)
            cend = r if r.get("ev") == "ended" else client.wait_end(3.0)
            send = server.wait_for(lambda e: e.get("ev") == "end" and e.get("conn") == client.conn, 5)
        finally:
            client.close()
    got = server.received(client.conn)
    assert ATTACK_PART1 in got and NEEDLE not in got and b"CT+password" not in got, got
    assert cend.get("how") == "reset" and send.get("how") == "reset", (cend, send)
    recs = mp["records"]
    (rel,) = [r for r in recs if r["event"] == "reload"]
    assert rel["ok"] is True and rel["previous_rules"] == 1 and rel["rules"] > 1 and not rel["restart_needed"], rel
    (act,) = [r for r in recs if r["event"] == "action"]
    assert act["action"] == "fastclose" and act["trigger"] == "inspector" and act["sid"] == 1000002, act


@pytest.mark.parametrize("react", ["log", "fastclose"])
def test_a_pcre_that_backtracks_costs_a_verdict_its_budget_not_a_stall(lab: Any, server: Any, tmp_path: Path,
                                                                      react: str) -> None:
    """A rule's pcre with nested repeats, and a request on which it backtracks for ages (60 characters
    before the first line ends, no "Agent" in them): the verdict waits [inspector] pcre_budget_ms,
    not years. on_pcre_limit = "log": the request reaches the server and the connection goes on;
    "fastclose": the connection is killed on every subflow, the request never arrives."""
    from mproxy.lab.http_attack import BENIGN, Client, benign_first

    rules = tmp_path / "slow.rules"
    rules.write_text('alert tcp any any -> any any (msg:"slow"; content:"/slow"; pcre:"/(?:.|.)+Agent/"; sid:77;)\n')
    slow = b"GET /slow?" + b"a" * 60 + b" HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: demo/1\r\n\r\n"
    extra = (f'[inspector]\nmode = "on"\nrules = "{rules}"\npcre_budget_ms = 10\n'
             f'[actions]\non_pcre_limit = "{react}"\n')
    cli_pcap, srv_pcap = tmp_path / "client.pcap", tmp_path / "server.pcap"
    with mproxy(lab, tmp_path / "mproxy", extra) as mp:
        with lab.capture(cli_pcap, ns=lab.ns_cli), lab.capture(srv_pcap, ns=lab.ns_srv):
            client = Client(lab, server, 4)
            try:
                assert benign_first(lab, client, PORT)["status"] == "HTTP/1.1 200 OK"
                if react == "log":
                    client.send(slow)
                    assert client.response()["status"] == "HTTP/1.1 200 OK"
                    client.cmd("close")
                else:
                    r = client.send(slow, until_received=False)
                    t_sent = float(r.get("t", time.time()))
                    cend = r if r.get("ev") == "ended" else client.wait_end(3.0)
                end = server.wait_for(lambda e: e.get("ev") == "end" and e.get("conn") == client.conn, 5)
            finally:
                client.close()
    recs = mp["records"]
    (act,) = [r for r in recs if r["event"] == "action"]
    assert (act["trigger"], act["action"], act["sid"]) == ("pcre_limit", react, 77), act
    st = next(r for r in recs if r["event"] == "stats")
    assert st["reactions"]["inspector"]["pcre_limits"] >= 1, st
    if react == "log":
        assert end["how"] == "eof" and server.received(client.conn) == BENIGN + slow
    else:
        assert server.received(client.conn) == BENIGN
        check_killed(lab, tmp_path, 4, cli_pcap, srv_pcap, recs, t_sent, cend, end)
