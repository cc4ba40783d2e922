# One-command entry points. `make run` and `make test` set up .venv first when needed.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS ?= all,dev
# Local Flyte runs keep their outputs (and so the local cache stays valid) under .data/;
# Ray keeps its sockets under /tmp, whose short path they need.
RUN_ENV := TMPDIR=$(CURDIR)/.data/tmp RAY_TMPDIR=/tmp RAY_DATA_DISABLE_PROGRESS_BARS=1

# The cluster path (see README, "Deploy to a cluster"). Versions are pinned here and in k8s/.
KUBERAY_VERSION := 1.1.1
FLYTE_VERSION   := v1.16.1
FLYTE_PROJECT   ?= flyray
FLYTE_DOMAIN    ?= development
VERSION         ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)

.PHONY: setup run test lint format bench package register images clean distclean

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
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.cnn
	$(BIN)/python -m bench.xgboost
	$(BIN)/python -m bench.clip

# Serialize every workflow, task and launch plan (with the code, for fast registration) into
# dist/flyray-flyte.tgz; needs no cluster: `flytectl register files` takes the archive.
package: setup
	@mkdir -p dist
	$(BIN)/pyflyte --pkgs workflows package --fast --force --output dist/flyray-flyte.tgz

# Needs a Flyte cluster (~/.flyte/config.yaml or FLYTECTL_CONFIG) and Docker to build images.
register: setup
	$(BIN)/pyflyte register --project $(FLYTE_PROJECT) --domain $(FLYTE_DOMAIN) \
		--version $(VERSION) --activate-launchplans workflows

# Build and push every ImageSpec to $$FLYRAY_REGISTRY (needs Docker).
images: setup
	$(BIN)/python -m images

clean:
	rm -rf .data .pytest_cache .ruff_cache bench/results dist
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
	-$(BIN)/pyflyte local-cache clear 2>/dev/null

distclean: clean
	rm -rf $(VENV) *.egg-info
