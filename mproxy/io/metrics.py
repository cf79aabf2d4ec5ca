"""Prometheus metrics (prefix ``mproxy_``), read from the core's counters at scrape time.

The core keeps plain integer counters in its stats dataclasses; this
collector turns them into metric families only when Prometheus scrapes, so
the per-packet path pays nothing for metrics. Labels are low-cardinality
enums (verdict, subtype, kind, outcome, direction, reason) — never addresses,
ports or connection ids. Every label value a family can take is exported from
the first scrape on (as 0), so ``rate()`` and alert rules see a series before
the first event instead of an absent one.

The README's "Metrics" section lists every family; ``tests/io/test_metrics.py``
checks the two agree.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..core.defrag import DROP_REASONS
from ..core.events import NoticeType, Outcome
from ..core.gateway import GatewayStats
from ..core.pipeline import PipelineStats
from ..core.tracker import Tracker
from ..wire.errors import ErrorKind
from ..wire.mptcp import Subtype

# verdict latency buckets (seconds): the target is p99 < 1 ms
LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3)

# label values known in advance (exported as 0 until they happen)
VERDICTS = ("accept", "drop", "accept_modified")
ACTIONS = ("downgrade", "join_refused", "allow", "fastclose", "downgrade-host", "log", "memcap_drop",
           "ttl_raised", "window_clamped")
REFUSE_REASONS = ("join_hmac", "subflow_limit", "connection_limit", "per_connection_limit", "orphan_data")
MEMCAP_LIMITS = ("connections", "subflows", "out_of_order", "pending", "global", "history", "token_sharers",
                 "pickup_walk", "subflow_order")


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
    """What the live adapter knows about its NFQUEUE, copied in by the service at scrape time.

    Verdicts here are the ones really issued to the kernel, including those the
    fail mode gave when the core raised or the packet copy was truncated.
    """

    accepted: int = 0
    dropped: int = 0
    modified: int = 0  # accepted with a rewritten payload
    core_errors: int = 0  # verdict by fail mode: the core raised
    truncated: int = 0  # verdict by fail mode: the kernel copied less than the packet
    verdict_errors: int = 0  # issuing the verdict itself failed
    socket_overruns: int = 0  # the socket overflowed: the kernel could not hand packets over (passed or dropped by fail mode)
    undelivered: int = 0  # those packets, counted by the ids mproxy never read
    fail: str = "open"  # [queue] fail: what became of the packets below
    bypassed: dict[int, int] | None = None  # queue -> packets its rules matched that it never took (managed rules)
    kernel: bool = False  # the fields below were read from /proc/net/netfilter/nfnetlink_queue
    kernel_dropped: int = 0  # queue full, fail closed: dropped by the kernel
    user_dropped: int = 0  # netlink delivery failed, fail closed: dropped by the kernel
    waiting: int = 0  # handed to mproxy, no verdict yet
    max_len: int = 0  # queue capacity (config [queue] max_len)


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
    sinks: Callable[[], list[dict[str, Any]]] | None = None  # FrameSinks.stats
    sink_process: Callable[[], bool] | None = None  # the emitter process ([sink] worker) is running
    sink_restarts: Callable[[], int] | None = None  # emitter processes started after one was lost
    events: Any = None  # the EventLog (records, errors)
    extra: list[Callable[[], Iterable[Any]]] = field(default_factory=list)  # more families (other adapters)


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _total(name: str, doc: str, value: float) -> CounterMetricFamily:
    """A counter family of one sample, with no labels."""
    c = _counter(name, doc)
    c.add_metric([], value)
    return c


def _by_label(name: str, doc: str, label: str, values: Iterable[str], counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter family with every known value, plus any value the core counted that we did not foresee."""
    c = _counter(name, doc, [label])
    seen = []
    for v in values:
        seen.append(v)
        c.add_metric([v], counts.get(v, 0))
    for v in sorted(set(counts) - set(seen)):
        c.add_metric([v], counts[v])
    return c


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
        info = InfoMetricFamily("mproxy_build", "mproxy version, run mode (gateway or replay) and Python version")
        info.add_metric([], {"version": __version__, "mode": s.mode, "python": platform.python_version()})
        yield info
        if s.tracker is not None:
            yield from self._tracker(s)
        p = s.pipeline
        if p is not None:
            c = _counter("mproxy_emitted_frames", "Frames written to the IDS sink, by kind", ["kind"])
            c.add_metric(["rebuilt"], p.emitted_frames - p.passthrough_frames)
            c.add_metric(["passthrough"], p.passthrough_frames)
            yield c
            d = p.defrag
            yield _total("mproxy_ip_fragments", "IP fragments read (captures; the live gateway gets datagrams whole "
                         "from conntrack)", d.fragments)
            yield _total("mproxy_ip_reassembled", "IP datagrams put back together from fragments", d.reassembled)
            yield _by_label("mproxy_ip_fragments_dropped", "Fragmented IP datagrams (or single fragments) dropped, by "
                            "reason (overlap: dropped whole, as Linux does)", "reason", DROP_REASONS, d.dropped)
        gw = s.gateway
        if gw is not None:
            verdicts: Mapping[str, int] = gw.verdicts
            if s.queue is not None:  # what was really issued, fail-mode verdicts included
                q = s.queue
                verdicts = {"accept": q.accepted, "drop": q.dropped, "accept_modified": q.modified}
            yield _by_label("mproxy_verdicts", "Packet verdicts issued, by verdict", "verdict", VERDICTS, verdicts)
            yield _by_label("mproxy_actions", "Policy actions taken, by action", "action", ACTIONS, gw.actions)
            yield _total("mproxy_downgrades", "MPTCP connections downgraded to TCP (MP_CAPABLE removed from the SYN)",
                         gw.actions.get("downgrade", 0))
            yield _total("mproxy_fastcloses", "MPTCP connections killed with MP_FASTCLOSE",
                         gw.actions.get("fastclose", 0))
        if s.queue is not None:
            yield from self._queue(s.queue)
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
        if s.sinks is not None:
            yield from self._sinks(s.sinks())
        if s.sink_process is not None:
            g = GaugeMetricFamily("mproxy_sink_process_up", "1 while the emitter process ([sink] worker) writes the "
                                  "IDS sinks; 0 from its death until another one is started (after 1 s, doubling "
                                  "to 30 s while they keep dying): the IDS gets nothing from this worker meanwhile")
            g.add_metric([], 1 if s.sink_process() else 0)
            yield g
        if s.sink_restarts is not None:
            yield _total("mproxy_sink_process_restarts", "Emitter processes started after one was lost; the "
                         "connections in progress then lost part of their emitted stream", s.sink_restarts())
        if s.events is not None:
            yield _total("mproxy_event_log_records", "Records written to the JSON-lines event log", s.events.records)
            yield _total("mproxy_event_log_errors", "Failed writes to the event log (records lost)", s.events.errors)
        for more in s.extra:
            yield from more()

    @staticmethod
    def _tracker(s: Sources) -> Iterator[Any]:
        t = s.tracker
        assert t is not None
        st = t.stats
        c = _counter("mproxy_packets", "TCP packets seen by the tracker, by kind (refused: of a subflow that "
                     "failed verification, ignored)", ["kind"])
        c.add_metric(["mptcp"], st.mptcp_packets)
        c.add_metric(["plain"], st.plain_packets)
        c.add_metric(["refused"], max(0, st.packets - st.mptcp_packets - st.plain_packets))
        yield c
        c = _counter("mproxy_mptcp_options", "MPTCP options decoded, by subtype", ["subtype"])
        for sub in Subtype:
            c.add_metric([sub.name], st.options[sub])
        yield c
        errors = dict(st.decode_errors)
        for extra in (s.pipeline.parse_errors if s.pipeline else {}, s.gateway.parse_errors if s.gateway else {}):
            for k, v in extra.items():
                errors[k] = errors.get(k, 0) + v
        yield _by_label("mproxy_decode_errors", "Malformed packets and options, by kind", "kind",
                        (k.value for k in ErrorKind), errors)
        g = GaugeMetricFamily("mproxy_connections_active", "MPTCP connections tracked now")
        g.add_metric([], len(t.connections))
        yield g
        g = GaugeMetricFamily("mproxy_subflows_active", "MPTCP subflows open now")
        g.add_metric([], t.active_subflows)
        yield g
        yield _total("mproxy_connections_opened", "MPTCP connections seen starting or picked up mid-stream",
                     st.connections)
        yield _by_label("mproxy_connections_closed", "MPTCP connections that ended, by outcome", "outcome",
                        (o.value for o in Outcome), st.outcomes)
        yield _total("mproxy_subflows_joined", "Subflows attached to a known connection (MP_JOIN or pickup)", st.joins)
        yield _by_label("mproxy_subflows_refused", "Subflows not attached, by reason", "reason", REFUSE_REASONS,
                        st.refused)
        c = _counter("mproxy_rebuilt_bytes", "Bytes released in data-sequence order, by direction", ["direction"])
        c.add_metric(["client_to_server"], st.rebuilt_bytes[0])
        c.add_metric(["server_to_client"], st.rebuilt_bytes[1])
        yield c
        ooo, unmapped, checksummed, past_edge = t.buffered_bytes()
        g = GaugeMetricFamily("mproxy_buffered_bytes", "Bytes held now, by buffer", labels=["buffer"])
        g.add_metric(["out_of_order"], ooo)
        g.add_metric(["unmapped"], unmapped)
        g.add_metric(["checksummed"], checksummed)
        g.add_metric(["past_edge"], past_edge)
        g.add_metric(["history"], t.history_budget.used)
        yield g
        g = GaugeMetricFamily("mproxy_buffer_limit_bytes", "Caps on buffered bytes ([tracker] memcap: out_of_order + "
                              "unmapped + checksummed + past_edge; history_memcap: history)", labels=["limit"])
        g.add_metric(["memcap"], t.budget.limit)
        g.add_metric(["history_memcap"], t.history_budget.limit)
        yield g
        yield _total("mproxy_shed_bytes", "Bytes a buffer limit kept out (inline with on_memcap = drop, their "
                     "packets were dropped for the sender to resend)", t.shed_bytes)
        c = _counter("mproxy_gap_bytes", "Bytes skipped in rebuilt streams, by kind (side_channel: never crossed "
                     "the gateway, the peer acknowledged them; capture: never seen, not acknowledged or "
                     "acknowledged on a subflow the gateway sees; memcap: seen, but a buffer limit kept them out)",
                     ["kind"])
        c.add_metric(["side_channel"], st.gap_bytes.get("side_channel", 0))
        c.add_metric(["capture"], st.gap_bytes.get("capture", 0))
        c.add_metric(["memcap"], st.gap_bytes.get("memcap", 0))
        yield c
        yield _by_label("mproxy_notices", "Anomaly notices, by type", "type", (n.value for n in NoticeType),
                        st.notices)
        yield _by_label("mproxy_memcap_hits", "Times a memory or state limit bit, by limit", "limit", MEMCAP_LIMITS,
                        st.memcap)
        yield _total("mproxy_out_of_window_packets", "Subflow segments outside the receiver's TCP window, with a "
                     "timestamp older than its last (PAWS), or with an ACK field it refuses, and kept data past "
                     "the connection-level window the receiver did not take: ignored",
                     st.out_of_window)
        yield _total("mproxy_past_edge_taken", "Subflow segments that started past the right edge the gateway last "
                     "saw their receiver advertise, kept, and read when the receiver acknowledged them",
                     st.past_edge_taken)
        yield _total("mproxy_past_window_taken", "Out-of-order data whose end lay past the connection-level window "
                     "the gateway saw its receiver advertise, kept, and read when the receiver DATA_ACKed it",
                     st.past_window_taken)
        yield _total("mproxy_subflow_order_kept", "Subflow data segments that came after a hole in their subflow, "
                     "kept until it filled (the receiver's TCP reads them only then): a lossy path, or segments "
                     "sent ahead on purpose", st.subflow_order_kept)
        yield _total("mproxy_past_window_placed", "Out-of-order data past the connection-level window placed at "
                     "once: over the limits for kept data (256 pieces a connection, the out-of-order limit)",
                     st.past_window_placed)
        yield _total("mproxy_wrong_interface_packets", "Packets of a tracked subflow that came in on another "
                     "interface than their direction's first packet, refused (inline: dropped) as copies spoofed "
                     "from the wrong side of the gateway ([tracker] pin_interfaces)", st.wrong_interface)
        yield _total("mproxy_low_ttl_packets", "Packets of a tracked subflow whose TTL (hop limit) was below their "
                     "direction's first packet's: they may expire before the receiver (a TTL insertion); inline "
                     "their TTL is raised back ([policy] low_ttl = raise), offline their bytes are read only once "
                     "the receiver acknowledges them", st.low_ttl)
        yield _total("mproxy_add_addr_repeats", "Identical ADD_ADDR announcements seen again (retransmissions: "
                     "normal, not a notice)", st.add_addr_repeats)
        yield _by_label("mproxy_bad_checksums", "Segments of tracked subflows whose TCP or IPv4 header checksum "
                        "fails, by outcome: dropped (as the receiver drops them), taken ([tracker] checksums = "
                        "count), unfilled (a capture's offloaded checksum: not judged)",
                        "outcome", ("dropped", "taken", "unfilled"),
                        {**st.bad_checksums, "unfilled": st.unfilled_checksums})

    @staticmethod
    def _queue(q: QueueStats) -> Iterator[Any]:
        c = _counter("mproxy_fail_verdicts", "Verdicts given by the fail mode instead of the core, by reason",
                     ["reason"])
        c.add_metric(["core_error"], q.core_errors)
        c.add_metric(["truncated"], q.truncated)
        yield c
        yield _total("mproxy_verdict_errors", "Verdicts that could not be issued (the kernel keeps the packet)",
                     q.verdict_errors)
        yield _total("mproxy_queue_socket_overruns", "Times the netlink socket overflowed (runs of packet ids never "
                     "read): the kernel passed (fail open) or dropped (fail closed) packets mproxy never saw",
                     q.socket_overruns)
        yield _total("mproxy_queue_undelivered_packets", "Packets the queue took but could not hand to mproxy "
                     "(netlink socket full): accepted uninspected (fail open) or dropped (fail closed)", q.undelivered)
        if q.bypassed is not None:
            yield bypass_family(q.bypassed, q.fail)
        g = GaugeMetricFamily("mproxy_queue_capacity_packets",
                              "Packets the kernel may hold for mproxy ([queue] max_len)")
        g.add_metric([], q.max_len)
        yield g
        if q.kernel:
            c = _counter("mproxy_queue_dropped_packets", "Packets the kernel dropped instead of queueing them "
                         "(fail closed), by reason", ["reason"])
            c.add_metric(["queue_full"], q.kernel_dropped)
            c.add_metric(["netlink_failure"], q.user_dropped)
            yield c
            g = GaugeMetricFamily("mproxy_queue_waiting_packets", "Packets handed to mproxy without a verdict yet")
            g.add_metric([], q.waiting)
            yield g

    @staticmethod
    def _sinks(stats: list[dict[str, Any]]) -> Iterator[Any]:
        frames = _counter("mproxy_sink_frames", "Frames of the emitted stream written, by sink", ["sink"])
        dropped = _counter("mproxy_sink_dropped_frames", "Frames a sink could not write, by sink and reason",
                           ["sink", "reason"])
        for st in stats:
            if "interface" in st:
                frames.add_metric(["interface"], st.get("frames", 0))
                dropped.add_metric(["interface", "busy"], st.get("dropped", 0))
                dropped.add_metric(["interface", "too_big"], st.get("too_big", 0))
                dropped.add_metric(["interface", "error"], st.get("errors", 0))
            elif "pcap" in st:
                frames.add_metric(["pcap"], st.get("frames", 0))
                dropped.add_metric(["pcap", "error"], st.get("errors", 0))
        yield frames
        yield dropped


def make_registry(sources: Sources, process: bool = True) -> CollectorRegistry:
    """A registry with the mproxy collector and, for a running process, CPU/memory/fd metrics.

    The process metrics carry the ``mproxy_`` prefix too (``mproxy_process_*``): the metric
    prefix is a contract, and a shared Prometheus keeps them apart from other exporters'.
    """
    reg = CollectorRegistry()
    reg.register(MproxyCollector(sources))
    if process:
        from prometheus_client import ProcessCollector

        ProcessCollector(namespace="mproxy", registry=reg)
    return reg


def snapshot(sources: Sources) -> bytes:
    """Prometheus text format of the current values (``replay --metrics FILE``)."""
    return generate_latest(make_registry(sources, process=False))


def bypass_family(counts: Mapping[int, int], fail: str) -> CounterMetricFamily:
    """``mproxy_queue_bypassed_packets_total{queue,verdict}`` (see :mod:`mproxy.io.bypass`)."""
    c = _counter("mproxy_queue_bypassed_packets", "Packets mproxy's rules sent to a queue that never reached it "
                 "(queue full, or no mproxy bound): accepted uninspected under fail open, dropped under fail "
                 "closed (a full queue's drops are in mproxy_queue_dropped_packets_total)", ["queue", "verdict"])
    verdict = "accepted" if fail == "open" else "dropped"
    for q in sorted(counts):
        c.add_metric([str(q), verdict], counts[q])
    return c


def reload_family(counts: Mapping[str, int]) -> CounterMetricFamily:
    """``mproxy_reloads_total{result}``: SIGHUP reloads of the configuration and rules of ``run``."""
    return _by_label("mproxy_reloads", "Reloads of the configuration and inspector rules (SIGHUP), by result "
                     "(error: refused, what was in force stayed)", "result", ("ok", "error"), counts)


def reaction_families(inspector: Any = None, responder: Any = None, injector: Any = None,
                      alerts: Any = None) -> Iterator[Any]:
    """Inspector, reaction, injection and alert-feed counters (``Sources.extra`` of the gateway).

    Arguments are the stats objects of mproxy/core/inspector.py, core/reactions.py,
    io/inject.py and core/alerts.py; a part that is off passes None and reads as zeros.
    """
    ins, rsp, inj, alr = inspector, responder, injector, alerts
    b = ins.bytes if ins else (0, 0)
    yield _by_label("mproxy_inspected_bytes", "Rebuilt bytes passed through the embedded inspector", "direction",
                    ("client_to_server", "server_to_client"), {"client_to_server": b[0], "server_to_client": b[1]})
    yield _total("mproxy_signature_matches", "Embedded inspector signature matches", ins.matches if ins else 0)
    g = GaugeMetricFamily("mproxy_inspector_rules", "Embedded inspector rules: in force, and left out of the file "
                          "because they do not parse ([inspector] skip_bad_rules)", labels=["state"])
    g.add_metric(["loaded"], ins.rules if ins else 0)
    g.add_metric(["skipped"], ins.skipped_rules if ins else 0)
    yield g
    yield _total("mproxy_inspector_shed_matches", "Content matches the embedded inspector forgot over the 256 it "
                 "keeps per content and connection direction: a rule needing an older one can then miss",
                 ins.shed if ins else 0)
    yield _total("mproxy_inspector_pcre_limits", "Rule pcre searches not decided within [inspector] pcre_budget_ms "
                 "(stopped, or not started once the chunk's budget was spent): the rule did not match there, "
                 "though it might have; [actions] on_pcre_limit says what was done", ins.pcre_limits if ins else 0)
    yield _total("mproxy_inspector_pcre_given_up", "Rules no longer searched on a connection direction: their "
                 "pcre ran out of time with the budget to itself [inspector] pcre_strikes times there",
                 ins.pcre_given_up if ins else 0)
    yield _total("mproxy_inspector_pcre_starved", "Rule pcre searches not run, or cut short, because the pcre "
                 "searches of all connections had taken their [inspector] pcre_share of the time (each is also a "
                 "pcre limit): backtracking fed on many connections at once", ins.pcre_starved if ins else 0)
    yield _by_label("mproxy_killed_packets", "Packets of fast-closed connections, by what was done", "action",
                    ("dropped", "answered"),
                    {"dropped": rsp.late_dropped, "answered": rsp.answered} if rsp else {})
    yield _by_label("mproxy_injected_packets", "MP_FASTCLOSE/RST packets injected, by result", "result",
                    ("sent", "error"), {"sent": inj.sent, "error": inj.errors} if inj else {})
    yield _by_label("mproxy_ids_alerts", "External IDS alert lines, by result", "result",
                    ("acted", "unmatched", "ignored", "malformed"),
                    {"acted": alr.acted, "unmatched": alr.unmatched, "ignored": alr.ignored,
                     "malformed": sum(alr.malformed.values())} if alr else {})
