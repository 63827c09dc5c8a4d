"""Best-fit packing against seqio's own (unpacked) decoder-only conversion, segment by segment."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")

from tasks import packing  # pylint: disable=g-import-not-at-top
from tasks.feature_converter import DecoderOnlyFeatureConverter, decoder_lengths


def _examples(seed, count=300, length=64):
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(count):
    total = int(rng.choice([length, rng.integers(2, length + 1)]))
    width = int(rng.integers(0, total))  # 0: causal LM (no inputs)
    tokens = rng.integers(3, 500, size=total).astype(np.int32)
    examples.append({"inputs": tokens[:width], "targets": tokens[width:]})
  return examples


def _dataset(examples):
  return tf.data.Dataset.from_generator(
      lambda: iter(examples), output_signature={
          "inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})


def test_best_fit_decreasing_is_valid_and_dense():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 65, size=500)
  rows = packing.best_fit_decreasing(lengths, 64)
  assert sorted(i for row in rows for i in row) == list(range(500))
  assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
  # Bin-packing theory: BFD uses at most 11/9 OPT + 6/9 bins, OPT >= ceil(sum / capacity).
  assert len(rows) <= 11 / 9 * np.ceil(lengths.sum() / 64) + 6 / 9
  # And far fewer than next-fit in arrival order (what seqio's packing does).
  next_fit, space = 0, 0
  for size in lengths:
    if size > space:
      next_fit, space = next_fit + 1, 64
    space -= size
  assert len(rows) < 0.9 * next_fit


def test_packed_segments_equal_seqio_conversion():
  examples = _examples(1)
  reference = list(DecoderOnlyFeatureConverter(pack=False)(
      _dataset(examples), decoder_lengths(64)).as_numpy_iterator())
  by_tokens = {}
  for ex, ref in zip(examples, reference):
    n = len(ex["inputs"]) + len(ex["targets"])
    key = np.concatenate([ex["inputs"], ex["targets"]]).tobytes()
    by_tokens[key] = {k: v[:n] for k, v in ref.items()}
  rows = list(packing.pack(_dataset(examples), 64, window=64).as_numpy_iterator())
  seen = 0
  for row in rows:
    for segment in range(1, row["decoder_segment_ids"].max() + 1):
      where = row["decoder_segment_ids"] == segment
      ref = by_tokens[row["decoder_target_tokens"][where].tobytes()]
      for name in ref:
        np.testing.assert_array_equal(row[name][where], ref[name], err_msg=name)
      np.testing.assert_array_equal(row["decoder_positions"][where], np.arange(where.sum()))
      seen += 1
    assert np.all(row["decoder_target_tokens"][row["decoder_segment_ids"] == 0] == 0)
  assert seen == len(examples)
  total = sum(len(e["inputs"]) + len(e["targets"]) for e in examples)
  assert total / (len(rows) * 64) > 0.9  # next-fit in arrival order gives ~0.75 here
