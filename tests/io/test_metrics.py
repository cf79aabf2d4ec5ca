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
    assert m[("mproxy_connections_closed_total", (("outcome", "fastclose"),))] == 2
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


# --------------------------------------------------------------------------- the whole exposition
ROOT = Path(__file__).resolve().parents[2]


def full_exposition() -> str:
    """What ``mproxy run`` serves, every source filled (the service wires the same Sources)."""
    from prometheus_client import generate_latest

    from mproxy.core.gateway import Gateway
    from mproxy.io.metrics import QueueStats, make_registry, reaction_families, reload_family
    from mproxy.io.sinks import EventLog

    gw = Gateway()
    h = LatencyHistogram()
    h.observe(1e-4)
    sinks = [{"interface": "sink0", "frames": 3, "bytes": 180, "dropped": 1, "too_big": 0, "errors": 0},
             {"pcap": "/tmp/x.1.pcap", "frames": 3, "files": 1, "errors": 0}]
    src = Sources(tracker=gw.tracker, pipeline=gw.pipeline.stats, gateway=gw.stats,
                  queue=QueueStats(accepted=5, kernel=True, max_len=4096, bypassed={0: 3}), latency=h, mode="gateway",
                  sinks=lambda: sinks, sink_process=lambda: True, sink_restarts=lambda: 0, events=EventLog(""), extra=[reaction_families, lambda: [reload_family({})]])
    return generate_latest(make_registry(src)).decode()


def exposed_names(text: str) -> set[str]:
    """Sample names (with _total, _bucket, _sum, _count, _info) as PromQL sees them."""
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def readme_metrics() -> dict[str, str]:
    """Metric name -> type from the README's Metrics table."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split("### Metrics", 1)[1].split("\n### ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(mproxy_[a-z0-9_]+)` \| (\w+) \|", section, re.M)}


def test_gateway_exposition_follows_conventions() -> None:
    text = full_exposition()
    fams = list(text_string_to_metric_families(text))
    for fam in fams:
        assert fam.name.startswith("mproxy_"), fam.name  # the contract prefix, process metrics included
        for s in fam.samples:
            assert not {"src", "dst", "sport", "dport", "conn_id", "address"} & set(s.labels), s  # no cardinality bombs
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        if fam.type == "gauge" and "bytes" in fam.documentation.lower().split()[:1]:
            assert fam.name.endswith("_bytes"), fam.name
    names = {f.name for f in fams}
    for want in ("mproxy_verdicts", "mproxy_mptcp_options", "mproxy_decode_errors", "mproxy_connections_active",
                 "mproxy_subflows_active", "mproxy_connections_closed", "mproxy_subflows_joined",
                 "mproxy_subflows_refused", "mproxy_rebuilt_bytes", "mproxy_buffered_bytes", "mproxy_gap_bytes",
                 "mproxy_downgrades", "mproxy_fastcloses", "mproxy_notices", "mproxy_memcap_hits",
                 "mproxy_verdict_latency_seconds", "mproxy_queue_dropped_packets", "mproxy_fail_verdicts",
                 "mproxy_build_info", "mproxy_process_cpu_seconds"):
        assert want in names, want
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr  # no lint


def test_readme_documents_every_metric() -> None:
    from prometheus_client import generate_latest

    from mproxy.config import parse_config
    from mproxy.workers import Controller, _control_registry

    control = generate_latest(_control_registry(Controller(parse_config("[queue]\nworkers = 2"), "x"))).decode()
    text = full_exposition() + control
    kinds = {"counter": "counter", "gauge": "gauge", "histogram": "histogram", "info": "gauge"}
    exposed = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + ("_total" if fam.type == "counter" else "_info" if fam.type == "info" else "")
        exposed[name] = kinds[fam.type]
    documented = readme_metrics()
    assert documented == exposed


def test_unforeseen_label_values_are_exported_and_verdicts_come_from_the_queue() -> None:
    from mproxy.core.gateway import Gateway
    from mproxy.io.metrics import QueueStats

    gw = Gateway()
    gw.stats.actions.update({"fastclose": 2, "downgrade-host": 1})
    gw.stats.verdicts.update({"accept": 7})
    m = samples(snapshot(Sources(tracker=gw.tracker, gateway=gw.stats, mode="gateway")).decode())
    assert m[("mproxy_actions_total", (("action", "downgrade-host"),))] == 1
    assert m[("mproxy_fastcloses_total", ())] == 2 and m[("mproxy_downgrades_total", ())] == 0
    assert m[("mproxy_verdicts_total", (("verdict", "accept"),))] == 7
    assert m[("mproxy_verdicts_total", (("verdict", "drop"),))] == 0  # known values exist before they happen
    q = QueueStats(accepted=9, dropped=1, core_errors=1)  # fail-mode verdicts are verdicts too
    m = samples(snapshot(Sources(tracker=gw.tracker, gateway=gw.stats, queue=q, mode="gateway")).decode())
    assert m[("mproxy_verdicts_total", (("verdict", "accept"),))] == 9
    assert m[("mproxy_fail_verdicts_total", (("reason", "core_error"),))] == 1
    assert ("mproxy_queue_waiting_packets", ()) not in m  # kernel state unknown: not made up


async def test_service_serves_the_metrics_endpoint(tmp_path: Path) -> None:
    """The real ``mproxy run`` endpoint (without a queue): HTTP, content type, documented names only."""
    import asyncio

    from mproxy.config import parse_config
    from mproxy.io.sinks import EventLog
    from mproxy.service import Service

    import socket

    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    svc = Service(parse_config(f'[metrics]\nlisten = "127.0.0.1:{port}"\n'))
    svc.events = EventLog(str(tmp_path / "events.jsonl"))
    server = await svc._serve_metrics()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        server.close()
        svc.events.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"Content-Type: text/plain" in head
    text = body.decode()
    assert 'mproxy_build_info{mode="gateway"' in text
    documented = set(readme_metrics())
    for fam in text_string_to_metric_families(text):
        name = fam.name + ("_total" if fam.type == "counter" else "_info" if fam.type == "info" else "")
        assert name in documented, name
