"""The embedded inspector on rebuilt streams: matches across chunk boundaries, case, direction, window."""

from __future__ import annotations

import functools
import ipaddress
import itertools
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from mproxy.core.events import Direction
from mproxy.core.inspector import _OCCURRENCES, Inspector, PcreLimit
from mproxy.core.rules import RuleError, parse_rules

CLI = (ipaddress.ip_address("198.18.1.2").packed, 40000)
SRV = (ipaddress.ip_address("198.18.10.2").packed, 80)
RULES = parse_rules(r'''
alert tcp any any -> any 80 (msg:"plain"; content:"UNION+SELECT"; nocase; flow:to_server; sid:1;)
alert tcp any any -> any any (msg:"exact"; content:"Secret"; sid:2;)
alert tcp any any -> any any (msg:"two"; content:"alpha"; content:"omega"; sid:3;)
alert tcp any any -> any any (msg:"re"; content:"drop"; nocase; pcre:"/drop\s+table\s+\w+;/i"; sid:4;)
alert tcp any any -> any any (msg:"re only"; pcre:"/evil[0-9]{3}x/"; sid:5;)
alert tcp any any -> any any (msg:"to client"; content:"LEAK"; flow:to_client; sid:6;)
''')


def inspector(rules: Any, **kw: Any) -> Inspector:
    """An Inspector whose pcre budget (unless a test sets it) is seconds, not the 20 ms default: a
    loaded machine must not turn a search into a PcreLimit and a test into a flake (seen once)."""
    kw.setdefault("pcre_budget", 5.0)
    return Inspector(rules, **kw)


def feed_all(ins: Inspector, chunks: list[bytes], direction: Direction = Direction.C2S, conn: int = 1) -> list[int]:
    out = []
    for c in chunks:
        out += [m.sid for m in ins.feed(conn, direction, c, CLI, SRV)]
    return out


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    pts = sorted({min(max(c, 0), len(data)) for c in cuts})
    out, prev = [], 0
    for p in pts + [len(data)]:
        if p > prev:
            out.append(data[prev:p])
            prev = p
    return out


@settings(max_examples=200, deadline=None)
@given(prefix=st.binary(max_size=300), suffix=st.binary(max_size=300),
       needle=st.sampled_from([b"UNION+SELECT", b"union+select", b"UnIoN+sElEcT"]),
       cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=12))
def test_any_split_of_a_stream_containing_the_pattern_is_found(prefix: bytes, suffix: bytes, needle: bytes,
                                                               cuts: list[int]) -> None:
    data = prefix + needle + suffix
    ins = inspector(RULES)
    sids = feed_all(ins, splits(data, cuts))
    assert sids.count(1) == 1  # found, and only once


@settings(max_examples=100, deadline=None)
@given(gap=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0, max_value=260), max_size=8))
def test_pcre_and_multi_content_across_chunks(gap: bytes, cuts: list[int]) -> None:
    # the gap must not hold another rule's content (hypothesis also draws this module's literals)
    assume(not any(w in gap.lower() for w in (b"union+select", b"secret", b"drop", b"evil")))
    data = b"alpha" + gap.replace(b"omega", b"") + b"omega ; DROP  TABLE users; evil123x"
    sids = feed_all(inspector(RULES), splits(data, cuts))
    assert sorted(sids) == [3, 4, 5]


def test_case_sensitive_content_is_verified() -> None:
    ins = inspector(RULES)
    assert feed_all(ins, [b"a secret", b" SECRET", b" Sec", b"ret"]) == [2]


def test_direction_and_ports() -> None:
    ins = inspector(RULES)
    assert feed_all(ins, [b"UNION+SELECT"], Direction.S2C) == []  # flow:to_server
    assert feed_all(ins, [b"LEAK"], Direction.C2S, conn=2) == []
    assert feed_all(ins, [b"LEAK"], Direction.S2C, conn=2) == [6]
    other = (SRV[0], 8080)
    assert [m.sid for m in ins.feed(3, Direction.C2S, b"UNION+SELECT", CLI, other)] == []  # port 80 only


def test_contents_too_far_apart_do_not_match() -> None:
    ins = inspector(RULES, window=100)
    assert feed_all(ins, [b"alpha", b"." * 200, b"omega"]) == []
    assert feed_all(ins, [b"alpha omega"], conn=2) == [3]


def test_state_is_per_connection_and_released() -> None:
    ins = inspector(RULES)
    assert feed_all(ins, [b"UNION+SE"], conn=1) == []
    assert feed_all(ins, [b"LECT"], conn=2) == []  # another connection: no cross-talk
    assert feed_all(ins, [b"LECT"], conn=1) == [1]
    assert len(ins) == 2
    ins.close(1)
    ins.retain(set())
    assert len(ins) == 0


def test_reloaded_rules_take_over_live_connections_where_they_stand() -> None:
    """A rules reload (SIGHUP) replaces the inspector; live connections go on with the new rules from
    their current offset: a kept rule still finds a content split across the reload, a rule that
    fired does not fire again, a new rule catches what comes next, a removed one is gone."""
    old = inspector(RULES)
    assert feed_all(old, [b"xx Secret yy", b"... alp"]) == [2]  # sid 2 fired; sid 3 half seen
    assert feed_all(old, [b"UNION+SEL"], conn=2) == []  # sid 1 split across the reload
    new_rules = parse_rules(r'''
alert tcp any any -> any 80 (msg:"plain"; content:"UNION+SELECT"; nocase; flow:to_server; sid:1;)
alert tcp any any -> any any (msg:"exact"; content:"Secret"; sid:2;)
alert tcp any any -> any any (msg:"two"; content:"alpha"; content:"omega"; sid:3;)
alert tcp any any -> any any (msg:"new"; content:"xp_cmdshell"; sid:7;)
''')
    new = inspector(new_rules)
    offset = old._flows[(1, 0)].offset
    new.adopt(old)
    assert new.stats is old.stats and len(new) == 2 and not old._flows
    assert feed_all(new, [b""]) == [] and new._carried[0][1][(1, 0)].offset == offset  # taken on the next bytes
    # conn 1: "alpha" completes across the reload (its tail carried), omega then fires sid 3; Secret
    # does not fire again; the new rule fires; sid 4's pcre (removed) never runs
    assert feed_all(new, [b"ha ... Secret ... omega", b" xp_cmdshell; drop table t;"]) == [3, 7]
    assert feed_all(new, [b"ECT"], conn=2) == [1]
    assert not new._carried and not new._emaps  # every carried direction taken over: the old one is let go
    assert feed_all(new, [b"evil123x"], conn=3) == []  # sid 5 removed: a new connection gets the new rules
    assert old.stats.matches == 4


def test_after_a_reload_rules_see_what_the_old_rules_noted_and_the_tail() -> None:
    """A changed or new rule counts its contents where the old rules had noted them (within the
    window); a content no old rule had counts only from the carried tail on."""
    old = inspector(RULES)
    feed_all(old, [b"alpha ... beta", b"." * 2000])  # both beyond the 1024-byte tail; only "alpha" is a content
    alpha = old._eids[(b"alpha", False)]
    assert old._flows[(1, 0)].occ == {alpha: [5]}
    new = inspector(parse_rules('alert tcp any any -> any any (msg:"two"; content:"alpha"; content:"OMEGA"; '
                                'sid:3; rev:2;)\n'
                                'alert tcp any any -> any any (msg:"new"; content:"beta"; content:"OMEGA"; sid:8;)'))
    new.adopt(old)
    assert feed_all(new, [b"OMEGA"]) == [3]
    assert new._flows[(1, 0)].occ == {new._eids[(b"alpha", False)]: [5], new._eids[(b"OMEGA", False)]: [2019]}
    assert feed_all(new, [b" beta"]) == [8]


def test_a_new_rule_sees_its_contents_in_the_tail_carried_over_a_reload() -> None:
    """The attack split around the reload: "UNION+SELE" before it (matched by no rule then), "CT" after.
    The new rule finds "union" in the carried tail and "select" across the boundary; its pcre runs."""
    old = inspector(parse_rules('alert tcp any any -> any any (msg:"x"; content:"no-such-bytes-here"; sid:9;)'))
    assert feed_all(old, [b"GET /search?q=1%27+UNION+SELE"]) == []
    new = inspector(parse_rules(r'alert tcp any any -> any any (msg:"sqli"; content:"union"; nocase; '
                                r'content:"select"; nocase; pcre:"/union(\+|%20)+select/i"; sid:1000002;)'))
    new.adopt(old)
    assert feed_all(new, [b"CT+password+FROM+users--"]) == [1000002]
    # a content-only rule whose contents all lay in the tail fires with the next chunk
    old = inspector(parse_rules('alert tcp any any -> any any (msg:"x"; content:"no-such-bytes-here"; sid:9;)'))
    feed_all(old, [b"..xp_cmdshell.."])
    new = inspector(parse_rules('alert tcp any any -> any any (msg:"shell"; content:"xp_cmdshell"; sid:7;)'))
    new.adopt(old)
    assert feed_all(new, [b"next"]) == [7]


@settings(max_examples=200, deadline=None)
@given(prefix=st.binary(max_size=300), suffix=st.binary(max_size=300),
       cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=10),
       reloads=st.lists(st.integers(0, 12), min_size=1, max_size=3))
def test_reloading_the_same_rules_anywhere_changes_nothing(prefix: bytes, suffix: bytes, cuts: list[int],
                                                           reloads: list[int]) -> None:
    """Reloads (one or several, back to back or apart) of unchanged rules, on two connections of
    which the second is only fed at the end: the same matches as without."""
    data = prefix + b"alpha UNION+SELECT Secret omega ; DROP TABLE t; evil123x" + suffix
    chunks = splits(data, cuts)
    want = feed_all(inspector(RULES), chunks)
    ins = inspector(RULES)
    got: list[int] = []
    late = feed_all(ins, chunks[:1], conn=2)
    done = 0
    for at in sorted(reloads):
        got += feed_all(ins, chunks[done:at])
        done = max(done, at)
        again = inspector(RULES)
        again.adopt(ins)
        ins = again
    got += feed_all(ins, chunks[done:])
    late += feed_all(ins, chunks[1:], conn=2)
    assert got == want and late == want


def test_a_reload_forgets_connections_that_are_gone() -> None:
    old = inspector(RULES)
    feed_all(old, [b"abc"], conn=1)
    feed_all(old, [b"abc"], conn=2)
    new = inspector(RULES)
    new.adopt(old)
    new.retain({2})  # what the responder does with the tracker's live connections
    assert list(new._carried[0][1]) == [(2, 0)] and len(new) == 1
    new.close(2)
    assert len(new) == 0


_HEADERS = ["any any -> any any", "any any -> any 80", "198.18.1.0/24 any -> any any", "any any <> any 80",
            "!198.18.1.2 any -> any [80,443]", "any 80 -> any any", "any any -> 198.18.10.0/24 1024:",
            "[198.18.1.0/24,!198.18.1.7] any -> any any"]


@settings(max_examples=100, deadline=None)
@given(heads=st.lists(st.tuples(st.sampled_from(_HEADERS), st.sampled_from(["", "flow:to_server;", "flow:to_client;"])),
                      min_size=1, max_size=12),
       host=st.integers(1, 9), sport=st.sampled_from([80, 443, 40000, 1024]),
       dport=st.sampled_from([80, 443, 40000, 1024]), to_server=st.booleans())
def test_header_groups_apply_exactly_the_rules_that_apply(heads: list[tuple[str, str]], host: int, sport: int,
                                                          dport: int, to_server: bool) -> None:
    """A new direction tests each distinct header once: the rules it then inspects with are exactly
    those whose own header applies."""
    rules = parse_rules("\n".join(f'alert tcp {h} (msg:"r"; content:"x{i}"; {flow} sid:{i + 1};)'
                                  for i, (h, flow) in enumerate(heads)))
    ins = inspector(rules)
    cli = (ipaddress.ip_address(f"198.18.1.{host}").packed, sport)
    srv = (ipaddress.ip_address("198.18.10.2").packed, dport)
    d = Direction.C2S if to_server else Direction.S2C
    st_ = ins._dir(int(d), cli, srv)
    c = (ipaddress.ip_address(cli[0]), cli[1])
    s = (ipaddress.ip_address(srv[0]), srv[1])
    sender, receiver = (c, s) if to_server else (s, c)
    want = {i for i, r in enumerate(rules.rules) if r.applies(to_server, sender, receiver)}
    assert {i for i in range(len(rules.rules)) if ins._applies(st_, i)} == want


def test_a_content_repeated_further_on_in_the_same_chunk_does_not_hide_a_match() -> None:
    """An evasion the last-match-only state allowed: the attack, then padding past the window and one
    more copy of a content, all in one chunk (a big write released at once). The copy must not
    replace the match that lies close to the others."""
    pad = b"." * 5000
    assert feed_all(inspector(RULES), [b"alpha omega" + pad + b"alpha"]) == [3]
    assert feed_all(inspector(RULES), [b"omega alpha" + pad + b"omega" + pad + b"alpha"]) == [3]
    assert feed_all(inspector(RULES), [b"; drop table users;" + pad + b"drop"]) == [4]
    # and far apart they still do not match, however the chunks fall
    assert feed_all(inspector(RULES), [b"alpha" + pad + b"omega"]) == []
    assert feed_all(inspector(RULES), [b"alpha", pad, b"omega", pad, b"alpha"]) == []


POS = parse_rules(r'''
alert tcp any any -> any any (msg:"start"; content:"GET "; depth:4; sid:10;)
alert tcp any any -> any any (msg:"at 4"; content:"ZZ"; offset:4; depth:2; sid:11;)
alert tcp any any -> any any (msg:"uri"; content:"GET "; content:"/admin"; distance:0; within:10; sid:12;)
alert tcp any any -> any any (msg:"gap"; content:"key="; content:"|00 00|"; distance:4; within:2; sid:13;)
alert tcp any any -> any any (msg:"back"; content:"END"; content:"BE"; distance:-5; within:2; sid:14;)
''')


def pos_sids(chunks: list[bytes]) -> list[tuple[int, int]]:
    ins = inspector(POS)
    return [(m.sid, m.offset) for c in chunks for m in ins.feed(1, Direction.C2S, c, CLI, SRV)]


def test_offset_and_depth_count_from_the_start_of_the_stream() -> None:
    assert pos_sids([b"GE", b"T /"]) == [(10, 4)]
    assert pos_sids([b"xGET /"]) == []  # starts at 1: beyond depth 4
    assert pos_sids([b"POST / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1"]) == []  # a later request is not the start
    assert pos_sids([b"abcdZZ"]) == [(11, 6)]
    assert pos_sids([b"abcZZx", b"ZZ"]) == []  # at 3: starts too early; at 6: ends too late
    assert pos_sids([b"abcZZZ"]) == [(11, 6)]  # the overlapping match at 4 counts
    assert pos_sids([b"abc", b"dZ", b"Z"]) == [(11, 6)]


def test_distance_and_within_tie_a_content_to_the_one_before() -> None:
    assert pos_sids([b"GET /admin"]) == [(10, 4), (12, 10)]
    assert pos_sids([b"xGET /x/y/z/admin"]) == []  # "/admin" ends 17 bytes after "GET ": within 10
    # the first "GET " is too far; a later one is close enough (the match is not tied to the first)
    assert pos_sids([b"xGET ........ GET /admin"]) == [(12, 24)]
    assert pos_sids([b"/admin GET "]) == []  # distance:0: after, not before
    assert pos_sids([b"key=abcd\x00\x00"]) == [(13, 10)]
    assert pos_sids([b"key=abc\x00\x00"]) == []  # starts 3 after "key=": distance 4
    assert pos_sids([b"key=abcde\x00\x00"]) == []  # ends 5+... beyond within
    assert pos_sids([b"key=ab", b"cd\x00", b"\x00"]) == [(13, 10)]
    # negative distance: "BE" lies in [end of "END" - 5, end of "END" - 3]; the match ends with "END"
    assert pos_sids([b"xxxBEEND"]) == [(14, 8)]
    assert pos_sids([b"xxBExEND"]) == []
    assert pos_sids([b"BExxEND"]) == []


def test_a_rule_that_cannot_fit_the_window_is_refused() -> None:
    rs = parse_rules('alert tcp any any -> any any (content:"a"; content:"b"; distance:5000; sid:1;)', "w.rules")
    with pytest.raises(RuleError, match=r"w.rules:1: sid 1: .* inspector window \(4096 bytes\)"):
        inspector(rs)
    inspector(rs, window=8192)


_ATOMS = [b"a", b"b", b"ab", b"ba", b"aab"]


@st.composite
def _position_rules(draw: st.DrawFn) -> tuple[str, list[tuple[bytes, dict[str, int]]]]:
    """A rule of 1-3 contents over a two-letter alphabet with random position modifiers (distance
    never negative: there the dynamic programme picks one match of several, see the inspector)."""
    contents = []
    for i in range(draw(st.integers(1, 3))):
        pat = draw(st.sampled_from(_ATOMS))
        mods: dict[str, int] = {}
        if i and draw(st.booleans()):
            if draw(st.booleans()):
                mods["distance"] = draw(st.integers(0, 6))
            if draw(st.booleans()):
                mods["within"] = draw(st.integers(len(pat), len(pat) + 8))
        elif draw(st.integers(0, 3)) == 0:
            if draw(st.booleans()):
                mods["offset"] = draw(st.integers(0, 10))
            if draw(st.booleans()):
                mods["depth"] = draw(st.integers(len(pat), len(pat) + 12))
        contents.append((pat, mods))
    text = " ".join(f'content:"{p.decode()}"; ' + "".join(f"{k}:{v}; " for k, v in m.items()) for p, m in contents)
    return f'alert tcp any any -> any any (msg:"p"; {text}sid:1;)', contents


def _earliest(data: bytes, contents: list[tuple[bytes, dict[str, int]]], window: int) -> int | None:
    """By brute force: the smallest stream offset at which one match per content exists that obeys
    every modifier (Suricata's arithmetic) with all match ends within ``window``."""
    occ = []
    for pat, mods in contents:
        ends = []
        for s in range(len(data) - len(pat) + 1):
            e = s + len(pat)
            if data[s:e] != pat or s < mods.get("offset", 0):
                continue
            if "depth" in mods and e > mods.get("offset", 0) + mods["depth"]:
                continue
            ends.append(e)
        occ.append(ends)
    best = None
    for pick in itertools.product(*occ):
        ok = True
        for i in range(1, len(contents)):
            pat, mods = contents[i]
            if "distance" in mods or "within" in mods:
                d = mods.get("distance", 0)
                if pick[i] - len(pat) < pick[i - 1] + d or "within" in mods and pick[i] > pick[i - 1] + d + mods["within"]:
                    ok = False
                    break
        if ok and max(pick) - min(pick) <= window and (best is None or max(pick) < best):
            best = max(pick)
    return best


@settings(max_examples=300, deadline=None)
@given(rule=_position_rules(), data=st.binary(max_size=28).map(lambda b: bytes(b"ab"[x & 1] for x in b)),
       window=st.integers(2, 30), cuts=st.lists(st.integers(0, 28), max_size=6))
def test_position_modifiers_match_where_brute_force_says(rule: tuple[str, list[tuple[bytes, dict[str, int]]]],
                                                         data: bytes, window: int, cuts: list[int]) -> None:
    """Any chunking of the stream: the rule fires once, at the offset where a brute-force search over
    every choice of matches first finds one that satisfies it, or never if there is none."""
    text, contents = rule
    try:
        ins = inspector(parse_rules(text), window=window)
    except RuleError:
        assume(False)
    got = [m.offset for c in splits(data, cuts) for m in ins.feed(1, Direction.C2S, c, CLI, SRV)]
    want = _earliest(data, contents, window)
    assert got == ([] if want is None else [want])


def test_binary_contents_match_whole() -> None:
    """NUL bytes are part of a content (the Hyperscan binding's literal mode would cut it there)."""
    rs = parse_rules('alert tcp any any -> any any (msg:"a"; content:"a|00 01|"; sid:1;)\n'
                     'alert tcp any any -> any any (msg:"z"; content:"|00 00|"; content:"|ff|"; distance:0; sid:2;)')
    ins = inspector(rs)
    assert [m.sid for m in ins.feed(1, Direction.C2S, b"a a\x00 a\x01", CLI, SRV)] == []
    assert [m.sid for m in ins.feed(1, Direction.C2S, b"a\x00\x01", CLI, SRV)] == [1]
    assert [m.sid for m in ins.feed(2, Direction.C2S, b"\xff\x00\x00", CLI, SRV)] == []
    assert [m.sid for m in ins.feed(2, Direction.C2S, b"\xff", CLI, SRV)] == [2]


def test_a_flood_of_one_content_is_bounded_and_counted() -> None:
    """Partly matched rules keep at most _OCCURRENCES recent matches per content; the rest are
    counted (mproxy_inspector_shed_matches_total). The latest are kept, so an untied rule still
    matches, and memory stays bounded however many times the content repeats."""
    ins = inspector(RULES)
    assert feed_all(ins, [b"alpha" * 600]) == []  # 3000 bytes: all within the window
    st_, alpha = ins._flows[(1, 0)], ins._eids[(b"alpha", False)]
    assert len(st_.occ[alpha]) == _OCCURRENCES and ins.stats.shed == 600 - _OCCURRENCES
    assert feed_all(ins, [b"alpha" * 600]) == [] and len(st_.occ[alpha]) == _OCCURRENCES
    assert feed_all(ins, [b"omega"]) == [3]


def test_rules_sharing_a_content_share_its_match_list() -> None:
    """A thousand rules waiting on a common content ("|0d 0a|") in a stream full of it: one list of its
    match ends per direction, not one per rule (memory does not grow with the rule set)."""
    rs = parse_rules("\n".join(f'alert tcp any any -> any any (msg:"r"; content:"|0d 0a|"; content:"k{i}x"; sid:{i + 1};)'
                               for i in range(1000)))
    ins = inspector(rs)
    assert feed_all(ins, [b"line\r\n" * 600]) == []
    st_ = ins._flows[(1, 0)]
    assert list(st_.occ) == [ins._eids[(b"\r\n", False)]] and len(st_.occ[ins._eids[(b"\r\n", False)]]) <= _OCCURRENCES
    assert feed_all(ins, [b"k777x"]) == [778]


# ---------------------------------------------------------------------------- pcre time bound
# sid 11: nested repeats; on 30 a's not followed by b, backtracking tries 2^30 ways before it gives
# up. The gate cannot help: "ab" later in the chunk is a real match. sid 12: an ordinary pcre.
EVIL = parse_rules(r'''
alert tcp any any -> any any (msg:"evil"; content:"GET"; pcre:"/(?:a|a)+b/"; sid:11;)
alert tcp any any -> any any (msg:"fine"; content:"GET"; pcre:"/GET \/admin/"; sid:12;)
''')
SLOW = b"GET /admin?" + b"a" * 30 + b"c ab"


def test_a_backtracking_pcre_is_stopped_at_the_budget_and_reported_once() -> None:
    import time

    ins = inspector(EVIL, pcre_budget=0.05)
    t0 = time.perf_counter()
    found = ins.feed(1, Direction.C2S, SLOW, CLI, SRV)
    spent = time.perf_counter() - t0
    # Python re on these bytes would take years; 5 s only says "it did not hang"
    assert spent < 5.0
    # the budget went to sid 11 (a strike); sid 12, next in line, got a budget of its own and matched
    assert [(type(m).__name__, m.sid) for m in found] == [("PcreLimit", 11), ("Match", 12)]
    assert "pcre not decided within the time budget" in found[0].reason()
    assert found[0].offset == len(SLOW) and ins.stats.pcre_limits == 1 and ins.stats.matches == 1
    # the next chunk: tried again, counted again, not reported again
    again = ins.feed(1, Direction.C2S, b" " + SLOW, CLI, SRV)
    assert again == [] and ins.stats.pcre_limits == 2
    # another connection direction reports on its own
    assert [m.sid for m in ins.feed(2, Direction.C2S, SLOW, CLI, SRV)] == [11, 12]


def test_with_a_budget_to_spare_pcre_rules_match_as_before() -> None:
    ins = inspector(EVIL, pcre_budget=0.05)
    found = ins.feed(1, Direction.C2S, b"GET /admin HTTP/1.1\r\nx: aaab\r\n\r\n", CLI, SRV)
    assert sorted((type(m).__name__, m.sid) for m in found) == [("Match", 11), ("Match", 12)]
    assert ins.stats.pcre_limits == 0


def test_a_reload_keeps_which_rules_were_reported_as_limited_and_their_strikes() -> None:
    old = inspector(EVIL, pcre_budget=0.05)
    assert [m.sid for m in old.feed(1, Direction.C2S, SLOW, CLI, SRV)] == [11, 12]
    new = inspector(EVIL, pcre_budget=0.05)
    new.adopt(old)
    assert new.feed(1, Direction.C2S, b" " + SLOW, CLI, SRV) == []
    assert new.stats.pcre_limits == 2  # the counters carry on
    newer = inspector(EVIL, pcre_budget=0.05)
    newer.adopt(new)  # two strikes carried: the third gives sid 11 up, and it stays given up
    for _ in range(3):
        assert newer.feed(1, Direction.C2S, b" " + SLOW, CLI, SRV) == []
    assert newer.stats.pcre_limits == 3 and newer.stats.pcre_given_up == 1


def test_a_rule_that_keeps_running_out_of_time_is_given_up_and_masks_no_other() -> None:
    """Bytes that make one rule's pcre backtrack, sent with every packet: each packet cost the
    worker the whole budget (50 packets a second stall it), and the rules after it on the chunk
    were not started, so an attack carried in the same packets passed every other pcre rule.
    Now the rules after it get a budget of their own, and after pcre_strikes (3) such searches
    the rule is not searched on that direction again."""
    attack = b" UNION SELECT password FROM users"
    rs = parse_rules('alert tcp any any -> any any (msg:"evil"; content:"GET"; pcre:"/(?:a|a)+b/"; sid:11;)\n'
                     'alert tcp any any -> any any (msg:"sqli"; content:"UNION"; pcre:"/UNION\\s+SELECT/"; sid:13;)\n')
    ins = inspector(rs, pcre_budget=0.01)
    bait = SLOW + b"\r\n"
    got = [(type(m).__name__, m.sid) for m in ins.feed(1, Direction.C2S, bait + attack, CLI, SRV)]
    assert got == [("PcreLimit", 11), ("Match", 13)]  # the attack in the packet that carries the bait
    for _ in range(20):
        assert ins.feed(1, Direction.C2S, bait, CLI, SRV) == []
    st_ = ins._flows[(1, 0)]
    assert ins.stats.pcre_limits == 3 and ins.stats.pcre_given_up == 1 and st_.gave_up == {0}
    assert st_.strikes == {0: 3}
    # other directions are searched as before, and give up on their own
    assert [m.sid for m in ins.feed(2, Direction.C2S, bait + attack, CLI, SRV)] == [11, 13]
    assert ins.stats.pcre_limits == 4 and ins.stats.pcre_given_up == 1
    # pcre_strikes = 0: never given up (every packet costs the budget), still masking nothing
    never = inspector(rs, pcre_budget=0.01, pcre_strikes=0)
    for _ in range(5):
        never.feed(1, Direction.C2S, bait, CLI, SRV)
    assert [m.sid for m in never.feed(1, Direction.C2S, bait + attack, CLI, SRV)] == [13]
    assert never.stats.pcre_limits == 6 and never.stats.pcre_given_up == 0


SHARE_RULES = parse_rules(
    'alert tcp any any -> any any (msg:"evil"; content:"GET"; pcre:"/(?:a|a)+b/"; sid:11;)\n'
    'alert tcp any any -> any any (msg:"sqli"; content:"UNION"; pcre:"/UNION\\s+SELECT/"; sid:13;)\n'
    'alert tcp any any -> any any (msg:"plain"; content:"/etc/passwd"; sid:14;)\n')


def test_backtracking_fed_on_many_connections_takes_at_most_the_pcre_share() -> None:
    """Strikes bound what bytes that make a rule backtrack cost per connection direction, not in
    all: fed on 40 new connections, three budgets each stalled the worker (1.2 s of pcre here).
    With pcre_share 0.1 the searches of all connections together have a credit of 0.1 s (refilled
    at 0.1 s per second): once it is spent, pcre rules are not searched, each a starved
    PcreLimit, and content-only rules go on matching."""
    import time

    bait = SLOW + b"\r\n"
    ins = inspector(SHARE_RULES, pcre_budget=0.02, pcre_share=0.1)
    t0 = time.perf_counter()
    for conn in range(1, 41):
        for _ in range(3):
            ins.feed(conn, Direction.C2S, bait, CLI, SRV)
    spent = time.perf_counter() - t0
    st = ins.stats
    # every search was stopped (by its budget or the credit), so each is a pcre limit; without the
    # share each would have run its whole 20 ms budget: 2.4 s at least, whatever the load. With it
    # they take 0.1 s + 0.1 s per second spent, about 0.12 s (the bound is wide: a noisy machine)
    assert st.pcre_limits == 120 and st.pcre_starved > 0 and spent < 1.5, (spent, st)
    # while it is spent: the attack is reported as not searched (on_pcre_limit decides), a
    # content-only rule still fires
    got = ins.feed(41, Direction.C2S, b"GET /etc/passwd UNION SELECT 1", CLI, SRV)
    # (sid 11's pcre cannot match these bytes: its gate skips it, starved or not)
    assert [(type(m).__name__, m.sid) for m in got] == [("PcreLimit", 13), ("Match", 14)]
    assert isinstance(got[0], PcreLimit) and got[0].starved
    assert "pcre not searched, the inspector's pcre time share was spent" in got[0].reason()
    # the credit refills at the share: 0.3 s later there are 30 ms of searching again
    time.sleep(0.3)
    got = ins.feed(42, Direction.C2S, b"GET / UNION SELECT 1", CLI, SRV)
    assert [(type(m).__name__, m.sid) for m in got] == [("Match", 13)]
    # no bound (1, the default of the class, and what `replay --rules` uses): nothing starves
    free = inspector(SHARE_RULES, pcre_budget=0.001)
    for conn in range(1, 6):
        free.feed(conn, Direction.C2S, bait, CLI, SRV)
    assert free.stats.pcre_starved == 0 and free.stats.pcre_limits == 5


def test_a_search_stops_where_the_credit_ends_and_that_is_no_strike() -> None:
    ins = inspector(SHARE_RULES, pcre_budget=1.0, pcre_share=0.02)
    got = ins.feed(1, Direction.C2S, SLOW + b"\r\n", CLI, SRV)
    assert [(type(m).__name__, m.sid, m.starved) for m in got] == [("PcreLimit", 11, True)]
    st = ins._flows[(1, 0)]
    assert st.strikes == {} and ins.stats.pcre_starved == 1 and ins.stats.pcre_runs == 1


def test_a_reload_does_not_refill_the_pcre_credit() -> None:
    old = inspector(SHARE_RULES, pcre_budget=0.05, pcre_share=0.05)
    old.feed(1, Direction.C2S, SLOW + b"\r\n", CLI, SRV)  # spends the 50 ms credit
    assert old._credit < 0.01
    new = inspector(SHARE_RULES, pcre_budget=0.05, pcre_share=0.05)
    new.adopt(old)
    assert (new._credit, new._credit_at) == (old._credit, old._credit_at)
    wider = inspector(SHARE_RULES, pcre_share=0.5)
    wider.adopt(new)  # a larger share allows more from now on, it does not hand out credit at once
    assert wider._credit == new._credit


@functools.cache
def _shipped() -> tuple[Any, Inspector]:
    """The shipped rules, and an inspector with a 2 s budget (what a linear search never needs)."""
    from pathlib import Path

    from mproxy.core.rules import load_rules

    rs = load_rules(Path(__file__).resolve().parents[2] / "config" / "mproxy.rules")
    return rs, inspector(rs, pcre_budget=2.0)


_SQL_TOKENS = st.sampled_from([b"union", b"UNION", b"select", b"all", b"/*", b"*/", b"/**/", b"%2f%2a", b"%2a%2f",
                               b"%2F%2A", b"+", b"%20", b"%09", b"%2b", b"%a0", b" ", b"\t", b"'", b"%27", b"or", b"1",
                               b"=", b"%3d", b";", b"%3b", b"drop", b"table", b"x", b"../", b"<script", b"() {"])


@settings(max_examples=200, deadline=None)
@given(head=st.lists(_SQL_TOKENS, max_size=6), body=st.lists(_SQL_TOKENS, min_size=1, max_size=3),
       times=st.integers(1, 60), tail=st.lists(_SQL_TOKENS, max_size=6))
def test_the_shipped_pcres_never_backtrack_out_of_their_budget(head: list[bytes], body: list[bytes], times: int,
                                                               tail: list[bytes]) -> None:
    """Regression: the shipped UNION SELECT rules had (\\s|/\\*.*?\\*/)+: "union" and 30 comments were
    2^30 ways to split, years for a backtracking engine. On any mix of the tokens their pcres look
    for, runs of a few repeated many times included, each shipped pcre decides in far less than
    2 s (linear: microseconds)."""
    _decides(b"".join(head) + b"".join(body) * times + b"".join(tail))


@pytest.mark.parametrize("comment", [b"/**/", b" /*a*/", b"/**/%20", b"%2f%2a%2a%2f", b"%2F%2A*/%2a%2f", b"/*/*/"])
def test_the_shipped_union_select_pcres_are_linear_in_sql_comments(comment: bytes) -> None:
    _decides(b"1%27+union" + comment * 200 + b"x")
    _decides(b"UNION" + comment * 200 + b"ALL" + comment * 200 + b"x")


def _decides(data: bytes) -> None:
    rs, ins = _shipped()
    before = ins.stats.pcre_limits
    found = ins.feed(len(data), Direction.C2S, data, CLI, (SRV[0], 80))
    ins.close(len(data))
    assert not [m for m in found if isinstance(m, PcreLimit)] and ins.stats.pcre_limits == before
    for r in rs.rules:  # and searched on their own, from every start, gate or not (TimeoutError fails)
        if r.pcre is not None:
            r.pcre.regex.search(data, timeout=2.0)


# ---------------------------------------------------------------------------- pcre context at a stretch's start
def test_a_word_boundary_at_the_start_of_a_searched_stretch_sees_the_byte_before_it() -> None:
    """The stretch searched near a content starts ``window`` bytes before it; ``\\bunion`` must not
    match "xunion" merely because the stretch begins at its "u" (it did when stretches were cut out)."""
    rs = parse_rules(r'alert tcp any any -> any any (msg:"b"; content:"select"; pcre:"/\bunion /"; sid:1;)')
    w = 64
    stream = b"xunion " + b"." * (w - 12) + b"select"  # "select" ends w bytes after the "u"
    assert len(stream) == w + 1
    assert feed_all(inspector(rs, window=w, pcre_window=16), [stream]) == []
    assert feed_all(inspector(rs, window=w, pcre_window=16), [b" " + stream[1:]]) == [1]


def test_a_caret_matches_at_the_start_of_the_stream_or_of_a_line_not_of_a_stretch() -> None:
    rs = parse_rules('alert tcp any any -> any any (msg:"a"; pcre:"/^GET \\/admin.{10}/"; sid:2;)\n'
                     'alert tcp any any -> any any (msg:"m"; pcre:"/^POST \\/x.{10}/m"; sid:3;)')
    # the tail kept for pcre (16 bytes here) begins exactly at "GET": not the stream's start
    assert feed_all(inspector(rs, pcre_window=16), [b"x" * 100 + b"GET /admin" + b"." * 6, b"....."]) == []
    assert feed_all(inspector(rs, pcre_window=16), [b"GET /admin" + b"." * 6, b"....."]) == [2]
    # with m, after a newline that lies before the searched bytes
    assert feed_all(inspector(rs, pcre_window=16), [b"x" * 100 + b"\n", b"POST /x" + b"." * 9, b"...."]) == [3]
    assert feed_all(inspector(rs, pcre_window=16), [b"x" * 100 + b"!", b"POST /x" + b"." * 9, b"...."]) == []


_LOOK_HEADS = st.sampled_from(["", "^", "\\b", "\\B", "(?<=a)", "(?<!a)", "(?m)^", "(?<=\\n)"])
_LOOK_ATOMS = st.sampled_from(["a", "b", " ", "\\n", "\\w", "\\W", ".", "[ab]", ".{5}", "(?s:.{9})"])
_LOOK_TAILS = st.sampled_from(["", "", "$", "\\b", "(?=a)", "(?m:$)"])


@settings(max_examples=500, deadline=None)
@example(head="^", body=["b", "(?s:.{9})"], tail="", stream=b"a" * 12 + b"b" + b"a" * 12, cuts=[20])
@example(head="\\b", body=["b", "(?s:.{9})"], tail="", stream=b"a" * 12 + b"b" + b"a" * 12, cuts=[20])
@example(head="", body=["b"], tail="(?=a)", stream=b"ba", cuts=[1])  # the look-ahead answered by the next chunk
@given(head=_LOOK_HEADS, body=st.lists(_LOOK_ATOMS, min_size=1, max_size=4), tail=_LOOK_TAILS,
       stream=st.lists(st.sampled_from(b"ab \n"), max_size=60).map(bytes),
       cuts=st.lists(st.integers(0, 60), max_size=8))
def test_a_pcre_only_rule_searches_the_stream_as_specified(head: str, body: list[str], tail: str, stream: bytes,
                                                          cuts: list[int]) -> None:
    """Any chunking, pcre_window 8, patterns that look before and after a match: the rule fires when,
    for some chunk, a search of the *whole stream* from pcre_window bytes before the chunk to the
    chunk's end finds a match (also one wholly before the chunk: a look-ahead at its end could not
    be decided before the chunk came). The kept tail and its extra byte of context must make the
    inspector's search the same as that one (^, \\b and look-behinds at a stretch's start see the
    byte before it; cutting the stretch out gave them none)."""
    pattern = head + "".join(body) + tail
    rs = parse_rules(f'alert tcp any any -> any any (msg:"p"; pcre:"/{pattern}/"; sid:9;)')
    pcre = rs.rules[0].pcre
    assert pcre is not None
    chunks = splits(stream, cuts)
    want, start = False, 0
    for c in chunks:
        end = start + len(c)
        if pcre.regex.search(stream, max(0, start - 8), end):
            want = True
            break
        start = end
    got = feed_all(inspector(rs, pcre_window=8), chunks)
    assert got == ([9] if want else []), (pattern, stream, chunks)


@pytest.mark.parametrize("rule, chunks", [
    # the content comes after the pcre's match, in the next packet
    ('content:"select"; pcre:"/union\\s/";', [b"1 union ", b"select 2"]),
    ('content:"select"; nocase; pcre:"/union(\\s|\\+)/i";', [b"q=1 UNION+", b"a" * 300, b"SELECT 2"]),
    # a look-ahead at the match's end, answered by the next packet
    ('content:"admin"; pcre:"/admin(?=\\.php)/";', [b"GET /admin", b".php"]),
    ('pcre:"/passwd(?=%00)/";', [b"f=passwd", b"%00"]),
])
def test_a_pcre_match_need_not_take_the_new_bytes(rule: str, chunks: list[bytes]) -> None:
    """The packet boundary must not decide: a pcre match that lies wholly before the new bytes
    counts once what it waited for arrives (a content after it, or the bytes its look-ahead needs).
    It did not (the match had to end in the new bytes): split so, each of these rules was evaded."""
    rs = parse_rules(f'alert tcp any any -> any any (msg:"t"; {rule} sid:7;)')
    whole = b"".join(chunks)
    assert feed_all(inspector(rs), [whole]) == [7]
    assert feed_all(inspector(rs), chunks) == [7]
    assert feed_all(inspector(rs), [bytes([b]) for b in whole]) == [7]  # one byte per packet


def _fires_as_specified(stream: bytes, chunks: list[bytes], window: int, pcre_window: int) -> bool:
    """The rule ``content:"ab"; pcre:"/c[de]f/"`` by brute force: it fires when, for some chunk,
    there are a match of the content seen by then and not left behind (ending no more than
    ``window`` before the chunk) and a pcre match in the bytes searched for that chunk (from
    ``pcre_window`` before it to its end), each ending within ``window`` of the other's start."""
    contents = [i + 2 for i in range(len(stream) - 1) if stream[i : i + 2] == b"ab"]
    matches = [(i, i + 3) for i in range(len(stream) - 2)
               if stream[i : i + 1] == b"c" and stream[i + 1 : i + 2] in (b"d", b"e") and stream[i + 2 : i + 3] == b"f"]
    start = 0
    for c in chunks:
        end = start + len(c)
        for ce in contents:
            if not start - window <= ce <= end:
                continue
            for s, e in matches:
                if s >= max(0, start - pcre_window) and e <= end and s >= ce - window and e <= ce + window:
                    return True
        start = end
    return False


@settings(max_examples=600, deadline=None)
@example(stream=b"ab" + b"x" * 20 + b"cdf", cuts=[20])  # the pcre match a chunk after the content, > pcre_window on
@example(stream=b"cdf" + b"x" * 4 + b"ab", cuts=[8])  # the content a chunk after the pcre match
@given(stream=st.lists(st.sampled_from(b"abcdefx"), max_size=90).map(bytes), cuts=st.lists(st.integers(0, 90), max_size=8))
def test_a_content_and_pcre_rule_fires_as_specified_however_the_stream_is_cut(stream: bytes, cuts: list[int]) -> None:
    """Where the pcre match lies relative to the content (before or after, up to ``window``
    apart) and where the packets begin must not decide, beyond the one documented bound (the
    search looks no further back than ``pcre_window`` before the new bytes). Both used to: a pcre
    match more than pcre_window after its content and in a later packet was not searched, and one
    before a content that came in a later packet was not accepted."""
    rs = parse_rules('alert tcp any any -> any any (msg:"t"; content:"ab"; pcre:"/c[de]f/"; sid:8;)')
    chunks = splits(stream, cuts)
    want = _fires_as_specified(stream, chunks, 40, 8)
    assert feed_all(inspector(rs, window=40, pcre_window=8), chunks) == ([8] if want else []), (stream, chunks)


@st.composite
def _mixed_rules(draw: st.DrawFn) -> str:
    """One to three contents (some tied by distance/within, some bounded by offset/depth, some
    nocase), with or without a pcre."""
    parts = []
    for i in range(draw(st.integers(1, 3))):
        mods = ""
        if i and draw(st.booleans()):
            mods += f" distance:{draw(st.integers(-3, 10))};"
            if draw(st.booleans()):
                mods += f" within:{draw(st.integers(3, 20))};"
        elif draw(st.integers(0, 4)) == 0:
            mods += f" offset:{draw(st.integers(0, 10))};"
            if draw(st.booleans()):
                mods += f" depth:{draw(st.integers(3, 30))};"
        if draw(st.booleans()):
            mods += " nocase;"
        parts.append(f'content:"{draw(st.sampled_from(["ab", "ba", "cd", "abc", "a", "dd"]))}";{mods}')
    if draw(st.booleans()):
        parts.append(f'pcre:"/{draw(st.sampled_from(["c[de]f", "a.b", "(?i)ab+c", "d{2,}", "f"]))}/";')
    return " ".join(parts)


@settings(max_examples=500, deadline=None)
@example(rule='content:"ab"; pcre:"/f/";', stream=b"fab", cuts=[1])  # the content in the packet after the match
@given(rule=_mixed_rules(), stream=st.lists(st.sampled_from(b"abcdefABxxxxxx"), max_size=50).map(bytes),
       cuts=st.lists(st.integers(0, 50), max_size=10))
def test_a_rule_fires_the_same_however_the_stream_is_cut(rule: str, stream: bytes, cuts: list[int]) -> None:
    """Whether a rule fires must not depend on where the packets begin, only on the stream (here
    the whole stream fits in pcre_window, the one bound a cut may meet; the window is smaller)."""
    try:
        rs = parse_rules(f'alert tcp any any -> any any (msg:"t"; {rule} sid:8;)')
        inspector(rs, window=40, pcre_window=200)
    except RuleError:
        assume(False)
    whole = feed_all(inspector(rs, window=40, pcre_window=200), [stream] if stream else [])
    assert feed_all(inspector(rs, window=40, pcre_window=200), splits(stream, cuts)) == whole, rule


def test_a_flood_of_a_content_that_only_fires_plain_rules_costs_one_report_per_scan() -> None:
    """"../../" repeated: its rule (one content, no pcre, no offset/depth) fires at the first copy, so
    Hyperscan reports only that copy in each scan; a content a pcre rule also needs is reported at
    every match (the pcre is searched near each)."""
    rs = parse_rules('alert tcp any any -> any any (msg:"t"; content:"../../"; sid:1;)\n'
                     'alert tcp any any -> any any (msg:"u"; content:"union"; pcre:"/union\\s+select/"; sid:2;)')
    ins = inspector(rs)
    reports: list[int] = []

    def counting(scan: Any, into: dict[int, list[int]]) -> Any:
        def count(data: bytes, base: int) -> None:  # (both scans start on an empty dict)
            scan(data, base)
            reports.extend(eid for eid, ends in into.items() for _e in ends)
        return count

    ins._scan_by, ins._scan_lead = counting(ins._scan_by, ins._by), counting(ins._scan_lead, ins._lead_by)
    got = ins.feed(1, Direction.C2S, b"GET /a/" + b"../" * 5000, CLI, SRV)
    assert [(m.sid, m.offset) for m in got] == [(1, len(b"GET /a/../../"))]
    assert len(reports) == 1
    reports.clear()
    # one per scan: the edge of the tail kept for split contents, then the chunk
    assert ins.feed(1, Direction.C2S, b"../" * 5000, CLI, SRV) == [] and len(reports) == 2
    reports.clear()
    ins.feed(2, Direction.C2S, b"union " * 100, CLI, SRV)
    assert len(reports) == 100
