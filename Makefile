# Two commands a new user needs: `make demo` (the main job on the embedded default) and
# `make test`. Both build .venv once and reuse it until pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test up down clean-state

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel pinned first so nothing pulls a multi-GB CUDA build; CUDA users: see README.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rapm demo

test: $(STAMP)
	$(PY) -m pytest -q
