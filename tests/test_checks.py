"""Bad settings fail before anything compiles or is written, with a message that names the
setting and what is allowed (the list: moe_jax/checks.py)."""
import math
import os
import subprocess
import sys

import pytest

from moe_jax import config, optimizers, trainer

FILES = ["gin_configs/models/openmoe_base_16e_tiny.gin", "gin_configs/runs/tiny_cpu.gin"]
# (binding, the message it must give): each a mistake a user makes on the command line.
TRAIN_CASES = [
    ("TRAIN_STEPS = %gin.REQUIRED",
     "optimizers.warmup_cosine_schedule.decay_steps (TRAIN_STEPS in the run gins) is required "
     "and not set: give it, e.g. --gin.TRAIN_STEPS=N."),
    ("TRAIN_STEPS = 0",
     "optimizers.warmup_cosine_schedule.decay_steps (TRAIN_STEPS in the run gins) must be an "
     "integer >= 1, got 0."),
    ("SEQUENCE_LENGTH = 0",
     "train.sequence_length (SEQUENCE_LENGTH in the run gins) must be an integer >= 1, got 0."),
    ("BATCH_SIZE = -4",
     "train.batch_size (BATCH_SIZE in the run gins) must be an integer >= 1, got -4."),
    ("MICROBATCHES = 3",
     "train.microbatches (MICROBATCHES) = 3 must divide train.batch_size (BATCH_SIZE) = 16."),
    ("CHECKPOINT_EVERY = 0",
     "train.checkpoint_every (CHECKPOINT_EVERY in the run gins) must be an integer >= 1, got 0."),
    ("EVAL_EVERY = -1",
     "train.eval_every (EVAL_EVERY in the run gins) must be an integer >= 0, got -1."),
    ("train.log_every = 0", "train.log_every must be an integer >= 1, got 0."),
    ("train.input_shards = 3",
     "train.input_shards = 3 must divide train.batch_size (BATCH_SIZE) = 16"),
    ("optimizers.warmup_cosine_schedule.peak_learning_rate = 1e999",
     "optimizers.warmup_cosine_schedule.peak_learning_rate must be a finite number > 0, got inf."),
    ("TRAIN_STEPS = 20",  # tiny_cpu.gin's 30-step warm-up is longer than the run
     "optimizers.warmup_cosine_schedule.warmup_steps = 30 must be below "
     "optimizers.warmup_cosine_schedule.decay_steps = 20 (the run's length in "
     "runs/tiny_cpu.gin: TRAIN_STEPS): shorten the warm-up, e.g. "
     "--gin.optimizers.warmup_cosine_schedule.warmup_steps=2."),
]


@pytest.mark.parametrize("binding,message", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_train_settings_fail_before_anything_is_written(binding, message, tmp_path):
  model_dir = str(tmp_path / "run")
  config.parse_gin(FILES, [f"MODEL_DIR = '{model_dir}'", binding, *config.MODEL_BINDINGS])
  with pytest.raises(ValueError) as error:
    trainer.train()
  assert message in str(error.value)
  assert not os.path.exists(model_dir)


@pytest.mark.parametrize("call,message", [
    (lambda: optimizers.rsqrt_schedule(base_learning_rate=math.nan),
     "optimizers.rsqrt_schedule.base_learning_rate must be a finite number > 0, got nan."),
    (lambda: optimizers.rsqrt_schedule(warmup_steps=-1),
     "optimizers.rsqrt_schedule.warmup_steps must be an integer >= 0, got -1."),
    (lambda: optimizers.constant_schedule(0.0),
     "optimizers.constant_schedule.learning_rate must be a finite number > 0, got 0.0."),
])
def test_bad_schedules_name_the_setting(call, message):
  with pytest.raises(ValueError) as error:
    call()
  assert message in str(error.value)


@pytest.mark.parametrize("module", ["moe_jax.params", "moe_jax.dry_run"])
def test_a_missing_gin_file_is_named_with_the_closest(module):
  out = subprocess.run([sys.executable, "-m", module,
                        "--gin_file=gin_configs/models/mixtral_8x7b_tiy.gin"],
                       cwd=config.REPO_ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
  assert out.returncode != 0
  assert ("gin file 'gin_configs/models/mixtral_8x7b_tiy.gin' not found. Closest: "
          "gin_configs/models/mixtral_8x7b_tiny.gin") in out.stderr
