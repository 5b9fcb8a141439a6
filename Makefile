# `make run` trains a real swarm on this machine; `make test` runs the test suite. Both set up .venv first.
VENV := .venv
STAMP := $(VENV)/.distqat-installed
MAX_STEPS ?= 100
ARGS ?=

.PHONY: setup run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

run: setup
	$(VENV)/bin/distqat local --max-steps $(MAX_STEPS) $(ARGS)

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup
	$(VENV)/bin/python benchmarks/throughput.py $(ARGS)

clean:
	rm -rf $(VENV) logs build src/*.egg-info .pytest_cache .ruff_cache
