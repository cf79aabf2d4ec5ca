"""IP reassembly of captured fragments (sans-I/O), Linux receiver semantics.

Fragments are cut here from packets our encoder builds; kernel-made fragments
(a gateway forwarding onto a smaller MTU) are replayed in tests/lab/test_fragments_lab.py.
"""

from __future__ import annotations

import hashlib
import random

from hypothesis import given, settings, strategies as st

from mproxy.core.defrag import Defragmenter
from mproxy.core.pipeline import Pipeline
from mproxy.wire.packet import parse_ip

from ..fragments import frag_v4, frag_v6
from .session import Session


def _packet(ipver: int, size: int) -> bytes:
    s = Session(1, ipver)
    s.handshake()
    return s.data(0, True, 0, bytes(random.Random(size).randbytes(size)))


@settings(max_examples=150, deadline=None)
@given(ipver=st.sampled_from([4, 6]), size=st.integers(1, 3000), data=st.data())
def test_any_fragmentation_in_any_order_with_duplicates_reassembles(ipver: int, size: int, data: st.DataObject) -> None:
    ip = _packet(ipver, size)
    hl = (ip[0] & 0x0F) * 4 if ipver == 4 else 40
    n = len(ip) - hl
    cuts = data.draw(st.lists(st.integers(1, max(1, (n - 1) // 8)).map(lambda k: k * 8), max_size=12))
    cuts = [c for c in cuts if c < n]
    frags = (frag_v4 if ipver == 4 else frag_v6)(ip, cuts)
    order = data.draw(st.permutations(frags))
    dups = data.draw(st.lists(st.sampled_from(frags), max_size=4))
    d = Defragmenter()
    got = [w for f in [*order, *dups] if (w := d.add(f, 1.0)) is not None]
    if len(frags) == 1:  # not fragmented at all: never handed in by the parser; still complete
        return
    # copies arriving after the datagram was whole start it again (as in Linux: TCP then sees a
    # retransmission), so it may come out more than once, always the same
    assert got and all(g == got[0] for g in got)
    assert d.stats.reassembled == len(got)
    whole = parse_ip(memoryview(got[0]))
    orig = parse_ip(memoryview(ip))
    assert bytes(whole.payload) == bytes(orig.payload) and whole.seq == orig.seq
    assert (whole.src, whole.dst, whole.sport, whole.dport) == (orig.src, orig.dst, orig.sport, orig.dport)
    if ipver == 4:
        assert got[0][:2] == ip[:2] and got[0][12:20] == ip[12:20]
        s = sum(int.from_bytes(got[0][i : i + 2], "big") for i in range(0, 20, 2))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        assert s == 0xFFFF  # the header checksum verifies
    else:
        assert got[0] == ip  # the fragment header is gone, the rest as it was
    d.add(b"\x45" + bytes(19), 1000.0)  # later: what is left expires, and nothing stays held
    assert len(d) == 0 and d.held == 0


def test_overlapping_fragments_drop_the_datagram_as_linux_does() -> None:
    ip = _packet(4, 400)
    a, b, c = frag_v4(ip, [128, 256])
    other = bytearray(frag_v4(ip, [120, 256])[1])  # starts 8 bytes inside the first fragment
    d = Defragmenter()
    assert d.add(a, 1.0) is None and d.add(bytes(other), 1.0) is None
    assert d.stats.dropped["overlap"] == 1 and len(d) == 0
    # what is left of that datagram never completes: the overlap cost the attacker the datagram
    assert d.add(b, 1.0) is None and d.add(c, 1.0) is None
    d.add(b"\x45" + bytes(19), 100.0)  # a later packet expires it
    assert d.stats.reassembled == 0 and d.stats.dropped["timeout"] == 1


def test_a_duplicate_with_other_bytes_does_not_replace_the_first_copy() -> None:
    ip = _packet(4, 64)
    a, b = frag_v4(ip, [32])
    forged = a[:-8] + b"EVILEVIL"
    d = Defragmenter()
    assert d.add(a, 1.0) is None and d.add(forged, 1.0) is None
    whole = d.add(b, 1.0)
    assert whole is not None and bytes(parse_ip(memoryview(whole)).payload) == bytes(parse_ip(memoryview(ip)).payload)


def test_incomplete_datagrams_expire_and_the_bytes_held_are_capped() -> None:
    d = Defragmenter(limit=10_000, timeout=30.0)
    for i in range(40):
        first = frag_v4(_packet(4, 1000), [512], ident=i)[0]
        d.add(first, 1.0)
    assert d.held <= 10_000 and d.stats.dropped["memcap"] > 0
    d.add(frag_v4(_packet(4, 1000), [512], ident=999)[0], 40.0)
    assert len(d) == 1 and d.stats.dropped["timeout"] > 0


def test_damaged_fragments_are_counted_never_raise() -> None:
    d = Defragmenter()
    ip = _packet(4, 100)
    a, _b = frag_v4(ip, [48])
    assert d.add(a[:30], 1.0) is None  # cut by the snap length
    assert d.stats.dropped["truncated"] == 1
    odd = bytearray(a)
    odd[2:4] = (20 + 45).to_bytes(2, "big")  # a non-last fragment whose length is no multiple of 8
    assert d.add(bytes(odd[:65]), 1.0) is None and d.stats.dropped["malformed"] == 1
    huge = bytearray(a)
    huge[6:8] = (0x2000 | 8190).to_bytes(2, "big")  # offset 65520 + 48 bytes: past 65535
    assert d.add(bytes(huge), 1.0) is None and d.stats.dropped["oversize"] == 1
    for junk in (b"\x45", b"\x60" + bytes(10), b"\x60" + bytes(39) + b"\x00"):
        d.add(junk, 1.0)


def test_replay_pipeline_rebuilds_a_stream_whose_packets_were_fragmented() -> None:
    """Frames in, as a capture holds them: fragments of the MPTCP data packets, out of order."""
    s = Session(1)
    pk = s.handshake()
    body = random.Random(7).randbytes(3000)
    pk += [s.data(0, True, 0, body[:1400]), s.data(0, True, 1400, body[1400:2800]), s.data(0, True, 2800, body[2800:])]
    frames: list[bytes] = []
    for p in pk:
        frames += list(reversed(frag_v4(p, [512, 1024]))) if len(p) > 600 else [p]
    pipe = Pipeline()
    pipe.tracker.stream_hash = True
    for i, f in enumerate(frames):
        pipe.feed(228, f, 1000.0 + i / 1000)  # LINKTYPE_IPV4: raw IP
    pipe.finish()
    (rec,) = [r for r in pipe.drain_records() if r["event"] == "mptcp_connection"]
    assert rec["c2s"]["bytes"] == 3000 and rec["c2s"]["gap_bytes"] == 0
    assert rec["c2s"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert pipe.defrag.stats.reassembled == 2 and not pipe.stats.parse_errors
