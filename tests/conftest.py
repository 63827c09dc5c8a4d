"""Test setup: 8 simulated CPU devices, so sharding is exercised for real.

XLA reads XLA_FLAGS once, when jax initialises its backend, so this must run before any test
module imports jax.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The local corpus is built once per test run into a directory all xdist workers share
# (tests/test_data_pipeline.py builds it under a file lock); registered tasks read it from here.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("MOE_JAX_TFDS_DIR",
                      os.path.join(os.environ.get("TMPDIR", "/tmp"), "moe_jax_tests", _RUN_ID))
# TensorFlow (data tests only) must not grab every core's threads or print CUDA noise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache per test run, shared by the workers and the CLI subprocesses they
# start: the trainer, multi-host and notebook tests compile the same tiny programs many times.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ["MOE_JAX_TFDS_DIR"], "jax_cache"))

import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_gin_bindings_from_earlier_tests():
  """Every test starts from an empty gin config. Tests that parse gin files (presets, the
  moe_vs_dense configs) leave their bindings behind, and a later test on the same xdist worker
  calling a configurable with defaults (e.g. `create_optimizer()`) would silently get them:
  which test ran first depended on scheduling."""
  if "gin" in sys.modules:
    sys.modules["gin"].clear_config()
  yield
