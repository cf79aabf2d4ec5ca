"""Where the optional compiled accelerator (``mproxy/_accel.c``) is looked up, once for every user.

Each hot spot it speeds up (record slicing, frame parsing, the emitter's
segment loop) keeps its pure-Python code as the reference and asks here
whether the compiled module may stand in: not when it was not built (no
compiler at install time) and not when ``MPROXY_NO_ACCEL`` is set (the test
suite runs the pure code that way too).
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["accelerator"]


def accelerator() -> ModuleType | None:
    """The compiled module, or None: not built, or turned off by ``MPROXY_NO_ACCEL``."""
    if os.environ.get("MPROXY_NO_ACCEL"):
        return None
    try:
        from . import _accel  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _accel  # type: ignore[no-any-return]
