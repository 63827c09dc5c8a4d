"""Sparse upcycling (Komatsuzaki et al. 2022; t5x's sparse_upcycle.gin): an MoE run starts from
a dense checkpoint of the same base shape.

Every parameter of the MoE model is found in the dense checkpoint by name:
  * the same path: copied (embeddings, attention, norms, the dense FFNs of dense layers);
  * an expert weight  …/moe/experts/<w> [E, …]  ←  the dense  …/mlp/<w> [...] of its layer,
    copied into every expert;
  * what a dense model does not have (FRESH: routers, ST-MoE's extra dense FFN and its norm,
    shared experts): the MoE model's own fresh initialisation.
The optimizer state, step and non-param collections start fresh (the trainer's init). A dense
tensor that no MoE parameter takes, a parameter missing from the checkpoint (other than the
FRESH ones) or a shape that differs is an error naming the tensor, raised from the metadata
before anything is read or written (`check`).

Scanned stacks (`scan_layers`) are read layer by layer, so a dense model scanned one block at a
time upcycles into an MoE model scanned `moe_every` blocks at a time, or unrolled, and back.

Sharding: each dense array is restored with the sharding of the MoE parameter it becomes (the
expert axis dropped), and the copies are made in one jit whose outputs have the MoE state's
shardings: no array is gathered whole onto one device.

With every token reaching its experts and gates that sum to 1 (renormalised top-k, ample
capacity), the upcycled model computes the dense model's function at step 0
(tests/test_upcycling.py).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from moe_jax import checkpoints as checkpoints_lib
from moe_jax import checks

# Path components an MoE model adds to its dense base: initialised fresh.
FRESH = ("router", "extra_mlp", "pre_extra_mlp_norm", "shared_experts", "shared_expert_gate")
_EXPERTS = "/moe/experts/"
_SCANNED = re.compile(r"^(.*?)layers/block_(\d+)/(.*)$")
_UNROLLED = re.compile(r"^(.*?)layers_(\d+)/(.*)$")


class _Layout:
  """How a tree stores its layers: unrolled (…layers_<i>/…) or scanned (…layers/block_<j>/…
  with a leading [units] axis, layer i = unit · period + j)."""

  def __init__(self, paths):
    blocks = {int(m.group(2)) for p in paths if (m := _SCANNED.match(p))}
    self.period = len(blocks) or None  # None: unrolled

  def rows(self, path: str, num_layers_of) -> Optional[List[Tuple[int, str]]]:
    """[(layer, the path without its layer part)] for a layer parameter, else None."""
    if self.period:
      m = _SCANNED.match(path)
      if not m:
        return None
      units = num_layers_of(path)
      return [(u * self.period + int(m.group(2)), m.group(1) + "{layer}/" + m.group(3))
              for u in range(units)]
    m = _UNROLLED.match(path)
    return None if not m else [(int(m.group(2)), m.group(1) + "{layer}/" + m.group(3))]

  def locate(self, layer: int, generic: str) -> Tuple[str, Optional[int]]:
    """(path, row of the leading axis or None) of one layer's slice of `generic`."""
    if self.period:
      u, j = divmod(layer, self.period)
      return generic.replace("{layer}", f"layers/block_{j}"), u
    return generic.replace("{layer}", f"layers_{layer}"), None


def _dense_name(path: str) -> str:
  return path.replace(_EXPERTS, "/mlp/")


def plan(target: Mapping[str, Tuple[int, ...]], source: Mapping[str, Tuple[int, ...]]
         ) -> Dict[str, Any]:
  """{MoE param path: None (fresh) or (experts: bool, [(dense path, row or None), …] one per
  stacked unit, or one)}; raises a SettingError naming the first tensor that does not fit."""
  for tree, role in ((target, "MoE model"), (source, "dense checkpoint")):
    if any(p.startswith("dense_layers/") for p in tree):
      raise checks.SettingError(
          f"the {role} scans a dense prefix (first_dense_layers with scan_layers), which "
          "upcycling does not map yet: set scan_layers=False for the upcycled run.")
  target_layout, source_layout = _Layout(target), _Layout(source)
  out, used, dense_of_layer = {}, {}, {}
  for path, shape in sorted(target.items()):
    if any(part in FRESH for part in path.split("/")):
      out[path] = None
      continue
    experts = _EXPERTS in path
    rows = target_layout.rows(path, lambda p: target[p][0])
    if rows is None:
      pieces = [(_dense_name(path), None)]
    else:
      pieces = [source_layout.locate(layer, _dense_name(generic)) for layer, generic in rows]
    want = shape[(1 if rows is not None and target_layout.period else 0):]
    want = want[1:] if experts else want
    if experts:  # a residual MoE's dense FFN beside its experts would count the FFN twice
      for name, row in pieces:
        dense_of_layer.setdefault((name, row), []).append(path)
    for name, row in pieces:
      if name not in source:
        raise checks.SettingError(
            f"sparse upcycling: the MoE model's {path} needs the dense checkpoint's {name}, "
            "which it lacks: the dense model must have the MoE model's base shape (layers, "
            "names; scan_layers either way).")
      if row is not None and row >= source[name][0]:
        raise checks.SettingError(
            f"sparse upcycling: the MoE model's {path} needs layer row {row} of the dense "
            f"checkpoint's {name}, which has {source[name][0]}: the dense model has fewer "
            "layers.")
      have = source[name][1:] if row is not None else source[name]
      if tuple(have) != tuple(want):
        per = " per layer" if row is not None or rows is not None else ""
        raise checks.SettingError(
            f"sparse upcycling: the dense checkpoint's {name} is {list(have)}{per} but the "
            f"MoE model's {path} needs {list(want)}{' per expert' if experts else ''}: the "
            "dense model must have the same base shape (D_MODEL, MLP_DIM = EXPERT_DIM, "
            "heads, vocabulary).")
      used.setdefault(name, set()).add(row)
    out[path] = (experts, pieces)
  for path, entry in out.items():
    if entry is not None and not entry[0] and any(
        key in dense_of_layer for key in entry[1]):
      raise checks.SettingError(
          f"sparse upcycling: the MoE model's {path} and its experts would both copy the "
          "dense FFN (a residual MoE, moe_dense_ffn='parallel'), computing it twice; upcycle "
          "into a model without the parallel dense FFN.")
  for name in sorted(source):
    rows = used.get(name, set())
    missing = (not rows if source_layout.period is None or None in rows
               else sorted(set(range(source[name][0])) - rows))
    if missing:
      which = "" if missing is True else f" (layer rows {missing[:4]})"
      raise checks.SettingError(f"sparse upcycling: the dense checkpoint's {name}{which} has "
                                "no place in the MoE model (more layers, another "
                                "architecture?).")
  return out


def _flat(tree) -> Dict[str, Any]:
  return {"/".join(map(str, k)): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def check(abstract_params, checkpoint_dir: str, step: Optional[int] = None) -> Dict[str, Any]:
  """The plan for the MoE `abstract_params` from the checkpoint's metadata (no array read);
  a SettingError naming the first tensor that does not fit."""
  return _check(abstract_params, checkpoint_dir, step)[0]


def _check(abstract_params, checkpoint_dir: str, step: Optional[int]):
  """(plan, the checkpoint step, its saved shapes)."""
  steps = checkpoints_lib.committed_steps(checkpoint_dir)
  if not steps or (step is not None and int(step) not in steps):
    raise checks.SettingError(f"sparse upcycling: no committed checkpoint in {checkpoint_dir} "
                              f"(INITIAL_CHECKPOINT_PATH must name a dense run's checkpoints "
                              f"directory); committed steps: {steps}.")
  step = steps[-1] if step is None else int(step)
  saved = {k[len("params/"):]: v for k, v in
           checkpoints_lib.saved_shapes(checkpoint_dir, step).items() if k.startswith("params/")}
  target = {k: tuple(v.shape) for k, v in _flat(abstract_params).items()}
  return plan(target, saved), step, saved


def _source_sharding(target_sharding: NamedSharding, ndim: int, experts: bool,
                     scanned_target: bool, source_row: Optional[int]) -> NamedSharding:
  """The sharding of a dense array that becomes (part of) a target with `target_sharding`."""
  axes = list(target_sharding.spec) + [None] * (ndim - len(target_sharding.spec))
  if experts:  # drop the expert axis (after the units axis when scanned)
    del axes[1 if scanned_target else 0]
  if scanned_target:
    axes = axes[1:]  # a layer's slice
  if source_row is not None:
    axes = [None] + axes  # the dense checkpoint's own units axis
  return NamedSharding(target_sharding.mesh, PartitionSpec(*axes))


def upcycle(checkpoint_dir: str, params, shardings, step: Optional[int] = None):
  """(MoE params, the dense step): `params` (the MoE model's fresh, sharded initialisation)
  with every parameter the plan finds taken from the dense checkpoint."""
  flat_params, flat_shardings = _flat(params), _flat(shardings)
  the_plan, step, saved = _check(params, checkpoint_dir, step)
  scanned = lambda path: _SCANNED.match(path) is not None  # a stacked [units, …] parameter
  sources = {}
  for path, entry in the_plan.items():
    if entry is not None:
      experts, pieces = entry
      for name, row in pieces:
        sources.setdefault(name, _source_sharding(flat_shardings[path],
                                                  flat_params[path].ndim, experts,
                                                  scanned(path), row))
  abstract = flax.traverse_util.unflatten_dict({
      tuple(name.split("/")): jax.ShapeDtypeStruct(saved[name], jnp.float32,
                                                   sharding=sharding)
      for name, sharding in sources.items()})
  dense, _, dense_step = checkpoints_lib.restore_params(checkpoint_dir, abstract, None, step)
  dense = _flat(dense)

  def build(fresh, dense):
    out = {}
    for path, entry in the_plan.items():
      if entry is None:
        out[path] = fresh[path]
        continue
      experts, pieces = entry
      slices = [dense[name] if row is None else dense[name][row] for name, row in pieces]
      value = jnp.stack(slices) if scanned(path) else slices[0]
      if experts:  # the expert axis: after the units axis when stacked
        value = jnp.expand_dims(value, 1 if scanned(path) else 0)
        value = jnp.broadcast_to(value, fresh[path].shape)
      out[path] = value.astype(fresh[path].dtype)
    return out

  built = jax.jit(build, out_shardings=flat_shardings, donate_argnums=0)(flat_params, dense)
  tree = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in built.items()})
  return tree, dense_step
