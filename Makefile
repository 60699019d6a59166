# The README's two commands: `make demo` (set up, run the main job) and `make test`.
# Both use the repo's .venv; `setup` is idempotent and cheap when nothing changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test bench stress lint clean

setup: system-deps $(STAMP)

system-deps:
	@bash scripts/install-system-deps.sh

# --compile-bytecode: sandboxes see this environment read-only and cannot write the
# bytecode cache, so without it every kernel start compiles what it imports.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[test]'
	$(BIN)/sandbox-kernel install --sys-prefix
	touch $(STAMP)

demo: setup
	$(BIN)/python scripts/run_notebook.py notebooks/quickstart.ipynb

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	$(BIN)/python bench/run.py

# Load figures (issue 9): sessions held, cells per second, p99 latency, memory per idle session.
stress: setup $(BENCH_STAMP)
	$(BIN)/python bench/stress.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) bench/results .pytest_cache
