"""Interface pinning: each subflow direction keeps the interface its first packet came in on, and a
later packet of that direction on another interface is refused (inline: dropped). A host on the
client's side can send packets with the server's addresses to the gateway, which forwards them back
out: the server never sees them, so none of them may move what mproxy reads."""
from __future__ import annotations

import hashlib
import json
import struct

from mproxy.core.events import Notice
from mproxy.core.gateway import Gateway, Verdict
from mproxy.core.pipeline import Pipeline
from mproxy.core.tracker import Tracker, TrackerConfig
from mproxy.wire.packet import ACK, SYN

from .session import Session, c2s, notice_types, seg

CLIENT_IF, SERVER_IF, JOIN_IF = 3, 5, 4


def feed(t: Tracker, packets: list[tuple[bytes, int]]) -> list:
    ev: list = []
    ts = 1000.0
    for p, iface in packets:
        ts += 0.0001
        ev += t.process(seg(p, ts), False, iface)
    return ev




def evasion(s: Session, forged_if: int) -> list[tuple[bytes, int]]:
    """BENIGN after a hole in the initial subflow (kept until the hole fills), then an ACK with the
    server's addresses that acknowledges past it, in on ``forged_if``, then the real bytes over the
    hole, mapped to the same DSNs. The ACK went to the client, never through the server's TCP, which
    keeps BENIGN out of order until the hole fills and then reads UNION SELECT."""
    hs = s.handshake()
    pk = [(hs[0], CLIENT_IF), (hs[1], SERVER_IF), (hs[2], CLIENT_IF), (s.data(0, True, 0, b"abcd"), CLIENT_IF)]
    pk.append((s.data(0, True, 4, b"BENIGN", rel=15), CLIENT_IF))  # subflow bytes 15-20, after a hole
    pk.append((s._pkt(s.subs[0], False, ACK, [], ack_rel=21), forged_if))  # "the server has them all"
    pk.append((s.data(0, True, 4, b"UNION SELECT 1,2", rel=5), CLIENT_IF))  # subflow bytes 5-20
    pk += [(s.ack(0, False, s.idsn[0] + 20), SERVER_IF), (s.data_fin(0, True, 20), CLIENT_IF),
           (s.data_fin(0, False, 0), SERVER_IF)]
    return pk


def test_an_ack_spoofed_from_the_clients_side_does_not_release_a_kept_segment() -> None:
    s = Session(1)
    t = Tracker()
    ev = feed(t, evasion(s, CLIENT_IF)) + t.flush()
    assert c2s(ev) == b"abcdUNION SELECT 1,2"
    assert notice_types(ev) == ["wrong_interface"]
    assert t.stats.wrong_interface == 1
    (n,) = [e for e in ev if isinstance(e, Notice)]
    assert "interface 3" in n.detail and "interface 5" in n.detail


def test_the_same_ack_from_the_servers_side_releases_it() -> None:
    """The control: an ACK that does come from the server's side passes the kept segment, which is
    then read (the server had it; the later copy's mapping contradicts it and is refused)."""
    s = Session(1)
    t = Tracker()
    ev = feed(t, evasion(s, SERVER_IF)) + t.flush()
    assert c2s(ev).startswith(b"abcdBENIGN")
    assert "wrong_interface" not in notice_types(ev)


def test_off_or_without_interfaces_nothing_is_refused() -> None:
    for cfg, unknown in ((TrackerConfig(pin_interfaces=False), False), (TrackerConfig(), True)):
        s = Session(1)
        t = Tracker(cfg)
        pk = [(p, 0 if unknown else i) for p, i in evasion(s, CLIENT_IF)]
        ev = feed(t, pk) + t.flush()
        assert c2s(ev).startswith(b"abcdBENIGN")
        assert t.stats.wrong_interface == 0


def test_each_subflow_direction_has_its_own_interface() -> None:
    """A join on another client path, and a one-sided path (the server's packets in on one
    interface for both subflows): nothing refused, every byte read."""
    s = Session(1)
    t = Tracker()
    hs, js = s.handshake(), s.join(1)
    pk = [(hs[0], CLIENT_IF), (hs[1], SERVER_IF), (hs[2], CLIENT_IF),
          (js[0], JOIN_IF), (js[1], SERVER_IF), (js[2], JOIN_IF),
          (s.data(0, True, 0, b"GET /?q="), CLIENT_IF), (s.data(1, True, 8, b"UNION SELECT"), JOIN_IF),
          (s.data(1, False, 0, b"HTTP/1.1 200"), SERVER_IF), (s.ack(0, False, s.idsn[0] + 20), SERVER_IF),
          (s.data_fin(1, True, 20), JOIN_IF), (s.data_fin(0, False, 12), SERVER_IF)]
    ev = feed(t, pk) + t.flush()
    assert c2s(ev) == b"GET /?q=UNION SELECT"
    assert t.stats.wrong_interface == 0 and "wrong_interface" not in notice_types(ev)


def test_a_new_connection_on_the_4_tuple_of_an_ended_one_starts_afresh() -> None:
    """A SYN reusing a 4-tuple whose subflow ended may come in elsewhere (a route changed since):
    it opens the new connection, and the new subflow is pinned by its own packets."""
    s = Session(1)
    t = Tracker()
    hs = s.handshake()
    pk = [(hs[0], CLIENT_IF), (hs[1], SERVER_IF), (hs[2], CLIENT_IF), (s.data(0, True, 0, b"one"), CLIENT_IF),
          (s.ack(0, False, s.idsn[0] + 3), SERVER_IF), (s.data_fin(0, True, 3), CLIENT_IF),
          (s.data_fin(0, False, 0), SERVER_IF), (s.fin(0, True), CLIENT_IF), (s.fin(0, False), SERVER_IF)]
    feed(t, pk)
    s2 = Session(1)  # the same addresses and ports, other keys and ISNs
    s2._isn += 7777
    hs2 = s2.handshake()
    ev = feed(t, [(hs2[0], JOIN_IF), (hs2[1], SERVER_IF), (hs2[2], JOIN_IF), (s2.data(0, True, 0, b"two"), JOIN_IF),
                  (s2.data(0, True, 3, b"!", rel=4), CLIENT_IF)])
    assert t.stats.wrong_interface == 1  # (the last one: the new subflow is pinned to JOIN_IF)
    assert c2s(ev + t.flush()) == b"two"


def test_the_gateway_drops_what_the_tracker_refused() -> None:
    s = Session(1)
    gw = Gateway()
    verdicts = [gw.packet(p, 1000.0 + i * 0.001, False, iface) for i, (p, iface) in enumerate(evasion(s, CLIENT_IF))]
    assert [d.verdict for d in verdicts].count(Verdict.DROP) == 1
    (dropped,) = [d for d in verdicts if d.verdict == Verdict.DROP]
    assert dropped.reason == "wrong interface"
    assert gw.stats.actions["wrong_interface_drop"] == 1
    assert [r["type"] for r in gw.drain_records() if r["event"] == "notice"] == ["wrong_interface"]


def sll2(ip: bytes, ifindex: int, pkttype: int = 0) -> bytes:
    """A Linux cooked v2 header (``tcpdump -i any``) before ``ip``."""
    return struct.pack("!HHIHBB8s", 0x0800, 0, ifindex, 1, pkttype, 6, bytes(8)) + ip


def test_a_replay_reads_the_interface_from_linux_cooked_v2_frames() -> None:
    """The capture's interface index pins as NFQUEUE's in-device does; a frame the capturing host
    sent (packet type 4: each forwarded packet again, going out) does not count; with several
    inputs (interface numbers of different hosts) the pipeline is told to leave them alone."""
    s = Session(1)
    pk = evasion(s, CLIENT_IF)
    out = [(sll2(p, i), i) for p, i in pk]
    out.insert(3, (sll2(pk[2][0], SERVER_IF, pkttype=4), 0))  # the third ACK again, going out to the server
    want = hashlib.sha256(b"abcdUNION SELECT 1,2").hexdigest()
    for link in (True, False):
        pipe = Pipeline()
        pipe.link_ifaces = link
        for n, (frame, _) in enumerate(out):
            pipe.feed(276, frame, 1000.0 + n * 0.001)
        pipe.finish()
        t = pipe.tracker
        assert t.stats.wrong_interface == (1 if link else 0)
        (rec,) = [r for r in pipe.drain_records() if r["event"] == "mptcp_connection"]
        assert (rec["c2s"]["sha256"] == want) == link


def test_a_subflow_picked_up_mid_stream_is_pinned_by_its_first_packet_each_way() -> None:
    """A subflow picked up mid-stream (no handshake seen) is pinned by the first packet each way."""
    s = Session(1)
    s.handshake()
    t = Tracker()
    pk = [(s.data(0, True, 0, b"abcd"), CLIENT_IF), (s.data(0, False, 0, b"ok"), SERVER_IF),
          (s.data(0, True, 4, b"efgh"), CLIENT_IF), (s.data(0, False, 2, b"!!"), CLIENT_IF)]
    feed(t, pk)
    assert t.stats.wrong_interface == 1
    (sf, d) = t.subflow_of(seg(pk[0][0]))
    assert sf.dirs[d].iface == CLIENT_IF and sf.dirs[d ^ 1].iface == SERVER_IF
    assert not seg(pk[0][0]).flags & SYN


def test_replay_pins_only_when_asked_and_with_one_input(tmp_path, capsys) -> None:
    from mproxy.cli import main
    from mproxy.io.pcap import PcapWriter
    from mproxy.wire.packet import LinkType

    s = Session(1)
    cap = tmp_path / "c.pcap"
    with open(cap, "wb") as f:
        w = PcapWriter(f, linktype=LinkType.LINUX_SLL2)
        for n, (p, i) in enumerate(evasion(s, CLIENT_IF)):
            w.write(1_700_000_000.0 + n * 0.001, sll2(p, i))
    for extra, refused in (((), 0), (("--pin-interfaces",), 1)):
        log = tmp_path / "log.jsonl"
        assert main(["replay", str(cap), "--out", str(tmp_path / "o.pcap"), "--log", str(log), "-q", *extra]) == 0
        recs = [json.loads(x) for x in log.read_text().splitlines()]
        assert [r["type"] for r in recs if r["event"] == "notice"].count("wrong_interface") == refused
    assert main(["replay", str(cap), str(cap), "--out", str(tmp_path / "o.pcap"), "--pin-interfaces"]) == 2
    assert "--pin-interfaces takes one input" in capsys.readouterr().err
