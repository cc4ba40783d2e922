# One-command entry points. `make run` and `make test` set up .venv first when needed.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The extras installed: EXTRAS=recommender,dev make setup installs just those and is remembered
# (.venv/.extras) by later targets; the stamp names the extras, so a new choice re-installs.
EXTRAS ?= $(shell cat $(VENV)/.extras 2>/dev/null || echo all,dev)
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# Local Flyte runs keep their outputs (and so the local cache stays valid) under .data/;
# Ray keeps its sockets under /tmp, whose short path they need.
RUN_ENV := TMPDIR=$(CURDIR)/.data/tmp RAY_TMPDIR=/tmp

# The cluster path (see docs/deploy.md). Versions are pinned here and in k8s/.
KUBERAY_VERSION := 1.7.0
FLYTE_VERSION   := v1.16.8
FLYTE_PROJECT   ?= flyray
FLYTE_DOMAIN    ?= development
VERSION         ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)

.PHONY: setup lock run backfill reproduce ui serve test test-quick test-unit lint format bench package register images clean distclean cluster-check rehearse

setup: $(STAMP)

# Installs exactly the versions of uv.lock (uv: the lock's tool, and several times faster than
# pip); --locked fails when pyproject.toml changed without `make lock`.
UV_VERSION := 0.13.9
UV         := UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv
SYNC        = $(UV) sync --locked --quiet --python $(BIN)/python $(foreach e,$(subst $(comma), ,$(1)),--extra $(e))

$(STAMP): pyproject.toml uv.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(call SYNC,$(EXTRAS))
	@rm -f $(VENV)/.installed*
	@echo '$(EXTRAS)' > $(VENV)/.extras
	@touch $(STAMP)

# Re-resolve uv.lock after a dependency changed in pyproject.toml, install it, and re-export the
# images' pins (setup alone refuses a stale lock, so it comes after).
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(UV) lock --python $(BIN)/python
	@$(MAKE) --no-print-directory setup
	$(BIN)/python -m images.requirements --write

run: setup
	@mkdir -p .data/tmp
	@$(RUN_ENV) $(BIN)/python -m workflows.run_local

# The nightly retrain for past days: FROM=2026-11-01 TO=2026-11-03 (both included), as local runs;
# ARGS="--remote -p flyray -d development" uses Flyte's backfill instead. docs/recommendation.md.
backfill: setup
	@mkdir -p .data/tmp
	@$(RUN_ENV) $(BIN)/python -m workflows.backfill --from $(FROM) --to $(TO) $(ARGS)

# The MLflow UI on the embedded store (127.0.0.1:5000) and a page of the latest run's decks.
ui: setup
	@$(BIN)/python -m flyray.ui

# Train a registered version again from its lineage and compare its metrics with the recorded
# ones: MODEL=flyray-xgboost VERSION=3 (docs/platform.md#reproduce).
reproduce: setup
	@mkdir -p .data/tmp
	@$(RUN_ENV) $(BIN)/python -m workflows.reproduce --model $(MODEL) --version $(VERSION) $(ARGS)

# Every registered champion over HTTP on 127.0.0.1:8000 (Ray Serve), from the store `make run`
# registers into; each follows its champion alias. docs/serving.md.
serve: setup
	@mkdir -p .data/tmp
	@$(RUN_ENV) $(BIN)/python -m flyray.serve

# Every test; the slowest are listed last.
test: setup
	$(BIN)/python -m pytest

# The quick loop: the unit and integration tiers (tests/conftest.py); test-unit: no Ray at all.
test-quick: setup
	$(BIN)/python -m pytest -m "unit or integration"

test-unit: setup
	$(BIN)/python -m pytest -m unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(call SYNC,$(EXTRAS)$(comma)bench)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.funksvd
	$(BIN)/python -m bench.recsys
	$(BIN)/python -m bench.evaluation
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.cnn
	$(BIN)/python -m bench.xgboost
	$(BIN)/python -m bench.clip
	$(BIN)/python -m bench.serve
	$(BIN)/python -m bench.hostile

# Serialize every workflow, task and launch plan (with the code, for fast registration) into
# dist/flyray-flyte.tgz; needs no cluster: `flytectl register files` takes the archive.
package: setup
	@mkdir -p dist
	$(BIN)/pyflyte --pkgs workflows package --fast --force --output dist/flyray-flyte.tgz

# Before deploying, no cluster needed: render every manifest of k8s/ and the RayJob of every
# registered Ray task, validate them against KubeRay $(KUBERAY_VERSION)'s CRDs and Kubernetes' schemas.
cluster-check: setup
	$(BIN)/python -m k8s.check

# The cluster path run for real on this machine, without Kubernetes (docs/cluster.md): the
# platform from k8s/'s manifests and the packaged workflows, each Ray task on a Ray cluster of its
# own, in a network namespace that names the cluster's Services. Needs root; installs Debian's
# postgresql package when absent.
rehearse: package
	@$(BIN)/python -m k8s.rehearse $(ARGS)

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
