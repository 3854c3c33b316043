# Two set-up commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint format bench parity ray clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: its CPU wheel is served locally; other versions pull CUDA builds.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The optional Ray backend (streammerge[ray]) in the same venv; CI runs its tests on a local
# 2-CPU instance. Without it, tests/test_ray.py is skipped and says why.
RAY_STAMP := $(VENV)/.ray-installed

$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	touch $(RAY_STAMP)

ray: $(RAY_STAMP)

demo: $(STAMP)
	$(BIN)/streammerge demo demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check streammerge tests tools
	$(BIN)/ruff format --check streammerge tests tools

format: $(STAMP)
	$(BIN)/ruff format streammerge tests tools
	$(BIN)/ruff check --fix streammerge tests tools

check: lint test

bench: $(STAMP)
	$(BIN)/python tools/bench.py $(BENCH_ARGS)

# mergekit 0.1.5 in its own venv (torch first, pinned, as above); then every configs/*.yml
# against streammerge, as written and with dtype float32 / bfloat16. PARITY_ARGS="--json p.json".
PARITY_VENV := .parity-venv
PARITY_STAMP := $(PARITY_VENV)/.installed

$(PARITY_STAMP):
	test -x $(PARITY_VENV)/bin/python || $(PY) -m venv $(PARITY_VENV)
	$(PARITY_VENV)/bin/pip install -q torch==2.13.0
	$(PARITY_VENV)/bin/pip install -q mergekit==0.1.5
	touch $(PARITY_STAMP)

parity: $(STAMP) $(PARITY_STAMP)
	$(BIN)/python tools/parity.py --mergekit-python $(PARITY_VENV)/bin/python $(PARITY_ARGS)

clean:
	rm -rf demo-out bench-data .pytest_cache
