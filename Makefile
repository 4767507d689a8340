# The two commands a newcomer needs: `make up` (the whole stack on the built-in tiny model) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install up test

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'

up: install
	$(PYTHON) -m k2serve.cli up --model builtin:tiny-k2

test: install
	$(PYTHON) -m pytest -q
