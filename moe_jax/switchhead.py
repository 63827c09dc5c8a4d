"""SwitchHead (Csordás et al. 2023): attention whose value and output projections are experts.

Per head h of N (head width D; E experts per head, k chosen per token and side):
    q_h = x W_q[h],  k_h = x W_k[h]                        dense, as in multi-head attention
    s_h = σ(x W_s[h])                [E]   source routing: the key/value token's own
    v_h = Σ_{e ∈ top_k(s_h)} s_h[e] · x W_v[e, :, h]
    a_h = softmax(q_h k_hᵀ / √D + mask) v_h
    d_h = σ(x W_d[h])                [E]   destination routing: the query token's own
    y   = Σ_h Σ_{e ∈ top_k(d_h)} d_h[e] · a_h W_o[e, h]
With k = E and every gate 1 this is multi-head attention with W_v[h] = Σ_e W_v[e, :, h] and
W_o[h] = Σ_e W_o[e, h] (tests/test_switchhead.py checks it, and the layer against numpy).

Routing reuses the router contract: each head has its own source and destination router (by
default a `TokenChoiceRouter` with sigmoid scores, the paper's; any causal router whose decision
answers `token_weights` will do), called with E and no capacity, so no choice is ever dropped.
The routers' losses, metrics and records are the FFN layer's, over 2·N routing groups per
sequence (source and destination, each head): the records number the experts of side s, head
h as (s·N + h)·E + e, so the analyses see 2·N·E experts. A token's routing depends on itself
alone: the layer is causal, and the decoding cache holds the mixed values. Padding tokens
(`padding_mask` 0) are routed nowhere, as in the FFN layer: their values and outputs are 0.

Compute: this implementation evaluates all E value and output experts and weights them by the
gates (zero off the chosen k): E× the projection FLOPs of the paper's CUDA kernel. The
parameter counter counts the k / E that the math uses.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.attention import Attention
from moe_jax.moe_layer import ROUTING_RECORDS, MoeAux, routing_metrics, routing_record
from moe_jax.routing import Router, RouterOutput, SparseSublayer, TokenChoiceRouter

Array = jax.Array


def default_router() -> Router:
  return TokenChoiceRouter(num_selected_experts=2, score_function="sigmoid")


class SwitchHeadAttention(SparseSublayer, Attention):
  """Multi-head attention with E value experts and E output experts per head (module doc).

  Attributes (besides Attention's; num_kv_heads must be None or num_heads):
    num_experts: E, experts per head and side.
    router: the routers' template (None: top-2 sigmoid token choice); each head and side
      gets its own copy and weights.
  Params: query, key [H, N, D] as in Attention; value [E, H, N, D] and out [E, N, D, H]
  (logical axes attention_expert, embed, heads, kv); source_router_h / destination_router_h.
  """
  num_experts: int = 4
  router: Optional[Router] = None

  def __post_init__(self):
    if self.num_kv_heads not in (None, self.num_heads):
      raise ValueError(f"SwitchHeadAttention routes every head's values: num_kv_heads must be "
                       f"None or num_heads={self.num_heads}, got {self.num_kv_heads}.")
    if self.qkv_bias:
      raise ValueError("SwitchHeadAttention has no biases: set qkv_bias=False.")
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}.")
    router = default_router() if self.router is None else self.router
    object.__setattr__(self, "router", router.clone(parent=None, name=None))
    self.router.check_num_experts(self.num_experts)
    super().__post_init__()

  # The sparse sub-layer protocol (routing.SparseSublayer): routed without capacity; its own
  # logical axis for the few experts per head, replicated by the standard rules (they are
  # small, and the heads already split over the model axis).
  expert_axis = "attention_expert"

  @property
  def recorded_experts(self) -> int:
    return 2 * self.num_heads * self.num_experts  # (side · N + head) · E + e

  # --- the layer --------------------------------------------------------------------------
  @nn.compact
  def __call__(self, x: Array, *, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None, prefix_mask: Optional[Array] = None,
               padding_mask: Optional[Array] = None, position_bias: Optional[Array] = None,
               deterministic: bool = True, decode: bool = False) -> Tuple[Array, MoeAux]:
    """x [B, L, H] -> (y [B, L, H], MoeAux of both sides' routing)."""
    x = x.astype(self.dtype)
    batch, length, h = x.shape
    n, e, d = self.num_heads, self.num_experts, self.head_size(h)
    mask = (jnp.ones((batch, length), jnp.float32) if padding_mask is None
            else padding_mask.astype(jnp.float32))
    source, source_gates = self._route("source", x, mask, deterministic)
    destination, destination_gates = self._route("destination", x, mask, deterministic)

    def values():  # [B, L, N, D]: each head's gated mixture of its value experts
      w_v = self.param("value", nn.with_logical_partitioning(
          _expert_init(in_axis=1, out_axis=(2, 3)), (self.expert_axis, "embed", "heads", "kv")),
          (e, h, n, d), jnp.float32)
      return switchhead_values(x, w_v.astype(self.dtype), source_gates.astype(self.dtype))

    out = self.attend(x, values, positions=positions, segment_ids=segment_ids,
                      prefix_mask=prefix_mask, position_bias=position_bias,
                      deterministic=deterministic, decode=decode)
    w_o = self.param("out", nn.with_logical_partitioning(
        _expert_init(in_axis=(1, 2), out_axis=3), (self.expert_axis, "heads", "kv", "embed")),
        (e, n, d, h), jnp.float32)
    y = switchhead_output(out, w_o.astype(self.dtype), destination_gates.astype(self.dtype))
    return y, self._aux(source, destination, mask)

  def _route(self, side: str, x: Array, mask: Array, deterministic: bool
             ) -> Tuple[RouterOutput, Array]:
    """Each head's router on the B sequences (groups); -> stacked outputs [N, B, L, ...] and
    the dense gates [B, L, N, E] (0 off the chosen experts)."""
    outs = [self.router.clone(parent=self, name=f"{side}_router_{head}")(
        x, mask, self.num_experts, None, deterministic) for head in range(self.num_heads)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    gates = jnp.stack([o.routing.token_weights(self.num_experts) for o in outs], axis=2)
    return stacked, gates

  def _aux(self, source: RouterOutput, destination: RouterOutput, mask: Array) -> MoeAux:
    """Losses averaged over the 2·N routers; metrics and records over 2·N·B routing groups."""
    both = jax.tree.map(lambda s, t: jnp.concatenate([s, t]), source, destination)
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]) if a.ndim > 2 else a, both)
    routers = 2 * self.num_heads
    flat_mask = jnp.tile(mask, (routers, 1))
    if self.is_mutable_collection(ROUTING_RECORDS) and not self.is_initializing():
      self.sow(ROUTING_RECORDS, "record", _per_token(routing_record(flat, flat_mask), routers,
                                                     self.num_experts))
    return MoeAux(aux_loss=jnp.mean(both.aux_loss), z_loss=jnp.mean(both.z_loss),
                  metrics=routing_metrics(flat, flat_mask, None))


def switchhead_values(x: Array, w_value: Array, gates: Array) -> Array:
  """v[b, l, n] = Σ_e gates[b, l, n, e] · x[b, l] W_v[e, :, n]: x [B, L, H], w_value [E, H, N, D],
  gates [B, L, N, E] -> [B, L, N, D]."""
  return jnp.einsum("blh,ehnd,blne->blnd", x, w_value, gates)


def switchhead_output(heads: Array, w_out: Array, gates: Array) -> Array:
  """y[b, l] = Σ_{n,e} gates[b, l, n, e] · a[b, l, n] W_o[e, n]: heads [B, L, N, D],
  w_out [E, N, D, H], gates [B, L, N, E] -> [B, L, H]."""
  return jnp.einsum("blnd,blne,endh->blh", heads, gates, w_out)


def _expert_init(in_axis, out_axis):
  # Fan-in per expert: the expert axis 0 is a batch axis.
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=(0,))


def _per_token(record, routers: int, num_experts: int):
  """Records of 2·N routers over [2·N·B, L, ...] -> one record per token [B, L, ...]: each
  router's choices side by side, experts numbered (router · E + e)."""
  def split(a):
    return a.reshape((routers, -1) + a.shape[1:])  # [2N, B, L, ...]

  def side_by_side(a):  # [2N, B, L, R] -> [B, L, 2N·R]
    return jnp.moveaxis(a, 0, 2).reshape(a.shape[1:3] + (-1,))

  offset = (jnp.arange(routers, dtype=jnp.int32) * num_experts)[:, None, None, None]
  expert, top_expert = split(record["expert"]), split(record["top_expert"])
  return {
      "expert": side_by_side(jnp.where(expert >= 0, expert + offset, -1)),
      "gate": side_by_side(split(record["gate"])),
      "status": side_by_side(split(record["status"])),
      "top_expert": side_by_side(top_expert + offset),
      "top_prob": side_by_side(split(record["top_prob"])),
      "entropy": jnp.mean(split(record["entropy"]), axis=0),
      "num_chosen": jnp.sum(split(record["num_chosen"]), axis=0),
  }
