"""End-to-end lab scenarios, graded by the apps' own records and by tshark.

Each scenario runs once (session fixture ``scenario``); every test checks that
all bytes arrived intact both ways and that tshark, an independent dissector,
sees MPTCP and the expected subflows in the gateway capture.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from mproxy.lab import Lab, lab_available
from mproxy.lab.apps import pattern, pattern_bytes
from mproxy.lab.scenarios import PORT, ScenarioResult, bulk
from mproxy.lab.topology import NS_PREFIX, list_netns
from tests.oracles import (
    data_streams,
    tshark_count,
    tshark_fields,
    tshark_follow_raw,
)

LAB_REASON = lab_available()
lab = pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")
Scenario = Callable[[str], ScenarioResult]


# --------------------------------------------------------------------------- helpers
def subflow_payload(cap: Path) -> dict[int, dict[str, object]]:
    """Per MPTCP tcp.stream: client IP (non-server-port side), payload bytes c2s / s2c."""
    rows = tshark_fields(cap, ["tcp.stream", "ip.src", "ipv6.src", "ip.dst", "ipv6.dst",
                               "tcp.srcport", "tcp.len"], "mptcp && tcp.len > 0")
    out: dict[int, dict[str, object]] = defaultdict(lambda: {"client": None, "server": None,
                                                             "c2s": 0, "s2c": 0})
    for stream, s4, s6, d4, d6, sport, length in rows:
        st = out[int(stream)]
        src, dst = s4 or s6, d4 or d6
        if int(sport) == PORT:
            st["s2c"] = int(st["s2c"]) + int(length)  # type: ignore[call-overload]
            st["client"], st["server"] = dst, src
        else:
            st["c2s"] = int(st["c2s"]) + int(length)  # type: ignore[call-overload]
            st["client"], st["server"] = src, dst
    return dict(out)


def assert_intact(res: ScenarioResult) -> None:
    assert res.ok, "\n".join(res.problems())
    assert res.connections, "no connections recorded"
    for c in res.connections:
        assert c.c2s_sent_bytes > 0 and c.s2c_sent_bytes, "both directions must carry data"
        assert c.mptcp is True, f"{c.four_tuple} fell back to TCP"


def assert_capture_has_mptcp(res: ScenarioResult) -> None:
    assert res.capture.is_file() and res.capture.stat().st_size > 24
    assert tshark_count(res.capture, "mptcp") > 0, "tshark sees no MPTCP"


def intact(scenario: Scenario, name: str) -> ScenarioResult:
    """The named scenario's run, checked whole: every byte arrived, over MPTCP, and tshark sees it."""
    res = scenario(name)
    assert_intact(res)
    assert_capture_has_mptcp(res)
    return res


def assert_multipath(res: ScenarioResult, min_streams: int = 2) -> dict[int, dict[str, object]]:
    flows = subflow_payload(res.capture)
    assert len(flows) >= min_streams, f"only {len(flows)} subflows carried data: {flows}"
    return flows


def paths_used(res: ScenarioResult, flows: dict[int, dict[str, object]], key: str = "c2s") -> set[int]:
    return {p for f in flows.values() if int(f[key]) > 0  # type: ignore[call-overload]
            if (p := res.addresses.path_of(str(f["client"]))) is not None}


# --------------------------------------------------------------------------- unit (no lab)
def test_pattern_independent_of_chunking() -> None:
    whole = pattern_bytes(7, 200_003)
    for chunks in ((1, 7, 1460), (65536,), (3,)):
        assert b"".join(pattern(7, 200_003, chunks)) == whole
    assert pattern_bytes(8, 1000) != whole[:1000]


# --------------------------------------------------------------------------- scenarios
@pytest.mark.lab
@lab
def test_two_paths(scenario: Scenario) -> None:
    res = intact(scenario, "two_paths")
    flows = assert_multipath(res)
    assert paths_used(res, flows, "c2s") == {0, 1}, f"upload not spread over both paths: {flows}"
    assert paths_used(res, flows, "s2c") == {0, 1}, f"download not spread over both paths: {flows}"
    (c,) = res.connections
    assert c.client_addr == res.addresses.client_addr[0][4]
    assert {sf[0] for sf in c.subflows} == {res.addresses.client_addr[0][4], res.addresses.client_addr[1][4]}


@pytest.mark.lab
@lab
def test_ipv6(scenario: Scenario) -> None:
    res = intact(scenario, "ipv6")
    assert tshark_count(res.capture, "ip") == 0 and tshark_count(res.capture, "ipv6 && mptcp") > 0
    flows = assert_multipath(res)
    assert paths_used(res, flows, "c2s") == {0, 1}, flows
    assert res.connections[0].client_addr == res.addresses.client_addr[0][6]


@pytest.mark.lab
@lab
def test_mixed_families(scenario: Scenario) -> None:
    """One connection whose subflows are IPv4 and IPv6: data crosses on both families."""
    res = intact(scenario, "mixed_families")
    (c,) = res.connections
    assert c.client_addr == res.addresses.client_addr[0][4] and c.server_addr == res.addresses.server_addr[4]
    flows = assert_multipath(res)
    fams = {6 if ":" in str(f["server"]) else 4 for f in flows.values() if int(f["c2s"]) > 0}  # type: ignore[call-overload]
    assert fams == {4, 6}, f"data not carried over both families: {flows}"


@pytest.mark.lab
@lab
def test_path_failure(scenario: Scenario) -> None:
    res = intact(scenario, "path_failure")
    assert any("down" in e for _, e in res.events)
    flows = assert_multipath(res)
    assert paths_used(res, flows, "c2s") == {0, 1}, f"path 1 carried no data before the cut: {flows}"
    c = res.connections[0]
    if c.mptcp_bytes_retrans is not None:  # Linux >= 6.5 reports data-level reinjections
        assert c.mptcp_bytes_retrans > 0, "no reinjection after the path was cut"


@pytest.mark.lab
@lab
def test_loss(scenario: Scenario) -> None:
    res = intact(scenario, "loss")
    assert_multipath(res)
    # The capture is taken before the drop, so losses show up as retransmissions.
    assert tshark_count(res.capture, "tcp.analysis.retransmission || tcp.analysis.fast_retransmission") > 0


@pytest.mark.lab
@lab
def test_add_addr(scenario: Scenario) -> None:
    res = intact(scenario, "add_addr")
    addr2 = res.addresses.server_addr2[4]
    assert tshark_count(res.capture, "tcp.options.mptcp.subtype == 3") > 0, "no ADD_ADDR seen"
    joins = tshark_count(res.capture, "tcp.options.mptcp.subtype == 1 && tcp.flags.syn == 1 "
                                      f"&& tcp.flags.ack == 0 && ip.dst == {addr2}")
    assert joins > 0, f"no MP_JOIN SYN to the announced {addr2}"
    flows = assert_multipath(res)
    assert any(f["server"] == addr2 for f in flows.values()), "no data over the announced address"
    assert any(sf[2] == addr2 for sf in res.connections[0].subflows)


@pytest.mark.lab
@lab
def test_concurrent(scenario: Scenario) -> None:
    res = scenario("concurrent")
    assert_intact(res)
    assert len(res.connections) == 12
    assert len({c.client_port for c in res.connections}) == 12
    assert len({c.client_token for c in res.connections}) == 12
    assert_capture_has_mptcp(res)
    assert_multipath(res, min_streams=13)


@pytest.mark.lab
@lab
def test_dss_stripped(scenario: Scenario) -> None:
    """Both kernels really fell back to TCP mid-connection, and both applications finished.

    (Whether every byte arrived is the kernel's business here: Linux 6.18 often loses some in
    this fallback. The replay test takes what the receivers read as the truth.)"""
    res = scenario("dss_stripped")
    (c,) = res.connections
    assert c.client_ok and c.server_ok, "\n".join(res.problems())
    assert c.mptcp is False, "the client did not fall back"
    assert res.mib["server"].get("DssFallback", 0) >= 1 and res.mib["client"].get("DssFallback", 0) >= 1, res.mib
    assert tshark_count(res.capture, "tcp.options.mptcp.subtype == 2 && tcp.len > 0") > 0, "no data with DSS first"
    assert tshark_count(res.capture, "!mptcp && tcp.len > 0") > 0, "no data without MPTCP options after"


@pytest.mark.lab
@lab
def test_bidirectional(scenario: Scenario) -> None:
    res = intact(scenario, "bidirectional")
    flows = assert_multipath(res)
    assert paths_used(res, flows, "c2s") and paths_used(res, flows, "s2c")
    # Really simultaneous: the server's data started before the client's ended.
    times = tshark_fields(res.capture, ["frame.time_relative", "tcp.srcport"], "mptcp && tcp.len > 0")
    first_s2c = min(float(t) for t, p in times if int(p) == PORT)
    last_c2s = max(float(t) for t, p in times if int(p) != PORT)
    assert first_s2c < last_c2s


# --------------------------------------------------------------------------- oracles
@pytest.mark.lab
@lab
def test_follow_raw_oracle(scenario: Scenario) -> None:
    res = scenario("two_paths")
    streams = tshark_follow_raw(res.capture)
    assert len(streams) >= 2
    (c,) = res.connections
    upload = pattern_bytes(c.seed, c.c2s_sent_bytes)
    reply = pattern_bytes(c.reply_seed or 0, c.s2c_sent_bytes or 0)
    assert hashlib.sha256(upload).hexdigest() == c.c2s_sent_sha256
    assert hashlib.sha256(reply).hexdigest() == c.s2c_sent_sha256
    clients = {res.addresses.client_addr[p][4] for p in (0, 1)}
    total_up = 0
    for s in streams:
        assert s.client[0] in clients and s.server == (res.addresses.server_addr[4], PORT)
        total_up += len(s.client_data)
        # Each subflow carries slices of the one data stream: its first bytes are in it.
        if s.client_data:
            assert upload.find(s.client_data[:256]) >= 0
        if s.server_data:
            assert reply.find(s.server_data[:256]) >= 0
    assert total_up >= c.c2s_sent_bytes  # subflows together carry everything (plus reinjections)
    initial = next(s for s in streams if s.four_tuple == c.four_tuple)
    assert upload.startswith(initial.client_data[:1000])  # data-level byte 0 goes on the initial subflow


# --------------------------------------------------------------------------- lab mechanics
@pytest.mark.lab
@lab
def test_bulk_small(tmp_path: Path) -> None:
    import warnings

    from tests.lab.livehelp import kernel_corrupted

    for attempt in range(1, 4):
        res = bulk(4, keep=tmp_path / str(attempt))
        if res.ok or not kernel_corrupted(res):
            break
        # Linux 6.18 now and then hands an application other bytes than were sent, every count
        # right (README "The lab"; seen on CI here): no ground truth, run again
        warnings.warn(f"bulk run {attempt}: a kernel delivered other bytes than were sent: "
                      + "; ".join(res.problems()), stacklevel=1)
    assert_intact(res)
    assert len(res.connections) == 2
    assert sum(data_streams(res.capture).values()) >= 4_000_000


@pytest.mark.lab
@lab
def test_link_flap_and_loss_knobs(tmp_path: Path) -> None:
    from tests.lab.livehelp import transfer

    # shaped (the default 30mbit): unshaped, 300 KB went in 4 ms on the first subflow before the
    # path manager had opened the join (seen once), and nothing showed the second path works again
    with Lab() as lb:
        lb.link(1, up=False)
        lb.link(1, up=True)
        lb.loss(0, 0.5)
        rules = lb.run(lb.ns_gw, "iptables", "-S", "FORWARD").stdout
        assert rules.count("statistic") == 2
        lb.clear_loss()
        assert "statistic" not in lb.run(lb.ns_gw, "iptables", "-S", "FORWARD").stdout
        res = transfer(lb, tmp_path, "flap", c2s_bytes=300_000, s2c_bytes=300_000)  # (kernel corruption: again)
        assert_intact(res)
        assert_multipath(res)  # path 1 works again after the flap
        ns = (lb.ns_cli, lb.ns_gw, lb.ns_srv)
    assert not set(ns) & set(list_netns())


@pytest.mark.lab
@lab
def test_lab_cleans_up_on_error() -> None:
    with pytest.raises(ZeroDivisionError):
        with Lab() as lb:
            ns = (lb.ns_cli, lb.ns_gw, lb.ns_srv)
            assert set(ns) <= set(list_netns())
            lb.popen(lb.ns_srv, "sleep", "60")
            1 / 0
    assert not set(ns) & set(list_netns())


@pytest.mark.lab
@lab
def test_no_namespaces_left() -> None:
    """Runs last in this file: nothing from this process remains."""
    import os

    mine = [n for n in list_netns() if n.startswith(f"{NS_PREFIX}-{os.getpid()}-")]
    assert mine == []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{NS_PREFIX}-{os.getpid()}-" not in out
