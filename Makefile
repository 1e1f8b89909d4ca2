# Two set-up commands (see README): `make quickstart` and `make test`.
# Both create .venv, install the project into it, then run.
# CPU installs pin torch (an open requirement pulls a multi-GB CUDA build);
# GPU users override it, e.g. `make test TORCH="torch==2.13.0"` from their index.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-quick quickstart bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The whole suite (CI's command; under 40 minutes on 2 cores).
test: install
	$(PY) -m pytest tests -q --durations=25

# The edit loop: unit-level tests only (no multi-process runs), under 5 minutes.
test-quick: install
	$(PY) -m pytest tests -q -m "not slow" --durations=10

# The whole pipeline on one seed, uniform vs EXACT side by side (examples/study/quickstart.yaml).
quickstart: install
	$(PY) tools/paired_study.py --config examples/study/quickstart.yaml

bench: install
	for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) runs
