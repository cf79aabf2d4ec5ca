"""The live gateway's adapters without a kernel: verdict logic, netlink message, rules, sinks, CLI.

The end-to-end behaviour on real NFQUEUE is in tests/lab/test_gateway_live.py.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mproxy.cli import main
from mproxy.config import ConfigError, parse_config
from mproxy.core.gateway import Decision, Gateway, Verdict
from mproxy.io import netfilter
from mproxy.io.nfqueue import (
    FailMode,
    Latency,
    QueueAdapter,
    QueueStats,
    _BudgetSocket,
    _claimed_length,
    fail_open_message,
)
from mproxy.io.pcap import read_captures
from mproxy.io.sinks import EventLog, InterfaceSink, RotatingPcapSink, SinkError
from mproxy.wire.build import build_tcp
from mproxy.wire.packet import ACK

from ..core.session import Session

ROOT = Path(__file__).resolve().parents[2]


class FakePacket:
    def __init__(self, payload: bytes, *, fail_verdict: bool = False) -> None:
        self.payload = payload
        self.indev = 0
        self.verdict: str | None = None
        self.new_payload: bytes | None = None
        self.fail_verdict = fail_verdict

    def get_payload(self) -> bytes:
        return self.payload

    def set_payload(self, p: bytes) -> None:
        self.new_payload = p

    def accept(self) -> None:
        if self.fail_verdict:
            raise RuntimeError("Parent queue has already been unbound")
        assert self.verdict is None
        self.verdict = "accept"

    def drop(self) -> None:
        assert self.verdict is None
        self.verdict = "drop"


def tcp4(payload: bytes = b"x") -> bytes:
    return build_tcp(bytes([198, 18, 1, 2]), bytes([198, 18, 10, 2]), 40000, 80, 1, 1, ACK, payload=payload)


# --------------------------------------------------------------------------- nfqueue adapter
def test_fail_open_message_layout() -> None:
    msg = fail_open_message(0x1234, True)
    ln, mtype, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert ln == len(msg) == 36 and mtype == (3 << 8) | 2 and flags == 0x1 | 0x4 and pid == 0
    family, version, res_id = struct.unpack_from("!BBH", msg, 16)
    assert (family, version, res_id) == (socket.AF_UNSPEC, 0, 0x1234)
    # NFQA_CFG_MASK then NFQA_CFG_FLAGS, each a big-endian u32 holding NFQA_CFG_F_FAIL_OPEN
    assert struct.unpack_from("=HH", msg, 20) == (8, 4)
    assert msg[24:28] == b"\0\0\0\1" and struct.unpack_from("=HH", msg, 28) == (8, 5) and msg[32:36] == b"\0\0\0\1"
    assert fail_open_message(0, False, ack=False)[32:36] == b"\0\0\0\0"
    assert struct.unpack_from("=H", fail_open_message(0, False, ack=False), 6)[0] == 0x1


def test_adapter_issues_the_core_verdicts_and_emits_after() -> None:
    s = Session(1)
    from mproxy.core.policy import Action, Policy

    gw = Gateway(Policy(default=Action.DOWNGRADE))
    out: list[list[tuple[float, bytes]]] = []
    qa = QueueAdapter(0, gw.packet, emit=out.append)
    syn = FakePacket(s.handshake()[0])
    qa._on_packet(syn)
    assert syn.verdict == "accept" and syn.new_payload is not None and syn.new_payload != syn.payload
    assert qa.stats.modified == 1 and qa.latency.n == 1

    gw2 = Gateway()
    qa2 = QueueAdapter(0, gw2.packet, emit=out.append)
    for p in Session(1).handshake():
        qa2._on_packet(FakePacket(p))
    assert qa2.stats.accepted == 3 and out, "the emitted handshake goes to the sink"


@pytest.mark.parametrize("fail,verdict", [(FailMode.OPEN, "accept"), (FailMode.CLOSED, "drop")])
def test_core_exception_gets_fail_mode_verdict_logged_once(fail: FailMode, verdict: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def boom(data: bytes, ts: float) -> Decision:
        raise ValueError("core bug")

    qa = QueueAdapter(0, boom, fail=fail)
    pkts = [FakePacket(tcp4()) for _ in range(3)]
    with caplog.at_level(logging.DEBUG, logger="mproxy.nfqueue"):
        for p in pkts:
            qa._on_packet(p)
    assert [p.verdict for p in pkts] == [verdict] * 3
    assert qa.stats.core_errors == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "core raised" in warnings[0].getMessage()
    assert any("ValueError: core bug" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


@pytest.mark.parametrize("fail,verdict", [(FailMode.OPEN, "accept"), (FailMode.CLOSED, "drop")])
def test_truncated_copy_is_not_parsed(fail: FailMode, verdict: str, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[bytes] = []

    def core(data: bytes, ts: float) -> Decision:
        seen.append(data)
        return Decision(Verdict.ACCEPT)

    qa = QueueAdapter(0, core, fail=fail)
    full = tcp4(b"y" * 3000)
    cut = FakePacket(full[:2000])
    with caplog.at_level(logging.WARNING, logger="mproxy.nfqueue"):
        qa._on_packet(cut)
        qa._on_packet(FakePacket(full[:1000]))
    assert cut.verdict == verdict and not seen and qa.stats.truncated == 2
    (w,) = caplog.records
    assert "2000 of 3040 bytes" in w.getMessage() and "MTU" in w.getMessage()
    assert _claimed_length(full) == len(full)
    six = build_tcp(bytes(15) + b"\1", bytes(15) + b"\2", 1, 2, 0, payload=b"abc")
    assert _claimed_length(six) == len(six) and _claimed_length(b"\x45") == 0


def test_verdict_failure_is_counted_not_raised() -> None:
    qa = QueueAdapter(0, lambda d, t: Decision(Verdict.ACCEPT))
    qa._on_packet(FakePacket(tcp4(), fail_verdict=True))
    assert qa.stats.verdict_errors == 1


def test_budget_socket_ends_a_batch() -> None:
    class Sock:
        def recv(self, size: int, flags: int = 0) -> bytes:
            return b"m"

    st = QueueStats()
    b = _BudgetSocket(Sock(), 3, st)  # type: ignore[arg-type]
    assert [b.recv(10) for _ in range(3)] == [b"m"] * 3
    with pytest.raises(BlockingIOError) as e:
        b.recv(10)
    assert e.value.args[0] == errno.EAGAIN and st.full_batches == 1


def test_latency_summary() -> None:
    lat = Latency(size=100)
    assert lat.summary() == {"count": 0}
    for i in range(1, 1001):
        lat.add(i * 1000)
    s = lat.summary()
    assert s["count"] == 1000 and s["max"] == 1000.0 and 900 <= s["p50"] <= 1000  # ring keeps the last 100


# --------------------------------------------------------------------------- netfilter rules
def test_rules_only_queue_marked_connections() -> None:
    cfg = parse_config('[queue]\nnum = 5\nfail = "closed"\n[rules]\nin_interfaces = ["eth1", "eth2"]\n'
                       'ipv6 = false\nconnmark = 0x100\n')
    cmds = [c.shell() for c in netfilter.install_commands(cfg)]
    assert cmds == [
        "iptables -w -t mangle -N MPROXY",
        "iptables -w -t mangle -A MPROXY -i eth1 -p tcp -m tcp --tcp-flags SYN,ACK SYN --tcp-option 30 "
        "-j CONNMARK --set-xmark 0x100/0x100",
        "iptables -w -t mangle -A MPROXY -i eth2 -p tcp -m tcp --tcp-flags SYN,ACK SYN --tcp-option 30 "
        "-j CONNMARK --set-xmark 0x100/0x100",
        "iptables -w -t mangle -A MPROXY -m connmark --mark 0x100/0x100 -j NFQUEUE --queue-num 5",
        "iptables -w -t mangle -I FORWARD 1 -p tcp -j MPROXY",
    ]
    default = netfilter.install_commands(parse_config(""))
    assert sum(c.argv[0] == "ip6tables" for c in default) == 4
    assert any("--queue-bypass" in c.argv for c in default)
    text = netfilter.render(parse_config(""), delete=True)
    assert "ip6tables -w -t mangle -X MPROXY 2>/dev/null || true" in text


@pytest.mark.parametrize("text,needle", [
    ('[rules]\ntable = "raw"', "[rules] table"),
    ('[rules]\ntable = "filter"\nhook = "PREROUTING"', "[rules] hook"),
    ("[queue]\nworkers = 2", "[queue] workers"),
    ('[rules]\nin_interfaces = ["a b"]', "[rules] in_interfaces"),
])
def test_live_config_checks_name_the_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        netfilter.validate(parse_config(text))
    assert needle in str(e.value)


def test_rules_install_clears_leftovers_and_rolls_back() -> None:
    calls: list[tuple[str, ...]] = []

    def runner(argv: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        bad = "NFQUEUE" in argv and "ip6tables" in argv[0]
        return subprocess.CompletedProcess(argv, 1 if bad or "-D" in argv else 0, "", "no NFQUEUE" if bad else "")

    r = netfilter.Rules(parse_config(""), runner)
    with pytest.raises(netfilter.RulesError, match="no NFQUEUE"):
        r.install()
    assert calls[0][3:] == ("mangle", "-D", "FORWARD", "-p", "tcp", "-j", "MPROXY")  # stale jump removed first
    assert calls[-1][-2:] == ("-X", "MPROXY") and not r.installed  # and everything rolled back


# --------------------------------------------------------------------------- sinks
def test_rotating_pcap(tmp_path: Path) -> None:
    prefix = str(tmp_path / "out")
    sink = RotatingPcapSink(prefix, rotate_bytes=5000, keep=2)
    frame = b"\2" * 12 + b"\x08\x00" + tcp4(b"z" * 1000)[:1000]
    for i in range(12):
        sink.write([(1000.0 + i, frame)])
    sink.close()
    files = sorted(tmp_path.glob("out.*.pcap"), key=lambda p: int(p.name.split(".")[1]))
    assert [p.name for p in files] == ["out.1.pcap", "out.2.pcap"] and sink.files == 3  # 5 + 5 + 2 frames
    assert sum(1 for _ in read_captures([str(files[0])])) == 5
    again = RotatingPcapSink(prefix, keep=2)  # a restart continues the numbering
    again.close()
    assert again.path.endswith("out.3.pcap")


def test_event_log_reopen_and_key_filter(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    log = EventLog(str(path))
    log.write([{"event": "notice", "client_key": 5, "x": 1}])
    path.rename(tmp_path / "ev.1.jsonl")
    log.reopen()
    log.write([{"event": "notice", "x": 2}])
    log.close()
    assert json.loads((tmp_path / "ev.1.jsonl").read_text()) == {"event": "notice", "x": 1}
    assert json.loads(path.read_text()) == {"event": "notice", "x": 2}


def test_interface_sink_names_the_problem() -> None:
    with pytest.raises(SinkError, match=r"\[sink\] interface: no interface named 'nope0'"):
        InterfaceSink("nope0")


# --------------------------------------------------------------------------- CLI
def test_cli_check_rules_and_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = str(ROOT / "config" / "mproxy.toml")
    assert main(["check", "-c", good]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["rules", "-c", good]) == 0
    out = capsys.readouterr().out
    assert "-j NFQUEUE --queue-num 0 --queue-bypass" in out and "ip6tables" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue]\nfail = 'sideways'\n")
    for cmd in ("check", "rules", "run"):
        assert main([cmd, "-c", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "config error: [queue] fail" in err and "Traceback" not in err


def test_python_m_mproxy_run_refuses_workers(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text("[queue]\nworkers = 4\n")
    cp = subprocess.run([sys.executable, "-m", "mproxy", "run", "-c", str(cfg)], capture_output=True, text=True,
                        cwd=ROOT, timeout=60)
    assert cp.returncode == 2 and "[queue] workers" in cp.stderr and "Traceback" not in cp.stderr
