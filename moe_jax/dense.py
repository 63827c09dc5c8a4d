"""The dense pieces around the MoE layer: RMSNorm, token embedding, the dense FFN.

Every parameter carries Flax logical axis names (embed, vocab, mlp) so that the
partitioning rules of a preset place it on the mesh.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.experts import ACTIVATIONS, check_activation

Array = jax.Array


def dense_init():
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x²) + ε) · scale, computed in float32 (as T5, Llama and Mixtral).

  scale_axis: the logical axis of `scale` ("kv" for a per-head QK norm, "latent" for MLA's
  compressed vectors)."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  scale_axis: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.scale_axis,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """y = (x − mean) / sqrt(var + ε) · scale + bias, in float32 (NLLB-MoE, BART, fairseq)."""
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (x.shape[-1],)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       features, jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      features, jnp.float32)
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
                                + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding [V, H]; `attend` gives tied output logits x Eᵀ."""
  vocab_size: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (self.vocab_size, self.features), jnp.float32)

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    return jnp.einsum("blh,vh->blv", x, self.embedding.astype(self.dtype))


class MlpBlock(nn.Module):
  """Dense FFN: act(x wi) wo, or (act(x wi_gate) ⊙ x wi) wo for swiglu / geglu.

  Weights wi, wi_gate [H, F] and wo [F, H]; the same names and gating convention as the
  experts, so a dense FFN of width k·F is the MoE layer's ideal-work equivalent.
  """
  hidden_dim: int
  activation: str = "swiglu"
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  use_bias: bool = False  # wi_bias [F] (and wi_gate_bias), wo_bias [H]: NLLB-MoE's FFNs

  def __post_init__(self):
    check_activation(self.activation)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    act, gated = ACTIVATIONS[self.activation]
    h = x.shape[-1]

    def weight(name, shape, axes):
      init = nn.with_logical_partitioning(dense_init(), axes)
      return self.param(name, init, shape, jnp.float32).astype(self.dtype)

    def bias(name, size, axis):
      if not self.use_bias:
        return 0
      init = nn.with_logical_partitioning(nn.initializers.zeros, (axis,))
      return self.param(name, init, (size,), jnp.float32).astype(self.dtype)

    x = x.astype(self.dtype)
    w_in = weight("wi", (h, self.hidden_dim), ("embed", "mlp"))
    b_in = bias("wi_bias", self.hidden_dim, "mlp")
    if gated:
      w_gate = weight("wi_gate", (h, self.hidden_dim), ("embed", "mlp"))
      hidden = act(x @ w_gate + bias("wi_gate_bias", self.hidden_dim, "mlp")) * (x @ w_in + b_in)
    else:
      hidden = act(x @ w_in + b_in)
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    return hidden @ weight("wo", (self.hidden_dim, h), ("mlp", "embed")) + bias("wo_bias", h,
                                                                                "embed")
