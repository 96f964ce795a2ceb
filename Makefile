# `make test` and `make demo` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo gpu-check bench routing-model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: the 2.13.0 CPU wheel lies on local disk; a newer torch pulled in later would download GBs.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m moestream.demo demo

# a small MoE trained on the standard library's sources: real routing for the cache benchmarks
routing-model: $(STAMP)
	$(PY) -m moestream.bench.routing_model build/routing-model

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

gpu-check:
	# Runs on a CUDA machine with its own python (see docs/GPU.md); never in CI.
	$${PYTHON:-python3} -m moestream.gpu_check

clean:
	rm -rf $(VENV) demo .pytest_cache .hypothesis
