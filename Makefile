# Two commands a new user needs: `make demo` (the main job on the embedded default) and
# `make test`. Both build .venv once and reuse it until pyproject.toml changes.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test up down clean-state

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU wheel pinned first so nothing pulls a multi-GB CUDA build; CUDA users: see README.
	$(PY) -m pip install -q torch==2.13.0 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(PY) -m pip install -q -e '.[test]' 2>&1 | { grep -v -e "is ignored: it is neither" -e BuildBackendWarning || true; }
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rapm demo

# One test process per core (at most 4: each builds its own tiny teachers); the tests of one
# Prefect stack stay on one worker (--dist loadgroup, tests/test_prefect_e2e.py).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

# A local Prefect stack: server, pool, deployments from prefect.yaml, worker (README: "Run it
# with Prefect"). `down` stops only the processes `up` started.
up: $(STAMP)
	scripts/stack.sh up

down:
	scripts/stack.sh down
