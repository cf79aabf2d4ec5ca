# Two entry points: `make demo` (the main job) and `make test` (the suite CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE := samples/split-attack.pcap

.PHONY: demo replay-demo test venv deps clean bench

$(VENV)/.installed: pyproject.toml
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

bench: venv
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/replay.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
