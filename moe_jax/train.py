"""Command line of the training loop (`moe_jax/trainer.py`), with t5x's flags.

    python -m moe_jax.train --gin_file=gin_configs/models/openmoe_base_16e_tiny.gin \
      --gin_file=gin_configs/runs/tiny_cpu.gin --gin.MODEL_DIR="'runs/tiny_cpu'"

A separate module so that gin's `import moe_jax.trainer` and `python -m` never register the
loop's configurable twice.
"""
import logging
import os
import sys

from moe_jax import trainer


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the data side's TensorFlow: errors only
  trainer.parse_flags(sys.argv[1:] if argv is None else argv)
  trainer.train()  # pylint: disable=missing-kwoa  (everything comes from gin)
  return 0


if __name__ == "__main__":
  sys.exit(main())
