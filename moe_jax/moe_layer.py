"""The sparse MoE layer: groups, capacity, router + dispatcher + experts, metrics.

    x [B, L, H] -> tokens [G, S, H] (groups of `group_size` tokens)
      router     -> who goes where (routing.py)
      dispatcher -> tokens into expert buffers (dispatch.py)
      experts    -> E FFNs (experts.py)
      dispatcher -> weighted outputs back to tokens
    -> y [B, L, H], MoeAux(aux_loss, z_loss, metrics)

Routing and capacity are per group. The layer returns its losses unweighted: the model
weights them into the total loss (aux_loss_weight, router_z_loss_weight).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import dispatch as dispatch_lib
from moe_jax import expert_parallel
from moe_jax.experts import Experts, check_activation, check_implementation
from moe_jax.dispatch import DROPPED, KEPT, SKIPPED, UNUSED  # pylint: disable=unused-import
from moe_jax.routing import Router, RouterOutput, SparseSublayer, compute_capacity

Array = jax.Array

# The collection a layer writes its per-token routing record to when the caller makes it
# mutable (`apply(..., mutable=[ROUTING_RECORDS])`, as moe_jax.analysis's recorder does);
# otherwise nothing is computed or stored.
ROUTING_RECORDS = "routing_records"


@struct.dataclass
class MoeAux:
  """What one MoE layer reports besides its output.

  aux_loss: load-balancing loss (SPEC §2), unweighted.
  z_loss: router z-loss, unweighted.
  metrics: dict of scalars and per-expert [E] vectors, padding excluded:
    dropped_fraction        assignments that queued for a slot and found none (capacity)
    random_routing_skipped_fraction  selections skipped by GShard random routing
    unrouted_token_fraction real tokens that reached no expert (their MoE output is 0)
    expert_load_before      [E] assignments per expert chosen by the router (all groups)
    expert_load_after       [E] the same after capacity
    router_entropy          mean over tokens of −Σ_e p_e log p_e
    router_confidence       mean over tokens of max_e p_e
    capacity                slots per expert per group (0 for dropless)
    overflow_fraction       dropless expert parallelism with a bounded receive buffer: the
                            assignments that did not fit it (0 otherwise; not in dropped_fraction)
  """
  aux_loss: Array
  z_loss: Array
  metrics: Dict[str, Array]


LAYOUTS = ("packed", "grouped")


def routing_metrics(out: RouterOutput, padding_mask: Array, capacity: Optional[int],
                    overflow: Optional[Array] = None) -> Dict[str, Array]:
  """Per-layer routing statistics over real tokens (padding_mask [G, S], 1 = real)."""
  mask = padding_mask.astype(jnp.float32)
  tokens = jnp.maximum(jnp.sum(mask), 1.0)
  selected = jnp.sum(out.selected * mask[..., None], axis=(0, 1))
  admitted = jnp.sum(out.admitted * mask[..., None], axis=(0, 1))
  kept = jnp.sum(out.kept * mask[..., None], axis=(0, 1))
  routed = jnp.sum(out.kept, axis=-1) > 0
  p = out.probs
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return {
      # Written as (a − b) / a so that a batch without real tokens reports 0, not 1.
      "dropped_fraction": jnp.sum(admitted - kept) / jnp.maximum(jnp.sum(admitted), 1.0),
      "random_routing_skipped_fraction":
          jnp.sum(selected - admitted) / jnp.maximum(jnp.sum(selected), 1.0),
      "unrouted_token_fraction": jnp.sum(mask * (1.0 - routed)) / tokens,
      "expert_load_before": selected,
      "expert_load_after": kept,
      "router_entropy": jnp.sum(entropy * mask) / tokens,
      "router_confidence": jnp.sum(jnp.max(p, axis=-1) * mask) / tokens,
      "capacity": jnp.asarray(capacity or 0, jnp.int32),
      "overflow_fraction": (jnp.zeros((), jnp.float32) if overflow is None else
                            overflow.astype(jnp.float32) / jnp.maximum(jnp.sum(admitted), 1.0)),
  }


def routing_record(out: RouterOutput, padding_mask: Array, top_probs: int = 8,
                   expert_choice_slots: int = 8) -> Dict[str, Array]:
  """Per-token routing of one layer, for analysis (fields as moe_jax/analysis/records.py).

  Returns arrays [G, S, ...]: expert / gate / status [G, S, R] (token choice: the k choices in
  choice order, R = k; expert choice: the R = min(E, expert_choice_slots) experts with the
  largest gates among those that took the token), top_expert / top_prob [G, S, P] (the P =
  min(E, top_probs) largest router probabilities), entropy [G, S] and num_chosen [G, S].
  Padding tokens get status UNUSED.
  """
  num_experts = out.probs.shape[-1]
  real = padding_mask > 0
  expert, gate, status = out.routing.record(out.admitted, out.kept, out.probs,
                                            expert_choice_slots)
  status = jnp.where(real[..., None], status, UNUSED)
  top_prob, top_expert = jax.lax.top_k(out.probs, min(num_experts, top_probs))
  p = out.probs
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return {"expert": expert.astype(jnp.int32), "gate": gate.astype(jnp.float32),
          "status": status.astype(jnp.int32), "top_expert": top_expert.astype(jnp.int32),
          "top_prob": top_prob, "entropy": entropy,
          "num_chosen": jnp.sum(out.selected, axis=-1).astype(jnp.int32)}


class MoeLayer(SparseSublayer, nn.Module):
  """Sparse mixture-of-experts feed-forward layer.

  Attributes:
    router: any `routing.Router` (token choice, expert choice, `soft_moe.SoftRouter`, …); the
      layer tells it E and the capacity at each call.
    num_experts: E.
    expert_hidden_dim: F, the hidden width of each expert.
    activation: one of relu, gelu, swiglu, geglu.
    dispatch: one of einsum, gather (default), dropless.
    train_capacity_factor / eval_capacity_factor: cf in training / when `deterministic`.
    min_capacity: lower bound on C (small groups would otherwise round to 0 or 1 slot).
    group_size: S, tokens per routing group; None: one group per sequence.
    pad_groups: if the tokens don't split into whole groups, pad the last group with padding
      tokens (which take no capacity) instead of raising.
    expert_dropout_rate: dropout on the experts' hidden units (training only).
    expert_bias: biases in the expert projections (NLLB-MoE); plain reference kernels.
    token_dropout_rate: NLLB-MoE's `moe_token_dropout` p as transformers applies it: dropout on
      the layer's output in training (rescaled by 1 / (1 − p), as any dropout) and the output
      scaled by (1 − p) in evaluation — an evaluation output (1 − p) times the training
      expectation, which NLLB-MoE checkpoints were converted to expect.
    dtype: activation/computation dtype of the experts (the router is always float32).
    expert_implementation: "auto" (fastest for the backend), "reference" (plain batched einsum
      / lax.ragged_dot) or "loop" (custom-VJP loops over experts); see experts.py. With
      layout="grouped" and a capacity dispatch, "auto" means "reference": a loop over an
      expert axis split across devices would gather every expert's weights to every device.
    layout: how tokens are laid out for the experts (set from the mesh by the run's gin:
      runs/pretrain.gin derives MOE_LAYOUT from MESH, so operative_config.gin shows it).
      "packed": one device; each expert's rows from all groups are contiguous.
      "grouped": a device mesh; every group's rows stay on its device until an all-to-all
      (gather, einsum) or dropless expert parallelism in shard_map (expert_parallel.py)
      moves them to the experts' devices. Both compute the same function.
    num_expert_partitions: devices the experts are split over (the size of the mesh axes of
      the logical `expert` axis, as flaxformer's field of that name); num_experts must
      divide evenly. Dropless expert parallelism splits its exchange by it (and checks it
      against the mesh); partitioning.validate checks it for the grouped layout.
    transport: dropless expert parallelism's transport (expert_parallel.TRANSPORTS).
    receive_buffer_factor: dropless expert parallelism: None (each device's receive buffer
      holds the worst case: nothing is ever dropped) or f >= 1, a buffer of f times the even
      share of rows; what does not fit is counted in the `overflow_fraction` metric.
  """
  router: Router
  num_experts: int
  expert_hidden_dim: int
  activation: str = "relu"
  dispatch: str = "gather"
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  group_size: Optional[int] = None
  pad_groups: bool = False
  expert_dropout_rate: float = 0.0
  expert_bias: bool = False
  token_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  expert_implementation: str = "auto"
  layout: str = "packed"
  num_expert_partitions: int = 1
  transport: str = "auto"
  receive_buffer_factor: Optional[float] = None

  def __post_init__(self):
    check_activation(self.activation)
    dispatch_lib.make_dispatcher(self.dispatch)  # validates the name
    check_implementation(self.expert_implementation)
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}.")
    expert_parallel.check_transport(self.transport)
    expert_parallel.check_receive_buffer_factor(self.receive_buffer_factor)
    for name in ("train_capacity_factor", "eval_capacity_factor"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}.")
    if not 0.0 <= self.expert_dropout_rate < 1.0:
      raise ValueError(f"expert_dropout_rate must be in [0, 1), got {self.expert_dropout_rate}.")
    if not 0.0 <= self.token_dropout_rate < 1.0:
      raise ValueError(f"token_dropout_rate must be in [0, 1), got {self.token_dropout_rate}.")
    if self.min_capacity < 0:
      raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}.")
    if self.group_size is not None and self.group_size < 1:
      raise ValueError(f"group_size must be >= 1 or None, got {self.group_size}.")
    if self.expert_hidden_dim < 1:
      raise ValueError(f"expert_hidden_dim must be >= 1, got {self.expert_hidden_dim}.")
    # Each layer owns a fresh unbound copy of its router. Flax binds a module passed as a
    # field to the first parent that uses it: one router instance handed to several layers
    # (a factory, a gin binding) would silently share its weights, and one built inside a
    # parent's compact method would belong to that parent rather than to this layer.
    object.__setattr__(self, "router", self.router.clone(parent=None, name=None))
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}.")
    self.router.check_num_experts(self.num_experts)
    if self.num_expert_partitions < 1 or self.num_experts % self.num_expert_partitions:
      raise ValueError(
          f"num_experts={self.num_experts} must be divisible by num_expert_partitions="
          f"{self.num_expert_partitions} (the expert-parallel mesh axis); choose a number of "
          f"experts that is a multiple of it, or a smaller expert axis.")
    if self.dispatch not in self.router.dispatches:
      raise ValueError(
          f"dispatch={self.dispatch!r} does not apply to {type(self.router).__name__} "
          f"(kind {self.router.kind!r}); it supports dispatch in {self.router.dispatches}.")
    super().__post_init__()

  @property
  def dropless(self) -> bool:
    return self.dispatch == "dropless"

  def routing_group_size(self, seq_len: int) -> int:
    return self.group_size or seq_len

  def capacity(self, group_size: int, deterministic: bool) -> Optional[int]:
    """Slots per expert per group, or None when dropless."""
    if self.dispatch == "dropless":
      return None
    cf = self.eval_capacity_factor if deterministic else self.train_capacity_factor
    return self.router.expert_capacity(compute_capacity(
        group_size, self.num_experts, self.router.experts_per_token(self.num_experts, group_size),
        cf, self.min_capacity))

  def _groups(self, num_tokens: int, seq_len: int) -> Tuple[int, int]:
    """(group size S, number of padding tokens to append)."""
    s = self.group_size or seq_len
    remainder = num_tokens % s
    if remainder == 0:
      return s, 0
    if not self.pad_groups:
      raise ValueError(
          f"group_size={s} does not divide the {num_tokens} tokens of the batch; choose a "
          "group_size that divides batch × length, or set pad_groups=True.")
    return s, s - remainder

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array] = None,
               deterministic: bool = True) -> Tuple[Array, MoeAux]:
    """x: [B, L, H]; padding_mask: [B, L], 1 for real tokens (from the data, not inferred).

    `deterministic` is a Python bool (static under jit): True for evaluation (eval capacity
    factor, no noise, no expert dropout, no bias update), False for training.
    """
    x = jnp.asarray(x)
    if x.ndim != 3:
      raise ValueError(f"MoeLayer expects x of shape [batch, length, d_model], got {x.shape}.")
    batch, seq_len, h = x.shape
    if padding_mask is not None and tuple(padding_mask.shape) != (batch, seq_len):
      raise ValueError(f"padding_mask must have shape [batch, length] = {(batch, seq_len)}, "
                       f"got {tuple(padding_mask.shape)}.")
    num_tokens = batch * seq_len
    s, pad = self._groups(num_tokens, seq_len)
    tokens = x.reshape(num_tokens, h)
    mask = (jnp.ones((num_tokens,), jnp.float32) if padding_mask is None
            else padding_mask.reshape(num_tokens).astype(jnp.float32))
    if pad:
      tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
      mask = jnp.pad(mask, (0, pad))
    groups = tokens.reshape(-1, s, h)
    mask = mask.reshape(-1, s)

    # On a mesh the groups are split like the batch (the grouped layouts keep them there).
    groups = nn.with_logical_constraint(groups, ("group", None, "act_embed"))
    grouped = self.layout == "grouped"
    capacity = self.capacity(s, deterministic)
    routed = self.router(groups, mask, self.num_experts, capacity, deterministic)
    # Initialisation only creates the parameters (the same ones either way): it needs no mesh.
    ep_dropless = grouped and self.dispatch == "dropless" and not self.is_initializing()
    implementation = self.expert_implementation
    if grouped and not ep_dropless and implementation == "auto":
      implementation = "reference"
    experts = Experts(self.num_experts, self.expert_hidden_dim, self.activation,
                      self.expert_dropout_rate, self.dtype, implementation=implementation,
                      use_bias=self.expert_bias, name="experts")
    overflow = None
    if ep_dropless:
      expert_index, gates = routed.routing.kept_choices()
      distribute = functools.partial(
          expert_parallel.expert_parallel_dropless, x=groups.astype(self.dtype),
          expert_index=expert_index, gates=gates, num_experts=self.num_experts,
          expert_partitions=self.num_expert_partitions, transport=self.transport,
          receive_buffer_factor=self.receive_buffer_factor)
      y, overflow = experts(None, deterministic, model_dim=h, distribute=distribute)
    else:
      dispatcher = dispatch_lib.make_dispatcher(
          self.dispatch, grouped=grouped and self.dispatch != "dropless")
      expert_batch, state = dispatcher.dispatch(groups.astype(self.dtype), routed.routing,
                                                self.num_experts, capacity)
      outputs = experts(expert_batch, deterministic)
      y = dispatcher.combine(outputs, state, routed.routing, groups.shape)
    y = y.reshape(-1, h)[:num_tokens].reshape(batch, seq_len, h).astype(x.dtype)
    if self.token_dropout_rate and deterministic:
      y = y * (1 - self.token_dropout_rate)
    elif self.token_dropout_rate:
      y = nn.Dropout(self.token_dropout_rate)(y, deterministic=False)
    # Not at init (which makes every collection mutable): records are never variables.
    if self.is_mutable_collection(ROUTING_RECORDS) and not self.is_initializing():
      record = routing_record(routed, mask)
      self.sow(ROUTING_RECORDS, "record", jax.tree.map(
          lambda a: a.reshape((-1,) + a.shape[2:])[:num_tokens].reshape(
              (batch, seq_len) + a.shape[2:]), record))
    aux = MoeAux(aux_loss=routed.aux_loss, z_loss=routed.z_loss,
                 metrics=routing_metrics(routed, mask, capacity, overflow))
    return y, aux
