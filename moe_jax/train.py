"""Command line of the training loop (`moe_jax/trainer.py`), with t5x's flags.

    python -m moe_jax.train --gin_file=gin_configs/models/openmoe_base_16e_tiny.gin \
      --gin_file=gin_configs/runs/tiny_cpu.gin --gin.MODEL_DIR="'runs/tiny_cpu'"

A separate module so that gin's `import moe_jax.trainer` and `python -m` never register the
loop's configurable twice.
"""
import sys

from moe_jax import trainer


def main(argv=None) -> int:
  return trainer.run_command(trainer.train, argv)


if __name__ == "__main__":
  sys.exit(main())
