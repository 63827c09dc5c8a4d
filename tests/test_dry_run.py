"""The dry-run tool compiles a preset's training step for a fake mesh and reports it."""
import re
import subprocess
import sys

from moe_jax import config


def test_dry_run_reports_memory_and_collectives():
  out = subprocess.run(
      [sys.executable, "-m", "moe_jax.dry_run", "--gin_file=gin_configs/models/glam_tiny.gin",
       "--mesh=data:4,expert:4", "--seq_len", "32", "--gin.NUM_EXPERTS=8"],
      capture_output=True, text=True, cwd=config.REPO_ROOT, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "(16 devices)" in text and "batch 16 x 32" in text
  assert re.search(r"per device: params \d+\.\d+ GiB, optimizer", text)
  assert re.search(r"temporaries \(activations \+ scratch\) \d+\.\d+ GiB", text)
  all_to_all = int(re.search(r"all-to-all (\d+)", text).group(1))
  assert all_to_all >= 2, text


def test_dry_run_rejects_experts_not_divisible_by_the_expert_axis():
  out = subprocess.run(
      [sys.executable, "-m", "moe_jax.dry_run", "--gin_file=gin_configs/models/glam_tiny.gin",
       "--mesh=data:2,expert:3", "--seq_len", "16"],
      capture_output=True, text=True, cwd=config.REPO_ROOT, check=False)
  assert out.returncode != 0
  # The mesh sets the layers' num_expert_partitions (as runs/pretrain.gin does for training),
  # and the layer refuses it before anything compiles.
  assert ("num_experts=8 must be divisible by num_expert_partitions=3 (the expert-parallel "
          "mesh axis)") in out.stderr
