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
