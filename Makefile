# Two commands do all the set-up on a fresh Debian-like machine:
#   make demo   - virtual environment, mosquitto, then the demo
#   make test   - the same set-up, then lint and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.fedbus-installed

.PHONY: setup demo test lint clean broker

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/ensure-mosquitto.sh
	bash scripts/ensure-mosquitto.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pinned CPU build first: an unpinned torch pulls gigabytes of CUDA packages.
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[server,dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/fedbus demo

lint: setup
	$(BIN)/ruff check .

# pytest exits 5 when it collected no tests; make treats any non-zero exit as failure.
test: setup lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) fedbus-report .pytest_cache .ruff_cache
