"""benchmarks/accelerator.py runs on CPU at its CI size with the core dependencies only."""
import os
import re
import subprocess
import sys

from moe_jax import config

SCRIPT = os.path.join(config.REPO_ROOT, "benchmarks", "accelerator.py")


def test_accelerator_benchmark_runs_small_on_cpu_without_tensorflow():
  # A guard module named `tensorflow` that fails on import: the script must not need it.
  guard = os.path.join(config.REPO_ROOT, "tests", "helpers", "no_tensorflow")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONPATH=os.pathsep.join([guard, os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, SCRIPT, "--size", "small", "--experts", "8",
                        "--dispatch", "dropless", "--repeats", "1", "--steps", "1"],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"layer E=8\s+dropless ratio \d+\.\d+ .*dropped 0\.000", out.stdout)
  mfu = re.search(r"MFU (\d+\.\d)%", out.stdout)
  assert mfu and 0 < float(mfu.group(1)) < 100, out.stdout
