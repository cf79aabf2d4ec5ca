"""``make demo`` (python -m mproxy.demo_live): runs end to end, and Ctrl-C midway leaves nothing behind."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mproxy.lab.topology import lab_available

_ROOT = Path(__file__).resolve().parents[2]
LAB_REASON = lab_available()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")]


def _start(tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "mproxy.demo_live", "--keep", str(tmp_path / "demo")],
                            cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(_ROOT)), start_new_session=True)


def _netns() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


def test_demo_shows_the_attack_stopped(tmp_path: Path) -> None:
    p = _start(tmp_path)
    out, err = p.communicate(timeout=90)
    text = out.decode()
    assert p.returncode == 0, text + err.decode()
    for needle in ("grouped 2 subflows", "signature hit on the rebuilt stream: sid 1000002",
                   "never received UNION+SELECT", "client received 2 RST+MP_FASTCLOSE",
                   "server received 2 RST+MP_FASTCLOSE", 'mproxy_fastcloses_total 1.0', "contains UNION+SELECT"):
        assert needle in text, text
    prefix = re.search(r"namespaces (mpx-\d+-[0-9a-f]{4})-cli", text)
    assert prefix and not [n for n in _netns() if n.startswith(prefix.group(1))]


def test_demo_interrupted_midway_tears_everything_down(tmp_path: Path) -> None:
    p = _start(tmp_path)
    assert p.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + 60
    while b"== attack" not in buf:
        assert time.monotonic() < deadline and p.poll() is None, buf.decode()
        if sel.select(1):
            buf += os.read(p.stdout.fileno(), 4096)
    prefix = re.search(rb"namespaces (mpx-\d+-[0-9a-f]{4})-cli", buf)
    assert prefix
    ns = prefix.group(1).decode()
    assert [n for n in _netns() if n.startswith(ns)], "the lab should be up while the demo runs"
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out + err).decode()
    assert b"interrupted; lab torn down" in err
    assert b"Traceback" not in err, err.decode()
    assert not [n for n in _netns() if n.startswith(ns)], _netns()
    left = subprocess.run(["pgrep", "-f", f"mproxy run -c {tmp_path}"], capture_output=True, text=True).stdout
    assert not left.strip(), left
    # the host's own firewall was never touched
    assert "MPROXY" not in subprocess.run(["iptables", "-w", "-t", "mangle", "-S"], capture_output=True,
                                          text=True).stdout
