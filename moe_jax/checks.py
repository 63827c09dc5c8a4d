"""Settings checked before anything compiles: one place that says what a command refuses.

Every message names the setting (as a gin binding, and the macro a run gin sets it from) and
what is allowed. Where the checks run:

| setting                                   | allowed                      | checked by            |
|-------------------------------------------|------------------------------|-----------------------|
| `--gin_file` paths                        | existing files (closest named) | every command's flags |
| train.train_steps (TRAIN_STEPS)           | an integer >= 1, set         | trainer.train         |
| train.sequence_length (SEQUENCE_LENGTH)   | an integer >= 1              | trainer.train         |
| train.batch_size (BATCH_SIZE)             | an integer >= 1              | trainer.train         |
| train.microbatches (MICROBATCHES)         | an integer >= 1 dividing BATCH_SIZE | trainer.train  |
| train.checkpoint_every (CHECKPOINT_EVERY) | an integer >= 1              | trainer.train         |
| train.log_every, train.eval_batches, train.keep_checkpoints | integers >= 1 | trainer.train   |
| train.eval_every (EVAL_EVERY)             | an integer >= 0 (0: never)   | trainer.train         |
| train.input_shards                        | an integer >= 1 dividing BATCH_SIZE | trainer.train  |
| learning rates of the schedules           | finite numbers > 0 (end rate >= 0) | optimizers.*_schedule |
| warm-up against decay steps               | 0 <= warmup_steps < decay_steps | optimizers.warmup_cosine_schedule |

(The layers, routers, meshes and partitioning check their own settings where they are
defined: moe_layer.py, routing.py, partitioning.validate, expert_parallel.py.)
"""
from __future__ import annotations

import difflib
import glob
import math
import os
from typing import Optional, Sequence

import gin


def _is_unset(value) -> bool:
  return value is gin.REQUIRED


def _describe(name: str, macro: Optional[str]) -> str:
  return f"{name} ({macro} in the run gins)" if macro else name


def integer(name: str, value, minimum: int = 1, macro: Optional[str] = None) -> int:
  """`value` as an int >= minimum, or a ValueError naming the setting."""
  where = _describe(name, macro)
  if _is_unset(value):
    flag = f"--gin.{macro}=N" if macro else f"--gin.{name}=N"
    raise ValueError(f"{where} is required and not set: give it, e.g. {flag}.")
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}.")
  return value


def rate(name: str, value, allow_zero: bool = False) -> float:
  """A learning rate: a finite number > 0 (>= 0 with allow_zero)."""
  if _is_unset(value):
    raise ValueError(f"{name} is required and not set: give it, e.g. --gin.{name}=1e-3.")
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and (value >= 0 if allow_zero else value > 0))
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
  return float(value)


def train_settings(*, train_steps, sequence_length, batch_size, microbatches, eval_every,
                   eval_batches, checkpoint_every, keep_checkpoints, log_every,
                   input_shards=1) -> None:
  """The training loop's own settings (the table above)."""
  integer("train.train_steps", train_steps, 1, "TRAIN_STEPS")
  integer("train.sequence_length", sequence_length, 1, "SEQUENCE_LENGTH")
  integer("train.batch_size", batch_size, 1, "BATCH_SIZE")
  integer("train.microbatches", microbatches, 1, "MICROBATCHES")
  if batch_size % microbatches:
    raise ValueError(f"train.microbatches (MICROBATCHES) = {microbatches} must divide "
                     f"train.batch_size (BATCH_SIZE) = {batch_size}.")
  integer("train.eval_every", eval_every, 0, "EVAL_EVERY")
  integer("train.eval_batches", eval_batches, 1)
  integer("train.checkpoint_every", checkpoint_every, 1, "CHECKPOINT_EVERY")
  integer("train.keep_checkpoints", keep_checkpoints, 1)
  integer("train.log_every", log_every, 1)
  integer("train.input_shards", input_shards, 1)
  if batch_size % input_shards:
    raise ValueError(f"train.input_shards = {input_shards} must divide train.batch_size "
                     f"(BATCH_SIZE) = {batch_size}: each shard feeds BATCH_SIZE / input_shards "
                     "rows.")


def gin_files(files: Sequence[str], roots: Sequence[str]) -> None:
  """Every `--gin_file` exists under one of `roots`; else a ValueError with the closest."""
  from moe_jax import config  # pylint: disable=g-import-not-at-top
  known = sorted(glob.glob(os.path.join(config.REPO_ROOT, "gin_configs", "**", "*.gin"),
                           recursive=True))
  for path in files:
    if not any(os.path.exists(os.path.join(root, path)) for root in roots):
      relative = [os.path.relpath(p, config.REPO_ROOT) for p in known]
      matches = difflib.get_close_matches(path, relative, n=3, cutoff=0.5)
      closest = f" Closest: {', '.join(matches)}." if matches else ""
      raise ValueError(f"gin file {path!r} not found.{closest}")
