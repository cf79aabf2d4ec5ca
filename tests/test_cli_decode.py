"""``mproxy decode``: human and JSON output on the reference captures, merged input, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mproxy import crypto
from mproxy.cli import main
from mproxy.decode import option_fields
from mproxy.io.pcap import read_captures
from mproxy.wire import mptcp as m

CAPTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "captures"
BASE = {"frame", "ts", "src", "sport", "dst", "dport"}

pytestmark = pytest.mark.skipif(not CAPTURES.is_dir(), reason="reference captures absent")


def cap(name: str) -> str:
    return str(CAPTURES / name)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["decode", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *files: str) -> list[dict]:
    rc, out, err = run(capsys, "--json", *files)
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


# The contract keys of each subtype (mproxy/decode.py): always / when present.
KEYS = {
    "MP_CAPABLE": ({"version", "flags"}, {"sender_key", "token", "receiver_key", "data_len", "checksum"}),
    "MP_JOIN": ({"phase"}, {"addr_id", "backup", "token", "nonce", "hmac"}),
    "DSS": ({"flags", "data_fin"}, {"data_ack", "ack64", "dsn", "dsn64", "ssn", "dll", "checksum"}),
    "ADD_ADDR": ({"version", "addr_id", "address", "echo"}, {"port", "hmac"}),
    "REMOVE_ADDR": ({"addr_ids"}, set()),
    "MP_PRIO": ({"backup"}, {"addr_id"}),
    "MP_FAIL": ({"dsn"}, set()),
    "MP_FASTCLOSE": ({"receiver_key"}, set()),
    "MP_TCPRST": ({"reason", "transient", "flags"}, set()),
}


def check_keys(rec: dict) -> None:
    assert BASE <= rec.keys()
    always, optional = KEYS[rec["subtype"]]
    rest = rec.keys() - BASE - {"subtype"}
    assert always <= rest, rec
    assert rest <= always | optional, rec
    assert None not in rec.values()  # absent fields are left out, not null


def test_json_v0_every_record(capsys) -> None:
    recs = run_json(capsys, cap("mptcp-v0.pcap"))
    assert len(recs) == 266
    for r in recs:
        check_keys(r)
    first = recs[0]
    assert first == {"frame": 1, "ts": 1361796995.701161, "src": "10.2.1.2", "sport": 35961, "dst": "10.1.1.2",
                     "dport": 22, "subtype": "MP_CAPABLE", "version": 0, "flags": 0x81,
                     "sender_key": 0x9C9EABD1E46A33B2, "token": 0xAF9706EB}
    by = {(r["frame"], r["subtype"]): r for r in recs}
    assert by[(4, "ADD_ADDR")] == {**{k: by[(4, "ADD_ADDR")][k] for k in BASE}, "subtype": "ADD_ADDR", "version": 0,
                                   "addr_id": 1, "address": "10.1.2.2", "echo": False}
    dss = by[(4, "DSS")]
    assert (dss["data_ack"], dss["ack64"], dss["dsn"], dss["dsn64"], dss["ssn"], dss["dll"], dss["checksum"],
            dss["data_fin"]) == (3576348362, False, 3518592144, False, 1, 41, 0x82F, False)
    assert by[(8, "MP_JOIN")]["phase"] == "SYN" and by[(8, "MP_JOIN")]["token"] == 0xE47F0142
    assert by[(9, "MP_JOIN")]["hmac"] == "5ab680c7884af03d" and "token" not in by[(9, "MP_JOIN")]
    ack = by[(10, "MP_JOIN")]
    assert ack["phase"] == "ACK" and "addr_id" not in ack and "backup" not in ack and len(ack["hmac"]) == 40
    assert by[(210, "REMOVE_ADDR")]["addr_ids"] == [0]


def test_json_other_subtypes(capsys) -> None:
    v1 = run_json(capsys, cap("mptcp-v1.pcap"))
    assert [r["subtype"] for r in v1[:4]] == ["MP_CAPABLE"] * 4
    assert "sender_key" not in v1[0] and v1[1]["token"] == crypto.key_token(0x29A6C86981AD933C, 1)
    assert v1[3]["data_len"] == 8192 and "checksum" not in v1[3]
    assert any(r["subtype"] == "DSS" and r["data_fin"] and r["dll"] == 1 for r in v1)
    rst = run_json(capsys, cap("mptcp-tcprst.pcap"))
    assert [(r["subtype"], r["reason"], r["transient"], r["flags"]) for r in rst] == [
        ("MP_TCPRST", 0, False, 0), ("MP_TCPRST", 1, True, 1)]
    echo = run_json(capsys, cap("mptcp-aa-echo.pcap"))
    aa = [r for r in echo if r["subtype"] == "ADD_ADDR"]
    assert [(r["echo"], "hmac" in r) for r in aa] == [(False, True), (True, False)]
    assert aa[0]["hmac"] == "f8295862f645df19"
    fc = run_json(capsys, cap("mptcp-fclose.pcap"))
    assert [r["receiver_key"] for r in fc if r["subtype"] == "MP_FASTCLOSE"] == [0xD005B1AB34BAD344]
    for r in v1 + rst + echo + fc:
        check_keys(r)


def test_option_fields_for_subtypes_missing_from_the_captures() -> None:
    assert option_fields(m.MpPrio(True, 3)) == {"subtype": "MP_PRIO", "backup": True, "addr_id": 3}
    assert option_fields(m.MpPrio(False)) == {"subtype": "MP_PRIO", "backup": False}
    assert option_fields(m.MpFail(2**40)) == {"subtype": "MP_FAIL", "dsn": 2**40}
    v6 = option_fields(m.AddAddr(1, 2, bytes.fromhex("20010db8" + "00" * 11 + "01"), 8080, False, 0xAB))
    assert v6 == {"subtype": "ADD_ADDR", "version": 1, "addr_id": 2, "address": "2001:db8::1", "echo": False,
                  "port": 8080, "hmac": "00000000000000ab"}
    cap24 = option_fields(m.MpCapable(1, 0x81, 1, 2, 3, 4))
    assert cap24["checksum"] == 4 and cap24["data_len"] == 3 and cap24["token"] == crypto.key_token(1, 1)


def test_malformed_option_record(capsys) -> None:
    rc, out, err = run(capsys, "--json", cap("mptcp-dss-oobr.pcap"))
    assert rc == 0
    (rec,) = [json.loads(x) for x in out.splitlines()]
    assert rec["frame"] == 1 and rec["subtype"] == "DSS" and rec["length"] == 3 and rec["raw"] == "1e0320"
    assert rec["error"].startswith("mptcp_bad_length")
    assert "errors: mptcp_bad_length 1" in err


def test_merged_input_numbers_frames_from_one(capsys) -> None:
    # mptcp-fclose (2013, 11 frames) sorts before mptcp-v1 (2020, 20 frames), whatever the argument order
    merged = run_json(capsys, cap("mptcp-v1.pcap"), cap("mptcp-fclose.pcap"))
    alone_fc = run_json(capsys, cap("mptcp-fclose.pcap"))
    alone_v1 = run_json(capsys, cap("mptcp-v1.pcap"))
    assert len(merged) == len(alone_fc) + len(alone_v1)
    assert [r["frame"] for r in merged[: len(alone_fc)]] == [r["frame"] for r in alone_fc]
    assert [r["frame"] for r in merged[len(alone_fc) :]] == [r["frame"] + 11 for r in alone_v1]
    assert merged[0]["frame"] == 3  # two ARP frames first
    assert min(r["frame"] for r in merged) >= 1
    frames = list(read_captures([cap("mptcp-v1.pcap"), cap("mptcp-fclose.pcap")]))
    assert [f.number for f in frames] == list(range(1, 32))


def test_human_output(capsys) -> None:
    rc, out, err = run(capsys, cap("mptcp-fclose.pcap"))
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 9
    assert lines[0].split() == ["3", "10.1.1.2.37479", ">", "10.2.1.2.2002", "MP_CAPABLE", "version=0", "flags=129",
                                "sender_key=0x9b59be3d695e66a7", "token=0xd3dcec4f"]
    assert "MP_FASTCLOSE receiver_key=0xd005b1ab34bad344" in lines[7]
    assert "checksum=0x9e91" in lines[3]
    assert err.strip() == "mproxy decode: 11 frames, 9 TCP, 9 MPTCP options, errors: none"
    rc, out_q, err_q = run(capsys, "-q", cap("mptcp-fclose.pcap"))
    assert rc == 0 and out_q == out and err_q == ""


def test_human_output_every_capture(capsys) -> None:
    for p in sorted(CAPTURES.glob("*.pcap")):
        rc, out, err = run(capsys, str(p))
        assert rc == 0, (p, err)
        assert "Traceback" not in err
        assert "MPTCP options" in err


def test_pcapng_inputs(capsys) -> None:
    rc, out, err = run(capsys, "--json", cap("tcp-only.pcap"))
    assert rc == 0 and out == "" and "2798 frames" in err and "0 MPTCP options" in err
    rc, out, err = run(capsys, "--json", cap("v0-client-4subflows.pcap"), cap("v0-server-4subflows.pcap"))
    assert rc == 0
    recs = [json.loads(x) for x in out.splitlines()]
    assert {r["subtype"] for r in recs} == {"MP_CAPABLE", "MP_JOIN", "DSS", "ADD_ADDR", "MP_FASTCLOSE"}
    n_frames = int(err.split("mproxy decode: ")[1].split()[0])
    assert n_frames == len(list(read_captures([cap("v0-client-4subflows.pcap")]))) + len(
        list(read_captures([cap("v0-server-4subflows.pcap")])))
    frames = [r["frame"] for r in recs]
    assert frames == sorted(frames) and 1 <= frames[0] and frames[-1] <= n_frames


@pytest.mark.parametrize("content", [b"this is not a capture\n" * 3, b"", b"\xd4\xc3\xb2\xa1\x02"])
def test_garbage_file(capsys, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "garbage.pcap"
    bad.write_bytes(content)
    rc, out, err = run(capsys, str(bad))
    assert rc == 2
    assert out == ""
    assert err.startswith("mproxy decode: ") and "garbage.pcap" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    # also when it is the second of two files: nothing is printed before the error
    rc, out, err = run(capsys, "--json", cap("mptcp-v1.pcap"), str(bad))
    assert rc == 2 and out == "" and "garbage.pcap" in err


def test_missing_file(capsys, tmp_path: Path) -> None:
    rc, out, err = run(capsys, str(tmp_path / "missing.pcap"))
    assert rc == 2 and out == ""
    assert "missing.pcap" in err and "cannot open" in err and "Traceback" not in err


def test_directory_given(capsys, tmp_path: Path) -> None:
    rc, out, err = run(capsys, str(tmp_path))
    assert rc == 2 and "cannot open" in err


def test_truncated_capture_warns(capsys, tmp_path: Path) -> None:
    data = (CAPTURES / "mptcp-fclose.pcap").read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-10])
    rc, out, err = run(capsys, "--json", str(cut))
    assert rc == 0
    assert "warning" in err and "cut.pcap" in err and "Traceback" not in err
    assert len(out.splitlines()) == 8  # the last frame (with one option) is lost
