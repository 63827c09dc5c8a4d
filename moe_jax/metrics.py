"""Training metrics: a JSON-lines file and TensorBoard events in MODEL_DIR, and MFU.

`MetricsWriter` always writes `metrics.jsonl` (one {"step", "split", ...} object per line, easy
to load with pandas); TensorBoard events go through clu's metric writers when clu (and the
TensorFlow it uses for event files) is installed — it is with the data extra, which training
needs anyway. The core never imports this module.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


class MetricsWriter:
  """Scalars per step to `<model_dir>/metrics.jsonl` and TensorBoard (`<model_dir>/<split>`)."""

  def __init__(self, model_dir: str, tensorboard: bool = True):
    self._path = os.path.join(model_dir, "metrics.jsonl")
    self._model_dir = model_dir
    self._writers = {}
    self._tensorboard = tensorboard
    if tensorboard:
      try:
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
        self._metric_writers = metric_writers
      except ImportError:
        logging.warning("clu is not installed: no TensorBoard events (metrics.jsonl only).")
        self._tensorboard = False

  def write(self, step: int, scalars: Mapping[str, float], split: str = "train",
            vectors: Optional[Mapping[str, list]] = None) -> None:
    """`vectors` (e.g. per-expert loads) go to metrics.jsonl only, as lists."""
    scalars = {k: float(v) for k, v in scalars.items()}
    row = {"step": int(step), "split": split, "time": time.time(), **scalars}
    row.update({k: [float(x) for x in v] for k, v in (vectors or {}).items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tensorboard:
      if split not in self._writers:
        self._writers[split] = self._metric_writers.create_default_writer(
            os.path.join(self._model_dir, split), just_logging=False, asynchronous=False)
      self._writers[split].write_scalars(int(step), scalars)

  def close(self) -> None:
    for writer in self._writers.values():
      writer.flush()
      writer.close()


def read_metrics(model_dir: str, split: Optional[str] = "train") -> list:
  """The rows of `metrics.jsonl` (of one split, or all)."""
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r["split"] == split]


def scalars(metrics: Mapping[str, jax.Array]) -> Dict[str, float]:
  """Device metrics → Python floats; per-expert vectors become their max/min ratio and CV."""
  out = {}
  for name, value in jax.device_get(dict(metrics)).items():
    value = np.asarray(value, np.float64)
    if value.ndim == 0:
      out[name] = float(value)
    else:  # e.g. expert loads [E]: how unbalanced they are
      flat = value.reshape(-1)
      out[f"{name}/max_over_min"] = float(flat.max() / max(flat.min(), 1e-9))
      out[f"{name}/cv"] = float(flat.std() / max(abs(flat.mean()), 1e-9))
  return out


def vectors(metrics: Mapping[str, jax.Array]) -> Dict[str, list]:
  """The per-expert vectors of `metrics` (e.g. "moe/layer_3/expert_load_after": [E]) as lists:
  metrics.jsonl keeps them whole, so loads per expert can be plotted over training."""
  return {name: np.asarray(value, np.float64).reshape(-1).tolist()
          for name, value in jax.device_get(dict(metrics)).items() if np.ndim(value) > 0}


def measure_peak_flops(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of a large dense matmul on the default device: the machine's practical peak."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def train_flops_per_token(forward_flops_per_token: float) -> float:
  """Forward + backward ≈ 3 × forward (the usual 6N rule for matmul FLOPs)."""
  return 3.0 * forward_flops_per_token
