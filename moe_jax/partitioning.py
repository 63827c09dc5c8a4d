"""Meshes, logical axis rules, sharded initialisation and global batches (SPEC §4).

Model: GSPMD with *Auto* mesh axes. Parameters and key activations carry Flax logical axis
names; one rules table maps them to mesh axes; `jax.jit` with shardings and
`with_sharding_constraint` (what `nn.with_logical_constraint` emits) let XLA insert the
collectives. Chosen over Explicit axes + `reshard` because Flax's logical partitioning and
t5x-style rules tables are built on constraints, and a constraint between the group-sharded
and the expert-sharded layout of the MoE buffers already lowers to an all-to-all.

Mesh axes: `replica` (outer, across slices / DCN), `data`, `expert`, `model`. The batch (and
the MoE groups) is split over replica × data × expert; expert weights [E, H, F] over
`expert` × `model` (2D, GLaM); with `fsdp=True` their H dimension also over `data`.

    mesh = make_mesh(data=2, expert=4)                     # -1 fills the remaining devices
    rules = standard_rules()
    with activate(mesh, rules):
      variables = init_sharded(module, mesh, rules, sample_tokens)
      logits, aux = jax.jit(module.apply)(variables, tokens)
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("replica", "data", "expert", "model")
BATCH_AXES = ("replica", "data", "expert")
Rules = Tuple[Tuple[str, Any], ...]

from moe_jax import checks


def mesh_shape(num_devices: int, replica: int = 1, data: int = -1, expert: int = 1,
               model: int = 1) -> Tuple[int, int, int, int]:
  """Sizes of (replica, data, expert, model); one size may be -1 (the devices left over)."""
  sizes = [replica, data, expert, model]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise checks.SettingError(f"mesh sizes must be >= 1, with at most one -1; got "
                     f"{dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise checks.SettingError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed sizes (product {known}) "
                       f"do not divide the {num_devices} devices.")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise checks.SettingError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, but "
                     f"{num_devices} are available: the sizes must multiply to the device count.")
  return tuple(sizes)


def make_mesh(replica: int = 1, data: int = -1, expert: int = 1, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh over (replica, data, expert, model) with Auto axes (GSPMD-style constraints).

  Uses `jax.make_mesh`, which orders devices by the physical topology on TPU/GPU, when all
  devices are used; an explicit device list is laid out in order.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(len(devices), replica, data, expert, model)
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def parse_mesh(spec: str) -> dict:
  """'data:16,expert:16,model:4' -> {'data': 16, 'expert': 16, 'model': 4}."""
  out = {}
  for part in filter(None, spec.split(",")):
    name, _, size = part.partition(":")
    if name not in MESH_AXES:
      raise checks.SettingError(f"mesh axis must be one of {MESH_AXES}, got {name!r} in {spec!r}.")
    out[name] = int(size)
  return out


def standard_rules(fsdp: bool = False) -> Rules:
  """Logical axis -> mesh axes (t5x style). The table every preset uses unless it sets its own.

  batch / group: the data-parallel axes (the MoE groups are split like the batch).
  expert: the expert axis; expert_mlp, mlp, heads, vocab: the model (tensor-parallel) axis.
  fsdp: also split the embed dimension of the weights over `data` (ZeRO-3 / FSDP-style), for
  presets whose parameters do not fit replicated over the data axis.
  """
  return (
      ("batch", BATCH_AXES),
      ("group", BATCH_AXES),
      ("length", None),
      ("expert", "expert"),
      ("attention_expert", None),  # SwitchHead's few experts per head: small, replicated
      ("expert_mlp", "model"),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv_heads", None),  # few kv heads (GQA) rarely divide the model axis; they are small
      ("kv", None),
      ("latent", None),  # MLA's compressed query / key-value vectors (DeepSeek): small
      ("relpos_buckets", None),  # T5's relative position bias [heads, buckets]
      ("vocab", "model"),
      ("embed", "data" if fsdp else None),
      ("layers", None),
      # Activations: the embed dim of activations stays unsplit even with fsdp.
      ("act_embed", None),
      ("expert_group", ("replica", "data")),  # groups after the all-to-all (experts hold E)
  )


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  """Sets the mesh and the logical rules for jit, constraints and Flax partitioning."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_shardings(tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree of (boxed) variables or their eval_shape."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, rules)


def init_sharded(module: nn.Module, mesh: Mesh, rules: Rules, tokens: Any,
                 rng: Optional[jax.Array] = None, **kwargs):
  """module.init compiled with out_shardings: every array is created on its own shards."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  init = lambda r, t: module.init(r, t, **kwargs)
  abstract = jax.eval_shape(init, rng, tokens)
  shardings = logical_shardings(abstract, mesh, rules)
  with activate(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(rng, tokens)


def optimizer_shardings(opt_state, params, param_shardings, mesh: Mesh):
  """Shardings for an optax state: a leaf shaped like its parameter (Adam moments, unfactored
  Adafactor stats) is split like it; Adafactor's factored statistics (the parameter's shape
  without its last or its second-to-last dimension) like the dimensions they keep; anything
  else (counts, placeholders) is replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  params_def = jax.tree.structure(params)
  like_params = lambda n: jax.tree.structure(n) == params_def

  def leaf(a, p, s):
    spec = tuple(s.spec) + (None,) * (len(p.shape) - len(s.spec))
    for dropped in (len(p.shape) - 1, len(p.shape) - 2):
      kept = [i for i in range(len(p.shape)) if i != dropped]
      if dropped >= 0 and a.shape == tuple(p.shape[i] for i in kept):
        return NamedSharding(mesh, PartitionSpec(*(spec[i] for i in kept)))
    return s if a.shape == p.shape else replicated

  def shard(node):
    if not like_params(node):
      return replicated
    return jax.tree.map(leaf, node, params, param_shardings)

  return jax.tree.map(shard, opt_state, is_leaf=like_params)


def train_state_shardings(abstract_state, variable_shardings, mesh: Mesh):
  """Shardings of a `train_step.TrainState` (step replicated, params by the rules, optimizer
  state like its parameters, extra collections by the rules)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return abstract_state.replace(
      step=replicated, params=variable_shardings["params"],
      opt_state=optimizer_shardings(abstract_state.opt_state, abstract_state.params,
                                    variable_shardings["params"], mesh),
      extra={k: variable_shardings[k] for k in abstract_state.extra})


def mesh_axes(entry) -> Tuple[str, ...]:
  """A rule's (or a PartitionSpec entry's) mesh axes as a tuple: None, "a" or ("a", "b")."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def logical_axis_size(mesh: Mesh, rules: Rules, name: str) -> int:
  """Devices a logical axis (e.g. "batch", "expert") is split over under `rules`."""
  return math.prod(mesh.shape[a] for a in mesh_axes(dict(rules).get(name)))


def validate(module, mesh: Mesh, rules: Rules, batch_size: int) -> None:
  """Errors before compilation: experts vs the expert axis, batch vs the batch axes."""
  split = logical_axis_size(mesh, rules, "batch")
  if batch_size % split:
    raise checks.SettingError(f"batch size {batch_size} is not divisible by the batch-sharding mesh axes "
                     f"({dict(rules)['batch']}: {split} devices); use a multiple of {split}.")
  sparse = module.sparse_sublayers() if hasattr(module, "sparse_sublayers") else {}
  for kind, sublayer in sparse.items():  # every sparse sub-layer's experts vs their mesh axes
    split = logical_axis_size(mesh, rules, sublayer.expert_axis)
    if sublayer.num_experts % split:
      raise checks.SettingError(
          f"num_experts={sublayer.num_experts} is not divisible by the "
          f"'{sublayer.expert_axis}' mesh axis ({split} devices, splitting the {kind} "
          f"sub-layer's experts); choose a multiple of {split} experts or a smaller axis.")
  for layer in sparse.values():  # the FFN MoE layers (each stack's, in an encoder-decoder)
    if not hasattr(layer, "layout"):
      continue
    e = logical_axis_size(mesh, rules, "expert")
    if layer.layout == "grouped" and layer.num_expert_partitions != e:
      raise checks.SettingError(
          f"num_expert_partitions={layer.num_expert_partitions} but the mesh splits the experts "
          f"over {e} devices: set NUM_EXPERT_PARTITIONS = {e} (runs/pretrain.gin derives it "
          "from MESH).")
    if layer.layout == "grouped" and layer.dispatch == "dropless":
      from moe_jax import expert_parallel  # pylint: disable=g-import-not-at-top
      expert_parallel.resolve_transport(layer.transport)  # a transport the backend lacks
    if layer.layout == "packed" and mesh.size > 1:
      logging.warning(
          "MoE layout 'packed' on a mesh of %d devices: correct, but XLA moves every group's "
          "rows to every device; set MOE_LAYOUT = 'grouped' (runs/pretrain.gin does).",
          mesh.size)
      break


# ----------------------------------------------------------------------------------------
# Data: global batches from per-host shards, and multi-host start-up.
# ----------------------------------------------------------------------------------------

def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Leading (batch) dimension over the batch axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(*nn.logical_to_mesh_axes(("batch",), rules)))


def host_batch_rows(mesh: Mesh, rules: Rules, global_batch_size: int) -> slice:
  """The rows of the global batch this process feeds (contiguous under the batch sharding);
  an input pipeline reads exactly these, e.g. as shard index = start / (stop − start)."""
  sharding = batch_sharding(mesh, rules)
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  starts = sorted({(idx[0].start or 0, idx[0].stop or global_batch_size)
                   for idx in index_map.values()})
  for (_, stop), (start, _) in zip(starts, starts[1:]):
    if stop != start:
      raise ValueError(f"this process's batch rows are not contiguous: {starts}.")
  return slice(starts[0][0], starts[-1][1])


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules):
  """This process's rows of the batch (`host_batch_rows`) -> global arrays over the batch axes."""
  sharding = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def _cpu_only(multiprocess_gpu: bool) -> bool:
  """Whether this process will run JAX on the CPU backend only (decided before JAX starts a
  backend): JAX_PLATFORMS says "cpu", or it says nothing, --multiprocess_gpu is off and no GPU
  or TPU plugin is installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  platforms = str(jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "") or "")
  if platforms:
    return [p.strip() for p in platforms.split(",")] == ["cpu"]
  accelerators = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")
  return not multiprocess_gpu and not any(importlib.util.find_spec(m) for m in accelerators)


def cluster_detected() -> bool:
  """A multi-process job JAX's own cluster detection can configure: SLURM or Open MPI with
  more than one task, or a multi-host TPU VM slice."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1") or 1) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def wait_for_coordinator(address: str, timeout_s: float, process_id=None,
                         num_processes=None) -> None:
  """Waits until a TCP connection to the coordinator `host:port` succeeds; raises a
  RuntimeError naming it after `timeout_s` seconds."""
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator_address must be host:port, got {address!r}.")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f"the coordinator {address} did not answer within {timeout_s} s (this is process "
            f"{process_id} of {num_processes}; process 0 serves the coordinator): start "
            "process 0 with the same --coordinator_address, or fix the address "
            f"(--distributed_timeout sets the wait). Last error: {e}") from None
      time.sleep(0.25)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None, *,
                           multiprocess_gpu: bool = False, timeout_s: int = 300) -> None:
  """`jax.distributed.initialize` from arguments or the environment (MOE_JAX_COORDINATOR,
  MOE_JAX_NUM_PROCESSES, MOE_JAX_PROCESS_ID); on TPU pods, SLURM and Open MPI everything may be
  left out and JAX's cluster detection finds it. Call it before any JAX computation.

  CPU processes exchange collectives through gloo; GPU and TPU processes use their backend's
  own (NCCL, ICI/DCN), so gloo is switched on only for a CPU-only process. A coordinator that
  does not answer within `timeout_s` seconds is an error naming it, not a hang.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("MOE_JAX_COORDINATOR")
  if num_processes is None and "MOE_JAX_NUM_PROCESSES" in env:
    num_processes = int(env["MOE_JAX_NUM_PROCESSES"])
  if process_id is None and "MOE_JAX_PROCESS_ID" in env:
    process_id = int(env["MOE_JAX_PROCESS_ID"])
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--process_count must be >= 1, got {num_processes}.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_index={process_id} must be in [0, --process_count="
                     f"{num_processes}), i.e. 0 to {num_processes - 1}.")
  if timeout_s < 1:
    raise ValueError(f"--distributed_timeout must be >= 1 second, got {timeout_s}.")
  if coordinator_address and process_id not in (None, 0):
    # JAX's client aborts the whole process (a C++ fatal error) when the coordinator does not
    # answer in time; probe it first so that the failure is an error that says what to do.
    wait_for_coordinator(coordinator_address, timeout_s, process_id, num_processes)
  if _cpu_only(multiprocess_gpu):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
  except Exception as e:  # XLA raises a generic runtime error (DEADLINE_EXCEEDED, UNAVAILABLE)
    raise RuntimeError(
        f"jax.distributed could not start: process {process_id} of {num_processes} with "
        f"coordinator {coordinator_address!r} (waited up to {timeout_s} s). Start every "
        "process with the same --coordinator_address and --process_count (process 0 serves "
        f"the coordinator at that host:port) and check the address is reachable. ({e})"
    ) from None
