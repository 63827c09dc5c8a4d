"""Multi-head latent attention (MLA; DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

Keys and values come from one compressed latent per token, plus one small rotary key that
all heads share:

    c_q  = RMSNorm(x W_dq)              [B, L, R_q]   (q_lora_rank; None: q = x W_q directly)
    q    = c_q W_uq                     [B, L, N, Dn + Dr]  -> q_nope [.., Dn], q_rope [.., Dr]
    c_kv, k_r = split(x W_dkv)          [B, L, R_kv], [B, L, Dr]   (kv_lora_rank, rope dim)
    c_kv = RMSNorm(c_kv)
    k_nope, v = split(c_kv W_ukv)       [B, L, N, Dn], [B, L, N, Dv]
    q_rope, k_r ← RoPE(q_rope, k_r)     k_r is one head, broadcast to all N
    a    = softmax([q_nope, q_rope] · [k_nope, k_r]ᵀ / √(Dn + Dr) + mask) v
    y    = a W_o                        [B, L, H]

Decoding caches only c_kv and the rotated k_r, (R_kv + Dr) numbers per token instead of
2·N·D, and attends in the latent space: W_uk is absorbed into the query and W_uv applied
after the mix,

    logits = (q_nope W_ukᵀ) · c_kvᵀ + q_rope · k_rᵀ        (no per-head keys are formed)
    a      = (softmax(logits / √(Dn + Dr)) c_kv) W_uv,

which equals the expanded form above (tested: cached decoding = the full pass). With YaRN
(`rope_scaling`) the softmax scale is multiplied by m(factor, mscale_all_dim)², as DeepSeek's. The cache
reuses `Attention`'s (cached_key = k_r, cached_value = c_kv, each with one "head").

Rotary layout: ours is rotate-half. DeepSeek's checkpoints rotate interleaved pairs; the
Hugging Face converter permutes those weight columns so that the dot products are the same
(moe_jax/interop/deepseek.py).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.attention import Attention, attention_mask
from moe_jax.dense import RMSNorm

Array = jax.Array


class LatentAttention(Attention):
  """MLA as an attention factory (`Decoder.attention_layer = @LatentAttention`).

  Params (logical axes): q_down [H, R_q] (embed, latent), q_norm, q_up [R_q, N, Dn + Dr]
  (latent, heads, kv) — or query [H, N, Dn + Dr] without q_lora_rank —; kv_down
  [H, R_kv + Dr] (embed, latent), kv_norm, kv_up [R_kv, N, Dn + Dv] (latent, heads, kv);
  out [N, Dv, H] (heads, kv, embed).
  """
  q_lora_rank: Optional[int] = None
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  sizes_own_heads = True  # the Decoder does not derive a head_dim from d_model for it

  def __post_init__(self):
    if self.num_kv_heads not in (None, self.num_heads):
      raise ValueError(f"LatentAttention has no kv heads to group (every head reads the "
                       f"shared latent): num_kv_heads must be None or num_heads, got "
                       f"{self.num_kv_heads}.")
    if self.head_dim is not None:
      raise ValueError("LatentAttention sizes its heads with qk_nope_head_dim, "
                       f"qk_rope_head_dim and v_head_dim; head_dim must be None, got "
                       f"{self.head_dim}.")
    if self.rope_theta is None:
      raise ValueError("LatentAttention needs rope_theta (its decoupled key is rotary).")
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"qk_rope_head_dim must be even (rotary pairs), got "
                       f"{self.qk_rope_head_dim}.")
    if self.q_lora_rank is not None and self.q_lora_rank < 1:
      raise ValueError(f"q_lora_rank must be >= 1 or None, got {self.q_lora_rank}.")
    if self.qkv_bias or self.out_bias or self.qk_norm != "none":
      raise ValueError("LatentAttention has no qkv_bias, out_bias or qk_norm (its latents are "
                       f"normed instead); got qkv_bias={self.qkv_bias}, out_bias="
                       f"{self.out_bias}, qk_norm={self.qk_norm!r}.")
    super().__post_init__()

  @property
  def _softmax_scale(self) -> float:
    """YaRN's m(factor, mscale_all_dim)², which DeepSeek applies to all of q·k."""
    return 1.0 if self.rope_scaling is None else self.rope_scaling.softmax_scale

  def _latent_norm(self, x: Array, name: str) -> Array:
    return RMSNorm(self.norm_epsilon, self.dtype, scale_axis="latent", name=name)(x)

  @nn.compact
  def __call__(self, x: Array, *, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None, prefix_mask: Optional[Array] = None,
               padding_mask: Optional[Array] = None, position_bias: Optional[Array] = None,
               deterministic: bool = True, decode: bool = False) -> Array:
    """As `Attention.__call__` (x [B, L, H] -> [B, L, H])."""
    del padding_mask
    if position_bias is not None:
      raise ValueError("LatentAttention takes no position_bias (its positions are rotary).")
    x = x.astype(self.dtype)
    batch, length, h = x.shape
    n, dn, dr, dv = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
    r = self.kv_lora_rank
    if self.q_lora_rank is None:
      w_q = self.kernel("query", (h, n, dn + dr), ("embed", "heads", "kv"), 0, (1, 2))
      q = jnp.einsum("blh,hnd->blnd", x, w_q)
    else:
      c_q = x @ self.kernel("q_down", (h, self.q_lora_rank), ("embed", "latent"))
      w_q = self.kernel("q_up", (self.q_lora_rank, n, dn + dr), ("latent", "heads", "kv"),
                         0, (1, 2))
      q = jnp.einsum("blr,rnd->blnd", self._latent_norm(c_q, "q_norm"), w_q)
    q_nope, q_rope = q[..., :dn], q[..., dn:]
    kv = x @ self.kernel("kv_down", (h, r + dr), ("embed", "latent"))
    latent, k_rope = self._latent_norm(kv[..., :r], "kv_norm"), kv[..., r:]
    w_kv = self.kernel("kv_up", (r, n, dn + dv), ("latent", "heads", "kv"), 0, (1, 2))
    w_uk, w_uv = w_kv[..., :dn], w_kv[..., dn:]

    query_index = jnp.broadcast_to(jnp.arange(length), (batch, length))
    if not decode:
      positions = query_index if positions is None else positions
      q_rope = self._rotate(q_rope, positions)
      k_rope = self._rotate(k_rope[:, :, None, :], positions)  # [B, L, 1, Dr]
      k_nope = jnp.einsum("blr,rnd->blnd", latent, w_uk)
      value = jnp.einsum("blr,rnd->blnd", latent, w_uv)
      key = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (batch, length, n, dr))], -1)
      mask = attention_mask(query_index, query_index, query_segments=segment_ids,
                            key_segments=segment_ids, query_prefix=prefix_mask,
                            key_prefix=prefix_mask)
      out = self.mix(jnp.concatenate([q_nope, q_rope], -1), key, value, mask,
                     deterministic=deterministic, logit_scale=self._softmax_scale)
      return self.output(out, h)

    if segment_ids is not None:
      raise ValueError("segment_ids (packing) are not supported with decode=True.")
    # The latent cache: cached_key holds the rotated k_r, cached_value the normed c_kv.
    k_rope, latent, key_index, key_valid, key_prefix, offset = self._update_cache(
        k_rope[:, :, None, :], latent[:, :, None, :], prefix_mask)
    query_index = query_index + offset
    q_rope = self._rotate(q_rope, query_index)
    mask = attention_mask(query_index, key_index, query_prefix=prefix_mask,
                          key_prefix=key_prefix, key_valid=key_valid)  # [B, 1, L, M]
    # In latent space this is multi-query attention: queries [q_nope W_ukᵀ, q_rope] against
    # the one cached "head" [c_kv, k_r], reading values c_kv; `mix` scales by its
    # 1/√(R_kv + Dr), so the factor restores MLA's 1/√(Dn + Dr).
    q_latent = jnp.einsum("blnd,rnd->blnr", q_nope, w_uk)
    out_latent = self.mix(
        jnp.concatenate([q_latent, q_rope], -1), jnp.concatenate([latent, k_rope], -1),
        latent, mask, deterministic=deterministic,
        logit_scale=((r + dr) / (dn + dr)) ** 0.5 * self._softmax_scale)
    return self.output(jnp.einsum("blnr,rnd->blnd", out_latent, w_uv), h)

  def score_flops(self, seq_len: int, d_model: int) -> float:
    """Per token and layer: q·k over Dn + Dr and a·v over Dv (the expanded form)."""
    del d_model
    return 2.0 * self.num_heads * seq_len * (self.qk_nope_head_dim + self.qk_rope_head_dim
                                             + self.v_head_dim)
