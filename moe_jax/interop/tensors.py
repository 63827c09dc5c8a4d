"""What every Hugging Face converter shares: reading a checkpoint's tensors (each read marked,
so that none is silently left out) and placing the converted tree after checking it against
the module's own parameters."""
from __future__ import annotations

import collections.abc
import json
import os
from typing import Any, Dict, List, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class _SafetensorsFiles(collections.abc.Mapping):
  """{name: array} over safetensors files, each tensor read when asked for (a checkpoint
  larger than memory converts one tensor at a time). Read through safetensors' flax backend:
  its numpy one cannot hold bfloat16, the dtype most released checkpoints ship in."""

  def __init__(self, files):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._where = {}
    for name in files:
      handle = safe_open(name, framework="flax")
      self._where.update({key: handle for key in handle.keys()})

  def __getitem__(self, key):
    return np.asarray(self._where[key].get_tensor(key))

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)

  def __contains__(self, key):
    return key in self._where


def read_safetensors(path: str) -> Mapping[str, np.ndarray]:
  """{name: array} of a Hugging Face directory's model.safetensors (or its shards), lazily."""
  index = os.path.join(path, "model.safetensors.index.json")
  files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
           else ["model.safetensors"])
  return _SafetensorsFiles([os.path.join(path, name) for name in files])


class Tensors:
  """A checkpoint's flat tensors; `take` marks each read, `unread` lists the rest."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self._tensors, self._read = tensors, set()

  def take(self, key: str) -> np.ndarray:
    if key not in self._tensors:
      raise ValueError(f"the checkpoint has no tensor {key!r}, which this model needs.")
    self._read.add(key)
    return np.asarray(self._tensors[key], np.float32)

  def has(self, key: str) -> bool:
    return key in self._tensors

  def skip(self, keys) -> None:
    """Marks tensors as deliberately not read (a module this model does not have)."""
    self._read.update(keys)

  def unread(self) -> List[str]:
    return sorted(set(self._tensors) - self._read)

  def check_all_read(self) -> None:
    unread = self.unread()
    if unread:
      raise ValueError(f"checkpoint tensors the import did not read (a setting it does not "
                       f"model?): {unread[:5]}{' …' if len(unread) > 5 else ''}")


def abstract_variables(module: nn.Module) -> Dict:
  """The module's variables as shapes (nothing allocated)."""
  return nn.meta.unbox(jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))))


def checked_params(module: nn.Module, params: Dict, shardings: Any = None,
                   collection: str = "params", abstract: Any = None) -> Dict:
  """`params` as jax arrays (placed with `shardings` when given), after checking that they fill
  every variable of `module`'s `collection` with its shape; errors name the variable.
  abstract: `abstract_variables(module)`, if already computed."""
  expected = (abstract_variables(module) if abstract is None else abstract)[collection]
  want = flax.traverse_util.flatten_dict(expected, sep="/")
  got = flax.traverse_util.flatten_dict(params, sep="/")
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing:
    raise ValueError(f"parameters the checkpoint does not fill: {missing[:5]}")
  if extra:
    raise ValueError(f"converted tensors the module has no parameter for: {extra[:5]}")
  for key, shape in want.items():
    if tuple(shape.shape) != got[key].shape:
      raise ValueError(f"{key}: checkpoint shape {got[key].shape} != module shape "
                       f"{tuple(shape.shape)}.")
  if shardings is None:
    return jax.tree.map(jnp.asarray, params)
  return jax.tree.map(jax.device_put, params, shardings)


def require_settings(module, wanted: Mapping[str, Any], family: str) -> None:
  """Refuses, naming the first, any module field that differs from what `family` holds."""
  for name, value in wanted.items():
    if getattr(module, name) != value:
      raise ValueError(f"{family} needs {name}={value!r}; this model has "
                       f"{getattr(module, name)!r}.")


def take_tied(ts: Tensors, shared_key: str, copies, tied: bool) -> np.ndarray:
  """The shared embedding; its copies (the stacks' embed_tokens, a tied lm_head), where the
  checkpoint holds them, must equal it."""
  shared = ts.take(shared_key)
  for key in tuple(copies[:-1]) + ((copies[-1],) if tied else ()):
    if ts.has(key) and not np.array_equal(ts.take(key), shared):
      raise ValueError(f"{key} differs from {shared_key}: the model ties them.")
  return shared


def load(path: str, module_from_config, to_params, module=None, shardings: Any = None):
  """(module, params) of a Hugging Face directory: the module built from config.json by
  `module_from_config` unless given; the tensors converted by `to_params(tensors, module)`."""
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  module = module or module_from_config(cfg)
  return module, checked_params(module, to_params(read_safetensors(path), module), shardings)


def save(path: str, tensors: Mapping[str, np.ndarray], cfg: Mapping[str, Any]) -> None:
  """config.json and model.safetensors that transformers loads."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  save_file(dict(tensors), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(cfg), f, indent=2)


def every_step(ids, num_layers: int, is_sparse) -> int:
  """The step s (1 … num_layers) with ids == [i for i if is_sparse(i, s)], 0 for no sparse
  layer; a ValueError when no step gives `ids`."""
  if not ids:
    return 0
  for step in range(1, num_layers + 1):
    if tuple(ids) == tuple(i for i in range(num_layers) if is_sparse(i, step)):
      return step
  raise ValueError(f"sparse layers {tuple(ids)} are not a placement transformers can express "
                   "(every step-th layer).")
