"""`moe_jax_corpus`: the local corpus as a TFDS dataset (no network: every byte is on disk).

    import tasks.corpus.builder  # registers the builder with TFDS
    builder = tfds.builder("moe_jax_corpus/small", data_dir=...)
    builder.download_and_prepare()          # ~1 min for small; or `python -m tasks.corpus.build`

Examples are `{"text", "domain", "topic", "source"}` (see `tasks/corpus/sources.py`). Exact
duplicates (the same text in two packages) are kept once, then each source gives its documents
with the smallest text hashes, 2% of its bytes, to validation: the splits never share a
document and every source is in both.
Configs: `small` caps each source at 256 KB (a few MB in all: tests, quick runs), `full` takes
everything (hundreds of MB). Package versions (`dpkg-query -W`) and per-source document and
byte counts are in the dataset's metadata, because Debian only keeps the current version of a
package and a rebuild next year may read different text.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import platform
from typing import Dict, List, Optional, Tuple

import tensorflow_datasets as tfds

from tasks.corpus import prose_sources
from tasks.corpus import sources as sources_lib

VALIDATION_PERCENT = 2
NUM_FILE_SHARDS = 16  # files per split: up to this many hosts read disjoint files


@dataclasses.dataclass
class CorpusConfig(tfds.core.BuilderConfig):
  max_bytes_per_source: Optional[int] = None


def validation_keys(documents: List[Tuple[int, int]]) -> set:
  """Per source: documents (text hash, bytes) taken in hash order until they hold
  VALIDATION_PERCENT of the source's bytes (at least one document when there are two).

  Stratified by source, so every source (Python code as much as fortunes) is evaluated; by
  bytes, so a source of a few long files is not left with an empty validation split.
  """
  total = sum(size for _, size in documents)
  chosen, held = set(), 0
  for digest, size in sorted(documents):
    if len(documents) < 2 or held >= total * VALIDATION_PERCENT / 100:
      break
    chosen.add(digest)
    held += size
  return chosen


class MoeJaxCorpus(tfds.core.GeneratorBasedBuilder):
  """Code, English and other-language text from this machine's packages."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Code, English prose and other languages from Debian packages."}
  BUILDER_CONFIGS = [
      CorpusConfig(name="small", description="Each source capped at 256 KB of text.",
                   max_bytes_per_source=256 * 1024),
      CorpusConfig(name="full", description="Every document of every source."),
  ]
  DEFAULT_CONFIG_NAME = "small"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "domain": tfds.features.Text(),
            "topic": tfds.features.Text(),
            "source": tfds.features.Text(),
        }),
        supervised_keys=None,
        homepage="https://packages.debian.org",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    examples, stats = collect(self.builder_config.max_bytes_per_source)
    packages = sources_lib.required_packages()
    versions = sources_lib.package_versions(packages)
    versions.update(prose_sources.unpacked_versions())
    self.info.metadata.update({
        "package_versions": versions,
        "missing_packages": sorted(set(packages) - set(versions)),
        "python": platform.python_version(),
        "sources": stats,
        "validation_percent": VALIDATION_PERCENT,
    })
    return {split: self._generate_examples(rows) for split, rows in examples.items()}

  def _generate_examples(self, rows):
    yield from rows


def collect(max_bytes_per_source: Optional[int]
            ) -> Tuple[Dict[str, List[Tuple[str, dict]]], Dict[str, dict]]:
  """Reads every available source once: {split: [(key, example)]}, per-source stats."""
  examples = {"train": [], "validation": []}
  stats = {}
  seen = set()
  for source in sources_lib.all_sources():
    if not source.available():
      logging.warning("Corpus source %r skipped: install the Debian package(s) %s "
                      "(`python -m tasks.corpus.build --install`, as root).",
                      source.name, " ".join(source.packages) or "?")
      stats[source.name] = {"available": False}
      continue
    counts = collections.Counter()
    documents = []
    for doc in source.documents(max_bytes_per_source):
      digest = sources_lib.stable_hash(doc.text)
      if digest in seen:
        counts["duplicates"] += 1
        continue
      seen.add(digest)
      documents.append((digest, doc))
    validation = validation_keys([(d, len(doc.text.encode("utf-8"))) for d, doc in documents])
    for digest, doc in documents:
      split = "validation" if digest in validation else "train"
      counts[f"{split}_documents"] += 1
      counts[f"{split}_bytes"] += len(doc.text.encode("utf-8"))
      examples[split].append((f"{source.name}/{doc.key}", {
          "text": doc.text, "domain": source.domain, "topic": doc.topic,
          "source": source.name}))
    stats[source.name] = {"available": True, "domain": source.domain,
                          "language": source.language, **counts}
  return examples, stats


def prepare(config: str = "small", data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """Builds the dataset if it is not there yet; returns its builder."""
  builder = tfds.builder(f"moe_jax_corpus/{config}", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, num_shards=NUM_FILE_SHARDS))
  return builder
