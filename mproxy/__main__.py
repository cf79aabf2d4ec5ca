"""``python -m mproxy``: the same as the ``mproxy`` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned child (the emitter process) imports it
    sys.exit(main())
