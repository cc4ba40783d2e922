# One-command entry points. `make run` and `make test` set up .venv first when needed.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS ?= all,dev
# Local Flyte runs keep their outputs (and so the local cache stays valid) under .data/;
# Ray keeps its sockets under /tmp, whose short path they need.
RUN_ENV := TMPDIR=$(CURDIR)/.data/tmp RAY_TMPDIR=/tmp RAY_DATA_DISABLE_PROGRESS_BARS=1

.PHONY: setup run test lint format bench clean distclean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $(STAMP)

run: setup
	@mkdir -p .data/tmp
	$(RUN_ENV) $(BIN)/python -m workflows.run_local

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.funksvd

clean:
	rm -rf .data .pytest_cache .ruff_cache bench/results
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
	-$(BIN)/pyflyte local-cache clear 2>/dev/null

distclean: clean
	rm -rf $(VENV) *.egg-info
