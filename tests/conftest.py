"""Test setup: 8 simulated CPU devices, so sharding is exercised for real.

XLA reads XLA_FLAGS once, when jax initialises its backend, so this must run before any test
module imports jax.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
# The tests run tiny programs whose cost is XLA's compile, not their execution: LLVM's cheap
# code generation compiles them in ~60% of the time (measured: test_train_step.py and
# test_scan_equals_unrolled 49 s -> 30 s). The HLO passes, and so the arithmetic, are the same
# (no fast-math). Subprocesses (CLI, notebooks, multi-host) inherit the flags.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
for _flag in (_FLAG,) + _FAST_COMPILE:
  if (_flag if _flag == _FLAG else _flag.split("=")[0]) not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
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
