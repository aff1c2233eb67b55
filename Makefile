# Two commands from a fresh clone (Python 3.11):
#   make demo   creates .venv with the requirements on first use, then runs every task on the demo data
#   make test   the same environment plus the test-only packages, then the tests
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test

# pip compiles the installed files one at a time; compileall on every core after a --no-compile install is
# faster (a new .venv with requirements-test.txt: 93 s -> 63 s on 2 cores). The one file it leaves out is the
# one no Python 3.11 compiles (torch's py312 test helper, which pip skips too); any other failure stops make.
COMPILE = $(PY) -m compileall -q -j 0 -x 'py312_intrinsics\.py$$' $(VENV)/lib

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

# One pytest worker per core (at most 4), each given whole test modules so that a module's fixtures are built
# once (loadscope), the longest modules first (tests/conftest.py orders them), each worker with its share of the
# cores (tests/conftest.py): 2 workers on 2 cores ran the tests in 211 s against 343 s for one process.
# pytest's exit code 5 (no tests collected) is a failure too.
PARALLEL = -n auto --maxprocesses 4 --dist loadscope --no-loadscope-reorder
test: $(VENV)/.test
	$(PY) -m pytest -q $(PARALLEL); code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$code
