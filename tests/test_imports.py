"""The core installs and imports without TensorFlow, seqio or torch (SPEC: accelerator
machines carry only jax, flax, optax, orbax and gin)."""
import subprocess
import sys

CORE = ["moe_jax", "moe_jax.routing", "moe_jax.dispatch", "moe_jax.experts", "moe_jax.moe_layer",
        "moe_jax.optimizers", "moe_jax.checkpoints", "moe_jax.train_step",
        "moe_jax.attention", "moe_jax.dense", "moe_jax.model", "moe_jax.decoding",
        "moe_jax.params", "moe_jax.config", "moe_jax.interop.huggingface",
        # Routing analysis: numpy at import time, pandas and matplotlib only when asked.
        "moe_jax.analysis.records", "moe_jax.analysis.recorder", "moe_jax.analysis.analyses",
        "moe_jax.analysis.report", "moe_jax.analyze"]
FORBIDDEN = ["tensorflow", "seqio", "tensorflow_datasets", "torch", "transformers", "safetensors",
             "matplotlib", "pandas"]


def test_core_imports_no_heavy_frameworks():
  code = (f"import importlib, sys\nfor m in {CORE!r}: importlib.import_module(m)\n"
          f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
