"""Dense packing: best-fit decreasing over a window of examples, decoder-only or encoder-decoder.

seqio packs greedily in arrival order (next-fit: a row closes as soon as the next example does
not fit). Our chunks are either exactly one sequence long (the middle of a long document) or
short (a document's tail, a fortune, a dictionary entry), and next-fit closes most short
examples' rows after one example: 80% non-padding on the UL2 mixture. Best-fit decreasing
over a window of 256 examples puts short examples into the gaps: ~97% (benchmarks/README.md).

`pack` gives exactly seqio's `PrefixLMFeatureConverter`'s features (tested segment by segment
against `tasks.feature_converter.DecoderOnlyFeatureConverter(pack=False)`):

    decoder_target_tokens    inputs ++ targets
    decoder_input_tokens     the same shifted right by one within its segment, 0 first
    decoder_loss_weights     1 on the targets part
    decoder_causal_attention 1 on the inputs part and one more position (where the first
                             target is predicted)
    decoder_segment_ids      1, 2, … per example in the row; 0 on padding
    decoder_positions        0, 1, … within each example

`pack_encoder_decoder` gives exactly seqio's `EncDecFeatureConverter(pack=True)`'s features
(tested segment by segment against `seqio.EncDecFeatureConverter(pack=False)`): example i of a
row has segment id i on both sides, its inputs in the encoder row and its targets in the
decoder row.

    encoder_input_tokens     inputs
    encoder_segment_ids      1, 2, … per example in the row; 0 on padding
    encoder_positions        0, 1, … within each example's inputs
    decoder_target_tokens    targets
    decoder_input_tokens     targets shifted right by one within its segment, 0 first
    decoder_loss_weights     1 on the targets (seqio: on every non-pad target token)
    decoder_segment_ids      the same ids as the encoder's; 0 on padding
    decoder_positions        0, 1, … within each example's targets
"""
from __future__ import annotations

import zlib

import numpy as np
import tensorflow as tf

FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
            "decoder_causal_attention", "decoder_segment_ids", "decoder_positions")
ENCODER_DECODER_FEATURES = (
    "encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
    "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
    "decoder_segment_ids", "decoder_positions")


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> list:
  """Rows as lists of item indices: largest first, each into the fullest row it fits.

  sizes: [n], or [n, d] for items that fill d rows of `capacity` at once (encoder and decoder):
  an item fits where it fits in every dimension; "largest" and "fullest" sum over dimensions.
  """
  sizes = np.asarray(sizes).reshape(len(sizes), -1)
  totals = sizes.sum(1)
  rows, free, free_total = [], [], []
  for item in np.argsort(-totals, kind="stable"):
    size, total = sizes[item].tolist(), int(totals[item])
    best = -1
    for row, space in enumerate(free_total):
      # Plain Python: a window's rows are few, and numpy's per-call overhead dominates here.
      if (total <= space and (best < 0 or space < free_total[best])
          and all(s <= f for s, f in zip(size, free[row]))):
        best = row
    if best < 0:
      rows.append([item])
      free.append([capacity - s for s in size])
      free_total.append(len(size) * capacity - total)
    else:
      rows[best].append(item)
      free[best] = [f - s for f, s in zip(free[best], size)]
      free_total[best] -= total
  return rows


def _shuffled(rows: list, seed: int) -> list:
  # BFD emits rows longest-first; batches must not be sorted by length (a batch of only
  # full chunks, then one of only short documents). The permutation's seed is the window's
  # content, so the order stays deterministic.
  return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def _pack_window(values, row_splits, inputs_lengths, length):
  """numpy: a window of examples (ragged token rows) → [num_rows, length] per feature."""
  rows = _shuffled(best_fit_decreasing(np.diff(row_splits), int(length)),
                   zlib.crc32(values.tobytes()))
  out = {name: np.zeros((len(rows), length), np.int32) for name in FEATURES}
  for r, items in enumerate(rows):
    start = 0
    for segment, item in enumerate(items, start=1):
      tokens = values[row_splits[item]:row_splits[item + 1]]
      n, width = len(tokens), int(inputs_lengths[item])
      span = slice(start, start + n)
      positions = np.arange(n, dtype=np.int32)
      out["decoder_target_tokens"][r, span] = tokens
      out["decoder_input_tokens"][r, start + 1:start + n] = tokens[:-1]
      out["decoder_loss_weights"][r, span] = positions >= width
      out["decoder_causal_attention"][r, span] = positions < width + 1
      out["decoder_segment_ids"][r, span] = segment
      out["decoder_positions"][r, span] = positions
      start += n
  return tuple(out[name] for name in FEATURES)


def _pack_encoder_decoder_window(inputs, inputs_splits, targets, targets_splits, length):
  """numpy: a window of (inputs, targets) ragged rows → [num_rows, length] per feature."""
  sizes = np.stack([np.diff(inputs_splits), np.diff(targets_splits)], axis=1)
  rows = _shuffled(best_fit_decreasing(sizes, int(length)),
                   zlib.crc32(targets.tobytes(), zlib.crc32(inputs.tobytes())))
  out = {name: np.zeros((len(rows), length), np.int32) for name in ENCODER_DECODER_FEATURES}
  for r, items in enumerate(rows):
    enc = dec = 0
    for segment, item in enumerate(items, start=1):
      x = inputs[inputs_splits[item]:inputs_splits[item + 1]]
      y = targets[targets_splits[item]:targets_splits[item + 1]]
      on_enc, on_dec = slice(enc, enc + len(x)), slice(dec, dec + len(y))
      out["encoder_input_tokens"][r, on_enc] = x
      out["encoder_segment_ids"][r, on_enc] = segment
      out["encoder_positions"][r, on_enc] = np.arange(len(x))
      out["decoder_target_tokens"][r, on_dec] = y
      out["decoder_input_tokens"][r, dec + 1:dec + len(y)] = y[:-1]
      out["decoder_loss_weights"][r, on_dec] = y != 0  # seqio's non_padding_position
      out["decoder_segment_ids"][r, on_dec] = segment
      out["decoder_positions"][r, on_dec] = np.arange(len(y))
      enc, dec = enc + len(x), dec + len(y)
  return tuple(out[name] for name in ENCODER_DECODER_FEATURES)


def pack(dataset: tf.data.Dataset, length: int, window: int = 256) -> tf.data.Dataset:
  """{"inputs", "targets"} examples (|inputs| + |targets| <= length) → packed rows."""

  def concat(ex):
    tokens = tf.concat([tf.cast(ex["inputs"], tf.int32), tf.cast(ex["targets"], tf.int32)], 0)
    with tf.control_dependencies([tf.debugging.assert_less_equal(
        tf.size(tokens), length, message="example longer than the packed length")]):
      return {"tokens": tf.identity(tokens), "inputs_length": tf.size(ex["inputs"])}

  def pack_window(batch):
    tokens = batch["tokens"]
    outputs = tf.numpy_function(
        lambda v, s, w: _pack_window(v, s, w, length),
        [tokens.values, tokens.row_splits, batch["inputs_length"]],
        [tf.int32] * len(FEATURES), stateful=False)
    for value in outputs:
      value.set_shape([None, length])
    return dict(zip(FEATURES, outputs))

  dataset = dataset.map(concat, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.ragged_batch(window)
  # Windows pack in parallel; `map` keeps their order, so the result stays deterministic.
  return dataset.map(pack_window, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def pack_encoder_decoder(dataset: tf.data.Dataset, length: int,
                         window: int = 256) -> tf.data.Dataset:
  """{"inputs", "targets"} examples (each at most `length`) → packed encoder-decoder rows.

  An example joins a row only where its inputs fit the encoder row and its targets the
  decoder row; both rows are `length` long. Examples with empty targets are dropped: they
  carry no loss, and seqio (which keeps them) numbers its decoder segments without them, so
  they no longer match the encoder's.
  """

  def check(ex):
    inputs, targets = tf.cast(ex["inputs"], tf.int32), tf.cast(ex["targets"], tf.int32)
    with tf.control_dependencies([
        tf.debugging.assert_less_equal(tf.size(inputs), length,
                                       message="inputs longer than the encoder sequence"),
        tf.debugging.assert_less_equal(tf.size(targets), length,
                                       message="targets longer than the decoder sequence")]):
      return {"inputs": tf.identity(inputs), "targets": tf.identity(targets)}

  def pack_window(batch):
    inputs, targets = batch["inputs"], batch["targets"]
    outputs = tf.numpy_function(
        lambda *args: _pack_encoder_decoder_window(*args, length),
        [inputs.values, inputs.row_splits, targets.values, targets.row_splits],
        [tf.int32] * len(ENCODER_DECODER_FEATURES), stateful=False)
    for value in outputs:
      value.set_shape([None, length])
    return dict(zip(ENCODER_DECODER_FEATURES, outputs))

  dataset = dataset.filter(has_targets).map(check, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.ragged_batch(window)
  return dataset.map(pack_window, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def has_targets(ex) -> tf.Tensor:
  """Filter predicate: the example has at least one target token."""
  return tf.size(ex["targets"]) > 0
