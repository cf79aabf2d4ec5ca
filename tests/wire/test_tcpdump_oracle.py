"""Our MPTCP decode, rendered in tcpdump's text style, against tcpdump's own output.

For every ``X.pcap`` with an ``X.out`` in ``<repo>/../shared/captures`` (the
tcpdump project's MPTCP test captures and expected output, made by tcpdump
master with ``tcpdump -# -n -tttt -r X.pcap``), the MPTCP fragments of each
frame's ``options [...]`` must equal our rendering of that frame's options.
Also: encode(decode(raw)) == raw for every decodable option of every
reference capture (pcap and pcapng).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy.io.pcap import read_captures
from mproxy.wire import mptcp as m
from mproxy.wire.errors import ErrorKind, WireError
from mproxy.wire.packet import ACK, FIN, PSH, RST, SYN, mptcp_spans, parse_frame, parse_ip, strip_link
from mproxy.wire.tcpdump_text import BAD, render_option, render_options

CAPTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "captures"

needs_captures = pytest.mark.skipif(not CAPTURES.is_dir(), reason="reference captures absent")


def _pcaps_with_out() -> list[str]:
    if not CAPTURES.is_dir():
        return []
    return sorted(p.stem for p in CAPTURES.glob("*.pcap") if p.with_suffix(".out").exists())


def _all_pcaps() -> list[str]:
    if not CAPTURES.is_dir():
        return []
    return sorted(p.name for p in CAPTURES.glob("*.pcap"))


# ---------------------------------------------------------------- .out parsing

_FRAME_LINE = re.compile(r"^\s*(\d+)\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ ")


def parse_out(text: str) -> dict[int, str]:
    """Frame number -> the frame's text (continuation lines joined with a space)."""
    frames: dict[int, list[str]] = {}
    cur: int | None = None
    for line in text.splitlines():
        mo = _FRAME_LINE.match(line)
        if mo:
            cur = int(mo.group(1))
            assert cur not in frames, f"frame {cur} twice"
            frames[cur] = [line]
        elif line.strip():
            assert cur is not None, f"continuation line before any frame: {line!r}"
            frames[cur].append(line.strip())
    return {k: " ".join(v) for k, v in frames.items()}


def option_lists(text: str) -> list[list[str]]:
    """Every ``options [...]`` list of a frame's text, split at top-level commas."""
    out = []
    start = 0
    while (i := text.find("options [", start)) >= 0:
        j = i + len("options [")
        depth, items, cur = 1, [], []
        while j < len(text) and depth:
            ch = text[j]
            if ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
                if depth == 0:
                    break
            if ch == "," and depth == 1:
                items.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
            j += 1
        items.append("".join(cur))
        out.append(items)
        start = j
    return out


def tcpdump_fragments(text: str) -> list[str]:
    return [it for opts in option_lists(text) for it in opts if it.startswith("mptcp")]


def test_option_list_parser() -> None:
    line = ("   4  2020 IP a > b: Flags [P.], options [nop,nop,TS val 1 ecr 2,mptcp 22 capable v1 flags [H] "
            "{0x1,0x2,data_len=16},nop,nop], length 16")
    assert option_lists(line) == [["nop", "nop", "TS val 1 ecr 2", "mptcp 22 capable v1 flags [H] {0x1,0x2,data_len=16}",
                                   "nop", "nop"]]
    assert tcpdump_fragments("x options [mss 1,mptcp 3 dss[bad opt]]") == ["mptcp 3 dss[bad opt]"]
    assert parse_out("    1  2014-11-10 03:32:08.002213 IP (tos 0x10)\n    1.2 > 3.4: Flags [S]\n") == {
        1: "    1  2014-11-10 03:32:08.002213 IP (tos 0x10) 1.2 > 3.4: Flags [S]"}


# ---------------------------------------------------------------- our side


def our_fragments(linktype: int, data: bytes) -> list[str]:
    seg = parse_frame(linktype, data)
    if isinstance(seg, WireError) and seg.kind == ErrorKind.TRUNCATED_TCP:
        # snaplen cut inside the TCP options (mptcp-dss-oobr.pcap): tcpdump
        # still prints the options that were captured. Pad the packet to
        # parse the header, then walk only the captured option bytes.
        ip = strip_link(linktype, memoryview(data))
        assert isinstance(ip, memoryview)
        padded = parse_ip(memoryview(bytes(ip) + bytes(60)))
        assert not isinstance(padded, WireError) and padded is not None
        start = padded.tcp_off + 20
        opts = bytes(padded.options)[: max(0, len(ip) - start)]
        return [f for f in render_options(opts, padded.flags) if f.startswith("mptcp")]
    if seg is None or isinstance(seg, WireError):
        return []
    return [f for f in render_options(seg.options, seg.flags) if f.startswith("mptcp")]


@pytest.mark.parametrize("name", _pcaps_with_out())
def test_matches_tcpdump_out(name: str) -> None:
    expected = parse_out((CAPTURES / f"{name}.out").read_text())
    frames = list(read_captures([str(CAPTURES / f"{name}.pcap")]))
    assert len(frames) == len(expected), "frame counts differ"
    assert sorted(expected) == list(range(1, len(frames) + 1))
    compared = 0
    mismatches = []
    for fr in frames:
        want = tcpdump_fragments(expected[fr.number])
        got = our_fragments(fr.linktype, fr.data)
        if want or got:
            compared += 1
        if want != got:
            mismatches.append((fr.number, want, got))
    assert not mismatches, "\n".join(f"frame {n}:\n  tcpdump {w}\n  ours    {g}" for n, w, g in mismatches[:10])
    assert compared > 0


@needs_captures
def test_every_mptcp_frame_compared() -> None:
    """Sanity: the references hold every subtype tcpdump's fragments show."""
    seen = set()
    for name in _pcaps_with_out():
        for text in parse_out((CAPTURES / f"{name}.out").read_text()).values():
            for f in tcpdump_fragments(text):
                seen.add(f.split()[2].split("[")[0])
    assert {"capable", "join", "dss", "add-addr", "rem-addr", "fast-close", "tcprst"} <= seen


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", _all_pcaps())
def test_reference_options_round_trip(name: str) -> None:
    n_opts = 0
    for fr in read_captures([str(CAPTURES / name)]):
        seg = parse_frame(fr.linktype, fr.data, fr.ts)
        if seg is None or isinstance(seg, WireError):
            continue
        spans = mptcp_spans(seg)
        assert not isinstance(spans, WireError), (fr.number, spans)
        for off, ln in spans:
            raw = bytes(seg.ip[off : off + ln])
            opt = m.decode(raw, seg.flags)
            if isinstance(opt, WireError):
                continue
            assert m.encode(opt) == raw, (fr.number, opt)
            assert opt.length == ln
            n_opts += 1
    expected_min = {"tcp-only.pcap": 0, "mptcp-dss-oobr.pcap": 0, "v0-client-4subflows.pcap": 2000,
                    "v0-server-4subflows.pcap": 2000}
    if name in expected_min:
        assert n_opts >= expected_min[name]
        if name == "tcp-only.pcap":
            assert n_opts == 0
    else:
        assert n_opts > 0


# ---------------------------------------------------------------- tcpdump's rules where they differ

S, SA, A = SYN, SYN | ACK, ACK


def _opt(sub_nib: int, body: bytes) -> bytes:
    return bytes((30, 3 + len(body), sub_nib)) + body


@pytest.mark.parametrize(
    "raw,flags,text",
    [
        # option-level framing
        (bytes((30,)), A, BAD),
        (bytes((30, 1)), A, BAD),
        (bytes((30, 2)), A, "mptcp" + BAD),
        (bytes((30, 9, 0x20)), A, BAD),  # length past the bytes we have
        # capable
        (_opt(0x01, bytes((0x01,))), S, "mptcp 4 capable v1 flags [H]"),
        (_opt(0x00, bytes((0x81,))), S, "mptcp 4 capable v0 flags [AH] csum"),  # decoder: v0 needs a key
        (_opt(0x01, bytes((0xFF,))), S, "mptcp 4 capable v1 flags [ABCDEFGH] csum"),
        (_opt(0x01, bytes((0x00,))), S, "mptcp 4 capable v1 flags [none]"),
        (_opt(0x01, bytes((0x01,))), A, "mptcp 4 capable" + BAD),
        (_opt(0x02, bytes((0x01,))), S, "mptcp 4 capable Unknown Version (2)"),
        (_opt(0x01, b"\x01" + (5).to_bytes(8, "big")), S, "mptcp 12 capable v1 flags [H] {0x5}"),
        (_opt(0x01, b"\x81" + (5).to_bytes(8, "big") + (6).to_bytes(8, "big")), A,
         "mptcp 20 capable v1 flags [AH] csum {0x5,0x6}"),
        (_opt(0x01, b"\x81" + (5).to_bytes(8, "big") + (6).to_bytes(8, "big") + b"\x00\x10"), A,
         "mptcp 22 capable v1 flags [AH] csum {0x5,0x6}"),
        (_opt(0x01, b"\x01" + (5).to_bytes(8, "big") + (6).to_bytes(8, "big") + b"\x00\x10"), A,
         "mptcp 22 capable v1 flags [H] {0x5,0x6,data_len=16}"),
        (_opt(0x01, b"\x81" + (5).to_bytes(8, "big") + (6).to_bytes(8, "big") + b"\x00\x10\xab\xcd"), A,
         "mptcp 24 capable v1 flags [AH] csum {0x5,0x6,data_len=16,csum=0xabcd}"),
        (_opt(0x01, b"\x01" + (5).to_bytes(8, "big") + (6).to_bytes(8, "big") + b"\x00\x10\xab\xcd"), A,
         "mptcp 24 capable v1 flags [H] {0x5,0x6,data_len=16}"),
        (_opt(0x00, b"\x81" + (5).to_bytes(8, "big") + (6).to_bytes(8, "big") + b"\x00\x10"), A,
         "mptcp 22 capable v0 flags [AH] csum {0x5,0x6}"),  # decoder: v0 has no length 22
        (_opt(0x01, b"\x01" + (5).to_bytes(8, "big") + (6).to_bytes(8, "big")), SA, "mptcp 20 capable" + BAD),
        (_opt(0x01, b"\x01" * 3), A, "mptcp 6 capable" + BAD),
        # join
        (_opt(0x11, b"\x02" + bytes.fromhex("0000abcd0000ef01")), S, "mptcp 12 join backup id 2 token 0xabcd nonce 0xef01"),
        (_opt(0x10, b"\x02" + bytes.fromhex("0000abcd0000ef01")), SA, "mptcp 12 join id 2 token 0xabcd nonce 0xef01"),
        (_opt(0x10, b"\x02" + bytes.fromhex("0000abcd0000ef01")), A, "mptcp 12 join" + BAD),
        (_opt(0x10, b"\x03" + bytes.fromhex("00000000000000ff00000001")), SA, "mptcp 16 join id 3 hmac 0xff nonce 0x1"),
        (_opt(0x10, b"\x03" + bytes.fromhex("00000000000000ff00000001")), A, "mptcp 16 join" + BAD),
        (_opt(0x10, b"\x00" + bytes(19) + b"\x01"), A, "mptcp 24 join hmac 0x" + "00" * 19 + "01"),
        (_opt(0x10, b"\x00" + bytes(19) + b"\x01"), SA, "mptcp 24 join hmac 0x" + "00" * 19 + "01"),
        (_opt(0x10, b"\x00" + bytes(19) + b"\x01"), S, "mptcp 24 join" + BAD),
        (_opt(0x10, b"\x00" * 5), S, "mptcp 8 join" + BAD),
        # dss
        (_opt(0x20, b""), A, "mptcp 3 dss" + BAD),
        (_opt(0x20, b"\x01\x00\x00\x00\x07"), S, "mptcp 8 dss" + BAD),
        (_opt(0x20, b"\x00"), A, "mptcp 4 dss"),
        (_opt(0x20, b"\x10"), A, "mptcp 4 dss fin"),
        (_opt(0x20, b"\x01\x00\x00\x00\x07"), A, "mptcp 8 dss ack 7"),
        (_opt(0x20, b"\x11\x00\x00"), A, "mptcp 6 dss fin ack " + BAD),
        (_opt(0x20, b"\x03\x00\x00\x00\x07"), A, "mptcp 8 dss ack " + BAD),
        (_opt(0x20, b"\x05" + (7).to_bytes(4, "big") + (8).to_bytes(4, "big") + (9).to_bytes(4, "big") + b"\x00\x01"), A,
         "mptcp 18 dss ack 7 seq 8 subseq 9 len 1"),
        (_opt(0x20, b"\x05" + (7).to_bytes(4, "big") + (8).to_bytes(4, "big") + (9).to_bytes(4, "big") + b"\x00\x01\x12\x34"),
         A, "mptcp 20 dss ack 7 seq 8 subseq 9 len 1 csum 0x1234"),
        (_opt(0x20, b"\x05" + (7).to_bytes(4, "big") + (8).to_bytes(4, "big") + (9).to_bytes(4, "big") + b"\x00\x01\x12\x34\x00"),
         A, "mptcp 21 dss ack 7 seq 8 subseq 9 len 1 csum 0x1234" + BAD),
        (_opt(0x20, b"\x05" + (7).to_bytes(4, "big") + (8).to_bytes(4, "big") + b"\x00\x00\x00"), A,
         "mptcp 15 dss ack 7 seq 8" + BAD),
        (_opt(0x20, b"\x05" + (7).to_bytes(4, "big") + (8).to_bytes(4, "big") + (9).to_bytes(4, "big") + b"\x00"), A,
         "mptcp 17 dss ack 7 seq 8 subseq 9" + BAD),
        (_opt(0x20, b"\x0c" + (2**64 - 1).to_bytes(8, "big")), A, "mptcp 12 dss seq 18446744073709551615" + BAD),
        (_opt(0x20, b"\x00\x00"), A, "mptcp 5 dss" + BAD),
        # add-addr
        (_opt(0x30, b"\x01" + bytes((10, 0, 2, 1))), A, "mptcp 8 add-addr v1 id 1 10.0.2.1"),
        (_opt(0x31, b"\x01" + bytes((10, 0, 2, 1)) + b"\x1f\x90"), A, "mptcp 10 add-addr v1-echo id 1 10.0.2.1:8080"),
        (_opt(0x34, b"\x01" + bytes((10, 0, 2, 1)) + bytes(7) + b"\x0f"), A, "mptcp 16 add-addr v0-ip4 id 1 10.0.2.1 hmac 0xf"),
        (_opt(0x36, b"\x01" + bytes((10, 0, 2, 1))), A, "mptcp 8 add-addr v0-ip6 id 1 10.0.2.1"),
        (_opt(0x3A, b"\x01" + bytes((10, 0, 2, 1))), A, "mptcp 8 add-addr [bad version/echo] id 1 10.0.2.1"),
        (_opt(0x30, b"\x02" + bytes.fromhex("20010db8" + "00" * 11 + "01") + b"\x00\x50" + bytes(7) + b"\x01"), A,
         "mptcp 30 add-addr v1 id 2 2001:db8::1:80 hmac 0x1"),
        (_opt(0x36, b"\x02" + bytes.fromhex("20010db8" + "00" * 11 + "01")), A, "mptcp 20 add-addr v0-ip6 id 2 2001:db8::1"),
        (_opt(0x30, b"\x01" + bytes(5)), A, "mptcp 9 add-addr" + BAD),
        # others
        (_opt(0x40, b"\x00"), A, "mptcp 4 rem-addr id 0"),
        (_opt(0x40, b"\x01\x02\x03"), A, "mptcp 6 rem-addr id 1 2 3"),
        (_opt(0x40, b""), A, "mptcp 3 rem-addr" + BAD),
        (_opt(0x51, b""), A, "mptcp 3 prio backup"),
        (_opt(0x50, b"\x04"), A, "mptcp 4 prio non-backup id 4"),
        (_opt(0x50, b"\x04\x05"), A, "mptcp 5 prio" + BAD),
        (_opt(0x60, b"\x00" + (12345).to_bytes(8, "big")), A, "mptcp 12 fail seq 12345"),
        (_opt(0x60, b"\x00" + (12345).to_bytes(4, "big")), A, "mptcp 8 fail" + BAD),
        (_opt(0x70, b"\x00" + (0xABC).to_bytes(8, "big")), A, "mptcp 12 fast-close key 0xabc"),
        (_opt(0x70, b"\x00"), A, "mptcp 4 fast-close" + BAD),
        (_opt(0x89, b"\x06"), RST | ACK, "mptcp 4 tcprst flags [UT] reason Middlebox interference"),
        (_opt(0x8F, b"\x07"), RST | ACK, "mptcp 4 tcprst flags [UVWT] reason unknown (0x07)"),
        (_opt(0x80, b"\x05"), RST, "mptcp 4 tcprst flags [none] reason Unacceptable performance"),
        (_opt(0x80, b"\x05\x00"), RST, "mptcp 5 tcprst" + BAD),
        (_opt(0x90, b"\x00"), A, "mptcp 4 unknown"),
        (_opt(0xF0, b""), A | PSH | FIN, "mptcp 3 unknown"),
    ],
)
def test_render_option(raw: bytes, flags: int, text: str) -> None:
    assert render_option(raw, flags) == text


def test_render_options_stops_at_bad() -> None:
    opts = bytes((1, 1)) + _opt(0x20, b"") + _opt(0x40, b"\x01")
    assert render_options(opts, ACK) == ["mptcp 3 dss" + BAD]
    opts = bytes((2, 4, 5, 0xB4)) + _opt(0x40, b"\x01") + bytes((8, 1))
    assert render_options(opts, ACK) == ["mptcp 4 rem-addr id 1", BAD]
    assert render_options(bytes((0, 0)) + _opt(0x40, b"\x01"), ACK) == ["mptcp 4 rem-addr id 1"]


# ---------------------------------------------------------------- Debian's tcpdump 4.99


def as_tcpdump_499(fragment: str) -> str:
    """What tcpdump 4.99 prints where master prints ``fragment``.

    4.99 knows no MP_TCPRST (subtype 8 is "unknown") and prints MP_CAPABLE
    without ``flags [...]`` and without ``data_len``/``csum=`` inside the braces.
    """
    parts = fragment.split(" ", 3)
    if len(parts) >= 3 and parts[2].startswith("tcprst"):
        return f"mptcp {parts[1]} unknown"
    if len(parts) >= 3 and parts[2] == "capable":
        fragment = re.sub(r" flags \[[A-H]*(?:none)?\]", "", fragment)
        fragment = re.sub(r",data_len=\d+|,csum=0x[0-9a-f]+", "", fragment)
    return fragment


def _tcpdump_499() -> str | None:
    import shutil
    import subprocess

    exe = shutil.which("tcpdump")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return exe if "tcpdump version 4.99" in (out.stdout + out.stderr) else None


@pytest.mark.parametrize("name", _pcaps_with_out())
def test_debian_tcpdump_499_differs_only_as_documented(name: str) -> None:
    import subprocess

    exe = _tcpdump_499()
    if exe is None:
        pytest.skip("no tcpdump 4.99 installed")
    text = subprocess.run([exe, "-#", "-n", "-tttt", "-r", str(CAPTURES / f"{name}.pcap")], capture_output=True,
                          text=True, check=True).stdout
    old = parse_out(text)
    ref = parse_out((CAPTURES / f"{name}.out").read_text())
    assert sorted(old) == sorted(ref)
    for n in ref:
        want = [as_tcpdump_499(f) for f in tcpdump_fragments(ref[n])]
        assert tcpdump_fragments(old[n]) == want, n


@needs_captures
def test_snaplen_cut_inside_the_options_still_renders_what_was_captured() -> None:
    (fr,) = read_captures([str(CAPTURES / "mptcp-dss-oobr.pcap")])
    cut = fr.data[:-1]  # the file's snaplen is 73: the last option byte missing, as tcpdump's test intends
    seg = parse_frame(fr.linktype, cut)
    assert isinstance(seg, WireError) and seg.kind == ErrorKind.TRUNCATED_TCP
    assert our_fragments(fr.linktype, cut) == ["mptcp 3 dss" + BAD]


@settings(max_examples=3000)
@given(st.binary(min_size=1, max_size=38), st.integers(0, 15), st.integers(0, 0xFF))
def test_render_option_never_raises(body: bytes, subtype: int, flags: int) -> None:
    raw = bytes((30, len(body) + 2, (subtype << 4) | (body[0] & 0x0F))) + body[1:]
    text = render_option(raw, flags)
    assert text.startswith(f"mptcp {len(raw)} ")
    opt = m.decode(raw, flags)
    if not isinstance(opt, WireError):
        assert BAD not in text  # whatever we decode, tcpdump prints too


@settings(max_examples=1000)
@given(st.binary(max_size=40), st.integers(0, 0xFF))
def test_render_options_never_raises(opts: bytes, flags: int) -> None:
    out = render_options(opts, flags)
    assert all(f.startswith("mptcp") or f == BAD for f in out)
    assert all(BAD not in f for f in out[:-1])
