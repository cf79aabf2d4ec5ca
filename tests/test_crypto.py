"""Token/IDSN, MP_JOIN and ADD_ADDR HMACs, DSS checksum: against the reference captures and RFC definitions."""

from __future__ import annotations

import hashlib
import hmac
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy import crypto
from mproxy.io.pcap import read_captures
from mproxy.wire import mptcp as m
from mproxy.wire.errors import WireError
from mproxy.wire.packet import SYN, TcpSegment, mptcp_spans, parse_frame

CAPTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "captures"

V0_CLIENT_KEY = 0x9C9EABD1E46A33B2  # mptcp-v0.pcap frame 1
V0_SERVER_KEY = 0x967D2770B6960552  # mptcp-v0.pcap frame 2


def capture(name: str) -> list[tuple[int, TcpSegment, list]]:
    """(frame number, segment, decoded MPTCP options) for every TCP frame of a reference capture."""
    path = CAPTURES / name
    if not path.exists():
        pytest.skip("reference captures absent")
    out = []
    for fr in read_captures([str(path)]):
        seg = parse_frame(fr.linktype, fr.data, fr.ts)
        if not isinstance(seg, TcpSegment):
            continue
        spans = mptcp_spans(seg)
        assert not isinstance(spans, WireError)
        opts = [m.decode(seg.ip[o : o + n], seg.flags) for o, n in spans]
        out.append((fr.number, seg, opts))
    return out


def by_frame(name: str) -> dict[int, tuple[TcpSegment, list]]:
    return {n: (seg, opts) for n, seg, opts in capture(name)}


# ------------------------------------------------------------------ token and IDSN


def test_v0_tokens_from_capture() -> None:
    assert crypto.key_token(V0_CLIENT_KEY, 0) == 0xAF9706EB
    assert crypto.key_token(V0_SERVER_KEY, 0) == 0xE47F0142
    frames = by_frame("mptcp-v0.pcap")
    _, (join_syn,) = frames[8]
    assert isinstance(join_syn, m.MpJoin) and join_syn.phase == m.JoinPhase.SYN
    # the joining client names the server's connection by the server's token
    assert join_syn.token == crypto.key_token(V0_SERVER_KEY, 0)


@settings(max_examples=200)
@given(st.integers(0, 2**64 - 1))
def test_token_and_idsn_are_the_hash_ends(key: int) -> None:
    for version, h in ((0, hashlib.sha1), (1, hashlib.sha256)):
        d = h(key.to_bytes(8, "big")).digest()
        assert crypto.key_token(key, version) == int.from_bytes(d[:4], "big")
        assert crypto.key_idsn(key, version) == int.from_bytes(d[-8:], "big")


def test_v1_idsn_plus_one_is_the_first_dsn() -> None:
    frames = capture("mptcp-v1.pcap")
    keys = {}  # sender address -> key
    first_dsn = {}
    for _, seg, opts in frames:
        for o in opts:
            if isinstance(o, m.MpCapable) and o.sender_key is not None:
                keys[seg.src] = o.sender_key  # v1: the client's key first shows in the third ACK
            if isinstance(o, m.MpCapable) and o.data_len is not None:
                # v1: data on the third ACK is mapped at IDSN + 1 implicitly
                first_dsn.setdefault(seg.src, crypto.key_idsn(o.sender_key, 1) + 1)
            if isinstance(o, m.Dss) and o.dsn is not None:
                first_dsn.setdefault(seg.src, o.dsn)
    assert len(keys) == 2 and len(first_dsn) == 2
    for src, key in keys.items():
        assert crypto.key_idsn(key, 1) + 1 == first_dsn[src]
    client_key = 0x1FDB5DF328BC3DEF
    server_key = 0x29A6C86981AD933C
    assert sorted(keys.values()) == sorted((client_key, server_key))
    # frame 7: the server's first mapping
    seg, (dss,) = by_frame("mptcp-v1.pcap")[7]
    assert dss.dsn == crypto.key_idsn(server_key, 1) + 1 == 11713449205243392242
    # and the client's DATA_ACK covers its 8192 bytes sent with MP_CAPABLE
    seg, (dss,) = by_frame("mptcp-v1.pcap")[5]
    assert dss.data_ack == crypto.key_idsn(client_key, 1) + 1
    # v0: the first DSN is IDSN + 1 too (low 32 bits, as sent)
    _, opts = by_frame("mptcp-v0.pcap")[4]
    dss = next(o for o in opts if isinstance(o, m.Dss))
    assert dss.dsn == (crypto.key_idsn(V0_SERVER_KEY, 0) + 1) & 0xFFFFFFFF


# ------------------------------------------------------------------ MP_JOIN HMAC


def test_v0_join_hmacs_of_frames_8_to_10() -> None:
    f = by_frame("mptcp-v0.pcap")
    (syn,) = f[8][1]
    (synack,) = f[9][1]
    (ack,) = f[10][1]
    assert (syn.phase, synack.phase, ack.phase) == (m.JoinPhase.SYN, m.JoinPhase.SYN_ACK, m.JoinPhase.ACK)
    # frames 1-3 carried the keys; frame 1 is the client's SYN
    (cap,) = f[3][1]
    assert (cap.sender_key, cap.receiver_key) == (V0_CLIENT_KEY, V0_SERVER_KEY)
    assert crypto.verify_join_synack(V0_SERVER_KEY, V0_CLIENT_KEY, synack.nonce, syn.nonce, synack.hmac, 0)
    assert crypto.verify_join_ack(V0_CLIENT_KEY, V0_SERVER_KEY, syn.nonce, synack.nonce, ack.hmac, 0)
    assert synack.hmac.hex() == "5ab680c7884af03d"
    assert ack.hmac.hex() == "cb7b87f5e5f0502f43b535fb70ef6607df2e6c7a"
    # wrong version, swapped keys, swapped nonces, another truncated value: all fail
    assert not crypto.verify_join_synack(V0_SERVER_KEY, V0_CLIENT_KEY, synack.nonce, syn.nonce, synack.hmac, 1)
    assert not crypto.verify_join_synack(V0_CLIENT_KEY, V0_SERVER_KEY, synack.nonce, syn.nonce, synack.hmac, 0)
    assert not crypto.verify_join_ack(V0_CLIENT_KEY, V0_SERVER_KEY, synack.nonce, syn.nonce, ack.hmac, 0)
    assert not crypto.verify_join_ack(V0_CLIENT_KEY, V0_SERVER_KEY, syn.nonce, synack.nonce, bytes(20), 0)


@settings(max_examples=100)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_v1_join_hmac_definition(ck: int, sk: int, cn: int, sn: int) -> None:
    """RFC 8684 3.2: HMAC-SHA256(Key=(Key-B + Key-A), Msg=(R-B + R-A)) from B's side, etc."""
    server = hmac.new(struct.pack("!QQ", sk, ck), struct.pack("!II", sn, cn), hashlib.sha256).digest()
    client = hmac.new(struct.pack("!QQ", ck, sk), struct.pack("!II", cn, sn), hashlib.sha256).digest()
    assert crypto.join_hmac(sk, ck, sn, cn, 1) == server
    assert crypto.verify_join_synack(sk, ck, sn, cn, server[:8], 1)
    assert crypto.verify_join_ack(ck, sk, cn, sn, client[:20], 1)
    assert not crypto.verify_join_ack(ck, sk, cn, sn, server[:20], 1) or ck == sk and cn == sn


def test_v0_join_hmac_is_sha1() -> None:
    mac = crypto.join_hmac(1, 2, 3, 4, 0)
    assert mac == hmac.new(struct.pack("!QQ", 1, 2), struct.pack("!II", 3, 4), hashlib.sha1).digest()
    assert len(mac) == 20 and len(crypto.join_hmac(1, 2, 3, 4, 1)) == 32


# ------------------------------------------------------------------ ADD_ADDR HMAC


def test_add_addr_v1_pre_rfc_form_in_aa_v1_frame_13() -> None:
    f = by_frame("mptcp-aa-v1.pcap")
    (server_syn_ack,) = f[4][1]
    (client_ack,) = f[5][1]
    server_key, client_key = server_syn_ack.sender_key, client_ack.sender_key
    assert (client_ack.receiver_key, server_key) == (server_key, 0x73BB150358A0AECB)
    seg, opts = f[13]
    (aa,) = [o for o in opts if isinstance(o, m.AddAddr)]
    assert seg.src_text == "192.168.125.165"  # sent by the server: its key first
    assert (aa.version, aa.addr_id, aa.port, aa.echo) == (1, 1, None, False)
    assert aa.hmac == crypto.add_addr_hmac_legacy(server_key, client_key, aa.addr_id, aa.address)
    assert crypto.add_addr_hmac_ok(server_key, client_key, aa.addr_id, aa.address, aa.port, aa.hmac)
    assert not crypto.add_addr_hmac_ok(client_key, server_key, aa.addr_id, aa.address, aa.port, aa.hmac)
    assert aa.hmac != crypto.add_addr_hmac(server_key, client_key, aa.addr_id, aa.address, aa.port)


def rfc8684_add_addr_hmac(sender: int, receiver: int, addr_id: int, addr: bytes, port: int | None) -> int:
    """RFC 8684 3.4.1: rightmost 64 bits of HMAC-SHA256(Key=A||B, Msg=ID||IP||Port), port 0 when absent."""
    msg = bytes([addr_id]) + addr + struct.pack("!H", port or 0)
    digest = hmac.new(struct.pack("!QQ", sender, receiver), msg, hashlib.sha256).digest()
    return int.from_bytes(digest[24:32], "big")


def test_add_addr_rfc_form_vector() -> None:
    sender, receiver = 0x1FDB5DF328BC3DEF, 0x29A6C86981AD933C
    v4, v6 = bytes((10, 0, 2, 1)), bytes.fromhex("20010db8000000000000000000000001")
    for addr in (v4, v6):
        for port in (None, 8080):
            want = rfc8684_add_addr_hmac(sender, receiver, 1, addr, port)
            assert crypto.add_addr_hmac(sender, receiver, 1, addr, port) == want
            assert crypto.add_addr_hmac_ok(sender, receiver, 1, addr, port, want)
            assert not crypto.add_addr_hmac_ok(receiver, sender, 1, addr, port, want)
            assert not crypto.add_addr_hmac_ok(sender, receiver, 2, addr, port, want)
    # a fixed value, so a change of definition is noticed
    assert crypto.add_addr_hmac(sender, receiver, 1, v4, None) == rfc8684_add_addr_hmac(sender, receiver, 1, v4, None)
    assert crypto.add_addr_hmac(sender, receiver, 1, v4, 0) == crypto.add_addr_hmac(sender, receiver, 1, v4, None)
    # the legacy form: same key and message, leftmost 64 bits
    for port in (None, 8080):
        msg = bytes([1]) + v4 + struct.pack("!H", port or 0)
        left = int.from_bytes(hmac.new(struct.pack("!QQ", sender, receiver), msg, hashlib.sha256).digest()[:8], "big")
        legacy = crypto.add_addr_hmac_legacy(sender, receiver, 1, v4, port)
        assert legacy == left
        assert crypto.add_addr_hmac_ok(sender, receiver, 1, v4, port, legacy)
        assert not crypto.add_addr_hmac_ok(sender, receiver, 1, v4, 8081, legacy)


# ------------------------------------------------------------------ DSS checksum


def expand32(low: int, near: int) -> int:
    """64-bit value whose low 32 bits are ``low``, closest to ``near``."""
    base = (near & ~0xFFFFFFFF) | low
    return min((base - 2**32, base, base + 2**32), key=lambda v: abs(v - near))


def dss_mappings_verified(name: str) -> tuple[int, int]:
    """Verify every DSS mapping with a checksum in a v0 capture; returns (verified, with checksum)."""
    frames = capture(name)
    isn: dict[tuple, int] = {}  # (src, sport, dst, dport) -> subflow ISN
    conn_of: dict[tuple, int] = {}  # subflow direction -> sender's key
    tokens: dict[int, int] = {}  # token -> key
    streams: dict[tuple, bytearray] = {}
    # pass 1: handshakes and subflow byte streams (relative to the ISN)
    pending_join: dict[tuple, int] = {}
    for _, seg, opts in frames:
        d = (seg.src, seg.sport, seg.dst, seg.dport)
        if seg.flags & SYN:
            isn[d] = seg.seq
        for o in opts:
            if isinstance(o, m.MpCapable) and o.receiver_key is None and o.sender_key is not None:
                conn_of[d] = o.sender_key
                tokens[crypto.key_token(o.sender_key, o.version)] = o.sender_key
            if isinstance(o, m.MpJoin) and o.phase == m.JoinPhase.SYN:
                pending_join[d] = o.token
        if d in isn and seg.payload_len:
            rel = (seg.seq - isn[d]) & 0xFFFFFFFF
            buf = streams.setdefault(d, bytearray())
            if len(buf) < rel + seg.payload_len:
                buf.extend(bytes(rel + seg.payload_len - len(buf)))
            buf[rel : rel + seg.payload_len] = seg.payload
    # a join's two directions belong to the token's connection: the SYN
    # sender sends with the key of the other side of the token's owner
    for d, token in pending_join.items():
        server_key = tokens[token]
        client_key = next(k for k in tokens.values() if k != server_key)
        conn_of[d] = client_key
        conn_of[(d[2], d[3], d[0], d[1])] = server_key
    verified = total = 0
    for number, seg, opts in frames:
        d = (seg.src, seg.sport, seg.dst, seg.dport)
        for o in opts:
            if not (isinstance(o, m.Dss) and o.dsn is not None and o.checksum is not None):
                continue
            total += 1
            idsn = crypto.key_idsn(conn_of[d], 0)
            dsn64 = o.dsn if o.dsn64 else expand32(o.dsn, idsn)
            n = o.dll - (1 if o.data_fin else 0)
            if n == 0:
                payload = b""
            else:
                payload = bytes(streams[d][o.ssn : o.ssn + n])
                assert len(payload) == n, number
            assert crypto.dss_checksum_ok(dsn64, o.ssn, o.dll, o.checksum, payload), (number, o)
            assert crypto.dss_checksum(dsn64, o.ssn, o.dll, payload) == o.checksum
            # any change to the mapping fails the check
            assert not crypto.dss_checksum_ok(dsn64 + 1, o.ssn, o.dll, o.checksum, payload)
            verified += 1
    return verified, total


def test_every_dss_checksum_in_mptcp_v0() -> None:
    verified, total = dss_mappings_verified("mptcp-v0.pcap")
    assert verified == total > 100


def test_every_dss_checksum_in_mptcp_fclose() -> None:
    verified, total = dss_mappings_verified("mptcp-fclose.pcap")
    assert verified == total == 2


def test_dss_checksum_known_mapping() -> None:
    # mptcp-fclose.pcap frame 6: one byte at DSN 2976985014 (low 32 bits), subflow seq 1
    seg, (dss,) = by_frame("mptcp-fclose.pcap")[6]
    idsn = crypto.key_idsn(0x9B59BE3D695E66A7, 0)
    dsn64 = expand32(dss.dsn, idsn)
    assert dsn64 & 0xFFFFFFFF == 2976985014 and dsn64 == idsn + 1
    assert dss.checksum == 0x9E91
    assert crypto.dss_checksum_ok(dsn64, 1, 1, 0x9E91, bytes(seg.payload))
    assert not crypto.dss_checksum_ok(dss.dsn, 1, 1, 0x9E91, bytes(seg.payload))  # DSN not expanded


@settings(max_examples=300)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF), st.binary(max_size=200))
def test_dss_checksum_round_trip(dsn: int, ssn: int, dll: int, payload: bytes) -> None:
    c = crypto.dss_checksum(dsn, ssn, dll, payload)
    assert crypto.dss_checksum_ok(dsn, ssn, dll, c, payload)
    # RFC 8684 3.3.1: one's complement sum over the pseudo-header (DSN, SSN, len, zero checksum) and data
    data = struct.pack("!QIHH", dsn, ssn, dll, 0) + payload + (b"\0" if len(payload) % 2 else b"")
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    assert c == (~s & 0xFFFF)
