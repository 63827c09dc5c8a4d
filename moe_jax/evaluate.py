"""Evaluation of a checkpoint on seqio tasks' validation splits (t5x's eval.py).

    python -m moe_jax.evaluate --gin_file=gin_configs/models/openmoe_base_16e_tiny.gin \
      --gin_file=gin_configs/runs/eval.gin --gin.CHECKPOINT_DIR="'runs/tiny_cpu/checkpoints'" \
      --gin.VOCAB_SIZE=8384        # or --gin_file=runs/tiny_cpu/config.gin as the model

EVAL_TASKS (eval.gin) defaults to the local LM tasks of the model's vocabulary: VOCAB_SIZE
decides both, so they cannot disagree. The tasks and the checkpoint's shapes are checked
before anything compiles (a mismatch names the first differing parameter).

Restores only the parameters (any optimizer may have written the checkpoint), runs each task
once over its validation split without dropout at the eval capacity factor, prints a table and
writes `eval_step<N>.json` beside the checkpoints.
"""
import json
import os
import sys
from typing import Optional, Sequence

import gin
import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import checkpoints as checkpoints_lib
from moe_jax import checks
from moe_jax import config as config_lib
from moe_jax import partitioning as part
from moe_jax import train_step as ts
from moe_jax import trainer


@struct.dataclass
class _Weights:
  params: dict
  extra: dict


@gin.configurable(module="moe_jax.evaluate")
def evaluate(*, model=gin.REQUIRED, checkpoint_dir: str = gin.REQUIRED,
             tasks: Optional[Sequence[str]] = None, sequence_length: int = 512,
             batch_size: int = 16, max_batches: int = 100, mesh: str = "data:-1",
             step: Optional[int] = None, seed: int = 0) -> dict:
  """{task: metrics}; also printed and written to `<checkpoint_dir>/../eval_step<N>.json`.

  tasks: None means the local corpus's held-out LM tasks in the vocabulary of the model's
    size (`tasks.registry.local_lm_tasks`): VOCAB_SIZE is the one source of truth.
  """
  from tasks import registry  # pylint: disable=g-import-not-at-top  (the data side)
  checks.integer("evaluate.sequence_length", sequence_length, 1, "SEQUENCE_LENGTH")
  checks.integer("evaluate.batch_size", batch_size, 1, "BATCH_SIZE")
  checks.integer("evaluate.max_batches", max_batches, 1)
  vocab_size = model.module.vocab_size
  if tasks is not None:
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
      raise checks.SettingError("evaluate.tasks (EVAL_TASKS) is empty: name at least one "
                                "task, or None for the local LM tasks of the model's "
                                "vocabulary.")
    registry.check_tasks(tasks, "evaluate.tasks (EVAL_TASKS)", vocab_size, mixtures=False)
  device_mesh = part.make_mesh(**part.parse_mesh(mesh))
  rules = config_lib.configured_rules()
  part.validate(model.module, device_mesh, rules, batch_size)
  tokens = jax.ShapeDtypeStruct((batch_size, sequence_length), jnp.int32)
  target = trainer.params_target(model.module, device_mesh, rules, tokens)
  # The model against the checkpoint before the default tasks: a model of the wrong size is
  # best told by the parameter that differs (and where the run's settings are).
  trainer.check_against_checkpoint(target, checkpoint_dir, step, restart=False)
  if tasks is None:
    tasks = registry.local_lm_tasks(vocab_size)
  params, extra, step = checkpoints_lib.restore_params(checkpoint_dir, target["params"],
                                                       target["extra"], step)
  eval_fn = jax.jit(lambda p, e, b: ts.eval_step(model, p, e, b))
  results = trainer.evaluate_tasks(eval_fn, _Weights(params, extra), tasks, device_mesh, rules,
                                   sequence_length, batch_size, max_batches, seed,
                                   features=trainer.model_features(model))
  print(trainer.eval_table(step, results), flush=True)
  if jax.process_index() == 0:
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)),
                        f"eval_step{step}.json")
    with open(path, "w") as f:
      json.dump({"step": step, "results": results}, f, indent=1)
  return results


def main(argv=None) -> int:
  return trainer.run_command(evaluate, argv)


if __name__ == "__main__":
  sys.exit(main())
