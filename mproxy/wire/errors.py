"""Typed decode errors.

Errors on the packet path are *values*, never exceptions that escape: callers
count them by ``kind`` (a metric label) and keep going.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ErrorKind(str, Enum):
    """Why a frame, packet or option could not be decoded (low-cardinality)."""

    # link layer / capture
    UNSUPPORTED_LINKTYPE = "unsupported_linktype"
    TRUNCATED_LINK = "truncated_link"
    NOT_IP = "not_ip"
    # IP
    TRUNCATED_IP = "truncated_ip"
    BAD_IP_VERSION = "bad_ip_version"
    BAD_IP_HEADER_LENGTH = "bad_ip_header_length"
    BAD_IP_TOTAL_LENGTH = "bad_ip_total_length"
    TRUNCATED_IPV6_EXTENSION = "truncated_ipv6_extension"
    FRAGMENT = "fragment"
    # headers a Linux receiver refuses before TCP (mproxy.wire.iphdr): it drops the packet, so do we
    REFUSED_IP_OPTIONS = "refused_ip_options"
    REFUSED_IPV6_EXTENSION = "refused_ipv6_extension"
    # TCP
    TRUNCATED_TCP = "truncated_tcp"
    BAD_TCP_DATA_OFFSET = "bad_tcp_data_offset"
    BAD_OPTION_LENGTH = "bad_option_length"
    OPTION_PAST_HEADER = "option_past_header"
    # MPTCP option
    MPTCP_TOO_SHORT = "mptcp_too_short"
    MPTCP_BAD_LENGTH = "mptcp_bad_length"
    MPTCP_UNKNOWN_SUBTYPE = "mptcp_unknown_subtype"
    MPTCP_UNKNOWN_VERSION = "mptcp_unknown_version"
    MPTCP_BAD_FLAGS = "mptcp_bad_flags"
    MPTCP_WRONG_TCP_FLAGS = "mptcp_wrong_tcp_flags"
    MPTCP_DSS_ON_SYN = "mptcp_dss_on_syn"


@dataclass(frozen=True, slots=True)
class WireError:
    """A decode failure: ``kind`` for counting, ``detail`` for the log line."""

    kind: ErrorKind
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}" if self.detail else self.kind.value
