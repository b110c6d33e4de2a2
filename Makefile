# The two commands of the README:
#   make demo   installs fastnpo into .venv and runs the main job
#   make test   installs fastnpo with its test extras into .venv and runs the tests
# GPU users who already have a CUDA build of torch can `pip install -e ".[dev]"` in their
# own environment instead; .venv sees system packages, so a system CUDA torch is kept.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install install-dev demo test bench

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# torch first: a plain `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
install: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e .

install-dev: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"

demo: install
	$(PY) -m fastnpo.cli demo

test: install-dev
	$(PY) -m pytest -q

bench: install-dev
	$(PY) benchmarks/bench_logprobs.py
