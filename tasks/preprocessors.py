"""seqio preprocessors: domain filter, chunking and the objectives of `tasks/denoisers.py`.

Sequence lengths follow the decoder-only convention of `tasks/feature_converter.py`:
`sequence_length["targets"]` is the length of the packed decoder sequence (inputs and targets
concatenated). As T5 does for span corruption (`reduce_concat_tokens` + `split_tokens`),
`denoise` appends EOS to each tokenized document, concatenates groups of documents and cuts the
stream into chunks that fill exactly that length once the objective adds its mode token,
sentinels and EOS. So long documents are split, never truncated (seqio's default trims every
document to the sequence length); short ones (a fortune, a dictionary entry) share a chunk, so
an objective's spans have their nominal lengths on every domain and every example carries about
the same number of tokens — mixture rates, which seqio applies per example, are token rates.
"""
from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from tasks import denoisers as denoisers_lib
from tasks import vocab as vocab_lib


def filter_domain(dataset: tf.data.Dataset, domain: str) -> tf.data.Dataset:
  """Keeps the documents of one domain ("code", "english", "multilingual")."""
  return dataset.filter(lambda ex: tf.equal(ex["domain"], domain))


def tokenize_text(dataset: tf.data.Dataset,
                  output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """{"text", ...} → {"targets": token ids}, never producing a sentinel or mode id.

  seqio's SentencePieceVocabulary with extra ids adds `<extra_id_N>` as pieces, so the text
  "<extra_id_0>" (T5 code, papers about T5) would encode to sentinel 0. Text is encoded with
  the same model without extra ids instead (those strings fall back to ordinary pieces).
  """
  vocab = vocab_lib.without_extra_ids(output_features["targets"].vocabulary)
  return dataset.map(lambda ex: {"targets": vocab.encode_tf(ex["text"])},
                     num_parallel_calls=tf.data.AUTOTUNE)


def concatenate_and_chunk(dataset: tf.data.Dataset, chunk_length: int, eos_id: int,
                          documents_per_group: int = 64) -> tf.data.Dataset:
  """Documents (+ EOS) concatenated in groups, cut into chunks: no token dropped.

  Every chunk is `chunk_length` long except the last of each group of documents.
  """
  dataset = dataset.map(
      lambda ex: tf.concat([tf.cast(ex["targets"], tf.int32), [eos_id]], axis=0),
      num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.ragged_batch(documents_per_group)
  return dataset.flat_map(lambda group: tf.data.Dataset.from_tensor_slices(
      denoisers_lib.split_into_chunks(group.values, chunk_length)))


def denoise(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
            output_features: Mapping[str, seqio.Feature],
            denoiser: denoisers_lib.Denoiser) -> tf.data.Dataset:
  """Tokenized documents {"targets": [n]} → examples {"inputs", "targets"} of one objective.

  Causal LM: chunks of L tokens become targets (inputs empty). Prefix LM and span corruption:
  chunks of `denoiser.chunk_length(L)` (a 1-token chunk, the rare tail of a group, has
  nothing to split or corrupt and is dropped).
  """
  vocab = output_features["targets"].vocabulary
  total_length = sequence_length["targets"]
  if sequence_length.get("inputs", total_length) < total_length:
    raise ValueError(
        f"sequence_length {dict(sequence_length)}: for decoder-only tasks 'targets' is the "
        "whole decoder sequence and 'inputs' must be at least as long (seqio would otherwise "
        "trim the inputs and lose sentinels); use tasks.feature_converter.decoder_lengths(L).")
  chunk_length = denoiser.chunk_length(total_length)
  needed = denoiser.num_spans(chunk_length)
  if needed > vocab_lib.num_sentinels(vocab):
    raise ValueError(
        f"Denoiser {denoiser.name!r} at sequence length {total_length} needs {needed} "
        f"sentinels; the vocabulary has {vocab_lib.num_sentinels(vocab)} "
        f"(extra_ids={vocab.extra_ids} minus {len(vocab_lib.MODE_TOKENS)} mode tokens). "
        "Use a shorter sequence length or a vocabulary with more extra_ids.")
  mode_id = (None if denoiser.mode_token is None
             else vocab_lib.mode_token_id(vocab, denoiser.mode_token))
  eos_id = vocab.eos_id
  sentinels = tf.constant(vocab_lib.sentinel_ids(vocab)[:max(needed, 1)], tf.int32)

  dataset = concatenate_and_chunk(dataset, chunk_length, eos_id)
  if denoiser.is_causal_lm:
    return dataset.map(lambda t: {"inputs": tf.zeros([0], tf.int32), "targets": t},
                       num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.filter(lambda t: tf.size(t) >= 2)

  @seqio.map_over_dataset(num_seeds=2)
  def corrupt(tokens, seeds):
    if denoiser.prefix_lm:
      inputs, targets = denoisers_lib.prefix_lm(tokens, seeds[0], mode_id)
    else:
      inputs, targets = denoisers_lib.span_corruption(tokens, denoiser, seeds, sentinels,
                                                      mode_id, eos_id)
    return {"inputs": inputs, "targets": targets}

  return corrupt(dataset)


# The objectives. OpenMoE's UL2 (SPEC §5) is the default mixture; the original UL2 the second.
CAUSAL_LM = denoisers_lib.Denoiser("lm")
SPAN_CORRUPTION = denoisers_lib.Denoiser("span_corruption", None, 3.0, 0.15)  # T5
S = denoisers_lib.Denoiser("s", "[S2S]", prefix_lm=True)
R3 = denoisers_lib.Denoiser("r3", "[NLU]", 3.0, 0.15)
R8 = denoisers_lib.Denoiser("r8", "[NLU]", 8.0, 0.15)
X3 = denoisers_lib.Denoiser("x3", "[NLG]", 3.0, 0.5)
X8 = denoisers_lib.Denoiser("x8", "[NLG]", 8.0, 0.5)
X64 = denoisers_lib.Denoiser("x64", "[NLG]", 64.0, 0.5)
X64_15 = denoisers_lib.Denoiser("x64_15", "[NLG]", 64.0, 0.15)
OBJECTIVES = {d.name: d for d in (CAUSAL_LM, SPAN_CORRUPTION, S, R3, R8, X3, X8, X64, X64_15)}

# Denoiser → share of the mixture.
UL2_OPENMOE = {"s": 0.5, "r3": 0.1, "r8": 0.1, "x3": 0.1, "x8": 0.1, "x64": 0.1}
UL2_ORIGINAL = {"r3": 1 / 7, "r8": 1 / 7, "s": 1 / 7, "x3": 1 / 7, "x8": 1 / 7,
                "x64_15": 1 / 7, "x64": 1 / 7}
