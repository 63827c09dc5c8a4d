"""The real training command as 2 processes × 4 CPU devices (jax.distributed over gloo), typed as
a user would, trains like 1 process × 8 devices: the same per-step losses, one writer per run
directory, a checkpoint that restores on 1 × 8, and a resume after one process is SIGKILLed.

The tiny Mixtral preset (dropless expert parallelism) on `data:2,expert:4`, the local corpus,
`train.input_shards=2` on both layouts so that each step reads the same rows whatever the
number of processes (trainer.py).
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("seqio")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax import checkpoints as checkpoints_lib  # noqa: E402
from moe_jax import config as config_lib  # noqa: E402
from moe_jax import optimizers, partitioning as part, trainer  # noqa: E402

STEPS, KILL_AFTER, EVERY = 20, 13, 10
FLAGS = ["--gin_file=gin_configs/models/mixtral_8x7b_tiny.gin",
         "--gin_file=gin_configs/runs/tiny_cpu.gin",
         "--gin.MESH='data:2,expert:4'", "--gin.NUM_LAYERS=2", "--gin.D_MODEL=32",
         "--gin.NUM_HEADS=2", "--gin.NUM_KV_HEADS=1", "--gin.MLP_DIM=64", "--gin.EXPERT_DIM=64",
         "--gin.SEQUENCE_LENGTH=64", "--gin.BATCH_SIZE=8",
         "--gin.MIXTURE_OR_TASK_NAME='local_english_ul2_8k'", "--gin.EVAL_TASKS=[]",
         f"--gin.CHECKPOINT_EVERY={EVERY}", "--gin.train.log_every=1",
         "--gin.train.progress_bar=False", "--gin.train.input_shards=2",
         "--gin.optimizers.warmup_cosine_schedule.warmup_steps=2",
         "--gin.optimizers.warmup_cosine_schedule.decay_steps=40"]
# 2 × 4 and 1 × 8 run the same program on the same mesh; gloo's cross-process reductions may
# add in another order than the in-process ones: float32 rounding only (measured ≤ 2e-7).
RTOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(model_dir, steps, processes, log_dir):
  flags = FLAGS + [f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}"]
  devices = 8 // processes
  # This process's XLA flags (conftest.py's fast compiles) with its own device count.
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                     os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip())
  port = _free_port()
  procs = []
  for i in range(processes):
    extra = ([f"--coordinator_address=localhost:{port}", f"--process_count={processes}",
              f"--process_index={i}"] if processes > 1 else [])
    log = open(os.path.join(log_dir, f"{os.path.basename(model_dir)}_{steps}_{i}_"
                                     f"{time.monotonic_ns()}.log"), "w")
    procs.append((subprocess.Popen([sys.executable, "-m", "moe_jax.train", *flags, *extra],
                                   cwd=config_lib.REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs, timeout=600):
  outputs = []
  for proc, log in procs:
    proc.wait(timeout=timeout)
    log.close()
    outputs.append(open(log.name).read())
  for (proc, _), out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  return outputs


def _train_rows(model_dir):
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  for line in open(path):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # a line being written
      pass
  return [r for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_of_the_cli_train_resume_and_restore_like_one(tmp_path):
  logs = str(tmp_path)
  reference = str(tmp_path / "one_by_eight")
  _wait(_launch(reference, STEPS, 1, logs))
  want = {r["step"]: r["loss/total"] for r in _train_rows(reference)}
  assert sorted(want) == list(range(1, STEPS + 1))
  assert want[STEPS] < want[1]

  # 2 × 4, SIGKILL process 1 once step KILL_AFTER is logged and the checkpoint of step EVERY
  # is committed; process 0 is left to die of its peer's absence, or killed.
  run = str(tmp_path / "two_by_four")
  procs = _launch(run, STEPS, 2, logs)
  deadline = time.time() + 600
  committed = os.path.join(run, "checkpoints", str(EVERY))  # renamed from *-tmp on commit
  while (max([r["step"] for r in _train_rows(run)], default=0) < KILL_AFTER
         or not os.path.isdir(committed)):
    assert time.time() < deadline and all(p.poll() is None for p, _ in procs), "no progress"
    time.sleep(0.2)
  procs[1][0].send_signal(signal.SIGKILL)
  try:
    procs[0][0].wait(timeout=30)
  except subprocess.TimeoutExpired:
    procs[0][0].kill()
  for proc, log in procs:
    proc.wait()
    log.close()
  first = _train_rows(run)
  assert KILL_AFTER <= len(first) < STEPS
  steps = [r["step"] for r in first]
  assert steps == list(range(1, len(first) + 1)), "every step written once (process 0 only)"

  outputs = _wait(_launch(run, STEPS, 2, logs))
  assert f"Resumed from step {EVERY}" in outputs[0] and f"Resumed from step {EVERY}" in outputs[1]
  resumed = _train_rows(run)[len(first):]
  assert [r["step"] for r in resumed] == list(range(EVERY + 1, STEPS + 1))
  for r in first + resumed:
    assert abs(r["loss/total"] - want[r["step"]]) <= RTOL * abs(want[r["step"]]), (r, want)
    assert r["moe/dropped_fraction"] == 0.0 and r["moe/overflow_fraction"] == 0.0
  # One writer: one metrics file, one TensorBoard directory with one event file per start.
  # The configs: the first start's, and the restart's (at step EVERY) beside them.
  assert sorted(os.listdir(run)) == [
      "checkpoints", "config.gin", f"config.step{EVERY}.gin", "metrics.jsonl",
      "operative_config.gin", f"operative_config.step{EVERY}.gin", "train"]
  assert len(os.listdir(os.path.join(run, "train"))) == 2
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [str(EVERY), str(STEPS)]

  # The 2 × 4 checkpoint restores on 1 × 8: this test process (8 devices), the same mesh.
  files = [f[len("--gin_file="):] for f in FLAGS if f.startswith("--gin_file=")]
  bindings = [f[len("--gin."):] for f in FLAGS if f.startswith("--gin.")]
  lm = config_lib.load_model(files, bindings + [f"MODEL_DIR='{run}'", f"TRAIN_STEPS={STEPS}"])
  mesh = part.make_mesh(data=2, expert=4)
  rules = config_lib.configured_rules()
  tx = optimizers.create_optimizer().tx  # the run's (tiny_cpu.gin: AdamW, clipped)
  target, _ = trainer.state_target(lm.module, tx, mesh, rules,
                                   jax.ShapeDtypeStruct((8, 64), jnp.int32))
  checkpointer = checkpoints_lib.Checkpointer(os.path.join(run, "checkpoints"))
  state, data = checkpointer.restore(target)
  checkpointer.close()
  assert int(state.step) == STEPS and data["batches_consumed"] == STEPS
  wi = jax.tree.leaves(state.params)[0]
  assert len(wi.sharding.device_set) == 8
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(state.params))


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "moe_jax.train", "--gin_file=gin_configs/models/mixtral_8x7b_tiny.gin",
       "--gin_file=gin_configs/runs/tiny_cpu.gin", "--gin.MODEL_DIR='/nonexistent/never'",
       *args], cwd=config_lib.REPO_ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_bad_process_flags_fail_before_anything_starts():
  out = _cli("--coordinator_address=localhost:1", "--process_count=2", "--process_index=2")
  assert out.returncode != 0
  assert "--process_index=2 must be in [0, --process_count=2), i.e. 0 to 1." in out.stderr
  out = _cli("--process_count=2", "--process_index=0")
  assert "need --coordinator_address, --process_count and --process_index together" in out.stderr
  out = _cli("--coordinator_address=localhost:1", "--process_count=2", "--process_index=1",
             "--distributed_timeout=0")
  assert "--distributed_timeout must be >= 1 second, got 0." in out.stderr


def test_a_coordinator_that_does_not_answer_is_a_clear_error_not_a_hang():
  port = _free_port()  # nothing listens there
  start = time.time()
  out = _cli(f"--coordinator_address=localhost:{port}", "--process_count=2",
             "--process_index=1", "--distributed_timeout=2")
  assert out.returncode != 0 and time.time() - start < 60
  assert (f"the coordinator localhost:{port} did not answer within 2 s (this is process 1 of "
          "2; process 0 serves the coordinator)") in out.stderr
  assert not os.path.exists("/nonexistent/never")
