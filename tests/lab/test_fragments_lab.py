"""IP fragments made by the kernel: ``mproxy replay`` of a capture taken behind a link with a
smaller MTU, where every full client-to-server packet of both subflows is a pair of fragments.

Ground truth is what the applications sent (SHA-256); tshark reassembles the
capture's fragments itself (its own IP reassembly, an independent oracle) and
reads the emitted stream back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mproxy.cli import main
from mproxy.lab.scenarios import ScenarioResult
from tests.oracles import tshark_count, tshark_follow_raw

from .conftest import LAB_REASON

pytestmark = [pytest.mark.lab, pytest.mark.skipif(LAB_REASON is not None, reason=LAB_REASON or "")]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_replay_reassembles_ip_fragments_the_kernel_made(scenario: Callable[[str], ScenarioResult],
                                                           tmp_path: Path) -> None:
    res = scenario("fragments")
    assert res.ok, "\n".join(res.problems())
    assert res.capture_drops == 0
    (c,) = res.connections
    assert c.mptcp and len(c.subflows) >= 2
    first = tshark_count(res.capture, "ip.flags.mf == 1 && ip.frag_offset == 0")
    later = tshark_count(res.capture, "ip.frag_offset > 0")
    assert first > 500 and later == first, (first, later)  # the data really crossed as fragments
    out, log, prom = tmp_path / "out.pcap", tmp_path / "log.jsonl", tmp_path / "metrics.prom"
    assert main(["replay", str(res.capture), "--out", str(out), "--log", str(log), "--metrics", str(prom), "-q"]) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    (rec,) = [r for r in records if r["event"] == "mptcp_connection"]
    assert rec["outcome"] == "data_fin" and len(rec["subflows"]) >= 2
    assert (rec["c2s"]["bytes"], rec["c2s"]["sha256"]) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
    assert (rec["s2c"]["bytes"], rec["s2c"]["sha256"]) == (c.s2c_sent_bytes, c.s2c_sent_sha256)
    assert rec["c2s"]["gap_bytes"] == 0
    assert not [r for r in records if r["event"] == "notice"]
    (f,) = tshark_follow_raw(out)
    assert (len(f.client_data), sha(f.client_data)) == (c.c2s_sent_bytes, c.c2s_sent_sha256)
    assert (len(f.server_data), sha(f.server_data)) == (c.s2c_sent_bytes, c.s2c_sent_sha256)
    text = prom.read_text()
    assert f"mproxy_ip_fragments_total {float(first + later)}" in text
    assert f"mproxy_ip_reassembled_total {float(first)}" in text
