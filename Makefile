# Two entry points, each self-contained on a fresh machine (Python 3.11 with venv):
#   make train   set up .venv if absent, install, run the main job
#   make test    set up .venv if absent, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup train test bench

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	# The local corpus's Debian packages (as root; otherwise prints the apt-get command).
	$(PY) -m tasks.corpus.build --install --list
	touch $(STAMP)

setup: $(STAMP)

# Until the training loop lands (issue 4+), the main job is the MoE layer demo.
train: $(STAMP)
	$(PY) -m moe_jax.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
