"""Build hook for the optional compiled parts (metadata is in pyproject.toml).

* ``mproxy._accel`` (``mproxy/_accel.c``): frame parsing, record slicing, the emitter's segment loop.
* ``mproxy._hsscan`` (``mproxy/_hsscan.c``): the inspector's content scan with its match handler in C;
  needs Hyperscan's headers and library (Debian ``libhyperscan-dev``).

``optional=True``: without a C compiler, Python headers or libhs the install still succeeds and mproxy
runs its pure-Python code (for the scan: the ``hyperscan`` binding with a Python match handler), which
stays the reference (MPROXY_NO_ACCEL=1 selects it at run time).
"""

import shlex
import subprocess

from setuptools import Extension, setup


def _hs_cflags() -> list[str]:
    try:
        out = subprocess.run(["pkg-config", "--cflags", "libhs"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["-I/usr/include/hs"]
    return shlex.split(out)


setup(ext_modules=[
    Extension("mproxy._accel", ["mproxy/_accel.c"], optional=True, extra_compile_args=["-O2"]),
    Extension("mproxy._hsscan", ["mproxy/_hsscan.c"], optional=True, libraries=["hs"],
              extra_compile_args=["-O2", *_hs_cflags()]),
])
