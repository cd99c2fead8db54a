# TurboStream developer commands. `make demo` and `make test` set everything up on first use.
# The host: the bundled ComfyUI 0.3.75 by default; COMFYUI_DIR=<checkout> or
# COMFYUI_ARCHIVE=<source archive> for another (each host gets its own virtual environment).
BOOTSTRAP_PY ?= $(shell command -v python3.11 || command -v python3)
VENV_PY = "$$($(BOOTSTRAP_PY) -m turbostream venv-python)"
CURRENT_HOST_ARCHIVE ?= ../shared/hosts/comfyui-0.33.0.tar.gz
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-current demo-current docs-pictures bench bench-gpu add-toy reliability lint format serve clean

setup:
	$(BOOTSTRAP_PY) -m turbostream setup

demo: setup
	$(VENV_PY) -m turbostream demo --out out/demo

test:
	$(BOOTSTRAP_PY) -m turbostream setup --browser
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

# The same two commands on the current ComfyUI line (the source archive beside the repository).
test-current:
	COMFYUI_ARCHIVE=$(CURRENT_HOST_ARCHIVE) $(MAKE) test

demo-current:
	COMFYUI_ARCHIVE=$(CURRENT_HOST_ARCHIVE) $(MAKE) demo

# Rewrites the committed screenshot in docs/ (the suite itself never writes into the work tree).
docs-pictures:
	$(BOOTSTRAP_PY) -m turbostream setup --browser
	TURBOSTREAM_UPDATE_DOCS=1 $(VENV_PY) -m pytest tests/test_live_browser.py

test-unit: setup
	$(VENV_PY) -m pytest -m "not host" $(PYTEST_ARGS)

bench: setup
	$(VENV_PY) bench/run.py $(if $(K),-k $(K))

# On an NVIDIA GPU: set up, then the 512x512 1-step benchmark (bench/gpu.py). Elsewhere: says so, exits 0.
bench-gpu:
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(MAKE) setup && $(VENV_PY) bench/gpu.py; \
	else \
		echo "make bench-gpu: no NVIDIA GPU here (nvidia-smi finds none); nothing was measured. Run it on a machine with one."; \
	fi

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
