# TurboStream developer commands. `make demo` and `make test` set everything up on first use.
BOOTSTRAP_PY ?= $(shell command -v python3.11 || command -v python3)
VENV_PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit bench add-toy reliability lint format serve clean

setup:
	$(BOOTSTRAP_PY) -m turbostream setup

demo: setup
	$(VENV_PY) -m turbostream demo --out out/demo

test:
	$(BOOTSTRAP_PY) -m turbostream setup --browser
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(VENV_PY) -m pytest -m "not host" $(PYTEST_ARGS)

bench: setup
	$(VENV_PY) bench/run.py

reliability: setup
	$(VENV_PY) bench/reliability.py

add-toy: setup
	OMP_NUM_THREADS=2 $(VENV_PY) bench/add_toy.py --threads 2

lint: setup
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m ruff format --check turbostream nodes tests bench __init__.py

format: setup
	$(VENV_PY) -m ruff check --fix .
	$(VENV_PY) -m ruff format turbostream nodes tests bench __init__.py

serve: setup
	$(VENV_PY) -m turbostream serve

clean:
	rm -rf out .pytest_cache .ruff_cache
