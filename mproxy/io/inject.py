"""Send crafted IP packets (MP_FASTCLOSE, RST) from the gateway through raw sockets.

The core builds complete IP packets impersonating each end of a connection
(:mod:`mproxy.core.fastclose`); this adapter only puts them on the wire.
``IPPROTO_RAW`` sockets imply "header included" for IPv4 and IPv6, so the
kernel sends the packet as built — source address, checksums and all — and
routes it by its destination. Locally generated packets traverse OUTPUT, not
FORWARD, so mproxy's own NFQUEUE rules never queue them back to us.

Needs ``CAP_NET_RAW`` (the systemd unit grants it). A send that fails is
counted and logged once; it never raises into the packet path.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

__all__ = ["Injector", "InjectError", "InjectStats"]

log = logging.getLogger("mproxy.inject")


class InjectError(RuntimeError):
    """The raw sockets could not be opened (message says why)."""


@dataclass(slots=True)
class InjectStats:
    sent: int = 0
    errors: int = 0
    last_error: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"sent": self.sent, "errors": self.errors, "last_error": self.last_error}


@dataclass(slots=True)
class Injector:
    ipv6: bool = True
    stats: InjectStats = field(default_factory=InjectStats)
    _s4: socket.socket | None = None
    _s6: socket.socket | None = None

    def open(self) -> None:
        try:
            self._s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            if self.ipv6 and socket.has_ipv6:
                try:
                    self._s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
                except OSError as e:  # IPv6 disabled on the host: IPv4 still works
                    log.warning("no IPv6 raw socket (%s): MP_FASTCLOSE cannot be sent for IPv6 connections", e)
        except OSError as e:
            self.close()
            raise InjectError(f"cannot open a raw socket to send MP_FASTCLOSE/RST: {e.strerror or e} "
                              "(needs CAP_NET_RAW)") from None

    def send(self, packets: list[bytes]) -> int:
        """Send each IP packet; returns how many went out."""
        n = 0
        for p in packets:
            try:
                if p[0] >> 4 == 4:
                    if self._s4 is None:
                        raise OSError("IPv4 raw socket not open")
                    self._s4.sendto(p, (socket.inet_ntop(socket.AF_INET, p[16:20]), 0))
                else:
                    if self._s6 is None:
                        raise OSError("IPv6 raw socket not open")
                    self._s6.sendto(p, (socket.inet_ntop(socket.AF_INET6, p[24:40]), 0))
                n += 1
            except (OSError, IndexError) as e:
                self.stats.errors += 1
                self.stats.last_error = str(e)
                if self.stats.errors == 1:
                    log.error("sending a crafted packet failed: %s (further failures only counted)", e)
        self.stats.sent += n
        return n

    def close(self) -> None:
        for s in (self._s4, self._s6):
            if s is not None:
                s.close()
        self._s4 = self._s6 = None
