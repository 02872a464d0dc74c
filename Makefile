# `make test` and `make demo` set up a fresh machine: they create .venv if missing and install
# what they need. torch is pinned first so pip never pulls a multi-GB CUDA build on CPU machines.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.leapalign-installed
TORCH ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: install test demo bench clean

$(STAMP): setup.py CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n $(PYTEST_WORKERS) tests

demo: $(STAMP)
	$(PY) -m leapalign demo

bench: $(STAMP)
	$(PY) -m benchmarks memory --json benchmarks/results/memory_cpu.json

clean:
	rm -rf $(VENV) build *.egg-info demo_out
