"""MPTCP key-derived values: token, IDSN, MP_JOIN and ADD_ADDR HMACs, DSS checksum.

v0 (RFC 6824) uses SHA-1, v1 (RFC 8684) SHA-256. The token is the most
significant 32 bits of the key's hash, the IDSN the least significant 64.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
from functools import lru_cache
from struct import Struct

from .wire.checksum import ones_sum

_U64 = Struct("!Q")
_U32 = Struct("!I")
_DSS_PSEUDO = Struct("!QIHH")


@lru_cache(maxsize=4096)  # a connection's token is looked up at its handshake, joins, record and end
def _digest(key: int, version: int) -> bytes:
    h = hashlib.sha256 if version >= 1 else hashlib.sha1
    return h(_U64.pack(key)).digest()


def key_token(key: int, version: int = 1) -> int:
    """32-bit token that identifies the connection to the key's owner."""
    return _U32.unpack_from(_digest(key, version), 0)[0]


def key_idsn(key: int, version: int = 1) -> int:
    """Initial data sequence number of the data the key's owner sends."""
    d = _digest(key, version)
    return _U64.unpack_from(d, len(d) - 8)[0]


def _mac(key: bytes, msg: bytes, version: int) -> bytes:
    return _hmac.new(key, msg, hashlib.sha256 if version >= 1 else hashlib.sha1).digest()


def join_hmac(own_key: int, peer_key: int, own_nonce: int, peer_nonce: int, version: int = 1) -> bytes:
    """Full HMAC an endpoint sends in MP_JOIN: key = own||peer key, msg = own||peer nonce.

    The SYN/ACK carries the leftmost 64 bits, the third ACK the leftmost 160.
    """
    return _mac(_U64.pack(own_key) + _U64.pack(peer_key), _U32.pack(own_nonce) + _U32.pack(peer_nonce), version)


def verify_join_synack(server_key: int, client_key: int, server_nonce: int, client_nonce: int,
                       truncated: bytes, version: int = 1) -> bool:
    mac = join_hmac(server_key, client_key, server_nonce, client_nonce, version)
    return _hmac.compare_digest(mac[:8], truncated)


def verify_join_ack(client_key: int, server_key: int, client_nonce: int, server_nonce: int,
                    mac160: bytes, version: int = 1) -> bool:
    mac = join_hmac(client_key, server_key, client_nonce, server_nonce, version)
    return _hmac.compare_digest(mac[:20], mac160)


def add_addr_hmac(sender_key: int, receiver_key: int, addr_id: int, address: bytes, port: int | None) -> int:
    """v1 ADD_ADDR HMAC: rightmost 64 bits of HMAC-SHA256(sender||receiver key, id||addr||port).

    The port field is always part of the message (zero when not sent), as Linux does.
    """
    msg = bytes((addr_id,)) + address + (port or 0).to_bytes(2, "big")
    mac = _mac(_U64.pack(sender_key) + _U64.pack(receiver_key), msg, 1)
    return _U64.unpack_from(mac, len(mac) - 8)[0]


def add_addr_hmac_legacy(sender_key: int, receiver_key: int, addr_id: int, address: bytes,
                         port: int | None = None) -> int:
    """Pre-RFC 8684 form (early Linux v1, seen in 2020 captures): the *leftmost* 64 bits.

    The message is the same as in the RFC form (id || address || 2-byte port,
    zero when not sent): mptcp-aa-v1.pcap frame 13 verifies only this way.
    """
    msg = bytes((addr_id,)) + address + (port or 0).to_bytes(2, "big")
    mac = _mac(_U64.pack(sender_key) + _U64.pack(receiver_key), msg, 1)
    return _U64.unpack_from(mac, 0)[0]


def add_addr_hmac_ok(sender_key: int, receiver_key: int, addr_id: int, address: bytes, port: int | None,
                     value: int) -> bool:
    """True when an ADD_ADDR HMAC matches the RFC 8684 form or the pre-RFC form."""
    if add_addr_hmac(sender_key, receiver_key, addr_id, address, port) == value:
        return True
    return add_addr_hmac_legacy(sender_key, receiver_key, addr_id, address, port) == value


def dss_checksum(dsn64: int, rel_ssn: int, dll: int, payload: bytes | memoryview) -> int:
    """Checksum to put in a DSS mapping over its pseudo-header and payload."""
    s = ones_sum(payload, ones_sum(_DSS_PSEUDO.pack(dsn64 & 0xFFFFFFFFFFFFFFFF, rel_ssn & 0xFFFFFFFF, dll, 0)))
    return (~s) & 0xFFFF


def dss_checksum_ok(dsn64: int, rel_ssn: int, dll: int, checksum: int, payload: bytes | memoryview) -> bool:
    """True when the mapping's checksum matches (the whole sum folds to 0xFFFF)."""
    s = ones_sum(payload, ones_sum(_DSS_PSEUDO.pack(dsn64 & 0xFFFFFFFFFFFFFFFF, rel_ssn & 0xFFFFFFFF, dll, checksum)))
    return s == 0xFFFF
