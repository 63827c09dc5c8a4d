"""Writer process for the interrupted-save test (tests/test_checkpoints.py).

    python checkpoint_writer.py DIRECTORY BIG_MB

Saves step 1 (small) and waits for its commit, then starts an async save of a step-2 state
with BIG_MB MiB of arrays and prints "SAVING 2 latest_step=N" as soon as `save` returns, i.e.
while the files are still being written; the test SIGKILLs the process after that line. If
it is not killed, it waits for the commit and prints "COMMITTED 2".

keep_last=1 is the harshest setting: step 1 is the only copy and orbax deletes it once step 2
commits, so an interrupted step 2 must not have touched it.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax.checkpoints import Checkpointer  # noqa: E402

SMALL_MB = 1


def make_state(step: int, big_mb: int):
  """A deterministic state whose values depend on `step`, so a restore can be checked exactly.

  "big" is split in 8 arrays so the tensorstore writes run as separate chunks, as a real
  parameter tree's would.
  """
  n = big_mb * 2**20 // 4 // 8
  return {
      "step": jnp.asarray(step, jnp.int32),
      "params": {"w": jnp.arange(32 * 32, dtype=jnp.float32).reshape(32, 32) + 1000 * step},
      "big": [jnp.arange(n, dtype=jnp.float32) + i + 10 * step for i in range(8)],
  }


def make_data(step: int) -> dict:
  return {"batches_consumed": 10 * step, "seed": 0}


def main():
  directory, big_mb = sys.argv[1], int(sys.argv[2])
  ckpt = Checkpointer(directory, keep_last=1, async_save=True)
  assert ckpt.save(1, make_state(1, SMALL_MB), make_data(1))
  ckpt.wait()
  print("COMMITTED 1", flush=True)
  state = jax.block_until_ready(make_state(2, big_mb))
  assert ckpt.save(2, state, make_data(2))
  # latest_step() must not count the in-flight step: the test checks this printed value.
  print(f"SAVING 2 latest_step={ckpt.latest_step()}", flush=True)
  ckpt.wait()
  print("COMMITTED 2", flush=True)
  ckpt.close()


if __name__ == "__main__":
  main()
