# Two entry points, each self-contained on a fresh machine (Python 3.11 with venv):
#   make train   set up .venv if absent, install, run the main job
#   make test    set up .venv if absent, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup train analyze demo test bench

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	# The local corpus's Debian packages (as root; otherwise prints the apt-get command).
	$(PY) -m tasks.corpus.build --install --list
	touch $(STAMP)

setup: $(STAMP)

# The main job: a tiny OpenMoE-style preset trained on the embedded local corpus with the UL2
# mixture, on CPU (runs/tiny_cpu: checkpoints, TensorBoard events, metrics.jsonl). Run again,
# it resumes from the last checkpoint (and stops at once when the run is complete).
TRAIN_FLAGS ?=
train: $(STAMP)
	$(PY) -m moe_jax.train --gin_file=gin_configs/models/openmoe_base_16e_tiny.gin \
	  --gin_file=gin_configs/runs/tiny_cpu.gin $(TRAIN_FLAGS)

# The routing report of that run (runs/tiny_cpu/routing_report/report.md): per-domain expert
# load, token specialization, drops by position per capacity factor, checkpoint agreement.
analyze: $(STAMP)
	$(PY) -m moe_jax.analyze --checkpoint=runs/tiny_cpu --compare_steps=all \
	  --task=code=local_code_lm_8k --task=english=local_english_lm_8k \
	  --task=multilingual=local_multilingual_lm_8k

demo: $(STAMP)
	$(PY) -m moe_jax.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
