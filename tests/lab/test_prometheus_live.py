"""A real Prometheus scrapes ``mproxy run`` during a two-path MPTCP transfer in the lab.

Both run inside the gateway namespace (mproxy's exporter on 127.0.0.1:9464, Debian's
``prometheus`` on 127.0.0.1:9090 of that namespace only), Prometheus scrapes every 0.5 s
with the shipped alert rules loaded, and the test asks Prometheus' HTTP API whether the
counters moved as the traffic implies: one joined subflow, the applications' byte counts,
one connection ended with DATA_FIN, verdicts, no notice and no firing alert. It also checks
that every metric the Grafana dashboard and the alert rules use exists in a real scrape.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab.test_gateway_live import LAB_REASON, lab, mproxy, transfer  # noqa: F401 - `lab` is a fixture
from tests.test_deploy import DEPLOY, dashboard_exprs, metric_names

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or ""),
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus)"),
]

PROM_PORT, METRICS = 9090, "127.0.0.1:9464"
_IDENTITY = ("__name__", "job", "instance")  # labels every series has: left out of the comparisons

# run inside the gateway namespace: GET each path of argv[2] (JSON list) from Prometheus, print the JSON
_CLIENT = """
import json, sys, urllib.request
base, paths = sys.argv[1], json.loads(sys.argv[2])
out = []
for p in paths:
    try:
        with urllib.request.urlopen(base + p, timeout=5) as r:
            body = r.read().decode()
        out.append(json.loads(body) if body.lstrip().startswith("{") else body)
    except Exception as e:
        out.append({"error": str(e)})
print(json.dumps(out))
"""


class Prom:
    """Debian's prometheus in the gateway namespace, with its own config and storage."""

    def __init__(self, lab: Any, d: Path) -> None:
        self.lab = lab
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "prometheus.yml"
        # the shipped rules, the shipped job name, a lab-speed scrape interval
        cfg.write_text(f"""
global:
  scrape_interval: 500ms
  evaluation_interval: 500ms
rule_files:
  - {DEPLOY / 'mproxy-alerts.yml'}
scrape_configs:
  - job_name: mproxy
    scrape_interval: 500ms
    scrape_timeout: 400ms
    static_configs:
      - targets: ["{METRICS}"]
""")
        self.log = d / "prometheus.log"
        with open(self.log, "wb") as err:
            self.proc = lab.popen(lab.ns_gw, PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={d / 'tsdb'}",
                                  f"--web.listen-address=127.0.0.1:{PROM_PORT}", "--log.level=warn",
                                  stdout=subprocess.DEVNULL, stderr=err)

    def get(self, *paths: str) -> list[Any]:
        import urllib.parse

        quoted = [p if p.startswith("/") else "/api/v1/query?query=" + urllib.parse.quote(p) for p in paths]
        cp = self.lab.run(self.lab.ns_gw, sys.executable, "-c", _CLIENT, f"http://127.0.0.1:{PROM_PORT}",
                          json.dumps(quoted))
        return json.loads(cp.stdout)

    def values(self, *queries: str) -> list[dict[tuple[tuple[str, str], ...], float]]:
        """Instant queries, evaluated together: each a {labels (without name, job, instance): value} dict."""
        out = []
        for q, res in zip(queries, self.get(*queries)):
            assert isinstance(res, dict) and res.get("status") == "success", (q, res)
            out.append({tuple(sorted((k, v) for k, v in r["metric"].items() if k not in _IDENTITY)):
                        float(r["value"][1]) for r in res["data"]["result"]})
        return out

    def one(self, query: str) -> float | None:
        (v,) = self.values(query)
        return next(iter(v.values()), None)

    def wait(self, query: str, want: float, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                got = self.one(query)
            except AssertionError:
                got = None
            if got == want:
                return
            time.sleep(0.25)
        pytest.fail(f"{query} = {got}, waited for {want}; prometheus log: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def test_prometheus_sees_the_two_path_transfer(lab: Any, tmp_path: Path) -> None:  # noqa: F811
    t0 = time.monotonic()
    prom = Prom(lab, tmp_path / "prometheus")
    try:
        with mproxy(lab, tmp_path / "mproxy", metrics=METRICS) as mp:
            prom.wait('up{job="mproxy"}', 1.0)
            prom.wait("sum(mproxy_verdicts_total)", 0.0)  # scraped before any traffic: every series is there
            res = transfer(lab, tmp_path, "prom", c2s_bytes=1_500_000, s2c_bytes=700_000)
            (c,) = res.connections
            prom.wait('mproxy_connections_closed_total{outcome="data_fin"}', 1.0)
            time.sleep(1.2)  # a couple more scrapes and rule evaluations after the connection ended
            (closed, rebuilt, joined, opened, active, verdicts, packets, lat_count, options, notices,
             refused) = prom.values(
                "mproxy_connections_closed_total", "mproxy_rebuilt_bytes_total", "mproxy_subflows_joined_total",
                "mproxy_connections_opened_total", "mproxy_connections_active + mproxy_subflows_active",
                "mproxy_verdicts_total", "sum(mproxy_packets_total)", "mproxy_verdict_latency_seconds_count",
                "mproxy_mptcp_options_total", "sum(mproxy_notices_total)", "sum(mproxy_subflows_refused_total)")
            names, alerts, rules = prom.get("/api/v1/label/__name__/values", "/api/v1/alerts", "/api/v1/rules")
    finally:
        prom.stop()
    elapsed = time.monotonic() - t0
    conns = [r for r in mp.records if r["event"] == "mptcp_connection"]
    subflows = conns[0]["subflows"] if len(conns) == 1 else []
    assert len(subflows) >= 2, "the transfer must have used both paths"
    # the counters moved as the traffic implies
    joins = sum(1 for sf in subflows if sf["role"] == "join" and sf["established"])
    assert joins >= 1 and joined == {(): float(joins)}, (joined, subflows)  # the MP_JOINs that completed
    assert opened == {(): 1.0} and active == {(): 0.0}
    assert closed[(("outcome", "data_fin"),)] == 1 and sum(closed.values()) == 1, closed
    assert rebuilt == {(("direction", "client_to_server"),): c.c2s_sent_bytes,
                       (("direction", "server_to_client"),): c.s2c_sent_bytes}, rebuilt
    accepted = verdicts[(("verdict", "accept"),)]
    # (GSO packets of up to 64 KB are one verdict each: how many depends on the load)
    assert accepted > 100 and verdicts[(("verdict", "drop"),)] == verdicts[(("verdict", "accept_modified"),)] == 0
    assert lat_count == {(): accepted}  # one latency observation per verdict, same scrape
    assert packets == {(): accepted}  # every queued packet went through the tracker
    assert accepted <= mp.stats()["queue"]["accepted"]  # the last packets may follow the last scrape
    assert options[(("subtype", "MP_CAPABLE"),)] >= 3 and options[(("subtype", "MP_JOIN"),)] >= 3
    assert options[(("subtype", "DSS"),)] > 1000
    assert notices == {(): 0.0} and refused == {(): 0.0}
    # the shipped rules load and evaluate cleanly, and nothing fires on clean traffic
    groups = rules["data"]["groups"]
    assert sum(len(g["rules"]) for g in groups) >= 10
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    assert [a for a in alerts["data"]["alerts"] if a["state"] == "firing"] == []
    # every metric the dashboard and the alert rules use is in the real scrape
    real = set(names["data"])
    dash = json.loads((DEPLOY / "grafana-mproxy.json").read_text())
    used = set().union(*(metric_names(e) for e in dashboard_exprs(dash)))
    used |= metric_names((DEPLOY / "mproxy-alerts.yml").read_text())
    assert used <= real, sorted(used - real)
    assert elapsed < 60, f"took {elapsed:.0f} s"
