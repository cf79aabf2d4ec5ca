"""mproxy: a transparent, reassembling MPTCP-to-TCP security proxy."""

__version__ = "0.1.0"
