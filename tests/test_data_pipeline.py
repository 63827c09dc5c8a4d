"""The local corpus, the shipped vocabularies and the seqio pipeline, end to end.

The corpus's `small` config is built once per test session from this machine's packages (a
missing package only removes its source); the vocabularies are the shipped files.
"""
import fcntl
import os
import re
from unittest import mock

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")
tfds = pytest.importorskip("tensorflow_datasets")

from tasks import denoisers  # pylint: disable=g-import-not-at-top
from tasks import pipeline
from tasks import preprocessors
from tasks import registry
from tasks import vocab as vocab_lib
from tasks.corpus import builder as corpus_builder
from tasks.corpus import sources as sources_lib
from tasks.feature_converter import decoder_lengths


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """moe_jax_corpus/small built once for all test workers (xdist shares the parent dir)."""
  data_dir = registry.TFDS_DATA_DIR
  assert data_dir, "tests/conftest.py sets MOE_JAX_TFDS_DIR"
  pipeline.prepare_corpus("small", data_dir)
  builder = tfds.builder("moe_jax_corpus/small", data_dir=data_dir)
  texts = {}
  for split in ("train", "validation"):
    texts[split] = [{k: v.decode() for k, v in ex.items()} for ex in tfds.as_numpy(
        builder.as_dataset(split=split, shuffle_files=False))]
  return builder, texts


def test_corpus_splits_are_disjoint_and_cover_every_domain(corpus):
  builder, texts = corpus
  train = {ex["text"] for ex in texts["train"]}
  validation = {ex["text"] for ex in texts["validation"]}
  assert not train & validation
  assert len(train) == len(texts["train"])  # exact duplicates were dropped
  for split in ("train", "validation"):
    assert {ex["domain"] for ex in texts[split]} == set(sources_lib.DOMAINS)
  validation_share = len(validation) / (len(train) + len(validation))
  assert 0.005 < validation_share < 0.1
  # Every source is in validation, with ~2% of its bytes.
  assert {ex["source"] for ex in texts["validation"]} == {ex["source"] for ex in texts["train"]}
  total_mb = sum(len(t.encode()) for t in train | validation) / 2**20
  assert 2 < total_mb < 20, total_mb  # "a few MB"
  sources = {ex["source"] for ex in texts["train"]}
  assert {"python_stdlib", "go_stdlib", "manpages", "fortunes", "bible_web"} <= sources
  assert len({ex["topic"] for ex in texts["train"]}) > 100  # per-topic routing studies
  metadata = builder.info.metadata
  assert "golang-1.19-src" in metadata["package_versions"]
  assert metadata["sources"]["python_stdlib"]["train_documents"] > 0


def test_corpus_code_keeps_whitespace_and_skips_generated(corpus):
  _, texts = corpus
  code = [ex for ex in texts["train"] if ex["domain"] == "code"]
  assert any("\n    " in ex["text"] for ex in code)
  go = [ex["text"] for ex in code if ex["source"] == "go_stdlib"]
  assert go and not any(re.search(r"^// Code generated .* DO NOT EDIT\.$", t[:2000], re.M)
                        for t in go)


SAMPLES = {
    "python": 'def f(x):\n\tif x:\n        return {"a": [1, 2]}  # comment\n\n\n    \n',
    "go": "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "german": "Größenänderung: Die Straße führt über die Brücke – »Zitat«.",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "chinese": "内核文档的中文翻译：进程管理与内存管理。",
    "spaces": "  leading\ttabs\t\tand  double  spaces  \r\n trailing   ",
}


@pytest.mark.parametrize("name", ["spm32k", "spm8k"])
def test_vocabulary_round_trip_is_exact(name, corpus):
  vocab = vocab_lib.get_vocabulary(name)
  _, texts = corpus
  by_source = {}
  for ex in texts["validation"] + texts["train"]:
    by_source.setdefault(ex["source"], ex["text"])
  samples = dict(SAMPLES)
  for source in ("python_stdlib", "go_stdlib", "manpages_de", "fortunes_ru",
                 "kernel_docs_zh"):
    if source in by_source:
      samples[source] = by_source[source][:20000]
  base = vocab.vocab_size - vocab.extra_ids
  for key, text in samples.items():
    ids = vocab.encode(text)
    assert vocab.decode(ids) == text, key
    assert max(ids) < base and vocab_lib.UNK_ID not in ids, key  # byte fallback, no unk
  assert vocab.extra_ids == vocab_lib.EXTRA_IDS and vocab.eos_id == 1 and vocab.pad_id == 0
  # Python code compresses: indentation and common words are single pieces.
  code = by_source["python_stdlib"][:20000]
  assert len(vocab.encode(code)) < len(code.encode()) / (2.5 if name == "spm32k" else 2.0)


def test_pipeline_batches_packed_deterministic_and_sharded(corpus):
  del corpus
  def first_batches(seed, shard_index=0, shard_count=1, n=3):
    ds = pipeline.get_dataset("local_code_ul2_8k", sequence_length=256, batch_size=4, seed=seed,
                              shard_index=shard_index, shard_count=shard_count)
    return [b for _, b in zip(range(n), ds.as_numpy_iterator())]

  a, b = first_batches(7), first_batches(7)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  c = first_batches(8)
  assert not np.array_equal(a[0]["decoder_target_tokens"], c[0]["decoder_target_tokens"])
  s0, s1 = first_batches(7, 0, 2, 1), first_batches(7, 1, 2, 1)
  assert not np.array_equal(s0[0]["decoder_target_tokens"], s1[0]["decoder_target_tokens"])
  batch = a[0]
  assert batch["decoder_target_tokens"].shape == (4, 256)
  # Loss only on targets: never on an inputs position, never on padding.
  weights, causal = batch["decoder_loss_weights"], batch["decoder_causal_attention"]
  assert not np.any((weights == 1) & (batch["decoder_target_tokens"] == 0))
  assert not np.any((weights == 1) & (causal == 1) & (np.roll(causal, -1, axis=1) == 1))
  stats = pipeline.packing_stats(a)
  assert stats["non_padding_fraction"] > 0.9, stats


def test_task_examples_map_back_to_the_corpus(corpus):
  """Span corruption through the registered task: every example rebuilds a real document."""
  _, texts = corpus
  validation = [ex["text"] for ex in texts["validation"] if ex["domain"] == "english"]
  vocab = vocab_lib.get_vocabulary("spm8k")
  sentinels = set(vocab_lib.sentinel_ids(vocab))
  task = seqio.get_mixture_or_task("local_english_x8_8k")
  ds = task.get_dataset(decoder_lengths(128), split="validation", shuffle=False, seed=1,
                        num_epochs=1)
  checked = noise = spans_seen = chunk_tokens = 0
  for ex in ds.take(40).as_numpy_iterator():
    inputs, targets = ex["inputs"][1:].tolist(), ex["targets"][:-1].tolist()
    spans_seen += sum(t in sentinels for t in targets)
    noise += sum(t not in sentinels for t in targets)
    chunk_tokens += len(inputs) - sum(t in sentinels for t in inputs) + \
        sum(t not in sentinels for t in targets)
    spans, current = {}, None
    for token in targets:
      if token in sentinels:
        current = spans.setdefault(token, [])
      else:
        current.append(token)
    tokens = sum((spans[t] if t in sentinels else [t] for t in inputs), [])
    assert len(ex["inputs"]) + len(ex["targets"]) <= 128
    # Chunks are cut from a stream of documents, each closed by EOS: every piece between
    # EOS tokens is part of one validation document.
    pieces = " ".join(map(str, tokens)).split(f" {vocab.eos_id} ")
    for piece in pieces:
      ids = [int(t) for t in piece.split() if int(t) != vocab.eos_id]
      text = vocab.decode(ids)
      assert any(text in doc for doc in validation), text[:200]
    checked += 1
  assert checked == 40
  # On real (concatenated) documents the objective keeps its nominal (μ, r) = (8, 0.5).
  assert abs(noise / chunk_tokens - 0.5) < 0.01
  assert abs(noise / spans_seen / 8 - 1) < 0.05


@pytest.mark.parametrize("name", ["c4_en_r3", "wikipedia_en_s", "wiki40b_en_x64", "pg19_lm"])
def test_pod_tasks_with_tfds_mock_data(name):
  # TFDS's mock has no split sizes; seqio asks for them only to decide on in-memory caching.
  with tfds.testing.mock_data(num_examples=6), mock.patch.object(
      seqio.TfdsDataSource, "num_input_examples", return_value=None):
    ds = seqio.get_mixture_or_task(name).get_dataset(decoder_lengths(64), split="train",
                                                     shuffle=False, num_epochs=1)
    examples = list(ds.as_numpy_iterator())
  # Six short random documents, concatenated (each closed by EOS) into chunks of 64.
  assert examples and all(len(ex["inputs"]) + len(ex["targets"]) <= 64 for ex in examples)
  eos = sum(int(np.sum(ex["inputs"] == 1) + np.sum(ex["targets"] == 1)) for ex in examples)
  assert eos >= 5  # one per document (a span-corruption target adds its own at the end)


def test_mixture_rates():
  mixture = seqio.get_mixture_or_task("local_ul2")
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  total = sum(rates.values())
  code = sum(r for n, r in rates.items() if n.startswith("local_code_")) / total
  prefix_lm = sum(r for n, r in rates.items() if n.endswith("_s")) / total
  assert abs(code - 0.5) < 1e-9 and abs(prefix_lm - 0.5) < 1e-9
  assert len(rates) == 3 * len(preprocessors.UL2_OPENMOE)
  assert max(denoisers.max_sentinels(list(preprocessors.OBJECTIVES.values()), 2048), 0) <= \
      vocab_lib.num_sentinels(vocab_lib.get_vocabulary("spm32k"))


def test_evaluation_reads_once_training_repeats(corpus):
  del corpus
  def count(limit=10_000, **kwargs):
    ds = pipeline.get_dataset("local_multilingual_lm_8k", sequence_length=128, batch_size=8,
                              shuffle=False, **kwargs)
    return sum(1 for _ in zip(range(limit), ds.as_numpy_iterator()))
  once = count(split="validation")  # default for evaluation splits: one epoch
  assert 0 < once < 1000
  assert count(split="validation", num_epochs=None, limit=3 * once + 1) == 3 * once + 1
  with pytest.raises(ValueError, match="is a mixture; evaluate its tasks"):
    pipeline.get_dataset("local_ul2_8k", 128, 8, split="validation")
  with pytest.raises(ValueError, match="needs a seed"):
    pipeline.get_dataset("local_ul2_8k", 128, 8, seed=None, shard_count=2)


def test_text_never_encodes_to_sentinels():
  """seqio maps the string "<extra_id_0>" to sentinel 0; the tasks encode text without it."""
  vocab = vocab_lib.get_vocabulary("spm8k")
  assert vocab_lib.sentinel_ids(vocab)[0] in vocab.encode("a <extra_id_0> b")  # seqio's own
  features = {"targets": seqio.Feature(vocab, add_eos=False)}
  texts = ["a <extra_id_0> b", "<extra_id_383>", "x [NLU] [S2S] <extra_id_100>"]
  ds = preprocessors.tokenize_text(tf.data.Dataset.from_tensor_slices({"text": texts}),
                                   features)
  base = vocab.vocab_size - vocab.extra_ids
  for text, ex in zip(texts, ds.as_numpy_iterator()):
    assert ex["targets"].max() < base
    assert vocab.decode(ex["targets"].tolist()) == text


def test_short_inputs_length_is_refused():
  vocab = vocab_lib.get_vocabulary("spm8k")
  features = {k: seqio.Feature(vocab, add_eos=False) for k in ("inputs", "targets")}
  ds = tf.data.Dataset.from_tensor_slices({"targets": tf.ragged.constant([[5, 6, 7]])})
  with pytest.raises(ValueError, match="'inputs' must be at least as long"):
    preprocessors.denoise(ds, {"inputs": 64, "targets": 256}, features, preprocessors.X3)
