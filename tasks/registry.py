"""seqio Tasks and Mixtures: the local corpus for everyone, TFDS corpora for pod users.

Importing this module registers everything (t5x's MIXTURE_OR_TASK_MODULE is `tasks.registry`).

Names. Local corpus (`moe_jax_corpus/small`), per domain and objective:
`local_{code,english,multilingual}_{objective}` with objective one of
`preprocessors.OBJECTIVES` (lm, span_corruption, s, r3, r8, x3, x8, x64, x64_15); with the
tiny presets' 8k vocabulary the same names end in `_8k`; over `moe_jax_corpus/full` they start
with `local_full_`. Mixtures:
- `local_ul2`: OpenMoE's UL2 (S 50%, R3/R8/X3/X8/X64 10% each) × domain rates heavy on code
  (OpenMoE-like: code 50%, English 40%, other languages 10%);
- `local_ul2_original`: the original UL2 denoisers (seven, equal rates) × the same domains;
- `local_lm`, `local_span_corruption`: one objective × the same domains;
- `local_{domain}_ul2`: one domain, OpenMoE's UL2.
Pod corpora (defined for real, tested with TFDS mock data here): `c4_en_{objective}`,
`wikipedia_en_{objective}`, `wiki40b_en_{objective}`, `pg19_{objective}`, and `pod_ul2`.
The Stack and RedPajama have no TFDS builder; register yours with `register_objectives`.

Evaluation is per task over its validation split (`get_dataset(split="validation",
num_epochs=1)`); training mixtures repeat forever (`tasks.pipeline` asks for num_epochs=None).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Mapping, Optional

import seqio
from tensorflow_datasets.core.utils import gcs_utils

from tasks import preprocessors
from tasks import vocab as vocab_lib
from tasks.corpus import builder as corpus_builder  # registers moe_jax_corpus with TFDS

# Everything runs offline: TFDS must never try the public GCS bucket (it is the default off
# switch in tfds 4.9.10; set here so a future default cannot reach the network).
gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access

# Examples shuffled after preprocessing, per task. seqio's default (1000) makes a mixture of 18
# tasks preprocess ~9M tokens before its first batch (24 s here); documents are already in
# random order (TFDS writes them shuffled and reads its files shuffled), so the buffer only has
# to spread the chunks of one long document.
SHUFFLE_BUFFER_SIZE = 128
DOMAIN_RATES = {"code": 0.5, "english": 0.4, "multilingual": 0.1}
TFDS_DATA_DIR = os.environ.get("MOE_JAX_TFDS_DIR")  # None: TFDS's default (TFDS_DATA_DIR)


def output_features(vocabulary: seqio.Vocabulary) -> Dict[str, seqio.Feature]:
  # EOS is added by the objectives themselves (tasks/denoisers.py), never by seqio.
  return {"inputs": seqio.Feature(vocabulary, add_eos=False, required=False),
          "targets": seqio.Feature(vocabulary, add_eos=False)}


def register_objectives(prefix: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
                        domain: Optional[str] = None, text_key: str = "text",
                        suffix: str = "") -> None:
  """Registers `{prefix}_{objective}{suffix}` for every objective over `source`."""
  for name, denoiser in preprocessors.OBJECTIVES.items():
    steps = []
    if domain is not None:
      steps.append(functools.partial(preprocessors.filter_domain, domain=domain))
    steps += [
        functools.partial(seqio.preprocessors.rekey, key_map={"text": text_key}),
        preprocessors.tokenize_text,
        functools.partial(preprocessors.denoise, denoiser=denoiser),
    ]
    seqio.TaskRegistry.add(f"{prefix}_{name}{suffix}", source=source, preprocessors=steps,
                           output_features=output_features(vocabulary), metric_fns=[],
                           shuffle_buffer_size=SHUFFLE_BUFFER_SIZE)


def register_mixture(name: str, prefixes: Mapping[str, float],
                     objectives: Mapping[str, float], suffix: str = "") -> None:
  """`name` = Σ prefix_rate × objective_rate over the `{prefix}_{objective}{suffix}` tasks."""
  seqio.MixtureRegistry.add(name, [(f"{p}_{o}{suffix}", p_rate * o_rate)
                                   for p, p_rate in prefixes.items()
                                   for o, o_rate in objectives.items()])


def register_local(corpus_config: str = "small", vocabulary: str = "spm32k",
                   name_prefix: str = "local", suffix: str = "") -> None:
  source = seqio.TfdsDataSource(tfds_name=f"moe_jax_corpus/{corpus_config}:1.0.0",
                                tfds_data_dir=TFDS_DATA_DIR)
  vocab = vocab_lib.get_vocabulary(vocabulary)
  domains = {f"{name_prefix}_{d}": rate for d, rate in DOMAIN_RATES.items()}
  for domain in DOMAIN_RATES:
    register_objectives(f"{name_prefix}_{domain}", source, vocab, domain=domain, suffix=suffix)
    register_mixture(f"{name_prefix}_{domain}_ul2{suffix}", {f"{name_prefix}_{domain}": 1.0},
                     preprocessors.UL2_OPENMOE, suffix)
  for mixture, objectives in {"ul2": preprocessors.UL2_OPENMOE,
                              "ul2_original": preprocessors.UL2_ORIGINAL,
                              "lm": {"lm": 1.0},
                              "span_corruption": {"span_corruption": 1.0}}.items():
    register_mixture(f"{name_prefix}_{mixture}{suffix}", domains, objectives, suffix)


# TFDS name → (task prefix, text feature). Versions are the TFDS catalog's current ones.
POD_SOURCES = {
    "c4/en:3.1.0": ("c4_en", "text"),
    "wikipedia/20230601.en:1.0.0": ("wikipedia_en", "text"),
    "wiki40b/en:1.3.0": ("wiki40b_en", "text"),
    "pg19:0.1.1": ("pg19", "book_text"),
}


def register_pod(vocabulary: str = "spm32k") -> None:
  vocab = vocab_lib.get_vocabulary(vocabulary)
  for tfds_name, (prefix, text_key) in POD_SOURCES.items():
    # read_only: a wrong data dir fails fast instead of trying to build C4 from the network.
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=TFDS_DATA_DIR,
                                  read_only=True)
    register_objectives(prefix, source, vocab, text_key=text_key)
  register_mixture("pod_ul2", {"c4_en": 0.6, "wikipedia_en": 0.3, "pg19": 0.1},
                   preprocessors.UL2_OPENMOE)


def _register_all() -> None:
  if "local_ul2" in seqio.MixtureRegistry.names():
    return  # imported twice (e.g. as a script and a module)
  register_local()
  register_local(vocabulary="spm8k", suffix="_8k")
  register_local(corpus_config="full", name_prefix="local_full")
  register_pod()


_register_all()
del corpus_builder


# --- checks a command runs at start-up, before anything compiles (moe_jax/checks.py) --------
def vocabulary_name(vocabulary: seqio.Vocabulary) -> str:
  """The shipped name of a vocabulary ("spm8k", "spm32k", "bytes"), or its class name."""
  for name in list(vocab_lib.VOCABULARIES) + ["bytes"]:
    shipped = vocab_lib.get_vocabulary(name)
    if (type(shipped) is type(vocabulary) and shipped.vocab_size == vocabulary.vocab_size
        and getattr(shipped, "sentencepiece_model_file", None)
        == getattr(vocabulary, "sentencepiece_model_file", None)):
      return name
  return type(vocabulary).__name__


def vocabulary_of_size(vocab_size: int, setting: str = "VOCAB_SIZE") -> str:
  """The shipped vocabulary with exactly `vocab_size` ids (the model's embedding rows): what
  evaluate, infer and analyze decode with unless told otherwise."""
  from moe_jax import checks  # pylint: disable=g-import-not-at-top
  sizes = {name: vocab_lib.get_vocabulary(name).vocab_size
           for name in list(vocab_lib.VOCABULARIES) + ["bytes"]}
  for name, size in sizes.items():
    if size == vocab_size:
      return name
  listed = ", ".join(f"{n} ({s} ids" + (f", tasks ending {_SUFFIXES[n]})" if n in _SUFFIXES
                                          else ")") for n, s in sizes.items())
  raise checks.SettingError(f"{setting} = {vocab_size} is the size of no shipped vocabulary: "
                            f"{listed}. Set --gin.VOCAB_SIZE to the one the model was trained "
                            "with (or give the run's config.gin as the model's --gin_file).")


_SUFFIXES = {"spm32k": "without a suffix", "spm8k": "_8k"}


def local_lm_tasks(vocab_size: int) -> list:
  """The held-out LM tasks of the local corpus in the vocabulary of `vocab_size` ids: the
  default evaluation tasks (code, English, other languages)."""
  name = vocabulary_of_size(vocab_size)
  suffix = {"spm32k": "", "spm8k": "_8k"}.get(name)
  if suffix is None:
    from moe_jax import checks  # pylint: disable=g-import-not-at-top
    raise checks.SettingError(f"no local tasks use the {name} vocabulary; name the tasks "
                              "(EVAL_TASKS).")
  return [f"local_{domain}_lm{suffix}" for domain in DOMAIN_RATES]


def check_tasks(names, setting: str, vocab_size: int, mixtures: bool = True) -> dict:
  """{name: its vocabulary} for tasks (and, with `mixtures`, mixtures) a command is given.

  Raises a SettingError naming `setting`: for a name that is not registered (with the closest
  registered names), and for a task whose vocabulary's size is not the model's rows
  (`vocab_size`): more ids than rows index past the embedding (a NaN loss); fewer would train
  fine but leave VOCAB_SIZE naming another vocabulary, which evaluate's default tasks and
  infer's decoding then follow.
  """
  from moe_jax import checks  # pylint: disable=g-import-not-at-top
  names = [names] if isinstance(names, str) else list(names)
  known = list(seqio.TaskRegistry.names()) + (list(seqio.MixtureRegistry.names())
                                              if mixtures else [])
  vocabularies = {}
  for name in names:
    if name not in known:
      kind = "task or mixture" if mixtures else "task"
      raise checks.SettingError(f"{setting}: {name!r} is not a registered {kind} (tasks/"
                                f"registry.py lists them).{checks.closest(name, known)}")
    vocabulary = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
    if vocabulary.vocab_size != vocab_size:  # more rows would decode and default wrongly
      vname = vocabulary_name(vocabulary)
      try:
        fitting = vocabulary_of_size(vocab_size)
        hint = (f", or use tasks ending {_SUFFIXES[fitting]} (the model's size is {fitting}'s)"
                if fitting in _SUFFIXES else "")
      except checks.SettingError:
        hint = ""
      raise checks.SettingError(
          f"{setting}: {name!r} is tokenized with {vname} ({vocabulary.vocab_size} ids) but the "
          f"model has VOCAB_SIZE = {vocab_size} rows: set --gin.VOCAB_SIZE="
          f"{vocabulary.vocab_size}{hint}.")
    vocabularies[name] = vocabulary
  return vocabularies
