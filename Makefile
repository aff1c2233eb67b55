# Two commands from a fresh clone (Python 3.11):
#   make demo   creates .venv with the requirements on first use, then runs every task on the demo data
#   make test   the same environment plus the test-only packages, then the tests
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(VENV)/bin/pip install --quiet -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) evaluate/run.py --ckpt random --task all --demo

# pytest's exit code 5 (no tests collected) is a failure too
test: $(VENV)/.test
	$(PY) -m pytest -q; code=$$?; if [ $$code -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$code
