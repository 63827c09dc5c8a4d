"""Test setup: 8 simulated CPU devices, so sharding is exercised for real.

XLA reads XLA_FLAGS once, when jax initialises its backend, so this must run before any test
module imports jax.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
