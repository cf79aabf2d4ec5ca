"""Prometheus metrics (prefix ``mproxy_``), read from the core's counters at scrape time.

The core keeps plain integer counters in its stats dataclasses; this
collector turns them into metric families only when Prometheus scrapes, so
the per-packet path pays nothing for metrics. Labels are low-cardinality
enums (verdict, subtype, kind, outcome, direction) — never addresses.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..core.events import NoticeType, Outcome
from ..core.gateway import GatewayStats
from ..core.pipeline import PipelineStats
from ..core.tracker import Tracker
from ..wire.errors import ErrorKind
from ..wire.mptcp import Subtype

# verdict latency buckets (seconds): the target is p99 < 1 ms
LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3)


@dataclass(slots=True)
class LatencyHistogram:
    """A fixed-bucket histogram cheap enough to observe on every verdict."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        i = 0
        for b in self.bounds:
            if seconds <= b:
                break
            i += 1
        self.counts[i] += 1
        self.total += seconds
        self.n += 1


@dataclass(slots=True)
class QueueStats:
    """What the live adapter knows about its NFQUEUE (filled by mproxy/io/nfqueue.py)."""

    fail_verdicts: int = 0  # verdicts issued by fail mode because the core raised
    truncated: int = 0  # packets whose copy was cut short (MTU above the copy range)
    kernel_dropped: int = 0  # /proc/net/netfilter/nfnetlink_queue: queue full, dropped
    user_dropped: int = 0  # netlink socket buffer overrun
    bypassed: int = 0  # fail-open passes counted by mproxy (queue full with FAIL_OPEN)


@dataclass(slots=True)
class Sources:
    """Whatever is running: replay fills tracker + pipeline; the gateway fills all."""

    tracker: Tracker | None = None
    pipeline: PipelineStats | None = None
    gateway: GatewayStats | None = None
    queue: QueueStats | None = None
    latency: LatencyHistogram | None = None
    mode: str = "replay"
    lock: threading.Lock | None = None  # held while reading if the core runs in another thread


class MproxyCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def describe(self) -> list[Any]:
        return []  # metric names are fixed; no need to probe collect() at registration

    def collect(self) -> Iterator[Any]:
        s = self.sources
        if s.lock is not None:
            with s.lock:
                fams = list(self._collect(s))
        else:
            fams = list(self._collect(s))
        yield from fams

    def _collect(self, s: Sources) -> Iterator[Any]:
        info = InfoMetricFamily("mproxy_build", "mproxy version and mode")
        info.add_metric([], {"version": __version__, "mode": s.mode})
        yield info
        t = s.tracker
        if t is not None:
            st = t.stats
            c = CounterMetricFamily("mproxy_packets", "TCP packets seen by the tracker, by kind", labels=["kind"])
            c.add_metric(["mptcp"], st.mptcp_packets)
            c.add_metric(["plain"], st.plain_packets)
            yield c
            c = CounterMetricFamily("mproxy_mptcp_options", "MPTCP options decoded, by subtype",
                                    labels=["subtype"])
            for sub in Subtype:
                c.add_metric([sub.name], st.options[sub])
            yield c
            c = CounterMetricFamily("mproxy_decode_errors", "Malformed packets and options, by kind",
                                    labels=["kind"])
            errors = dict(st.decode_errors)
            if s.pipeline is not None:
                for k, v in s.pipeline.parse_errors.items():
                    errors[k] = errors.get(k, 0) + v
            if s.gateway is not None:
                for k, v in s.gateway.parse_errors.items():
                    errors[k] = errors.get(k, 0) + v
            for kind in ErrorKind:
                c.add_metric([kind.value], errors.get(kind.value, 0))
            yield c
            g = GaugeMetricFamily("mproxy_connections_active", "MPTCP connections tracked now")
            g.add_metric([], len(t.connections))
            yield g
            g = GaugeMetricFamily("mproxy_subflows_active", "TCP subflows tracked now")
            g.add_metric([], t.active_subflows)
            yield g
            c = CounterMetricFamily("mproxy_connections", "MPTCP connections that ended, by outcome",
                                    labels=["outcome"])
            for o in Outcome:
                c.add_metric([o.value], st.outcomes.get(o.value, 0))
            yield c
            c = CounterMetricFamily("mproxy_connections_opened", "MPTCP connections seen starting or picked up")
            c.add_metric([], st.connections)
            yield c
            c = CounterMetricFamily("mproxy_subflows_joined", "Subflows attached to a known connection")
            c.add_metric([], st.joins)
            yield c
            c = CounterMetricFamily("mproxy_subflows_refused", "Subflows not attached, by reason",
                                    labels=["reason"])
            for reason in ("join_hmac", "subflow_limit", "connection_limit", "per_connection_limit",
                           "orphan_data"):
                c.add_metric([reason], st.refused.get(reason, 0))
            yield c
            c = CounterMetricFamily("mproxy_rebuilt_bytes", "Bytes released in data-sequence order, by direction",
                                    labels=["direction"])
            c.add_metric(["client_to_server"], st.rebuilt_bytes[0])
            c.add_metric(["server_to_client"], st.rebuilt_bytes[1])
            yield c
            ooo, unmapped = t.buffered_bytes()
            g = GaugeMetricFamily("mproxy_buffered_bytes", "Bytes held now, by buffer", labels=["buffer"])
            g.add_metric(["out_of_order"], ooo)
            g.add_metric(["unmapped"], unmapped)
            yield g
            c = CounterMetricFamily("mproxy_gap_bytes", "Bytes skipped in rebuilt streams, by kind",
                                    labels=["kind"])
            c.add_metric(["side_channel"], st.gap_bytes.get("side_channel", 0))
            c.add_metric(["capture"], st.gap_bytes.get("capture", 0))
            yield c
            c = CounterMetricFamily("mproxy_notices", "Anomaly notices, by type", labels=["type"])
            for nt in NoticeType:
                c.add_metric([nt.value], st.notices.get(nt.value, 0))
            yield c
            c = CounterMetricFamily("mproxy_memcap_hits", "Times a memory or state limit bit, by limit",
                                    labels=["limit"])
            for lim in ("connections", "subflows", "out_of_order", "pending"):
                c.add_metric([lim], st.memcap.get(lim, 0))
            yield c
            c = CounterMetricFamily("mproxy_out_of_window_packets", "Subflow segments outside the receiver window")
            c.add_metric([], st.out_of_window)
            yield c
        p = s.pipeline
        if p is not None:
            c = CounterMetricFamily("mproxy_emitted_frames", "Frames written to the IDS sink, by kind",
                                    labels=["kind"])
            c.add_metric(["rebuilt"], p.emitted_frames - p.passthrough_frames)
            c.add_metric(["passthrough"], p.passthrough_frames)
            yield c
        gw = s.gateway
        if gw is not None:
            c = CounterMetricFamily("mproxy_verdicts", "NFQUEUE verdicts issued, by verdict", labels=["verdict"])
            for v in ("accept", "drop", "accept_modified"):
                c.add_metric([v], gw.verdicts.get(v, 0))
            yield c
            c = CounterMetricFamily("mproxy_actions", "Policy actions taken, by action", labels=["action"])
            for a in ("downgrade", "join_refused", "allow", "fastclose"):
                c.add_metric([a], gw.actions.get(a, 0))
            yield c
            c = CounterMetricFamily("mproxy_downgrades", "Connections downgraded to TCP (MP_CAPABLE removed)")
            c.add_metric([], gw.actions.get("downgrade", 0))
            yield c
            c = CounterMetricFamily("mproxy_fastcloses", "MPTCP connections killed with MP_FASTCLOSE")
            c.add_metric([], gw.actions.get("fastclose", 0))
            yield c
        q = s.queue
        if q is not None:
            c = CounterMetricFamily("mproxy_queue_events", "NFQUEUE trouble, by kind", labels=["kind"])
            c.add_metric(["fail_verdict"], q.fail_verdicts)
            c.add_metric(["truncated"], q.truncated)
            c.add_metric(["kernel_dropped"], q.kernel_dropped)
            c.add_metric(["user_dropped"], q.user_dropped)
            c.add_metric(["bypassed"], q.bypassed)
            yield c
        h = s.latency
        if h is not None:
            hist = HistogramMetricFamily("mproxy_verdict_latency_seconds",
                                         "Time from reading a queued packet to issuing its verdict")
            acc = 0
            buckets = []
            for bound, n in zip(h.bounds, h.counts):
                acc += n
                buckets.append((repr(bound), acc))
            buckets.append(("+Inf", h.n))
            hist.add_metric([], buckets, h.total)
            yield hist


def make_registry(sources: Sources, process: bool = True) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(MproxyCollector(sources))
    if process:
        from prometheus_client import PROCESS_COLLECTOR, PLATFORM_COLLECTOR

        for col in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR):
            try:
                reg.register(col)
            except ValueError:
                pass
    return reg


def snapshot(sources: Sources) -> bytes:
    """Prometheus text format of the current values (``replay --metrics FILE``)."""
    return generate_latest(make_registry(sources, process=False))
