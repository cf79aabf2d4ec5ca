"""``mproxy run`` as an unprivileged user holding only CAP_NET_ADMIN and CAP_NET_RAW (what
deploy/mproxy.service grants), end to end; its metrics listen on loopback only; no MPTCP key
reaches its event log or its (debug-level) stderr -- and with ``[log] log_keys = true`` they do.

The user is ``nobody`` (setpriv drops everything else, bounding set included, no_new_privs).
When the interpreter lives under a directory ``nobody`` cannot enter (pyenv in /root), the
process gets a private mount namespace in which that directory is a world-readable tmpfs holding
only a bind mount of the interpreter tree: nothing changes on the host.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mproxy.lab.topology import lab_available
from tests.lab.livehelp import Mproxy, env, open_lab, transfer

LAB_REASON = lab_available()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")]

CAPS = "-all,+net_admin,+net_raw"
SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", f"--inh-caps={CAPS}",
           f"--ambient-caps={CAPS}", f"--bounding-set={CAPS}", "--no-new-privs"]


def launcher() -> list[str]:
    """Outside the namespace: a private mount namespace exposing a /root-hidden interpreter."""
    real = Path(os.path.realpath(sys.executable))
    if not str(real).startswith("/root/"):
        return []
    top = "/root/" + real.parts[2]
    script = (f'set -e; b=$(mktemp -d); mount --bind {top} "$b"; mount -t tmpfs -o mode=755,size=1m tmpfs /root; '
              f'mkdir {top}; mount --move "$b" {top}; exec "$@"')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    yield from open_lab()


def test_unprivileged_run_loopback_metrics_and_no_keys_in_logs(lab: Any, tmp_path: Path) -> None:
    from tests.test_exposure import assert_no_key, keys_in_capture

    # a preflight: can nobody run our interpreter and import the project at all?
    pre = subprocess.run([*launcher(), "ip", "netns", "exec", lab.ns_gw, *SETPRIV, sys.executable, "-c",
                          "import os, mproxy, netfilterqueue, uvloop; print(os.getuid())"],
                         capture_output=True, text=True, env=env(), timeout=30)
    if pre.returncode != 0:
        pytest.skip(f"the project is not readable by nobody here: {pre.stderr.strip()[-300:]}")
    assert pre.stdout.strip() == str(pwd.getpwnam("nobody").pw_uid)
    d = Path(tempfile.mkdtemp(prefix="mproxy-nobody-"))  # pytest's tmp_path is root-only
    try:
        os.chmod(d, 0o755)
        nobody = pwd.getpwnam("nobody")
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
        mp = Mproxy(lab, d, metrics="127.0.0.1:9464", launcher=launcher(), inside=SETPRIV).start()
        try:
            assert mp.proc is not None
            status = Path(f"/proc/{mp.proc.pid}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            assert fields["Uid"].split()[0] == str(nobody.pw_uid)
            for cap in ("CapEff", "CapPrm", "CapBnd"):
                assert int(fields[cap], 16) == (1 << 12) | (1 << 13), (cap, fields[cap])  # NET_ADMIN, NET_RAW
            listening = lab.run(lab.ns_gw, "ss", "-ltnH").stdout
            res = transfer(lab, tmp_path, "nobody", c2s_bytes=300_000, s2c_bytes=300_000)
            m = mp.scrape()
        finally:
            rc = mp.stop()
        assert rc == 0 and "Traceback" not in mp.err, mp.err
        # it worked: rules in and out (as nobody), the stream rebuilt
        (c,) = res.connections
        (rec,) = [r for r in mp.connections() if r["client_port"] == c.client_port]
        assert (rec["c2s"]["bytes"], rec["c2s"]["sha256"]) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
        assert m[("mproxy_rebuilt_bytes_total", (("direction", "client_to_server"),))] > 0
        assert "MPROXY" not in lab.run(lab.ns_gw, "iptables", "-w", "-t", "mangle", "-S").stdout
        # metrics: loopback only
        ports = [line.split()[3] for line in listening.splitlines() if line.split()[3].endswith(":9464")]
        assert ports == ["127.0.0.1:9464"], listening
        # no key in anything it wrote (event log, debug stderr, the sink's pcap is not a log)
        keys = keys_in_capture(res.capture)
        assert len(keys) >= 2
        assert_no_key((d / "events.jsonl").read_text(), keys)
        assert_no_key(mp.err, keys)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    # and the opt-in: [log] log_keys = true puts them in the connection record
    wk = Mproxy(lab, tmp_path / "with-keys", log_extra="log_keys = true").start()
    try:
        res2 = transfer(lab, tmp_path, "keys", c2s_bytes=50_000, s2c_bytes=50_000)
    finally:
        assert wk.stop() == 0
    (c2,) = res2.connections
    (rec2,) = [r for r in wk.connections() if r["client_port"] == c2.client_port]
    assert {rec2["client_key"], rec2["server_key"]} <= keys_in_capture(res2.capture)
