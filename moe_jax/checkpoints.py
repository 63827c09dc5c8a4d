"""Training checkpoints: the TrainState pytree plus a small JSON record, saved atomically.

    ckpt = Checkpointer("/path/run/checkpoints", keep_last=3, keep_every_steps=10_000)
    if ckpt.latest_step() is not None:
      state, data = ckpt.restore(abstract_state)   # abstract_state carries the target shardings
    ...
    ckpt.save(step, state, {"batches_consumed": n, "seed": 0})   # returns once arrays are on host
    ...
    ckpt.close()                                                  # waits for the last save

A thin layer over orbax's `CheckpointManager` (orbax-checkpoint 0.12.x). Each step is one
directory `<directory>/<step>/` holding two items, `state` (StandardSave: tensorstore arrays)
and `data` (JsonSave), so the input-pipeline position is committed together with the weights
and a restart can never pair one step's weights with another step's data position.

What orbax guarantees, and this module relies on (orbax/checkpoint/_src/path/atomicity.py,
checkpoint_manager.py in 0.12.8):
  * A save writes into `<step>.orbax-checkpoint-tmp`, writes `commit_success.txt`, then renames
    the directory to `<step>`. The rename is the commit: a process killed before it leaves only
    the tmp directory, which step discovery skips (`NameFormat.find_all` "ignores uncommitted
    checkpoints").
  * Old steps are garbage-collected only after the new step has committed (the manager's
    finalize runs `wait -> commit -> delete_steps`), so the previous good checkpoint survives an
    interrupted save.
  * A save that finds a stale tmp directory for its own step removes it first. Leftover tmp
    directories of other steps are *not* removed by `cleanup_tmp_directories=True` in 0.12.8
    (seen: they survive a new manager), so `remove_stale_temporaries` deletes them when a
    Checkpointer opens.
  * With the default transfer priority, device-to-host copies finish before an async `save`
    returns; only the file writes run in the background, so the caller may donate or overwrite
    the state's buffers right after `save` returns.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation_lib

_STATE = "state"
_DATA = "data"


class Checkpointer:
  """Orbax CheckpointManager for a TrainState pytree + a small JSON 'data' record (the input
  pipeline position, e.g. {"batches_consumed": 123, "seed": 0}).

  Retention: the last `keep_last` checkpoints are kept, plus, forever, every step that is a
  multiple of `keep_every_steps` (the long-term record for evals and loss-spike forensics).

  Only one live writer per directory: the writer opens it with `remove_stale_saves=True`,
  which deletes unfinished `*.orbax-checkpoint-tmp` directories (the in-flight save of any
  other process writing there). Multi-host: every process constructs it and calls save/restore/wait/close
  (orbax synchronises the hosts internally).
  """

  def __init__(self, directory: str, keep_last: int = 3, keep_every_steps: Optional[int] = None,
               async_save: bool = True, remove_stale_saves: bool = False):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: root directory; local paths are made absolute (orbax needs absolute paths),
        URLs such as gs://... are used as given.
      keep_last: how many most recent checkpoints to keep (>= 1, so that a committed
        checkpoint always exists while the next one is written).
      keep_every_steps: also keep every checkpoint whose step is a multiple of this, forever.
      async_save: if True, `save` returns after the device-to-host copy and the files are
        written by a background thread; `wait` blocks until that save is committed.
      remove_stale_saves: delete `*.orbax-checkpoint-tmp*` directories first (the training
        loop's writer does, at start-up); never for a reader, since they may be the in-flight
        save of a run still training there.
    """
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if keep_every_steps is not None and keep_every_steps < 1:
      raise ValueError(f"keep_every_steps must be None or >= 1, got {keep_every_steps}")
    if "://" not in directory:
      directory = os.path.abspath(directory)
      if remove_stale_saves and jax.process_index() == 0:
        remove_stale_temporaries(directory)
    self._directory = directory
    policies = [preservation_lib.LatestN(n=keep_last)]
    if keep_every_steps is not None:
      policies.append(preservation_lib.EveryNSteps(interval_steps=keep_every_steps))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation_lib.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        # A crash mid-save leaves `<step>.orbax-checkpoint-tmp`; remove it at start-up so dead
        # partial writes do not accumulate (they are ignored by step discovery either way).
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          item_names=(_STATE, _DATA))
    # Orbax's own step discovery: only committed step directories, tmp directories skipped.
    self._name_format = ocp.path.step.standard_name_format()

  @property
  def directory(self) -> str:
    return self._directory

  def save(self, step: int, state: Any, data: dict, force: bool = False) -> bool:
    """Saves `state` and `data` as checkpoint `step` (asynchronously when enabled).

    Waits for the previous async save first (orbax runs one at a time). Once this returns,
    the arrays have been copied to host memory, so `state` may be donated or overwritten.

    Args:
      step: training step; a Python int or a scalar array such as `state.step`.
      state: pytree of jax arrays (a TrainState with flax struct / optax NamedTuple nodes).
      data: JSON-serialisable dict. It round-trips through JSON: tuples come back as lists
        and dict keys as strings.
      force: save even if orbax's save policy would skip the step. A step that already
        exists is never overwritten: `force=True` then raises orbax's StepAlreadyExistsError.

    Returns:
      True if a save was started, False if skipped (without `force`, a step not greater than
      the latest saved or in-flight step is skipped).
    """
    # Fail here, in the caller's thread, rather than in orbax's background writer.
    json.dumps(data)
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _DATA: ocp.args.JsonSave(data)})
    return self._manager.save(int(step), args=args, force=force)

  def all_steps(self) -> List[int]:
    """Committed checkpoint steps on disk, ascending.

    Read from the directory rather than from the manager, whose list already contains an
    in-flight async step and already drops the steps it will delete once that step commits.
    """
    return sorted(m.step for m in self._name_format.find_all(self._directory))

  def latest_step(self) -> Optional[int]:
    """The latest complete (committed) checkpoint step, or None if there is none.

    An async save still in flight, or one killed mid-write, is not counted.
    """
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Tuple[Any, dict]:
    """Restores `(state, data)` from `step` (default: the latest committed step).

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (or of
        arrays) with the same structure as the saved state. Arrays are read straight into
        these shardings, so a checkpoint saved on one mesh restores onto another; the result
        has exactly this pytree structure (dataclasses, NamedTuples and all).
      step: which step; None for `latest_step()`.

    Returns:
      (state, data): the restored pytree and the JSON record saved with it.

    Raises:
      FileNotFoundError: no committed checkpoint exists (step=None), or `step` is not a
        committed checkpoint. Callers starting fresh check `latest_step() is None` first.
      ValueError: a ShapeDtypeStruct leaf of `abstract_state` has no sharding.
    """
    missing = [jax.tree_util.keystr(path)
               for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
               if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None]
    if missing:
      raise ValueError("restore needs the target sharding of every array; these "
                       f"ShapeDtypeStructs have none: {missing[:5]}"
                       + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no committed checkpoint in {self._directory}")
      step = steps[-1]
    elif int(step) not in steps:
      raise FileNotFoundError(f"no committed checkpoint for step {step} in {self._directory}; "
                              f"committed steps: {steps}")
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state),
                                 _DATA: ocp.args.JsonRestore()})
    restored = self._manager.restore(int(step), args=args)
    return restored[_STATE], restored[_DATA]

  def restore_latest_intact(self, abstract_state: Any, fallback: bool = True
                            ) -> Tuple[Any, dict, List[Tuple[int, str]]]:
    """Restores the newest committed step that reads back whole.

    A committed step can still be damaged afterwards (a truncated or deleted file, a disk
    error): its restore then fails. With `fallback`, the previous committed steps are tried in
    turn, newest first, and each failure is returned (and logged) as (step, reason); without,
    the first failure is raised. Never falls back to a fresh start: if every step fails, the
    last error is raised (a run that silently starts over would lose its training).

    Returns:
      (state, data, [(bad step, reason), ...]).
    """
    failures = []
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no committed checkpoint in {self._directory}")
    restored = None
    for step in reversed(steps):
      try:
        with _absl_level(logging.CRITICAL):  # orbax logs each failed read with its spec
          restored = self.restore(abstract_state, step)
        break
      except Exception as e:  # pylint: disable=broad-except  (tensorstore, OSError, ...)
        reason = _short_reason(e)
        if not fallback:
          raise RuntimeError(f"checkpoint step {step} in {self._directory} failed to restore "
                             f"({reason}); set train.on_restore_error='fallback' to restore "
                             "the newest intact earlier step instead.") from e
        logging.warning("checkpoint step %d in %s failed to restore (%s); trying the previous "
                        "committed step.", step, self._directory, reason)
        failures.append((step, reason))
    if restored is None:
      raise RuntimeError(f"no committed checkpoint in {self._directory} restores: "
                         + "; ".join(f"step {s}: {r}" for s, r in failures)
                         + ". If every step fails the same way, the files are likely intact and "
                         "this start's settings differ from the run's (e.g. the optimizer or "
                         "gradient clipping): compare with the run's config.gin.")
    _same_on_every_process(int(restored[1].get("batches_consumed", -1)) if isinstance(
        restored[1], dict) else -1, "restored step")
    for bad_step, _ in failures:  # kept for forensics, out of the way of the next saves
      self.set_aside(bad_step)
    return restored[0], restored[1], failures

  def set_aside(self, step: int) -> str:
    """Renames committed step `step` to `<step>.unreadable[-N]` (which step discovery skips),
    so that training can save that step again; returns the new path."""
    from etils import epath  # pylint: disable=g-import-not-at-top  (orbax's path library)
    source = epath.Path(self._directory) / str(int(step))
    target = source.parent / f"{source.name}.unreadable"
    if jax.process_index() == 0:
      n = 1
      while target.exists():
        n += 1
        target = source.parent / f"{source.name}.unreadable-{n}"
      source.rename(target)
      logging.warning("checkpoint step %d set aside as %s (kept, not deleted).", step, target)
    _same_on_every_process(int(step), "step set aside")  # a barrier: renamed before reload
    self._manager.reload()
    return str(target)

  def wait(self) -> None:
    """Blocks until the in-flight async save (if any) is committed; re-raises its error."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the in-flight save and old-step deletion, then releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def restore_params(directory: str, abstract_params: Any, abstract_extra: Any = None,
                   step: Optional[int] = None) -> Tuple[Any, Any, int]:
  """(params, extra, step) of a run's checkpoint, whatever optimizer wrote it: for fine-tuning
  with another optimizer, evaluation and inference. Read-only: unlike `Checkpointer`, it never
  touches the directory (another process may be training there). Targets as in `restore`.
  """
  directory = os.path.abspath(directory) if "://" not in directory else directory
  steps = sorted(m.step for m in ocp.path.step.standard_name_format().find_all(directory))
  step = steps[-1] if step is None and steps else step
  if step is None or int(step) not in steps:
    raise FileNotFoundError(f"no committed checkpoint {'' if step is None else step} in "
                            f"{directory}; committed steps: {steps}")
  item = {"params": abstract_params}
  if abstract_extra:
    item["extra"] = abstract_extra
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(directory, str(int(step)), _STATE),
      args=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
  return restored["params"], restored.get("extra", {}), int(step)


def _same_on_every_process(value: int, what: str) -> None:
  """Multi-process runs: every process holds the same `value` (all-gathered, so also a
  barrier), else a RuntimeError: processes that restored different steps must not go on."""
  if jax.process_count() == 1:
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  values = np.asarray(multihost_utils.process_allgather(np.int64(value)))
  if len(set(values.tolist())) > 1:
    raise RuntimeError(f"the processes disagree on the {what}: {values.tolist()} (a checkpoint "
                       "that reads back on some hosts only?); stopping rather than diverging.")


@contextlib.contextmanager
def _absl_level(level: int):
  """Orbax logs through absl's logger; raise its threshold for a block."""
  logger = logging.getLogger("absl")
  before = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(before)


def _short_reason(error: BaseException) -> str:
  """One line for a failed restore: orbax's message without the TensorStore spec it dumps,
  and the underlying error (e.g. tensorstore's DATA_LOSS) when there is one."""
  def first(e: BaseException) -> str:
    text = str(e).split(" See full TensorStore details")[0].strip()
    return (text.splitlines() or [type(e).__name__])[0][:200]
  reason = f"{type(error).__name__}: {first(error)}"
  cause = error.__cause__ or error.__context__
  if cause is not None and first(cause) not in reason:
    reason += f" ({type(cause).__name__}: {first(cause)})"
  return reason


def remove_stale_temporaries(directory: str) -> List[str]:
  """Deletes `*.orbax-checkpoint-tmp*` directories: saves that never committed (a process
  killed mid-save, a full disk). Orbax's `cleanup_tmp_directories` leaves those of other steps
  in place in 0.12.8, so this runs when a Checkpointer opens (one writer per directory)."""
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  removed = sorted(glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*")))
  for path in removed:
    logging.warning("removing %s: a checkpoint save that never committed", path)
    shutil.rmtree(path, ignore_errors=True)
  return removed


def committed_steps(directory: str) -> List[int]:
  """Committed steps in a checkpoints directory, read without opening a manager (which would
  clean the directory): what a command checks before it writes anything."""
  directory = os.path.abspath(directory) if "://" not in directory else directory
  if "://" not in directory and not os.path.isdir(directory):
    return []
  return sorted(m.step for m in ocp.path.step.standard_name_format().find_all(directory))


def saved_shapes(directory: str, step: int) -> dict:
  """{"params/layers/block_0/...": shape} of every array saved in checkpoint `step`'s state,
  from orbax's metadata (no array is read)."""
  if "://" not in directory:
    directory = os.path.abspath(directory)  # orbax reads relative paths as nothing
  path = os.path.join(directory, str(int(step)), _STATE)
  with _absl_level(logging.ERROR):  # "Metadata file does not exist": an optional file
    metadata = ocp.PyTreeCheckpointer().metadata(path)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  return {path_string(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def path_string(path) -> str:
  """A pytree key path as "params/layers/block_0/attention/query"."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
  return "/".join(parts)


def first_shape_difference(saved: dict, expected: dict, prefix: str = "params/"
                           ) -> Optional[str]:
  """A sentence naming the first parameter (under `prefix`) whose shape differs between a
  checkpoint (`saved`) and the model (`expected`), or that only one of them has; None if
  they agree."""
  saved = {k: v for k, v in saved.items() if k.startswith(prefix)}
  expected = {k: v for k, v in expected.items() if k.startswith(prefix)}
  for name in sorted(set(saved) | set(expected)):
    if name not in saved:
      return f"the model has {name} {list(expected[name])}, which the checkpoint lacks"
    if name not in expected:
      return f"the checkpoint has {name} {list(saved[name])}, which the model lacks"
    if tuple(saved[name]) != tuple(expected[name]):
      return (f"{name} is {list(saved[name])} in the checkpoint but {list(expected[name])} in "
              "the model")
  return None
