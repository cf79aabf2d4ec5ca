"""``mproxy run`` in a lab's gateway namespace: started, waited for, stopped.

The live demo, the inline benchmark and the live tests all run the real
command the way an operator does (its own process, a config file, stderr to a
file) and need the same three things: start it inside the gateway namespace,
know when its queue is bound (it logs ``ready:``), and stop it the way
systemd does (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MproxyStartError", "start_mproxy", "stop_mproxy"]

READY = "ready:"
_ROOT = Path(__file__).resolve().parents[2]


class MproxyStartError(RuntimeError):
    """``mproxy run`` exited or did not get ready in time; the message holds its stderr."""


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def start_mproxy(lab: Any, config: Path, err: Path, *, timeout: float = 20.0, launcher: Sequence[str] = (),
                 inside: Sequence[str] = (), **popen: Any) -> subprocess.Popen[bytes]:
    """``mproxy run -c CONFIG`` in ``lab``'s gateway namespace, stderr appended to ``err``; returns once
    it logged ``ready:`` (a restart appends to the same file: only a new ready line counts).

    ``launcher``: an argv prefix outside the namespace (``unshare ...``); ``inside``: one inside it
    (``setpriv ...``); ``popen``: more Popen arguments (``start_new_session`` ...). The lab kills the
    process at teardown if nobody stopped it.
    """
    before = _text(err).count(READY)
    popen.setdefault("env", dict(os.environ, PYTHONPATH=str(_ROOT)))
    argv = [*launcher, "ip", "netns", "exec", lab.ns_gw, *inside, sys.executable, "-m", "mproxy", "run",
            "-c", str(config)]
    with open(err, "ab") as f:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=f, **popen)
    lab._procs.append(proc)
    deadline = time.monotonic() + timeout
    while _text(err).count(READY) <= before:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise MproxyStartError(f"mproxy did not start (exit {proc.poll()}):\n{_text(err)}")
        time.sleep(0.05)
    return proc


def stop_mproxy(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM (a clean stop: rules removed, queue drained, records written), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)
