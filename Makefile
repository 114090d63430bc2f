# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench bench-mpi clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[mpi,deploy,test,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fedrec.demo --workdir runs/demo

# The tests run on every core (pytest-xdist): nearly all of them are single-threaded.
test: $(STAMP)
	$(PY) -m pytest -q -n auto

bench: $(STAMP)
	$(PY) benchmarks/preprocess.py

# Seconds per federated round: local backend against 1 and 2 MPI worker processes.
bench-mpi: $(STAMP)
	$(PY) benchmarks/fl_mpi_scaling.py

clean:
	rm -rf $(VENV) runs build *.egg-info
