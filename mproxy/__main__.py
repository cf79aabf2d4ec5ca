"""``python -m mproxy``: the same as the ``mproxy`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
