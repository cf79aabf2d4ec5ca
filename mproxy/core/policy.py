"""Policy: which action applies to an MPTCP connection, decided on its first SYN.

Rules match the client (the SYN's source) and server networks and the
server port; the first match wins, else the default. Trusted networks
govern joins: a join from a client address outside them is refused, or the
client's connections are downgraded, as configured.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(str, Enum):
    INSPECT = "inspect"  # pass, reassemble, emit to the IDS sink
    DOWNGRADE = "downgrade"  # strip MP_CAPABLE from the SYN: both ends fall back to TCP
    BLOCK_JOINS = "block-joins"  # drop MP_JOIN SYNs: the connection stays on its first path
    VERIFY_JOINS = "verify-joins"  # drop joins with an unknown token or a failing HMAC
    ALLOW = "allow"  # pass untouched, not reassembled


class UntrustedJoin(str, Enum):
    REFUSE = "refuse"  # drop joins from addresses outside the trusted networks
    DOWNGRADE = "downgrade"  # downgrade connections opened from outside the trusted networks


class OnMemcap(str, Enum):
    """What the gateway does with a packet whose bytes a buffer limit kept out of the tracker."""

    DROP = "drop"  # drop it: the sender resends it once there is room, the IDS misses nothing
    PASS = "pass"  # let it through: the server gets bytes the IDS never sees (reported as a gap)


class LowTtl(str, Enum):
    """What the gateway does with a packet whose TTL (hop limit) is below its subflow direction's
    first packet's: such a packet may expire between the gateway and the receiver (a TTL insertion)."""

    RAISE = "raise"  # forward it with the first packet's TTL: it reaches the receiver, read as the others
    PASS = "pass"  # forward it as it came: read only once the receiver acknowledges its bytes


@dataclass(frozen=True, slots=True)
class Rule:
    action: Action
    clients: tuple[Network, ...] = ()  # empty = any
    servers: tuple[Network, ...] = ()
    ports: frozenset[int] | None = None  # server ports; None = any
    name: str = ""

    def matches(self, client: ipaddress.IPv4Address | ipaddress.IPv6Address,
                server: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        if self.ports is not None and port not in self.ports:
            return False
        if self.clients and not _in(client, self.clients):
            return False
        if self.servers and not _in(server, self.servers):
            return False
        return True


def _in(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: tuple[Network, ...]) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    default: Action = Action.INSPECT
    trusted: tuple[Network, ...] | None = None  # None = every address is trusted
    untrusted_join: UntrustedJoin = UntrustedJoin.REFUSE
    on_memcap: OnMemcap = OnMemcap.DROP
    low_ttl: LowTtl = LowTtl.RAISE
    # inline, with on_memcap = "drop": the window an ACK of an MPTCP subflow advertises is lowered to
    # what the tracker may buffer for its connection (see Gateway._clamp_window)
    clamp_window: bool = True
    _cache: dict[tuple[bytes, bytes, int], tuple[Action, str]] = field(default_factory=dict, compare=False,
                                                                       repr=False)

    def decide(self, client: bytes, server: bytes, port: int) -> tuple[Action, str]:
        """(action, name of the rule that chose it) for a new connection."""
        key = (client, server, port)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        c, s = ipaddress.ip_address(client), ipaddress.ip_address(server)
        result = (self.default, "default")
        for r in self.rules:
            if r.matches(c, s, port):
                result = (r.action, r.name)
                break
        if self.untrusted_join == UntrustedJoin.DOWNGRADE and not self.is_trusted(client) \
                and result[0] != Action.ALLOW:
            result = (Action.DOWNGRADE, "untrusted")
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[key] = result
        return result

    def is_trusted(self, addr: bytes) -> bool:
        if self.trusted is None:
            return True
        return _in(ipaddress.ip_address(addr), self.trusted)
