"""Position encodings added outside the attention (RoPE lives in attention.py): T5's relative
position buckets, a learned per-head bias shared by a stack, and fairseq's sinusoids."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """T5's bucket of each relative position (key − query), in numpy float32 as T5 computes it.

  Causal: n = max(query − key, 0); bidirectional: half the buckets for keys after the query,
  n = |key − query|. Buckets 0 … b/2−1 (b the buckets of a side) are exact distances, the
  rest log-spaced up to max_distance; farther saturates at the last bucket.
  """
  rel = np.asarray(relative_position, np.int64)
  bucket = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    bucket += (rel > 0) * num_buckets
    n = np.abs(rel)
  else:
    n = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  # (n < max_exact takes the exact bucket; the clip only keeps log away from 0 there)
  large = max_exact + (np.log(np.maximum(n, 1).astype(np.float32) / max_exact)
                       / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return bucket + np.where(n < max_exact, n, large)


class RelativePositionBias(nn.Module):
  """bias [B, N, Lq, Lk] = table[bucket(key − query)], one learned scalar per head and bucket.

  Buckets come from a static lookup over key − query clipped to ±max_distance (farther ones
  saturate), so the bucketing is exactly T5's float arithmetic and works with traced query
  positions (the decoding cache's offset).
  """
  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    """query_positions [B, Lq], key_positions [B, Lk] (int) -> [B, N, Lq, Lk] float32."""
    table = self.param("rel_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), jnp.float32)
    distances = np.arange(-self.max_distance, self.max_distance + 1)
    lookup = jnp.asarray(relative_position_bucket(
        distances, self.bidirectional, self.num_buckets, self.max_distance), jnp.int32)
    rel = key_positions[:, None, :] - query_positions[:, :, None]
    buckets = lookup[jnp.clip(rel, -self.max_distance, self.max_distance) + self.max_distance]
    return jnp.moveaxis(table[:, buckets], 0, 1)  # [N, B, Lq, Lk] -> [B, N, Lq, Lk]


def sinusoidal_positions(positions: Array, features: int) -> Array:
  """[sin | cos] of positions [B, L] at frequencies 10000^(−i / (F/2 − 1)), i < F/2 (fairseq's
  table, as NLLB-MoE and M2M-100 add it to the scaled token embeddings) -> [B, L, F] float32."""
  half = features // 2
  inv_freq = jnp.exp(jnp.arange(half, dtype=jnp.float32)
                     * jnp.float32(-math.log(10000.0) / (half - 1)))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(table, ((0, 0), (0, 0), (0, features % 2)))
