"""deploy/: the Prometheus scrape config, the alert rules (with promtool's own unit tests) and the
Grafana dashboard only reference metrics the exporter really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.io.test_metrics import exposed_names, full_exposition

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
# names PromQL may use besides ours: Prometheus' own per-target series
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_NAME = re.compile(r"(?<![A-Za-z0-9_:$])(mproxy_[a-z0-9_]+|up)\b")


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    r = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def metric_names(promql: str) -> set[str]:
    """Metric names a PromQL expression selects (label values in quotes are not names)."""
    return set(_NAME.findall(re.sub(r'"[^"]*"', '""', promql)))


def dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition") and isinstance(v, str):
                yield v
            else:
                yield from dashboard_exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from dashboard_exprs(v)


@needs_promtool
def test_prometheus_config_and_rules_are_valid() -> None:
    out = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert "1 rule files found" in out
    out = promtool("check", "rules", str(DEPLOY / "mproxy-alerts.yml"))
    assert "SUCCESS" in out and "WARNING" not in out.upper()


@needs_promtool
def test_alert_rules_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(DEPLOY / "mproxy-alerts.test.yml"))


def test_alert_rules_reference_exposed_metrics_and_cover_the_notices_that_matter() -> None:
    text = (DEPLOY / "mproxy-alerts.yml").read_text()
    exprs = [m.group(1) for m in re.finditer(r"^\s+expr: (?:>-\n)?((?:.+\n)+?)\s+(?:for|labels):", text, re.M)]
    assert len(exprs) == text.count("- alert:")
    names = set().union(*(metric_names(e) for e in exprs))
    assert names <= exposed_names(full_exposition()) | BUILTIN, names - exposed_names(full_exposition())
    for t in ("overlap_mismatch", "side_channel", "join_hmac_failure", "join_flood", "bad_mapping"):
        assert f'mproxy_notices_total{{type="{t}"}}' in text, t
    for name in ("mproxy_memcap_hits_total", "mproxy_fail_verdicts_total", "mproxy_queue_dropped_packets_total",
                 "up"):
        assert name in names, name


def test_dashboard_references_only_exposed_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana-mproxy.json").read_text())
    exprs = list(dashboard_exprs(dash))
    used = set().union(*(metric_names(e) for e in exprs))
    exposed = exposed_names(full_exposition())
    assert used <= exposed | BUILTIN, sorted(used - exposed - BUILTIN)
    # it covers traffic, connections, actions and notices
    for name in ("mproxy_verdicts_total", "mproxy_rebuilt_bytes_total", "mproxy_packets_total",
                 "mproxy_connections_active", "mproxy_connections_closed_total", "mproxy_subflows_joined_total",
                 "mproxy_actions_total", "mproxy_fastcloses_total", "mproxy_downgrades_total",
                 "mproxy_notices_total", "mproxy_gap_bytes_total", "mproxy_memcap_hits_total",
                 "mproxy_verdict_latency_seconds_bucket", "mproxy_signature_matches_total",
                 "mproxy_inspector_pcre_limits_total", "mproxy_inspector_pcre_given_up_total"):
        assert name in used, name
    # well-formed enough for Grafana to import: unique ids, every graph has a query on the chosen source
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        assert all('instance=~"$instance"' in t["expr"] for t in p["targets"]), p["title"]
