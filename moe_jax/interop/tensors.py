"""What every Hugging Face converter shares: reading a checkpoint's tensors (each read marked,
so that none is silently left out) and placing the converted tree after checking it against
the module's own parameters."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """{name: array} of a Hugging Face directory's model.safetensors (or its shards)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  index = os.path.join(path, "model.safetensors.index.json")
  files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
           else ["model.safetensors"])
  tensors = {}
  for name in files:
    tensors.update(load_file(os.path.join(path, name)))
  return tensors


class Tensors:
  """A checkpoint's flat tensors; `take` marks each read, `unread` lists the rest."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self._tensors, self._read = dict(tensors), set()

  def take(self, key: str) -> np.ndarray:
    if key not in self._tensors:
      raise ValueError(f"the checkpoint has no tensor {key!r}, which this model needs.")
    self._read.add(key)
    return np.asarray(self._tensors[key], np.float32)

  def has(self, key: str) -> bool:
    return key in self._tensors

  def unread(self) -> List[str]:
    return sorted(set(self._tensors) - self._read)

  def check_all_read(self) -> None:
    unread = self.unread()
    if unread:
      raise ValueError(f"checkpoint tensors the import did not read (a setting it does not "
                       f"model?): {unread[:5]}{' …' if len(unread) > 5 else ''}")


def checked_params(module: nn.Module, params: Dict, shardings: Any = None) -> Dict:
  """`params` as jax arrays (placed with `shardings` when given), after checking that they fill
  every parameter of `module` with its shape; errors name the parameter."""
  expected = nn.meta.unbox(jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"])
  want = flax.traverse_util.flatten_dict(expected, sep="/")
  got = flax.traverse_util.flatten_dict(params, sep="/")
  missing = sorted(set(want) - set(got))
  if missing:
    raise ValueError(f"parameters the checkpoint does not fill: {missing[:5]}")
  for key, shape in want.items():
    if tuple(shape.shape) != got[key].shape:
      raise ValueError(f"{key}: checkpoint shape {got[key].shape} != module shape "
                       f"{tuple(shape.shape)}.")
  if shardings is None:
    return jax.tree.map(jnp.asarray, params)
  return jax.tree.map(jax.device_put, params, shardings)
