"""``mproxy replay`` on real kernel MPTCP captures from the lab.

Ground truth is what the applications sent (their SHA-256); the rebuilt
streams are read back from the emitted pcap by tshark's TCP follow, an
independent reassembler, never by our own decoder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mproxy.cli import main
from mproxy.lab.scenarios import ScenarioResult
from tests.oracles import tshark_count, tshark_follow_raw

from .conftest import LAB_REASON

pytestmark = [pytest.mark.lab, pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")]

SCENARIOS = ["two_paths", "path_failure", "loss", "ipv6", "add_addr", "mixed_families", "concurrent",
             "bidirectional"]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("name", SCENARIOS)
def test_replay_rebuilds_what_the_applications_sent(name: str, scenario: Callable[[str], ScenarioResult],
                                                    tmp_path: Path) -> None:
    res = scenario(name)
    assert res.ok, "\n".join(res.problems())
    assert res.capture_drops == 0, f"tcpdump lost {res.capture_drops} packets: the capture is incomplete"
    out, log, prom = tmp_path / "out.pcap", tmp_path / "log.jsonl", tmp_path / "metrics.prom"
    assert main(["replay", str(res.capture), "--out", str(out), "--log", str(log), "--metrics", str(prom), "-q"]) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    conns = {(r["client"], r["client_port"]): r for r in records if r["event"] == "mptcp_connection"}
    followed = {(f.client[0], f.client[1]): f for f in tshark_follow_raw(out)}
    assert len(conns) == len(res.connections)
    for c in res.connections:
        key = (c.client_addr, c.client_port)
        rec, f = conns[key], followed[key]
        # what tshark reads from the emitted stream is exactly what each application wrote
        assert (len(f.client_data), sha(f.client_data)) == (c.c2s_sent_bytes, c.c2s_sent_sha256), key
        assert (len(f.server_data), sha(f.server_data)) == (c.s2c_sent_bytes, c.s2c_sent_sha256), key
        assert (f.server[0], f.server[1]) == (c.server_addr, c.server_port)
        # and the log agrees with it
        assert rec["c2s"]["sha256"] == c.c2s_sent_sha256 and rec["s2c"]["sha256"] == c.s2c_sent_sha256
        assert rec["outcome"] == "data_fin" and rec["c2s"]["gap_bytes"] == rec["s2c"]["gap_bytes"] == 0
        assert len(rec["subflows"]) >= 2, "the join must be grouped with its connection"
    notices = [r for r in records if r["event"] == "notice"]
    assert not notices, notices
    # the metrics snapshot tells the same story
    from prometheus_client.parser import text_string_to_metric_families

    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples}
    assert sum(v for (n, _), v in m.items() if n == "mproxy_notices_total") == 0
    assert m[("mproxy_connections_closed_total", (("outcome", "data_fin"),))] == len(res.connections)
    assert m[("mproxy_subflows_joined_total", ())] == sum(
        1 for r in conns.values() for sf in r["subflows"] if sf["role"] == "join" and sf["established"])
    assert m[("mproxy_rebuilt_bytes_total", (("direction", "client_to_server"),))] == sum(
        c.c2s_sent_bytes for c in res.connections)
    # one plain TCP conversation per connection: no MPTCP left, no TCP analysis complaints
    assert tshark_count(out, "mptcp") == 0
    assert tshark_count(out, "tcp.analysis.flags && !tcp.analysis.window_update") == 0
    if name == "add_addr":
        (rec,) = conns.values()
        assert rec["announced"]["server"], "the ADD_ADDR must be recorded"
        assert any(sf["dst"] == res.addresses.server_addr2[4] for sf in rec["subflows"])


def test_replay_follows_a_fallback_to_tcp_mid_connection(scenario: Callable[[str], ScenarioResult],
                                                          tmp_path: Path) -> None:
    """Options stripped on the path, both kernels fell back (``dss_stripped``): the emitted stream
    goes on with the plain TCP bytes, both ways, exactly as the receiving applications read them
    (Linux 6.18 often loses bytes in this fallback, so what the senders wrote is not the truth;
    the rebuilt stream must then stop where the receiver's did, not invent or drop anything)."""
    res = scenario("dss_stripped")
    (c,) = res.connections
    assert c.client_ok and c.server_ok, "\n".join(res.problems())
    assert res.capture_drops == 0, f"tcpdump lost {res.capture_drops} packets: the capture is incomplete"
    out, log = tmp_path / "out.pcap", tmp_path / "log.jsonl"
    assert main(["replay", str(res.capture), "--out", str(out), "--log", str(log), "-q"]) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    (rec,) = [r for r in records if r["event"] == "mptcp_connection"]
    (f,) = tshark_follow_raw(out)
    assert (len(f.client_data), sha(f.client_data)) == (c.c2s_recv_bytes, c.c2s_recv_sha256)
    assert (len(f.server_data), sha(f.server_data)) == (c.s2c_recv_bytes, c.s2c_recv_sha256)
    assert rec["c2s"]["sha256"] == c.c2s_recv_sha256 and rec["s2c"]["sha256"] == c.s2c_recv_sha256
    assert rec["c2s"]["gap_bytes"] == rec["s2c"]["gap_bytes"] == 0
    # the fallback is said once per direction, and nothing was shed waiting for mappings
    notices = [r["type"] for r in records if r["event"] == "notice"]
    assert sorted(notices) == ["infinite_mapping", "infinite_mapping"], notices
    assert tshark_count(out, "mptcp") == 0
    assert tshark_count(out, "tcp.analysis.flags && !tcp.analysis.window_update") == 0
