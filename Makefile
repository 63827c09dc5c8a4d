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

# The main job: a small OpenMoE-style MoE trained on the embedded local corpus with the UL2
# mixture, on CPU (runs/tiny_cpu.gin), then three continuations of held-out code and English
# prompts (sampled: greedy decoding of so small a model repeats itself), and the routing
# report with its plots written into the run directory. Run again, it
# resumes from the last checkpoint (and, the run complete, only samples and reports again).
RUN_DIR ?= runs/tiny_cpu
TRAIN_FLAGS ?=
REPORT_TASKS = --task=code=local_code_lm_8k --task=english=local_english_lm_8k \
  --task=multilingual=local_multilingual_lm_8k
train: $(STAMP)
	$(PY) -m moe_jax.train --gin_file=gin_configs/models/openmoe_base_16e_cpu.gin \
	  --gin_file=gin_configs/runs/tiny_cpu.gin --gin.MODEL_DIR="'$(RUN_DIR)'" $(TRAIN_FLAGS)
	$(PY) -m moe_jax.infer --gin_file=$(RUN_DIR)/config.gin --gin_file=gin_configs/runs/infer.gin \
	  --gin.CHECKPOINT_DIR="'$(RUN_DIR)/checkpoints'" \
	  --gin.INFER_TASK="['local_code_s_8k', 'local_english_s_8k']" --gin.infer.num_examples=3 \
	  --gin.MAX_NEW_TOKENS=40 --gin.infer.sequence_length=256 \
	  --gin.infer.temperature=0.7 --gin.infer.top_k=40
	$(PY) -m moe_jax.analyze --checkpoint=$(RUN_DIR) --compare_steps=first --max_tokens=20000 \
	  $(REPORT_TASKS)

# The routing report of that run with every checkpoint compared
# ($(RUN_DIR)/routing_report/report.md): per-domain expert load, token specialization, drops
# by position per capacity factor, checkpoint agreement.
analyze: $(STAMP)
	$(PY) -m moe_jax.analyze --checkpoint=$(RUN_DIR) --compare_steps=all $(REPORT_TASKS)

demo: $(STAMP)
	$(PY) -m moe_jax.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
