"""IDS alert lines: Suricata eve.json and Snort 3 alert_json; anything else is counted, never raised."""

from __future__ import annotations

import ipaddress
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy.core.alerts import AlertStats, parse_alert_line

A = lambda s: ipaddress.ip_address(s).packed  # noqa: E731

EVE = {"timestamp": "2025-05-01T10:00:00.000000+0000", "flow_id": 1, "in_iface": "sink1", "event_type": "alert",
       "src_ip": "198.18.1.2", "src_port": 40000, "dest_ip": "198.18.10.2", "dest_port": 80, "proto": "TCP",
       "alert": {"action": "allowed", "gid": 1, "signature_id": 2006446, "rev": 14,
                 "signature": "ET WEB_SERVER Possible SQL Injection Attempt UNION SELECT", "severity": 1}}


def test_suricata_eve_alert() -> None:
    st = AlertStats()
    a = parse_alert_line(json.dumps(EVE), st)
    assert a is not None and a.source == "suricata"
    assert (a.src, a.sport, a.dst, a.dport) == (A("198.18.1.2"), 40000, A("198.18.10.2"), 80)
    assert a.sid == 2006446 and a.gid == 1 and a.rev == 14 and "UNION SELECT" in a.msg
    assert a.reason().startswith("sid 2006446: ET WEB_SERVER")
    assert st.alerts == 1 and st.lines == 1


def test_suricata_ipv6_and_other_events_ignored() -> None:
    st = AlertStats()
    v6 = dict(EVE, src_ip="2001:db8:1::2", dest_ip="2001:db8:10::2")
    a = parse_alert_line(json.dumps(v6).encode(), st)
    assert a is not None and a.src == A("2001:db8:1::2")
    assert parse_alert_line(json.dumps({"event_type": "flow", "src_ip": "1.2.3.4"}), st) is None
    assert parse_alert_line(json.dumps(dict(EVE, proto="UDP")), st) is None
    assert st.ignored == 2 and st.alerts == 1 and not st.malformed


def test_snort3_alert_json_forms() -> None:
    st = AlertStats()
    line = {"timestamp": "05/01-10:00:00.000000", "pkt_num": 7, "proto": "TCP", "pkt_gen": "stream_tcp",
            "pkt_len": 120, "dir": "C2S", "src_ap": "198.18.1.2:40000", "dst_ap": "198.18.10.2:80",
            "rule": "1:1000002:1", "action": "allow", "msg": "SQL injection UNION SELECT", "gid": 1,
            "sid": 1000002, "rev": 1}
    a = parse_alert_line(json.dumps(line), st)
    assert a is not None and a.source == "snort" and a.sid == 1000002 and a.dport == 80
    v6 = dict(line, src_ap="2001:db8:1::2:40000", dst_ap="[2001:db8:10::2]:80")
    b = parse_alert_line(json.dumps(v6), st)
    assert b is not None and b.src == A("2001:db8:1::2") and b.sport == 40000 and b.dst == A("2001:db8:10::2")
    split = {"src_addr": "198.18.1.2", "src_port": "40000", "dst_addr": "198.18.10.2", "dst_port": 80,
             "msg": "m", "sid": "5"}
    c = parse_alert_line(json.dumps(split), st)
    assert c is not None and c.sport == 40000 and c.sid == 5
    assert st.alerts == 3


def test_malformed_lines_are_counted_by_kind() -> None:
    st = AlertStats()
    bad = ["not json", "[1, 2]", json.dumps({"hello": 1}), json.dumps(dict(EVE, src_ip="nope")),
           json.dumps(dict(EVE, dest_port=70000)), json.dumps(dict(EVE, alert="x")),
           json.dumps({"src_ap": "1.2.3.4", "dst_ap": "5.6.7.8:1"}), b"\xff\xfe",
           json.dumps(dict(EVE, src_ip="2001:db8::1"))]
    for line in bad:
        assert parse_alert_line(line, st) is None
    assert parse_alert_line("   ", st) is None  # blank: not a line of the feed
    assert st.lines == len(bad) and st.alerts == 0
    assert st.malformed == {"not_json": 1, "not_an_object": 1, "unknown_format": 1, "address": 3, "port": 1,
                            "alert_field": 1, "not_utf8": 1}


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200),
                 st.dictionaries(st.sampled_from(["event_type", "src_ip", "src_port", "dest_ip", "dest_port",
                                                  "alert", "src_ap", "dst_ap", "proto", "sid"]),
                                 st.one_of(st.none(), st.integers(), st.text(max_size=20), st.booleans(),
                                           st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)))
                 .map(json.dumps)))
def test_never_raises(line: object) -> None:
    st_ = AlertStats()
    parse_alert_line(line, st_)  # type: ignore[arg-type]
