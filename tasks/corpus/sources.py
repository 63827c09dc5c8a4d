"""The local corpus: real text and code carried by this machine's own packages.

A `Source` turns one package (or the running Python's standard library) into `Document`s:
`{text, topic}` under a stable unique `key`. The TFDS builder (`tasks/corpus/builder.py`)
adds `domain` and `source` from the `Source` and splits train/validation by a hash of the text.

Budgets. `documents(max_bytes)` must honour `max_bytes` (UTF-8 bytes of text; None: no limit)
*spread over the whole source*, not by taking the first files alphabetically: enumerate the
units (files, entries) cheaply, order them by `stable_order`, read in that order and stop once
the budget is spent. The `small` config then samples every topic of a source, and building it
does not read (or render) the whole package.

No crash on a missing package: a source whose files are absent yields nothing and
`available()` is False; the builder logs a warning naming the package to install.

Pure Python (no TensorFlow): the builder and the vocabulary trainer both read sources.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sysconfig
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

DOMAINS = ("code", "english", "multilingual")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Document:
  key: str    # unique within the source and stable across builds (path, or path:offset)
  text: str
  topic: str  # Python module, kernel subsystem, man section, fortune category, Bible book, ...


@dataclasses.dataclass(frozen=True)
class Source:
  """One package's documents.

  Attributes:
    name: short id, also the `source` feature ("python_stdlib", "manpages_de", ...).
    domain: one of DOMAINS.
    language: ISO 639-1 code of the prose ("en", "de", ...); "code" sources use "en".
    packages: Debian packages read (empty for the Python standard library).
    license: the license(s) of the text, as the package's copyright file states them.
    documents: `documents(max_bytes) -> Iterator[Document]`, see the module docstring.
    available: True when the files this source reads are present.
  """
  name: str
  domain: str
  language: str
  packages: Tuple[str, ...]
  license: str
  documents: Callable[[Optional[int]], Iterator[Document]]
  available: Callable[[], bool]


def stable_hash(text: str) -> int:
  """A 64-bit hash that does not change between processes (unlike `hash`)."""
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def stable_order(items: Iterable[T], key: Callable[[T], str] = str) -> List[T]:
  """Items in a pseudo-random order that depends only on their keys."""
  return sorted(items, key=lambda item: (stable_hash(key(item)), key(item)))


def take_bytes(documents: Iterable[Document], max_bytes: Optional[int]) -> Iterator[Document]:
  """Yields documents until their texts total `max_bytes` UTF-8 bytes (the last may pass it)."""
  spent = 0
  for document in documents:
    if max_bytes is not None and spent >= max_bytes:
      return
    if not document.text.strip():
      continue
    spent += len(document.text.encode("utf-8"))
    yield document


def read_text(path: str) -> str:
  """A file's text (.gz transparently); undecodable bytes become U+FFFD."""
  if path.endswith(".gz"):
    import gzip
    with gzip.open(path, "rb") as f:
      data = f.read()
  else:
    with open(path, "rb") as f:
      data = f.read()
  return data.decode("utf-8", errors="replace")


def files_as_documents(root: str, relative: Sequence[str], topic: Callable[[str], str],
                       max_bytes: Optional[int],
                       skip: Optional[Callable[[str], bool]] = None) -> Iterator[Document]:
  """Files (paths relative to `root`) in stable order as Documents, until `max_bytes`;
  `skip(text)` drops a file (generated code) after reading it."""
  def read():
    for rel in stable_order(relative):
      text = read_text(os.path.join(root, rel))
      if skip is None or not skip(text):
        yield Document(key=rel, text=text, topic=topic(rel))
  return take_bytes(read(), max_bytes)


def walk_files(root: str, suffixes: Sequence[str], skip_dirs: Sequence[str] = ()) -> List[str]:
  """Files under `root` ending in one of `suffixes`, skipping directories named in `skip_dirs`."""
  found = []
  for directory, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
    found.extend(os.path.join(directory, name) for name in sorted(filenames)
                 if name.endswith(tuple(suffixes)))
  return found


def package_versions(packages: Sequence[str]) -> dict:
  """`dpkg-query -W` versions of the installed packages among `packages` (Debian keeps only one)."""
  if not packages:
    return {}
  try:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package}\t${Version}\t${Status}\n",
                          *packages], capture_output=True, text=True, check=False).stdout
  except FileNotFoundError:
    return {}
  versions = {}
  for line in out.splitlines():
    name, version, status = (line.split("\t") + ["", ""])[:3]
    if status.endswith("installed") and " not-installed" not in status:
      versions[name] = version
  return versions


# --- The running Python's standard library (always present). ---------------------------------

_STDLIB_SKIP = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                "lib2to3", "ensurepip", "_vendor", "config-3.11-x86_64-linux-gnu")


def _stdlib_topic(relative_path: str) -> str:
  top = relative_path.split(os.sep)[0]
  return top[:-3] if top.endswith(".py") else top


def python_stdlib_documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
  """Each module file of the standard library; topic = its top-level module or package."""
  root = sysconfig.get_paths()["stdlib"]
  paths = [p for p in walk_files(root, (".py",), _STDLIB_SKIP)
           if not os.path.basename(p).startswith("test_")]
  relative = [os.path.relpath(p, root) for p in paths]
  return files_as_documents(root, relative, _stdlib_topic, max_bytes)


PYTHON_STDLIB = Source(
    name="python_stdlib", domain="code", language="en", packages=(),
    license="PSF-2.0", documents=python_stdlib_documents,
    available=lambda: os.path.isdir(sysconfig.get_paths()["stdlib"]))


def all_sources() -> List[Source]:
  """Every source, in a fixed order (the order of the builder's examples)."""
  # pylint: disable-next=g-import-not-at-top
  from tasks.corpus import code_sources, doc_sources, prose_sources
  return [PYTHON_STDLIB, *code_sources.SOURCES, *doc_sources.SOURCES, *prose_sources.SOURCES]


def required_packages() -> List[str]:
  return sorted({p for s in all_sources() for p in s.packages})
