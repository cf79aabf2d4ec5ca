"""The live gateway's adapters without a kernel: rules, sinks, CLI (the queue adapter: test_nfqueue.py).

The end-to-end behaviour on real NFQUEUE is in tests/lab/test_gateway_live.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mproxy.cli import main
from mproxy.config import ConfigError, parse_config
from mproxy.io import netfilter
from mproxy.io.pcap import read_captures
from mproxy.io.sinks import EventLog, InterfaceSink, RotatingPcapSink, SinkError
from mproxy.wire.build import build_tcp
from mproxy.wire.packet import ACK

ROOT = Path(__file__).resolve().parents[2]


def tcp4(payload: bytes = b"x") -> bytes:
    return build_tcp(bytes([198, 18, 1, 2]), bytes([198, 18, 10, 2]), 40000, 80, 1, 1, ACK, payload=payload)


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
        # a later MPTCP packet of a connection whose conntrack entry lost the mark (or predates us)
        "iptables -w -t mangle -A MPROXY -i eth1 -m connmark '!' --mark 0x100/0x100 -p tcp -m tcp --tcp-flags SYN "
        "NONE --tcp-option 30 -m conntrack --ctdir ORIGINAL -j CONNMARK --set-xmark 0x100/0x100",
        "iptables -w -t mangle -A MPROXY -i eth2 -m connmark '!' --mark 0x100/0x100 -p tcp -m tcp --tcp-flags SYN "
        "NONE --tcp-option 30 -m conntrack --ctdir ORIGINAL -j CONNMARK --set-xmark 0x100/0x100",
        "iptables -w -t mangle -A MPROXY -m connmark --mark 0x100/0x100 -j NFQUEUE --queue-num 5",
        # no conntrack entry, so no connmark: a receiver may still read them (SACK past what it sent)
        "iptables -w -t mangle -A MPROXY -m conntrack --ctstate INVALID -j NFQUEUE --queue-num 5",
        "iptables -w -t mangle -I FORWARD 1 -p tcp -j MPROXY",
    ]
    off = parse_config('[rules]\nqueue_invalid = false\nipv6 = false\n')
    assert not any("INVALID" in c.argv for c in netfilter.install_commands(off))
    assert "INVALID" not in netfilter.render(off) and "INVALID" in netfilter.render(cfg)
    default = netfilter.install_commands(parse_config(""))
    assert sum(c.argv[0] == "ip6tables" for c in default) == 6
    # without in_interfaces, any interface and either direction
    assert "--ctdir" not in " ".join(" ".join(c.argv) for c in default)
    assert any("--queue-bypass" in c.argv for c in default)
    text = netfilter.render(parse_config(""), delete=True)
    assert "ip6tables -w -t mangle -X MPROXY 2>/dev/null || true" in text


@pytest.mark.parametrize("text,needle", [
    ('[rules]\ntable = "raw"', "[rules] table"),
    ('[rules]\ntable = "filter"\nhook = "PREROUTING"', "[rules] hook"),
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


def test_detach_deletes_only_the_jumps() -> None:
    calls: list[tuple[str, ...]] = []

    def runner(argv: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1 if len(calls) % 2 == 0 else 0, "", "")

    assert netfilter.Rules(parse_config(""), runner).detach() == []
    # per tool: the jump deleted until none is left; the chain and its NFQUEUE rules stay for the drain
    assert [c[0] for c in calls] == ["iptables", "iptables", "ip6tables", "ip6tables"]
    assert all(c[3:] == ("mangle", "-D", "FORWARD", "-p", "tcp", "-j", "MPROXY") for c in calls)


def test_rule_hits_are_read_per_queue_from_both_tools() -> None:
    # the form `iptables -S CHAIN -v` prints (nft and legacy backends alike)
    v4 = ("-N MPROXY\n"
          "-A MPROXY -p tcp -m tcp --tcp-flags SYN,ACK SYN --tcp-option 30 -c 7 420 -j CONNMARK --set-xmark 0x1/0x1\n"
          "-A MPROXY -m connmark --mark 0x1/0x1 -c 1200 900000 -j NFQUEUE --queue-num 3 --queue-bypass\n"
          "-A MPROXY -m connmark --mark 0x2/0x6 -c 5 300 -j NFQUEUE --queue-num 4\n")
    v6 = "-N MPROXY\n-A MPROXY -m connmark --mark 0x1/0x1 -c 30 4000 -j NFQUEUE --queue-num 3 --queue-bypass\n"
    assert netfilter.queue_hits_of(v4) == {3: 1200, 4: 5}
    assert netfilter.queue_hits_of("-A MPROXY -c x y -j NFQUEUE --queue-num 3\n-A MPROXY -j NFQUEUE\n") == {}

    def runner(argv: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        assert argv[1:] == ("-w", "-t", "mangle", "-S", "MPROXY", "-v")
        return subprocess.CompletedProcess(argv, 0, v4 if argv[0] == "iptables" else v6, "")

    assert netfilter.Rules(parse_config(""), runner).queue_hits() == {3: 1230, 4: 5}
    gone = netfilter.Rules(parse_config(""), lambda argv: subprocess.CompletedProcess(argv, 1, "", "No chain"))
    assert gone.queue_hits() is None  # no figure rather than a wrong one


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


def test_python_m_mproxy_run_refuses_too_many_workers(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text("[queue]\nworkers = 300\n")
    cp = subprocess.run([sys.executable, "-m", "mproxy", "run", "-c", str(cfg)], capture_output=True, text=True,
                        cwd=ROOT, timeout=60)
    assert cp.returncode == 2 and "[queue] workers" in cp.stderr and "Traceback" not in cp.stderr
