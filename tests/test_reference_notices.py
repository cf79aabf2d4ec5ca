"""No false alarms: the public reference captures and our shipped sample raise no notice.

The one exception is ``mptcp-dss-oobr.pcap``: tcpdump's regression capture for an
out-of-bounds read, whose DSS option really is malformed (length 3) -- exactly one
``invalid_option`` there is the right answer. The lab's kernel traffic is checked the
same way in tests/lab/test_replay_lab.py (and live in tests/lab/test_gateway_live.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mproxy.cli import main

ROOT = Path(__file__).resolve().parents[1]
CAPTURES = ROOT.parent / "shared" / "captures"
EXPECTED = {"mptcp-dss-oobr.pcap": ["invalid_option"]}  # deliberately malformed
REFERENCE = sorted(p.name for p in CAPTURES.glob("*.pcap")) if CAPTURES.is_dir() else []


def _notices(cap: Path, tmp_path: Path) -> tuple[list[dict], dict[str, float]]:
    log, prom = tmp_path / "log.jsonl", tmp_path / "m.prom"
    assert main(["replay", str(cap), "--out", str(tmp_path / "out.pcap"), "--log", str(log), "--metrics", str(prom),
                 "-q"]) == 0
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    counted = {s.labels["type"]: s.value for fam in text_string_to_metric_families(prom.read_text())
               for s in fam.samples if s.name == "mproxy_notices_total"}
    return [r for r in recs if r["event"] == "notice"], counted


@pytest.mark.skipif(not REFERENCE, reason=f"reference captures not found in {CAPTURES}")
@pytest.mark.parametrize("name", REFERENCE)
def test_reference_capture_raises_no_notice(name: str, tmp_path: Path) -> None:
    notices, counted = _notices(CAPTURES / name, tmp_path)
    want = EXPECTED.get(name, [])
    assert [n["type"] for n in notices] == want, notices
    assert sum(counted.values()) == len(want)


def test_shipped_sample_raises_no_notice(tmp_path: Path) -> None:
    notices, _ = _notices(ROOT / "mproxy" / "samples" / "split-attack.pcap", tmp_path)
    assert not notices, notices


@pytest.mark.skipif(not (CAPTURES / "v0-client-4subflows.pcap").is_file(),
                    reason=f"reference captures not found in {CAPTURES}")
@pytest.mark.parametrize("name,frame", [("v0-client-4subflows.pcap", 233), ("v0-client-4subflows.pcap", 980),
                                        ("v0-server-4subflows.pcap", 1401)])
def test_a_packet_the_capture_lost_is_a_capture_gap_not_a_side_channel(name: str, frame: int,
                                                                       tmp_path: Path) -> None:
    """A real capture with one data packet taken out, as tcpdump loses packets under load: the peer
    acknowledged its bytes on the subflow that carried it, so they crossed the capture point, and
    the gap is a capture_gap, not a side_channel (a security alert, on which on_side_channel acts).
    Until now every packet a capture lost read as a side channel."""
    from mproxy.io.pcap import PcapWriter, read_captures

    frames = list(read_captures([str(CAPTURES / name)]))
    cut = tmp_path / "lost.pcap"
    with cut.open("wb") as f:
        w = PcapWriter(f, frames[0].linktype)
        w.write_frames([(fr.ts, bytes(fr.data)) for i, fr in enumerate(frames) if i != frame])
        w.flush()
    notices, counted = _notices(cut, tmp_path)
    assert [n["type"] for n in notices] == ["capture_gap"], notices
    assert "sent on a subflow the gateway sees" in notices[0]["detail"]
    assert counted.get("side_channel", 0) == 0 and counted["capture_gap"] == 1
