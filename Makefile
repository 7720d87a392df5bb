# `make demo` and `make test` set up .venv on first use, then run the demo / the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/qlora train --config configs/demo.yaml --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs *.egg-info
