"""Anomaly notices, end to end: crafted captures (our encoder, written with PcapWriter) through
``mproxy replay --log``, then the notice records and the metrics snapshot are checked.

Each anomaly has a benign twin that must stay silent, so a notice means something. The clean
reference captures and the lab's kernel traffic raising nothing is checked in
tests/test_reference_notices.py and tests/lab/test_replay_lab.py.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mproxy.cli import main
from mproxy.core.events import Notice, NoticeType
from mproxy.core.policy import Policy
from mproxy.core.tracker import _JOIN_FLOOD_KEYS, Tracker, TrackerConfig
from mproxy.io.pcap import PcapWriter
from mproxy.wire import mptcp as m
from mproxy.wire.packet import ACK, LinkType
from mproxy.wire.rewrite import fill_tcp_checksum

from .session import Session, seg

NOTICE_FIELDS = {"event", "ts", "type", "conn_id", "detail", "src", "sport", "dst", "dport"}


class Replayed:
    def __init__(self, records: list[dict[str, Any]], metrics: str) -> None:
        self.records = records
        self.notices = [r for r in records if r["event"] == "notice"]
        self.conns = [r for r in records if r["event"] == "mptcp_connection"]
        self.metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for fam in text_string_to_metric_families(metrics) for s in fam.samples}

    def types(self) -> Counter[str]:
        return Counter(n["type"] for n in self.notices)

    def of(self, t: str) -> list[dict[str, Any]]:
        return [n for n in self.notices if n["type"] == t]

    def counted(self, t: str) -> float:
        return self.metrics[("mproxy_notices_total", (("type", t),))]


def replay(tmp_path: Path, packets: list[bytes], *, step: float = 0.001, name: str = "crafted",
           tracker: str = "", ifaces: list[int] | None = None, args: tuple[str, ...] = ()) -> Replayed:
    """Write ``packets`` (raw IP; with ``ifaces``, Linux cooked v2 frames of those interface
    indexes, as ``tcpdump -i any`` writes) as a pcap, 1 ms apart, and run ``mproxy replay`` on it
    (with a ``[tracker]`` table of ``tracker`` settings, if any)."""
    cap = tmp_path / f"{name}.pcap"
    with open(cap, "wb") as f:
        w = PcapWriter(f, linktype=LinkType.RAW if ifaces is None else LinkType.LINUX_SLL2)
        for i, p in enumerate(packets):
            if ifaces is not None:
                p = struct.pack("!HHIHBB8s", 0x0800 if p[0] >> 4 == 4 else 0x86DD, 0, ifaces[i], 1, 0, 6, bytes(8)) + p
            w.write(1_700_000_000.0 + i * step, p)
    log, prom = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.prom"
    cfg = []
    if tracker:
        (tmp_path / f"{name}.toml").write_text(f"[tracker]\n{tracker}\n")
        cfg = ["-c", str(tmp_path / f"{name}.toml")]
    assert main(["replay", str(cap), "--out", str(tmp_path / f"{name}.out.pcap"), "--log", str(log),
                 "--metrics", str(prom), "-q", *cfg, *args]) == 0
    res = Replayed([json.loads(x) for x in log.read_text().splitlines()], prom.read_text())
    for n in res.notices:  # every notice record is complete: time, type, connection, 4-tuple
        assert set(n) == NOTICE_FIELDS, n
        assert n["ts"] >= 1_700_000_000.0 and n["detail"]
    for t, k in res.types().items():  # the metric counts exactly the records
        assert res.counted(t) == k, t
    return res


def only(res: Replayed, t: str, n: int = 1) -> list[dict[str, Any]]:
    assert res.types() == Counter({t: n}), res.notices
    return res.of(t)


def clean(s: Session) -> list[bytes]:
    """A complete, unremarkable exchange on the session's first subflow."""
    return [s.data(0, True, 0, b"GET / HTTP/1.0\r\n\r\n"), s.data(0, False, 0, b"HTTP/1.0 200 OK\r\n\r\n"),
            s.data_fin(0, True, 18), s.data_fin(0, False, 19)]


# --------------------------------------------------------------------------- invalid options
def test_invalid_option_length(tmp_path: Path) -> None:
    s = Session(1)
    pk = s.handshake()
    bad_dss = bytes((30, 5, 0x20, 0x01, 0x00))  # DSS with the Data-ACK flag needs 8 bytes, not 5
    pk.append(s._pkt(s.subs[0], True, ACK, [bad_dss]))
    (n,) = only(replay(tmp_path, pk + clean(s)), "invalid_option")
    assert "mptcp_bad_length" in n["detail"] and n["conn_id"] == 1
    assert (n["src"], n["dport"]) == ("198.18.1.2", 80)


def test_invalid_option_flags_inconsistent_with_subtype(tmp_path: Path) -> None:
    s = Session(1)
    pk = s.handshake()
    join_syn_form = m.MpJoin(m.JoinPhase.SYN, False, 1, 0x01020304, 0x05060708).encode()
    pk.append(s._pkt(s.subs[0], True, ACK, [join_syn_form]))  # the SYN form of MP_JOIN on a plain ACK
    (n,) = only(replay(tmp_path, pk + clean(s)), "invalid_option")
    assert "mptcp_wrong_tcp_flags" in n["detail"]


# --------------------------------------------------------------------------- MP_CAPABLE keys
@pytest.mark.parametrize("version", [0, 1])
def test_key_change_between_handshake_and_ack(tmp_path: Path, version: int) -> None:
    s = Session(version)
    syn, synack, _ack = s.handshake()
    other = m.MpCapable(version, m.CAP_H_HMAC, s.ck, s.sk ^ 0xFF).encode()  # server key not the SYN/ACK's
    pk = [syn, synack, s._pkt(s.subs[0], True, ACK, [other])]
    (n,) = only(replay(tmp_path, pk + clean(s)), "key_change")
    assert "server key" in n["detail"] and n["conn_id"] == 1
    if version == 0:  # v0 also carries the client key in the SYN
        s2 = Session(0)
        syn, synack, _ack = s2.handshake()
        other = m.MpCapable(0, m.CAP_H_HMAC, s2.ck ^ 1, s2.sk).encode()
        (n,) = only(replay(tmp_path, [syn, synack, s2._pkt(s2.subs[0], True, ACK, [other])], name="v0c"),
                    "key_change")
        assert "client key" in n["detail"]


def test_clean_handshake_raises_nothing(tmp_path: Path) -> None:
    for version in (0, 1):
        s = Session(version)
        res = replay(tmp_path, s.handshake() + clean(s), name=f"v{version}")
        assert not res.notices and res.conns[0]["outcome"] == "data_fin"


# --------------------------------------------------------------------------- ADD_ADDR
def add_addr(s: Session, addr_id: int, host: int, path: int) -> bytes:
    ann = m.AddAddr(1, addr_id, s.addr(host, path), None, False, 0x1122334455667788)
    return s._pkt(s.subs[0], False, ACK, [ann.encode(), m.dss(s.idsn[0]).encode()])


def test_add_addr_id_reused_for_another_address(tmp_path: Path) -> None:
    s = Session(1)
    pk = s.handshake() + [add_addr(s, 5, 2, 11), add_addr(s, 5, 2, 12)]
    (n,) = only(replay(tmp_path, pk + clean(s)), "add_addr_id_reuse")
    assert "198.18.12.2" in n["detail"] and "198.18.11.2" in n["detail"]
    assert (n["src"], n["sport"]) == ("198.18.9.2", 80)  # sent by the server


def test_add_addr_repeat_is_counted_not_noticed(tmp_path: Path) -> None:
    """Linux retransmits an ADD_ADDR until it is echoed: the same announcement again is benign."""
    s = Session(1)
    pk = s.handshake() + [add_addr(s, 5, 2, 11), add_addr(s, 5, 2, 11), add_addr(s, 5, 2, 11)]
    # an ID freed with REMOVE_ADDR may be used again for another address
    pk.append(s._pkt(s.subs[0], False, ACK, [m.RemoveAddr((5,)).encode()]))
    pk.append(add_addr(s, 5, 2, 12))
    res = replay(tmp_path, pk + clean(s))
    assert not res.notices
    assert res.conns[0]["add_addr_repeats"] == 2
    assert res.metrics[("mproxy_add_addr_repeats_total", ())] == 2


# --------------------------------------------------------------------------- MP_JOIN
def test_join_unknown_token(tmp_path: Path) -> None:
    s = Session(1)
    (n,) = only(replay(tmp_path, s.handshake() + s.join(1, token=0xDEADBEEF)[:1]), "join_unknown_token")
    assert n["conn_id"] is None and "0xdeadbeef" in n["detail"] and n["src"] == "198.18.2.2"


def test_join_to_an_address_never_seen(tmp_path: Path) -> None:
    s = Session(1)
    pk = s.handshake() + s.join(1, server=s.addr(2, 13))
    (n,) = only(replay(tmp_path, pk), "join_unknown_address")
    assert n["conn_id"] == 1 and n["dst"] == "198.18.13.2"
    # the same join to an address the server announced is normal
    s2 = Session(1)
    pk = s2.handshake() + [add_addr(s2, 1, 2, 13)] + s2.join(1, server=s2.addr(2, 13))
    res = replay(tmp_path, pk + clean(s2), name="announced")
    assert not res.notices and len(res.conns[0]["subflows"]) == 2


def test_join_hmac_failure(tmp_path: Path) -> None:
    s = Session(1)
    res = replay(tmp_path, s.handshake() + s.join(1, bad_hmac=True) + clean(s))
    (n,) = only(res, "join_hmac_failure")
    assert n["conn_id"] == 1 and n["sport"] == s.subs[1].client[1]
    assert res.metrics[("mproxy_subflows_refused_total", (("reason", "join_hmac"),))] == 1
    assert [sf["role"] for sf in res.conns[0]["subflows"]] == ["initial"]  # detached, never contributes


def test_join_flood_against_one_receiver(tmp_path: Path) -> None:
    """Default threshold (32 per 10 s): 60 join SYNs with the connection's token -> one notice."""
    s = Session(1)
    pk = s.handshake()
    for _ in range(60):
        pk.append(s.join(1)[0])
    res = replay(tmp_path, pk)
    (n,) = only(res, "join_flood")
    assert n["conn_id"] == 1 and n["dst"] == "198.18.9.2" and "more than 32" in n["detail"]
    # a connection's usual handful of joins is no flood
    s2 = Session(1)
    pk = s2.handshake()
    for i in range(1, 8):
        pk += s2.join(i, addr_id=i)
    assert not replay(tmp_path, pk + clean(s2), name="eight").notices


def test_syn_flood_at_the_connection_limit_is_one_notice_not_a_record_per_syn(tmp_path: Path) -> None:
    """100 MP_CAPABLE SYNs nobody answers against max_connections = 5: 95 evictions. The first 32
    of the window are recorded, the 33rd raises syn_flood, the rest are only counted; a legitimate
    connection after the flood is still tracked and rebuilt."""
    pk = [Session(1, sport=20000 + i).handshake()[0] for i in range(100)]
    s = Session(1, sport=40000)
    pk += s.handshake() + clean(s)
    res = replay(tmp_path, pk, tracker="max_connections = 5")
    (n,) = only(res, "syn_flood")
    assert n["conn_id"] is None and "more than 32 half-open" in n["detail"] and "limit (5)" in n["detail"]
    evicted = [c for c in res.conns if c["outcome"] == "evicted"]
    assert len(evicted) == 32 and {c["client_port"] for c in evicted} == set(range(20000, 20032))
    assert res.metrics[("mproxy_connections_closed_total", (("outcome", "evicted"),))] == 96  # + 1 for s
    (legit,) = [c for c in res.conns if c["client_port"] == 40000]
    assert legit["outcome"] == "data_fin" and legit["c2s"]["bytes"] == 18
    # benign twins: a limit that bites now and then records every eviction and raises nothing;
    # syn_flood_threshold = 0 records a flood's every eviction
    few = [Session(1, sport=20000 + i).handshake()[0] for i in range(30)]
    s = Session(1, sport=40000)
    res = replay(tmp_path, few + s.handshake() + clean(s), tracker="max_connections = 5", name="few")
    assert not res.notices and sum(c["outcome"] == "evicted" for c in res.conns) == 26
    res = replay(tmp_path, pk, tracker="max_connections = 5\nsyn_flood_threshold = 0", name="off")
    assert not res.notices and sum(c["outcome"] == "evicted" for c in res.conns) == 96


def test_join_flood_with_random_tokens_folds_the_unknown_token_notices(tmp_path: Path) -> None:
    s = Session(1)
    pk = s.handshake()
    for i in range(100):
        pk.append(s.join(1, token=0x10000 + i)[0])
    res = replay(tmp_path, pk)
    assert res.types() == Counter({"join_unknown_token": 32, "join_flood": 1}), res.types()
    assert res.of("join_flood")[0]["conn_id"] is None and "unknown tokens" in res.of("join_flood")[0]["detail"]


def test_join_flood_window_threshold_and_bounded_state() -> None:
    """Configurable threshold and window; one notice per window; state stays bounded."""
    t = Tracker(TrackerConfig(join_flood_threshold=3, join_flood_window=1.0))
    s = Session(1)
    ts = 1000.0
    ev = []
    for p in s.handshake():
        ev += t.process(seg(p, ts))
    joins = [s.join(1)[0] for _ in range(20)]

    def feed(pkts: list[bytes], start: float, step: float) -> list[NoticeType]:
        out = []
        for i, p in enumerate(pkts):
            out += [e.type for e in t.process(seg(p, start + i * step)) if isinstance(e, Notice)]
        return out

    assert feed(joins[:3], 1001.0, 0.1) == []  # at the threshold: quiet
    assert feed(joins[3:8], 1001.3, 0.1) == [NoticeType.JOIN_FLOOD]  # over it: one notice
    assert feed(joins[8:11], 1002.5, 0.1) == []  # a new window, under the threshold again
    assert feed(joins[11:20], 1004.0, 0.05) == [NoticeType.JOIN_FLOOD]  # next window's flood
    # many receivers: never more than the cap, ended windows pruned
    spray = Session(1, server_key=0x0102030405060708)
    spray.handshake()
    for i in range(_JOIN_FLOOD_KEYS + 50):
        t.process(seg(spray.join(1, server=spray.addr(i % 250 + 1, 100 + i // 250))[0], 1010.0))
    assert len(t._join_windows) <= _JOIN_FLOOD_KEYS
    t.process(seg(s.data(0, True, 0, b"x"), 1020.0))
    assert len(t._join_windows) <= 1
    # disabled: no counting at all
    off = Tracker(TrackerConfig(join_flood_threshold=0))
    for p in s.handshake():
        off.process(seg(p, 1000.0))
    for p in joins:
        off.process(seg(p, 1000.5))
    assert not off._join_windows and not off.stats.notices.get("join_flood")


# --------------------------------------------------------------------------- data level
def test_overlap_mismatch_across_subflows(tmp_path: Path) -> None:
    s = Session(1)
    pk = s.handshake() + s.join(1)
    pk += [s.data(0, True, 0, b"benign request"), s.data(1, True, 0, b"UNION SELECT 1")]
    res = replay(tmp_path, pk)
    (n,) = only(res, "overlap_mismatch")
    assert n["conn_id"] == 1
    # no packet 4-tuple for a data-level finding: the connection's (what the IDS sees)
    assert (n["src"], n["sport"], n["dst"], n["dport"]) == ("198.18.1.2", 40000, "198.18.9.2", 80)
    # the same bytes reinjected on the other path are normal
    s2 = Session(1)
    pk = s2.handshake() + s2.join(1)
    pk += [s2.data(0, True, 0, b"benign request"), s2.data(1, True, 0, b"benign request")]
    assert not replay(tmp_path, pk + [s2.data_fin(0, True, 14), s2.data_fin(0, False, 0)], name="reinj").notices


def test_side_channel_and_capture_gap(tmp_path: Path) -> None:
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"seen")]
    pk.append(s.ack(0, False, s.idsn[0] + 104))  # the server acknowledges 100 bytes we never saw
    pk.append(s.data(0, True, 104, b"after"))
    pk.append(s.data(0, False, 0, b"reply"))
    pk.append(s.data(0, False, 50, b"later"))  # 45 bytes missing, nobody acknowledged them
    res = replay(tmp_path, pk)
    assert res.types() == Counter({"side_channel": 1, "capture_gap": 1}), res.notices
    assert "100 bytes" in res.of("side_channel")[0]["detail"]
    assert res.metrics[("mproxy_gap_bytes_total", (("kind", "side_channel"),))] == 100
    assert res.metrics[("mproxy_gap_bytes_total", (("kind", "capture"),))] == 45


def test_acked_bytes_a_seen_subflow_carried_are_a_capture_gap_not_a_side_channel(tmp_path: Path) -> None:
    """Segments of a subflow the gateway sees that the capture lost (or a full queue passed, fail
    open): the receiver acknowledges them, on that subflow too, so they crossed the gateway and are
    no side channel (which on_side_channel may fast-close). Before, every packet a capture dropped
    read as a side channel. Bytes sent on a path the gateway does not see leave no such hole, and
    a receiver whose subflow ack stays at the hole keeps the gap a side channel."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"a" * 100)]
    s.data(0, True, 100, b"b" * 200)  # lost by the capture: subflow bytes 100-300, dsn +100..+300
    pk.append(s.data(0, True, 300, b"c" * 50))
    pk.append(s.ack(0, False, s.idsn[0] + 350))  # the server's TCP ack and DATA_ACK cover all of it
    res = replay(tmp_path, pk)
    assert res.types() == Counter({"capture_gap": 1}), res.notices
    assert ("200 bytes at dsn" in res.of("capture_gap")[0]["detail"]
            and "sent on a subflow the gateway sees" in res.of("capture_gap")[0]["detail"])
    assert res.metrics[("mproxy_gap_bytes_total", (("kind", "capture"),))] == 200
    assert res.metrics[("mproxy_gap_bytes_total", (("kind", "side_channel"),))] == 0

    # the same hole, but the server's subflow ack stays at it: those bytes never reached it on this
    # subflow (the DATA_ACK says they came another way), so the gap is a side channel
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"a" * 100)]
    s.data(0, True, 100, b"b" * 200)
    pk.append(s.data(0, True, 300, b"c" * 50))
    s.subs[0].next_rel[0] = 100
    pk.append(s.ack(0, False, s.idsn[0] + 350))
    res = replay(tmp_path, pk, name="stuck")
    assert res.types() == Counter({"side_channel": 1}), res.notices

    # part of a gap crossed a seen subflow, part came on a path the gateway does not see
    s = Session(1)
    pk = s.handshake() + s.join(1) + [s.data(0, True, 0, b"a" * 100)]
    s.data(0, True, 100, b"b" * 100)  # lost: dsn +100..+200
    pk.append(s.data(0, True, 200, b"c" * 100))
    s.data(1, True, 300, b"d" * 100)  # on the joined subflow, not captured at all: dsn +300..+400
    pk.append(s.data(0, True, 400, b"e" * 10))
    pk.append(s.ack(0, False, s.idsn[0] + 410))
    res = replay(tmp_path, pk, name="mixed")
    assert res.types() == Counter({"capture_gap": 1, "side_channel": 1}), res.notices
    assert res.metrics[("mproxy_gap_bytes_total", (("kind", "capture"),))] == 100
    assert res.metrics[("mproxy_gap_bytes_total", (("kind", "side_channel"),))] == 100
    assert res.of("side_channel")[0]["detail"].startswith("100 bytes at dsn")


def test_dss_checksum_failure(tmp_path: Path) -> None:
    s = Session(0, csum=True, dsn64=False)
    pk = s.handshake() + [s.data(0, True, 0, b"good")]
    bad = bytearray(s.data(0, True, 4, b"more"))
    bad[-1] ^= 0xFF  # payload changed after the DSS checksum was computed, and the TCP checksum
    fill_tcp_checksum(bad)  # fixed up (a middlebox that rewrites payload): the receiver takes the segment
    pk.append(bytes(bad))
    (n,) = only(replay(tmp_path, pk), "dss_checksum_failure")
    assert n["conn_id"] == 1 and n["sport"] == 40000
    s2 = Session(0, csum=True, dsn64=False)
    assert not replay(tmp_path, s2.handshake() + clean(s2), name="good").notices


def test_bad_checksum(tmp_path: Path) -> None:
    """A forged copy whose TCP checksum fails, on a join whose packets carried good ones: the
    receiver drops it, and so does the replay (tests/core/test_checksums.py has the cases)."""
    from .test_checksums import insertion

    res = replay(tmp_path, insertion(Session(1)))
    (n,) = only(res, "bad_checksum")
    assert n["sport"] == 40002 and "so does mproxy" in n["detail"]
    assert res.conns[0]["c2s"]["sha256"] == hashlib.sha256(b"GET /?q=UNION SELECT").hexdigest()
    assert res.metrics[("mproxy_bad_checksums_total", (("outcome", "dropped"),))] == 1
    # [tracker] checksums = "count": taken, and said
    res = replay(tmp_path, insertion(Session(1)), name="count", tracker='checksums = "count"')
    assert res.types() == Counter({"bad_checksum": 1, "overlap_mismatch": 1})
    assert res.metrics[("mproxy_bad_checksums_total", (("outcome", "taken"),))] == 1


def test_a_bad_checksum_mode_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[tracker]\nchecksums = "sometimes"\n')
    cap = tmp_path / "c.pcap"
    with open(cap, "wb") as f:
        PcapWriter(f, linktype=LinkType.RAW)
    assert main(["replay", str(cap), "--out", str(tmp_path / "o.pcap"), "-q", "-c", str(tmp_path / "c.toml")]) == 2


def test_fallback_to_infinite_mapping(tmp_path: Path) -> None:
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"mptcp ")]
    sub = s.subs[0]
    pk.append(s._pkt(sub, True, ACK, [m.dss(s.idsn[1], s.idsn[0] + 6, sub.next_rel[0], 0).encode()], b"then tcp"))
    (n,) = only(replay(tmp_path, pk), "infinite_mapping")
    assert n["conn_id"] == 1


def test_mp_fail(tmp_path: Path) -> None:
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"abc"), s._pkt(s.subs[0], False, ACK, [m.MpFail(s.idsn[0]).encode()])]
    (n,) = only(replay(tmp_path, pk), "mp_fail")
    assert n["src"] == "198.18.9.2"


def test_out_of_window_insertion(tmp_path: Path) -> None:
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"real"), s.ack(0, False, s.idsn[0] + 4)]
    pk.append(s.data(0, True, 4, b"EVIL", rel=5 + 50_000_000))  # far outside the window
    pk.append(s.data(0, True, 4, b"good"))
    res = replay(tmp_path, pk)
    only(res, "out_of_window")
    assert res.conns[0]["c2s"]["bytes"] == 8


def test_bad_mapping_moves_subflow_bytes(tmp_path: Path) -> None:
    """The same subflow bytes mapped a second time to other DSNs: the first placement stands."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"abcd")]
    # a "retransmission" placing them at offset 4 as well: a TCP receiver drops it as a duplicate,
    # so the server reads "abcdefgh"; honouring the mapping would show the IDS "abcdabcd"
    pk.append(s.data(0, True, 4, b"abcd", rel=1))
    pk += [s.data(0, True, 4, b"efgh"), s.data_fin(0, True, 8), s.data_fin(0, False, 0)]
    res = replay(tmp_path, pk)
    (n,) = only(res, "bad_mapping")
    assert n["conn_id"] == 1
    (c,) = res.conns
    assert c["c2s"]["bytes"] == 8 and c["outcome"] == "data_fin"
    assert c["c2s"]["sha256"] == hashlib.sha256(b"abcdefgh").hexdigest()
    # a mapping spanning two segments, the second retransmitted with the same mapping: normal
    s2 = Session(1)
    pk = s2.handshake()
    pk.append(s2.data(0, True, 0, b"abcdef", map_len=12))
    pk.append(s2.data(0, True, 6, b"ghijkl", map_rel=1, map_len=12))
    pk.append(s2.data(0, True, 6, b"ghijkl", map_rel=1, map_len=12, rel=7))
    pk += [s2.data_fin(0, True, 12), s2.data_fin(0, False, 0)]
    res = replay(tmp_path, pk, name="retrans")
    assert not res.notices and res.conns[0]["c2s"]["bytes"] == 12


@pytest.mark.parametrize("one_mapping", [False, True])
def test_a_mapping_whose_head_keeps_an_earlier_placement_places_its_tail(tmp_path: Path, one_mapping: bool) -> None:
    """Forged bytes at the subflow's next sequence number, mapped far ahead, then the client's real
    segment over them and beyond: TCP drops its head as old, and Linux reads its tail with its
    mapping (a lab capture showed it). Refusing the whole segment left a hole in the IDS stream."""
    s = Session(1)
    pk = s.handshake() + [s.data(0, True, 0, b"abcd")]
    pk.append(s.data(0, True, 50_000_000, b"XXXX"))  # subflow bytes 5-8, far past any window
    if one_mapping:  # one mapping over two segments, both carrying it
        pk.append(s.data(0, True, 4, b"efghijkl", rel=5, map_len=12))
        pk.append(s.data(0, True, 12, b"mnop", rel=13, map_rel=5, map_len=12))
    else:
        pk.append(s.data(0, True, 4, b"efghijkl", rel=5))
        pk.append(s.data(0, True, 12, b"mnop", rel=13))
    pk.append(s.data(0, True, 4, b"efgh", rel=17))  # the sender's reinjection of what the receiver missed
    pk += [s.ack(0, False, s.idsn[0] + 16), s.data_fin(0, True, 16), s.data_fin(0, False, 0)]
    res = replay(tmp_path, pk)
    assert res.types()["bad_mapping"] == 1, res.notices
    (c,) = res.conns
    assert c["c2s"]["sha256"] == hashlib.sha256(b"abcdefghijklmnop").hexdigest(), c["c2s"]
    assert c["c2s"]["gap_count"] == 0 and c["outcome"] == "data_fin", (c, res.notices)


def test_memcap_notice() -> None:
    t = Tracker(TrackerConfig(ooo_limit=100))
    s = Session(1)
    ev = []
    for i, p in enumerate(s.handshake() + [s.data(0, True, 1000 + 50 * k, b"x" * 50) for k in range(4)]):
        ev += t.process(seg(p, 1000.0 + i * 0.001))
    types = [e.type for e in ev if isinstance(e, Notice)]
    assert NoticeType.MEMCAP in types and t.stats.memcap["out_of_order"] > 0


@pytest.mark.parametrize("limit", ["memcap", "ooo_limit"])
def test_memcap_stall(limit: str) -> None:
    """Inline (on_memcap = "drop"), a resend of a subflow's next bytes that a buffer limit refuses a
    third time, past the slack its third copy may use: the connection may wait for it for good,
    which the operator is told once. Room again (the stream's next bytes came), it is taken. The
    slack is SLACK past the connection's own ooo_limit too, not the whole memcap: one connection
    that resends every segment three times still cannot take what the others may need."""
    from mproxy.core.gateway import Gateway, Verdict
    from mproxy.core.reassembler import PIECE_COST, SLACK

    s = Session(1)
    data = bytes(range(256)) * 300  # 76,800 bytes
    opening = s.handshake() + s.join(1)
    # [0, 1000) is late on the join; the initial subflow runs ahead: two segments fill the memcap,
    # the third (60,000 bytes) gets in past it on its third copy, the fourth does not fit in the slack
    cuts = [1000, 2000, 3000, 63000, len(data)]
    ahead = [s.data(0, True, a, data[a:b], rel=a - 999) for a, b in zip(cuts, cuts[1:])]
    gw = Gateway(Policy(clamp_window=False),  # (the crafted sender ignores windows)
                 TrackerConfig(memcap=2 * (1000 + PIECE_COST)) if limit == "memcap" else TrackerConfig(ooo_limit=2000))
    ts = iter(1000.0 + i / 1000 for i in range(100))
    got = [gw.packet(p, next(ts)).verdict for p in opening + ahead[:2] + [ahead[2]] * 3 + [ahead[3]] * 4]
    assert got == [Verdict.ACCEPT] * 8 + [Verdict.DROP] * 2 + [Verdict.ACCEPT] + [Verdict.DROP] * 4
    stalls = [r for r in gw.drain_records() if r.get("type") == "memcap_stall"]
    (n,) = stalls
    assert f"(seq {s.subs[0].isn[0] + 62001}) refused 3 times" in n["detail"] and n["sport"] == 40000
    st = gw.tracker.connections[1].streams[0]
    assert st.ooo_bytes == 62000 and gw.tracker.budget.used <= gw.tracker.budget.limit + SLACK
    assert gw.tracker.stats.notices["memcap_stall"] == 1
    assert gw.packet(s.data(1, True, 0, data[:1000]), next(ts)).verdict == Verdict.ACCEPT
    assert gw.packet(ahead[3], next(ts)).verdict == Verdict.ACCEPT
    gw.packet(s.data_fin(0, True, len(data)), next(ts))
    gw.flush(1100.0)
    (c,) = [r for r in gw.drain_records() if r["event"] == "mptcp_connection"]
    assert c["c2s"]["sha256"] == hashlib.sha256(data).hexdigest() and gw.tracker.budget.used == 0


def test_wrong_interface(tmp_path: Path) -> None:
    """An ACK with the server's addresses that came in on the client's side (``tcpdump -i any``
    records the interface) acknowledges past a segment kept after a hole: with ``--pin-interfaces``
    it is refused, so the bytes that fill the hole are read, as the server read them."""
    from tests.core.test_interfaces import CLIENT_IF, evasion

    pk = evasion(Session(1), CLIENT_IF)
    res = replay(tmp_path, [p for p, _ in pk], ifaces=[i for _, i in pk], args=("--pin-interfaces",))
    (n,) = only(res, "wrong_interface")
    assert "interface 3" in n["detail"] and n["sport"] == 80
    assert res.metrics[("mproxy_wrong_interface_packets_total", ())] == 1
    (c,) = res.conns
    assert c["c2s"]["bytes"] == 20 and c["c2s"]["sha256"] == hashlib.sha256(b"abcdUNION SELECT 1,2").hexdigest()


def test_low_ttl(tmp_path: Path) -> None:
    """BENIGN with TTL 3, then the real bytes at the same place: the replay reads the real bytes,
    notices the low TTL once and counts it."""
    from tests.core.test_ttl import REAL, insertion

    res = replay(tmp_path, insertion(Session(1)))
    assert res.types() == Counter({"low_ttl": 1, "out_of_window": 1})  # (BENIGN refused: the real copy came first)
    (n,) = res.of("low_ttl")
    assert "TTL 3, below the 64" in n["detail"] and n["sport"] == 40000
    assert res.metrics[("mproxy_low_ttl_packets_total", ())] == 1
    (c,) = res.conns
    assert c["c2s"]["sha256"] == hashlib.sha256(b"GET /?q=" + REAL).hexdigest()


def test_every_notice_type_is_exercised() -> None:
    """Guard: a new NoticeType needs a test here (and a README line)."""
    text = Path(__file__).read_text()
    for nt in NoticeType:
        assert f'"{nt.value}"' in text or f"NoticeType.{nt.name}" in text, nt
