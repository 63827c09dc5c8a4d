"""Soft MoE (Puigcerver et al. 2023): every slot is a soft mixture of the group's tokens.

One file: the router and its routing decision, on the router contract (routing.Router) and the
einsum dispatcher (dispatch.py), with the layer's experts unchanged. For a group X [S, H],
E experts of p slots each and slot parameters Φ [H, E, p]:

    logits[s, e, j] = x̂_s · (σ · Φ̂[:, e, j])     x̂, Φ̂ l2-normalised (§2.3), σ a learned scale
    D = softmax over the S tokens of logits      slot (e, j) = Σ_s D[s, e, j] · x_s
    C = softmax over the E·p slots of logits     y_s = Σ_{e,j} C[s, e, j] · expert_e(slot (e, j))

These are exactly the einsum dispatcher's dispatch and combine weights, so `dispatch='einsum'`
is the only dispatch. Nothing is dropped; padding tokens feed no slot and get output 0. Every
output mixes every token of the group: not causal, and it shows each position its future, so
causal (decoder-only) models refuse it (`mixes_tokens`); it is for encoders and ViTs.
Capacity: the slots per expert are the router's `slots_per_expert` (fixed by Φ's shape), not
the layer's capacity factor; the `capacity` metric reports them. Per token the experts apply
E·p / S times on average (the parameter counter's k). Balanced by construction: no aux loss,
and no z-loss (the paper uses neither). A routing group is the layer's (`group_size`, or one
sequence): with packed sequences or a group_size spanning rows, slots mix tokens of different
examples, as they do in Soft MoE's image batches; give each example its own group where that
matters. No preset uses it yet: the shipped models are decoder-only, which refuse it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.dispatch import KEPT, UNUSED
from moe_jax.routing import Router, RouterOutput

Array = jax.Array


@struct.dataclass
class SoftRouting:
  """dispatch_weights, combine_weights: [G, S, E, p] (module docstring); 0 on padding."""
  dispatch_weights: Array
  combine_weights: Array
  kind = "soft"

  def einsum_weights(self, num_experts: int, capacity: Optional[int], dtype
                     ) -> Tuple[Array, Array]:
    del num_experts, capacity  # the decision's own E and p
    return self.dispatch_weights.astype(dtype), self.combine_weights.astype(dtype)

  def token_weights(self, num_experts: int) -> Array:
    del num_experts
    return jnp.sum(self.combine_weights, axis=-1)

  def record(self, admitted: Array, kept: Array, probs: Array, slots: int):
    """The R = min(E, slots) experts with the largest combine weight (summed over their p
    slots) for each token."""
    del admitted, kept, probs
    weight = self.token_weights(0)
    gate, expert = jax.lax.top_k(weight, min(weight.shape[-1], slots))
    used = gate > 0  # padding tokens have no weight
    return jnp.where(used, expert, -1), gate, jnp.where(used, KEPT, UNUSED)


class SoftRouter(Router):
  """Soft MoE's slots (module docstring).

  Attributes:
    slots_per_expert: p.
    normalize: l2-normalise tokens and slot parameters with a learned scale (the paper's
      choice for large models); False: raw dot products.
  """
  slots_per_expert: int = 1
  normalize: bool = True
  kind = "soft"
  dispatches = ("einsum",)
  mixes_tokens = True

  def is_causal(self, dropless: bool) -> bool:
    return False

  def __post_init__(self):
    if self.slots_per_expert < 1:
      raise ValueError(f"slots_per_expert must be >= 1, got {self.slots_per_expert}.")
    super().__post_init__()

  def check_num_experts(self, num_experts: int) -> None:
    del num_experts  # any E >= 1 (the layer checks that): every expert gets its own slots

  def experts_per_token(self, num_experts: int, group_size: int) -> float:
    return num_experts * self.slots_per_expert / group_size

  def expert_capacity(self, capacity: Optional[int]) -> int:
    del capacity
    return self.slots_per_expert

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array], num_experts: int,
               capacity: Optional[int], deterministic: bool) -> RouterOutput:
    del capacity, deterministic  # own slots; no training-only randomness
    g, s, h = x.shape
    p = self.slots_per_expert
    mask = (jnp.ones((g, s), jnp.float32) if padding_mask is None
            else padding_mask.astype(jnp.float32))
    x = x.astype(jnp.float32)
    phi = self.param("slots", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), ("embed", None, None)),
        (h, num_experts, p), jnp.float32)
    if self.normalize:
      scale = self.param("scale", nn.initializers.ones, (), jnp.float32)
      x = _l2_normalize(x, axis=-1)
      phi = scale * _l2_normalize(phi, axis=0)
    logits = jnp.einsum("gsh,hep->gsep", x, phi, precision=jax.lax.Precision.HIGHEST)
    real = mask[..., None, None] > 0
    # Dispatch: softmax over the group's real tokens (padding feeds no slot).
    dispatch = jax.nn.softmax(jnp.where(real, logits, -jnp.inf), axis=1)
    dispatch = jnp.where(real, dispatch, 0.0)  # a group of padding only: no NaN
    # Combine: softmax over all E·p slots; padding tokens get no output.
    combine = jax.nn.softmax(logits.reshape(g, s, -1), axis=-1).reshape(logits.shape)
    combine = jnp.where(real, combine, 0.0)
    probs = jnp.sum(combine, axis=-1)  # [G, S, E]: each expert's share of the token's output
    everyone = jnp.broadcast_to(mask[..., None], probs.shape)
    zero = jnp.zeros((), jnp.float32)
    return RouterOutput(
        routing=SoftRouting(dispatch_weights=dispatch, combine_weights=combine),
        logits=jax.nn.logsumexp(logits, axis=-1), probs=probs, selected=everyone,
        admitted=everyone, kept=everyone, aux_loss=zero, z_loss=zero)


def _l2_normalize(x: Array, axis: int, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)
