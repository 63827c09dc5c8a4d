"""Installs the corpus packages (when root) and builds the TFDS dataset.

    python -m tasks.corpus.build --install              # apt-get install + build `small`
    python -m tasks.corpus.build --config=full --data_dir=~/tensorflow_datasets
    python -m tasks.corpus.build --list                 # sources, packages, availability

Without root, `--install` prints the apt-get command to run instead; a missing package only
removes its source from the corpus (with a warning), it never stops the build.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from typing import List

from tasks.corpus import sources as sources_lib


def install_packages() -> List[str]:
  """apt-get installs the missing corpus packages (root only); returns those still missing."""
  from tasks.corpus import prose_sources  # pylint: disable=g-import-not-at-top
  debian = [p for p in sources_lib.required_packages() if p != "r-cran-janeaustenr"]
  missing = sorted(set(debian) - set(sources_lib.package_versions(debian)))
  if missing:
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
      print("Not root: to add the missing corpus sources, run\n  sudo apt-get update && "
            + " ".join(command), file=sys.stderr)
    else:
      env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
      subprocess.run(["apt-get", "update", "-q"], check=False, env=env,
                     stdout=subprocess.DEVNULL)
      subprocess.run(command, check=False, env=env, stdout=subprocess.DEVNULL)
  # Jane Austen ships in an R package: unpack its .deb (no R needed), never install it.
  prose_sources.unpack_janeaustenr(prose_sources.cache_dir())
  return sorted(set(debian) - set(sources_lib.package_versions(debian)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="small", choices=["small", "full"])
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's own).")
  parser.add_argument("--install", action="store_true",
                      help="Install the Debian packages first (as root).")
  parser.add_argument("--list", action="store_true", help="List the sources and exit.")
  parser.add_argument("--markdown", action="store_true",
                      help="After building, print the sources as a Markdown table (README).")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  if args.install:
    still_missing = install_packages()
    if still_missing:
      logging.warning("Still missing: %s", " ".join(still_missing))
  if args.list:
    for source in sources_lib.all_sources():
      print(f"{source.name:28s} {source.domain:12s} {source.language:4s} "
            f"{'yes' if source.available() else 'NO ':4s} {' '.join(source.packages)}")
    return 0
  from tasks.corpus import builder as builder_lib  # pylint: disable=g-import-not-at-top
  start = time.time()
  builder = builder_lib.prepare(args.config, args.data_dir)
  info = builder.info
  print(f"moe_jax_corpus/{args.config} at {builder.data_dir} "
        f"({time.time() - start:.0f} s): " + ", ".join(
            f"{name} {split.num_examples} documents" for name, split in info.splits.items()))
  if args.markdown:
    print(markdown_table(info.metadata["sources"]))
  return 0


def markdown_table(stats) -> str:
  """Sources, packages, licenses and sizes (from the built dataset's metadata)."""
  lines = ["| source | domain | lang | Debian package(s) | license | documents | MB |",
           "|---|---|---|---|---|---|---|"]
  for source in sources_lib.all_sources():
    row = stats.get(source.name, {})
    docs = row.get("train_documents", 0) + row.get("validation_documents", 0)
    size = (row.get("train_bytes", 0) + row.get("validation_bytes", 0)) / 2**20
    packages = ", ".join(f"`{p}`" for p in source.packages) or "(the running Python)"
    lines.append(f"| `{source.name}` | {source.domain} | {source.language} | {packages} | "
                 f"{source.license} | {docs:,} | {size:.1f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
