"""From a task or mixture name to packed batches (numpy), deterministically.

    ds = pipeline.get_dataset("local_ul2", sequence_length=512, batch_size=16, seed=0,
                              shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(ds.as_numpy_iterator())   # decoder_target_tokens [16, 512], ...

`features="encoder_decoder"` gives seqio's encoder-decoder features from the same tasks
(encoder_input_tokens [16, 512], decoder_target_tokens [16, 512], ...: `tasks/packing.py`).

Training (`split="train"`) repeats forever; evaluation (`num_epochs=1`) reads a split once.
The same seed and shard give the same batches on every run: seqio's per-example seeds come
from `seed`, the shuffle buffers and the mixture sampling are seeded, and each host reads its
own files of the TFDS dataset (the local corpus is written in
`tasks.corpus.builder.NUM_FILE_SHARDS` files so up to that many hosts can share it).
"""
from __future__ import annotations

import fcntl
import os
from typing import Dict, Optional

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from tasks import feature_converter as feature_converter_lib
from tasks import packing
from tasks import registry  # pylint: disable=unused-import  (registers the tasks)
from tasks.corpus import builder as corpus_builder

FEATURE_LAYOUTS = ("decoder_only", "encoder_decoder")


def prepare_corpus(config: str = "small", data_dir: Optional[str] = None) -> str:
  """Builds `moe_jax_corpus/<config>` once (under a file lock: parallel test workers and hosts
  on a shared disk build it once). Returns its data dir."""
  data_dir = os.path.expanduser(data_dir or registry.TFDS_DATA_DIR
                                or tfds.core.constants.DATA_DIR)
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".moe_jax_corpus_{config}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    corpus_builder.prepare(config, data_dir)
  return data_dir


def _corpus_configs(name: str):
  """The local-corpus configs a task or mixture reads (to build them first)."""
  provider = seqio.get_mixture_or_task(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  configs = set()
  for task in tasks:
    tfds_name = getattr(task.source, "tfds_dataset", None)
    if tfds_name is not None and tfds_name.name.startswith("moe_jax_corpus/"):
      configs.add(tfds_name.name.split("/")[1].split(":")[0])
  return configs


def get_dataset(mixture_or_task: str, sequence_length: int, batch_size: int,
                split: str = "train", seed: Optional[int] = 0, shard_index: int = 0,
                shard_count: int = 1, num_epochs: Optional[int] = -1, pack: bool = True,
                shuffle: bool = True, features: str = "decoder_only") -> tf.data.Dataset:
  """Batches of the model's features (`tasks/packing.py`), [batch_size, sequence_length].

  features: "decoder_only" (inputs ++ targets in one sequence, seqio's PrefixLM features) or
  "encoder_decoder" (inputs in the encoder, targets in the decoder, each up to
  sequence_length; seqio's EncDec features; examples with empty targets are dropped).
  pack=True packs by best-fit decreasing (`tasks.packing`); pack=False pads one example per
  row with seqio's converter. num_epochs: -1 (default) repeats forever for "train" and reads
  other splits once. Evaluation is per task: a mixture stops at its first exhausted task, so
  a mixture on another split than "train" is refused.
  """
  if features not in FEATURE_LAYOUTS:
    raise ValueError(f"features={features!r}: expected one of {FEATURE_LAYOUTS}")
  if num_epochs == -1:
    num_epochs = None if split == "train" else 1
  provider = seqio.get_mixture_or_task(mixture_or_task)
  if split != "train" and isinstance(provider, seqio.Mixture):
    raise ValueError(
        f"{mixture_or_task!r} is a mixture; evaluate its tasks one by one on split {split!r} "
        f"(a mixture stops when its first task runs out): {[t.name for t in provider.tasks]}")
  if shard_count > 1 and seed is None:
    raise ValueError("shard_count > 1 needs a seed: without one, hosts shuffle files "
                     "differently and their shards may overlap.")
  for config in _corpus_configs(mixture_or_task):
    prepare_corpus(config)
  shard_info = (seqio.ShardInfo(index=shard_index, num_shards=shard_count)
                if shard_count > 1 else None)
  lengths = feature_converter_lib.decoder_lengths(sequence_length)
  ds = provider.get_dataset(
      lengths, split=split, shuffle=shuffle, num_epochs=num_epochs, seed=seed,
      shard_info=shard_info, use_cached=False)
  if features == "encoder_decoder" and pack:
    ds = packing.pack_encoder_decoder(ds, sequence_length)
  elif features == "encoder_decoder":
    # Dropped as when packing, so that pack=False sees the same examples.
    ds = seqio.EncDecFeatureConverter(pack=False)(ds.filter(packing.has_targets), lengths)
  elif pack:
    ds = packing.pack(ds, sequence_length)
  else:
    ds = feature_converter_lib.DecoderOnlyFeatureConverter(pack=False)(ds, lengths)
  return ds.batch(batch_size, drop_remainder=split == "train").prefetch(tf.data.AUTOTUNE)


def packing_stats(batches) -> Dict[str, float]:
  """Fractions of non-padding and of loss-bearing tokens over an iterable of numpy batches.

  The fractions are of the decoder's tokens; encoder-decoder batches add the encoder's
  "encoder_non_padding_fraction".
  """
  total = tokens = loss = examples = rows = encoder_total = encoder_tokens = 0
  for batch in batches:
    if "encoder_input_tokens" in batch:
      encoder_total += batch["encoder_input_tokens"].size
      encoder_tokens += int(np.sum(batch["encoder_input_tokens"] != 0))
    total += batch["decoder_target_tokens"].size
    rows += batch["decoder_target_tokens"].shape[0]
    tokens += int(np.sum(batch["decoder_target_tokens"] != 0))
    loss += int(np.sum(batch["decoder_loss_weights"]))
    if "decoder_segment_ids" in batch:
      examples += int(sum(len(np.unique(row[row > 0])) for row in batch["decoder_segment_ids"]))
  stats = {"non_padding_fraction": tokens / max(total, 1),
           "loss_token_fraction": loss / max(total, 1),
           "examples_per_sequence": examples / max(rows, 1)}
  if encoder_total:
    stats["encoder_non_padding_fraction"] = encoder_tokens / encoder_total
  return stats
