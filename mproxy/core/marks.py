"""A connection's worker as bits of the packet/conntrack mark (``[rules] worker_mask``).

Shared by the config check, the rules and the control queue's steering, and
kept free of imports so that loading the config does not load the core.
Worker ``w`` (0-based) is the value ``w + 1`` under the mask; 0 means "no
worker chosen yet", which is what the rules test for a connection's first SYN.
"""

from __future__ import annotations

__all__ = ["mask_shift", "mask_capacity", "worker_bits"]


def mask_shift(mask: int) -> int:
    """Position of the lowest set bit of a (non-zero) mark mask."""
    return (mask & -mask).bit_length() - 1


def mask_capacity(mask: int) -> int:
    """How many workers a mark mask can name (its values 1..capacity); 0 when it is not one run of set bits."""
    if mask <= 0 or mask & (mask + (mask & -mask)):
        return 0
    return mask >> mask_shift(mask)


def worker_bits(worker: int, mask: int) -> int:
    """The mark value naming ``worker`` (0-based) inside ``mask``; 0 means "no worker yet"."""
    return (worker + 1) << mask_shift(mask)
