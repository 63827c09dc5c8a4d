"""Settings checked before anything compiles: one place that says what a command refuses.

Every message names the setting (as a gin binding, and the macro a run gin sets it from) and
what is allowed. Where the checks run:

| setting                                   | allowed                      | checked by            |
|-------------------------------------------|------------------------------|-----------------------|
| `--gin_file` paths                        | existing files (closest named) | config.parse_gin      |
| `--gin.NAME=` macro bindings              | a macro the files define or use (closest named) | config.parse_gin |
| `%NAME` references in the files           | a macro some file defines (e.g. MODEL: a model preset) | config.parse_gin |
| numbers in the files and `--gin.NAME=value` | finite (no nan, inf, 1e999) | config.parse_gin      |
| macros left `%gin.REQUIRED` (MODEL_DIR, …) | set                         | train, evaluate, infer (their run gins), first |
| tasks and mixtures named by a command     | registered names (closest named) | train, evaluate, infer, analyze |
| VOCAB_SIZE against each task's vocabulary | equal to its size (spm8k 8384, spm32k 32384) | train, evaluate, infer, analyze |
| train.train_steps (TRAIN_STEPS)           | an integer >= 1, set         | trainer.train         |
| train.sequence_length (SEQUENCE_LENGTH)   | an integer >= 1              | trainer.train         |
| train.batch_size (BATCH_SIZE)             | an integer >= 1              | trainer.train         |
| train.microbatches (MICROBATCHES)         | an integer >= 1 dividing BATCH_SIZE | trainer.train  |
| train.checkpoint_every (CHECKPOINT_EVERY) | an integer >= 1              | trainer.train         |
| train.log_every, train.eval_batches, train.keep_checkpoints | integers >= 1 | trainer.train   |
| train.eval_every (EVAL_EVERY)             | an integer >= 0 (0: never)   | trainer.train         |
| train.input_shards                        | an integer >= 1 dividing BATCH_SIZE | trainer.train  |
| learning rates of the schedules           | finite numbers > 0 (end rate >= 0) | optimizers.*_schedule |
| warm-up against decay steps               | 0 <= warmup_steps < decay_steps (refused, not clamped) | optimizers.warmup_cosine_schedule |
| train.on_nonfinite, train.on_restore_error | 'stop' / 'skip'; 'fallback' / 'stop' | trainer.train    |
| a restart's model against its checkpoint  | the same parameter shapes (first difference named) | trainer.train, before any write |
| the model against CHECKPOINT_DIR / init_checkpoint | a committed step; the same parameter shapes | evaluate, infer, analyze, train |
| evaluate's lengths, batch, max_batches    | integers >= 1                 | evaluate              |
| infer's prompts / task                    | at least one; no empty prompt without a mode token | infer |
| infer's max_new_tokens, top_k, temperature, top_p, vocabulary | >= 1, >= 0, >= 0, (0, 1], the model's | infer |
| analyze's --texts_file, sizes             | a file with a non-empty line; integers >= 1 | analyze |
| params' --seq_len, dry_run's --seq_len/--batch, demo's sizes | integers >= 1 (batch >= 0) | params, dry_run, demo |

Every command turns a `SettingError` into one line on stderr ("error: ...") and exit status 1,
no traceback (`exit_on_setting_error`; `trainer.run_command` for train, evaluate, infer).

(The layers, routers, meshes and partitioning check their own settings where they are
defined: moe_layer.py, routing.py, partitioning.validate, expert_parallel.py.)
"""
from __future__ import annotations

import difflib
import glob
import math
import os
import re
from typing import Optional, Sequence

import gin


class SettingError(ValueError):
  """A setting a command refuses before compiling or writing anything; the message names it."""


def closest(name: str, candidates: Sequence[str]) -> str:
  """" Closest: a, b." for the candidates nearest `name`, or ""."""
  matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
  return f" Closest: {', '.join(matches)}." if matches else ""


def exit_on_setting_error(fn, *args, **kwargs):
  """Runs `fn`; a SettingError (or gin's wrapping of one) becomes SystemExit(message)."""
  try:
    return fn(*args, **kwargs)
  except SettingError as e:
    raise SystemExit(f"error: {_first_line_block(e)}") from None


def _first_line_block(error: Exception) -> str:
  # gin appends "  In call to configurable ..." lines to errors raised inside configurables.
  return str(error).split("\n  In call to configurable")[0]


def _is_unset(value) -> bool:
  return value is gin.REQUIRED


def _describe(name: str, macro: Optional[str]) -> str:
  return f"{name} ({macro} in the run gins)" if macro else name


def integer(name: str, value, minimum: int = 1, macro: Optional[str] = None) -> int:
  """`value` as an int >= minimum, or a ValueError naming the setting."""
  where = _describe(name, macro)
  if _is_unset(value):
    flag = f"--gin.{macro}=N" if macro else f"--gin.{name}=N"
    raise SettingError(f"{where} is required and not set: give it, e.g. {flag}.")
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise SettingError(f"{where} must be an integer >= {minimum}, got {value!r}.")
  return value


def number(name: str, value, minimum: Optional[float] = None,
           maximum: Optional[float] = None, exclusive_minimum: bool = False) -> float:
  """A finite number within [minimum, maximum] ((minimum, maximum] if exclusive_minimum)."""
  if _is_unset(value):
    raise SettingError(f"{name} is required and not set.")
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value)
        and (minimum is None or value > minimum or (value == minimum and not exclusive_minimum))
        and (maximum is None or value <= maximum))
  if not ok:
    low = "" if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum}"
    high = "" if maximum is None else f"<= {maximum}"
    bounds = " and ".join(b for b in (low, high) if b)
    raise SettingError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got "
                       f"{value!r}.")
  return float(value)


def rate(name: str, value, allow_zero: bool = False) -> float:
  """A learning rate: a finite number > 0 (>= 0 with allow_zero)."""
  if _is_unset(value):
    raise SettingError(f"{name} is required and not set: give it, e.g. --gin.{name}=1e-3.")
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and (value >= 0 if allow_zero else value > 0))
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise SettingError(f"{name} must be a finite number {bound}, got {value!r}.")
  return float(value)


def train_settings(*, train_steps, sequence_length, batch_size, microbatches, eval_every,
                   eval_batches, checkpoint_every, keep_checkpoints, log_every,
                   input_shards=1) -> None:
  """The training loop's own settings (the table above)."""
  integer("train.train_steps", train_steps, 1, "TRAIN_STEPS")
  integer("train.sequence_length", sequence_length, 1, "SEQUENCE_LENGTH")
  integer("train.batch_size", batch_size, 1, "BATCH_SIZE")
  integer("train.microbatches", microbatches, 1, "MICROBATCHES")
  if batch_size % microbatches:
    raise SettingError(f"train.microbatches (MICROBATCHES) = {microbatches} must divide "
                     f"train.batch_size (BATCH_SIZE) = {batch_size}.")
  integer("train.eval_every", eval_every, 0, "EVAL_EVERY")
  integer("train.eval_batches", eval_batches, 1)
  integer("train.checkpoint_every", checkpoint_every, 1, "CHECKPOINT_EVERY")
  integer("train.keep_checkpoints", keep_checkpoints, 1)
  integer("train.log_every", log_every, 1)
  integer("train.input_shards", input_shards, 1)
  if batch_size % input_shards:
    raise SettingError(f"train.input_shards = {input_shards} must divide train.batch_size "
                     f"(BATCH_SIZE) = {batch_size}: each shard feeds BATCH_SIZE / input_shards "
                     "rows.")


def gin_files(files: Sequence[str], roots: Sequence[str]) -> None:
  """Every `--gin_file` exists under one of `roots`; else a ValueError with the closest."""
  from moe_jax import config  # pylint: disable=g-import-not-at-top
  known = sorted(glob.glob(os.path.join(config.REPO_ROOT, "gin_configs", "**", "*.gin"),
                           recursive=True))
  for path in files:
    if not any(os.path.exists(os.path.join(root, path)) for root in roots):
      relative = [os.path.relpath(p, config.REPO_ROOT) for p in known]
      matches = difflib.get_close_matches(path, relative, n=3, cutoff=0.5)
      closest = f" Closest: {', '.join(matches)}." if matches else ""
      raise SettingError(f"gin file {path!r} not found.{closest}")


# --- gin: what the files and the command line bind --------------------------------------
_NON_FINITE = re.compile(r"(?<![\w.%])[-+]?(nan|inf|infinity)(?![\w.])", re.IGNORECASE)


def binding_values(bindings: Sequence[str]) -> None:
  """No `nan` / `inf` in a binding's value: gin reads values as Python literals, which have
  neither, and no setting of this codebase accepts a non-finite number."""
  for binding in bindings:
    name, _, value = binding.partition("=")
    if _NON_FINITE.search(re.sub(r"'[^']*'|\"[^\"]*\"", "''", value)):
      raise SettingError(f"--gin.{name.strip()}={value.strip()}: settings must be finite "
                         "numbers (nan and inf are refused).")


def finite_values(values: dict) -> None:
  """No parsed value (`{binding: value}`, from the files and the command line) is a non-finite
  float: `1e999` parses as inf."""
  for where, value in values.items():
    if isinstance(value, float) and not math.isfinite(value):
      raise SettingError(f"{where} = {value}: settings must be finite numbers (nan and inf are "
                         "refused).")


def macro_bindings(bindings: Sequence[str], known: Sequence[str]) -> None:
  """Every `NAME = value` binding (a macro: no dot, no scope) names a macro that `known`
  holds, i.e. one the gin files define or use: a misspelt macro would otherwise bind a new,
  unused macro and the run would go on with the file's value."""
  for binding in bindings:
    name = binding.partition("=")[0].strip()
    if "." in name or "/" in name or not name:
      continue
    if name not in known:
      raise SettingError(f"--gin.{name}: no gin file given defines or uses a macro {name}, "
                         f"so this binding would change nothing.{closest(name, known)}")


def macro_references(defined: Sequence[str], references: dict) -> None:
  """Every `%NAME` a file uses is defined by some file (`references`: name -> the binding
  that uses it)."""
  missing = {name: user for name, user in references.items() if name not in defined}
  if not missing:
    return
  name, user = sorted(missing.items())[0]
  hint = (" Give a model preset first, e.g. --gin_file=gin_configs/models/"
          "openmoe_base_16e_tiny.gin, then the run gin." if name in ("MODEL", "VOCAB_SIZE",
                                                                    "PARTITIONING_RULES") else "")
  raise SettingError(f"{user} uses the macro %{name}, which no gin file given defines."
                     f"{hint}{closest(name, defined)}")


def required_macros(unset: Sequence[str], files: Sequence[str]) -> None:
  """Macros a run gin leaves `%gin.REQUIRED` (MODEL_DIR, TRAIN_STEPS, CHECKPOINT_DIR) are set
  on the command line or in a later file."""
  if unset:
    example = " ".join(f"--gin.{n}=..." for n in unset)
    del files  # (kept for callers: the message names the settings, which say enough)
    raise SettingError(f"{', '.join(unset)} {'is' if len(unset) == 1 else 'are'} required and "
                       f"not set (the run gin leaves {'it' if len(unset) == 1 else 'them'} "
                       f"%gin.REQUIRED): give {'it' if len(unset) == 1 else 'them'}, e.g. "
                       f"{example}")
