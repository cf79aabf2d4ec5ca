"""Signature rules: a documented subset of the Snort/Suricata rule language.

Why a subset: the embedded inspector matches the *rebuilt* MPTCP byte stream
(one direction of one connection at a time), not packets or HTTP buffers, so
only keywords that make sense on a raw stream are accepted. Everything else
is refused with the file name and line number instead of being silently
ignored: an ignored modifier (``depth``, ``http_uri`` ...) would make a rule
match more than its author meant, and a match kills connections.

Grammar (one rule per line; a trailing ``\\`` continues it)::

    ACTION tcp SRC SPORT -> DST DPORT (OPTION; OPTION; ...)
    ACTION tcp SRC SPORT <> DST DPORT (...)        # both directions
    var|ipvar|portvar NAME VALUE                   # $NAME in later rules
    # comment

* ACTION: ``alert``, ``drop`` or ``reject`` (all mean "match"; what happens is
  ``[actions] on_match``).
* Addresses: ``any``, an address, a CIDR network, ``$VAR``, ``!X``, ``[X, Y, ...]``.
  Ports: ``any``, ``N``, ``LO:HI``, ``:HI``, ``LO:``, ``$VAR``, ``!X``, ``[X, ...]``.
* Options: ``msg:"..."``; ``content:"..."`` (``|41 42|`` hex, ``\\"`` ``\\;``
  ``\\\\`` escapes; several per rule) followed by ``nocase`` (and the no-op
  ``fast_pattern``, ``rawbytes``) and the position modifiers ``offset``/``depth``
  (absolute: counted from the start of the direction's stream, as Suricata
  does for its raw stream) or ``distance``/``within`` (relative to the
  previous content's match, Suricata's arithmetic: this content must lie in
  ``[prev_end + distance, prev_end + distance + within]``);
  ``pcre:"/re/FLAGS"`` (flags ``i s m x``);
  ``flow:to_server|to_client|from_client|from_server[,established]``;
  ``sid:N`` (required, unique); ``rev:N``; metadata kept or ignored:
  ``classtype``, ``reference``, ``metadata``, ``priority``, ``gid``.
"""

from __future__ import annotations

import ipaddress
import re
import warnings
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import regex

try:  # Python 3.11+
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["Content", "Pcre", "Flow", "AddrSpec", "PortSpec", "Rule", "RuleSet", "RuleError", "parse_rules",
           "load_rules", "compile_pcre"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RuleError(ValueError):
    """A rules file that cannot be used; the message names the file and line."""


class Flow(str, Enum):
    ANY = "any"
    TO_SERVER = "to_server"  # client -> server data
    TO_CLIENT = "to_client"  # server -> client data


@dataclass(frozen=True, slots=True)
class Content:
    pattern: bytes
    nocase: bool = False
    offset: int | None = None  # absolute: the match starts at or after this stream offset
    depth: int | None = None  # absolute: ... and ends within this many bytes of ``offset``
    distance: int | None = None  # relative: starts at least this far after the previous content's end
    within: int | None = None  # relative: ends at most this far after (previous end + distance)

    @property
    def relative(self) -> bool:
        return self.distance is not None or self.within is not None


@dataclass(frozen=True, slots=True)
class Pcre:
    """A rule's pcre, compiled twice.

    ``regex`` is what runs: the ``regex`` module's engine (its V0 mode reads
    patterns as Python ``re`` does), because it takes a ``timeout`` and
    Python's ``re`` cannot be stopped: a pattern with nested repeats can
    backtrack for years on bytes an attacker chose, with the packet's verdict
    waiting. ``stdlib`` is Python ``re``'s reading of the same pattern, which
    the Hyperscan gate translates; None where the two engines could read the
    pattern differently (``re`` warns of a nested set, e.g. a POSIX class
    ``[[:alpha:]]``), so that pattern gets no gate."""

    source: str  # as written, for the log
    regex: regex.Pattern[bytes]
    stdlib: re.Pattern[bytes] | None = None
    flags: int = 0  # Python re's flags (re.I, re.S, re.M, re.X)


# --------------------------------------------------------------------------- address and port specs
@dataclass(frozen=True, slots=True)
class AddrSpec:
    """``any``, a network, a negation or a list (OR of positives, minus every negative)."""

    kind: str  # "any" | "net" | "not" | "list"
    net: Network | None = None
    items: tuple["AddrSpec", ...] = ()

    def matches(self, addr: Address) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "net":
            assert self.net is not None
            return addr.version == self.net.version and addr in self.net
        if self.kind == "not":
            return not self.items[0].matches(addr)
        pos = [i for i in self.items if i.kind != "not"]
        neg = [i for i in self.items if i.kind == "not"]
        return (not pos or any(i.matches(addr) for i in pos)) and all(i.matches(addr) for i in neg)


@dataclass(frozen=True, slots=True)
class PortSpec:
    kind: str  # "any" | "range" | "not" | "list"
    lo: int = 0
    hi: int = 65535
    items: tuple["PortSpec", ...] = ()

    def matches(self, port: int) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "range":
            return self.lo <= port <= self.hi
        if self.kind == "not":
            return not self.items[0].matches(port)
        pos = [i for i in self.items if i.kind != "not"]
        neg = [i for i in self.items if i.kind == "not"]
        return (not pos or any(i.matches(port) for i in pos)) and all(i.matches(port) for i in neg)


ANY_ADDR = AddrSpec("any")
ANY_PORT = PortSpec("any")


@dataclass(frozen=True, slots=True)
class Rule:
    sid: int
    msg: str
    contents: tuple[Content, ...]
    pcre: Pcre | None = None
    rev: int = 1
    action: str = "alert"
    src: AddrSpec = ANY_ADDR
    sport: PortSpec = ANY_PORT
    dst: AddrSpec = ANY_ADDR
    dport: PortSpec = ANY_PORT
    bidirectional: bool = False
    flow: Flow = Flow.ANY
    classtype: str = ""
    line: int = 0

    def applies(self, to_server: bool, sender: tuple[Address, int], receiver: tuple[Address, int]) -> bool:
        """Does the rule inspect data flowing sender -> receiver (``to_server``: client -> server)?"""
        if self.flow == Flow.TO_SERVER and not to_server or self.flow == Flow.TO_CLIENT and to_server:
            return False
        if self._hdr(sender, receiver):
            return True
        return self.bidirectional and self._hdr(receiver, sender)

    def _hdr(self, a: tuple[Address, int], b: tuple[Address, int]) -> bool:
        return (self.src.matches(a[0]) and self.sport.matches(a[1]) and self.dst.matches(b[0])
                and self.dport.matches(b[1]))


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    source: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # "file:line: why" of each rule left out (parse_rules(skip_bad=True))

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def longest_content(self) -> int:
        return max((len(c.pattern) for r in self.rules for c in r.contents), default=0)


# --------------------------------------------------------------------------- parsing
_HEADER = re.compile(r"^\s*(\w+)\s+(\w+)\s+(.+?)\s+(\S+)\s+(->|<>)\s+(.+?)\s+(\S+)\s*\((.*)\)\s*$", re.S)
_VAR = re.compile(r"^\s*(var|ipvar|portvar)\s+([A-Za-z_][A-Za-z0-9_]*)\s+(.+?)\s*$")
_ACTIONS = frozenset({"alert", "drop", "reject"})
_IGNORED = frozenset({"classtype", "reference", "metadata", "priority", "gid"})
_NOOP_MODIFIERS = frozenset({"fast_pattern", "rawbytes"})
_POSITIONS = ("offset", "depth", "distance", "within")
_PCRE_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE, "x": re.VERBOSE}
_SUPPORTED = ("msg, content, nocase, fast_pattern, rawbytes, offset, depth, distance, within, pcre, flow, sid, "
              "rev, classtype, reference, metadata, priority, gid")
_MAX_POSITION = 1 << 30


class _LineError(Exception):
    pass


def _split_options(body: str) -> list[tuple[str, str | None]]:
    """``name:value;`` pairs; ``;`` inside quotes or after a backslash does not split."""
    out: list[tuple[str, str | None]] = []
    cur: list[str] = []
    quoted = esc = False
    for ch in body:
        if esc:
            cur.append(ch)
            esc = False
            continue
        if ch == "\\":
            cur.append(ch)
            esc = True
            continue
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            _add_option(out, "".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quoted:
        raise _LineError("unterminated quoted string")
    if "".join(cur).strip():
        raise _LineError(f"option {''.join(cur).strip()!r} is not terminated by ';'")
    return out


def _add_option(out: list[tuple[str, str | None]], text: str) -> None:
    text = text.strip()
    if not text:
        return
    name, sep, value = text.partition(":")
    out.append((name.strip().lower(), value.strip() if sep else None))


def _unquote(value: str | None, what: str) -> str:
    if value is None:
        raise _LineError(f"{what} needs a value")
    if len(value) < 2 or not value.startswith('"') or not value.endswith('"'):
        raise _LineError(f"{what} value must be in double quotes: {value!r}")
    return value[1:-1]


def _content_bytes(raw: str) -> bytes:
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch == "\\":
            if i + 1 >= n:
                raise _LineError("content ends with a lone backslash")
            nxt = raw[i + 1]
            if nxt not in '";\\:|':
                raise _LineError(f"content: unknown escape \\{nxt} (escape only \" ; \\ : |)")
            out += nxt.encode()
            i += 2
        elif ch == "|":
            j = raw.find("|", i + 1)
            if j < 0:
                raise _LineError("content: unterminated |hex| block")
            hexpart = raw[i + 1 : j].replace(" ", "")
            try:
                out += bytes.fromhex(hexpart)
            except ValueError:
                raise _LineError(f"content: bad hex block |{raw[i + 1:j]}|") from None
            i = j + 1
        elif ch == '"' or ch == ";":
            raise _LineError(f"content: unescaped {ch!r}")
        else:
            try:
                out += ch.encode("latin-1")
            except UnicodeEncodeError:
                out += ch.encode()
            i += 1
    if not out:
        raise _LineError("content is empty")
    return bytes(out)


def _pcre(value: str | None) -> Pcre:
    if value is not None and value.startswith("!"):
        raise _LineError("negated pcre is not supported")
    text = _unquote(value, "pcre")
    if not text.startswith("/") or text.rfind("/") == 0:
        raise _LineError(f"pcre must look like \"/regex/flags\": {text!r}")
    end = text.rfind("/")
    pattern, flags = text[1:end], text[end + 1 :]
    fl = 0
    for f in flags:
        if f not in _PCRE_FLAGS:
            raise _LineError(f"pcre flag {f!r} is not supported (supported: i s m x)")
        fl |= _PCRE_FLAGS[f]
    try:
        raw = pattern.replace('\\"', '"').encode("latin-1")
    except UnicodeEncodeError as e:
        raise _LineError(f"pcre does not compile: {e}") from None
    try:
        return compile_pcre(raw, fl, text)
    except ValueError as e:
        raise _LineError(str(e)) from None


# a brace that Python re (and PCRE) read as a repeat count; any other "{" is a literal brace
_COUNT = re.compile(rb"\{(?:\d+|\d*,\d*)\}")
_ENGINE_FLAGS = ((re.IGNORECASE, regex.IGNORECASE), (re.DOTALL, regex.DOTALL), (re.MULTILINE, regex.MULTILINE),
                 (re.VERBOSE, regex.VERBOSE))


def compile_pcre(pattern: bytes, flags: int = 0, source: str = "") -> Pcre:
    """``pattern`` (with Python ``re`` flags) for both engines; ValueError says why it cannot be used.

    The ``regex`` module reads a few things ``re`` takes literally: fuzzy counts
    (``a{e<=1}``) above all. Every brace that is not a repeat count is escaped
    for it (what re and PCRE do anyway), and the escaping is checked against
    re's own parse: if it changed re's reading, the pattern is refused."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tree = _sre_parse.parse(pattern, flags)  # (re.compile caches: its warnings come once)
            std = re.compile(pattern, flags)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"pcre does not compile: {e}") from None
    braced = _escape_braces(pattern)
    if braced != pattern:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (said once above)
                same = repr(_sre_parse.parse(braced, flags).data) == repr(tree.data)
        except (re.error, RecursionError, OverflowError):
            same = False
        if not same:
            raise ValueError("pcre: a '{' here is read differently by Python re and the pcre engine; "
                             "write a literal brace as \\{")
    efl = regex.V0
    for std_flag, engine_flag in _ENGINE_FLAGS:
        if flags & std_flag:
            efl |= engine_flag
    try:
        engine = regex.compile(braced, efl)
    except (regex.error, RecursionError, OverflowError) as e:
        raise ValueError(f"pcre does not compile: {e}") from None
    # POSIX classes: regex reads "[:alpha:]" inside a set as PCRE does, re as its characters; a
    # verbose comment ending in a backslash: re's comment goes on past the newline, regex's stops
    ambiguous = any(issubclass(w.category, FutureWarning) for w in caught) or b"[:" in pattern \
        or b"\\\n" in pattern
    return Pcre(source or pattern.decode("latin-1"), engine, None if ambiguous else std, flags)


def _escape_braces(p: bytes) -> bytes:
    """``p`` with every ``{`` that does not start a repeat count escaped (in a class or a verbose
    comment too: ``\\{`` is a brace there in both engines, so classes need not be found)."""
    out = bytearray()
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        if c == 0x5C:  # an escape: copied whole
            out += p[i : i + 2]
            i += 2
        elif c == 0x7B and not _COUNT.match(p, i):
            out += b"\\{"
            i += 1
        else:
            out.append(c)
            i += 1
    return bytes(out)


def _position(c: Content, name: str, value: str | None, first: bool) -> Content:
    """``c`` with one position modifier set; the combinations Snort and Suricata refuse are refused."""
    try:
        v = int((value or "").strip())
    except ValueError:
        raise _LineError(f"{name} must be an integer, got {value!r}") from None
    if abs(v) > _MAX_POSITION:
        raise _LineError(f"{name}:{v} is out of range")
    if getattr(c, name) is not None:
        raise _LineError(f"{name} is given twice for one content")
    if name in ("offset", "depth"):
        if c.relative:
            raise _LineError(f"{name} cannot be mixed with distance/within on one content")
        if v < 0:
            raise _LineError(f"{name} must not be negative")
        if name == "depth" and v < len(c.pattern):
            raise _LineError(f"depth:{v} must be at least the content length ({len(c.pattern)} bytes)")
        return replace(c, offset=v) if name == "offset" else replace(c, depth=v)
    if c.offset is not None or c.depth is not None:
        raise _LineError(f"{name} cannot be mixed with offset/depth on one content")
    if first:
        raise _LineError(f"{name} is relative to a previous content, and this is the rule's first "
                         "(use offset/depth)")
    if name == "within" and v < len(c.pattern):
        raise _LineError(f"within:{v} must be at least the content length ({len(c.pattern)} bytes)")
    return replace(c, distance=v) if name == "distance" else replace(c, within=v)


def _flow(value: str | None) -> Flow:
    if value is None:
        raise _LineError("flow needs a value")
    flow = Flow.ANY
    for part in (p.strip().lower() for p in value.split(",")):
        if part in ("to_server", "from_client"):
            flow = Flow.TO_SERVER
        elif part in ("to_client", "from_server"):
            flow = Flow.TO_CLIENT
        elif part in ("established", "only_stream", "stateless"):
            continue  # the rebuilt stream is established and reassembled by construction
        else:
            raise _LineError(f"flow:{part} is not supported (to_server, to_client, from_client, from_server, "
                             "established)")
    return flow


def _int(value: str | None, what: str) -> int:
    try:
        v = int(value or "")
    except ValueError:
        raise _LineError(f"{what} must be an integer, got {value!r}") from None
    if v < 0:
        raise _LineError(f"{what} must not be negative")
    return v


def _expand(text: str, variables: dict[str, str], depth: int = 0) -> str:
    if depth > 8:
        raise _LineError("variables nest too deeply")

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in variables:
            raise _LineError(f"undefined variable ${name}")
        return _expand(variables[name], variables, depth + 1)

    return re.sub(r"\$([A-Za-z_][A-Za-z0-9_]*)", sub, text)


def _split_list(text: str) -> list[str]:
    """Top-level comma split of ``a, [b, c], !d``."""
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise _LineError(f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise _LineError(f"unbalanced '[' in {text!r}")
    items.append("".join(cur).strip())
    if any(not i for i in items):
        raise _LineError(f"empty item in list {text!r}")
    return items


def _addr(text: str) -> AddrSpec:
    text = text.strip()
    if text.lower() == "any":
        return ANY_ADDR
    if text.startswith("!"):
        return AddrSpec("not", items=(_addr(text[1:]),))
    if text.startswith("["):
        if not text.endswith("]"):
            raise _LineError(f"unbalanced list {text!r}")
        return AddrSpec("list", items=tuple(_addr(i) for i in _split_list(text[1:-1])))
    try:
        return AddrSpec("net", net=ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise _LineError(f"{text!r} is not an address, network, list or any") from None


def _port(text: str) -> PortSpec:
    text = text.strip()
    if text.lower() == "any":
        return ANY_PORT
    if text.startswith("!"):
        return PortSpec("not", items=(_port(text[1:]),))
    if text.startswith("["):
        if not text.endswith("]"):
            raise _LineError(f"unbalanced list {text!r}")
        return PortSpec("list", items=tuple(_port(i) for i in _split_list(text[1:-1])))
    try:
        if ":" in text:
            lo_s, hi_s = text.split(":", 1)
            lo = int(lo_s) if lo_s else 0
            hi = int(hi_s) if hi_s else 65535
        else:
            lo = hi = int(text)
    except ValueError:
        raise _LineError(f"{text!r} is not a port, range, list or any") from None
    if not 0 <= lo <= hi <= 65535:
        raise _LineError(f"bad port range {text!r}")
    return PortSpec("range", lo, hi)


def _squeeze_lists(head: str) -> str:
    """Drop blanks inside ``[...]`` of a rule header, so ``[80, 8080]`` is one token."""
    out, depth = [], 0
    for ch in head:
        depth += ch == "["
        depth -= ch == "]"
        if depth > 0 and ch.isspace():
            continue
        out.append(ch)
    return "".join(out)


def _rule(text: str, variables: dict[str, str], line: int) -> Rule:
    head, paren, rest = text.partition("(")
    m = _HEADER.match(_squeeze_lists(head) + paren + rest)
    if not m:
        raise _LineError("expected 'ACTION tcp SRC SPORT -> DST DPORT (OPTIONS)'")
    action, proto, src, sport, arrow, dst, dport, body = m.groups()
    action = action.lower()
    if action not in _ACTIONS:
        raise _LineError(f"action {action!r} is not supported (alert, drop, reject)")
    if proto.lower() != "tcp":
        raise _LineError(f"protocol {proto!r} is not supported (the rebuilt stream is tcp)")
    msg, sid, rev, classtype = "", None, 1, ""
    contents: list[Content] = []
    pcre: Pcre | None = None
    flow = Flow.ANY
    for name, value in _split_options(body):
        if name == "msg":
            msg = _unquote(value, "msg").replace('\\"', '"').replace("\\;", ";").replace("\\\\", "\\")
        elif name == "content":
            if value is not None and value.startswith("!"):
                raise _LineError("negated content is not supported")
            contents.append(Content(_content_bytes(_unquote(value, "content"))))
        elif name == "nocase":
            if not contents:
                raise _LineError("nocase must follow a content")
            contents[-1] = replace(contents[-1], nocase=True)
        elif name in _NOOP_MODIFIERS:
            if not contents:
                raise _LineError(f"{name} must follow a content")
        elif name in _POSITIONS:
            if not contents:
                raise _LineError(f"{name} must follow a content")
            contents[-1] = _position(contents[-1], name, value, first=len(contents) == 1)
        elif name == "pcre":
            if pcre is not None:
                raise _LineError("only one pcre per rule is supported")
            pcre = _pcre(value)
        elif name == "flow":
            flow = _flow(value)
        elif name == "sid":
            sid = _int(value, "sid")
        elif name == "rev":
            rev = _int(value, "rev")
        elif name == "classtype":
            classtype = (value or "").strip()
        elif name in _IGNORED:
            continue
        else:
            raise _LineError(f"option {name!r} is not supported (supported: {_SUPPORTED})")
    if sid is None:
        raise _LineError("sid is required")
    if not contents and pcre is None:
        raise _LineError("a rule needs at least one content or a pcre")
    return Rule(sid=sid, msg=msg, contents=tuple(contents), pcre=pcre, rev=rev, action=action,
                src=_addr(_expand(src, variables)), sport=_port(_expand(sport, variables)),
                dst=_addr(_expand(dst, variables)), dport=_port(_expand(dport, variables)),
                bidirectional=arrow == "<>", flow=flow, classtype=classtype, line=line)


def parse_rules(text: str, source: str = "<rules>", skip_bad: bool = False) -> RuleSet:
    """Parse a rules file; raises :class:`RuleError` naming ``source:line``. With ``skip_bad`` a
    statement that does not parse (or reuses a sid) is left out and named in ``skipped`` instead;
    a rule continued past the end of the file is still an error (the file is cut)."""
    variables: dict[str, str] = {}
    rules: list[Rule] = []
    skipped: list[str] = []
    sids: dict[int, int] = {}
    pending: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not pending:
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            start = lineno
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        stmt = " ".join(p.strip() for p in pending)
        pending = []
        try:
            vm = _VAR.match(stmt)
            if vm:
                variables[vm.group(2)] = vm.group(3)
                _expand(vm.group(3), variables)  # undefined references fail here, on this line
                continue
            rule = _rule(stmt, variables, start)
            if rule.sid in sids:
                raise _LineError(f"sid {rule.sid} already used on line {sids[rule.sid]}")
        except _LineError as e:
            if not skip_bad:
                raise RuleError(f"{source}:{start}: {e}") from None
            skipped.append(f"{source}:{start}: {e}")
            continue
        sids[rule.sid] = start
        rules.append(rule)
    if pending:
        raise RuleError(f"{source}:{start}: rule continues past the end of the file")
    return RuleSet(tuple(rules), source, variables, tuple(skipped))


def load_rules(path: str | Path, skip_bad: bool = False) -> RuleSet:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RuleError(f"{p}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise RuleError(f"{p}: not UTF-8 text") from None
    return parse_rules(text, str(p), skip_bad)
