"""The control process of a multi-worker gateway, without a kernel: channels are socketpairs.

The live behaviour (real queues, real MPTCP, a killed worker) is in
tests/lab/test_workers_live.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mproxy import crypto
from mproxy.config import parse_config
from mproxy.core.steering import worker_bits
from mproxy.io.netfilter import install_commands, render
from mproxy.service import _TOKEN
from mproxy.workers import Controller, _control_registry, merge_expositions, worker_config

from .core.session import Session
from .io.test_metrics import full_exposition

CFG = parse_config('[queue]\nnum = 5\nworkers = 3\n[sink]\npcap = "/var/lib/mproxy/sink"\n'
                   '[metrics]\nlisten = "127.0.0.1:9464"')


def test_worker_config_owns_one_queue_and_nothing_shared() -> None:
    w = worker_config(CFG, 2)
    assert (w.queue.num, w.queue.workers, w.rules.manage, w.metrics.listen) == (8, 1, False, "")
    assert w.sink.pcap == "/var/lib/mproxy/sink.w2"
    assert w.log.events == CFG.log.events and w.policy == CFG.policy
    assert worker_config(parse_config("[queue]\nworkers = 2"), 0).sink.pcap == ""


def test_rules_send_first_syns_to_control_and_the_rest_to_the_worker() -> None:
    cmds = [c.argv for c in install_commands(CFG) if c.argv[0] == "iptables"]
    text = [" ".join(a) for a in cmds]
    control = [t for t in text if "--queue-num 5 " in t + " "]
    first, later, invalid = control
    assert "--tcp-option 30" in first and "--mark 0/0xff0000" in first
    # a later MPTCP packet of a connection whose conntrack entry lost its worker bits
    assert "--tcp-flags SYN NONE --tcp-option 30" in later and "connmark --mark 0/0xff0000" in later
    # INVALID packets (no conntrack entry, no saved bits) go to the control, which repeats them marked
    assert "--ctstate INVALID" in invalid and "--mark 0/0xff0000" in invalid
    for w in range(3):
        repeated, rule = [t for t in text if f"--queue-num {6 + w}" in t]
        bits = f"0x{worker_bits(w, 0xFF0000):x}/0xff0000"
        assert f"connmark --mark {bits}" in rule
        assert f"--ctstate INVALID -m mark --mark {bits}" in repeated
        # queued before the CONNMARK rules, which cannot save a mark without a conntrack entry
        assert text.index(repeated) < min(i for i, t in enumerate(text) if "-j CONNMARK" in t)
    assert any("--save-mark --nfmask 0xff0000 --ctmask 0xff0000" in t for t in text)
    assert "NFQUEUE 6..8" in render(CFG) and "INVALID go to the control queue" in render(CFG)


def controller_with_channels() -> tuple[Controller, list[socket.socket]]:
    ctl = Controller(CFG, "x.toml")
    peers = []
    for w in ctl.workers:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mine.setblocking(False)
        w.channel, w.ready = mine, True
        peers.append(theirs)
    return ctl, peers


def test_a_join_racing_its_announcement_still_reaches_its_worker() -> None:
    """The announcement is in the channel but not read when the join SYN is steered: the control
    reads its channels before falling back to the hash."""
    ctl, peers = controller_with_channels()
    sess = Session(1)
    syn = sess.handshake()[0]
    first = ctl._steer(syn, 1.0)
    owner = (first.mark >> 16) - 1
    tok = crypto.key_token(sess.sk, 1)
    peers[owner].send(b"T" + _TOKEN.pack(tok, True))  # sent before the SYN/ACK's verdict
    d = ctl._steer(sess.join(1)[0], 1.0)
    assert d.reason == "join" and d.mark == worker_bits(owner, 0xFF0000)
    assert ctl.stats.announcements == 1
    for p in peers:
        p.close()


def test_channel_garbage_is_counted_and_end_of_file_means_gone() -> None:
    ctl, peers = controller_with_channels()
    w = ctl.workers[1]
    for junk in (b"T\x00\x00", b"?", b"M\x00", b"T" + _TOKEN.pack(9, True)):
        peers[1].send(junk)
    assert ctl._read_channel(w) is True
    assert ctl.stats.bad_messages == 3 and ctl.steering.tokens == {9: 1}
    peers[1].close()
    assert ctl._read_channel(w) is False
    ctl._lost(w)  # no process behind it here: only the bookkeeping
    assert w.channel is None and ctl.steering.tokens == {} and w.restart_at > 0 and ctl.stats.worker_exits == 1
    for p in peers:
        p.close()


def test_merged_exposition_labels_every_worker_and_passes_promtool() -> None:
    from prometheus_client import generate_latest

    one = full_exposition().encode()
    ctl, peers = controller_with_channels()
    text = (generate_latest(_control_registry(ctl)) + merge_expositions({0: one, 1: one})).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["mproxy_steering_syns"].type == "counter" and fams["mproxy_workers"].samples[0].value == 3
    rebuilt = fams["mproxy_rebuilt_bytes"]
    assert {s.labels["worker"] for s in rebuilt.samples} == {"0", "1"}
    hist = fams["mproxy_verdict_latency_seconds"]
    assert hist.type == "histogram" and {s.labels["worker"] for s in hist.samples} == {"0", "1"}
    assert len([f for f in text.splitlines() if f.startswith("# TYPE mproxy_rebuilt_bytes_total")]) == 1
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    for p in peers:
        p.close()


@pytest.mark.parametrize("bad", [b"", b"not prometheus {{{", b"\xff\xfe# TYPE x counter\nx_total{a=} 1"])
def test_a_worker_with_unreadable_metrics_is_left_out(bad: bytes) -> None:
    out = merge_expositions({0: full_exposition().encode(), 1: bad})
    assert b'worker="0"' in out and b'worker="1"' not in out
