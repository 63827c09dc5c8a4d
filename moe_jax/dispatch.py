"""Dispatchers decide *how the data moves*: tokens to expert buffers, expert outputs back.

All three compute the same function of (x, routing decision, experts):
  y[g, s] = Σ_{kept (e, slot) of token s} combine_weight · expert_e(x[g, s])

  * `einsum`: GShard one-hot masks [G, S, E, C]; readable reference, O(G·S·E·C·H) work.
  * `gather`: index arithmetic; tokens are gathered into capacity buffers [E, G·C, H] and the
    outputs gathered back; O(T·k·H) data movement, no [G, S, E, C] tensor. The default.
    Two layouts: `packed` (one device: each expert's kept rows from all groups at the front
    of its buffer, so the experts skip the empty tail) and `grouped` (a mesh: group g's slots
    at [e, g·C : (g+1)·C], built by per-group gathers that stay on the group's device).
  * `dropless`: no capacity; the T·k assignments are laid out sorted by expert in one ragged
    array [T·k, H] for a grouped matmul.

The routing decision carries its own dispatch data (vmoe's design): a decision class (the
token-choice and expert-choice ones below, `soft_moe.SoftRouting`) answers the questions a
dispatcher asks — which token fills each slot or row, and how rows combine back — so the
dispatchers never ask which router made it. `Routing` lists the questions; a decision that
cannot answer one (dropless for expert choice) says so through its router's `dispatches`, and
the layer refuses that setting before anything is traced.

Sharded runs (SPEC §4): the grouped layouts build buffers [G, E, C, H] split like the groups
(logical axis "group"), then constrain them to [E, G, C, H] split over experts ("expert",
"expert_group"): XLA lowers that change of layout to an all-to-all, and the reverse after
the experts. Without a mesh the constraints do nothing.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
DISPATCH_NAMES = ("einsum", "gather", "dropless")
# Status codes of a recorded assignment (moe_jax/analysis/records.py).
KEPT, DROPPED, SKIPPED, UNUSED = 0, 1, 2, -1


@struct.dataclass
class ExpertBatch:
  """Tokens laid out for the experts.

  Capacity layout: `inputs` [E, N, H]; if `counts` [E] is given, only slots [0, counts[e])
  of expert e hold tokens (the rest are zero), so experts may skip the empty tail.
  Ragged layout: `inputs` [M, H] sorted by expert, expert e owning `group_sizes[e]` consecutive
  rows; rows past Σ group_sizes are padding.
  """
  inputs: Array
  counts: Optional[Array] = None
  group_sizes: Optional[Array] = None


def _gather_rows(x_flat: Array, rows: Array) -> Array:
  # Out-of-bounds rows read as zero; the gradient is a scatter-add that drops them.
  return x_flat.at[rows].get(mode="fill", fill_value=0)


@jax.custom_vjp
def _combine_rows(outputs: Array, weights: Array, rows: Array, row_token: Array) -> Array:
  """y[t] = Σ_j weights[t, j] · outputs[rows[t, j]]: one gather of k rows per token.

  outputs [R, H]; weights, rows [T, k]; row_token [R]: the token each row belongs to (T where
  none). Every row feeds at most one (token, choice), so the backward to `outputs` is a gather
  through the inverse map `row_token` rather than autodiff's scatter-add, which XLA:CPU runs
  ~8× slower (19 ms vs 2.5 ms for T=4096, k=2, H=512).
  """
  return _combine_rows_fwd(outputs, weights, rows, row_token)[0]


def _combine_rows_fwd(outputs, weights, rows, row_token):
  gathered = _gather_rows(outputs, rows)  # [T, k, H]
  # Unrolled over the static k: one fused elementwise loop (measured 0.6 ms at T=4096, k=2,
  # H=512, vs 1.1 ms as an einsum and 3.0 ms as a multiply + reduce over k).
  w = weights.astype(gathered.dtype)
  y = sum(gathered[:, j] * w[:, j, None] for j in range(gathered.shape[1]))
  return y, (gathered, weights, rows, row_token)


def _combine_rows_bwd(saved, dy):
  gathered, weights, rows, row_token = saved
  row_weight = jnp.zeros(row_token.shape, weights.dtype).at[rows.ravel()].set(
      weights.ravel(), mode="drop")
  d_outputs = _gather_rows(dy, row_token) * row_weight[:, None].astype(dy.dtype)
  # As an einsum (1.4 ms); a multiply + reduce over H fuses badly on XLA:CPU (26 ms).
  d_weights = jnp.einsum("tkh,th->tk", gathered, dy, preferred_element_type=jnp.float32)
  return d_outputs, d_weights.astype(weights.dtype), None, None


_combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


GROUP_SHARDED = ("group", None, None, "act_embed")           # [G, E, C, H]
EXPERT_SHARDED = ("expert", "expert_group", None, "act_embed")  # [E, G, C, H]


def to_experts(buffers: Array) -> Array:
  """[G, E, C, H] split by group -> [E, G·C, H] split by expert (an all-to-all on a mesh)."""
  g, e, c, h = buffers.shape
  buffers = nn.with_logical_constraint(buffers, GROUP_SHARDED)
  buffers = nn.with_logical_constraint(jnp.transpose(buffers, (1, 0, 2, 3)), EXPERT_SHARDED)
  return buffers.reshape(e, g * c, h)


def from_experts(outputs: Array, num_groups: int) -> Array:
  """[E, G·C, H] split by expert -> [G, E, C, H] split by group (the reverse all-to-all)."""
  e, gc, h = outputs.shape
  outputs = nn.with_logical_constraint(outputs.reshape(e, num_groups, gc // num_groups, h),
                                       EXPERT_SHARDED)
  return nn.with_logical_constraint(jnp.transpose(outputs, (1, 0, 2, 3)), GROUP_SHARDED)


# ---------------------------------------------------------------------------------------------
# Routing decisions: who goes where, in the forms the dispatchers read.
# ---------------------------------------------------------------------------------------------
class Routing(Protocol):
  """What a routing decision answers (G groups of S tokens, E experts, C slots per expert).

  kind: a label for routing records ("token_choice", "expert_choice", "soft").
  einsum_weights(E, C, dtype) -> dispatch, combine [G, S, E, C]: how much of token s goes into
      slot c of expert e, and how much of that slot's output comes back to s.
  slot_tokens(E, C) -> (slot_token [G, E·C], state): the group's token in each slot (S when
      empty), for the grouped layout; combine_slots(outputs [G, E·C, H], state) -> [G, S, H].
  packed_rows(E, C) -> (row_token [E·G·C], counts [E] or None, state): the token (of all G·S,
      G·S when empty) in each row of the packed layout; combine_packed(outputs [R, H], state,
      (G, S, H)) -> [G, S, H].
  ragged_rows(E) -> (row_token [M], group_sizes [E], state): dropless rows sorted by expert;
      they combine with combine_packed. kept_choices() -> expert ids, gates [G, S, k]: the
      same for dropless expert parallelism (expert_parallel.py), -1 / 0 where not kept.
  token_weights(E) -> [G, S, E]: each token's combine weight per expert (sparse attention,
      switchhead.py, mixes the experts' projections with it).
  record(admitted, kept, probs, slots) -> expert, gate, status [G, S, R]: each token's
      assignments for the routing records (status KEPT / DROPPED / SKIPPED / UNUSED).
  """
  kind: str


@struct.dataclass
class TokenChoiceRouting:
  """Each token's k choices, in choice order (choice 0 is the token's top expert).

  Attributes:
    expert_index: [G, S, k] int32, the chosen experts.
    combine_weights: [G, S, k] float32, gate of each choice; 0 where the assignment was dropped.
    position: [G, S, k] int32, slot of the assignment in its expert's buffer for this group
      (assignments are queued by priority: all first choices before all second choices).
      Meaningful only where `kept`.
    kept: [G, S, k] bool, the assignment survived padding, random routing and capacity.
  """
  expert_index: Array
  combine_weights: Array
  position: Array
  kept: Array
  kind = "token_choice"

  def einsum_weights(self, num_experts: int, capacity: int, dtype) -> Tuple[Array, Array]:
    slots = (jax.nn.one_hot(self.expert_index, num_experts, dtype=dtype)[..., None]
             * jax.nn.one_hot(self.position, capacity, dtype=dtype)[..., None, :]
             * self.kept[..., None, None].astype(dtype))  # [G, S, k, E, C]
    combine = jnp.einsum("gskec,gsk->gsec", slots, self.combine_weights.astype(dtype))
    return jnp.sum(slots, axis=2), combine

  def slot_tokens(self, num_experts: int, capacity: int) -> Tuple[Array, Any]:
    """Each assignment's slot e·C + position [G, S, k] (E·C when dropped) and each slot's
    token [G, E·C] (S when empty)."""
    g, s, _ = self.expert_index.shape
    slots = num_experts * capacity
    rows = jnp.where(self.kept, self.expert_index * capacity + self.position,
                     slots).astype(jnp.int32)
    token = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], rows.shape[1:])
    slot_token = jax.vmap(lambda r: jnp.full((slots,), s, jnp.int32).at[r.ravel()].set(
        token.ravel(), mode="drop"))(rows)
    return slot_token, (rows, slot_token)

  def combine_slots(self, outputs: Array, state: Any) -> Array:
    rows, slot_token = state
    return jax.vmap(_combine_rows)(outputs, self.combine_weights, rows, slot_token)

  def packed_rows(self, num_experts: int, capacity: int) -> Tuple[Array, Array, Any]:
    """Expert e's kept assignments of all groups packed at the front of its G·C rows."""
    g = self.expert_index.shape[0]
    counts_ge = self._kept_per_group_expert(num_experts)
    base = jnp.arange(num_experts, dtype=jnp.int32) * (g * capacity)
    row_token, state = self._rows(counts_ge, base, num_experts * g * capacity)
    return row_token, jnp.sum(counts_ge, axis=0), state

  def ragged_rows(self, num_experts: int) -> Tuple[Array, Array, Any]:
    """All kept assignments sorted by expert: expert e owns rows [start_e, start_e + load_e),
    start = exclusive cumsum of the loads; within it, group by group in queue order (the
    router's queue positions already rank assignments within (group, expert): no sort)."""
    counts_ge = self._kept_per_group_expert(num_experts)
    load = jnp.sum(counts_ge, axis=0)
    base = (jnp.cumsum(load) - load).astype(jnp.int32)
    row_token, state = self._rows(counts_ge, base, self.kept.size)
    return row_token, load.astype(jnp.int32), state

  def combine_packed(self, outputs: Array, state: Any, x_shape) -> Array:
    """y[g, s] = Σ_j w[g, s, j] · outputs[rows[g, s, j]]."""
    rows, row_token = state
    g, s, k = rows.shape
    y = _combine_rows(outputs, self.combine_weights.reshape(g * s, k), rows.reshape(g * s, k),
                      row_token)
    return y.reshape(g, s, -1)

  def token_weights(self, num_experts: int) -> Array:
    """[G, S, E]: each token's combine weight per expert (0 where not chosen or not kept)."""
    one_hot = jax.nn.one_hot(self.expert_index, num_experts, dtype=self.combine_weights.dtype)
    return jnp.einsum("gske,gsk->gse", one_hot, self.combine_weights)

  def kept_choices(self) -> Tuple[Array, Array]:
    """Each token's k choices for dropless expert parallelism: expert ids [G, S, k] (-1 where
    not kept) and gates (0 there)."""
    return (jnp.where(self.kept, self.expert_index, -1).astype(jnp.int32),
            jnp.where(self.kept, self.combine_weights, 0.0))

  def record(self, admitted: Array, kept: Array, probs: Array, slots: int):
    del kept, probs, slots  # the k choices are the record
    chose = jnp.take_along_axis(admitted, self.expert_index, axis=-1) > 0
    status = jnp.where(self.kept, KEPT, jnp.where(chose, DROPPED, SKIPPED))
    return self.expert_index, self.combine_weights, status

  def _kept_per_group_expert(self, num_experts: int) -> Array:
    """[G, E] int32 count of kept assignments."""
    one_hot = jax.nn.one_hot(self.expert_index, num_experts, dtype=jnp.int32)
    return jnp.sum(one_hot * self.kept[..., None], axis=(1, 2))

  def _rows(self, counts_ge: Array, base: Array, num_rows: int) -> Tuple[Array, Any]:
    """Row of each assignment in an expert-major layout of `num_rows` rows starting at
    base[e]: base[e] + Σ_{g'<g} counts[g', e] + position; dropped ones get `num_rows` (out of
    bounds: gathers read zero, scatters drop). Returns each row's token [num_rows] (G·S where
    empty) and the combine state (rows [G, S, k], row_token)."""
    g, s, _ = self.expert_index.shape
    group_offset = jnp.cumsum(counts_ge, axis=0) - counts_ge  # [G, E], exclusive over groups
    start = base[None, :] + group_offset  # [G, E]
    start = jnp.take_along_axis(start[:, None, :], self.expert_index, axis=2)  # [G, S, k]
    rows = jnp.where(self.kept, start + self.position, num_rows).astype(jnp.int32)
    token = jnp.broadcast_to(jnp.arange(g * s, dtype=jnp.int32).reshape(g, s, 1), rows.shape)
    row_token = jnp.full((num_rows,), g * s, jnp.int32).at[rows.ravel()].set(
        token.ravel(), mode="drop")
    return row_token, (rows, row_token)


@struct.dataclass
class ExpertChoiceRouting:
  """Each expert's C chosen tokens of a group, best first.

  Attributes:
    token_index: [G, E, C] int32, index into the group's S tokens.
    combine_weights: [G, E, C] float32, router prob of (token, expert); 0 where not `valid`.
    valid: [G, E, C] bool, False where the slot holds a padding token.
    group_size: S (static).
  """
  token_index: Array
  combine_weights: Array
  valid: Array
  group_size: int = struct.field(pytree_node=False)
  kind = "expert_choice"

  def einsum_weights(self, num_experts: int, capacity: int, dtype) -> Tuple[Array, Array]:
    del num_experts, capacity  # the decision's own [G, E, C]
    s = self.group_size
    slots = (jax.nn.one_hot(self.token_index, s, dtype=dtype)
             * self.valid[..., None].astype(dtype))  # [G, E, C, S]
    dispatch = jnp.transpose(slots, (0, 3, 1, 2))
    return dispatch, dispatch * self.combine_weights[:, None].astype(dtype)

  def slot_tokens(self, num_experts: int, capacity: int) -> Tuple[Array, Any]:
    del num_experts, capacity
    g = self.token_index.shape[0]
    slot_token = jnp.where(self.valid, self.token_index, self.group_size).reshape(g, -1)
    return slot_token, slot_token

  def combine_slots(self, outputs: Array, state: Any) -> Array:
    g, s = outputs.shape[0], self.group_size
    weights = self.combine_weights.reshape(g, -1).astype(outputs.dtype)
    add = lambda o, st, w: jnp.zeros((s, o.shape[-1]), o.dtype).at[st].add(
        o * w[:, None], mode="drop")
    return jax.vmap(add)(outputs, state, weights)

  def packed_rows(self, num_experts: int, capacity: int) -> Tuple[Array, None, Any]:
    """Slot (e, g·C + c) holds token token_index[g, e, c] (of all G·S)."""
    del capacity
    g, s = self.token_index.shape[0], self.group_size
    cap = self.token_index.shape[-1]
    slot_token = self.token_index + (jnp.arange(g, dtype=jnp.int32) * s)[:, None, None]
    slot_token = jnp.where(self.valid, slot_token, g * s)  # [G, E, C]
    slot_token = jnp.transpose(slot_token, (1, 0, 2)).reshape(num_experts * g * cap)
    return slot_token, None, slot_token

  def token_weights(self, num_experts: int) -> Array:
    """[G, S, E]: each token's combine weight per expert that took it (0 elsewhere)."""
    g = self.token_index.shape[0]
    gi = jnp.arange(g)[:, None, None]
    ei = jnp.arange(num_experts)[None, :, None]
    return jnp.zeros((g, self.group_size, num_experts), self.combine_weights.dtype).at[
        gi, self.token_index, ei].add(jnp.where(self.valid, self.combine_weights, 0.0))

  def ragged_rows(self, num_experts: int):
    raise ValueError("expert choice has a fixed capacity by construction: dispatch='dropless' "
                     "does not apply.")

  def combine_packed(self, outputs: Array, state: Any, x_shape) -> Array:
    g, s, h = x_shape
    weights = jnp.transpose(self.combine_weights, (1, 0, 2)).reshape(-1, 1)
    y = jnp.zeros((g * s, h), outputs.dtype).at[state].add(
        outputs * weights.astype(outputs.dtype), mode="drop")
    return y.reshape(g, s, h)

  def record(self, admitted: Array, kept: Array, probs: Array, slots: int):
    """The R = min(E, slots) experts with the largest gates among those that took the token."""
    del admitted
    gates = jnp.where(kept > 0, probs, -1.0)
    gate, expert = jax.lax.top_k(gates, min(probs.shape[-1], slots))
    chosen = gate >= 0
    return jnp.where(chosen, expert, -1), jnp.maximum(gate, 0.0), jnp.where(chosen, KEPT, UNUSED)

# ---------------------------------------------------------------------------------------------
# Dispatchers: the data movement, the same for every decision.
# ---------------------------------------------------------------------------------------------
class EinsumDispatcher:
  """GShard-style dispatch and combine with dense weights (the readable reference).

      inputs[e, g, c] = Σ_s dispatch[g, s, e, c] · x[g, s]
      y[g, s]         = Σ_{e,c} combine[g, s, e, c] · outputs[e, g, c]

  One-hot for token and expert choice; Soft MoE's weights are its softmaxes.
  """
  name = "einsum"

  def dispatch(self, x: Array, routing: Routing, num_experts: int,
               capacity: Optional[int]) -> Tuple[ExpertBatch, Any]:
    dispatch_weights, combine = routing.einsum_weights(num_experts, capacity, x.dtype)
    inputs = jnp.einsum("gsec,gsh->gech", dispatch_weights, x)
    return ExpertBatch(to_experts(inputs)), combine

  def combine(self, outputs: Array, state: Any, routing: Routing, x_shape) -> Array:
    combine = state
    return jnp.einsum("gsec,gech->gsh", combine, from_experts(outputs, combine.shape[0]))


class GatherDispatcher:
  """Index-based dispatch into capacity buffers [E, G·C, H]; no [G, S, E, C] tensors.

  packed (grouped=False): the decision's `packed_rows` (token choice: each expert's kept
  assignments from all groups packed at the front of its buffer, so `counts[e]` tells the
  experts how many leading slots are in use).
  grouped=True: group g owns slots [g·C, (g+1)·C) of every expert; all index work is per
  group (vmapped gathers), so it stays on the group's device, and `to_experts` /
  `from_experts` move the buffers (all-to-all on a mesh). No counts: slots are not packed.
  """
  name = "gather"

  def __init__(self, grouped: bool = False):
    self.grouped = grouped

  def dispatch(self, x: Array, routing: Routing, num_experts: int,
               capacity: Optional[int]) -> Tuple[ExpertBatch, Any]:
    g, s, h = x.shape
    if self.grouped:
      slot_token, state = routing.slot_tokens(num_experts, capacity)
      buffers = jax.vmap(_gather_rows)(x, slot_token)  # [G, E·C, H]
      return ExpertBatch(to_experts(buffers.reshape(g, num_experts, -1, h))), state
    row_token, counts, state = routing.packed_rows(num_experts, capacity)
    inputs = _gather_rows(x.reshape(g * s, h), row_token).reshape(num_experts, -1, h)
    return ExpertBatch(inputs, counts=counts), state

  def combine(self, outputs: Array, state: Any, routing: Routing, x_shape) -> Array:
    if self.grouped:
      out = from_experts(outputs, x_shape[0]).reshape(x_shape[0], -1, outputs.shape[-1])
      return routing.combine_slots(out, state)  # out: [G, E·C, H]
    return routing.combine_packed(outputs.reshape(-1, outputs.shape[-1]), state, x_shape)


class DroplessDispatcher:
  """No capacity: all kept assignments, sorted by expert, in one ragged array [T·k, H]
  (the decision's `ragged_rows`) for a grouped matmul."""
  name = "dropless"

  def dispatch(self, x: Array, routing: Routing, num_experts: int,
               capacity: Optional[int]) -> Tuple[ExpertBatch, Any]:
    g, s, h = x.shape
    row_token, group_sizes, state = routing.ragged_rows(num_experts)
    return ExpertBatch(_gather_rows(x.reshape(g * s, h), row_token),
                       group_sizes=group_sizes), state

  def combine(self, outputs: Array, state: Any, routing: Routing, x_shape) -> Array:
    return routing.combine_packed(outputs, state, x_shape)


def make_dispatcher(name: str, grouped: bool = False):
  """The dispatcher called `name`; grouped: the layout for a device mesh (see module doc)."""
  if name not in DISPATCH_NAMES:
    raise ValueError(f"dispatch must be one of {DISPATCH_NAMES}, got {name!r}.")
  if name == "gather":
    return GatherDispatcher(grouped)
  if name == "dropless" and grouped:
    raise ValueError("dispatch='dropless' with the grouped layout is expert parallelism: "
                     "moe_layer runs it through expert_parallel.py, not a dispatcher.")
  return {"einsum": EinsumDispatcher, "dropless": DroplessDispatcher}[name]()
