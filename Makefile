# The two commands of the README:
#   make demo   installs fastnpo into .venv and runs the main job
#   make test   installs fastnpo with its test extras into .venv and runs the tests
# GPU users who already have a CUDA build of torch can `pip install -e ".[dev]"` in their
# own environment instead; .venv sees system packages, so a system CUDA torch is kept.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install install-dev demo demo-docs test bench gpu-wheels gpu-suite

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# torch first: a plain `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
install: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e .

install-dev: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"

# runs/demo is this target's own work folder: --overwrite replaces the previous demo there.
demo: install
	$(PY) -m fastnpo.cli demo --overwrite

# Regenerates docs/demo/ (the published study and the quick table a test compares with the code).
demo-docs: install
	$(PY) -m fastnpo.cli demo --overwrite
	cp runs/demo/results.json runs/demo/results.md runs/demo/*.png docs/demo/
	$(PY) -m fastnpo.cli demo --preset quick --out runs/demo-quick --overwrite
	cp runs/demo-quick/results.md docs/demo/quick/results.md

test: install-dev
	$(PY) -m pytest -q

bench: install-dev
	$(PY) benchmarks/bench_logprobs.py

# ---- GPU window (benchmarks/README.md, "GPU suite") ----
# gpu-wheels (here, with internet): the packages the GPU image lacks, as Python 3.12 manylinux
# x86_64 wheels, into wheels/ (ignored by git; carry it to the GPU machine). rouge-score has no
# wheel on PyPI: it is built here (pure Python). defusedxml is nltk's and missing there too.
# torchao (optim.name=adamw_8bit; 0.18 is the release built for the image's torch 2.11).
WHEELS ?= wheels
GPU_WHEELS := liger-kernel==0.8.5 cut-cross-entropy==25.1.1 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 \
	datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 nltk==3.10.4 trl==1.16.0 defusedxml==0.7.1 \
	torchao==0.18.0
PIP_GPU := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
# The suite's Python: .venv's where there is one (CPU), else python3 (the GPU image's).
SUITE_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-wheels:
	mkdir -p $(WHEELS)
	$(SUITE_PY) -m pip download -q $(PIP_GPU) -d $(WHEELS) $(GPU_WHEELS)
	$(SUITE_PY) -m pip wheel -q --no-deps -w $(WHEELS) rouge-score==0.1.2
	@du -sh $(WHEELS); ls $(WHEELS)

# gpu-suite OUT=<dir> (on the GPU machine): installs wheels/ into a temporary target and runs the
# GPU tests, the kernel, trainer and memory-plan benchmarks into OUT (<= 8 files), in under 10 minutes.
# SMOKE=1: the same code paths on CPU at tiny shapes (Triton through the interpreter).
OUT ?= gpu-suite-out
gpu-suite:
	$(SUITE_PY) benchmarks/gpu_suite.py --out $(OUT) --wheels $(WHEELS) $(if $(SMOKE),--smoke)
