"""Configuration: a TOML file validated up front, every error naming the bad key.

The schema is declared once as dataclasses; :func:`load_config` walks the
TOML table against them so an unknown key, a wrong type or a bad value stops
the start with ``config error: [section] key: why`` instead of surfacing
later as a traceback on the packet path.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .core.policy import Action, LowTtl, OnMemcap, Policy, Rule, UntrustedJoin
from .core.marks import mask_capacity
from .core.tracker import CHECKSUM_MODES, TrackerConfig


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


@dataclass(slots=True)
class QueueConfig:
    num: int = 0  # first NFQUEUE number
    workers: int = 1  # >1: control queue num steers each MPTCP connection to a worker's queue num+1+w
    max_len: int = 4096  # packets the kernel may hold for us
    sock_rcvbuf: int = 8 * 1024 * 1024  # netlink socket receive buffer (bytes)
    fail: str = "open"  # "open": accept when mproxy is absent/overloaded/failing; "closed": drop
    gso: bool = True  # queue GSO packets whole (NFQA_CFG_F_GSO) instead of letting the kernel cut them first


@dataclass(slots=True)
class RulesConfig:
    manage: bool = True  # install iptables rules on start, remove them on stop
    chain: str = "MPROXY"
    table: str = "mangle"
    hook: str = "FORWARD"  # FORWARD for a gateway; INPUT/OUTPUT for host mode
    connmark: int = 0x4D50  # bits of the conntrack mark that say "MPTCP connection"
    worker_mask: int = 0xFF0000  # workers > 1: mark bits naming a connection's worker (1..mask)
    ipv6: bool = True
    in_interfaces: list[str] = field(default_factory=list)  # restrict to traffic arriving here
    # queue TCP packets conntrack finds INVALID too: they carry no connmark, and a receiver may read
    # some (e.g. a SACK block past what it sent makes conntrack refuse a segment Linux reads)
    queue_invalid: bool = True


@dataclass(slots=True)
class SinkConfig:
    interface: str = ""  # Ethernet frames of the emitted stream go out here (IDS listens)
    pcap: str = ""  # rotating pcap files: path prefix
    pcap_rotate_mb: int = 100
    pcap_keep: int = 10
    passthrough: bool = True  # also copy queued plain-TCP packets (downgraded/fallback) to the sink
    worker: bool = True  # emit the stream and write the sinks in a second process (a second core)


@dataclass(slots=True)
class LogConfig:
    events: str = ""  # JSON-lines event log path, "-" for stdout, "" for none
    level: str = "info"
    log_keys: bool = False  # never write MPTCP keys unless explicitly asked


@dataclass(slots=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"  # "" disables the exporter


@dataclass(slots=True)
class InspectorConfig:
    mode: str = "auto"  # "auto": on unless [alerts] files are followed; "on"; "off"
    rules: str = ""  # rules file (relative: to the config file); "": see resolve_rules_path
    window: int = 4096  # a rule's contents and pcre must all occur within this many stream bytes
    pcre_window: int = 1024  # bytes before a chunk that pcre also scans (matches spanning chunks, or before them)
    pcre_budget_ms: float = 20.0  # time the pcre searches of one chunk may take together ([actions] on_pcre_limit)
    pcre_strikes: int = 3  # searches of a rule that run out of time on one direction before it is given up there
    pcre_share: float = 0.5  # of the worker's time, what the pcre searches of all connections may take (1: no bound)
    skip_bad_rules: bool = False  # a rule that does not parse is skipped with a warning (Suricata's way), not fatal


@dataclass(slots=True)
class AlertsConfig:
    files: list[str] = field(default_factory=list)  # Suricata eve.json / Snort 3 alert_json files to follow
    poll_interval: float = 0.25  # seconds between checks of the files
    from_start: bool = False  # at start, read existing files from the beginning (default: new lines only)


MIN_SOCK_RCVBUF = 1 << 17  # [queue] sock_rcvbuf floor: the kernel doubles it, room for a few 64 KiB GSO packets
REACTIONS = ("fastclose", "log", "downgrade-host")


@dataclass(slots=True)
class ActionsConfig:
    on_match: list[str] = field(default_factory=lambda: ["fastclose"])  # embedded inspector hit
    on_alert: list[str] = field(default_factory=lambda: ["fastclose"])  # external IDS alert
    on_side_channel: list[str] = field(default_factory=lambda: ["log"])  # acked bytes never seen
    on_pcre_limit: list[str] = field(default_factory=lambda: ["log"])  # a pcre not decided in pcre_budget_ms
    downgrade_host_seconds: float = 600.0
    kill_linger: float = 30.0  # seconds a killed connection's late packets are dropped and answered


@dataclass(slots=True)
class Config:
    queue: QueueConfig = field(default_factory=QueueConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    policy: Policy = field(default_factory=Policy)
    sink: SinkConfig = field(default_factory=SinkConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    inspector: InspectorConfig = field(default_factory=InspectorConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    actions: ActionsConfig = field(default_factory=ActionsConfig)


_SECTIONS = {"queue": QueueConfig, "rules": RulesConfig, "tracker": TrackerConfig, "sink": SinkConfig,
             "log": LogConfig, "metrics": MetricsConfig, "inspector": InspectorConfig, "alerts": AlertsConfig,
             "actions": ActionsConfig}


def _fill(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    obj = cls()
    known = {f.name: f for f in fields(cls)}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"[{where}] unknown key {key!r} (known: {', '.join(sorted(known))})")
        default = getattr(obj, key)
        setattr(obj, key, _coerce(value, default, f"[{where}] {key}"))
    return obj


def _coerce(value: Any, default: Any, name: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{name}: must not be negative")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):  # TOML has nan and inf
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{name}: must not be negative")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported setting")


def _networks(value: Any, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{name}: expected a network or a list of networks, got {value!r}")
    out = []
    for v in value:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except (ValueError, TypeError):
            raise ConfigError(f"{name}: {v!r} is not an IP network") from None
    return tuple(out)


def _ports(value: Any, name: str) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{name}: expected a port, a list of ports or \"LOW-HIGH\" ranges")
    ports: set[int] = set()
    for v in value:
        if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536:
            ports.add(v)
        elif isinstance(v, str) and "-" in v:
            try:
                lo, hi = (int(x) for x in v.split("-", 1))
            except ValueError:
                raise ConfigError(f"{name}: bad port range {v!r}") from None
            if not 0 < lo <= hi < 65536:
                raise ConfigError(f"{name}: bad port range {v!r}")
            ports.update(range(lo, hi + 1))
        else:
            raise ConfigError(f"{name}: bad port {v!r}")
    return frozenset(ports)


def _action(value: Any, name: str) -> Action:
    try:
        return Action(value)
    except ValueError:
        raise ConfigError(f"{name}: unknown action {value!r} (one of: {', '.join(a.value for a in Action)})") \
            from None


def _policy(table: Any) -> Policy:
    if not isinstance(table, dict):
        raise ConfigError("[policy] must be a table")
    allowed = {"default", "trusted_networks", "untrusted_join", "on_memcap", "low_ttl", "clamp_window", "rule"}
    for key in table:
        if key not in allowed:
            raise ConfigError(f"[policy] unknown key {key!r} (known: {', '.join(sorted(allowed))})")
    default = _action(table.get("default", "inspect"), "[policy] default")
    trusted = _networks(table["trusted_networks"], "[policy] trusted_networks") if "trusted_networks" in table \
        else None
    try:
        untrusted = UntrustedJoin(table.get("untrusted_join", "refuse"))
    except ValueError:
        raise ConfigError("[policy] untrusted_join: expected \"refuse\" or \"downgrade\"") from None
    try:
        on_memcap = OnMemcap(table.get("on_memcap", "drop"))
    except (ValueError, TypeError):
        raise ConfigError("[policy] on_memcap: expected \"drop\" or \"pass\"") from None
    try:
        low_ttl = LowTtl(table.get("low_ttl", "raise"))
    except (ValueError, TypeError):
        raise ConfigError("[policy] low_ttl: expected \"raise\" or \"pass\"") from None
    clamp = table.get("clamp_window", True)
    if not isinstance(clamp, bool):
        raise ConfigError(f"[policy] clamp_window: expected true or false, got {clamp!r}")
    rules = []
    raw_rules = table.get("rule", [])
    if not isinstance(raw_rules, list):
        raise ConfigError("[policy] rule: use [[policy.rule]] tables")
    for i, r in enumerate(raw_rules, 1):
        where = f"[[policy.rule]] #{i}"
        if not isinstance(r, dict):
            raise ConfigError(f"{where} must be a table")
        for key in r:
            if key not in {"client", "server", "ports", "action", "name"}:
                raise ConfigError(f"{where} unknown key {key!r} (known: action, client, name, ports, server)")
        if "action" not in r:
            raise ConfigError(f"{where}: missing key 'action'")
        rules.append(Rule(
            action=_action(r["action"], f"{where} action"),
            clients=_networks(r.get("client", []), f"{where} client"),
            servers=_networks(r.get("server", []), f"{where} server"),
            ports=_ports(r.get("ports"), f"{where} ports"),
            name=str(r.get("name", f"rule{i}")),
        ))
    return Policy(tuple(rules), default, trusted, untrusted, on_memcap, low_ttl, clamp)


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses per nesting level
        raise ConfigError(f"{source}: not valid TOML: arrays or tables nested too deeply") from None
    cfg = Config()
    for key, value in data.items():
        if key == "policy":
            cfg.policy = _policy(value)
        elif key == "actions" and isinstance(value, dict):  # a single reaction may be a bare string
            setattr(cfg, key, _fill(ActionsConfig, {k: [v] if k.startswith("on_") and isinstance(v, str) else v
                                                    for k, v in value.items()}, key))
        elif key in _SECTIONS:
            setattr(cfg, key, _fill(_SECTIONS[key], value, key))
        else:
            raise ConfigError(f"unknown section [{key}] (known: {', '.join(sorted([*_SECTIONS, 'policy']))})")
    _check(cfg)
    cfg.inspector.rules = resolve_rules_path(cfg.inspector.rules, source)
    return cfg


_SHIPPED_RULES = Path(__file__).resolve().parents[1] / "config" / "mproxy.rules"


def resolve_rules_path(rules: str, source: str = "") -> str:
    """The rules file to load: relative paths are taken from the config file's directory; "" means
    ``mproxy.rules`` beside the config file, else the rules shipped in the checkout's ``config/``."""
    base = Path(source).resolve().parent if source and not source.startswith("<") else Path.cwd()
    if rules:
        return str(base / rules) if not Path(rules).is_absolute() else rules
    for cand in (base / "mproxy.rules", _SHIPPED_RULES):
        if source.startswith("<") and cand != _SHIPPED_RULES:
            continue
        if cand.is_file():
            return str(cand)
    return ""


def inspector_enabled(cfg: Config) -> bool:
    """The embedded inspector runs unless turned off, or (auto) an external IDS's alerts are followed."""
    mode = cfg.inspector.mode
    return mode == "on" or (mode == "auto" and not cfg.alerts.files)


def _check(cfg: Config) -> None:
    q = cfg.queue
    if q.fail not in ("open", "closed"):
        raise ConfigError(f"[queue] fail: expected \"open\" or \"closed\", got {q.fail!r}")
    last = q.num + (q.workers if q.workers > 1 else 0)  # workers > 1: a control queue plus one per worker
    if not 0 <= q.num <= 65535 or q.workers < 1 or last > 65535:
        raise ConfigError("[queue] num/workers: queue numbers must lie in 0..65535 and workers >= 1 "
                          "(with workers > 1 mproxy uses queues num .. num+workers)")
    if q.max_len < 1:
        raise ConfigError("[queue] max_len: must be at least 1")
    if q.sock_rcvbuf < MIN_SOCK_RCVBUF:
        raise ConfigError(f"[queue] sock_rcvbuf: {q.sock_rcvbuf} bytes is too small for queued GSO packets "
                          f"(up to 64 KiB each); use at least {MIN_SOCK_RCVBUF}")
    if cfg.rules.hook not in ("FORWARD", "INPUT", "OUTPUT", "PREROUTING", "POSTROUTING"):
        raise ConfigError(f"[rules] hook: {cfg.rules.hook!r} is not a netfilter hook")
    if cfg.rules.table not in ("mangle", "filter", "raw"):
        raise ConfigError(f"[rules] table: {cfg.rules.table!r} (use mangle, filter or raw)")
    if not 0 < cfg.rules.connmark <= 0xFFFFFFFF:
        raise ConfigError("[rules] connmark: must be a non-zero 32-bit mask")
    wm = cfg.rules.worker_mask
    capacity = mask_capacity(wm) if wm <= 0xFFFFFFFF else 0
    if not capacity:
        raise ConfigError(f"[rules] worker_mask: 0x{wm:x} must be one run of set bits within 32 bits")
    if wm & cfg.rules.connmark:
        raise ConfigError(f"[rules] worker_mask: 0x{wm:x} overlaps [rules] connmark 0x{cfg.rules.connmark:x}")
    if q.workers > capacity:
        raise ConfigError(f"[queue] workers: {q.workers} do not fit in [rules] worker_mask 0x{wm:x} "
                          f"(at most {capacity})")
    if not cfg.rules.chain or len(cfg.rules.chain) > 28 or not cfg.rules.chain.replace("_", "").replace(
            "-", "").isalnum():
        raise ConfigError(f"[rules] chain: {cfg.rules.chain!r} is not a usable chain name")
    if cfg.log.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"[log] level: {cfg.log.level!r} (debug, info, warning, error)")
    if cfg.metrics.listen:
        host, sep, port = cfg.metrics.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise ConfigError(f"[metrics] listen: expected HOST:PORT, got {cfg.metrics.listen!r}")
    t = cfg.tracker
    if t.max_connections < 1 or t.max_subflows < 1 or t.max_subflows_per_connection < 1:
        raise ConfigError("[tracker] limits must be at least 1")
    if t.memcap < 65536:
        raise ConfigError(f"[tracker] memcap: at least 65536 bytes, got {t.memcap}")
    if t.checksums not in CHECKSUM_MODES:
        raise ConfigError(f"[tracker] checksums: expected one of {', '.join(CHECKSUM_MODES)}, got {t.checksums!r}")
    if t.history_memcap < max(65536, 4 * t.history):
        raise ConfigError(f"[tracker] history_memcap: at least 65536 bytes and 4 x history, got {t.history_memcap}")
    if cfg.sink.pcap_rotate_mb < 1 or cfg.sink.pcap_keep < 1:
        raise ConfigError("[sink] pcap_rotate_mb and pcap_keep must be at least 1")
    if cfg.inspector.mode not in ("auto", "on", "off"):
        raise ConfigError(f"[inspector] mode: expected \"auto\", \"on\" or \"off\", got {cfg.inspector.mode!r}")
    if cfg.inspector.window < 1 or cfg.inspector.pcre_window < 1:
        raise ConfigError("[inspector] window and pcre_window must be at least 1")
    if not 0 < cfg.inspector.pcre_budget_ms <= 10_000:
        raise ConfigError(f"[inspector] pcre_budget_ms: expected milliseconds in (0, 10000], "
                          f"got {cfg.inspector.pcre_budget_ms!r}")
    if not 0 <= cfg.inspector.pcre_strikes <= 1000:
        raise ConfigError(f"[inspector] pcre_strikes: expected a count in [0, 1000] (0: never give up), "
                          f"got {cfg.inspector.pcre_strikes!r}")
    if not 0.01 <= cfg.inspector.pcre_share <= 1:
        raise ConfigError(f"[inspector] pcre_share: expected a fraction of the time in [0.01, 1] (1: no bound), "
                          f"got {cfg.inspector.pcre_share!r}")
    if cfg.alerts.poll_interval <= 0 or cfg.alerts.poll_interval > 60:
        raise ConfigError("[alerts] poll_interval: expected seconds in (0, 60]")
    a = cfg.actions
    for name in ("on_match", "on_alert", "on_side_channel", "on_pcre_limit"):
        chosen = getattr(a, name)
        if not chosen:
            raise ConfigError(f"[actions] {name}: choose at least one of {', '.join(REACTIONS)}")
        for v in chosen:
            if v not in REACTIONS:
                raise ConfigError(f"[actions] {name}: unknown reaction {v!r} (one or a list of: "
                                  f"{', '.join(REACTIONS)})")


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, path)
