"""Gin plumbing in t5x's style: `--gin_file=...` and `--gin.NAME=value` flags, and the model.

Gin files include each other by paths relative to the repository root
(`include 'gin_configs/models/decoder_only.gin'`), so the root is on gin's search path, as is
the current directory. The model is whatever the files bind to the macro `MODEL`.
"""
from __future__ import annotations

import math
import os
from typing import Sequence, Tuple

import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def split_gin_args(argv: Sequence[str]) -> Tuple[list, list, list]:
  """(gin files, gin bindings, the other arguments) from t5x-style flags."""
  files, bindings, rest = [], [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    for flag, target in (("--gin_file", files), ("--gin_search_paths", None)):
      if arg == flag and args:
        arg = f"{flag}={args.pop(0)}"
      if arg.startswith(flag + "="):
        value = arg[len(flag) + 1:]
        if target is None:
          for path in value.split(","):
            gin.add_config_file_search_path(path)
        else:
          target.append(value)
        break
    else:
      if arg.startswith("--gin."):
        name, _, value = arg[len("--gin."):].partition("=")
        bindings.append(f"{name} = {value}")
      else:
        rest.append(arg)
  return files, bindings, rest


def parse_gin(files: Sequence[str], bindings: Sequence[str] = ()) -> None:
  """Clears gin and parses the files, then the bindings (which win).

  Refuses, naming the closest valid names (`checks.SettingError`): a file that does not
  exist, a non-finite number, a macro binding (`NAME = value`) that no file defines or uses
  (a typo that would otherwise change nothing), and a `%NAME` no file defines (e.g. a run gin
  given without a model preset).
  """
  from moe_jax import checks  # pylint: disable=g-import-not-at-top
  checks.gin_files(files, ("", os.getcwd(), REPO_ROOT))
  checks.binding_values(bindings)
  gin.clear_config()
  for path in (os.getcwd(), REPO_ROOT):
    gin.add_config_file_search_path(path)
  # Not finalized (locked): a notebook or test may import more configurable modules later.
  gin.parse_config_files_and_bindings(list(files), None, finalize_config=False)
  defined, used, _ = macros()
  checks.macro_bindings(bindings, sorted(set(defined) | set(used)))
  gin.parse_config(list(bindings))
  defined, used, _ = macros()
  checks.macro_references(defined, used)
  checks.finite_values(_parsed_floats())


_MACRO = "gin.macro"


def _bound_values():
  """(binding, value) for every value in gin's current config, lists and dicts opened up; the
  binding is the macro's name or "selector.parameter"."""
  def leaves(value):
    if isinstance(value, (list, tuple, set)):
      for item in value:
        yield from leaves(item)
    elif isinstance(value, dict):
      for item in value.values():
        yield from leaves(item)
    else:
      yield value

  for (scope, selector), parameters in gin.config._CONFIG.items():  # pylint: disable=protected-access
    for parameter, value in parameters.items():
      where = scope if selector == _MACRO else f"{selector}.{parameter}"
      for leaf in leaves(value):
        yield where, leaf


def _parsed_floats() -> dict:
  """{binding: float} of every float bound in gin's current config."""
  found = {}
  for where, value in _bound_values():
    if isinstance(value, float):
      found.setdefault(where, value)
  return found


def macros() -> Tuple[list, dict, list]:
  """(macros defined, {macro used: the first binding that uses it}, macros defined as
  %gin.REQUIRED and used) in gin's current config."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  defined = [scope for scope, selector in config if selector == _MACRO]
  used = {}
  for where, value in _bound_values():
    if isinstance(value, gin.config.ConfigurableReference):
      scope, _, selector = value.scoped_selector.rpartition("/")
      if selector == _MACRO:
        used.setdefault(scope, where)
  required = [scope for scope, selector in config if selector == _MACRO and scope in used
              and _is_required(config[(scope, selector)].get("value"))]
  return defined, used, required


def _is_required(value) -> bool:
  return (isinstance(value, gin.config.ConfigurableReference)
          and value.scoped_selector == "gin.REQUIRED/gin.constant")


@gin.configurable(module="moe_jax.config")
def _configured_model(model=gin.REQUIRED):
  return model


@gin.configurable(module="moe_jax.config")
def _configured_rules(rules=gin.REQUIRED):
  return rules


def load_model(files: Sequence[str], bindings: Sequence[str] = ()):
  """Parses gin and builds the model the files bind to `MODEL` (a `DecoderOnlyLM`)."""
  parse_gin(files, list(bindings) + ["moe_jax.config._configured_model.model = %MODEL",
                                     "moe_jax.config._configured_rules.rules = "
                                     "%PARTITIONING_RULES"])
  return _configured_model()


def configured_model():
  """The model bound to `MODEL`, once gin is parsed with `MODEL_BINDINGS`."""
  return _configured_model()


# What a command adds to its gin bindings so that `configured_model` / `configured_rules` work.
MODEL_BINDINGS = ("moe_jax.config._configured_model.model = %MODEL",
                  "moe_jax.config._configured_rules.rules = %PARTITIONING_RULES")


def configured_rules():
  """The logical axis rules the files given to `load_model` bind to `PARTITIONING_RULES`."""
  return tuple(tuple(rule) for rule in _configured_rules())


# The MoE layers' layout follows the run's mesh (runs/pretrain.gin, runs/eval.gin bind the
# macros MOE_LAYOUT and NUM_EXPERT_PARTITIONS to these), so operative_config.gin shows what a
# layer computes with; a model built without a run gin keeps the single-device defaults.
@gin.configurable(module="moe_jax.config")
def moe_layout(mesh: str = gin.REQUIRED) -> str:
  """"grouped" when the run's mesh spans more than one device, else "packed"."""
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  return "grouped" if math.prod(_mesh_sizes(mesh, partitioning)) > 1 else "packed"


@gin.configurable(module="moe_jax.config")
def expert_partitions(mesh: str = gin.REQUIRED, rules=gin.REQUIRED) -> int:
  """Devices the logical `expert` axis is split over on the run's mesh under `rules`."""
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  sizes = dict(zip(partitioning.MESH_AXES, _mesh_sizes(mesh, partitioning)))
  return math.prod(sizes[a] for a in partitioning.mesh_axes(dict(rules).get("expert")))


def _mesh_sizes(mesh: str, partitioning) -> tuple:
  import jax  # pylint: disable=g-import-not-at-top
  return partitioning.mesh_shape(jax.device_count(), **partitioning.parse_mesh(mesh))
