"""``mproxy run``: config -> rules -> queue -> gateway -> sinks and event log.

Thin wiring around :class:`~mproxy.core.gateway.Gateway` (the same core the
``replay`` command runs). Start order makes sure a rule never points at a
queue nobody reads: bind the queue (and set its fail mode), then install the
rules. Stop order is the reverse, and drains what was already queued before
unbinding, so a clean stop loses no packet: the jumps into the chain out (new
packets pass as plain traffic), verdicts for what is still queued, then the
chain deleted (deleting an NFQUEUE rule drops what its queue still holds),
unbind, flush the gateway (open connections are reported), close the sinks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import compiled
from .config import Config, ConfigError, load_config
from .core.gateway import Gateway
from .core.inspector import Inspector
from .core.rules import RuleSet
from .core.streamhash import AwaitingDigests
from .io import netfilter
from .io.metrics import LatencyHistogram, Sources, make_registry
from .io.metrics import QueueStats as MetricQueueStats
from .io.bypass import Bypass
from .io.nfqueue import (COPY_RANGE, FailMode, QueueAdapter, QueueError, StallWatch, kernel_queue_state,
                         kernel_queue_table, oversize_interfaces)
from .io.emitworker import RemoteSinks
from .io.sinks import EventLog, FrameSinks, SinkError, open_sinks
from .io.alerts import AlertFollower
from .io.inject import InjectError, Injector
from .reacting import AlertFeed, build_inspector, build_reactions, load_ruleset, needs_injection

__all__ = ["Service", "run", "load"]

log = logging.getLogger("mproxy")
EXPIRE_INTERVAL = 1.0
HELD_RECORDS_MAX = 1024  # records waiting for their digests beyond this are settled before the tick
HELD_RECORDS_WAIT = 0.2  # ... and so are records held this long (s)
BYPASS_INTERVAL = 10.0  # rule hits are read at every scrape, and at least this often (s) for the log
REFRESH_WAIT = 2.0  # a scrape waits at most this long (s) for the rule hits; a slower reading lands later
BYPASSED = "bypassed the queue (it was full, or no mproxy was bound to it)"
UNDELIVERED = "were queued but could not be handed to mproxy (netlink socket full)"
WARN_INTERVAL = 60.0  # packets that went past mproxy: warned about at once, then at most this often (s)


def load(path: str, rules: bool = True) -> Config:
    """Load and validate a config for the live gateway; raises ConfigError naming the key. ``rules``:
    the inspector's rules file too (not when build_inspector parses it next anyway)."""
    return load_with_rules(path, rules)[0]


def load_with_rules(path: str, rules: bool = True) -> tuple[Config, RuleSet | None]:
    """:func:`load`, and the rules it parsed (None: inspector off, or ``rules`` false), so the
    Service that follows builds its inspector from them instead of parsing the file again."""
    cfg = load_config(path)
    netfilter.validate(cfg)
    return cfg, load_ruleset(cfg) if rules else None  # a bad rules file is a config error naming its line


# configuration sections that only a restart puts in force (a reload names them when they changed)
_RESTART_SECTIONS = ("queue", "rules", "tracker", "sink", "log", "metrics")


@dataclass(slots=True)
class _Reloaded:
    """What a reload read (in a thread): the configuration and its inspector, or why not."""

    cfg: Config | None
    inspector: Inspector | None
    error: str = ""


@dataclass(slots=True)
class Service:
    cfg: Config
    source: str = ""
    ruleset: RuleSet | None = None  # the inspector's rules, when the caller parsed them already
    gateway: Gateway = field(init=False)
    sinks: FrameSinks = field(init=False, default_factory=FrameSinks)
    events: EventLog | None = field(init=False, default=None)
    queue: QueueAdapter | None = field(init=False, default=None)
    rules: netfilter.Rules | None = field(init=False, default=None)
    bypass: BypassWatch | None = field(init=False, default=None)  # packets the rules sent that the queue never took
    started: float = field(init=False, default=0.0)
    _stop: asyncio.Event | None = field(init=False, default=None)
    _stall: StallWatch = field(init=False, default_factory=StallWatch)
    _final_kernel_state: dict[str, int] | None = field(init=False, default=None)
    _tick_errors: int = field(init=False, default=0)
    # mptcp_connection records waiting for the emitter process's stream digests (it hashes, not us)
    _awaiting: AwaitingDigests | None = field(init=False, default=None)
    metric_queue: MetricQueueStats = field(init=False, default_factory=MetricQueueStats)
    histogram: LatencyHistogram = field(init=False, default_factory=LatencyHistogram)
    injector: Injector | None = field(init=False, default=None)  # MP_FASTCLOSE/RST out
    alert_feed: AlertFeed | None = field(init=False, default=None)  # IDS alerts in
    follower: AlertFollower | None = field(init=False, default=None)
    _follow: asyncio.Task[None] | None = field(init=False, default=None)  # the follower's polling
    # a worker of a multi-worker gateway (mproxy/workers.py): its number and the channel to the control
    # process, which receives the tokens this worker's tracker learns and asks for its metrics
    worker: int | None = None
    channel: socket.socket | None = None
    workers_total: int = 1
    announce_lost: int = field(init=False, default=0)
    _reloading: bool = field(init=False, default=False)  # configuration and rules being read in a thread
    reloads: Counter[str] = field(init=False, default_factory=Counter)  # ok / error
    _reload_again: bool = field(init=False, default=False)
    _registry: Any = field(init=False, default=None)
    _undelivered_warning: LossWarning = field(init=False, default_factory=lambda: LossWarning(UNDELIVERED))

    def __post_init__(self) -> None:
        c = self.cfg
        self.gateway = Gateway(c.policy, c.tracker, passthrough=c.sink.passthrough,
                               inspector=build_inspector(c, self.ruleset), reactions=build_reactions(c),
                               split_passthrough=c.queue.gso)
        if self.channel is not None:
            t = self.gateway.tracker
            t.token_log = []
            t.number_connections((self.worker or 0) + 1, max(1, self.workers_total))

    def _handler(self) -> Any:
        """What the queue calls per packet: the gateway, plus injection and token announcements if needed."""
        gw, inj, ch = self.gateway, self.injector, self.channel
        if inj is None and ch is None:
            return gw.packet
        tokens = gw.tracker.token_log

        def handle(data: bytes, ts: float, csum_ready: bool = False, iface: int = 0) -> Any:
            d = gw.packet(data, ts, csum_ready, iface)
            if d.inject and inj is not None:  # kill packets go out before the verdict is issued
                inj.send(d.inject)
            if tokens:  # announced before this packet's verdict: ahead of any join it makes possible
                self._announce(tokens)
            return d

        return handle

    def _announce(self, tokens: list[tuple[int, bool]]) -> None:
        msg = b"T" + b"".join(_TOKEN.pack(t, a) for t, a in tokens)
        n = len(tokens)
        tokens.clear()
        try:
            assert self.channel is not None
            self.channel.send(msg)
        except OSError:  # the control process is gone or not reading: its joins fall back to a hash
            self.announce_lost += n
            if self.announce_lost == n:
                log.error("announcing tokens to the control process failed (further losses only counted)")

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        """Open sinks, bind the queue, install rules; raises SinkError/QueueError/RulesError."""
        c = self.cfg
        self.started = time.time()
        self._open_outputs()
        for name, size in oversize_interfaces(c.rules.in_interfaces or None):
            log.warning("interface %s may pass packets of %d bytes (BIG TCP or MTU): a queued packet holds at "
                        "most %d; set gso_max_size/gro_max_size to 65536 on interfaces carrying MPTCP",
                        name, size, COPY_RANGE)
        if needs_injection(c):
            self.injector = Injector(ipv6=c.rules.ipv6)
            self.injector.open()
        ins = self.gateway.responder.inspector
        log.info("inspector: %s; reactions: on_match %s, on_alert %s, on_side_channel %s, on_pcre_limit %s; "
                 "alerts: %s; %s",
                 f"{len(ins.rules)} rules from {c.inspector.rules}"
                 + (f" ({ins.stats.skipped_rules} skipped)" if ins.stats.skipped_rules else "")
                 if ins is not None else "off",
                 "+".join(c.actions.on_match), "+".join(c.actions.on_alert), "+".join(c.actions.on_side_channel),
                 "+".join(c.actions.on_pcre_limit),
                 ", ".join(c.alerts.files) or "none", compiled.describe())
        if ins is not None and compiled.content_scanner() is None and not compiled.switched_off():
            log.warning("the inspector's compiled content scan (mproxy/_hsscan.c) is not built: every content "
                        "match reaches Python, 3-6x slower on streams dense with rule contents; install "
                        "libhyperscan-dev and pkg-config, then reinstall mproxy")
        self.queue = QueueAdapter(
            c.queue.num, self._handler(), emit=self.sinks.write if self.sinks else None,
            after_batch=self._after_batch, fail=FailMode(c.queue.fail), max_len=c.queue.max_len,
            sock_rcvbuf=c.queue.sock_rcvbuf, histogram=self.histogram, gso=c.queue.gso,
            clear_mask=c.rules.worker_mask if self.worker is not None else 0)
        self.queue.open()
        if self.queue.fail_open_confirmed is None:
            log.warning("could not confirm the queue's fail-%s setting (a packet arrived first)", c.queue.fail)
        self.bypass = BypassWatch.start(c, [c.queue.num])
        self.rules = install_rules(c, self.queue)
        if self.bypass is not None:
            self.bypass.rules = self.rules

    def _open_outputs(self) -> None:
        """The sinks (in the emitter process when ``[sink] worker``), then the event log."""
        c = self.cfg
        logged = bool(c.log.events)  # without an event log nobody reads the streams' digests: none are made
        if c.sink.worker and (c.sink.interface or c.sink.pcap):
            remote = RemoteSinks(self.gateway.pipeline, c.sink.interface, c.sink.pcap, c.sink.pcap_rotate_mb,
                                 c.sink.pcap_keep, hash_streams=logged)
            remote.start()
            self.sinks = remote  # type: ignore[assignment]
            # the emitter process hashes the rebuilt streams (~1 ns a byte off the verdict path); their
            # records wait for its digests
            self.gateway.pipeline.tracker.stream_hash = False
            self._awaiting = AwaitingDigests() if logged else None
        else:
            self.sinks = open_sinks(c.sink.interface, c.sink.pcap, c.sink.pcap_rotate_mb, c.sink.pcap_keep)
            self.gateway.pipeline.tracker.stream_hash = logged
        self.events = EventLog(c.log.events, drop_keys=not c.log.log_keys,
                               tag={"worker": self.worker} if self.worker is not None else {})

    def stop(self) -> None:
        """Reverse of start; safe to call on a partly started service."""
        detach_and_drain(self.rules, self.queue)
        if self.queue is not None:
            self._final_kernel_state = kernel_queue_state(self.cfg.queue.num)
        if self.bypass is not None:
            self.bypass.final()  # the rules' hits go with them
        if self.queue is not None:
            self._undelivered_warning.update(self.queue.stats.undelivered, self.cfg.queue.fail, final=True)
        remove_and_unbind(self.rules, self.queue)
        self.rules = None
        now = time.time()
        try:
            self.sinks.write(self.gateway.flush(now))
        except Exception:  # noqa: BLE001 - still close everything
            log.exception("flushing the gateway failed")
        if self.events is not None:
            self._write_records(self.gateway.drain_records())
            self._settle_digests()
            self.events.write([self.stats_record(now)])
            self.events.close()
        self.sinks.close()
        if self.follower is not None:
            self.follower.close()
        if self.injector is not None:
            self.injector.close()

    # ------------------------------------------------------------------ loop
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        assert self.queue is not None
        c = self.cfg
        metrics = await self._serve_metrics() if c.metrics.listen else None
        self.queue.attach(loop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reopen)
        loop.add_signal_handler(signal.SIGUSR1, self._dump_stats)
        if self.channel is not None:
            loop.add_reader(self.channel.fileno(), self._on_channel)
            self.channel.send(b"R")  # ready: the queue is bound
        ticker = loop.create_task(self._tick())
        if c.alerts.files:
            self._start_follower(c)
        # a worker says "up", not "ready:": that word is the whole gateway's (the control process's)
        log.info("%s: NFQUEUE %d (fail %s%s), rules %s, policy %s, sinks %s, metrics %s",
                 "ready" if self.worker is None else f"worker {self.worker} up", c.queue.num,
                 c.queue.fail, "" if self.queue.fail_open_confirmed else ", unconfirmed",
                 f"in {c.rules.table} {c.rules.hook} -> {c.rules.chain}" if c.rules.manage else "not managed",
                 c.policy.default.value, ", ".join(_sink_names(c)) or "none",
                 f"http://{c.metrics.listen}/metrics" if c.metrics.listen else "off")
        try:
            await self._stop.wait()
        finally:
            ticker.cancel()
            if self._follow is not None:
                self._follow.cancel()
            if metrics is not None:
                metrics.close()
            if self.channel is not None:
                loop.remove_reader(self.channel.fileno())
            self.queue.detach(loop)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        log.info("stopping")

    def _start_follower(self, c: Config) -> None:
        """Follow the IDS alert files of ``c`` (at start, or when a reload names the first ones)."""
        self.alert_feed = AlertFeed(self.gateway, self.injector, self.sinks.write, self._after_batch)
        self.follower = self.alert_feed.follower(c)
        self.follower.poll_once()  # the files' places are taken now: an alert written next is read
        self._follow = asyncio.get_running_loop().create_task(self.follower.run())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL)
            try:
                now = time.time()
                frames = self.gateway.expire(now)
                if frames:
                    self.sinks.write(frames)
                self._after_batch()
                self.sinks.flush()
                if isinstance(self.sinks, RemoteSinks):
                    self.sinks.revive()  # a lost emitter process is replaced (after its back-off)
                self._settle_digests()
                self._watch_kernel_queue()
                if self.bypass is not None and self.bypass.due():
                    await self.bypass.refresh()
            except Exception:  # noqa: BLE001 - the ticker must survive
                self._tick_errors += 1
                if self._tick_errors == 1:
                    log.exception("periodic expiry failed (further failures only counted)")

    def exposition(self) -> bytes:
        """The Prometheus text of this process's metrics (what ``/metrics`` serves)."""
        from prometheus_client import generate_latest

        if self._registry is None:
            gw = self.gateway
            self._registry = make_registry(Sources(
                tracker=gw.tracker, pipeline=gw.pipeline.stats, gateway=gw.stats, queue=self.metric_queue,
                latency=self.histogram, mode="gateway", sinks=lambda: self.sinks.stats(),
                sink_process=self._sink_process_up if isinstance(self.sinks, RemoteSinks) else None,
                sink_restarts=self._sink_restarts if isinstance(self.sinks, RemoteSinks) else None,
                events=self.events,
                extra=[self._reaction_metrics]))
        self._update_queue_metrics()
        return generate_latest(self._registry)

    async def _serve_metrics(self) -> asyncio.AbstractServer:
        """Prometheus text on ``/metrics``, served by the event loop itself.

        Single-threaded on purpose: the collector reads the core's counters at
        scrape time, between two packets, so no lock is taken on the packet path.
        """

        async def body() -> bytes:
            if self.bypass is not None:
                await self.bypass.refresh()
            return self.exposition()

        return await serve_metrics(self.cfg.metrics.listen, body)

    def _on_channel(self) -> None:
        """A request from the control process (``M``: metrics); end of file: it is gone, so stop."""
        assert self.channel is not None and self._stop is not None
        try:
            msg = self.channel.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg = b""
        if not msg:
            log.error("worker %s: the control process is gone; stopping", self.worker)
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            self._stop.set()
            return
        if msg[:1] == b"M":
            reply = b"M" + msg[1:9] + self.exposition()
            try:
                self.channel.send(reply)
            except OSError as e:
                log.warning("worker %s: metrics reply failed: %s", self.worker, e)

    def _reaction_metrics(self) -> Any:
        from .io.metrics import reaction_families, reload_family

        r = self.gateway.responder
        yield from reaction_families(r.inspector.stats if r.inspector is not None else None, r.stats,
                                     self.injector.stats if self.injector is not None else None,
                                     self.alert_feed.stats if self.alert_feed is not None else None)
        yield reload_family(self.reloads)

    def _update_queue_metrics(self) -> None:
        if self.queue is None:
            return
        q, m = self.queue.stats, self.metric_queue
        m.accepted, m.dropped, m.modified = q.accepted, q.dropped, q.modified
        m.core_errors, m.truncated, m.verdict_errors = q.core_errors, q.truncated, q.verdict_errors
        m.socket_overruns, m.max_len = q.overflows, self.cfg.queue.max_len
        m.undelivered, m.fail = q.undelivered, self.cfg.queue.fail
        m.bypassed = self.bypass.counts() if self.bypass is not None else None
        st = kernel_queue_state(self.cfg.queue.num)
        m.kernel = st is not None
        if st is not None:
            m.kernel_dropped, m.user_dropped, m.waiting = st["dropped"], st["user_dropped"], st["waiting"]

    def _after_batch(self) -> None:
        if self.gateway.records and self.events is not None:
            self._write_records(self.gateway.drain_records())
            self.events.flush()

    def _sink_process_up(self) -> bool:
        return isinstance(self.sinks, RemoteSinks) and self.sinks.running()

    def _sink_restarts(self) -> int:
        return self.sinks.restarts if isinstance(self.sinks, RemoteSinks) else 0

    def _write_records(self, recs: list[dict[str, Any]]) -> None:
        assert self.events is not None
        aw = self._awaiting
        if aw is not None:
            now = time.monotonic()
            recs = aw.hold(recs, now)
        if recs:
            self.events.write(recs)
        if aw is not None and aw.due(now, HELD_RECORDS_WAIT, HELD_RECORDS_MAX):
            # a round trip now rather than at the tick: a crash loses at most this much of the log
            self._settle_digests()

    def _settle_digests(self) -> None:
        """Write the records held for their digests once the emitter process has answered (a round
        trip: everything shipped before is hashed by then). If it died, they go out with ``sha256``
        null, and the tracker hashes the connections that open until another one runs."""
        aw, remote = self._awaiting, self.sinks
        if aw is None or not isinstance(remote, RemoteSinks):
            return
        if aw.held and remote.running():
            remote.stats()
        tracker = self.gateway.pipeline.tracker
        running = remote.running()
        if not running and not tracker.stream_hash:
            tracker.stream_hash = True
            log.warning("the emitter process is gone: connections open now are logged without sha256; "
                        "new ones are hashed here until another one runs")
        elif running and tracker.stream_hash:
            tracker.stream_hash = False  # it hashes the connections that open from now on
        ready = aw.settle(remote.take_digests())
        if ready and self.events is not None:
            self.events.write(ready)
            self.events.flush()

    def _watch_kernel_queue(self) -> None:
        """Warn when the kernel holds packets we are not reading (a stuck reader would be a bug)."""
        assert self.queue is not None
        self._undelivered_warning.update(self.queue.stats.undelivered, self.cfg.queue.fail,
                                         f" (raise [queue] sock_rcvbuf, now {self.cfg.queue.sock_rcvbuf}, "
                                         "or lower the load)")
        table = kernel_queue_table()
        if table is not None and self.bypass is not None:
            self.bypass.kernel(table)
        st = table.get(self.cfg.queue.num) if table is not None else None
        if st is None:
            return
        self._stall.check(self.queue, st["waiting"], asyncio.get_running_loop())

    def _reopen(self) -> None:
        """SIGHUP: the event log is opened again (logrotate), and the configuration and the
        inspector's rules are read again (see :meth:`reload`)."""
        if self.events is not None:
            self.events.reopen()
        log.info("event log reopened")
        self._start_reload()

    def _start_reload(self) -> None:
        """The files are read, parsed and compiled in a thread (5,000 rules: ~0.2 s) while packets go
        on through the configuration in force; the loop then applies the result between two packets."""
        if self._reloading:
            self._reload_again = True  # after the one under way: the files may have changed since it read them
            return
        self._reloading = True
        fut = asyncio.get_running_loop().run_in_executor(None, self._read_reload)
        fut.add_done_callback(self._loaded)

    def _loaded(self, fut: asyncio.Future[_Reloaded]) -> None:
        self._reloading = False
        try:
            self._apply_reload(fut.result())
        except Exception:  # noqa: BLE001 - a reload must never stop the gateway
            log.exception("reload failed")
        if self._reload_again:
            self._reload_again = False
            self._start_reload()

    def reload(self) -> dict[str, Any]:
        """Read the configuration file and the inspector's rules again and put what can change
        while running in force: ``[policy]`` (connections opened from now on), ``[actions]`` and the
        inspector (``[inspector]`` and its rules file) for every connection, live ones included —
        each goes on where its stream stands; a restart would leave them uninspected, as connections
        opened before ``run`` are not queued. Other sections need a restart (named in the record and
        the log). A file that does not load changes nothing. Returns the ``reload`` record (also
        written to the event log)."""
        return self._apply_reload(self._read_reload())

    def _read_reload(self) -> _Reloaded:
        """The configuration and rules read again, or why not (runs in a thread: no live state)."""
        cfg = self.cfg
        try:
            if self.source:
                cfg = load(self.source, rules=False)  # build_inspector below reads them (once)
                if self.worker is not None:
                    from .workers import worker_config

                    cfg = worker_config(cfg, self.worker)
            return _Reloaded(cfg, build_inspector(cfg))
        except ConfigError as e:
            return _Reloaded(None, None, str(e))
        except Exception as e:  # noqa: BLE001 - the pattern compiler (C) may refuse what the parser took
            return _Reloaded(None, None, f"{cfg.inspector.rules}: {e}")

    def _apply_reload(self, r: _Reloaded) -> dict[str, Any]:
        rsp = self.gateway.responder
        previous = len(rsp.inspector.rules) if rsp.inspector is not None else None
        rec: dict[str, Any] = {"event": "reload", "ts": round(time.time(), 6), "config": self.source or None,
                               "previous_rules": previous}
        cfg = r.cfg
        if cfg is None:
            self.reloads["error"] += 1
            rec.update(ok=False, rules=previous, error=r.error)
            log.error("reload refused, the configuration and rules in force stay: %s", r.error)
        else:
            restart = [name for name in _RESTART_SECTIONS if getattr(cfg, name) != getattr(self.cfg, name)]
            actions = cfg.actions
            if needs_injection(cfg) and self.injector is None:
                restart.append("actions")  # fastclose needs the raw socket opened at start
                actions = self.cfg.actions
            if cfg.alerts != self.cfg.alerts:
                self._retarget_alerts(cfg)
            self.cfg = dataclasses.replace(self.cfg, policy=cfg.policy, actions=actions, inspector=cfg.inspector,
                                           alerts=cfg.alerts)
            self.gateway.policy = cfg.policy
            rsp.reactions = build_reactions(self.cfg)
            rsp.replace_inspector(r.inspector)
            self.reloads["ok"] += 1
            rules = len(r.inspector.rules) if r.inspector is not None else None
            rec.update(ok=True, rules=rules, restart_needed=restart)
            if r.inspector is not None and r.inspector.ruleset.skipped:
                rec["skipped_rules"] = len(r.inspector.ruleset.skipped)
            log.info("reloaded: policy %s, %d policy rules, inspector %s", cfg.policy.default.value,
                     len(cfg.policy.rules), f"{rules} rules from {cfg.inspector.rules} in force"
                     if rules is not None else "off")
            if restart:
                log.warning("reload: [%s] changed: those take effect after a restart", "], [".join(restart))
        if self.events is not None:
            self.events.write([rec])
        return rec

    def _retarget_alerts(self, cfg: Config) -> None:
        """A reload changed ``[alerts]``: files still named keep their place, new ones are taken up."""
        a = cfg.alerts
        if self.follower is not None:
            self.follower.retarget(list(a.files), a.poll_interval, a.from_start)
        elif a.files and self._stop is not None:  # serving, and no file was followed until now
            self._start_follower(cfg)
        log.info("reload: following %s", ", ".join(a.files) if a.files else "no IDS alert file")

    def _dump_stats(self) -> None:
        import json

        log.info("stats %s", json.dumps(self.stats_record(time.time()), separators=(",", ":")))

    # ------------------------------------------------------------------ reporting
    def stats_record(self, now: float) -> dict[str, Any]:
        """The ``stats`` record written to the event log at stop (and logged on SIGUSR1)."""
        gw = self.gateway
        ts = gw.tracker.stats
        q = self.queue
        return {
            "event": "stats", "ts": round(now, 6), "uptime": round(now - self.started, 3),
            **({"worker": self.worker, "queue_num": self.cfg.queue.num, "announce_lost": self.announce_lost}
               if self.worker is not None else {}),
            "queue": q.stats.as_dict() if q else None,
            "kernel_queue": kernel_queue_state(self.cfg.queue.num) or self._final_kernel_state,
            "bypassed": self.bypass.record() if self.bypass is not None else None,
            "fail": self.cfg.queue.fail, "fail_flag_confirmed": q.fail_open_confirmed if q else None,
            "verdict_latency_us": q.latency.summary() if q else None,
            "wait_latency_us": q.wait_latency.summary() if q else None,
            "verdicts": dict(gw.stats.verdicts), "actions": dict(gw.stats.actions),
            "parse_errors": dict(gw.stats.parse_errors),
            "tracker": {"packets": ts.packets, "mptcp_packets": ts.mptcp_packets,
                        "plain_packets": ts.plain_packets, "connections": ts.connections,
                        "subflows": ts.subflows, "joins": ts.joins, "notices": dict(ts.notices),
                        "memcap": dict(ts.memcap), "outcomes": dict(ts.outcomes),
                        "wrong_interface": ts.wrong_interface, "low_ttl": ts.low_ttl},
            "reassembled_bytes": {"c2s": gw.pipeline.stats.bytes_out[0], "s2c": gw.pipeline.stats.bytes_out[1]},
            "sinks": self.sinks.stats(),
            "sink_process": self._sink_process_up() if isinstance(self.sinks, RemoteSinks) else None,
            "sink_restarts": self._sink_restarts() if isinstance(self.sinks, RemoteSinks) else None,
            "reactions": {"inspector": _inspector_stats(gw), "responder": {
                k: getattr(gw.responder.stats, k) for k in gw.responder.stats.__slots__},  # type: ignore[attr-defined]
                "alerts": self.alert_feed.stats.as_dict() if self.alert_feed else None,
                "follower": self.follower.stats() if self.follower else None,
                "inject": self.injector.stats.as_dict() if self.injector else None},
        }


def _inspector_stats(gw: Gateway) -> dict[str, Any] | None:
    ins = gw.responder.inspector
    if ins is None:
        return None
    st = ins.stats
    return {"rules": len(ins.rules), "bytes": {"c2s": st.bytes[0], "s2c": st.bytes[1]}, "chunks": st.chunks,
            "matches": st.matches, "pcre_runs": st.pcre_runs, "pcre_limits": st.pcre_limits,
            "pcre_given_up": st.pcre_given_up, "pcre_starved": st.pcre_starved, "flows": st.flows}


def install_rules(cfg: Config, queue: QueueAdapter) -> netfilter.Rules | None:
    """The managed rules, installed once ``queue`` is bound (a rule never points at an unread queue);
    on failure the queue is closed and RulesError raised."""
    if not cfg.rules.manage:
        return None
    rules = netfilter.Rules(cfg)
    try:
        rules.install()
    except netfilter.RulesError:
        queue.close()
        raise
    return rules


@dataclass(slots=True)
class LossWarning:
    """A warning about packets that went past mproxy (or were dropped) without a verdict from it:
    at once, then at most once a minute under a sustained overload, and at stop."""

    what: str  # what happened to them, e.g. "bypassed the queue (full, or no mproxy bound)"
    warned: int = 0  # packets already named
    at: float = field(default=-WARN_INTERVAL)

    def update(self, total: int, fail: str, detail: str = "", final: bool = False) -> None:
        now = time.monotonic()
        if total > self.warned and (final or now - self.at >= WARN_INTERVAL):
            log.warning("%d MPTCP packets %s since the last warning and were %s; %d in all%s", total - self.warned,
                        self.what, "accepted uninspected (fail open)" if fail == "open" else
                        "dropped (fail closed)", total, detail)
            self.warned, self.at = total, now


@dataclass(slots=True)
class BypassWatch:
    """The running count of :mod:`mproxy.io.bypass`: the queue table every tick (``kernel``), the rule
    hits at every scrape and every BYPASS_INTERVAL (``refresh``: iptables runs in a thread, the loop
    keeps giving verdicts) and at stop (``final``), a warning when the count grew."""

    bypass: Bypass
    fail: str  # [queue] fail: what became of them
    rules: netfilter.Rules | None = None  # set once installed
    saved: netfilter.SavedRuleHits | None = None  # the operator's rules ([rules] manage = false)
    read_at: float = 0.0  # monotonic time of the last rule-hit reading
    warning: LossWarning = field(default_factory=lambda: LossWarning(BYPASSED))
    _reading: asyncio.Future[Any] | None = None  # the reading in its thread, while it runs

    @classmethod
    def start(cls, cfg: Config, queues: list[int]) -> BypassWatch | None:
        """Once the queues are bound. Managed rules do not exist yet (their hits start at 0): the
        queue table is the baseline. The operator's rules (``[rules] manage = false``) have been
        counting: the table, then their hits from ``iptables-save -c``. None when the table or the
        rules cannot be read."""
        table = kernel_queue_table()
        if table is None:
            return None
        b = Bypass(queues)
        if cfg.rules.manage:
            b.baseline(table)
            return cls(b, cfg.queue.fail)
        saved = netfilter.SavedRuleHits(cfg)
        hits = saved.read()
        if hits is None:
            log.warning("cannot read the NFQUEUE rules' counters (iptables-save -c): packets that pass the "
                        "queue uninspected are not counted")
            return None
        if saved.spread & set(queues):
            log.warning("queue(s) %s are fed by --queue-balance rules: packets that pass them uninspected "
                        "are not counted", ", ".join(map(str, sorted(saved.spread & set(queues)))))
        if not set(hits) & set(queues):
            log.warning("no iptables NFQUEUE rule sends packets to queue(s) %s yet (rules made with nft itself "
                        "are not read): packets that pass them uninspected are counted only once there is one",
                        ", ".join(map(str, queues)))
        b.baseline(table, hits)
        return cls(b, cfg.queue.fail, saved=saved)

    def kernel(self, table: dict[int, dict[str, int]]) -> None:
        self.bypass.kernel(table)

    def due(self) -> bool:
        return time.monotonic() - self.read_at >= BYPASS_INTERVAL

    async def refresh(self, wait: float = REFRESH_WAIT) -> None:
        """Start a reading (unless one runs) and wait for it at most ``wait`` seconds: iptables waits
        for the xtables lock, which a firewall manager may hold for long, and a scrape must not. A
        reading that takes longer is applied when it ends."""
        if self._reading is None:
            self.read_at = time.monotonic()
            self._reading = asyncio.ensure_future(asyncio.to_thread(self._read))
            self._reading.add_done_callback(self._read_done)
        try:
            await asyncio.wait_for(asyncio.shield(self._reading), wait)
        except asyncio.TimeoutError:
            pass

    def _read_done(self, fut: asyncio.Future[Any]) -> None:
        self._reading = None
        if not fut.cancelled() and fut.exception() is None:
            self._apply(fut.result())

    def final(self) -> None:
        self._apply(self._read(), final=True)

    def counts(self) -> dict[int, int]:
        return self.bypass.counts()

    def record(self) -> dict[str, int]:
        return {str(q): n for q, n in self.bypass.counts().items()}

    def _read(self) -> tuple[dict[int, int], dict[int, dict[str, int]]] | None:
        """The rules' hits, then the queue table, in that order (see mproxy.io.bypass); blocking."""
        hits = (self.rules.queue_hits() if self.rules is not None
                else self.saved.read() if self.saved is not None else None)
        table = kernel_queue_table() if hits is not None else None
        return (hits, table) if hits is not None and table is not None else None

    def _apply(self, counters: tuple[dict[int, int], dict[int, dict[str, int]]] | None, final: bool = False) -> None:
        if counters is not None:
            self.bypass.update(*counters)
        counts = self.bypass.counts()
        self.warning.update(sum(counts.values()), self.fail, " (by queue: " + ", ".join(
            f"{q}: {n}" for q, n in sorted(counts.items()) if n) + ")", final)


def detach_and_drain(rules: netfilter.Rules | None, queue: QueueAdapter | None) -> None:
    """Stop, first half: the jumps out (nothing new is queued; the packets that no longer jump pass
    as plain traffic), then verdicts for everything queued. The chain stays until
    :func:`remove_and_unbind`: deleting its NFQUEUE rules drops what a queue still holds
    (nf_tables backend), and a packet lost at stop waits for a TCP retransmission timeout."""
    if rules is not None:
        for p in rules.detach():
            log.error("removing rules: %s", p)
    if queue is not None:
        queue.drain()


def remove_and_unbind(rules: netfilter.Rules | None, queue: QueueAdapter | None) -> None:
    """Stop, second half: the chain deleted (the queues are empty now), the queue unbound."""
    if rules is not None:
        for p in rules.remove():
            log.error("removing rules: %s", p)
    if queue is not None:
        queue.close()


class MetricsError(RuntimeError):
    """The metrics endpoint cannot listen (message names the key)."""


_TOKEN = struct.Struct("!I?")  # a token announcement: token, indexed (True) or forgotten (False)


async def serve_metrics(listen: str, body: Any) -> asyncio.AbstractServer:
    """A minimal HTTP/1.0 server for ``/metrics`` on ``listen`` ("host:port"); ``body`` makes the text."""
    from prometheus_client import CONTENT_TYPE_LATEST

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] in (b"/metrics", b"/"):
                text, status, ctype = await body(), b"200 OK", CONTENT_TYPE_LATEST.encode()
            else:
                text, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(text)).encode() + b"\r\nConnection: close\r\n\r\n" + text)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    host, _, port = listen.rpartition(":")
    try:
        return await asyncio.start_server(handle, host.strip("[]"), int(port))
    except OSError as e:
        raise MetricsError(f"[metrics] listen {listen}: {e.strerror or e}") from None


def _sink_names(c: Config) -> list[str]:
    out = []
    if c.sink.interface:
        out.append(f"interface {c.sink.interface}")
    if c.sink.pcap:
        out.append(f"pcap {c.sink.pcap}.N.pcap")
    if c.log.events:
        out.append(f"events {c.log.events}")
    return out


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format="mproxy[%(process)d] %(levelname)s: %(message)s")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(config_path: str) -> int:
    """Run until SIGINT/SIGTERM. Exit codes: 0 clean stop, 1 start failure, 2 bad config."""
    try:
        cfg, ruleset = load_with_rules(config_path)
    except ConfigError as e:
        print(f"mproxy: config error: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log.level)
    if cfg.queue.workers > 1:
        from .workers import run_controller

        return run_controller(cfg, config_path)
    return _run_service(Service(cfg, config_path, ruleset))


def _run_service(svc: Any, start_errors: tuple[type[Exception], ...] = ()) -> int:
    """Start, serve until a signal, stop (a Service or a workers Controller); 0 clean, 1 start failure."""

    def interrupted(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # until the event loop takes over, SIGTERM/SIGINT unwind through the cleanup below
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupted)
    for sig in (signal.SIGHUP, signal.SIGUSR1):  # their default action would kill us with the rules in place
        signal.signal(sig, signal.SIG_IGN)
    code = 0
    try:
        svc.start()
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(svc.serve())
    except (SinkError, QueueError, netfilter.RulesError, MetricsError, InjectError) + start_errors as e:
        log.error("cannot start: %s", e)
        code = 1
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        svc.stop()
    st = svc.queue.stats if svc.queue else None
    if st is not None and code == 0:
        log.info("stopped: %d packets (%d accepted, %d dropped, %d modified), %d core errors, %d truncated",
                 st.packets, st.accepted, st.dropped, st.modified, st.core_errors, st.truncated)
    return code
