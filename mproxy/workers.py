"""``mproxy run`` with ``[queue] workers`` > 1: a control process and one worker process per queue.

Why processes: the core is pure Python, one packet at a time per interpreter;
a second core needs a second interpreter. Why a control queue: every subflow
of an MPTCP connection must reach the worker holding the connection's state,
and only the MPTCP layer knows which connection a join belongs to (see
:mod:`mproxy.core.steering` and the rules in :mod:`mproxy.io.netfilter`).

* The control process binds queue ``num`` (first SYN of each MPTCP
  connection only), runs :class:`~mproxy.core.steering.Steering`, installs
  and removes the rules, serves ``/metrics`` (its own families plus every
  worker's, labelled ``worker``) and restarts a worker that died.
* Worker ``w`` is ``mproxy worker --index w``: the single-queue
  :class:`~mproxy.service.Service` on queue ``num+1+w``, with its own
  gateway, sinks and injector. Its pcap sink files are ``<pcap>.w<w>.N.pcap``;
  the event log is shared (whole records per ``O_APPEND`` write).
* Each worker talks to the control process over an ``AF_UNIX``
  ``SOCK_SEQPACKET`` pair (one message per record): ``R`` ready; ``T`` token
  announcements (5 bytes each: token, indexed/forgotten), sent before the
  verdict of the packet that taught them; ``M`` + request id + Prometheus text
  answering the control's ``M`` + request id.

Workers run in their own session: a terminal's Ctrl-C reaches only the
control process, which stops in order (rules out, control queue drained,
then SIGTERM to the workers, which drain their own queues). A worker whose
control process vanished stops by itself (end of file on its channel).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .core.steering import Steering
from .io import netfilter
from .io.backoff import RestartBackoff
from .io.metrics import bypass_family
from .io.nfqueue import FailMode, QueueAdapter, StallWatch, kernel_queue_state, kernel_queue_table
from .service import (_TOKEN, UNDELIVERED, BypassWatch, LossWarning, Service, _run_service, _setup_logging,
                      detach_and_drain, install_rules, load_with_rules, remove_and_unbind, serve_metrics)

__all__ = ["Controller", "ControlStats", "WorkerError", "worker_config", "run_controller", "run_worker",
           "merge_expositions"]

log = logging.getLogger("mproxy")
READY_TIMEOUT = 30.0  # a worker binds its queue and opens its sinks well within this
STOP_TIMEOUT = 20.0  # a worker drains its queue and flushes its connections within this
METRICS_TIMEOUT = 3.0
_CHANNEL_BUF = 1 << 20


class WorkerError(RuntimeError):
    """A worker could not be started (message says which and why)."""


def worker_config(cfg: Config, index: int) -> Config:
    """The single-queue config worker ``index`` runs: its own queue, no rules, no metrics listener."""
    q = dataclasses.replace(cfg.queue, num=cfg.queue.num + 1 + index, workers=1)
    r = dataclasses.replace(cfg.rules, manage=False)
    m = dataclasses.replace(cfg.metrics, listen="")
    s = dataclasses.replace(cfg.sink, pcap=f"{cfg.sink.pcap}.w{index}" if cfg.sink.pcap else "")
    return dataclasses.replace(cfg, queue=q, rules=r, metrics=m, sink=s)


@dataclass(slots=True)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    ready: bool = False
    started: float = 0.0
    restarts: int = 0
    backoff: RestartBackoff = field(default_factory=RestartBackoff)  # doubles while it keeps dying young
    restart_at: float = 0.0  # monotonic time of the next start attempt (0: none scheduled)
    replies: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)


@dataclass(slots=True)
class ControlStats:
    worker_exits: int = 0  # workers that ended while the gateway ran
    worker_restarts: int = 0
    announcements: int = 0  # token announcement messages read
    bad_messages: int = 0  # unreadable channel messages (ignored)


@dataclass(slots=True)
class Controller:
    """The control process (see the module docstring); same start/serve/stop shape as Service."""

    cfg: Config
    source: str
    steering: Steering = field(init=False)
    workers: list[_Worker] = field(init=False)
    queue: QueueAdapter | None = field(init=False, default=None)
    rules: netfilter.Rules | None = field(init=False, default=None)
    bypass: BypassWatch | None = field(init=False, default=None)  # packets the rules sent that a queue never took
    _stall: StallWatch = field(init=False, default_factory=StallWatch)
    _undelivered: LossWarning = field(init=False, default_factory=lambda: LossWarning(UNDELIVERED))
    stats: ControlStats = field(init=False, default_factory=ControlStats)
    started: float = field(init=False, default=0.0)
    _stop: asyncio.Event | None = field(init=False, default=None)
    _loop: asyncio.AbstractEventLoop | None = field(init=False, default=None)
    _request: int = field(init=False, default=0)
    _stopping: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        c = self.cfg
        self.steering = Steering(c.queue.workers, c.rules.worker_mask,
                                 max_tokens=max(1024, 2 * c.tracker.max_connections * c.queue.workers))
        self.workers = [_Worker(i) for i in range(c.queue.workers)]

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        """Start every worker (each ready: queue bound), bind the control queue, install the rules."""
        self.started = time.time()
        for w in self.workers:
            self._spawn(w)
        deadline = time.monotonic() + READY_TIMEOUT
        for w in self.workers:
            self._wait_ready(w, deadline)
        c = self.cfg
        self.queue = QueueAdapter(c.queue.num, self._steer, fail=FailMode(c.queue.fail), max_len=c.queue.max_len,
                                  sock_rcvbuf=c.queue.sock_rcvbuf, gso=c.queue.gso,
                                  mark_mask=c.rules.worker_mask)
        self.queue.open()
        self.bypass = BypassWatch.start(c, [c.queue.num + i for i in range(c.queue.workers + 1)])
        self.rules = install_rules(c, self.queue)
        if self.bypass is not None:
            self.bypass.rules = self.rules

    def queue_of(self, w: _Worker) -> int:
        return self.cfg.queue.num + 1 + w.index  # worker_config's queue

    def workers_up(self) -> int:
        """Workers running with their queue bound."""
        return sum(1 for w in self.workers if w.channel is not None and w.ready)

    def _spawn(self, w: _Worker) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (mine, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CHANNEL_BUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CHANNEL_BUF)
        argv = [sys.executable, "-m", "mproxy", "worker", "-c", self.source, "--index", str(w.index),
                "--channel-fd", str(theirs.fileno())]
        try:
            w.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), start_new_session=True)
        except OSError as e:
            mine.close()
            raise WorkerError(f"cannot start worker {w.index}: {e}") from None
        finally:
            theirs.close()
        mine.setblocking(False)
        w.channel, w.ready, w.started, w.restart_at = mine, False, time.monotonic(), 0.0

    def _wait_ready(self, w: _Worker, deadline: float) -> None:
        assert w.channel is not None and w.proc is not None
        while not w.ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"worker {w.index} (queue {self.queue_of(w)}) did not get ready "
                                  f"within {READY_TIMEOUT:.0f} s")
            if select.select([w.channel], [], [], min(left, 0.2))[0]:
                if not self._read_channel(w):
                    code = w.proc.wait(timeout=5)
                    raise WorkerError(f"worker {w.index} (queue {self.queue_of(w)}) exited with "
                                      f"code {code} while starting (its log above says why)")

    def stop(self) -> None:
        """Jumps out, control queue drained, each worker stopped (it drains its own queue), then the
        chain deleted (with packets still queued, that would drop them: see detach_and_drain)."""
        self._stopping = True
        detach_and_drain(self.rules, self.queue)
        if self.bypass is not None:  # nothing new is queued: the last reading, while the workers' queues
            self.bypass.final()  # are bound (a queue gone takes its numbering along)
        try:
            self._stop_workers()
        finally:
            remove_and_unbind(self.rules, self.queue)
            self.rules = None

    def _stop_workers(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                code = w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                if code:
                    log.warning("worker %d exited with code %d", w.index, code)
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop within %.0f s; killed", w.index, STOP_TIMEOUT)
                w.proc.kill()
                w.proc.wait()
            if w.channel is not None:
                w.channel.close()
                w.channel = None

    # ------------------------------------------------------------------ control queue
    def _steer(self, data: bytes, ts: float, csum_ready: bool = False, iface: int = 0) -> Any:
        s = self.steering
        d = s.decide(data, final=False)
        if d is None:  # a join whose token no worker announced yet: read what they sent, then decide
            for w in self.workers:
                self._read_channel(w)
            d = s.decide(data, final=True)
        return d

    def _read_channel(self, w: _Worker) -> bool:
        """Read every pending message of a worker; False when its channel reached end of file."""
        ch = w.channel
        if ch is None:
            return True
        while True:
            try:
                msg = ch.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                msg = b""
            if not msg:
                return False
            kind = msg[:1]
            if kind == b"T" and (len(msg) - 1) % _TOKEN.size == 0:
                self.stats.announcements += 1
                for tok, added in _TOKEN.iter_unpack(msg[1:]):
                    self.steering.learn(w.index, tok, added)
            elif kind == b"R":
                w.ready = True
            elif kind == b"M" and len(msg) >= 9:
                fut = w.replies.pop(int.from_bytes(msg[1:9], "big"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg[9:])
            else:
                self.stats.bad_messages += 1

    def _on_channel(self, w: _Worker) -> None:
        if not self._read_channel(w):
            self._lost(w)

    def _lost(self, w: _Worker) -> None:
        """A worker ended (its channel closed): forget its tokens, restart it after a back-off."""
        loop = self._loop
        if loop is not None and w.channel is not None:
            loop.remove_reader(w.channel.fileno())
        if w.channel is not None:
            w.channel.close()
            w.channel = None
        code = w.proc.poll() if w.proc is not None else None
        if code is None and w.proc is not None:
            try:
                code = w.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                code = w.proc.wait()
        for fut in w.replies.values():
            if not fut.done():
                fut.set_result(b"")
        w.replies.clear()
        if self._stopping:
            return
        self.stats.worker_exits += 1
        forgot = self.steering.forget_worker(w.index)
        now = time.monotonic()
        delay = w.backoff.after_death(w.started, now)
        w.restart_at = now + delay
        log.error("worker %d (queue %d) exited with code %s; %d tokens forgotten; its queue is %s until it is "
                  "restarted in %.0f s", w.index, self.queue_of(w), code, forgot,
                  "passed (fail open)" if self.cfg.queue.fail == "open" else "dropped (fail closed)", delay)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.channel is None and w.restart_at and now >= w.restart_at and not self._stopping:
                try:
                    self._spawn(w)
                except WorkerError as e:
                    log.error("%s", e)
                    w.restart_at = now + w.backoff.delay
                    continue
                w.restarts += 1
                self.stats.worker_restarts += 1
                assert self._loop is not None and w.channel is not None
                self._loop.add_reader(w.channel.fileno(), self._on_channel, w)
                log.info("worker %d restarted (tracking resumes mid-stream for its connections)", w.index)

    # ------------------------------------------------------------------ loop
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        assert self.queue is not None
        c = self.cfg
        metrics = await serve_metrics(c.metrics.listen, self.exposition) if c.metrics.listen else None
        self.queue.attach(loop)
        for w in self.workers:
            assert w.channel is not None
            loop.add_reader(w.channel.fileno(), self._on_channel, w)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        for sig in (signal.SIGHUP, signal.SIGUSR1):  # reopen logs / dump stats: the workers do it
            loop.add_signal_handler(sig, self._forward, sig)
        ticker = loop.create_task(self._tick())
        log.info("ready: control NFQUEUE %d steering to %d workers on NFQUEUE %d..%d (fail %s), rules %s, "
                 "metrics %s", c.queue.num, c.queue.workers, c.queue.num + 1, c.queue.num + c.queue.workers,
                 c.queue.fail, f"in {c.rules.table} {c.rules.hook} -> {c.rules.chain}" if c.rules.manage
                 else "not managed", f"http://{c.metrics.listen}/metrics" if c.metrics.listen else "off")
        try:
            await self._stop.wait()
        finally:
            self._stopping = True
            ticker.cancel()
            if metrics is not None:
                metrics.close()
            for w in self.workers:
                if w.channel is not None:
                    loop.remove_reader(w.channel.fileno())
            self.queue.detach(loop)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
        log.info("stopping")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                self._restart_due()
                for w in self.workers:  # its channel may outlive it (held by its emitter process)
                    if w.channel is not None and w.proc is not None and w.proc.poll() is not None:
                        self._read_channel(w)
                        self._lost(w)
                table = kernel_queue_table()
                row = table.get(self.cfg.queue.num) if table is not None else None
                if row is not None and self.queue is not None:  # the control queue: same guards as a worker's
                    self._stall.check(self.queue, row["waiting"], asyncio.get_running_loop())
                if self.queue is not None:
                    self._undelivered.update(self.queue.stats.undelivered, self.cfg.queue.fail,
                                             " (the control queue: first SYNs)")
                if self.bypass is not None and table is not None:
                    self.bypass.kernel(table)  # a restarted worker's queue numbers anew: seen before much
                    if self.bypass.due():
                        await self.bypass.refresh()
            except Exception:  # noqa: BLE001 - the ticker must survive
                log.exception("worker supervision failed")

    def _forward(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(sig)

    # ------------------------------------------------------------------ metrics
    async def exposition(self) -> bytes:
        """The control's own families, then every worker's, each sample labelled with its worker."""
        from prometheus_client import generate_latest

        if self.bypass is not None:
            await self.bypass.refresh()  # iptables in a thread; the workers answer meanwhile
        texts = await asyncio.gather(*(self._worker_metrics(w) for w in self.workers))
        own = generate_latest(_control_registry(self))
        return own + merge_expositions({w.index: t for w, t in zip(self.workers, texts) if t})

    async def _worker_metrics(self, w: _Worker) -> bytes:
        if w.channel is None or not w.ready:
            return b""
        assert self._loop is not None
        self._request += 1
        rid = self._request
        fut: asyncio.Future[bytes] = self._loop.create_future()
        w.replies[rid] = fut
        try:
            w.channel.send(b"M" + rid.to_bytes(8, "big"))
            return await asyncio.wait_for(fut, METRICS_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            return b""
        finally:
            w.replies.pop(rid, None)

    def control_state(self) -> dict[str, Any]:
        q = self.queue
        return {"steering": self.steering.stats.as_dict(), "tokens": len(self.steering.tokens),
                "control": dataclasses.asdict(self.stats), "queue": q.stats.as_dict() if q else None,
                "kernel_queue": kernel_queue_state(self.cfg.queue.num),
                "bypassed": self.bypass.record() if self.bypass else None,
                "workers_up": self.workers_up()}


def _control_registry(ctl: Controller) -> Any:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self) -> Any:
            st = ctl.steering.stats
            syns = CounterMetricFamily("mproxy_steering_syns", "First SYNs of MPTCP connections steered to a "
                                       "worker by the control queue, by how the worker was chosen", labels=["kind"])
            for kind in ("capable", "join", "join_unknown", "other"):
                syns.add_metric([kind], getattr(st, kind))
            yield syns
            later = CounterMetricFamily("mproxy_steering_later_packets", "Later packets of a connection that "
                                        "reached the control queue (conntrack found them INVALID, or their entry "
                                        "lost the worker bits): to the worker of their subflow's SYN, or by "
                                        "4-tuple hash when the control did not see it", labels=["kind"])
            for kind in ("subflow", "unknown"):
                later.add_metric([kind], getattr(st, kind))
            yield later
            yield GaugeMetricFamily("mproxy_steering_subflows", "Subflows in the control queue's 4-tuple-to-worker "
                                    "table", value=len(ctl.steering.subflows))
            yield CounterMetricFamily("mproxy_steering_subflow_evictions", "Entries dropped from the full "
                                      "4-tuple-to-worker table (oldest SYN first)", value=st.subflows_evicted)
            tok = CounterMetricFamily("mproxy_steering_token_events", "Token announcements from the workers "
                                      "(learned, forgotten) and table evictions", labels=["event"])
            for ev in ("learned", "forgotten", "evicted"):
                tok.add_metric([ev], getattr(st, f"tokens_{ev}"))
            yield tok
            yield GaugeMetricFamily("mproxy_steering_tokens", "Tokens in the control queue's token-to-worker "
                                    "table", value=len(ctl.steering.tokens))
            yield GaugeMetricFamily("mproxy_workers", "Worker processes configured", value=len(ctl.workers))
            yield GaugeMetricFamily("mproxy_workers_up", "Worker processes running with their queue bound",
                                    value=ctl.workers_up())
            yield CounterMetricFamily("mproxy_worker_restarts", "Workers restarted after they ended",
                                      value=ctl.stats.worker_restarts)
            q = ctl.queue.stats if ctl.queue is not None else None
            cq = CounterMetricFamily("mproxy_control_queue_packets", "Packets of the control queue by outcome "
                                     "(repeated to a worker, or the fail-mode verdict after an error)",
                                     labels=["outcome"])
            cq.add_metric(["repeated"], q.repeated if q else 0)
            cq.add_metric(["accepted"], q.accepted if q else 0)
            cq.add_metric(["dropped"], q.dropped if q else 0)
            cq.add_metric(["undelivered"], q.undelivered if q else 0)
            yield cq
            if ctl.bypass is not None:
                yield bypass_family(ctl.bypass.counts(), ctl.cfg.queue.fail)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector())  # type: ignore[arg-type]
    return reg


def merge_expositions(texts: dict[int, bytes]) -> bytes:
    """Several processes' Prometheus texts as one, every sample labelled ``worker``.

    Families keep their type and help; samples of one family from all workers
    are printed together (the text format wants a family in one block). A text
    that does not parse is left out (logged), not the whole scrape.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    fams: dict[str, Metric] = {}
    for index in sorted(texts):
        try:
            parsed = list(text_string_to_metric_families(texts[index].decode("utf-8", "replace")))
        except ValueError as e:  # a worker's text we cannot read: left out of this scrape
            log.warning("worker %d: unreadable metrics left out: %s", index, e)
            continue
        for fam in parsed:
            out = fams.get(fam.name)
            if out is None:
                out = fams[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp, s.exemplar)

    class _Merged:
        def collect(self) -> Any:
            return iter(fams.values())

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Merged())  # type: ignore[arg-type]
    return generate_latest(reg)


def run_controller(cfg: Config, config_path: str) -> int:
    """``mproxy run`` with workers: the same exit codes as the single-queue service."""
    ctl = Controller(cfg, config_path)
    code = _run_service(ctl, (WorkerError,))
    if code == 0:
        log.info("stopped: control %s", ctl.control_state())
    return code


def run_worker(config_path: str, index: int, channel_fd: int) -> int:
    """``mproxy worker``: one worker of ``mproxy run`` (started by the control process, not by hand)."""
    from .config import ConfigError

    try:
        cfg, ruleset = load_with_rules(config_path)
    except ConfigError as e:
        print(f"mproxy worker {index}: config error: {e}", file=sys.stderr)
        return 2
    if not 0 <= index < cfg.queue.workers:
        print(f"mproxy worker: --index {index} outside 0..{cfg.queue.workers - 1}", file=sys.stderr)
        return 2
    try:
        channel = socket.socket(fileno=channel_fd)
    except OSError as e:
        print(f"mproxy worker {index}: --channel-fd {channel_fd}: {e}", file=sys.stderr)
        return 2
    channel.setblocking(False)
    _setup_logging(cfg.log.level)
    return _run_service(Service(worker_config(cfg, index), config_path, ruleset, worker=index, channel=channel,
                                workers_total=cfg.queue.workers))

