"""Events the core emits: past-tense values, never callbacks.

The tracker returns a list of these per packet; adapters (replay writer,
live gateway, metrics, event log) read them and decide what to do.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from enum import Enum, IntEnum
from typing import final


class Direction(IntEnum):
    """Data direction relative to the MPTCP connection's client (initial subflow initiator)."""

    C2S = 0
    S2C = 1


class Role(str, Enum):
    INITIAL = "initial"  # carried MP_CAPABLE
    JOIN = "join"  # opened with MP_JOIN
    PICKUP = "pickup"  # first seen mid-stream


class NoticeType(str, Enum):
    """Anomalies worth telling a security team about (metric label values)."""

    INVALID_OPTION = "invalid_option"
    KEY_CHANGE = "key_change"
    ADD_ADDR_ID_REUSE = "add_addr_id_reuse"
    JOIN_UNKNOWN_TOKEN = "join_unknown_token"
    JOIN_UNKNOWN_ADDRESS = "join_unknown_address"
    JOIN_HMAC_FAILURE = "join_hmac_failure"
    JOIN_FLOOD = "join_flood"
    SYN_FLOOD = "syn_flood"
    OVERLAP_MISMATCH = "overlap_mismatch"
    SIDE_CHANNEL = "side_channel"
    CAPTURE_GAP = "capture_gap"
    DSS_CHECKSUM_FAILURE = "dss_checksum_failure"
    INFINITE_MAPPING = "infinite_mapping"
    MP_FAIL = "mp_fail"
    OUT_OF_WINDOW = "out_of_window"
    MEMCAP = "memcap"
    MEMCAP_STALL = "memcap_stall"
    BAD_MAPPING = "bad_mapping"
    BAD_CHECKSUM = "bad_checksum"
    WRONG_INTERFACE = "wrong_interface"
    LOW_TTL = "low_ttl"


class Outcome(str, Enum):
    """How a tracked connection ended."""

    DATA_FIN = "data_fin"  # DATA_FIN both ways
    FIN = "fin"  # subflows closed with FIN, no DATA_FIN seen
    FASTCLOSE = "fastclose"
    RESET = "reset"
    FALLBACK = "fallback"  # fell back to plain TCP in the handshake
    IDLE = "idle_timeout"
    EVICTED = "evicted"  # connection limit reached
    END_OF_INPUT = "end_of_input"


@dataclass(frozen=True, slots=True)
class ConnectionOpened:
    conn_id: int
    ts: float


@dataclass(frozen=True, slots=True)
class SubflowJoined:
    conn_id: int
    subflow_id: int
    ts: float


@dataclass(frozen=True, slots=True)
class SubflowRefused:
    """A subflow the tracker would not attach (limits, unknown token)."""

    reason: str
    ts: float


@final  # Pipeline.handle dispatches on its exact type
@dataclass(frozen=True, slots=True)
class DataReleased:
    conn_id: int
    direction: Direction
    data: bytes
    ts: float


def _set_by_slots(cls: type) -> None:
    """A frozen dataclass's ``__init__`` stores each field through ``object.__setattr__`` (a
    global lookup and a call per field); the slots' own descriptors make the same stores for a
    third of that. For the event made once per data packet; equality, hashing, immutability and
    the signature are the dataclass's."""
    names = [f.name for f in fields(cls)]
    assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(cls))
    env = {f"_set_{n}": cls.__dict__[n].__set__ for n in names}
    body = "".join(f"    _set_{n}(self, {n})\n" for n in names)
    exec(f"def __init__(self, {', '.join(names)}):\n{body}", env)  # noqa: S102 - our own field names
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    setattr(cls, "__init__", init)  # noqa: B010 - a class attribute, not an instance's


_set_by_slots(DataReleased)


@dataclass(frozen=True, slots=True)
class DataFinished:
    """DATA_FIN reached in one direction: no more bytes that way."""

    conn_id: int
    direction: Direction
    ts: float


@dataclass(frozen=True, slots=True)
class GapSkipped:
    """Bytes that never crossed the capture point; ``acked`` = the peer DATA_ACKed them."""

    conn_id: int
    direction: Direction
    dsn: int
    length: int
    acked: bool
    ts: float


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    conn_id: int
    outcome: Outcome
    reset: bool
    ts: float


@dataclass(frozen=True, slots=True)
class Notice:
    type: NoticeType
    conn_id: int | None
    detail: str
    ts: float
    src: str = ""
    sport: int = 0
    dst: str = ""
    dport: int = 0


@dataclass(frozen=True, slots=True)
class PassThrough:
    """A packet that is not (or no longer) MPTCP: hand it on unchanged."""

    ip: bytes
    ipver: int
    ts: float


Event = (
    ConnectionOpened | SubflowJoined | SubflowRefused | DataReleased | DataFinished | GapSkipped
    | ConnectionClosed | Notice | PassThrough
)
