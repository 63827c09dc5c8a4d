"""Documentation sources: Python's and the kernel's docs, man pages and the Debian Reference.

Prose in English and, from translations, in other languages. Markup sources that read as text
(reST, kernel .txt) are kept as they are; man pages are rendered with groff and the Debian
Reference's HTML is flattened to text, both only for the units the budget reaches.
"""
from __future__ import annotations

import collections
import concurrent.futures
import glob
import gzip
import html.parser
import logging
import os
import re
import shutil
import subprocess
from typing import Callable, Deque, Iterable, Iterator, List, Optional, Tuple, TypeVar

from tasks.corpus.sources import Document, Source, read_text, stable_order, take_bytes, walk_files

T = TypeVar("T")
R = TypeVar("R")


def _relative_key(relative_path: str) -> str:
  """Keys drop `.gz`, so they do not change if Debian stops compressing a file."""
  return relative_path[:-3] if relative_path.endswith(".gz") else relative_path


def _stem(relative_path: str) -> str:
  return os.path.basename(_relative_key(relative_path)).split(".")[0]


def _ordered_map(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
  """`map(fn, items)` on a thread pool, in order, at most a few items ahead of the consumer.

  For subprocess-bound work (groff): a consumer that stops early (a spent budget) wastes at
  most `window` calls, and a full build uses every core.
  """
  workers = min(32, os.cpu_count() or 1)
  window = 2 * workers
  pending: Deque[concurrent.futures.Future] = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    try:
      for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      for future in pending:
        future.cancel()


# --- Python documentation: python3.11-doc. ----------------------------------------------------

_PYTHON_DOCS_ROOT = "/usr/share/doc/python3.11/html/_sources"
_RST_TXT = ".rst.txt"


def _python_docs_topic(relative_path: str) -> str:
  """The top directory (reference, howto, c-api, ...); in library/, the top-level module."""
  parts = relative_path.split(os.sep)
  stem = parts[-1][:-len(_RST_TXT)]
  if len(parts) == 1:
    return stem  # about, glossary, copyright, ...
  if parts[0] == "library":  # asyncio-task -> asyncio, xml.etree.elementtree -> xml
    return re.split(r"[-.]", stem)[0]
  return parts[0]


def python_docs_documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
  """The reST source of each page of the Python documentation."""
  root = _PYTHON_DOCS_ROOT
  relative = [os.path.relpath(p, root) for p in walk_files(root, (_RST_TXT,))]

  def read():
    for rel in stable_order(relative):
      yield Document(key=rel, text=read_text(os.path.join(root, rel)),
                     topic=_python_docs_topic(rel))
  return take_bytes(read(), max_bytes)


PYTHON_DOCS = Source(
    name="python_docs", domain="english", language="en", packages=("python3.11-doc",),
    # html/_sources/license.rst.txt: "Python software and documentation are licensed under the
    # PSF License Agreement"; code examples in the documentation are also under 0BSD.
    license="PSF-2.0 (code examples also 0BSD)", documents=python_docs_documents,
    available=lambda: os.path.isdir(_PYTHON_DOCS_ROOT))

# --- Linux kernel documentation: linux-doc-6.1. -----------------------------------------------

_KERNEL_DOCS_ROOT = "/usr/share/doc/linux-doc-6.1/Documentation"
_KERNEL_TRANSLATIONS = "translations"
# From the SPDX tags of the files: most are GPL-2.0; the media uAPI book (322 files) is
# GFDL-1.1-no-invariants-or-later, a few are dual-licensed (BSD, MIT, CC-BY-4.0).
_KERNEL_LICENSE = ("GPL-2.0 (media uAPI docs GFDL-1.1-no-invariants-or-later; "
                   "some files dual-licensed, see their SPDX tags)")


def _kernel_doc_wanted(relative_path: str) -> bool:
  """reST, .txt and extension-less prose files (ABI/, old bindings, README, ...).

  Left out: devicetree YAML schemas (8 MB of machine-readable schema), images, Sphinx
  configuration, scripts and code samples, and `Kconfig`/`dontdiff` (not prose).
  """
  name = os.path.basename(_relative_key(relative_path))
  if name.endswith((".rst", ".txt")):
    return True
  return "." not in name and not name.startswith(("Kconfig", "dontdiff"))


def _kernel_doc_units(root: str, skip_dirs: Tuple[str, ...] = ()) -> List[str]:
  """Wanted files under `root`, relative to it; symlinks (duplicates) left out."""
  return [os.path.relpath(p, root) for p in walk_files(root, ("",), skip_dirs)
          if not os.path.islink(p) and _kernel_doc_wanted(os.path.relpath(p, root))]


def _kernel_topic(parts: List[str]) -> str:
  """The subsystem: the first directory (networking, admin-guide, ABI, ...)."""
  return parts[0] if len(parts) > 1 else _stem(parts[0])


def _kernel_docs_reader(root: str, relative: List[str], topic_parts: Callable[[str], List[str]],
                        max_bytes: Optional[int]) -> Iterator[Document]:
  def read():
    for rel in stable_order(relative, key=_relative_key):
      text = read_text(os.path.join(root, rel))
      if not text.startswith("#!"):  # extension-less scripts
        yield Document(key=_relative_key(rel), text=text, topic=_kernel_topic(topic_parts(rel)))
  return take_bytes(read(), max_bytes)


def kernel_docs_documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
  """The English kernel documentation (translations/ left out), one document per file."""
  if not os.path.isdir(_KERNEL_DOCS_ROOT):
    return iter(())
  relative = _kernel_doc_units(_KERNEL_DOCS_ROOT, (_KERNEL_TRANSLATIONS,))
  return _kernel_docs_reader(_KERNEL_DOCS_ROOT, relative, lambda rel: rel.split(os.sep),
                             max_bytes)


KERNEL_DOCS = Source(
    name="kernel_docs", domain="english", language="en", packages=("linux-doc-6.1",),
    license=_KERNEL_LICENSE, documents=kernel_docs_documents,
    available=lambda: os.path.isdir(_KERNEL_DOCS_ROOT))


def _kernel_translation_source(language: str, directories: Tuple[str, ...]) -> Source:
  """The translations under `translations/<directory>/` for each of `directories`.

  Keys keep the directory (zh_CN/..., zh_TW/...); the topic is the subsystem under it.
  """
  translations = os.path.join(_KERNEL_DOCS_ROOT, _KERNEL_TRANSLATIONS)
  roots = [os.path.join(translations, d) for d in directories]

  def documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
    relative = [os.path.relpath(os.path.join(r, rel), translations)
                for r in roots if os.path.isdir(r) for rel in _kernel_doc_units(r)]
    return _kernel_docs_reader(translations, relative, lambda rel: rel.split(os.sep)[1:],
                               max_bytes)

  return Source(
      name=f"kernel_docs_{language}", domain="multilingual", language=language,
      packages=("linux-doc-6.1",), license=_KERNEL_LICENSE, documents=documents,
      available=lambda: any(os.path.isdir(r) for r in roots))


# Every translation in linux-doc-6.1, one source per language: zh 2.3 MB (zh_CN simplified and
# zh_TW traditional), it 0.6 MB, ko 0.19 MB, ja 0.11 MB.
KERNEL_DOCS_TRANSLATIONS = [
    _kernel_translation_source("zh", ("zh_CN", "zh_TW")),
    _kernel_translation_source("it", ("it_IT",)),
    _kernel_translation_source("ja", ("ja_JP",)),
    _kernel_translation_source("ko", ("ko_KR",)),
]

# --- Man pages: manpages, manpages-dev, manpages-{de,fr,es}. -----------------------------------

# Plain UTF-8 text 80 columns wide: -K utf-8 runs preconv on the UTF-8 input, -t runs tbl
# (many pages have tables), grotty's -c -b -o -u emit no SGR escapes and no overstriking, and
# HY=0 turns hyphenation off. `.ad l` (prepended to the page) turns justification off, so the
# text has no padding spaces between words.
_GROFF = ("groff", "-K", "utf-8", "-t", "-mandoc", "-Tutf8", "-P-cbou",
          "-rLL=80n", "-rLT=80n", "-rHY=0")
_GROFF_PROLOGUE = b".ad l\n.nh\n"
_GROFF_TIMEOUT_S = 60
_MAN_PAGE = re.compile(r"man[1-9][^/]*/[^/]+\.gz")
_OVERSTRIKE = re.compile(r".\x08")
_SGR = re.compile(r"\x1b\[[0-9;]*m")
_BLANK_LINES = re.compile(r"\n{3,}")


def _dpkg_installed(package: str) -> bool:
  """dpkg's file list for `package` is present (arch-all or multiarch name)."""
  info = "/var/lib/dpkg/info"
  return (os.path.isfile(os.path.join(info, f"{package}.list"))
          or bool(glob.glob(os.path.join(info, f"{package}:*.list"))))


def _dpkg_files(package: str) -> List[str]:
  """`dpkg -L package`; empty when the package (or dpkg) is missing."""
  try:
    result = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True,
                            check=False)
  except OSError:
    return []
  return result.stdout.splitlines() if result.returncode == 0 else []


def _is_so_stub(source: bytes) -> bool:
  """A page that only includes another (`.so man3/other.3`): the other page is read anyway."""
  lines = [line.strip() for line in source.splitlines()]
  lines = [line for line in lines if line and not line.startswith((b'.\\"', b"'\\\"", b'\\"'))]
  return bool(lines) and all(line.startswith(b".so ") for line in lines)


def render_man_page(path: str) -> str:
  """A gzipped man page as plain text; "" for `.so` stubs and pages groff fails on."""
  try:
    with gzip.open(path, "rb") as f:
      source = f.read()
  except (OSError, EOFError) as e:
    logging.warning("Unreadable man page %s: %s", path, e)
    return ""
  if _is_so_stub(source):
    return ""
  try:
    result = subprocess.run(_GROFF, input=_GROFF_PROLOGUE + source, capture_output=True,
                            check=False, timeout=_GROFF_TIMEOUT_S)
  except (OSError, subprocess.TimeoutExpired) as e:
    logging.warning("groff failed on %s: %s", path, e)
    return ""
  if result.returncode != 0:
    logging.warning("groff failed on %s: %s", path, result.stderr[-500:])
    return ""
  text = _SGR.sub("", _OVERSTRIKE.sub("", result.stdout.decode("utf-8", errors="replace")))
  text = "\n".join(line.rstrip() for line in text.splitlines())
  return _BLANK_LINES.sub("\n\n", text).strip("\n") + "\n"


def _man_source(name: str, packages: Tuple[str, ...], man_root: str, domain: str,
                language: str, license_: str) -> Source:
  """The man pages that `packages` install under `man_root`; topic = section (man3, ...)."""

  def pages() -> List[str]:
    found = set()
    for package in packages:
      for path in _dpkg_files(package):
        rel = os.path.relpath(path, man_root)
        if _MAN_PAGE.fullmatch(rel) and os.path.isfile(path) and not os.path.islink(path):
          found.add(rel)
    return sorted(found)

  def documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
    if shutil.which(_GROFF[0]) is None:
      return iter(())
    ordered = stable_order(pages(), key=_relative_key)
    texts = _ordered_map(lambda rel: render_man_page(os.path.join(man_root, rel)), ordered)
    return take_bytes((Document(key=_relative_key(rel), text=text, topic=rel.split("/")[0])
                       for rel, text in zip(ordered, texts)), max_bytes)

  return Source(
      name=name, domain=domain, language=language, packages=packages, license=license_,
      documents=documents,
      available=lambda: (shutil.which(_GROFF[0]) is not None
                         and any(_dpkg_installed(p) for p in packages)))


# Per-page SPDX tags of manpages 6.03 (the copyright file lists the same per file): 639
# Linux-man-pages-copyleft, 254 GPL-2.0-or-later, 81 GPL-1.0-or-later, 45 BSD-4-Clause-UC, a
# few GPL-2.0-only, BSD-3-Clause, BSD-2-Clause and MIT.
MANPAGES = _man_source(
    "manpages", ("manpages", "manpages-dev"), "/usr/share/man", "english", "en",
    "Linux-man-pages-copyleft, GPL-2.0-or-later, GPL-1.0-or-later, BSD-4-Clause-UC, "
    "BSD-3-Clause, BSD-2-Clause, MIT (per page)")
# manpages-l10n's copyright: the translations are GPL-3+; the English originals they translate
# keep their own licenses.
_L10N_LICENSE = "GPL-3.0-or-later (translations; the original pages keep their licenses)"
MANPAGES_DE = _man_source("manpages_de", ("manpages-de",), "/usr/share/man/de",
                          "multilingual", "de", _L10N_LICENSE)
MANPAGES_FR = _man_source("manpages_fr", ("manpages-fr",), "/usr/share/man/fr",
                          "multilingual", "fr", _L10N_LICENSE)
MANPAGES_ES = _man_source("manpages_es", ("manpages-es",), "/usr/share/man/es",
                          "multilingual", "es", _L10N_LICENSE)

# --- Debian Reference: debian-reference-{en,de,fr,es}. -----------------------------------------

_DEBIAN_REFERENCE_ROOT = "/usr/share/debian-reference"
# DocBook's top-level sections: <div class="section"><div class="titlepage"><div><div><h2 ...
_SECTION_START = re.compile(
    r'<div class="section">\s*<div class="titlepage">\s*<div>\s*<div>\s*<h2\b')
_HEADING_ID = re.compile(r'<h[12]\b[^>]*>\s*<a id="([^"]+)"')


class _HtmlText(html.parser.HTMLParser):
  """Text of an HTML (fragment): paragraphs apart, `pre` verbatim, navigation dropped.

  Tolerates the unbalanced tags a fragment cut out of a page has.
  """
  _DROPPED_TAGS = frozenset({"head", "script", "style", "nav"})
  # DocBook's navigation, table of contents and lists of tables, figures, examples.
  _DROPPED_DIVS = frozenset({"navheader", "navfooter", "toc", "list-of-tables",
                             "list-of-figures", "list-of-examples"})
  _PARAGRAPHS = frozenset({"p", "div", "pre", "table", "ul", "ol", "dl", "blockquote", "hr",
                           "h1", "h2", "h3", "h4", "h5", "h6"})
  _LINES = frozenset({"br", "li", "dt", "dd", "tr"})
  _CELLS = frozenset({"td", "th"})

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self._out: List[str] = []
    self._breaks = 0    # newlines owed before the next text
    self._pre = 0       # depth of <pre>
    self._pre_start = False
    self._drop_tag = ""  # the dropped element we are in, and how deeply it nests
    self._drop_depth = 0
    self._cell_separator = False

  def text(self) -> str:
    self.close()
    return "".join(self._out).strip() + "\n"

  def _break(self, newlines: int):
    self._breaks = max(self._breaks, newlines)
    self._cell_separator = False

  def _write(self, text: str):
    if self._out and self._breaks:
      self._out[-1] = self._out[-1].rstrip(" ")
      self._out.append("\n" * self._breaks)
    elif self._out and self._cell_separator:
      self._out[-1] = self._out[-1].rstrip(" ")
      self._out.append(" | ")
    self._breaks = 0
    self._cell_separator = False
    self._out.append(text)

  def handle_starttag(self, tag, attrs):
    if self._drop_depth:
      self._drop_depth += tag == self._drop_tag
      return
    if tag in self._DROPPED_TAGS or (tag == "div" and
                                     dict(attrs).get("class") in self._DROPPED_DIVS):
      self._drop_tag, self._drop_depth = tag, 1
    elif tag in self._PARAGRAPHS:
      self._break(2)
      if tag == "pre":
        self._pre += 1
        self._pre_start = True
    elif tag in self._LINES:
      self._break(1)
    elif tag in self._CELLS and not self._breaks:
      self._cell_separator = True

  def handle_startendtag(self, tag, attrs):
    if tag in self._LINES or tag == "hr":
      self.handle_starttag(tag, attrs)

  def handle_endtag(self, tag):
    if self._drop_depth:
      self._drop_depth -= tag == self._drop_tag
      return
    if tag in self._PARAGRAPHS:
      self._break(2)
      if tag == "pre":
        self._pre = max(0, self._pre - 1)
    elif tag in self._LINES:
      self._break(1)

  def handle_data(self, data):
    if self._drop_depth:
      return
    if self._pre:
      if self._pre_start and data.startswith("\n"):  # as browsers do
        data = data[1:]
      self._pre_start = False
      if data:
        self._write(data)
      return
    text = re.sub(r"\s+", " ", data)
    if (self._breaks or self._cell_separator or not self._out
        or self._out[-1].endswith(("\n", " "))):
      text = text.lstrip()
    if text:
      self._write(text)


def html_to_text(markup: str) -> str:
  parser = _HtmlText()
  parser.feed(markup)
  return parser.text()


def _split_sections(markup: str) -> List[Tuple[str, str]]:
  """(anchor id, HTML) of the part before the first top-level section and of each section."""
  starts = [0] + [m.start() for m in _SECTION_START.finditer(markup)] + [len(markup)]
  parts = []
  for index, (begin, end) in enumerate(zip(starts, starts[1:])):
    match = _HEADING_ID.search(markup, begin, end)
    parts.append((match.group(1) if match else str(index), markup[begin:end]))
  return parts


def _debian_reference_source(language: str) -> Source:
  """One document per top-level section of each page; topic = page (ch02, apa, pr01, index).

  The pages are read and cut at section boundaries (cheap) before the budgeted, ordered
  conversion to text, so a small budget samples sections from every chapter.
  """
  suffix = f".{language}.html"
  pattern = os.path.join(_DEBIAN_REFERENCE_ROOT, "*" + suffix)

  def documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
    units = []  # (key, topic, HTML)
    for path in sorted(glob.glob(pattern)):
      name = os.path.basename(path)
      seen = set()
      for index, (anchor, markup) in enumerate(_split_sections(read_text(path))):
        key = f"{name}#{anchor}" if anchor not in seen else f"{name}#{anchor}:{index}"
        seen.add(anchor)
        units.append((key, name[:-len(suffix)], markup))

    def read():
      for key, topic, markup in stable_order(units, key=lambda unit: unit[0]):
        yield Document(key=key, text=html_to_text(markup), topic=topic)
    return take_bytes(read(), max_bytes)

  domain = "english" if language == "en" else "multilingual"
  return Source(
      name=f"debian_reference_{language}", domain=domain, language=language,
      packages=(f"debian-reference-{language}",),
      license="GPL-2.0+",  # /usr/share/doc/debian-reference-*/copyright: "Files: * License: GPL-2+"
      documents=documents, available=lambda: bool(glob.glob(pattern)))


DEBIAN_REFERENCE_EN = _debian_reference_source("en")
DEBIAN_REFERENCE_DE = _debian_reference_source("de")
DEBIAN_REFERENCE_FR = _debian_reference_source("fr")
DEBIAN_REFERENCE_ES = _debian_reference_source("es")

SOURCES = [
    PYTHON_DOCS, KERNEL_DOCS, *KERNEL_DOCS_TRANSLATIONS,
    MANPAGES, MANPAGES_DE, MANPAGES_FR, MANPAGES_ES,
    DEBIAN_REFERENCE_EN, DEBIAN_REFERENCE_DE, DEBIAN_REFERENCE_FR, DEBIAN_REFERENCE_ES,
]
