# Two commands from a fresh clone (Python 3.11):
#   make demo   creates .venv with the requirements on first use, then runs every task on the demo data
#   make test   the same environment plus the test-only packages, then the tests
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test

# pip compiles the installed files one at a time; compileall on every core after a --no-compile install is
# faster (a new .venv with requirements-test.txt: 93 s -> 63 s on 2 cores). Its errors are the files no
# Python 3.11 compiles (torch's py312 test helpers), which pip skips the same way; imports work without .pyc.
COMPILE = $(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --no-compile -r requirements.txt
	$(COMPILE)
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(VENV)/bin/pip install --quiet --no-compile -r requirements-test.txt
	$(COMPILE)
	touch $@

demo: $(VENV)/.runtime
	$(PY) evaluate/run.py --ckpt random --task all --demo

# pytest's exit code 5 (no tests collected) is a failure too
test: $(VENV)/.test
	$(PY) -m pytest -q; code=$$?; if [ $$code -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$code
