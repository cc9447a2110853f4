# One way to run everything: the README, CI (.ci/run) and developers use these targets.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo lint test test-fast clean
LINTED := slmbatch tests benchmarks examples devkit jobs

install:
	@bash scripts/install.sh $(VENV)

# Build the demo's models locally (once), run the demo job (against a local stand-in
# frontier unless SLMBATCH_FRONTIER_URL is set), show what the cascade did.
demo: install
	@$(PY) examples/build_demo_models.py
	@$(PY) examples/run_demo.py
	@$(PY) examples/show_demo_output.py

# Format, lint and type checks (configured in pyproject.toml); CI runs it before the tests.
lint: install
	@$(VENV)/bin/ruff format --check $(LINTED)
	@$(VENV)/bin/ruff check $(LINTED)
	@$(VENV)/bin/mypy

# Two pytest processes (pytest-xdist), each test file whole in one of them (its module fixtures run
# once), longest files first (tests/conftest.py). On 2 cores one process left a core idle for much of
# the run: Python imports and engine start-ups are single-threaded. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# --durations: the slowest tests in every log (CI's too), to see where the 20-minute budget goes.
test: install
	@bash scripts/install-test-tools.sh
	@$(PYTEST) --durations=25 $(PYTEST_ARGS)

# While working: everything but the tests marked slow.
test-fast: install
	@bash scripts/install-test-tools.sh
	@$(PYTEST) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
