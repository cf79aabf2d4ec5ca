"""Metrics: values agree with what the traffic implies; promtool accepts the exposition."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mproxy.cli import main
from mproxy.io.metrics import LatencyHistogram, Sources, snapshot

CAPTURES = Path(__file__).resolve().parents[2].parent / "shared" / "captures"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.skipif(not CAPTURES.is_dir(), reason="reference captures not found")
def test_replay_metrics_snapshot_matches_the_log(tmp_path: Path) -> None:
    prom, log = tmp_path / "m.prom", tmp_path / "log.jsonl"
    assert main(["replay", str(CAPTURES / "v0-client-4subflows.pcap"), "--out", str(tmp_path / "o.pcap"),
                 "--log", str(log), "--metrics", str(prom), "-q"]) == 0
    text = prom.read_text()
    m = samples(text)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    conns = [r for r in recs if r["event"] == "mptcp_connection"]
    assert m[("mproxy_rebuilt_bytes_total", (("direction", "client_to_server"),))] == sum(
        r["c2s"]["bytes"] for r in conns)
    assert m[("mproxy_rebuilt_bytes_total", (("direction", "server_to_client"),))] == sum(
        r["s2c"]["bytes"] for r in conns)
    joined = sum(sum(1 for sf in r["subflows"] if sf["role"] == "join" and sf["established"]) for r in conns)
    assert m[("mproxy_subflows_joined_total", ())] == joined >= 11
    assert m[("mproxy_connections_total", (("outcome", "fastclose"),))] == 2
    assert m[("mproxy_mptcp_options_total", (("subtype", "MP_FASTCLOSE"),))] == 4
    assert m[("mproxy_connections_active", ())] == 0 and m[("mproxy_subflows_active", ())] == 0
    # every metric carries the contract prefix and Prometheus naming conventions
    for fam in text_string_to_metric_families(text):
        assert fam.name.startswith("mproxy_"), fam.name
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_latency_histogram_buckets() -> None:
    h = LatencyHistogram()
    for v in (10e-6, 60e-6, 0.5e-3, 2e-3, 1.0):
        h.observe(v)
    m = samples(snapshot(Sources(latency=h)).decode())
    assert m[("mproxy_verdict_latency_seconds_bucket", (("le", "5e-05"),))] == 1
    assert m[("mproxy_verdict_latency_seconds_bucket", (("le", "0.001"),))] == 3
    assert m[("mproxy_verdict_latency_seconds_bucket", (("le", "+Inf"),))] == 5
    assert m[("mproxy_verdict_latency_seconds_count", ())] == 5
