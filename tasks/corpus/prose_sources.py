"""Prose sources: fortunes, dictionaries, WordNet, two Bibles and Jane Austen's novels.

Everything is read from installed Debian packages, except Jane Austen: her novels ship in an
R package (r-cran-janeaustenr) whose .deb `unpack_janeaustenr` downloads and unpacks into a
cache directory without installing it (installing would pull in R). Its documents function only
reads what that left behind; it never downloads.
"""
from __future__ import annotations

import functools
import glob
import gzip
import html
import logging
import os
import re
import shutil
import struct
import subprocess
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from tasks.corpus.sources import Document, Source, stable_order, take_bytes

_DPKG_INFO = "/var/lib/dpkg/info"


def _owned_files(package: str) -> List[str]:
  """Paths dpkg lists for an installed `package` (what `dpkg -L` prints), without a subprocess."""
  lists = [os.path.join(_DPKG_INFO, f"{package}.list")]
  lists += sorted(glob.glob(os.path.join(_DPKG_INFO, f"{package}:*.list")))  # Multi-Arch.
  for path in lists:
    if os.path.isfile(path):
      with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n") for line in f if line.strip()]
  return []


def _tidy(text: str) -> str:
  """Trailing spaces and runs of blank lines removed; so are blank lines at either end."""
  text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
  return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


# --- Fortunes: fortunes, fortunes-de, -es, -it, -ru. ------------------------------------------

_FORTUNE_ROOT = "/usr/share/games/fortunes"


def _fortune_files(package: str) -> List[str]:
  """The package's fortune text files, relative to _FORTUNE_ROOT.

  Skipped: strfile's `.dat` indexes; symlinks (each `.u8` is a link to its plain file here, and
  fortunes-it links its files into the top directory as well); `off/` (offensive fortunes,
  rot13-encoded in fortunes-es). A `.u8` that is a real file is the UTF-8 version of its plain
  namesake, so it replaces it.
  """
  files = {}
  for path in _owned_files(package):
    relative = os.path.relpath(path, _FORTUNE_ROOT)
    if (relative.startswith("..") or path.endswith(".dat") or "off" in relative.split(os.sep)
        or os.path.islink(path) or not os.path.isfile(path)):
      continue
    plain = relative[:-3] if relative.endswith(".u8") else relative
    if plain not in files or relative.endswith(".u8"):
      files[plain] = relative
  return [files[plain] for plain in sorted(files)]


def _decode(data: bytes, fallback: str) -> str:
  """UTF-8 (every file in the current packages is), else the package's legacy 8-bit charset."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return data.decode(fallback, errors="replace")


def _split_fortunes(data: bytes) -> Iterator[Tuple[int, bytes]]:
  """(byte offset, bytes) of each fortune: the text between lines holding only `%`."""
  start = offset = 0
  for line in data.splitlines(keepends=True):
    if line.rstrip() == b"%":
      yield start, data[start:offset]
      start = offset + len(line)
    offset += len(line)
  yield start, data[start:]


def _fortunes(package: str, fallback_encoding: str
              ) -> Callable[[Optional[int]], Iterator[Document]]:
  """Each fortune is a document (key `file:byte offset`); topic = its file, e.g. "science"."""

  def documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
    # The fortunes are the units, and finding them means reading the files: a few MB at most.
    units = []
    for relative in _fortune_files(package):
      plain = relative[:-3] if relative.endswith(".u8") else relative
      topic = os.path.basename(plain).replace(".fortunes", "")
      with open(os.path.join(_FORTUNE_ROOT, relative), "rb") as f:
        data = f.read()
      for offset, chunk in _split_fortunes(data):
        units.append((f"{plain}:{offset}", chunk, topic))

    def read():
      for key, chunk, topic in stable_order(units, key=lambda unit: unit[0]):
        yield Document(key=key, text=_tidy(_decode(chunk, fallback_encoding)), topic=topic)
    return take_bytes(read(), max_bytes)
  return documents


def _fortune_source(name: str, package: str, domain: str, language: str, fallback: str,
                    license_: str) -> Source:
  return Source(name=name, domain=domain, language=language, packages=(package,),
                license=license_, documents=_fortunes(package, fallback),
                available=lambda: bool(_fortune_files(package)))


FORTUNES = _fortune_source(
    "fortunes", "fortunes", "english", "en", "latin-1",
    "BSD-3-Clause (fortune-mod, per debian/copyright); the quotations carry no separate license")
FORTUNES_DE = _fortune_source("fortunes_de", "fortunes-de", "multilingual", "de", "latin-1",
                              "GPL-2+")
FORTUNES_ES = _fortune_source(
    "fortunes_es", "fortunes-es", "multilingual", "es", "latin-1",
    "Public domain (quotations presumed so, per debian/copyright); GPL-2+ for the packaging code")
FORTUNES_IT = _fortune_source(
    "fortunes_it", "fortunes-it", "multilingual", "it", "latin-1",
    "Public domain / freeware (COPYING-POLICY: not copyrighted, may be freely redistributed)")
FORTUNES_RU = _fortune_source("fortunes_ru", "fortunes-ru", "multilingual", "ru", "koi8-r",
                              "GPL-2")


# --- dictd dictionaries: dict-devil, dict-foldoc, dict-gcide. ----------------------------------

_DICTD_ROOT = "/usr/share/dictd"
_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
# FOLDOC starts an entry's body (or each numbered sense) with its categories:
# "   <programming, jargon> ...", "   1. <business> ...".
_FOLDOC_CATEGORY = re.compile(r"^\s*(?:\d+\.\s*)?<([a-z][a-z ,-]*)>", re.M)


def _dictd_number(digits: str) -> int:
  """dictd's base64 numbers: most significant digit first."""
  value = 0
  for c in digits:
    value = value * 64 + _B64[c]
  return value


def _dictd_entries(dictionary: str) -> Dict[int, int]:
  """{byte offset: length} of each entry, once (several headwords share an entry).

  The `00-database-*` (in devil.index `00database*`) entries are the dictionary's metadata
  (name, URL, license header), not entries.
  """
  entries, metadata = {}, set()
  with open(os.path.join(_DICTD_ROOT, f"{dictionary}.index"), encoding="utf-8",
            errors="replace") as f:
    for line in f:
      fields = line.rstrip("\n").split("\t")
      if len(fields) < 3:
        continue
      offset, length = _dictd_number(fields[1]), _dictd_number(fields[2])
      if fields[0].replace("-", "").startswith("00database"):
        metadata.add(offset)
      entries[offset] = max(length, entries.get(offset, 0))
  return {offset: length for offset, length in entries.items() if offset not in metadata}


def _foldoc_topic(text: str) -> str:
  match = _FOLDOC_CATEGORY.search(text)
  return match.group(1).split(",")[0].strip() if match else "uncategorized"


def _dictd(dictionary: str, topic_of: Callable[[str], str]
           ) -> Callable[[Optional[int]], Iterator[Document]]:
  """Each entry is a document (key `dictionary:offset`)."""

  def documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
    if not _dictd_available(dictionary):
      return iter(())
    entries = _dictd_entries(dictionary)

    def read():
      # .dict.dz is dictzip, i.e. gzip with a random-access index we do not need: gcide, the
      # largest, is 40 MB inflated.
      with gzip.open(os.path.join(_DICTD_ROOT, f"{dictionary}.dict.dz"), "rb") as f:
        data = f.read()
      for offset in stable_order(entries, key=lambda o: f"{dictionary}:{o}"):
        # A few GCIDE entries carry stray cp1252 quotes.
        text = _tidy(_decode(data[offset:offset + entries[offset]], "cp1252"))
        yield Document(key=f"{dictionary}:{offset}", text=text, topic=topic_of(text))
    return take_bytes(read(), max_bytes)
  return documents


def _dictd_available(dictionary: str) -> bool:
  return all(os.path.isfile(os.path.join(_DICTD_ROOT, f"{dictionary}{suffix}"))
             for suffix in (".index", ".dict.dz"))


def _dictd_source(dictionary: str, topic_of: Callable[[str], str], license_: str) -> Source:
  return Source(name=f"dict_{dictionary}", domain="english", language="en",
                packages=(f"dict-{dictionary}",), license=license_,
                documents=_dictd(dictionary, topic_of),
                available=lambda: _dictd_available(dictionary))


DICT_DEVIL = _dictd_source("devil", lambda text: "devil",
                           "Public domain (The Devil's Dictionary, 1911; copyright expired)")
DICT_FOLDOC = _dictd_source(
    "foldoc", _foldoc_topic,
    "GFDL-1.1+ (FOLDOC, Denis Howe); the Debian additions (Dictionary.debian): verbatim "
    "copying and derived works under identical terms")
DICT_GCIDE = _dictd_source("gcide", lambda text: "gcide", "GPL-2+ (GCIDE)")


# --- WordNet 3.0: wordnet-base. ------------------------------------------------------------------

_WORDNET_ROOT = "/usr/share/wordnet"
_WORDNET_POS = ("noun", "verb", "adj", "adv")
# lexnames(5WN): lexicographer file number -> name (the synset's "supersense").
_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl")
# One synset is a line of ~100 bytes ("dog, domestic dog: a member of the genus Canis ..."), too
# short to be a document. The data files list synsets lexicographer file by lexicographer file,
# in the order of those source files, so neighbours are related (dog breeds, kinds of tree):
# a document is up to this many consecutive synsets of one supersense.
_SYNSETS_PER_DOCUMENT = 20
_ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # beautiful(a): syntactic position.


def _synset_text(line: str) -> Tuple[int, str]:
  """(lexicographer file number, "word, word: gloss") of a data.* line (see wndb(5WN))."""
  fields, _, gloss = line.partition("|")
  fields = fields.split()
  words = [_ADJECTIVE_MARKER.sub("", word).replace("_", " ")
           for word in fields[4:4 + 2 * int(fields[3], 16):2]]
  return int(fields[1]), f"{', '.join(words)}: {gloss.strip()}"


def wordnet_documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
  """Runs of `_SYNSETS_PER_DOCUMENT` synsets; topic = supersense (e.g. noun.animal)."""
  groups = []  # (key, lexfile number, [synset texts])
  for pos in _WORDNET_POS:
    path = os.path.join(_WORDNET_ROOT, f"data.{pos}")
    if not os.path.isfile(path):
      continue
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("  "):  # The license header.
          continue
        lexfile, text = _synset_text(line)
        if (not groups or groups[-1][1] != lexfile or groups[-1][0].split(":")[0] != pos
            or len(groups[-1][2]) >= _SYNSETS_PER_DOCUMENT):
          groups.append((f"{pos}:{line.split(' ', 1)[0]}", lexfile, []))
        groups[-1][2].append(text)

  def read():
    for key, lexfile, texts in stable_order(groups, key=lambda group: group[0]):
      topic = _LEXNAMES[lexfile] if lexfile < len(_LEXNAMES) else f"lexfile.{lexfile}"
      yield Document(key=key, text="\n".join(texts), topic=topic)
  return take_bytes(read(), max_bytes)


WORDNET = Source(
    name="wordnet", domain="english", language="en", packages=("wordnet-base",),
    license="WordNet-3.0 (Princeton University; permissive, notice must be kept)",
    documents=wordnet_documents,
    available=lambda: all(os.path.isfile(os.path.join(_WORDNET_ROOT, f"data.{pos}"))
                          for pos in _WORDNET_POS))


# --- SWORD Bibles: sword-text-web, sword-text-sparv. ---------------------------------------------

_SWORD_ROOT = "/usr/share/sword"
_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_OSIS_PARAGRAPH = re.compile(r'<div\b(?=[^>]*\bsID=)(?=[^>]*type="x-p")[^>]*/>')
_OSIS_LINE_END = re.compile(r"<(?:l|lg)\b(?=[^>]*\beID=)[^>]*/>|<lb\b[^>]*/>|</title>|</speaker>")
_OSIS_TAG = re.compile(r"<[^>]*>")


def _osis_text(raw: str) -> str:
  """A chapter's OSIS verses (one a line) as plain text.

  Footnotes go. Paragraph starts become blank lines; poetry lines, psalm titles and speaker
  labels end lines. A note can stand for the space between two words ("God<note/>created").
  """
  text = _OSIS_NOTE.sub("\0", raw)
  text = _OSIS_PARAGRAPH.sub("\n\n", text)
  text = _OSIS_LINE_END.sub("\n", text)
  text = _OSIS_TAG.sub("", text)
  text = re.sub(r"(?<=\S)\0(?=\w)", " ", text).replace("\0", "")
  text = html.unescape(text)
  return _tidy("\n".join(" ".join(line.split()) for line in text.split("\n")))


def _bible(module: str) -> Callable[[Optional[int]], Iterator[Document]]:
  """Each chapter is a document (key e.g. "Gen 1"); topic = the book ("Genesis")."""

  def documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
    if not _bible_available(module):
      return iter(())
    try:
      from pysword import modules as pysword_modules  # pylint: disable=g-import-not-at-top
      library = pysword_modules.SwordModules(_SWORD_ROOT)
      library.parse_modules()
      bible = library.get_bible_from_module(module)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Bible %s unreadable (needs `pip install pysword`): %r", module, e)
      return iter(())
    # pysword inflates the book's whole block for every verse it reads (zText, BlockType=BOOK):
    # 40 s for a Bible; remembering the blocks takes 0.2 s and ~30 MB. (pysword 0.2.8's
    # private method: without it, only slower.)
    if hasattr(bible, "_decompressed_text"):
      # pylint: disable-next=protected-access
      bible._decompressed_text = functools.lru_cache(maxsize=None)(bible._decompressed_text)
    chapters = [(f"{book.osis_name} {chapter}", book, chapter)
                for books in bible.get_structure().get_books().values()
                for book in books for chapter in range(1, book.num_chapters + 1)]

    def read():
      for key, book, chapter in stable_order(chapters, key=lambda unit: unit[0]):
        raw = "\n".join(bible.get_iter(books=[book.osis_name], chapters=[chapter], clean=False))
        yield Document(key=key, text=_osis_text(raw), topic=book.name)
    return take_bytes(read(), max_bytes)
  return documents


def _bible_available(module: str) -> bool:
  return (os.path.isfile(os.path.join(_SWORD_ROOT, "mods.d", f"{module}.conf"))
          and os.path.isdir(os.path.join(_SWORD_ROOT, "modules", "texts", "ztext", module)))


def _bible_source(name: str, module: str, package: str, domain: str, language: str) -> Source:
  return Source(name=name, domain=domain, language=language, packages=(package,),
                license="Public domain (debian/copyright)", documents=_bible(module),
                available=lambda: _bible_available(module))


BIBLE_WEB = _bible_source("bible_web", "engWEB2015eb", "sword-text-web", "english", "en")
BIBLE_SPARV = _bible_source("bible_sparv", "spaRV1909eb", "sword-text-sparv", "multilingual",
                            "es")


# --- Jane Austen: r-cran-janeaustenr, unpacked (not installed). ---------------------------------

_AUSTEN_PACKAGE = "r-cran-janeaustenr"
_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
# janeaustenr's variables and its own titles for them (austen_books()).
_AUSTEN_TITLES = {
    "sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion"}
_CHAPTER = re.compile(r"(?:CHAPTER|Chapter) +(?:[IVXLC]+|\d+)\.?")
_VOLUME = re.compile(r"VOLUME +[IVX]+")
# Northanger Abbey ends with the Signet Classic edition's note on its text: not Austen's.
_AUSTEN_END = "A NOTE ON THE TEXT"


def cache_dir() -> str:
  """Where downloaded packages are unpacked: $MOE_JAX_CORPUS_CACHE or ~/.cache/moe_jax/corpus."""
  return os.path.expanduser(os.environ.get("MOE_JAX_CORPUS_CACHE", "~/.cache/moe_jax/corpus"))


def _austen_root(directory: Optional[str] = None) -> str:
  return os.path.join(directory or cache_dir(), _AUSTEN_PACKAGE)


def _austen_available(directory: Optional[str] = None) -> bool:
  data = os.path.join(_austen_root(directory), _AUSTEN_DATA)
  return all(os.path.isfile(os.path.join(data, f"Rdata.{ext}")) for ext in ("rdx", "rdb"))


def unpack_janeaustenr(directory: Optional[str] = None) -> Optional[str]:
  """`apt-get download`s r-cran-janeaustenr into `directory` and unpacks it there.

  Installing it would pull in R; the novels only need the .deb's files. Returns the unpacked
  root (`directory/r-cran-janeaustenr`), or None, with a warning, when either step fails.
  Does nothing when the files are already there.
  """
  directory = os.path.expanduser(directory or cache_dir())
  root = _austen_root(directory)
  if _austen_available(directory):
    return root
  try:
    os.makedirs(directory, exist_ok=True)
    pattern = os.path.join(directory, f"{_AUSTEN_PACKAGE}_*.deb")
    if not glob.glob(pattern):
      result = subprocess.run(["apt-get", "download", _AUSTEN_PACKAGE], cwd=directory,
                              capture_output=True, text=True, check=False)
      if result.returncode != 0 or not glob.glob(pattern):
        logging.warning("apt-get download %s failed: %s", _AUSTEN_PACKAGE,
                        result.stderr.strip()[-500:])
        return None
    deb = max(glob.glob(pattern), key=os.path.getmtime)
    partial = root + ".partial"  # So that an interrupted unpack is never taken for a whole one.
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run(["dpkg-deb", "-x", deb, partial], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
      logging.warning("dpkg-deb -x %s failed: %s", deb, result.stderr.strip()[-500:])
      return None
    shutil.rmtree(root, ignore_errors=True)
    os.replace(partial, root)
  except OSError as e:  # No apt-get or dpkg-deb (not Debian), unwritable directory, ...
    logging.warning("Could not unpack %s into %s: %r", _AUSTEN_PACKAGE, directory, e)
    return None
  return root if _austen_available(directory) else None


def unpacked_versions(directory: Optional[str] = None) -> Dict[str, str]:
  """{package: version} of the .debs unpacked (not installed) here, from their file names."""
  directory = os.path.expanduser(directory or cache_dir())
  if not _austen_available(directory):
    return {}
  debs = sorted(glob.glob(os.path.join(directory, f"{_AUSTEN_PACKAGE}_*.deb")))
  if not debs:
    return {_AUSTEN_PACKAGE: "unknown"}
  return {_AUSTEN_PACKAGE: os.path.basename(debs[-1]).split("_")[1]}


def _r_object(data: bytes):
  """An R serialized object (gzip/bzip2/xz-wrapped or bare, as saveRDS writes) as Python."""
  import rdata  # pylint: disable=g-import-not-at-top
  return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))


def _lazyload_chunk(rdb: bytes, offset: int, length: int, compressed: int):
  """One object of an R lazy-load database: a 4-byte big-endian inflated size, then the data.

  `compressed` is the .rdx's: 1 = zlib; 2 and 3 put a type byte after the size ('Z' xz,
  '2' bzip2, '0' stored).
  """
  chunk = rdb[offset:offset + length]
  if compressed in (2, 3):
    kind, payload = chunk[4:5], chunk[5:]
    if kind == b"Z":
      import lzma  # pylint: disable=g-import-not-at-top
      payload = lzma.decompress(payload)
    elif kind == b"2":
      import bz2  # pylint: disable=g-import-not-at-top
      payload = bz2.decompress(payload)
  else:
    payload = zlib.decompress(chunk[4:])
  assert len(payload) == struct.unpack(">I", chunk[:4])[0], "corrupt lazy-load chunk"
  return _r_object(payload)


def _austen_novels(directory: Optional[str] = None) -> Dict[str, List[str]]:
  """{janeaustenr variable: the novel's lines} from the unpacked package's data."""
  data = os.path.join(_austen_root(directory), _AUSTEN_DATA)
  with open(os.path.join(data, "Rdata.rdx"), "rb") as f:
    index = _r_object(f.read())
  with open(os.path.join(data, "Rdata.rdb"), "rb") as f:
    rdb = f.read()
  compressed = int(index["compressed"][0]) if "compressed" in index else 1  # TRUE is 1.
  novels = {}
  for name, (offset, length) in sorted(index["variables"].items()):
    lines = _lazyload_chunk(rdb, int(offset), int(length), compressed)
    novels[str(name)] = ["" if line is None else str(line) for line in lines]
  return novels


def _austen_chapters(lines: List[str]) -> List[str]:
  """A novel's chapters; the title page joins chapter 1, a "VOLUME II" heading its chapter."""
  chapters: List[List[str]] = [[]]
  in_chapter = False  # False on the title page.
  for line in lines:
    heading = line.strip()
    if heading == _AUSTEN_END:
      break
    if _CHAPTER.fullmatch(heading):
      if in_chapter:
        carried = []
        while chapters[-1] and (not chapters[-1][-1].strip()
                                or _VOLUME.fullmatch(chapters[-1][-1].strip())):
          carried.insert(0, chapters[-1].pop())
        chapters.append(carried)
      in_chapter = True
    chapters[-1].append(line)
  return [_tidy("\n".join(chapter)) for chapter in chapters]


def austen_documents(max_bytes: Optional[int] = None) -> Iterator[Document]:
  """Each chapter (key e.g. "emma:012", numbered through the novel); topic = the novel."""
  if not _austen_available():
    return iter(())
  try:
    novels = _austen_novels()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Jane Austen's novels unreadable (needs `pip install rdata`): %r", e)
    return iter(())
  units = {}
  for name, lines in novels.items():
    for number, text in enumerate(_austen_chapters(lines), 1):
      units[f"{name}:{number:03d}"] = (text, _AUSTEN_TITLES.get(name, name))

  def read():
    for key in stable_order(units):
      text, topic = units[key]
      yield Document(key=key, text=text, topic=topic)
  return take_bytes(read(), max_bytes)


AUSTEN = Source(
    name="austen", domain="english", language="en", packages=(_AUSTEN_PACKAGE,),
    license="Public domain (novels of 1811-1818); the janeaustenr R package is MIT "
            "(debian/copyright)",
    documents=austen_documents, available=_austen_available)


SOURCES = [FORTUNES, FORTUNES_DE, FORTUNES_ES, FORTUNES_IT, FORTUNES_RU,
           DICT_DEVIL, DICT_FOLDOC, DICT_GCIDE, WORDNET, BIBLE_WEB, BIBLE_SPARV, AUSTEN]
