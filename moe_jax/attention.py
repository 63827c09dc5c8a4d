"""Multi-head / grouped-query self-attention with rotary positions, masks and a KV cache.

    q = x Wq [B, L, N, D]     k, v = x Wk, x Wv [B, L, K, D]    (K kv heads; N % K == 0)
    q, k ← RoPE(q, k, positions)
    a = softmax(q kᵀ / √D + mask) v        query head n reads kv head n // (N / K)
    y = a Wo [B, L, H]

RoPE follows the "rotate half" convention of GPT-NeoX, Llama and Mixtral (the first and
second halves of each head are the two coordinates of a rotated pair), with inverse
frequencies θ^(−2i/D): Hugging Face checkpoints load without permuting Wq, Wk.

QK norm (`qk_norm`): RMSNorm of the queries and keys before RoPE, over each head's D
("head": Qwen3, one scale [D] shared by the heads) or over the whole projection ("full": OLMoE,
scales [N·D] and [K·D]), with the model's ε.

Positions: RoPE at `rope_theta` (optionally extended by YaRN, `rope_scaling`), or none (rope_theta=None) with an additive `position_bias`
[B or 1, N, Lq, Lk] from the caller (T5's relative position buckets, shared by a whole stack:
`moe_jax/encoder_decoder.py`).

Masks (`attention_mask`): causal; optionally bidirectional among the positions flagged by
`prefix_mask` (prefix LM, UL2 inputs); optionally restricted to one packed segment.

Decoding: with `decode=True` the keys and values go into a fixed-size cache (collection
"cache": cached_key, cached_value [B, max_length, K, D], cache_index). A call with L new
tokens writes them at cache_index and attends over the whole cache, so one code path
serves the prefill (L = prompt length) and every step (L = 1). The caller keeps
cache_index + L within the cache size (`decoding.generate` sizes it exactly); past the end,
`dynamic_update_slice` would clamp and overwrite the last slots.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.dense import RMSNorm, dense_init

Array = jax.Array
_NEG_INF = -1e30
QK_NORMS = ("none", "head", "full")


@dataclasses.dataclass(frozen=True)
class YarnScaling:
  """YaRN (Peng et al. 2023) context extension of RoPE, as DeepSeek-V2/V3 and Qwen ship it.

  Frequencies: θ_i = θ^(−2i/D); dimensions that rotate fewer than beta_slow times over the
  original context are interpolated (θ_i / factor), those that rotate more than beta_fast times
  are kept, a linear ramp between (bounds floored / ceiled when `truncate`). cos and sin are
  scaled by `attention_factor` (default m(factor, mscale) / m(factor, mscale_all_dim) when both
  are set, else m(factor), with m(s, a) = 0.1 · a · ln s + 1); MLA also multiplies its softmax
  scale by m(factor, mscale_all_dim)² (`softmax_scale`).
  """
  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: Optional[float] = None
  mscale_all_dim: Optional[float] = None
  attention_factor: Optional[float] = None
  truncate: bool = True

  def __post_init__(self):
    if not self.factor >= 1.0:
      raise ValueError(f"YaRN's factor must be >= 1, got {self.factor}.")
    if self.original_max_position_embeddings < 1:
      raise ValueError("YaRN's original_max_position_embeddings must be >= 1, got "
                       f"{self.original_max_position_embeddings}.")

  @staticmethod
  def _m(scale: float, a: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * a * math.log(scale) + 1.0

  @property
  def cos_sin_scale(self) -> float:
    if self.attention_factor is not None:
      return float(self.attention_factor)
    if self.mscale and self.mscale_all_dim:
      return self._m(self.factor, self.mscale) / self._m(self.factor, self.mscale_all_dim)
    return self._m(self.factor)

  @property
  def softmax_scale(self) -> float:
    return self._m(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

  def inv_freq(self, dim: int, theta: float) -> Array:
    def correction(rotations):  # the dimension that rotates `rotations` times
      return dim * math.log(self.original_max_position_embeddings
                            / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction(self.beta_fast), correction(self.beta_slow)
    if self.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    base = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    keep = 1.0 - jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    return base / self.factor * (1.0 - keep) + base * keep


def rotary_embedding(x: Array, positions: Array, theta: float = 10000.0,
                     scaling: Optional[YarnScaling] = None) -> Array:
  """RoPE on x [B, L, N, D] at integer positions [B, L] (rotate-half convention), in float32;
  `scaling`: YaRN's frequencies and cos/sin scale."""
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {d}.")
  if scaling is None:
    inv_freq, magnitude = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)), 1.0
  else:
    inv_freq, magnitude = scaling.inv_freq(d, theta), scaling.cos_sin_scale
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, D]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * (jnp.cos(angles) * magnitude)
          + rotated * (jnp.sin(angles) * magnitude)).astype(x.dtype)


def attention_mask(query_index: Array, key_index: Array, *,
                   query_segments: Optional[Array] = None, key_segments: Optional[Array] = None,
                   query_prefix: Optional[Array] = None, key_prefix: Optional[Array] = None,
                   key_valid: Optional[Array] = None) -> Array:
  """Boolean [B, 1, Lq, Lk]: may query i attend to key j?

  allowed = (j ≤ i  or  (prefix_i and prefix_j))  and  segment_i == segment_j  and  valid_j
  Indices are positions in the (packed) row, not the per-segment positions used by RoPE.
  """
  allowed = key_index[:, None, :] <= query_index[:, :, None]
  if query_prefix is not None:
    allowed |= query_prefix[:, :, None].astype(bool) & key_prefix[:, None, :].astype(bool)
  if query_segments is not None:
    allowed &= query_segments[:, :, None] == key_segments[:, None, :]
  if key_valid is not None:
    allowed &= key_valid[:, None, :].astype(bool)
  return allowed[:, None, :, :]


class Attention(nn.Module):
  """Self-attention with N query heads and K kv heads (K = N: multi-head; K < N: GQA).

  Params (logical axes): query [H, N, D] (embed, heads, kv), key / value [H, K, D]
  (embed, kv_heads, kv), out [N, D, H] (heads, kv, embed); optional biases (Qwen2).
  """
  num_heads: int
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  rope_theta: Optional[float] = 10000.0   # None: no rotary embedding
  rope_scaling: Optional[YarnScaling] = None
  qkv_bias: bool = False
  out_bias: bool = False   # a bias [H] on the output projection (NLLB-MoE)
  qk_norm: str = "none"    # "head" (Qwen3) or "full" (OLMoE): module docstring
  norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    kv = self.num_kv_heads or self.num_heads
    if self.num_heads < 1 or kv < 1 or self.num_heads % kv:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must be >= 1 and divide "
                       f"num_heads={self.num_heads}.")
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}.")
    if self.rope_scaling is not None and self.rope_theta is None:
      raise ValueError("rope_scaling (YaRN) extends rotary embeddings; it needs rope_theta.")
    super().__post_init__()

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def head_size(self, d_model: int) -> int:
    return self.head_dim or d_model // self.num_heads

  def score_flops(self, seq_len: int, d_model: int) -> float:
    """Forward FLOPs per token of q·kᵀ and a·v over `seq_len` keys (PaLM's convention)."""
    return 4.0 * self.num_heads * self.head_size(d_model) * seq_len

  @nn.compact
  def __call__(self, x: Array, *, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None, prefix_mask: Optional[Array] = None,
               padding_mask: Optional[Array] = None, position_bias: Optional[Array] = None,
               deterministic: bool = True, decode: bool = False) -> Array:
    """x [B, L, H]; positions [B, L] (RoPE; default 0..L-1); segment_ids, prefix_mask [B, L];
    position_bias [B or 1, N, L, L (the cache length when decoding)] added to the logits.

    padding_mask is for sparse subclasses (their routing statistics); plain attention masks
    by segments and ignores it.
    """
    del padding_mask
    x = x.astype(self.dtype)
    out = self.attend(x, lambda: self.project(x, "value", self.kv_heads,
                                              ("embed", "kv_heads", "kv")),
                      positions=positions, segment_ids=segment_ids, prefix_mask=prefix_mask,
                      position_bias=position_bias, deterministic=deterministic,
                      decode=decode)  # [B, L, N, D]
    return self.output(out, x.shape[-1])

  def output(self, out: Array, h: int) -> Array:
    """The heads' outputs [B, L, N, D] -> [B, L, H] through `out` [N, D, H] (+ out_bias)."""
    w_out = self.param("out", nn.with_logical_partitioning(dense_init(), ("heads", "kv", "embed")),
                       (self.num_heads, out.shape[-1], h), jnp.float32)
    y = jnp.einsum("blnd,ndh->blh", out, w_out.astype(self.dtype))
    if self.out_bias:
      y = y + self.param("out_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, ("embed",)), (h,), jnp.float32).astype(self.dtype)
    return y

  def project(self, x: Array, name: str, heads: int, axes) -> Array:
    """x [B, L, H] -> [B, L, heads, D] through the param `name` [H, heads, D] (+ bias)."""
    h = x.shape[-1]
    kernel = self.kernel(name, (h, heads, self.head_size(h)), axes, out_axis=(1, 2))
    y = jnp.einsum("blh,hnd->blnd", x, kernel)
    if self.qkv_bias:
      bias = self.param(name + "_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, axes[1:]), (heads, self.head_size(h)), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y

  def kernel(self, name: str, shape, axes, in_axis=0, out_axis=-1) -> Array:
    """A float32 projection param in the activation dtype, initialised by its fan-in alone
    (the default axes would count the heads of [H, N, D] as a receptive field)."""
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.float32).astype(self.dtype)

  def attend(self, x: Array, values: Callable[[], Array], *, positions, segment_ids,
             prefix_mask, deterministic: bool, decode: bool,
             position_bias: Optional[Array] = None) -> Array:
    """The heads' outputs a [B, L, N, D] = softmax(q kᵀ / √D + mask) v, before the output
    projection. `values()` gives v [B, L, K, D]; it is called after the query and key
    projections (parameter creation order fixes the initial values)."""
    batch, length, _ = x.shape
    n, k = self.num_heads, self.kv_heads
    q = self._norm(self.project(x, "query", n, ("embed", "heads", "kv")), "query_norm")
    key = self._norm(self.project(x, "key", k, ("embed", "kv_heads", "kv")), "key_norm")
    value = values()

    query_index = jnp.broadcast_to(jnp.arange(length), (batch, length))
    if positions is None:
      positions = query_index
    key_index, key_valid, key_segments, key_prefix = query_index, None, segment_ids, prefix_mask
    if decode:
      key, value, key_index, key_valid, key_prefix, offset = self._update_cache(
          key, value, prefix_mask)
      query_index = query_index + offset
      positions = query_index  # decoding: one unpacked sequence per row
      if segment_ids is not None:
        raise ValueError("segment_ids (packing) are not supported with decode=True.")
    q = self._rotate(q, positions)
    if not decode:
      key = self._rotate(key, positions)
    mask = attention_mask(query_index, key_index, query_segments=segment_ids,
                          key_segments=key_segments, query_prefix=prefix_mask,
                          key_prefix=key_prefix, key_valid=key_valid)
    return self.mix(q, key, value, mask, deterministic=deterministic,
                    position_bias=position_bias)

  def mix(self, q: Array, key: Array, value: Array, mask: Array, *, deterministic: bool,
          position_bias: Optional[Array] = None, empty_reads_nothing: bool = False,
          logit_scale: float = 1.0) -> Array:
    """softmax(q kᵀ / √D + position_bias + mask) v: q [B, L, N, D], key [B, M, K, D], value
    [B, M, K, Dv], mask [B, 1, L, M] -> [B, L, N, Dv]. empty_reads_nothing: a query whose mask allows no key
    gets 0 (not a uniform mix of masked keys). logit_scale multiplies 1/√D."""
    batch, length, n, d = q.shape
    k = key.shape[2]
    # Grouped heads: q [B, L, K, N/K, D] so that query head n reads kv head n // (N/K).
    q = q.reshape(batch, length, k, n // k, d)
    logits = jnp.einsum("blkgd,bmkd->bkglm", q, key).astype(jnp.float32) * (d**-0.5
                                                                             * logit_scale)
    if position_bias is not None:  # [B or 1, N, L, M] -> the grouped heads' [.., K, N/K, L, M]
      logits = logits + position_bias.astype(jnp.float32).reshape(
          (position_bias.shape[0], k, n // k) + position_bias.shape[2:])
    logits = jnp.where(mask[:, :, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    if empty_reads_nothing:
      probs = probs * jnp.any(mask, axis=-1, keepdims=True)[:, :, None]
    probs = nn.Dropout(self.dropout_rate)(probs.astype(self.dtype), deterministic=deterministic)
    return jnp.einsum("bkglm,bmkd->blkgd", probs, value).reshape(batch, length, n, -1)

  def _norm(self, x: Array, name: str) -> Array:
    """The QK norm of x [B, L, heads, D] (module docstring)."""
    if self.qk_norm == "none":
      return x
    norm = RMSNorm(self.norm_epsilon, self.dtype, scale_axis="kv", name=name)
    if self.qk_norm == "head":
      return norm(x)
    return norm(x.reshape(x.shape[:2] + (-1,))).reshape(x.shape)

  def _rotate(self, x: Array, positions: Array) -> Array:
    return x if self.rope_theta is None else rotary_embedding(x, positions, self.rope_theta,
                                                               self.rope_scaling)

  def _update_cache(self, key: Array, value: Array, prefix_mask: Optional[Array]):
    """Writes the new keys (rotated) and values at cache_index; returns the full cache."""
    batch, length, k, d = key.shape
    initialized = self.has_variable("cache", "cached_key")
    # At init the call's own length sets the cache size (flax's convention: init with
    # [B, max_length] dummy tokens); nothing is written then.
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cached_prefix = self.variable("cache", "cached_prefix", jnp.zeros, key.shape[:2], jnp.bool_)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    max_length = cached_key.value.shape[1]
    offset = index.value if initialized else jnp.zeros((), jnp.int32)
    positions = offset + jnp.broadcast_to(jnp.arange(length), (batch, length))
    key = self._rotate(key, positions)
    if initialized:
      if length > max_length:
        raise ValueError(f"{length} tokens do not fit the decoding cache of {max_length}.")
      start = (0, offset, 0, 0)
      cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
      cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
      flags = (jnp.zeros((batch, length), jnp.bool_) if prefix_mask is None
               else prefix_mask.astype(jnp.bool_))
      cached_prefix.value = jax.lax.dynamic_update_slice(cached_prefix.value, flags, (0, offset))
      index.value = offset + length
      key, value = cached_key.value, cached_value.value
      key_prefix = cached_prefix.value
    else:
      key_prefix = (jnp.zeros((batch, length), jnp.bool_) if prefix_mask is None
                    else prefix_mask.astype(jnp.bool_))
    key_index = jnp.broadcast_to(jnp.arange(key.shape[1]), (batch, key.shape[1]))
    key_valid = key_index < offset + length
    return key, value, key_index, key_valid, key_prefix, offset
