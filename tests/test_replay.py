"""``mproxy replay`` on the reference captures, read back with tshark as the independent oracle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mproxy.cli import main

from .oracles import tshark_available, tshark_count, tshark_follow_raw

CAPTURES = Path(__file__).resolve().parents[1].parent / "shared" / "captures"
needs_captures = pytest.mark.skipif(not CAPTURES.is_dir(), reason=f"reference captures not found at {CAPTURES}")
needs_tshark = pytest.mark.skipif(tshark_available() is not None, reason=str(tshark_available()))


def replay(tmp_path: Path, *names: str, tag: str = "out") -> tuple[Path, list[dict]]:
    out = tmp_path / f"{tag}.pcap"
    log = tmp_path / f"{tag}.jsonl"
    rc = main(["replay", *(str(CAPTURES / n) for n in names), "--out", str(out), "--log", str(log), "-q"])
    assert rc == 0
    return out, [json.loads(line) for line in log.read_text().splitlines()]


def conns(log: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["client"], r["client_port"]): r for r in log if r["event"] == "mptcp_connection"}


@needs_captures
@needs_tshark
def test_v0_client_and_server_side_captures_agree(tmp_path: Path) -> None:
    """One v0 session captured at both ends: every connection's rebuilt streams agree.

    Connections closed with DATA_FIN agree byte for byte. The two iperf
    connections were killed with MP_FASTCLOSE while data was in flight: the
    client-side capture holds bytes the server never received, so there the
    streams agree on everything the server acknowledged at data level, and the
    server-side stream is a prefix of the client-side one.
    """
    out_c, log_c = replay(tmp_path, "v0-client-4subflows.pcap", tag="client")
    out_s, log_s = replay(tmp_path, "v0-server-4subflows.pcap", tag="server")
    cc, cs = conns(log_c), conns(log_s)
    assert cc.keys() == cs.keys() and len(cc) == 4
    fc = {(f.client[0], f.client[1]): f for f in tshark_follow_raw(out_c)}
    fs = {(f.client[0], f.client[1]): f for f in tshark_follow_raw(out_s)}
    for key, rc in cc.items():
        rs = cs[key]
        assert rc["version"] == 0

        def established(rec: dict) -> set[tuple[str, int, str, int]]:
            return {(sf["src"], sf["sport"], sf["dst"], sf["dport"]) for sf in rec["subflows"]
                    if sf["established"] and sf["role"] != "pickup"}

        # both capture points saw the same subflows complete their handshakes (3 or 4 per
        # connection: one join of the first iperf connection was never answered)
        assert established(rc) == established(rs) and len(established(rc)) >= 3
        for d, attr in (("c2s", "client_data"), ("s2c", "server_data")):
            a, b = getattr(fc[key], attr), getattr(fs[key], attr)
            # the emitted stream as tshark reads it is what the log says was rebuilt
            assert hashlib.sha256(a).hexdigest() == rc[d]["sha256"] and len(a) == rc[d]["bytes"]
            assert hashlib.sha256(b).hexdigest() == rs[d]["sha256"]
            assert rc[d]["gap_bytes"] == 0 and rs[d]["gap_bytes"] == 0
            if rc["outcome"] == "data_fin":
                assert a == b
            else:
                assert rc["outcome"] == rs["outcome"] == "fastclose"
                acked = rc[d]["acked_bytes"]
                assert acked == rs[d]["acked_bytes"]
                assert a[:acked] == b[:acked] and a.startswith(b)


@needs_captures
@needs_tshark
@pytest.mark.parametrize("name,c2s,s2c", [
    ("mptcp-v1.pcap", 10268, 10268),
    ("mptcp-aa-v1.pcap", 48, 48),
    ("mptcp-v0.pcap", 5121, 8561),
    ("mptcp-fclose.pcap", 1, 1),
])
def test_small_reference_captures(tmp_path: Path, name: str, c2s: int, s2c: int) -> None:
    out, log = replay(tmp_path, name)
    (rec,) = conns(log).values()
    assert (rec["c2s"]["bytes"], rec["s2c"]["bytes"]) == (c2s, s2c)
    (f,) = tshark_follow_raw(out)
    assert hashlib.sha256(f.client_data).hexdigest() == rec["c2s"]["sha256"]
    assert hashlib.sha256(f.server_data).hexdigest() == rec["s2c"]["sha256"]
    # the emitted stream has no MPTCP options, exact checksums and no TCP analysis complaints
    assert tshark_count(out, "mptcp") == 0
    assert tshark_count(out, "tcp.analysis.flags && !tcp.analysis.window_update") == 0


@needs_captures
@needs_tshark
def test_plain_tcp_passes_through_unchanged(tmp_path: Path) -> None:
    out, log = replay(tmp_path, "tcp-only.pcap")
    assert not conns(log)
    a = {(f.client, f.server): (f.client_data, f.server_data) for f in tshark_follow_raw(CAPTURES / "tcp-only.pcap")}
    b = {(f.client, f.server): (f.client_data, f.server_data) for f in tshark_follow_raw(out)}
    assert a == b and a


@needs_captures
def test_merged_inputs_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, log = replay(tmp_path, "mptcp-v1.pcap", "mptcp-aa-v1.pcap", tag="merged")
    assert len(conns(log)) == 2
    garbage = tmp_path / "garbage.pcap"
    garbage.write_bytes(b"this is not a capture at all")
    assert main(["replay", str(garbage), "--out", str(tmp_path / "x.pcap")]) == 2
    assert main(["replay", str(tmp_path / "missing.pcap"), "--out", str(tmp_path / "x.pcap")]) == 2
    err = capsys.readouterr().err
    assert "not a pcap or pcapng file" in err and "cannot open" in err and "Traceback" not in err
    assert main(["replay", str(CAPTURES / "mptcp-v1.pcap"), "--out", str(tmp_path / "no" / "dir.pcap")]) == 2


@needs_captures
def test_truncated_capture_is_reported_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = (CAPTURES / "mptcp-v1.pcap").read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) - 100])
    assert main(["replay", str(cut), "--out", str(tmp_path / "o.pcap")]) == 0
    assert "truncated" in capsys.readouterr().err


SAMPLE = Path(__file__).resolve().parents[1] / "mproxy" / "samples" / "split-attack.pcap"


def test_replay_takes_tracker_limits_and_log_keys_from_a_config(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``replay -c FILE``: the [tracker] table (limits, gap_grace for merged sensors, memcap) and
    [log] log_keys of the gateway's configuration apply offline too."""
    cfg = tmp_path / "m.toml"
    cfg.write_text("[tracker]\nmemcap = 70000\n[log]\nlog_keys = true\n")
    runs = {}
    for tag, extra in (("default", []), ("config", ["-c", str(cfg)])):
        out, log, met = (tmp_path / f"{tag}.{x}" for x in ("pcap", "jsonl", "prom"))
        assert main(["replay", str(SAMPLE), "--out", str(out), "--log", str(log), "--metrics", str(met), "-q",
                     *extra]) == 0
        (rec,) = [json.loads(x) for x in log.read_text().splitlines() if '"mptcp_connection"' in x]
        runs[tag] = (rec, met.read_text(), out.read_bytes())
    (d, dm, dout), (c, cm, cout) = runs["default"], runs["config"]
    assert "client_key" not in d and isinstance(c["client_key"], int)
    assert 'mproxy_buffer_limit_bytes{limit="memcap"} 2.68435456e+08' in dm
    assert 'mproxy_buffer_limit_bytes{limit="memcap"} 70000.0' in cm
    assert dout == cout and d["c2s"] == c["c2s"]
    cfg.write_text("[tracker]\nmemcap = 10\n")
    assert main(["replay", str(SAMPLE), "--out", str(tmp_path / "x.pcap"), "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "config error: [tracker] memcap" in err and "Traceback" not in err


def test_replay_reads_compressed_captures(tmp_path: Path) -> None:
    """A gzip-compressed capture (and an xz one, merged with it) replays as the plain file does."""
    import gzip
    import lzma

    gz, xz = tmp_path / "sample.pcap.gz", tmp_path / "sample.pcap.xz"
    gz.write_bytes(gzip.compress(SAMPLE.read_bytes()))
    xz.write_bytes(lzma.compress(SAMPLE.read_bytes()))
    outs = {}
    for tag, inputs in (("plain", [SAMPLE]), ("gz", [gz]), ("both", [SAMPLE, xz])):
        out, log = tmp_path / f"{tag}.pcap", tmp_path / f"{tag}.jsonl"
        assert main(["replay", *map(str, inputs), "--out", str(out), "--log", str(log), "-q"]) == 0
        outs[tag] = (out.read_bytes(), [r["c2s"]["sha256"] for r in map(json.loads, log.read_text().splitlines())
                                        if r["event"] == "mptcp_connection"])
    assert outs["gz"] == outs["plain"] and outs["plain"][1]
    assert outs["both"][1] == outs["plain"][1]  # the same packets twice: duplicates, the same stream


def test_replay_reads_standard_input(tmp_path: Path) -> None:
    """``-`` reads a capture (plain or compressed) from a pipe, e.g. ``zstd -dc F | mproxy replay -``."""
    import gzip
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    plain = tmp_path / "plain.pcap"
    assert main(["replay", str(SAMPLE), "--out", str(plain), "-q"]) == 0
    for tag, data in (("raw", SAMPLE.read_bytes()), ("gz", gzip.compress(SAMPLE.read_bytes()))):
        out = tmp_path / f"{tag}.pcap"
        cp = subprocess.run([sys.executable, "-m", "mproxy", "replay", "-", "--out", str(out), "-q"], input=data,
                            capture_output=True, cwd=root, timeout=60)
        assert cp.returncode == 0 and not cp.stderr, cp.stderr
        assert out.read_bytes() == plain.read_bytes()
    # merged with a file: the pipe stays open, the file is read from its first frame's time on
    log = tmp_path / "merged.jsonl"
    cp = subprocess.run([sys.executable, "-m", "mproxy", "replay", str(SAMPLE), "-", "--out", str(tmp_path / "m.pcap"),
                         "--log", str(log), "-q"], input=SAMPLE.read_bytes(), capture_output=True, cwd=root, timeout=60)
    assert cp.returncode == 0 and not cp.stderr, cp.stderr
    (rec,) = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "mptcp_connection"]
    assert rec["c2s"]["duplicate_bytes"] == rec["c2s"]["bytes"] > 0  # every packet twice, every byte once
    cp = subprocess.run([sys.executable, "-m", "mproxy", "replay", "-", "-", "--out", str(tmp_path / "x.pcap")],
                        input=b"", capture_output=True, cwd=root, timeout=60)
    assert cp.returncode == 2 and b"can be read only once" in cp.stderr and b"Traceback" not in cp.stderr


def test_progress_without_a_known_size_counts_frames(capsys: pytest.CaptureFixture[str]) -> None:
    from mproxy.io.pcap import CaptureReader
    from mproxy.replay import _Progress

    sized, piped = CaptureReader("a.pcap", size=1000, position=250), CaptureReader("-")
    _Progress([sized], True).tick(7)
    assert "25.0% 7 frames" in capsys.readouterr().err
    _Progress([sized, piped], True).tick(9)
    err = capsys.readouterr().err
    assert err == "\r9 frames"


def test_replay_without_rules_does_not_load_the_inspector(tmp_path: Path) -> None:
    """Start-up is part of every replay's time: the inspector (Hyperscan, the rules parser, ~20 ms of
    imports) loads only with --rules."""
    import subprocess
    import sys

    code = ("import sys; from mproxy.cli import main; "
            f"rc = main(['replay', {str(SAMPLE)!r}, '--out', {str(tmp_path / 'o.pcap')!r}, '-q']); "
            "print(rc, sorted(m for m in sys.modules if m in ('hyperscan', 'mproxy.core.inspector', 'mproxy.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []", out
