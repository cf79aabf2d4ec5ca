"""Every finding of the fuzzers, as a readable regression test (the fix is named in each docstring)."""

from __future__ import annotations

import pytest

from mproxy.config import ConfigError, parse_config
from mproxy.core.events import ConnectionOpened, PassThrough, SubflowRefused
from mproxy.core.tracker import _MAX_HELD, Tracker, TrackerConfig
from mproxy.wire.packet import ACK, SYN
from tests.core.session import Session, run, seg, streams
from tests.fuzz.targets import alerts_available, check_bounded


def test_late_synack_of_expired_handshake_does_not_leak_the_connection() -> None:
    """A SYN/ACK arriving after the handshake timeout closed the connection re-indexed its token
    (and re-opened it): the closed Connection stayed referenced from the token index forever.
    Fix: Tracker._on_syn ignores SYNs of closed connections."""
    s = Session()
    syn, synack, _ack = s.handshake()
    tr = Tracker(TrackerConfig(handshake_timeout=5.0))
    ev = tr.process(seg(syn, 1000.0))
    ev += tr.process(seg(synack, 1010.0))  # expiry runs first: the handshake is 10 s old
    assert not tr.connections and not tr._tokens
    assert not any(isinstance(e, ConnectionOpened) for e in ev)
    check_bounded(tr)


def test_syn_retransmission_flood_holds_a_bounded_number_of_packets() -> None:
    """Every retransmitted SYN of a connection still in its handshake was held (to pass through on
    fallback) without a limit. Fix: at most ``_MAX_HELD`` packets are held."""
    s = Session()
    syn = s.handshake()[0]
    tr = Tracker()
    run(tr, [syn] * 5000, flush=False)
    (conn,) = tr.connections.values()
    assert len(conn.held) == _MAX_HELD
    ev = tr.flush()
    assert sum(isinstance(e, PassThrough) for e in ev) == _MAX_HELD


def test_per_connection_subflow_limit_holds_for_pickups_and_late_attached_joins() -> None:
    """Subflows first seen mid-stream (attached by DSN proximity) and joins refused at the limit
    but attached later by their data bypassed ``max_subflows_per_connection``. Fix: both paths
    check the limit; the extra subflow stays an orphan whose bytes never count."""
    s = Session()
    pkts = s.handshake() + [s.data(0, True, 0, b"a" * 100)]
    for path in range(1, 7):
        s.join(path)  # the subflow exists; its handshake is never shown to the tracker
        pkts.append(s.data(len(s.subs) - 1, True, 100 * path, bytes([97 + path]) * 100))
    pkts += s.join(9)  # a join over the limit, then data on it
    pkts.append(s.data(len(s.subs) - 1, True, 700, b"z" * 100))
    # the server acknowledges the bytes on each subflow (mid-stream ones count only then)
    pkts += [s.ack(i, False, s.idsn[0] + 300) for i in range(1, len(s.subs))]
    tr = Tracker(TrackerConfig(max_subflows_per_connection=3))
    ev = run(tr, pkts, flush=False)
    (conn,) = tr.connections.values()
    assert len(conn.subflows) == 3
    assert tr.stats.refused["per_connection_limit"] == 5
    assert sum(isinstance(e, SubflowRefused) for e in ev) == 5
    assert conn.streams[0].released == 300  # only the attached subflows' bytes count
    check_bounded(tr)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+inf"])
def test_config_rejects_non_finite_numbers(value: str) -> None:
    """TOML has nan and inf; ``idle_timeout = nan`` made every connection expire at once.
    Fix: float settings must be finite."""
    with pytest.raises(ConfigError, match=r"\[tracker\] idle_timeout: must be a finite number"):
        parse_config(f"[tracker]\nidle_timeout = {value}\n")


def test_config_deep_nesting_is_a_config_error() -> None:
    """tomllib recurses per nesting level: RecursionError escaped parse_config. Fix: ConfigError."""
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_config("x = " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_config("x = " + "{a = " * 5000 + "1" + "}" * 5000)


@pytest.mark.skipif(not alerts_available(), reason="mproxy/core/alerts.py not there yet")
def test_alert_with_infinite_numbers_is_malformed_not_a_crash() -> None:
    """Python's json accepts ``Infinity``; int(inf) raised OverflowError out of the alert parser.
    Fix: _port and _opt_int treat it like any other bad number."""
    from mproxy.core.alerts import AlertStats, parse_alert_line

    st = AlertStats()
    line = ('{"event_type":"alert","src_ip":"198.18.1.2","src_port":%s,"dest_ip":"198.18.10.2","dest_port":80,'
            '"proto":"TCP","alert":{"signature_id":%s}}')
    assert parse_alert_line(line % ("Infinity", "1"), st) is None
    assert st.malformed["port"] == 1
    a = parse_alert_line(line % ("40000", "-Infinity"), st)
    assert a is not None and a.sid is None


def test_a_reload_keeps_the_per_content_cap_on_kept_matches() -> None:
    """Found by the ``inspect`` target: a reload (``Inspector.adopt``) merged the matches the old
    rules kept with those the new rules find in the carried-over tail, and the merged list was not
    cut to ``_OCCURRENCES`` (258 of 256) until that content matched again. Fix: ``adopt`` cuts it
    and counts the excess as shed. The fuzzer's input, replayed."""
    from tests.fuzz.targets import target_inspect

    target_inspect(
        b'\x02\x02\x00\x00\x00@\x02\x0e\x00\xdd\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00'
        b'\xac\x00\x00\x00}\x00\x97\x00\x00\x00*\x00\x00\x0c\x03\x00\x00\x00\x14@' + bytes(68) + b"\x01")


def test_a_synack_with_another_isn_does_not_move_the_sequence_space() -> None:
    """A second SYN/ACK with another ISN, after the server's bytes were kept after a hole, set the
    direction's ISN again: the kept segment then lay at the subflow's next byte (check_bounded: a
    kept segment must start after it) and read as though in order. Linux took the first SYN/ACK
    and discards the other. Fix: Tracker._on_syn ignores a SYN/ACK whose ISN is not the first's."""
    s = Session(1)
    hs = s.handshake()
    pk = hs + [s.data(0, True, 0, b"GET"), s.data(0, False, 10, b"later", rel=11)]  # after a hole of 10
    sub = s.subs[0]
    sub.isn[1] += 10  # the forged SYN/ACK's ISN: the kept segment's seq - 1
    pk.append(s._pkt(sub, False, SYN | ACK, []))
    sub.isn[1] -= 10
    pk += [s.data(0, False, 0, b"0123456789", rel=1), s.ack(0, True, s.idsn[1] + 15)]
    pk += [s.data_fin(0, True, 3), s.data_fin(0, False, 15)]
    tr = Tracker()
    ev = []
    for i, p in enumerate(pk):
        ev += tr.process(seg(p, 1000.0 + i * 0.001))
        check_bounded(tr)
    ev += tr.flush()
    assert [v for (_, d), v in streams(ev).items() if d == 1] == [b"0123456789later"]
