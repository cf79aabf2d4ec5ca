"""Config -> the inspector, the reactions and the alert feed of ``mproxy run``.

Kept apart from :mod:`mproxy.service` so the wiring of "closing the loop"
(embedded inspector, IDS alert follower, MP_FASTCLOSE injection) reads in one
place and the service only calls it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .config import Config, ConfigError, InspectorConfig, inspector_enabled
from .core.alerts import AlertStats, parse_alert_line
from .core.gateway import Gateway
from .core.inspector import Inspector, load_checked, rule_warnings
from .core.reactions import Reaction, Reactions
from .core.rules import RuleError, RuleSet
from .io.alerts import AlertFollower
from .io.inject import Injector

__all__ = ["load_ruleset", "build_inspector", "build_reactions", "AlertFeed", "needs_injection", "warn_rules"]

log = logging.getLogger("mproxy")


def load_ruleset(cfg: Config) -> RuleSet | None:
    """The rules of the embedded inspector (None when it is off); ConfigError names the file and line."""
    if not inspector_enabled(cfg):
        return None
    path = cfg.inspector.rules
    if not path:
        raise ConfigError("[inspector] rules: no rules file found (none set, no mproxy.rules beside the "
                          "config file); set [inspector] rules, or mode = \"off\"")
    try:
        return load_checked(path, cfg.inspector.window, cfg.inspector.skip_bad_rules)
    except RuleError as e:
        raise ConfigError(f"[inspector] rules: {e}") from None


def warn_rules(rs: RuleSet, limit: int = 20) -> None:
    """Log the rules ``skip_bad_rules`` left out, and those whose pcre can backtrack
    (:mod:`mproxy.core.pcre_lint`): the first ``limit`` of each as warnings, all at debug."""
    for what, lines in rule_warnings(rs):
        for i, why in enumerate(lines):
            log.log(logging.WARNING if i < limit else logging.DEBUG, "%s: %s", what, why)
        if len(lines) > limit:
            log.warning("%s: %d in all (the rest at debug level; `mproxy check` lists them)", what, len(lines))


def build_inspector(cfg: Config, rules: RuleSet | None = None) -> Inspector | None:
    rs = rules if rules is not None else load_ruleset(cfg)
    if rs is None:
        return None
    warn_rules(rs)
    return inspector_for(rs, cfg.inspector)


def inspector_for(rs: RuleSet, i: InspectorConfig, *, live: bool = True) -> Inspector:
    """An inspector of ``rs`` with the ``[inspector]`` settings (the gateway's, and ``replay --rules``
    with ``live`` false: offline nothing waits for it, so ``pcre_share`` does not bound it there)."""
    return Inspector(rs, window=i.window, pcre_window=i.pcre_window, pcre_budget=i.pcre_budget_ms / 1000,
                     pcre_strikes=i.pcre_strikes, pcre_share=i.pcre_share if live else 1.0)


def build_reactions(cfg: Config) -> Reactions:
    a = cfg.actions
    return Reactions(on_match=tuple(Reaction(v) for v in a.on_match),
                     on_alert=tuple(Reaction(v) for v in a.on_alert),
                     on_side_channel=tuple(Reaction(v) for v in a.on_side_channel),
                     on_pcre_limit=tuple(Reaction(v) for v in a.on_pcre_limit),
                     downgrade_host_seconds=a.downgrade_host_seconds, kill_linger=a.kill_linger)


def needs_injection(cfg: Config) -> bool:
    a = cfg.actions
    return any("fastclose" in v for v in (a.on_match, a.on_alert, a.on_side_channel, a.on_pcre_limit))


@dataclass(slots=True)
class AlertFeed:
    """Alert lines -> Gateway.alert -> sink frames, injected packets, event-log records."""

    gateway: Gateway
    injector: Injector | None
    write_frames: Any  # callable(frames)
    after: Any = None  # callable() run after each alert that acted (flush records)
    stats: AlertStats = field(default_factory=AlertStats)
    clock: Any = time.time

    def line(self, raw: bytes) -> None:
        a = parse_alert_line(raw, self.stats)
        if a is None:
            return
        d = self.gateway.alert(a, self.clock())
        if d is None:
            self.stats.unmatched += 1
            log.debug("alert %s names no live MPTCP connection", a.reason())
            return
        self.stats.acted += 1
        if d.inject and self.injector is not None:
            self.injector.send(d.inject)
        self.write_frames(d.frames)  # also with none: a remote emitter ships the ops gathered since
        if self.after is not None:
            self.after()

    def follower(self, cfg: Config) -> AlertFollower:
        return AlertFollower(list(cfg.alerts.files), self.line, cfg.alerts.poll_interval, cfg.alerts.from_start)
