"""Where the optional compiled modules are looked up, once for every user.

``mproxy/_accel.c`` (record slicing, frame parsing, the emitter's segment loop)
and ``mproxy/_hsscan.c`` (the inspector's content scan with its match handler
in C). Each hot spot they speed up keeps its pure-Python code as the reference
and asks here whether the compiled module may stand in: not when it was not
built (no compiler, or no libhs, at install time) and not when
``MPROXY_NO_ACCEL`` is set (the test suite runs the pure code that way too).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["accelerator", "content_scanner", "describe", "switched_off"]


def switched_off() -> bool:
    """``MPROXY_NO_ACCEL`` is set: the pure-Python reference runs even where the compiled parts are built."""
    return bool(os.environ.get("MPROXY_NO_ACCEL"))


def _compiled(name: str) -> ModuleType | None:
    if switched_off():
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


def accelerator() -> ModuleType | None:
    """The compiled module ``_accel``, or None: not built, or turned off by ``MPROXY_NO_ACCEL``."""
    return _compiled("_accel")


def content_scanner() -> ModuleType | None:
    """The compiled module ``_hsscan``, or None: not built, or turned off by ``MPROXY_NO_ACCEL``."""
    return _compiled("_hsscan")


def describe() -> str:
    """One line for operators (``mproxy check``, the start-up log): which compiled parts run. A
    build without them works, slower (pure-Python frame parsing; the inspector's content matches
    handed to Python one by one, 3-6x slower on floods), and should not go unnoticed."""
    parts = [("accelerator", accelerator()), ("inspector content scan", content_scanner())]
    why = " (MPROXY_NO_ACCEL)" if switched_off() else ""
    return ", ".join(f"{name} {'compiled' if mod is not None else 'pure Python' + why}" for name, mod in parts)
