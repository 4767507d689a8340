# The two commands a newcomer needs: `make up` (the whole stack on the built-in agent model) and `make test`.
# Both first build ./.venv from the bare interpreter, pinned by constraints.txt, and reinstall only when
# pyproject.toml, setup.py or constraints.txt changed since the last install. `make lock` regenerates
# constraints.txt from pyproject's ranges.
#
# Python never runs with the repository root on sys.path (PYTHONSAFEPATH, inherited by every child process):
# the top-level operator/ folder would otherwise hide the standard library's `operator` module.
export PYTHONSAFEPATH := 1
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.k2serve-installed
PIP_QUIET ?= -q

.PHONY: install up test lock

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -S -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt torch==2.13.0
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt -e '.[test,cluster]'
	touch $@

up: install
	$(VENV)/bin/k2serve up

test: install
	$(PY) -m pytest -q

# Resolves pyproject's ranges afresh in a throwaway venv and pins the result (torch without its local
# +cpu tag, so the same file serves CPU and CUDA machines).
lock:
	rm -rf .lock-venv
	$(PYTHON) -S -m venv .lock-venv
	.lock-venv/bin/python -m pip install $(PIP_QUIET) torch==2.13.0
	.lock-venv/bin/python -m pip install $(PIP_QUIET) '.[test,cluster]'
	{ echo "# Pinned versions for make and CI; regenerate with 'make lock'. pyproject.toml keeps the ranges."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^k2serve' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; \
	} > constraints.txt
	rm -rf .lock-venv
