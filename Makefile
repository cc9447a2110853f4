# One way to run everything: the README, CI (.ci/run) and developers use these targets.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test clean

install:
	@bash scripts/install.sh $(VENV)

# Build the demo's models locally (once), run the demo job (with a local frontier
# server unless SLMBATCH_FRONTIER_URL is set), show its output.
demo: install
	@$(PY) examples/build_demo_models.py
	@$(PY) examples/run_demo.py
	@$(PY) examples/show_demo_output.py

test: install
	@$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
