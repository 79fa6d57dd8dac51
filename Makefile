# Two entry points: `make serve` and `make test`. Both build .venv first (CPU torch pinned).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: any other spec pulls several GB of CUDA wheels on a CPU machine.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,int8]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/ditserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check ditserve tests

clean:
	rm -rf $(VENV) .pytest_cache
