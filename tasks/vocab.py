"""The shipped SentencePiece vocabularies and the special ids the objectives use.

Layout of ids (seqio.SentencePieceVocabulary with `extra_ids`):

    0 pad · 1 eos · 2 unk · 3 … base_size−1 SentencePiece pieces (byte fallback: no unk in
    practice) · base_size … base_size+extra_ids−1 extra ids, where extra_id_i = vocab_size−1−i.

Sentinels of span corruption are extra_id_0, extra_id_1, … (T5's convention: from the top).
The three UL2 mode tokens are the three extra ids farthest from the sentinels (the lowest ids
above the SentencePiece model). Neither can come out of tokenizing text: they lie outside the
SentencePiece model's ids. `EXTRA_IDS` = 384 leaves 381 sentinels, enough for every denoiser at
sequence length 2048 (`max_sentinels`, tested; X μ=3 r=0.5 needs more beyond ~3000) and
makes 32000 + 384 a multiple of 128. Text is encoded without the extra ids
(`preprocessors.tokenize_text`), because seqio turns `<extra_id_N>` strings into those ids.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import seqio

VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocabularies")
EXTRA_IDS = 384
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
# Vocabulary name → (SentencePiece model file, pieces). 32k for the default presets, 8k for
# the tiny CPU presets (the output softmax dominates a tiny model's step at 32k).
VOCABULARIES = {"spm32k": "spm32k.model", "spm8k": "spm8k.model"}
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


@functools.lru_cache(maxsize=None)
def get_vocabulary(name: str = "spm32k", extra_ids: int = EXTRA_IDS) -> seqio.Vocabulary:
  """A shipped vocabulary by name ("spm32k", "spm8k"), or "bytes" (seqio.ByteVocabulary)."""
  if name == "bytes":
    return seqio.ByteVocabulary(extra_ids=extra_ids)
  if name not in VOCABULARIES:
    raise ValueError(f"Unknown vocabulary {name!r}; choose one of "
                     f"{sorted(VOCABULARIES) + ['bytes']}.")
  return seqio.SentencePieceVocabulary(os.path.join(VOCAB_DIR, VOCABULARIES[name]),
                                       extra_ids=extra_ids)


def without_extra_ids(vocab: seqio.Vocabulary) -> seqio.Vocabulary:
  """The same vocabulary without extra ids: what text is encoded with (see tokenize_text)."""
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    return seqio.SentencePieceVocabulary(vocab.sentencepiece_model_file, extra_ids=0)
  return vocab  # ByteVocabulary never turns text into its extra ids


def num_sentinels(vocab: seqio.Vocabulary) -> int:
  return vocab.extra_ids - len(MODE_TOKENS)


def sentinel_ids(vocab: seqio.Vocabulary) -> list:
  """Sentinel i = extra_id_i = vocab_size − 1 − i."""
  return [vocab.vocab_size - 1 - i for i in range(num_sentinels(vocab))]


def mode_token_id(vocab: seqio.Vocabulary, mode_token: str) -> int:
  if mode_token not in MODE_TOKENS:
    raise ValueError(f"Unknown mode token {mode_token!r}; choose one of {MODE_TOKENS}.")
  if vocab.extra_ids < len(MODE_TOKENS) + 1:
    raise ValueError(f"The vocabulary has {vocab.extra_ids} extra ids; UL2 needs at least "
                     f"{len(MODE_TOKENS) + 1} (mode tokens and sentinels).")
  return vocab.vocab_size - vocab.extra_ids + MODE_TOKENS.index(mode_token)


def special_ids(vocab: seqio.Vocabulary) -> Sequence[int]:
  """Every id that tokenized text never produces: the extra ids."""
  return range(vocab.vocab_size - vocab.extra_ids, vocab.vocab_size)
