"""The inspector's compiled content scan (``mproxy/_hsscan.c``) against the pure-Python reference.

The compiled scanner files each Hyperscan match in C; the reference is the ``hyperscan`` binding's
database with a Python handler per match (``MPROXY_NO_ACCEL=1``, or no libhs at build time). Both
must give the inspector the same match ends, so it matches the same rules at the same offsets.
"""

from __future__ import annotations

import gc
import ipaddress
import itertools
import os
import sys
from pathlib import Path

import hyperscan
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy import compiled
from mproxy.core.events import Direction
from mproxy.core.inspector import Inspector, _scan_into
from mproxy.core.rules import load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[2]
_hsscan = compiled.content_scanner()
needs_scanner = pytest.mark.skipif(_hsscan is None,
                                   reason="compiled content scan not built (no libhs), or MPROXY_NO_ACCEL")
CLI = (ipaddress.ip_address("198.18.1.2").packed, 40000)
SRV = (ipaddress.ip_address("198.18.10.2").packed, 80)
_HEX = [b"\\x%02x" % b for b in range(256)]


def test_the_scanner_is_built_wherever_hyperscan_s_headers_are() -> None:
    """A build that silently lost the compiled scan would leave the gateway 3-6x slower on floods
    (the suite would still pass on the reference): where libhs's headers are (CI installs
    libhyperscan-dev), the module must be there."""
    if not Path("/usr/include/hs/hs.h").exists():
        pytest.skip("no /usr/include/hs/hs.h: libhyperscan-dev not installed, the reference runs")
    assert list((ROOT / "mproxy").glob("_hsscan*.so")) or any(
        list(Path(p, "mproxy").glob("_hsscan*.so")) for p in sys.path if p), "mproxy/_hsscan.c was not built"


def test_switched_off_the_inspector_uses_the_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    rs = parse_rules('alert tcp any any -> any any (msg:"t"; content:"abc"; sid:1;)')
    monkeypatch.setenv("MPROXY_NO_ACCEL", "1")
    assert isinstance(Inspector(rs)._db, hyperscan.Database)
    monkeypatch.delenv("MPROXY_NO_ACCEL")
    if _hsscan is not None:
        assert isinstance(Inspector(rs)._db, _hsscan.Scanner)


def _reference(patterns: list[bytes], flags: list[int]) -> hyperscan.Database:
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=patterns, ids=list(range(len(patterns))), elements=len(patterns), flags=flags)
    return db


@needs_scanner
@settings(max_examples=400, deadline=None)
@given(contents=st.lists(st.tuples(st.binary(min_size=1, max_size=5), st.booleans(), st.booleans()), min_size=1,
                         max_size=8, unique_by=lambda c: (c[0], c[1])),
       filler=st.lists(st.integers(0, 7) | st.binary(max_size=6), max_size=60), base=st.integers(0, 2**48))
def test_the_compiled_scan_files_the_same_ends_as_the_reference(contents: list[tuple[bytes, bool, bool]],
                                                                filler: list[int | bytes], base: int) -> None:
    """Any literal contents (binary, caseless, single-match), any bytes dense with them: the same
    ends under the same ids, shifted by ``base``, as the binding with the Python handler."""
    patterns = [b"".join(_HEX[b] for b in c) for c, _n, _s in contents]
    flags = [(hyperscan.HS_FLAG_CASELESS if n else 0) | (hyperscan.HS_FLAG_SINGLEMATCH if s else 0)
             for _c, n, s in contents]
    pieces = []
    for x in filler:  # bytes, or a content (its case swapped for x >= 4)
        if isinstance(x, bytes):
            pieces.append(x)
        else:
            c = contents[x % len(contents)][0]
            pieces.append(c.swapcase() if x >= 4 else c)
    data = b"".join(pieces)
    got: dict[int, list[int]] = {}
    want: dict[int, list[int]] = {}
    _scan_into(_hsscan.Scanner(patterns, flags), got)(data, base)
    _scan_into(_reference(patterns, flags), want)(data, base)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}


@needs_scanner
def test_the_flags_are_the_binding_s_numbers() -> None:
    """The inspector hands the scanner the binding's HS_FLAG_* values: both must be hs.h's."""
    assert (_hsscan.FLAG_CASELESS, _hsscan.FLAG_SINGLEMATCH) == (hyperscan.HS_FLAG_CASELESS,
                                                                 hyperscan.HS_FLAG_SINGLEMATCH)


@needs_scanner
def test_ends_go_after_those_already_filed_and_lists_are_made_on_first_match() -> None:
    s = _hsscan.Scanner([b"ab", b"b"], [0, 0])
    into = {0: [3]}
    s.scan(b"xabab", into, 100)
    assert into == {0: [3, 103, 105], 1: [103, 105]}
    again: dict[int, list[int]] = {}
    s.scan(b"b", again)  # nothing of the last scan's lists is reused
    assert again == {1: [1]} and into[1] == [103, 105]


@needs_scanner
def test_bad_arguments_are_clear_errors_and_the_scanner_goes_on() -> None:
    with pytest.raises(ValueError, match="refused expression 1"):
        _hsscan.Scanner([b"a", b"(b"], [0, 0])
    with pytest.raises(ValueError):
        _hsscan.Scanner([], [])
    with pytest.raises(ValueError):
        _hsscan.Scanner([b"a"], [0, 0])
    with pytest.raises(TypeError):
        _hsscan.Scanner(["a"], [0])
    with pytest.raises(ValueError):  # an embedded NUL (the inspector escapes every byte)
        _hsscan.Scanner([b"a\0b"], [0])
    with pytest.raises(OverflowError):
        _hsscan.Scanner([b"a"], [-1])
    s = _hsscan.Scanner([b"a", b"b"], [0, 0])
    with pytest.raises(TypeError):
        s.scan(b"ab", {1: "not a list"})  # stops the scan at the bad entry
    with pytest.raises(TypeError):
        s.scan("text", {})
    with pytest.raises(TypeError):
        s.scan(b"a", [])
    with pytest.raises(RuntimeError):
        _hsscan.Scanner.__new__(_hsscan.Scanner).scan(b"a", {})  # never initialised
    into: dict[int, list[int]] = {}
    s.scan(memoryview(b"ba"), into)  # after the errors: nothing left over from the stopped scan
    assert into == {1: [1], 0: [2]}


@needs_scanner
def test_no_reference_leaks() -> None:
    s = _hsscan.Scanner([b"\\x61"], [0])
    data = b"a" * 1000
    before = sys.getrefcount(data)
    for _ in range(200):
        into: dict[int, list[int]] = {}
        s.scan(data, into, 2**40)
        assert len(into[0]) == 1000
        del into
    gc.collect()
    assert sys.getrefcount(data) == before


@st.composite
def _streams(draw: st.DrawFn) -> bytes:
    tokens = [b"union ", b"select ", b"or ", b"' or '1'='1", b"drop table x;", b";drop  table t", b"/**/",
              b"../../", b"<script", b"%2e%2e%2f", b"/etc/passwd", b"UNION%20SELECT", b"GET / HTTP/1.1\r\n"]
    parts = draw(st.lists(st.sampled_from(tokens) | st.binary(max_size=40), max_size=80))
    return b"".join(parts)


@needs_scanner
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_the_inspector_matches_the_same_with_either_scan(data: st.DataObject) -> None:
    """The shipped rules on streams dense with their contents, in any chunks: the same matches at
    the same offsets, and the same match ends kept, with the compiled scan and with the reference."""
    stream = data.draw(_streams())
    cuts = sorted(set(data.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=10))))
    fast, ref = _PAIR
    conn = next(_CONNS)
    prev = 0
    for cut in [*cuts, len(stream)]:
        chunk = stream[prev:cut]
        prev = max(prev, cut)
        a = fast.feed(conn, Direction.C2S, chunk, CLI, SRV)
        b = ref.feed(conn, Direction.C2S, chunk, CLI, SRV)
        assert a == b
        sa, sb = fast._flows.get((conn, 0)), ref._flows.get((conn, 0))
        assert (sa is None) == (sb is None)
        if sa is not None and sb is not None:
            assert sa.occ == sb.occ and sa.fired == sb.fired
    fast.close(conn)
    ref.close(conn)


def _pair() -> tuple[Inspector, Inspector]:
    """The shipped rules, with the compiled scan and with the reference (built once: ~50 ms each)."""
    rs = load_rules(ROOT / "config" / "mproxy.rules")
    fast = Inspector(rs, pcre_budget=5.0)  # (a loaded machine must not stop one search and not the other)
    os.environ["MPROXY_NO_ACCEL"] = "1"
    try:
        ref = Inspector(rs, pcre_budget=5.0)
    finally:
        del os.environ["MPROXY_NO_ACCEL"]
    if _hsscan is not None:
        assert isinstance(fast._db, _hsscan.Scanner)
    assert isinstance(ref._db, hyperscan.Database)
    return fast, ref


_PAIR = _pair()
_CONNS = itertools.count(1)


@needs_scanner
def test_a_compile_in_a_thread_lets_the_event_loop_go_on() -> None:
    """A rules reload compiles in a thread while packets go; the compile must not hold the GIL
    (it did at first: 0.4 s for 20,000 contents with the main thread stopped)."""
    import random
    import threading

    rnd = random.Random(1)
    exprs = [b"".join(_HEX[rnd.randrange(97, 123)] for _ in range(rnd.randint(6, 14))) for _ in range(20_000)]
    done = threading.Event()
    built: list[object] = []

    def compile_() -> None:
        built.append(_hsscan.Scanner(exprs, [hyperscan.HS_FLAG_CASELESS] * len(exprs)))
        done.set()

    th = threading.Thread(target=compile_)
    th.start()
    turns = 0
    while not done.wait(0.001):
        turns += 1
    th.join()
    assert built and turns >= 5, f"the main thread ran {turns} times during the compile"
