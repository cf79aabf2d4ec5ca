"""tshark as an independent oracle for tests.

mproxy's own parsers must not grade themselves: these helpers ask Wireshark's
dissectors what a capture contains (TCP streams rebuilt by ``follow``, field
values, MPTCP options), so a test can compare mproxy's output with an
implementation written by other people.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FollowedStream",
    "TsharkError",
    "tshark_available",
    "tshark",
    "tshark_fields",
    "tshark_ek",
    "tshark_count",
    "tcp_streams",
    "data_streams",
    "tshark_follow_raw",
]

PathLike = str | os.PathLike[str]
_FOLLOW_BATCH = 64  # -z taps per tshark run: one pass over the file per batch


class TsharkError(RuntimeError):
    pass


def tshark_available() -> str | None:
    """Why tshark cannot be used, or None."""
    return None if shutil.which("tshark") else "tshark not installed"


def tshark(pcap: PathLike, *args: str, timeout: float = 300) -> str:
    """Run ``tshark -n -r PCAP ARGS`` and return stdout (stderr noise like the root warning is ignored)."""
    cmd = ["tshark", "-n", "-r", os.fspath(pcap), *args]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if cp.returncode != 0:
        raise TsharkError(f"{' '.join(cmd)} exited {cp.returncode}: {cp.stderr.strip()[-2000:]}")
    return cp.stdout


def tshark_fields(pcap: PathLike, fields: Sequence[str], display_filter: str | None = None,
                  *, aggregator: str = ",", extra: Sequence[str] = ()) -> list[list[str]]:
    """One row per matching packet, one column per field (all occurrences joined by *aggregator*)."""
    args = ["-T", "fields", "-E", "separator=/t", "-E", "occurrence=a", "-E", f"aggregator={aggregator}",
            "-E", "quote=n"]
    for f in fields:
        args += ["-e", f]
    if display_filter:
        args += ["-Y", display_filter]
    out = tshark(pcap, *args, *extra)
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def tshark_ek(pcap: PathLike, display_filter: str | None = None,
              fields: Sequence[str] = (), *, extra: Sequence[str] = ()) -> list[dict[str, object]]:
    """Packets as Elasticsearch-style JSON (``-T ek``): each item is a packet's ``layers`` dict."""
    args = ["-T", "ek"]
    for f in fields:
        args += ["-e", f]
    if display_filter:
        args += ["-Y", display_filter]
    out = tshark(pcap, *args, *extra)
    packets: list[dict[str, object]] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if "layers" in obj:
            packets.append(obj["layers"])
    return packets


def tshark_count(pcap: PathLike, display_filter: str) -> int:
    """Number of packets matching *display_filter*."""
    return len(tshark_fields(pcap, ["frame.number"], display_filter))


def tcp_streams(pcap: PathLike, display_filter: str | None = None) -> list[int]:
    """Sorted distinct ``tcp.stream`` indices (of packets matching *display_filter*)."""
    rows = tshark_fields(pcap, ["tcp.stream"], display_filter)
    return sorted({int(r[0]) for r in rows if r and r[0]})


def data_streams(pcap: PathLike, display_filter: str = "mptcp") -> dict[int, int]:
    """Payload bytes per tcp.stream for packets with data matching *display_filter*.

    Counts retransmitted bytes too: it answers "did this subflow carry data", not "how much".
    """
    flt = f"tcp.len > 0 && ({display_filter})" if display_filter else "tcp.len > 0"
    out: dict[int, int] = {}
    for stream, length in tshark_fields(pcap, ["tcp.stream", "tcp.len"], flt):
        out[int(stream)] = out.get(int(stream), 0) + int(length)
    return out


@dataclass(slots=True, frozen=True)
class FollowedStream:
    """A TCP stream as ``tshark -z follow,tcp,raw`` rebuilt it.

    ``client`` is tshark's node 0 (the first endpoint seen: the SYN sender in a
    capture that starts before the connection), ``server`` node 1;
    ``client_data`` is what node 0 sent, ``server_data`` what node 1 sent.
    """

    stream: int
    client: tuple[str, int]
    server: tuple[str, int]
    client_data: bytes
    server_data: bytes

    @property
    def four_tuple(self) -> tuple[str, int, str, int]:
        return (*self.client, *self.server)


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    return host.strip("[]"), int(port)


def _parse_follow(out: str) -> dict[int, FollowedStream]:
    result: dict[int, FollowedStream] = {}
    stream: int | None = None
    nodes: list[tuple[str, int]] = []
    parts: tuple[list[str], list[str]] = ([], [])

    def flush() -> None:
        if stream is not None:
            c = nodes[0] if nodes else ("", 0)
            s = nodes[1] if len(nodes) > 1 else ("", 0)
            result[stream] = FollowedStream(stream, c, s, bytes.fromhex("".join(parts[0])),
                                            bytes.fromhex("".join(parts[1])))

    for line in out.splitlines():
        if line.startswith("====="):
            continue
        if line.startswith("Follow:"):
            flush()
            stream, nodes, parts = None, [], ([], [])
        elif line.startswith("Filter:"):
            stream = int(line.rsplit(None, 1)[-1])
        elif line.startswith("Node ") and ":" in line:
            nodes.append(_endpoint(line.split(":", 1)[1]))
        elif line.startswith("\t"):
            parts[1].append(line.strip())
        elif line.strip():
            parts[0].append(line.strip())
    flush()
    return result


def tshark_follow_raw(pcap: PathLike, streams: Iterable[int] | None = None) -> list[FollowedStream]:
    """Rebuild every TCP stream (or the given ones) with tshark's follow, sorted by stream index.

    Several ``-z follow`` taps share one tshark pass; batches keep the
    command line and memory bounded for captures with many streams.
    """
    ids = sorted(set(streams)) if streams is not None else tcp_streams(pcap)
    found: dict[int, FollowedStream] = {}
    for i in range(0, len(ids), _FOLLOW_BATCH):
        args = ["-q"]
        for n in ids[i:i + _FOLLOW_BATCH]:
            args += ["-z", f"follow,tcp,raw,{n}"]
        found.update(_parse_follow(tshark(Path(pcap), *args)))
    return [found[n] for n in ids if n in found]
