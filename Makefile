# The two commands of the README, on a machine with only python3, pip and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pytest-xdist workers for make test: 2 fill this project's 2-core machine (one pytest worker
# computes while the other compiles or starts a subprocess).
TEST_WORKERS ?= 2

.PHONY: run test test-fast lint install bench compare clean

run: $(VENV)/.runtime
	$(BIN)/python train.py --config=configs/quickstart.py --workdir=out/quickstart

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# the unit tier (pyproject.toml's markers): in-process tests, for the inner loop
test-fast: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m unit

# ruff at the settings of pyproject.toml; part of make test (and so of CI)
lint: $(VENV)/.test
	$(BIN)/ruff check .

install: $(VENV)/.runtime

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.test: requirements-test.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.samplers
	$(BIN)/python -m benchmarks.sampler_quality
	$(BIN)/python -m benchmarks.train_loop --steps 16
	$(BIN)/python -m benchmarks.convolutions

compare: $(VENV)/.test
	$(BIN)/python -m benchmarks.compare

clean:
	rm -rf $(VENV) out
