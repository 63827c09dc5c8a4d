"""The objectives as functions of one token sequence: causal LM, prefix LM, span corruption.

Each returns `(inputs, targets)` for a decoder-only model that sees them concatenated
(`tasks/feature_converter.py`), with the loss on `targets` only. Shapes are [n] int32; seeds
are stateless `[2]` int32 pairs (seqio hands one per example), so a seed gives the same
example on every run and host.

Span corruption follows T5 (Raffel et al. 2020, `random_spans_noise_mask`), the denoisers of
UL2 (Tay et al. 2022) are span corruption or prefix LM plus a mode token:

    num_noise   = clip(round(n · r), 1, n − 1)             r: corruption rate
    num_spans   = clip(round(num_noise / μ), 1, n − num_noise)   μ: mean span length
    noise and non-noise tokens are each cut into num_spans non-empty runs, uniformly at
    random among all such cuts, and interleaved starting with non-noise:
        tokens  = a0 b0 a1 b1 … a_{k−1} b_{k−1}        (a: kept, b: noise)
        inputs  = [mode] a0 s0 a1 s1 … a_{k−1} s_{k−1}
        targets = s0 b0 s1 b1 … s_{k−1} b_{k−1} EOS
    where s_i is the i-th sentinel (the vocabulary's extra id i, counted from the top).

So |inputs| + |targets| = n + 2k + 2 (with a mode token): `chunk_length` inverts this, so that
chunks of that length never exceed the packed sequence — the length budget includes the mode
token and every sentinel (OpenMoE prepended its mode token after budgeting and trimmed the last
sentinel). Prefix LM: inputs = [mode] tokens[:k], targets = tokens[k:], k ~ Uniform{1..n−1};
no EOS is added, since chunks are cut from a stream of documents that already carry their EOS
(`tasks/preprocessors.py`), and an EOS at an arbitrary cut would teach the model to stop there.

Rounding: n · r and num_noise / μ are rounded half-to-even in float64, in the graph and in the
Python budget alike, so both agree exactly. (T5 computes in float32, which differs at a few
lengths: n = 30, r = 0.15 gives 5 noise tokens there, 4 here; `num_spans <= n − num_noise` is
our guard for μ near 1, where T5 would fail.)
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import tensorflow as tf

EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One objective of the mixture of denoisers.

  Attributes:
    name: task-name suffix ("r3", "x64_15", "s", "span_corruption", "lm").
    mode_token: "[NLU]", "[NLG]", "[S2S]" or None (plain T5 span corruption, causal LM).
    mean_span_length: μ for span corruption; None for prefix LM / causal LM.
    corruption_rate: r for span corruption; None otherwise.
    prefix_lm: split at a uniform position into inputs (prefix) and targets (suffix).
  """
  name: str
  mode_token: Optional[str] = None
  mean_span_length: Optional[float] = None
  corruption_rate: Optional[float] = None
  prefix_lm: bool = False

  def __post_init__(self):
    if self.prefix_lm and self.mean_span_length is not None:
      raise ValueError(f"Denoiser {self.name!r}: prefix_lm and span corruption are exclusive.")
    if (self.mean_span_length is None) != (self.corruption_rate is None):
      raise ValueError(f"Denoiser {self.name!r}: set both mean_span_length and "
                       "corruption_rate, or neither.")
    if self.mean_span_length is not None and not self.mean_span_length >= 1:
      raise ValueError(f"Denoiser {self.name!r}: mean_span_length must be >= 1, "
                       f"got {self.mean_span_length}.")
    if self.corruption_rate is not None and not 0 < self.corruption_rate < 1:
      raise ValueError(f"Denoiser {self.name!r}: corruption_rate must be in (0, 1), "
                       f"got {self.corruption_rate}.")

  @property
  def is_span_corruption(self) -> bool:
    return self.mean_span_length is not None

  @property
  def is_causal_lm(self) -> bool:
    return not self.prefix_lm and not self.is_span_corruption

  def num_spans(self, n: int) -> int:
    """Noise spans in a chunk of n tokens (0 unless span corruption)."""
    if not self.is_span_corruption or n < 2:
      return 0
    return num_noise_spans(n, self.corruption_rate, self.mean_span_length)

  def packed_length(self, n: int) -> int:
    """|inputs| + |targets| for a chunk of n tokens."""
    extra = int(self.mode_token is not None)
    if self.is_causal_lm:
      return n  # documents' EOS are part of the stream the chunks are cut from
    if self.prefix_lm:
      return n + extra
    return n + 2 * self.num_spans(n) + extra + 1  # + EOS closing the targets

  def chunk_length(self, sequence_length: int) -> int:
    """The longest chunk whose example fits `sequence_length` (packed_length is monotone)."""
    n = sequence_length
    while n > 0 and self.packed_length(n) > sequence_length:
      n -= 1
    if n < 2:
      raise ValueError(f"Denoiser {self.name!r}: sequence length {sequence_length} is too "
                       "short for any example.")
    return n


def num_noise_spans(n: int, corruption_rate: float, mean_span_length: float) -> int:
  """Python mirror of the graph's span count (see module docstring)."""
  num_noise = min(max(round(n * corruption_rate), 1), n - 1)
  return min(max(round(num_noise / mean_span_length), 1), n - num_noise)


# --- Graph functions. ------------------------------------------------------------------------


def random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor,
                        seed: tf.Tensor) -> tf.Tensor:
  """Lengths of `num_segments` non-empty runs summing to `num_items`, uniformly at random.

  Picks which num_segments − 1 of the num_items − 1 gaps between items start a new run
  (a uniformly random subset), as T5 does. Returns [num_segments] int32.
  """
  gaps = tf.range(num_items - 1)
  ranks = tf.argsort(tf.random.stateless_uniform([num_items - 1], seed=seed))
  is_cut = tf.cast(tf.gather(gaps < num_segments - 1, ranks), tf.int32)
  segment_id = tf.cumsum(tf.concat([[0], is_cut], axis=0))
  return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def noise_span_lengths(length: tf.Tensor, corruption_rate: float, mean_span_length: float,
                       seeds: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """(non-noise run lengths, noise run lengths), each [num_spans], for `length` >= 2 tokens."""
  n = tf.cast(length, tf.float64)
  num_noise = tf.cast(tf.round(n * corruption_rate), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_span_length), tf.int32)
  num_spans = tf.clip_by_value(num_spans, 1, length - num_noise)
  noise = random_segmentation(num_noise, num_spans, seeds[0])
  kept = random_segmentation(length - num_noise, num_spans, seeds[1])
  return kept, noise


def span_corruption(tokens: tf.Tensor, denoiser: Denoiser, seeds: tf.Tensor,
                    sentinel_ids: tf.Tensor, mode_id: Optional[int],
                    eos_id: int = EOS_ID) -> Tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets) of span corruption; `sentinel_ids[i]` replaces the i-th noise span.

  Needs len(tokens) >= 2 and num_spans <= len(sentinel_ids) (the task checks both when it
  builds the pipeline). seeds: [2, 2] int32.
  """
  length = tf.size(tokens)
  kept, noise = noise_span_lengths(length, denoiser.corruption_rate,
                                   denoiser.mean_span_length, seeds)
  num_spans = tf.size(kept)
  # Run r of the interleaved sequence a0 b0 a1 b1 …: even r kept, odd r noise.
  run_lengths = tf.reshape(tf.stack([kept, noise], axis=1), [-1])
  run_of_token = tf.repeat(tf.range(2 * num_spans), run_lengths)
  is_noise = run_of_token % 2 == 1
  span_of_token = run_of_token // 2
  sentinels = sentinel_ids[:num_spans]
  # A token is kept in inputs if it is not noise; each noise span's first token becomes its
  # sentinel in inputs. Targets are the mirror image.
  is_first = tf.concat([[True], run_of_token[1:] != run_of_token[:-1]], axis=0)
  sentinel_at = tf.gather(sentinels, span_of_token)
  inputs = tf.where(is_noise, sentinel_at, tokens)
  inputs = tf.boolean_mask(inputs, tf.logical_or(~is_noise, is_first))
  targets = tf.where(is_noise, tokens, sentinel_at)
  targets = tf.boolean_mask(targets, tf.logical_or(is_noise, is_first))
  if mode_id is not None:
    inputs = tf.concat([[mode_id], inputs], axis=0)
  targets = tf.concat([targets, [eos_id]], axis=0)
  return inputs, targets


def prefix_lm(tokens: tf.Tensor, seed: tf.Tensor,
              mode_id: Optional[int]) -> Tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets): split at k ~ Uniform{1, …, n−1}; inputs = [mode] tokens[:k]."""
  length = tf.size(tokens)
  split = tf.random.stateless_uniform([], seed=seed, minval=1, maxval=length, dtype=tf.int32)
  inputs = tokens[:split]
  if mode_id is not None:
    inputs = tf.concat([[mode_id], inputs], axis=0)
  return inputs, tokens[split:]


def split_into_chunks(tokens: tf.Tensor, chunk_length: int) -> tf.RaggedTensor:
  """[n] → ragged [ceil(n / chunk_length), ≤ chunk_length]: every token kept, none trimmed."""
  length = tf.size(tokens, out_type=tf.int64)
  num_full = length // chunk_length
  rest = length - num_full * chunk_length
  row_lengths = tf.concat([tf.fill([num_full], tf.cast(chunk_length, tf.int64)),
                           tf.reshape(rest, [1])[:tf.cast(rest > 0, tf.int32)]], axis=0)
  return tf.RaggedTensor.from_row_lengths(tokens, row_lengths)


def max_sentinels(denoisers: Sequence[Denoiser], sequence_length: int) -> int:
  """The most sentinels any chunk of these denoisers needs at this sequence length."""
  return max([d.num_spans(d.chunk_length(sequence_length)) for d in denoisers] + [0])
