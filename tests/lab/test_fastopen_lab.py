"""TCP Fast Open on kernel MPTCP (Linux 6.18): the request's first bytes ride in the SYN.

An IDS behind mproxy must see them at the head of the rebuilt stream: they are
exactly where an attacker would put an exploit to keep it out of the DSS-mapped
stream. Ground truth is what the applications sent and received (SHA-256); the
emitted stream is read back by tshark's TCP follow and HTTP dissector.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mproxy.cli import main
from mproxy.lab.apps import FAST_OPEN_HEAD
from mproxy.lab.scenarios import ScenarioResult
from mproxy.lab.scenarios import PORT
from tests.oracles import tshark_fields, tshark_follow_raw

from .conftest import LAB_REASON

pytestmark = [pytest.mark.lab, pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _syn_payloads(cap: Path) -> list[int]:
    rows = tshark_fields(cap, ["tcp.len"], "tcp.flags.syn == 1 && tcp.flags.ack == 0 && tcp.options.mptcp.subtype == 0")
    return sorted({int(r[0]) for r in rows})


@pytest.mark.parametrize("name", ["fast_open", "fast_open_refused"])
def test_replay_puts_fast_open_bytes_at_the_head_of_the_stream(
        name: str, scenario: Callable[[str], ScenarioResult], tmp_path: Path) -> None:
    res = scenario(name)
    assert res.capture_drops == 0, f"tcpdump lost {res.capture_drops} packets: the capture is incomplete"
    (c,) = res.connections
    # the kernels carried every byte (whatever MPTCP did with them)
    assert (c.c2s_sent_bytes, c.c2s_sent_sha256) == (c.c2s_recv_bytes, c.c2s_recv_sha256), res.problems()
    assert (c.s2c_sent_bytes, c.s2c_sent_sha256) == (c.s2c_recv_bytes, c.s2c_recv_sha256), res.problems()
    client = json.loads(res.client_json.read_text())["connections"][0]
    assert client["fast_open_bytes"] == len(FAST_OPEN_HEAD)
    assert _syn_payloads(res.capture) == [len(FAST_OPEN_HEAD)], "the SYN must carry the head"
    if name == "fast_open":
        assert c.mptcp, "the server took the SYN's bytes and the connection stayed MPTCP"
        assert res.mib["server"].get("MPJoinAckRx", 0) >= 1, "data went over both paths"
    else:
        assert c.mptcp is False, "Linux falls back to TCP when the server refuses the SYN's bytes"

    out, log = tmp_path / "out.pcap", tmp_path / "log.jsonl"
    assert main(["replay", str(res.capture), "--out", str(out), "--log", str(log), "-q"]) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    (rec,) = [r for r in records if r["event"] == "mptcp_connection"]
    (f,) = tshark_follow_raw(out)
    assert f.client_data.startswith(FAST_OPEN_HEAD)
    assert (len(f.client_data), sha(f.client_data)) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
    assert (len(f.server_data), sha(f.server_data)) == (c.s2c_sent_bytes, c.s2c_sent_sha256)
    assert rec["c2s"]["sha256"] == c.c2s_sent_sha256 and rec["c2s"]["gap_bytes"] == 0
    notices = [r for r in records if r["event"] == "notice"]
    if name == "fast_open":
        assert not notices, notices
        assert len(rec["subflows"]) >= 2
    else:
        # the fallback, once per direction
        assert notices and {n["type"] for n in notices} == {"infinite_mapping"}, notices
    # an IDS's HTTP parser reads the request line from the emitted stream
    uris = tshark_fields(out, ["http.request.uri"], "http.request", extra=["-d", f"tcp.port=={PORT},http"])
    assert uris and "UNION%20SELECT" in uris[0][0], uris[:3]


def test_replay_rules_name_an_injection_sent_in_a_fast_open_syn(
        scenario: Callable[[str], ScenarioResult], tmp_path: Path) -> None:
    """The embedded inspector (the shipped rules) sees the SYN's bytes too."""
    res = scenario("fast_open")
    out, log = tmp_path / "out.pcap", tmp_path / "log.jsonl"
    shipped = (Path(__file__).resolve().parents[2] / "config" / "mproxy.rules").read_text()
    rules = tmp_path / "lab.rules"  # the shipped rules, with the lab's port among the HTTP ports
    rules.write_text(shipped.replace("portvar HTTP_PORTS [80,", f"portvar HTTP_PORTS [{PORT},80,"))
    assert main(["replay", str(res.capture), "--out", str(out), "--log", str(log), "-q", "--rules", str(rules)]) == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    sigs = [r for r in recs if r["event"] == "signature"]
    assert any(r["direction"] == "c2s" and r["msg"] == "SQL injection UNION SELECT (URL-encoded)"
               and r["stream_offset"] <= len(FAST_OPEN_HEAD) for r in sigs), sigs
