"""Build hook for the optional compiled accelerator (``mproxy/_accel.c``; metadata is in pyproject.toml).

``optional=True``: without a C compiler or Python headers the install still succeeds and mproxy
runs its pure-Python code, which stays the reference (MPROXY_NO_ACCEL=1 selects it at run time).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mproxy._accel", ["mproxy/_accel.c"], optional=True, extra_compile_args=["-O2"])])
