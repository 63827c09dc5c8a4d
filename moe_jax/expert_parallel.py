"""Dropless expert parallelism: every assignment reaches its expert's device, none is dropped.

The single-device dropless dispatcher (dispatch.py) lays all T·k assignments of the batch out
in one ragged array. On a mesh the tokens are split over the batch axes and the experts over
the `expert` axis (EP devices, each owning E_l = E / EP consecutive experts, their hidden dim
optionally split over `model` as well: 2D expert sharding), and the sizes each device sends to
each other are known only at run time. This module runs dispatch → local grouped FFN →
combine inside `jax.shard_map` over the whole mesh, with a *transport* that moves the rows:

* `all_gather` (every backend, XLA:CPU included): the EP devices of an expert group
  all-gather their tokens and routing, each selects the assignments to its own experts,
  sorts them by local expert into a ragged buffer, runs the grouped FFN on its local
  weights, scatters the weighted outputs back to token rows and a reduce-scatter returns
  each device the sum over experts of its own tokens.
    Communication per device and layer, each way: (EP − 1) · T_l · H values (T_l: the
    device's tokens), against the ideal exchange of k · T_l · H (each assignment's row sent
    once): a factor (EP − 1) / k of the ideal (0.5 at EP = k = 2 … 3.5 at EP = 8, k = 2),
    plus the routing ([T_l, k] indices and gates, 2k values a token).
    Memory per device: the gathered tokens and the output rows, 2 · EP · T_l · H, and the
    receive buffer R · H with R = EP · T_l · min(k, E_l) in the worst case (every gathered
    token chose k of this device's experts); `receive_buffer_factor` f bounds it to
    R = ceil(f · k · T_l), f times the even share.
  Why this one on CPU: XLA:CPU implements all-gather and reduce-scatter, not
  ragged-all-to-all (jax 0.10.2: "UNIMPLEMENTED: HLO opcode ragged-all-to-all"), and a static
  all-to-all of worst-case buffers would move EP times the ideal *and* hold EP worst-case
  buffers, where this transport's traffic is bounded by EP / k of the ideal.

Routing, capacity bookkeeping, the aux and z losses and every metric are computed outside,
exactly as on one device (moe_layer.py); only the rows move here. Row results do not depend
on which device computes them, so outputs equal the single-device dropless layer's up to the
order of float additions.

Overflow: with `receive_buffer_factor` set, assignments past a device's buffer are not
computed (that expert's share of the token is lost, as a capacity drop) and counted; the
layer reports them as the `overflow_fraction` metric. The default (None) is the worst case:
nothing ever overflows.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Array = jax.Array
TRANSPORTS = ("auto", "all_gather", "ragged_all_to_all")
# Backends whose XLA implements the ragged-all-to-all collective.
RAGGED_BACKENDS = ("gpu", "tpu", "cuda", "rocm")
# The grouped FFN on one device's rows: (rows [R, H], group_sizes [E_l], w_in, w_gate, w_out,
# expected_rows=k·T_l) -> [R, H]; rows past Σ group_sizes are padding (zero out).
LocalFfn = Callable[[Array, Array, Array, Optional[Array], Array], Array]


def check_transport(name: str) -> None:
  if name not in TRANSPORTS:
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {name!r}.")


def check_receive_buffer_factor(value: Optional[float]) -> None:
  if value is not None and not (math.isfinite(value) and value >= 1.0):
    raise ValueError(
        f"receive_buffer_factor must be None (worst case: never overflows) or a finite number "
        f">= 1 (times the even share k·T_l rows per device), got {value}.")


# A dry run on CPU devices that plans a GPU/TPU job lowers (not compiles) the ragged transport.
_PLANNED_BACKEND: Optional[str] = None


@contextlib.contextmanager
def planning_for(backend: str):
  """Within it, transports resolve as on `backend` (moe_jax.dry_run's --target_backend)."""
  global _PLANNED_BACKEND
  previous, _PLANNED_BACKEND = _PLANNED_BACKEND, backend
  try:
    yield
  finally:
    _PLANNED_BACKEND = previous


def resolve_transport(name: str, backend: Optional[str] = None) -> str:
  """The transport `name` stands for on `backend` (default: JAX's): "auto" is the ragged
  all-to-all where XLA implements it (GPU, TPU), else the all-gather transport."""
  check_transport(name)
  backend = backend or _PLANNED_BACKEND or jax.default_backend()
  if name == "auto":
    return "ragged_all_to_all" if backend in RAGGED_BACKENDS else "all_gather"
  if name == "ragged_all_to_all" and backend not in RAGGED_BACKENDS:
    raise ValueError(
        f"transport='ragged_all_to_all' needs a backend whose XLA implements ragged-all-to-all "
        f"({', '.join(RAGGED_BACKENDS)}); this one is {backend!r}. Use transport='all_gather' "
        "or 'auto'.")
  return name


def buffer_rows(local_tokens: int, k: int, expert_partitions: int, local_experts: int,
                receive_buffer_factor: Optional[float]) -> int:
  """Rows of a device's receive buffer: the worst case EP · T_l · min(k, E_l), or
  ceil(f · k · T_l) rounded up to a multiple of 8, whichever is smaller."""
  worst = expert_partitions * local_tokens * min(k, local_experts)
  if receive_buffer_factor is None:
    return worst
  bounded = -(-math.ceil(receive_buffer_factor * k * local_tokens) // 8) * 8
  return max(1, min(worst, bounded))


def exchange_bytes(local_tokens: int, k: int, model_dim: int, expert_partitions: int,
                   itemsize: int) -> dict:
  """Bytes one device sends per MoE layer and direction (the return trip is the same):
  the ideal exchange k·T_l·H (each assignment's row once), and what each transport moves."""
  ideal = k * local_tokens * model_dim * itemsize
  return {"ideal": ideal,
          # the ragged rows (its own experts' included as a local copy; under uniform routing
          # (EP−1)/EP of them leave the device), plus [EP]-sized counts and offsets
          "ragged_all_to_all": ideal + 3 * expert_partitions * 4,
          # the gathered tokens (and routing) of the EP − 1 other devices of the expert group
          "all_gather": (expert_partitions - 1) * local_tokens * (model_dim * itemsize + 8 * k)}


def _select_local(expert_index: Array, local_experts: int, device: Array, rows: int
                  ) -> Tuple[Array, Array, Array]:
  """Assignments [N] (flat, expert −1 where not kept) -> this device's buffer.

  Returns (the assignment in each of the `rows` buffer rows, sorted by local expert then by
  assignment index; group_sizes [E_l] of the rows that fit; the count that did not fit).
  """
  local = expert_index - device * local_experts
  mine = (expert_index >= 0) & (local >= 0) & (local < local_experts)
  key = jnp.where(mine, local, local_experts).astype(jnp.int32)
  order = jnp.argsort(key, stable=True)
  if order.shape[0] < rows:  # the worst case never exceeds N; a bound above it is moot
    order = jnp.pad(order, (0, rows - order.shape[0]))
  counts = jnp.bincount(key, length=local_experts + 1)[:local_experts]
  ends = jnp.minimum(jnp.cumsum(counts), rows)
  group_sizes = ends - jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
  overflow = jnp.sum(counts) - ends[-1]
  return order[:rows], group_sizes.astype(jnp.int32), overflow


def all_gather_exchange(local_ffn: LocalFfn, x: Array, expert_index: Array, gates: Array,
                        w_in: Array, w_gate: Optional[Array], w_out: Array, *,
                        num_experts: int, expert_axes: Sequence[str],
                        model_axes: Sequence[str], expert_partitions: int,
                        receive_buffer_factor: Optional[float]) -> Tuple[Array, Array]:
  """The `all_gather` transport, inside shard_map (module docstring).

  x [T_l, H]; expert_index [T_l, k] int32 (−1: not routed); gates [T_l, k]; weights: this
  device's experts [E_l, H, F_l]. Returns (y [T_l, H] = Σ_j gate_j · expert_j(x), this
  device's overflow count).
  """
  t_l, k = expert_index.shape
  local_experts = num_experts // expert_partitions
  device = jax.lax.axis_index(tuple(expert_axes)) if expert_axes else 0
  gather = (lambda a: jax.lax.all_gather(a, tuple(expert_axes), tiled=True)
            if expert_axes else a)
  x_all, index_all, gates_all = gather(x), gather(expert_index), gather(gates)
  rows = buffer_rows(t_l, k, expert_partitions, local_experts, receive_buffer_factor)
  assignment, group_sizes, overflow = _select_local(index_all.reshape(-1), local_experts,
                                                    device, rows)
  token = assignment // k
  used = jnp.arange(rows) < jnp.sum(group_sizes)
  inputs = jnp.where(used[:, None], x_all[token], 0).astype(x.dtype)
  out = local_ffn(inputs, group_sizes, w_in, w_gate, w_out, expected_rows=k * t_l)
  weight = jnp.where(used, gates_all.reshape(-1)[assignment], 0).astype(out.dtype)
  y_all = jnp.zeros(x_all.shape, out.dtype).at[token].add(out * weight[:, None])
  if expert_axes:
    y = jax.lax.psum_scatter(y_all, tuple(expert_axes), scatter_dimension=0, tiled=True)
  else:
    y = y_all
  if model_axes:  # 2D sharding: each model shard computed its slice of the hidden dim; the
    y = jax.lax.psum(y, tuple(model_axes))  # sum is linear, so it is taken on [T_l, H]
  return y, overflow


def _exclusive_cumsum(a: Array, axis: int = -1) -> Array:
  return jnp.cumsum(a, axis=axis) - a


def ragged_exchange(local_ffn: LocalFfn, x: Array, expert_index: Array, gates: Array,
                    w_in: Array, w_gate: Optional[Array], w_out: Array, *, num_experts: int,
                    expert_axes: Sequence[str], model_axes: Sequence[str],
                    expert_partitions: int, receive_buffer_factor: Optional[float],
                    ragged_all_to_all: Callable = jax.lax.ragged_all_to_all
                    ) -> Tuple[Array, Array]:
  """The `ragged_all_to_all` transport, inside shard_map (MaxText's design; GPU, TPU).

  Each device sorts its T_l·k assignments by expert and sends each expert device exactly the
  rows for its experts; the receiver regroups what arrived (by source, then local expert) by
  local expert, runs the grouped FFN, puts the rows back in arrival order and returns them
  along the same ragged route; the sender unsorts and combines with the gates.
    Communication per device and layer, each way: the k·T_l rows of its own assignments
    (those for its own experts included, as a local copy): the ideal, plus [EP]-sized
    count/offset exchanges.
    Memory per device: the sorted rows k·T_l·H, and the receive buffer R·H with
    R = EP·T_l·min(k, E_l) in the worst case, ceil(f·k·T_l) with `receive_buffer_factor` f.
  With a bounded buffer each receiver accepts a prefix of every source's rows (in source
  order); a source's rows past it (the tail of its expert-sorted segment) are not sent.
  `ragged_all_to_all` is `jax.lax.ragged_all_to_all`; tests pass an emulation built from
  all-gathers (`emulated_ragged_all_to_all`), since XLA:CPU does not implement it.
  """
  t_l, k = expert_index.shape
  h = x.shape[-1]
  ep = expert_partitions
  local_experts = num_experts // ep
  axes = tuple(expert_axes)
  exchange = lambda a: jax.lax.all_to_all(a, axes, 0, 0, tiled=True) if axes else a
  rows = buffer_rows(t_l, k, ep, local_experts, receive_buffer_factor)

  # Sender: assignments sorted by expert; unrouted ones (−1) last, never sent.
  flat = expert_index.reshape(-1)
  key = jnp.where(flat >= 0, flat, num_experts).astype(jnp.int32)
  order = jnp.argsort(key, stable=True)
  counts = jnp.bincount(key, length=num_experts + 1)[:num_experts]
  per_device = counts.reshape(ep, local_experts)  # [EP dest, E_l]
  send_total = jnp.sum(per_device, axis=1)
  input_offsets = _exclusive_cumsum(send_total)

  # Receiver: rows per (source, local expert); accept a prefix of each source's segment.
  recv_counts = exchange(per_device)  # [EP source, E_l]
  recv_total = jnp.sum(recv_counts, axis=1)
  recv_offsets = jnp.minimum(_exclusive_cumsum(recv_total), rows)
  accepted = jnp.clip(rows - _exclusive_cumsum(recv_total), 0, recv_total)
  accepted_per_expert = jnp.clip(
      accepted[:, None] - _exclusive_cumsum(recv_counts, axis=1), 0, recv_counts)
  # Back to the senders: how many rows each destination takes, and where they land.
  send_sizes = exchange(accepted)
  output_offsets = exchange(recv_offsets)
  overflow = jnp.sum(send_total - send_sizes)

  sorted_rows = x[order // k]
  received = ragged_all_to_all(sorted_rows, jnp.zeros((rows, h), x.dtype),
                               input_offsets.astype(jnp.int32), send_sizes.astype(jnp.int32),
                               output_offsets.astype(jnp.int32), accepted.astype(jnp.int32),
                               axis_name=axes)
  # Arrival order is (source, local expert); the grouped FFN wants local-expert order.
  used = jnp.sum(accepted)
  expert_of_row = jnp.repeat(jnp.tile(jnp.arange(local_experts, dtype=jnp.int32), ep),
                             accepted_per_expert.reshape(-1), total_repeat_length=rows)
  expert_of_row = jnp.where(jnp.arange(rows) < used, expert_of_row, local_experts)
  regroup = jnp.argsort(expert_of_row, stable=True)
  out = local_ffn(received[regroup], jnp.sum(accepted_per_expert, axis=0).astype(jnp.int32),
                  w_in, w_gate, w_out, expected_rows=k * t_l)
  out = out[jnp.argsort(regroup)]  # back to arrival order
  back_offsets = exchange(input_offsets)  # where each source keeps its rows for us
  returned = ragged_all_to_all(out, jnp.zeros((t_l * k, h), out.dtype),
                               recv_offsets.astype(jnp.int32), accepted.astype(jnp.int32),
                               back_offsets.astype(jnp.int32), send_sizes.astype(jnp.int32),
                               axis_name=axes)
  per_assignment = returned[jnp.argsort(order)].reshape(t_l, k, h)
  weights = gates.astype(out.dtype)
  y = sum(per_assignment[:, j] * weights[:, j, None] for j in range(k))
  if model_axes:  # 2D sharding: the hidden dim's slices summed, on [T_l, H] (linear)
    y = jax.lax.psum(y, tuple(model_axes))
  return y, overflow


def emulated_ragged_all_to_all(operand: Array, output: Array, input_offsets: Array,
                               send_sizes: Array, output_offsets: Array, recv_sizes: Array, *,
                               axis_name) -> Array:
  """`jax.lax.ragged_all_to_all`'s semantics from all-gathers (for XLA:CPU and the tests):
  source s's rows [input_offsets_s[d], +send_sizes_s[d]) land at output_offsets_s[d] on d.
  Moves EP times the data of the real collective."""
  del recv_sizes  # implied by the senders' sizes
  me = jax.lax.axis_index(axis_name)
  gather = lambda a: jax.lax.all_gather(a, axis_name)
  operands, starts, sizes, targets = (gather(operand), gather(input_offsets),
                                      gather(send_sizes), gather(output_offsets))
  row = jnp.arange(output.shape[0])
  result = output
  for source in range(operands.shape[0]):
    start, size, target = starts[source, me], sizes[source, me], targets[source, me]
    inside = (row >= target) & (row < target + size)
    index = jnp.clip(start + row - target, 0, operand.shape[0] - 1)
    result = jnp.where(inside[:, None], operands[source][index], result)
  return result


def expert_parallel_dropless(local_ffn: LocalFfn, x: Array, expert_index: Array,
                             gates: Array, w_in: Array, w_gate: Optional[Array], w_out: Array,
                             *, num_experts: int, expert_partitions: int,
                             transport: str = "auto",
                             receive_buffer_factor: Optional[float] = None,
                             ragged_all_to_all: Optional[Callable] = None
                             ) -> Tuple[Array, Array]:
  """Dropless MoE combine on the current mesh: y[g, s] = Σ_j gates · expert_{index}(x[g, s]).

  x [G, S, H] split over the logical "group" axes; expert_index [G, S, k] (−1 where the
  assignment is not routed); gates [G, S, k]; expert weights [E, H, F] / [E, F, H] split by
  the logical rules ("expert", "expert_mlp"). Runs under `partitioning.activate(mesh, rules)`.
  ragged_all_to_all: tests only: run the ragged transport with this collective (e.g.
    `emulated_ragged_all_to_all`) whatever `transport` says.
  Returns (y [G, S, H], the number of assignments that overflowed a receive buffer).
  """
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from moe_jax.partitioning import mesh_axes  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(
        "layout='grouped' with dispatch='dropless' runs inside jax.shard_map over the device "
        "mesh: call the layer under partitioning.activate(mesh, rules) (or use "
        "layout='packed' on one device).")
  group_axes, expert_axes, model_axes = (
      mesh_axes(nn.logical_to_mesh_axes((name,))[0])
      for name in ("group", "expert", "expert_mlp"))
  sizes = dict(mesh.shape)
  # Axes of size 1 move nothing: leave them out of the collectives.
  group_axes, expert_axes, model_axes = (tuple(a for a in axes if sizes[a] > 1) for axes in
                                         (group_axes, expert_axes, model_axes))
  ep = math.prod(sizes[a] for a in expert_axes)
  if ep != expert_partitions:
    raise ValueError(
        f"num_expert_partitions={expert_partitions} but the mesh splits experts over "
        f"{expert_axes or 'no axis'} ({ep} devices): set num_expert_partitions={ep} (gin: "
        "NUM_EXPERT_PARTITIONS; runs/pretrain.gin derives it from MESH).")
  if not set(expert_axes) <= set(group_axes) or set(model_axes) & set(group_axes):
    raise ValueError(
        f"dropless expert parallelism needs the logical axis rules to map 'expert' to mesh "
        f"axes among those of 'group' (here {expert_axes} and {group_axes}) and "
        f"'expert_mlp' to axes outside them (here {model_axes}); change PARTITIONING_RULES "
        "(partitioning.standard_rules() does this).")
  g, s, h = x.shape
  group_split = math.prod(sizes[a] for a in group_axes)
  if g % group_split:
    raise ValueError(f"{g} routing groups do not split over the group mesh axes {group_axes} "
                     f"({group_split} devices): choose group_size and the batch size so that "
                     f"batch × length / group_size is a multiple of {group_split}.")
  k = expert_index.shape[-1]
  tokens = PartitionSpec(group_axes or None)
  in_spec = PartitionSpec(expert_axes or None, None, model_axes or None)  # [E, H, F]
  out_spec = PartitionSpec(expert_axes or None, model_axes or None, None)  # [E, F, H]
  gated = w_gate is not None

  name = resolve_transport(transport) if ragged_all_to_all is None else "ragged_all_to_all"
  # Experts not split (EP = 1): every assignment is local, and the all-gather transport
  # without an expert axis is exactly the local computation, with no collective.
  if name == "ragged_all_to_all" and expert_axes:
    exchange = functools.partial(ragged_exchange, ragged_all_to_all=(
        ragged_all_to_all or jax.lax.ragged_all_to_all))
  else:
    exchange = all_gather_exchange

  def body(x, expert_index, gates, w_in, *rest):
    w_gate, w_out = rest if gated else (None,) + rest
    gl = x.shape[0]
    y, overflow = exchange(
        local_ffn, x.reshape(gl * s, h), expert_index.reshape(gl * s, k),
        gates.reshape(gl * s, k), w_in, w_gate, w_out, num_experts=num_experts,
        expert_axes=expert_axes, model_axes=model_axes, expert_partitions=ep,
        receive_buffer_factor=receive_buffer_factor)
    # Each device counts its own buffer's overflow; the devices along axes outside the
    # group axes (model shards) hold copies of the same count: sum over the group axes only.
    total = jax.lax.psum(overflow, tuple(group_axes)) if group_axes else overflow
    return y.reshape(gl, s, h), total

  weights = (w_in, w_gate, w_out) if gated else (w_in, w_out)
  weight_specs = (in_spec, in_spec, out_spec) if gated else (in_spec, out_spec)
  # check_vma=False: the CPU expert kernels' loops start from zeros that the replication
  # checker would need annotated as device-varying; the gradients are checked in tests.
  return jax.shard_map(
      body, mesh=mesh, in_specs=(tokens,) * 3 + weight_specs, check_vma=False,
      out_specs=(tokens, PartitionSpec()))(x, expert_index, gates, *weights)
