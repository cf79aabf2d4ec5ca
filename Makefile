# Two entry points: `make demo` (the main job) and `make test` (the suite CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE := samples/split-attack.pcap

.PHONY: demo replay-demo test venv deps clean bench

# setup.py builds the optional C accelerator (mproxy/_accel.c; gcc and python3-dev, see .ci/apt-deps);
# without them the install goes on and mproxy runs pure Python.
$(VENV)/.installed: pyproject.toml setup.py mproxy/_accel.c mproxy/_hsscan.c
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian packages the tests and the lab need (root, Debian/Ubuntu).
deps:
	@bash .ci/apt-deps

# The live demo: namespace lab, mproxy inline on NFQUEUE, an attack split across two
# MPTCP paths fast-closed (needs root). replay-demo: the offline replay of a shipped capture.
demo: venv
	$(PY) -m mproxy.demo_live

replay-demo: venv
	$(PY) -m mproxy.demo

test: venv
	$(PY) -m pytest -q -p no:cacheprovider
	MPROXY_NO_ACCEL=1 $(PY) -m pytest -q -p no:cacheprovider tests/wire tests/core tests/io/test_pcap.py tests/io/test_emitproc.py tests/test_replay.py tests/test_sample.py

bench: venv
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/replay.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis mproxy/*.so
