# The two commands of the README:  `make run` (main job)  and  `make test` (test suite).
# Each creates .venv and installs what it needs on a fresh machine (Python 3.11).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test-fast bench install install-test

# The pinned requirements first, then this checkout as an editable package (`import lens,
# models` from any directory) with --no-deps: pip resolves nothing a second time.
$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	cd /tmp && $(abspath $(PY)) -c "import lens, models"
	touch $@

$(VENV)/.test: requirements-test.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

run: $(VENV)/.runtime
	$(PY) scripts/orthogonal_steering.py $(ARGS)

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests $(ARGS)

# The suite without the tests marked slow (real weights, subprocesses, the scripts end to end).
test-fast: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests $(ARGS)

bench: $(VENV)/.test
	$(PY) bench/forward_generate.py $(ARGS)
