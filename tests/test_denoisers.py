"""The objectives against their definitions (T5 span corruption, UL2 denoisers, prefix LM).

The reference side is plain numpy/Python: a parser that rebuilds the document from
(inputs, targets), exact combinatorics of a uniform random segmentation, and a KS distance.
"""
import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")

from tasks import denoisers  # pylint: disable=g-import-not-at-top
from tasks import preprocessors
from tasks import vocab as vocab_lib

VOCAB = vocab_lib.get_vocabulary("bytes")
SENTINELS = vocab_lib.sentinel_ids(VOCAB)
SPAN_DENOISERS = [d for d in preprocessors.OBJECTIVES.values() if d.is_span_corruption]


def reconstruct(inputs, targets, denoiser):
  """Rebuilds the chunk and returns (tokens, noise span lengths); asserts the format."""
  inputs, targets = list(inputs), list(targets)
  if denoiser.mode_token is not None:
    assert inputs[0] == vocab_lib.mode_token_id(VOCAB, denoiser.mode_token)
    inputs = inputs[1:]
  assert targets[-1] == VOCAB.eos_id
  targets = targets[:-1]
  sentinel_set = set(SENTINELS)
  spans, order = {}, []
  for token in targets:
    if token in sentinel_set:
      assert token not in spans, "a sentinel appears twice in the targets"
      spans[token] = []
      order.append(token)
    else:
      spans[order[-1]].append(token)
  used = [t for t in inputs if t in sentinel_set]
  assert used == order == SENTINELS[:len(order)], "sentinels out of order or mismatched"
  assert all(spans[s] for s in order), "an empty noise span"
  assert inputs[0] not in sentinel_set, "the chunk must start with kept tokens"
  assert all(not (a in sentinel_set and b in sentinel_set) for a, b in zip(inputs, inputs[1:]))
  tokens = []
  for token in inputs:
    tokens.extend(spans[token] if token in sentinel_set else [token])
  return tokens, [len(spans[s]) for s in order]


def run(denoiser, tokens, seed):
  seeds = tf.constant([[seed, 1], [seed, 2]], tf.int32)
  if denoiser.prefix_lm:
    mode = vocab_lib.mode_token_id(VOCAB, denoiser.mode_token)
    inputs, targets = denoisers.prefix_lm(tf.constant(tokens, tf.int32), seeds[0], mode)
  else:
    mode = (None if denoiser.mode_token is None
            else vocab_lib.mode_token_id(VOCAB, denoiser.mode_token))
    inputs, targets = denoisers.span_corruption(tf.constant(tokens, tf.int32), denoiser, seeds,
                                                tf.constant(SENTINELS, tf.int32), mode)
  return inputs.numpy(), targets.numpy()


@pytest.mark.parametrize("denoiser", SPAN_DENOISERS, ids=lambda d: d.name)
def test_span_corruption_matches_definition(denoiser):
  """Over 300 chunks of ~2048 tokens: exact reconstruction, the length formula, (μ, r) within
  tolerance, and noise span lengths distributed as a uniform random composition.

  Tolerance: r within 0.01; μ within 5%, or within the rounding of the span count when a chunk
  holds few spans (x64_15: 304 noise tokens make round(4.75) = 5 spans of mean 60.8)."""
  rng = np.random.default_rng(0)
  n = denoiser.chunk_length(2048)
  noise_total = spans_total = 0
  lengths = []
  for seed in range(300):
    tokens = rng.integers(3, 250, size=n).tolist()
    inputs, targets = run(denoiser, tokens, seed)
    rebuilt, span_lengths = reconstruct(inputs, targets, denoiser)
    assert rebuilt == tokens
    assert len(inputs) + len(targets) == denoiser.packed_length(n) <= 2048
    noise_total += sum(span_lengths)
    spans_total += len(span_lengths)
    lengths.extend(span_lengths)
  rate, mean_span = noise_total / (300 * n), noise_total / spans_total
  assert abs(rate - denoiser.corruption_rate) < 0.01, rate
  k = spans_total / 300
  assert abs(mean_span / denoiser.mean_span_length - 1) < max(0.05, 0.5 / k), mean_span
  # Marginal of one part of a uniform composition of N into k parts:
  # P(l) = C(N − l − 1, k − 2) / C(N − 1, k − 1).
  num_noise, k = noise_total // 300, spans_total // 300
  if k >= 2:
    expected = np.array([math.comb(num_noise - l - 1, k - 2) / math.comb(num_noise - 1, k - 1)
                         for l in range(1, num_noise - k + 2)])
    lengths = np.array(lengths)
    ecdf = np.array([(lengths <= l).mean() for l in range(1, num_noise - k + 2)])
    # Kolmogorov–Smirnov distance; 1.63/√m is the 1% critical value for m independent draws
    # (the parts of one composition are negatively correlated, which only tightens it).
    assert np.max(np.abs(ecdf - np.cumsum(expected))) < 1.63 / math.sqrt(len(lengths))


def test_noise_positions_uniform_after_the_first_run():
  """Away from the ends each position is noise with probability ≈ r."""
  denoiser = preprocessors.X3
  rng = np.random.default_rng(1)
  n, hits = 200, np.zeros(200)
  for seed in range(500):
    tokens = rng.integers(3, 250, size=n).tolist()
    inputs, targets = run(denoiser, tokens, seed)
    _, span_lengths = reconstruct(inputs, targets, denoiser)
    # Positions of noise: walk the inputs again.
    position, sentinel_set, spans = 0, set(SENTINELS), iter(span_lengths)
    for token in inputs[1:]:
      if token in sentinel_set:
        length = next(spans)
        hits[position:position + length] += 1
        position += length
      else:
        position += 1
  frequency = hits / 500
  assert frequency[0] == 0  # T5: a chunk starts with kept tokens
  assert np.all(np.abs(frequency[20:-20] - 0.5) < 0.12), frequency[20:-20]


def test_prefix_lm_split_uniform():
  n, draws = 100, 4000
  splits = []
  for seed in range(draws):
    inputs, targets = run(preprocessors.S, list(range(3, 3 + n)), seed)
    assert inputs[0] == vocab_lib.mode_token_id(VOCAB, "[S2S]")
    assert inputs[1:].tolist() + targets.tolist() == list(range(3, 3 + n))  # no EOS added
    splits.append(len(inputs) - 1)
  splits = np.array(splits)
  assert splits.min() >= 1 and splits.max() <= n - 1
  # Kolmogorov–Smirnov distance to Uniform{1..n−1}; 1.63/√draws is the 1% critical value.
  ecdf = np.array([(splits <= k).mean() for k in range(1, n)])
  uniform = np.arange(1, n) / (n - 1)
  assert np.max(np.abs(ecdf - uniform)) < 1.63 / math.sqrt(draws)


@pytest.mark.parametrize("denoiser", list(preprocessors.OBJECTIVES.values()),
                         ids=lambda d: d.name)
@pytest.mark.parametrize("length", [16, 64, 512, 2048])
def test_budget_is_exact_and_includes_mode_token_and_sentinels(denoiser, length):
  n = denoiser.chunk_length(length)
  assert denoiser.packed_length(n) <= length < denoiser.packed_length(n + 1)
  assert all(denoiser.packed_length(m) <= length for m in range(2, n + 1))


@pytest.mark.parametrize("denoiser", SPAN_DENOISERS, ids=lambda d: d.name)
def test_graph_span_count_agrees_with_python_budget(denoiser):
  """float64 rounding in the graph: n · r exactly at .5 (n = 10, r = .15) must agree."""
  count = tf.function(lambda n: tf.size(denoisers.noise_span_lengths(
      n, denoiser.corruption_rate, denoiser.mean_span_length, tf.constant([[1, 2], [3, 4]]))[0]))
  for n in list(range(2, 120)) + [465, 464, 382, 502, 508, 2000]:
    assert int(count(tf.constant(n))) == denoiser.num_spans(n), n


def test_worst_case_sentinels_fit_the_shipped_vocabulary():
  """Every denoiser at sequence length 2048 fits the extra ids (minus the mode tokens)."""
  needed = denoisers.max_sentinels(list(preprocessors.OBJECTIVES.values()), 2048)
  assert needed == preprocessors.X3.num_spans(preprocessors.X3.chunk_length(2048))
  assert needed <= vocab_lib.EXTRA_IDS - len(vocab_lib.MODE_TOKENS)


def test_too_few_sentinels_is_a_clear_error():
  small = seqio.ByteVocabulary(extra_ids=10)
  features = {"targets": seqio.Feature(small, add_eos=False)}
  ds = tf.data.Dataset.from_tensor_slices({"targets": tf.ragged.constant([[5] * 600])})
  with pytest.raises(ValueError, match=r"needs \d+ sentinels.*extra_ids=10"):
    preprocessors.denoise(ds, {"targets": 512}, features, preprocessors.X3)


def test_special_ids_never_come_from_text():
  text = "def f(x):\n    return x  # ünïcödé Привет 你好 \x00\x7f"
  ids = VOCAB.encode(text)
  assert max(ids) < VOCAB.vocab_size - VOCAB.extra_ids
  specials = set(SENTINELS) | {vocab_lib.mode_token_id(VOCAB, m) for m in vocab_lib.MODE_TOKENS}
  assert len(specials) == VOCAB.extra_ids and min(specials) >= VOCAB.vocab_size - VOCAB.extra_ids


def _denoise_documents(denoiser, documents, length):
  features = {k: seqio.Feature(VOCAB, add_eos=False) for k in ("inputs", "targets")}
  ds = tf.data.Dataset.from_tensor_slices({"targets": tf.ragged.constant(documents)})
  with seqio.utils.map_seed_manager(3):
    out = preprocessors.denoise(ds, {"targets": length}, features, denoiser)
  return list(out.as_numpy_iterator())


@pytest.mark.parametrize("denoiser", list(preprocessors.OBJECTIVES.values()),
                         ids=lambda d: d.name)
def test_documents_are_chunked_never_truncated(denoiser):
  rng = np.random.default_rng(2)
  documents = [rng.integers(3, 250, size=size).tolist() for size in (1000, 57, 2, 1, 300)]
  examples = _denoise_documents(denoiser, documents, 64)
  assert all(len(ex["inputs"]) + len(ex["targets"]) <= 64 for ex in examples)
  rebuilt = []
  for ex in examples:
    if denoiser.is_causal_lm:
      rebuilt.extend(ex["targets"].tolist())
    elif denoiser.prefix_lm:
      rebuilt.extend(ex["inputs"][1:].tolist() + ex["targets"].tolist())
    else:
      rebuilt.extend(reconstruct(ex["inputs"], ex["targets"], denoiser)[0])
  # Documents + EOS, concatenated (one group here), cut into chunks; only a 1-token last
  # chunk is dropped by the objectives that need two tokens.
  stream = sum((d + [VOCAB.eos_id] for d in documents), [])
  chunk = denoiser.chunk_length(64)
  if not denoiser.is_causal_lm and len(stream) % chunk == 1:
    stream = stream[:-1]
  assert rebuilt == stream
  full = [ex for ex in examples[:-1]]
  assert all(len(ex["inputs"]) + len(ex["targets"]) == denoiser.packed_length(chunk)
             for ex in full)  # every chunk but the group's last fills the sequence
