"""Decoder-only feature conversion: inputs+targets concatenated, loss on targets, packing.

seqio's `PrefixLMFeatureConverter` does the work (concatenation, `decoder_loss_weights` on the
targets only, `decoder_causal_attention` over the inputs plus one position, packing with
`decoder_segment_ids` / `decoder_positions`). It sizes the packed sequence as
len(inputs) + len(targets) and requires each part to fit its own length, which does not suit
objectives whose split point moves (prefix LM splits anywhere). Here the task feature length of
"targets" is the whole decoder sequence and "inputs" may take any part of it: our preprocessors
guarantee |inputs| + |targets| <= L per example (`tasks/denoisers.py`).

    converter = DecoderOnlyFeatureConverter(pack=True)
    ds = converter(task_ds, {"inputs": 512, "targets": 512})   # → decoder sequences of 512
"""
from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf


class DecoderOnlyFeatureConverter(seqio.PrefixLMFeatureConverter):
  """PrefixLM conversion where `task_feature_lengths["targets"]` is the packed length."""

  def _concat_task_feature_lengths(self, task_feature_lengths: Mapping[str, int]):
    length = task_feature_lengths["targets"]
    lengths = {"targets": length, "inputs_width": length, "inputs_width_add_pos": length}
    lengths.update({k: task_feature_lengths[k] for k in self._passthrough_features})
    return lengths

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]):
    length = task_feature_lengths["targets"]
    lengths = {k: length for k in self.MODEL_FEATURES}
    if self.pack:
      lengths.update({k: length for k in self.PACKING_FEATURE_DTYPES})
    lengths.update({k: task_feature_lengths[k] for k in self._passthrough_features})
    return lengths

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    length = task_feature_lengths["targets"]

    def check(ex):
      total = tf.size(ex["inputs"]) + tf.size(ex["targets"])
      with tf.control_dependencies([tf.debugging.assert_less_equal(
          total, length, message="inputs + targets longer than the decoder sequence: the "
          "preprocessors must budget the concatenated length (tasks/denoisers.py)")]):
        return {k: tf.identity(v) for k, v in ex.items()}

    return super()._convert_features(ds.map(check), task_feature_lengths)


def decoder_lengths(sequence_length: int) -> dict:
  """The task feature lengths for decoder sequences of `sequence_length` tokens."""
  return {"inputs": sequence_length, "targets": sequence_length}
