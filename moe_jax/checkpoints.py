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
  * Leftover tmp directories are removed when a manager is created with
    `cleanup_tmp_directories=True` (and a save that finds a stale tmp directory for its own step
    removes it first).
  * With the default transfer priority, device-to-host copies finish before an async `save`
    returns; only the file writes run in the background, so the caller may donate or overwrite
    the state's buffers right after `save` returns.
"""
from __future__ import annotations

import json
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

  Only one live writer per directory: opening a Checkpointer deletes unfinished
  `*.orbax-checkpoint-tmp` directories, which are the in-flight save of any other process
  writing there. Multi-host: every process constructs it and calls save/restore/wait/close
  (orbax synchronises the hosts internally).
  """

  def __init__(self, directory: str, keep_last: int = 3, keep_every_steps: Optional[int] = None,
               async_save: bool = True):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: root directory; local paths are made absolute (orbax needs absolute paths),
        URLs such as gs://... are used as given.
      keep_last: how many most recent checkpoints to keep (>= 1, so that a committed
        checkpoint always exists while the next one is written).
      keep_every_steps: also keep every checkpoint whose step is a multiple of this, forever.
      async_save: if True, `save` returns after the device-to-host copy and the files are
        written by a background thread; `wait` blocks until that save is committed.
    """
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if keep_every_steps is not None and keep_every_steps < 1:
      raise ValueError(f"keep_every_steps must be None or >= 1, got {keep_every_steps}")
    if "://" not in directory:
      directory = os.path.abspath(directory)
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
