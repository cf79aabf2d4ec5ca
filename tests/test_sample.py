"""The shipped sample ``mproxy/samples/split-attack.pcap`` shows what mproxy is for.

Made by ``python -m mproxy.lab.make_sample`` from a real kernel MPTCP
connection: an SQL injection whose URI is split across two subflows.  tshark
(an independent reassembler) must find the attack string in no single TCP
stream of the input, and whole in one stream of ``mproxy replay``'s output,
where its HTTP dissector also reads the request URI whole.  No root needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mproxy.cli import main
from mproxy.lab.make_sample import ATTACK_NEEDLE, ATTACK_PART1, ATTACK_PART2, ATTACK_URI, BENIGN
from tests.oracles import tshark_available, tshark_count, tshark_fields, tshark_follow_raw

SAMPLE = Path(__file__).resolve().parents[1] / "mproxy" / "samples" / "split-attack.pcap"

pytestmark = pytest.mark.skipif(tshark_available() is not None, reason=tshark_available() or "")


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    out = tmp_path_factory.mktemp("sample")
    pcap, log = out / "out.pcap", out / "log.jsonl"
    assert main(["replay", str(SAMPLE), "--out", str(pcap), "--log", str(log), "-q"]) == 0
    return pcap, [json.loads(line) for line in log.read_text().splitlines()]


def test_sample_is_small_real_mptcp() -> None:
    assert SAMPLE.is_file() and SAMPLE.stat().st_size < 200_000
    assert tshark_count(SAMPLE, "mptcp") > 0
    assert tshark_count(SAMPLE, "tcp.options.mptcp.subtype == 1") >= 3, "no MP_JOIN handshake"


def test_input_hides_the_attack_from_per_subflow_reassembly() -> None:
    streams = tshark_follow_raw(SAMPLE)
    assert len(streams) >= 2
    for s in streams:
        assert ATTACK_NEEDLE not in s.client_data and b"UNION SELECT" not in s.client_data, s.four_tuple
    part1 = [s.stream for s in streams if ATTACK_PART1 in s.client_data]
    part2 = [s.stream for s in streams if ATTACK_PART2 in s.client_data]
    assert part1 and part2 and set(part1).isdisjoint(part2), (part1, part2)
    assert any(BENIGN in s.client_data for s in streams)
    uris = [row[0] for row in tshark_fields(SAMPLE, ["http.request.uri"], "http.request")]
    assert ATTACK_URI not in uris


def test_replay_shows_the_attack_whole(replayed: tuple[Path, list[dict[str, object]]]) -> None:
    pcap, records = replayed
    streams = tshark_follow_raw(pcap)
    assert len(streams) == 1, "one MPTCP connection -> one plain TCP conversation"
    (s,) = streams
    assert ATTACK_NEEDLE in s.client_data
    assert s.client_data.index(BENIGN) < s.client_data.index(ATTACK_NEEDLE)
    assert s.server_data.count(b"HTTP/1.1 200 OK") == 2
    uris = [row[0] for row in tshark_fields(pcap, ["http.request.uri"], "http.request")]
    assert uris == ["/index.html", ATTACK_URI]
    assert tshark_count(pcap, "mptcp") == 0
    (conn,) = [r for r in records if r["event"] == "mptcp_connection"]
    assert len(conn["subflows"]) == 2 and conn["outcome"] == "data_fin"  # type: ignore[arg-type]


@pytest.mark.lab
def test_make_sample_regenerates(tmp_path: Path) -> None:
    """The generator still produces a capture that passes its own tshark check (needs root)."""
    from mproxy.lab import lab_available
    from mproxy.lab.make_sample import check, make

    reason = lab_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "split.pcap"
    make(out, attempts=3)
    assert not check(out) and out.stat().st_size < 200_000


@pytest.mark.parametrize("emit", ["--emit-process", "--no-emit-process"])
def test_replay_rules_find_the_split_attack_where_tshark_reads_it(tmp_path: Path, emit: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``replay --rules``: the shipped rules, matched offline on the rebuilt stream, name the split
    attack once, at the offset where its pcre ends in the conversation tshark reassembles from the
    output (no single subflow holds it: test_input_hides_the_attack_from_per_subflow_reassembly)."""
    from mproxy.core.rules import load_rules

    pcap, log = tmp_path / "out.pcap", tmp_path / "log.jsonl"
    rules = Path(__file__).resolve().parents[1] / "config" / "mproxy.rules"
    assert main(["replay", str(SAMPLE), "--out", str(pcap), "--log", str(log), "--rules", str(rules), emit]) == 0
    assert "signature matches: 1 (sid 1000002 x1)" in capsys.readouterr().err
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    (sig,) = [r for r in recs if r["event"] == "signature"]
    (conn,) = [r for r in recs if r["event"] == "mptcp_connection"]
    assert (sig["conn_id"], sig["src"], sig["sport"], sig["dst"], sig["dport"]) == \
        (conn["conn_id"], conn["client"], conn["client_port"], conn["server"], conn["server_port"])
    assert sig["direction"] == "c2s" and sig["msg"] == "SQL injection UNION SELECT (URL-encoded)"
    (s,) = tshark_follow_raw(pcap)
    rule = next(r for r in load_rules(rules).rules if r.sid == 1000002)
    assert rule.pcre is not None
    m = rule.pcre.regex.search(s.client_data)
    assert m is not None and sig["stream_offset"] == m.end()
    assert recs.index(sig) < recs.index(conn)  # written when it matched, before the connection ended
    assert pcap.read_bytes() == _plain_replay(tmp_path)  # matching changes nothing in the emitted stream


def _plain_replay(tmp_path: Path) -> bytes:
    out = tmp_path / "plain.pcap"
    assert main(["replay", str(SAMPLE), "--out", str(out), "-q"]) == 0
    return out.read_bytes()


def test_replay_rules_that_do_not_load_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.rules"
    bad.write_text('alert tcp any any -> any any (content:"a"; isdataat:1; sid:1;)\n')
    assert main(["replay", str(SAMPLE), "--out", str(tmp_path / "o.pcap"), "--rules", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"rules error: {bad}:1: option 'isdataat'" in err and "Traceback" not in err


def test_replay_demo_tells_the_story(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``make replay-demo``: per subflow the attack is nowhere; rebuilt, it is whole and the shipped rules name it."""
    from mproxy.demo import main as demo

    assert demo(["--out", str(tmp_path / "demo.pcap")]) == 0
    out = capsys.readouterr().out
    before, after = out.split("== mproxy replay", 1)
    assert "does NOT contain UNION+SELECT" in before and ", contains UNION+SELECT" not in before
    assert ", contains UNION+SELECT" in after and 'sid 1000002 "SQL injection UNION SELECT (URL-encoded)"' in after


def test_replay_rules_skip_bad_ones_when_the_config_says_so(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rules = Path(__file__).resolve().parents[1] / "config" / "mproxy.rules"
    mixed = tmp_path / "mixed.rules"
    mixed.write_text(rules.read_text() + 'alert tcp any any -> any any (msg:"uri"; content:"x"; http_uri; sid:9;)\n')
    conf = tmp_path / "m.toml"
    conf.write_text("[inspector]\nskip_bad_rules = true\n")
    out = str(tmp_path / "o.pcap")
    assert main(["replay", str(SAMPLE), "--out", out, "--rules", str(mixed)]) == 2
    assert "option 'http_uri'" in capsys.readouterr().err
    assert main(["replay", str(SAMPLE), "--out", out, "--rules", str(mixed), "-c", str(conf)]) == 0
    err = capsys.readouterr().err
    assert f"rule skipped: {mixed}:" in err and "signature matches: 1 (sid 1000002 x1)" in err


def test_replay_reports_a_pcre_that_runs_out_of_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pcre with nested repeats backtracks for ages on the request's first line (62 characters, no
    "Agent" in it) before it would match in the User-Agent line; the replay stops it at
    [inspector] pcre_budget_ms, says so, and writes a pcre_limit notice naming rule and connection."""
    rules = tmp_path / "evil.rules"
    rules.write_text('alert tcp any any -> any any (msg:"slow"; content:"GET"; pcre:"/(?:.|.)+Agent/"; sid:7;)\n')
    conf = tmp_path / "m.toml"
    conf.write_text("[inspector]\npcre_budget_ms = 5\n")
    log = tmp_path / "log.jsonl"
    assert main(["replay", str(SAMPLE), "--out", str(tmp_path / "o.pcap"), "--log", str(log), "--rules", str(rules),
                 "-c", str(conf)]) == 0
    err = capsys.readouterr().err
    assert "signature matches: 0" in err and "pcre searches out of time: " in err
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    (lim,) = [r for r in recs if r["event"] == "notice" and r["type"] == "pcre_limit"]
    (conn,) = [r for r in recs if r["event"] == "mptcp_connection"]
    assert (lim["sid"], lim["direction"], lim["conn_id"]) == (7, "c2s", conn["conn_id"])
    assert "pcre not decided within the time budget" in lim["detail"]
    assert (tmp_path / "o.pcap").read_bytes() == _plain_replay(tmp_path)
