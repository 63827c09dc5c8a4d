"""Encoder-decoder packing against seqio's own (unpacked) EncDecFeatureConverter, segment by
segment, and through a registered task."""
import collections

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")

from tasks import packing  # pylint: disable=g-import-not-at-top
from tasks import pipeline

LENGTH = 64


def _examples(seed, count=300, length=LENGTH):
  """Varied lengths: full and short inputs and targets, a few empty inputs and targets."""
  rng = np.random.default_rng(seed)
  sizes = lambda: int(rng.choice([length, rng.integers(0, length + 1), rng.integers(1, 12)]))
  return [{"inputs": rng.integers(3, 500, size=sizes()).astype(np.int32),
           "targets": rng.integers(3, 500, size=sizes()).astype(np.int32)}
          for _ in range(count)]


def _dataset(examples):
  return tf.data.Dataset.from_generator(
      lambda: iter(examples), output_signature={
          "inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})


def _key(inputs, targets):
  return inputs.tobytes(), targets.tobytes()


def _check_segments(row, side):
  """Segments 1..k in order, each contiguous with positions 0..n-1; padding 0 at the end."""
  tokens = row["encoder_input_tokens" if side == "encoder" else "decoder_target_tokens"]
  segment_ids, positions = row[f"{side}_segment_ids"], row[f"{side}_positions"]
  assert np.all(np.diff(segment_ids[segment_ids > 0]) >= 0)
  used = segment_ids > 0
  assert not np.any(used[1:] & ~used[:-1])  # padding only at the end
  assert np.all(tokens[segment_ids == 0] == 0) and np.all(positions[segment_ids == 0] == 0)
  for segment in np.unique(segment_ids[segment_ids > 0]):
    np.testing.assert_array_equal(positions[segment_ids == segment],
                                  np.arange(np.sum(segment_ids == segment)))


def test_best_fit_decreasing_two_sided_is_valid():
  sizes = np.random.default_rng(0).integers(0, 65, size=(500, 2))
  rows = packing.best_fit_decreasing(sizes, 64)
  assert sorted(i for row in rows for i in row) == list(range(500))
  assert all(np.all(sizes[row].sum(0) <= 64) for row in rows)
  assert len(rows) <= 1.25 * np.ceil(sizes.sum(0).max() / 64) + 1


def test_packed_segments_equal_seqio_conversion():
  examples = _examples(1)
  kept = [ex for ex in examples if len(ex["targets"])]  # empty targets are dropped
  assert 0 < len(kept) < len(examples)
  reference = seqio.EncDecFeatureConverter(pack=False)(
      _dataset(kept), {"inputs": LENGTH, "targets": LENGTH}).as_numpy_iterator()
  by_key = {}
  for ex, ref in zip(kept, reference):
    n, m = len(ex["inputs"]), len(ex["targets"])
    by_key[_key(ex["inputs"], ex["targets"])] = (
        {"encoder_input_tokens": ref["encoder_input_tokens"][:n]},
        {k: ref[k][:m] for k in ("decoder_target_tokens", "decoder_input_tokens",
                                 "decoder_loss_weights")})
  rows = list(packing.pack_encoder_decoder(_dataset(examples), LENGTH, window=64)
              .as_numpy_iterator())
  seen = collections.Counter()
  for row in rows:
    assert set(row) == set(packing.ENCODER_DECODER_FEATURES)
    assert all(v.shape == (LENGTH,) and v.dtype == np.int32 for v in row.values())
    _check_segments(row, "encoder")
    _check_segments(row, "decoder")
    for segment in range(1, row["decoder_segment_ids"].max() + 1):
      on_enc, on_dec = row["encoder_segment_ids"] == segment, row["decoder_segment_ids"] == segment
      key = _key(row["encoder_input_tokens"][on_enc], row["decoder_target_tokens"][on_dec])
      encoder_ref, decoder_ref = by_key[key]
      for name, want in encoder_ref.items():
        np.testing.assert_array_equal(row[name][on_enc], want, err_msg=name)
      for name, want in decoder_ref.items():
        np.testing.assert_array_equal(row[name][on_dec], want, err_msg=name)
      seen[key] += 1
    # Every segment has targets; inputs may be empty (as in seqio, which keeps them).
    assert set(row["encoder_segment_ids"][row["encoder_segment_ids"] > 0]) <= set(
        row["decoder_segment_ids"])
  assert seen == collections.Counter(_key(ex["inputs"], ex["targets"]) for ex in kept)
  # Far fewer rows than next-fit in arrival order (what seqio's packing does).
  next_fit, space = 0, np.zeros(2)
  for size in ([len(ex["inputs"]), len(ex["targets"])] for ex in kept):
    if np.any(size > space):
      next_fit, space = next_fit + 1, np.full(2, LENGTH)
    space -= size
  assert len(rows) < 0.9 * next_fit
  again = list(packing.pack_encoder_decoder(_dataset(examples), LENGTH, window=64)
               .as_numpy_iterator())
  for a, b in zip(rows, again, strict=True):  # deterministic row order
    np.testing.assert_array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])


def test_pipeline_encoder_decoder_batches():
  ds = pipeline.get_dataset("local_english_span_corruption_8k", sequence_length=128,
                            batch_size=4, seed=0, features="encoder_decoder")
  batches = [b for _, b in zip(range(2), ds.as_numpy_iterator())]
  for batch in batches:
    assert set(batch) == set(packing.ENCODER_DECODER_FEATURES)
    assert all(v.shape == (4, 128) and v.dtype == np.int32 for v in batch.values())
    for r in range(4):
      row = {k: v[r] for k, v in batch.items()}
      _check_segments(row, "encoder")
      _check_segments(row, "decoder")
      # Span corruption: every example has inputs and targets, under one segment id.
      np.testing.assert_array_equal(np.unique(row["encoder_segment_ids"]),
                                    np.unique(row["decoder_segment_ids"]))
      targets, segments = row["decoder_target_tokens"], row["decoder_segment_ids"]
      np.testing.assert_array_equal(row["decoder_loss_weights"], segments > 0)
      shifted = np.where(row["decoder_positions"] > 0, np.roll(targets, 1), 0) * (segments > 0)
      np.testing.assert_array_equal(row["decoder_input_tokens"], shifted)
  stats = pipeline.packing_stats(batches)
  # The objectives budget |inputs| + |targets| <= sequence_length (for decoder-only models),
  # so the encoder and decoder rows together hold about one sequence's worth of tokens.
  assert 0.9 < stats["non_padding_fraction"] + stats["encoder_non_padding_fraction"] <= 1, stats


def test_bad_features_is_refused():
  with pytest.raises(ValueError, match=r"features='encoder_only'.*decoder_only.*encoder_decoder"):
    pipeline.get_dataset("local_english_span_corruption_8k", 128, 4, features="encoder_only")
