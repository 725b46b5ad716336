# bali-zero-bridge. The two set-up commands: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
NODE_INSTALLED := node_modules/.installed
BUF := node_modules/.bin/buf
SYSTEM_TEST_DEPS := chromium=chromium redis-server=redis-server nginx=nginx node=nodejs npm=npm curl=curl ip=iproute2 tc=iproute2
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: run test lint docs proto bench bench-workers fuzz soak loadtest clean system-deps constraints

$(INSTALLED): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: Python 3.11+ needed ($(PYTHON))" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { scripts/system-deps.sh ensurepip-missing=python3-venv && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

$(NODE_INSTALLED): package.json package-lock.json
	@scripts/system-deps.sh node=nodejs npm=npm
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

system-deps:
	@scripts/system-deps.sh $(SYSTEM_TEST_DEPS)

run: $(INSTALLED)
	@scripts/system-deps.sh curl=curl
	@BIN=$(BIN) scripts/run.sh

test: system-deps $(INSTALLED) $(NODE_INSTALLED) lint docs
	node --test tests/js/
	$(BIN)/pytest

lint: $(INSTALLED) $(NODE_INSTALLED)
	$(BUF) lint
	$(BUF) format --diff --exit-code
	@if git rev-parse --verify -q main >/dev/null && git cat-file -e main:protos 2>/dev/null; then \
	  $(BUF) breaking --against '.git#branch=main'; \
	else echo "buf breaking: no protos/ on main yet, nothing to compare"; fi
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy bridge rag_stub scripts tests bench bzb_shared

# The reference (docs/, mkdocs.yml) into build/site/; --strict fails on a broken link or anchor.
# Nothing is fetched: no web fonts, no plugin that downloads. NO_MKDOCS_2_WARNING quiets a banner;
# --quiet must not be added: it hides the warnings --strict counts, and a broken link passes.
docs: $(INSTALLED)
	$(BIN)/python scripts/gen_settings_table.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

proto: $(INSTALLED)
	$(BIN)/python scripts/gen_proto.py

bench: $(INSTALLED)
	$(BIN)/python -m bench.run

# Paced streams held within the targets at 1 and 2 workers, interleaved (bench/workers.py).
bench-workers: $(INSTALLED)
	@scripts/system-deps.sh redis-server=redis-server
	$(BIN)/python -m bench.workers

fuzz: $(INSTALLED)
	FUZZ_EXAMPLES=5000 $(BIN)/pytest tests/e2e/test_fuzz.py tests/unit/test_sse_properties.py -q

# `make loadtest`: the deployment guide's `k6 run load-tests/chat-stream-load.js` (long profile)
# against the stub, Redis and a bridge of LOADTEST_WORKERS workers; k6's summary goes to
# bench/results/k6-summary.json. The short profile runs in `make test` (tests/e2e/test_loadtest.py).
LOADTEST_WORKERS ?= 2
loadtest: $(INSTALLED)
	@scripts/system-deps.sh redis-server=redis-server
	$(BIN)/python -m bench.loadtest --workers $(LOADTEST_WORKERS) --profile long --summary bench/results/k6-summary.json

# `make soak SOAK_DURATION=1800` is the long run that proves the RSS plateau (chart and JSON in
# bench/results/soak-long.*); plain `make soak` is the one-minute accounting run.
SOAK_DURATION ?=
soak: $(INSTALLED)
	$(BIN)/python -m bench.soak $(if $(SOAK_DURATION),--duration $(SOAK_DURATION) --out bench/results/soak-long.json --chart bench/results/soak-long.png) $(SOAK_ARGS)

# constraints.txt pins every Python package to the versions the suite last passed with, so a
# fresh clone installs the same set; refresh it deliberately after upgrading.
constraints: $(INSTALLED)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^bali-zero-bridge' > constraints.txt

clean:
	rm -rf $(VENV) node_modules build *.egg-info .mypy_cache .ruff_cache .pytest_cache
