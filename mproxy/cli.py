"""The ``mproxy`` command: decode and replay captures (offline), run the gateway (live)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from . import __version__


def _cmd_decode(args: argparse.Namespace) -> int:
    from .decode import DecodeStats, decode_frames, human_line
    from .io.pcap import CaptureError, CaptureReader, read_captures

    stats = DecodeStats()
    readers: list[CaptureReader] = []
    out = sys.stdout
    try:
        for rec in decode_frames(read_captures(args.files, readers), stats):
            out.write(json.dumps(rec, separators=(",", ":")) + "\n" if args.json else human_line(rec) + "\n")
    except CaptureError as e:
        print(f"mproxy decode: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    for r in readers:
        for p in r.problems:
            print(f"mproxy decode: warning: {p}", file=sys.stderr)
    if not args.quiet:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(stats.errors.items())) or "none"
        print(f"mproxy decode: {stats.frames} frames, {stats.tcp} TCP, {stats.options} MPTCP options, "
              f"errors: {errs}", file=sys.stderr)
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from .replay import CaptureError, EmitProcessError, open_output, replay, summary_lines

    tracker, log_keys, icfg = None, False, None
    if args.config:
        from .config import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"mproxy replay: config error: {e}", file=sys.stderr)
            return 2
        tracker, log_keys, icfg = cfg.tracker, cfg.log.log_keys, cfg.inspector
    if args.checksums:
        from dataclasses import replace as _replace

        from .core.tracker import TrackerConfig

        tracker = _replace(tracker or TrackerConfig(), checksums=args.checksums)
    inspector = None
    if args.rules:
        from .config import InspectorConfig
        from .core.inspector import load_checked, rule_warnings
        from .core.rules import RuleError
        from .reacting import inspector_for

        icfg = icfg or InspectorConfig()
        try:
            rs = load_checked(args.rules, icfg.window, icfg.skip_bad_rules)
            inspector = inspector_for(rs, icfg, live=False)
        except RuleError as e:
            print(f"mproxy replay: rules error: {e}", file=sys.stderr)
            return 2
        if not args.quiet:
            _print_rule_warnings("mproxy replay", rule_warnings(rs))
    if args.pin_interfaces and len(args.inputs) > 1:
        print("mproxy replay: --pin-interfaces takes one input (interface numbers are each capture host's own)",
              file=sys.stderr)
        return 2
    try:
        out = open_output(args.out)
    except OSError as e:
        print(f"mproxy replay: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    log = None
    try:
        if args.log:
            log = sys.stdout if args.log == "-" else open(args.log, "w", encoding="utf-8")
    except OSError as e:
        print(f"mproxy replay: cannot write {args.log}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        res = replay(args.inputs, out, log, tracker, progress=sys.stderr.isatty() and not args.quiet,
                     log_keys=log_keys, emit_process=args.emit_process, inspector=inspector,
                     pin_interfaces=args.pin_interfaces)
        out.close()
    except CaptureError as e:
        print(f"mproxy replay: {e}", file=sys.stderr)
        return 2
    except EmitProcessError as e:
        print(f"mproxy replay: {e}; {args.out} is incomplete", file=sys.stderr)
        return 1
    except OSError as e:  # writing the output (full disk, closed pipe) in this process
        print(f"mproxy replay: cannot write {args.out}: {e.strerror or e}; it is incomplete", file=sys.stderr)
        return 1
    finally:
        try:
            out.close()  # again after an error: what is still buffered cannot be written either
        except OSError:
            pass
        if log is not None and log is not sys.stdout:
            log.close()
    if args.metrics:
        from .io.metrics import Sources, snapshot

        try:
            with open(args.metrics, "wb") as f:
                f.write(snapshot(Sources(tracker=res.pipeline.tracker, pipeline=res.pipeline.stats)))
        except OSError as e:
            print(f"mproxy replay: cannot write {args.metrics}: {e.strerror or e}", file=sys.stderr)
            return 2
    if not args.quiet:
        for line in summary_lines(res):
            print(f"mproxy replay: {line}", file=sys.stderr)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .service import run

    return run(args.config)


def _cmd_worker(args: argparse.Namespace) -> int:
    from .workers import run_worker

    return run_worker(args.config, args.index, args.channel_fd)


def _load_config(path: str) -> Any:
    """The validated config, or None after printing the error that names the bad key."""
    from .config import ConfigError
    from .service import load

    try:
        return load(path)
    except ConfigError as e:
        print(f"mproxy: config error: {e}", file=sys.stderr)
        return None


def _cmd_rules(args: argparse.Namespace) -> int:
    from .io.netfilter import render

    cfg = _load_config(args.config)
    if cfg is None:
        return 2
    sys.stdout.write(render(cfg, delete=args.delete, source=args.config))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    if cfg is None:
        return 2
    if not args.quiet:
        sinks = [s for s in (cfg.sink.interface and f"interface {cfg.sink.interface}",
                             cfg.sink.pcap and f"pcap {cfg.sink.pcap}.N.pcap") if s]
        from .reacting import load_ruleset

        rs = load_ruleset(cfg)
        queues = (f"queue {cfg.queue.num}" if cfg.queue.workers == 1 else
                  f"control queue {cfg.queue.num}, {cfg.queue.workers} workers on queues {cfg.queue.num + 1}.."
                  f"{cfg.queue.num + cfg.queue.workers}")
        print(f"{args.config}: OK ({queues}, fail {cfg.queue.fail}, policy {cfg.policy.default.value}"
              f" + {len(cfg.policy.rules)} rules, sinks: {', '.join(sinks) or 'none'}, inspector: "
              f"{f'{len(rs)} signatures from {rs.source}' if rs is not None else 'off'}"
              f"{f', {len(rs.skipped)} skipped' if rs is not None and rs.skipped else ''}, alerts followed: "
              f"{len(cfg.alerts.files)})")
        from . import compiled

        print(f"{args.config}: {compiled.describe()}")
        if rs is not None:
            from .core.inspector import rule_warnings

            _print_rule_warnings(args.config, rule_warnings(rs))
    return 0


def _print_rule_warnings(prefix: str, warnings: list[tuple[str, list[str]]]) -> None:
    """``rule_warnings`` on stderr, one line each (every one: ``run`` logs only the first 20)."""
    for what, lines in warnings:
        for why in lines:
            print(f"{prefix}: {what}: {why}", file=sys.stderr)


_INPUTS_HELP = "captures (pcap/pcapng, or gzip/bzip2/xz-compressed; - reads standard input), merged by timestamp"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mproxy", description=__doc__)
    p.add_argument("--version", action="version", version=f"mproxy {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("decode", help="print every MPTCP option of pcap/pcapng files")
    d.add_argument("files", nargs="+", metavar="FILE", help=_INPUTS_HELP)
    d.add_argument("--json", action="store_true", help="one JSON object per option")
    d.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    d.set_defaults(func=_cmd_decode)

    r = sub.add_parser("replay", help="rebuild MPTCP connections of captures as plain TCP (pcap out)")
    r.add_argument("inputs", nargs="+", metavar="IN", help=_INPUTS_HELP)
    r.add_argument("--out", "-o", required=True, metavar="OUT.pcap", help="emitted stream (Ethernet pcap)")
    r.add_argument("--log", metavar="LOG.jsonl", help="JSON-lines event log ('-' for stdout)")
    r.add_argument("--metrics", metavar="FILE", help="write a final Prometheus text-format snapshot here")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr")
    r.add_argument("--emit-process", action=argparse.BooleanOptionalAction, default=None,
                   help="emit and write the pcap in a second process (default: when 2+ CPUs are available)")
    r.add_argument("--rules", metavar="FILE",
                   help="match these signature rules on each rebuilt MPTCP stream (signature records in the log)")
    r.add_argument("-c", "--config", metavar="FILE",
                   help="take the [tracker] limits, [log] log_keys and [inspector] windows and skip_bad_rules from "
                        "this configuration")
    r.add_argument("--checksums", choices=("auto", "verify", "count"),  # core.tracker.CHECKSUM_MODES
                   help="segments whose TCP or IPv4 header checksum fails are dropped as the receiver drops them: "
                        "auto (the default, or [tracker] checksums) unless the checksum was left unfilled by "
                        "offload, verify those too (captures from a wire tap), count: none, only counted")
    r.add_argument("--pin-interfaces", action="store_true",
                   help="refuse a subflow's packets that came in on another interface than its direction's "
                        "first (as `run` does): one Linux cooked v2 capture (tcpdump -i any) taken at a gateway "
                        "that records each packet once")
    r.set_defaults(func=_cmd_replay)

    g = sub.add_parser("run", help="run the inline gateway on NFQUEUE until SIGINT/SIGTERM")
    g.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML configuration")
    g.set_defaults(func=_cmd_run)

    w = sub.add_parser("worker", help="one worker of `run` with [queue] workers > 1 (started by `run`)")
    w.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML configuration")
    w.add_argument("--index", type=int, required=True, help="worker number (its queue is num+1+index)")
    w.add_argument("--channel-fd", type=int, required=True, help="inherited socket to the control process")
    w.set_defaults(func=_cmd_worker)

    n = sub.add_parser("rules", help="print the iptables/ip6tables commands `run` installs")
    n.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML configuration")
    n.add_argument("--delete", action="store_true", help="print the commands that remove them instead")
    n.set_defaults(func=_cmd_rules)

    k = sub.add_parser("check", help="validate a configuration (exit 0: valid, 2: invalid)")
    k.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML configuration")
    k.add_argument("-q", "--quiet", action="store_true", help="no summary on success")
    k.set_defaults(func=_cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .gcpolicy import tune

    tune()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
