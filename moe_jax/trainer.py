"""The training loop, t5x-style: gin-configured train / eval / checkpoint, on any mesh.

Run through `moe_jax.train` (the command line; this module holds what gin configures):

    python -m moe_jax.train \
      --gin_file=gin_configs/models/switch_base_decoder_only_tiny.gin \
      --gin_file=gin_configs/runs/tiny_cpu.gin \
      --gin.MODEL_DIR="'runs/tiny'" --gin.TRAIN_STEPS=300

Top to bottom, `train()`: check every setting, the tasks and (on a restart) the checkpoint's
parameter shapes, before anything compiles or is written (moe_jax/checks.py) → write the gin
config (atomically; a restart adds `config.step<N>.gin`, never overwrites) → restore the
newest intact checkpoint (params, optimizer, step, input position) or initialise sharded →
write `operative_config[.step<N>].gin` → loop of jitted train steps on donated state → every
`eval_every` steps evaluate each eval task on its validation split (no dropout, eval capacity
factor) → every `checkpoint_every` steps save asynchronously → final checkpoint, the
evaluation table.

A resumed run continues on the same examples with the same RNG: the input pipeline is rebuilt
with the same seed and skips the batches already consumed, and every step's RNG is the run's
key folded with the step number.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import checkpoints as checkpoints_lib
from moe_jax import checks
from moe_jax import console
from moe_jax import config as config_lib
from moe_jax import metrics as metrics_lib
from moe_jax import optimizers
from moe_jax import params as params_lib
from moe_jax import partitioning as part
from moe_jax import train_step as ts
from moe_jax import upcycling


class NonFiniteError(RuntimeError):
  """The loss or the gradient norm became NaN or infinite."""


@gin.configurable(module="moe_jax.trainer")
def train(*, model=gin.REQUIRED, model_dir: str = gin.REQUIRED,
          mixture_or_task: str = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          sequence_length: int = 512, batch_size: int = 16, microbatches: int = 1,
          optimizer=None, mesh: str = "data:-1", seed: int = 0,
          eval_tasks: Sequence[str] = (), eval_every: int = 0, eval_batches: int = 20,
          checkpoint_every: int = 100, keep_checkpoints: int = 3,
          keep_every_steps: Optional[int] = None, init_checkpoint: Optional[str] = None,
          init_mode: str = "params",
          log_every: int = 10, on_nonfinite: str = "stop", progress_bar: bool = True,
          input_shards: Optional[int] = None, on_restore_error: str = "fallback",
          nan_at_step: Optional[int] = None) -> dict:
  """Trains `model` (a DecoderOnlyLM or an EncoderDecoderLM: the batches are laid out as its
  `features` say) on a seqio mixture or task; returns the last metrics.

  Args:
    init_checkpoint: a checkpoint directory (with step subdirectories) whose params start a new
      run (fine-tuning); ignored when MODEL_DIR already holds a checkpoint (resume wins).
    init_mode: how init_checkpoint's params start the run: "params" (the same model: every
      parameter as saved) or "sparse_upcycle" (a dense model's checkpoint starts this MoE
      model: experts copied from the dense FFNs, routers fresh; moe_jax/upcycling.py).
    on_nonfinite: "stop" (raise, naming the step; the last checkpoint stays the last good one)
      or "skip" (the step leaves the state unchanged and training goes on).
    input_shards: the global batch's rows come from this many seqio shards of the mixture
      (rows [i·B/n, (i+1)·B/n) from shard i), each process reading the shards that hold its
      rows. None: one per process (t5x's layout: each host reads its own shard). Fixing it
      makes a step's data independent of the number of processes (a run resumed on another
      process count, or compared with one, sees the same batches).
    on_restore_error: when the newest checkpoint fails to restore (a damaged file):
      "fallback" (warn, naming the step, and restore the newest earlier step that reads back)
      or "stop" (raise). Never a fresh start.
    nan_at_step: test hook: the batch of this step gets NaN loss weights.
  """
  if on_nonfinite not in ("stop", "skip"):
    raise checks.SettingError(f"train.on_nonfinite = {on_nonfinite!r}; choose 'stop' or 'skip'.")
  if on_restore_error not in ("fallback", "stop"):
    raise checks.SettingError(f"train.on_restore_error = {on_restore_error!r}; choose "
                              "'fallback' or 'stop'.")
  if init_mode not in ("params", "sparse_upcycle"):
    raise checks.SettingError(f"train.init_mode = {init_mode!r}; choose 'params' or "
                              "'sparse_upcycle'.")
  if init_mode == "sparse_upcycle" and not init_checkpoint:
    raise checks.SettingError("train.init_mode = 'sparse_upcycle' needs the dense run's "
                              "checkpoints: set train.init_checkpoint (INITIAL_CHECKPOINT_PATH).")
  input_shards = input_shards or jax.process_count()
  checks.train_settings(train_steps=train_steps, sequence_length=sequence_length,
                        batch_size=batch_size, microbatches=microbatches,
                        eval_every=eval_every, eval_batches=eval_batches,
                        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                        log_every=log_every, input_shards=input_shards)
  from tasks import pipeline  # pylint: disable=g-import-not-at-top  (the data side: TF)
  from tasks import registry  # pylint: disable=g-import-not-at-top
  module = model.module
  registry.check_tasks(mixture_or_task, "train.mixture_or_task (MIXTURE_OR_TASK_NAME)",
                       module.vocab_size)
  registry.check_tasks(eval_tasks, "train.eval_tasks (EVAL_TASKS)", module.vocab_size,
                       mixtures=False)

  # --- mesh, rules and checks before anything compiles or is written --------------------
  device_mesh = part.make_mesh(**part.parse_mesh(mesh))
  rules = config_lib.configured_rules()
  part.validate(module, device_mesh, rules, batch_size)
  tx = optimizer if optimizer is not None else optimizers.create_optimizer()
  schedule = getattr(tx, "learning_rate_fn", None)
  tx = getattr(tx, "tx", tx)
  tokens = jax.ShapeDtypeStruct((batch_size, sequence_length), jnp.int32)
  target, state_shardings = state_target(module, tx, device_mesh, rules, tokens)
  checkpoint_dir = os.path.join(model_dir, "checkpoints")
  resuming = bool(checkpoints_lib.committed_steps(checkpoint_dir))
  if resuming:  # a restart must fit its checkpoint: refuse before touching the directory
    check_against_checkpoint(target, checkpoint_dir)
  elif init_checkpoint and init_mode == "sparse_upcycle":
    upcycling.check(target.params, init_checkpoint)
  elif init_checkpoint:
    check_against_checkpoint(target, init_checkpoint, restart=False,
                             setting="train.init_checkpoint (INIT_CHECKPOINT)")

  # --- the run directory: written only from here on ------------------------------------
  os.makedirs(model_dir, exist_ok=True)
  writes_files = jax.process_index() == 0  # one writer per run directory (multi-process runs)
  if writes_files and not resuming:
    write_config(model_dir, "config.gin", gin.config_str())

  # --- state: restore, fine-tune from, or initialise -----------------------------------
  checkpointer = checkpoints_lib.Checkpointer(
      checkpoint_dir, keep_last=keep_checkpoints, keep_every_steps=keep_every_steps,
      remove_stale_saves=True)  # the run's one writer: failed saves of earlier starts go
  if checkpointer.latest_step() is not None:
    state, data, failures = checkpointer.restore_latest_intact(
        target, fallback=on_restore_error == "fallback")
    for bad_step, _ in failures:  # (each logged as it failed, with the reason, and set aside)
      logging.warning("restored step %d instead of the unreadable step %d.", int(state.step),
                      bad_step)
    print(f"Resumed from step {int(state.step)} ({data}).", flush=True)
    if data.get("input_shards", input_shards) != input_shards:
      logging.warning("The run's batches so far came from %s input shards, now from %d: the "
                      "data from here on differs from an uninterrupted run's (set "
                      "train.input_shards=%s to keep it).", data["input_shards"], input_shards,
                      data["input_shards"])
  else:
    with part.activate(device_mesh, rules):
      variables = nn.meta.unbox(part.init_sharded(module, device_mesh, rules, tokens,
                                                  rng=jax.random.PRNGKey(seed)))
      state = jax.jit(lambda v: ts.TrainState.create(v, tx),
                      out_shardings=state_shardings)(variables)
    if init_checkpoint and init_mode == "sparse_upcycle":  # experts from the dense FFNs
      params, step = upcycling.upcycle(init_checkpoint, state.params, state_shardings.params)
      state = state.replace(params=params)
      print(f"Sparse upcycling from {init_checkpoint} (step {step}).", flush=True)
    elif init_checkpoint:  # params (and collections) only: the optimizer starts afresh
      params, extra, step = checkpoints_lib.restore_params(init_checkpoint, target.params,
                                                           target.extra)
      state = state.replace(params=params, extra={**state.extra, **extra})
      print(f"Fine-tuning from {init_checkpoint} (step {step}).", flush=True)
  start_step = int(state.step)
  if writes_files:  # what this start runs with; a resumed start never overwrites the first's
    suffix = f".step{start_step}" if resuming else ""
    if resuming:
      write_config(model_dir, f"config{suffix}.gin", gin.config_str(), keep_existing=True)
    write_config(model_dir, f"operative_config{suffix}.gin", gin.operative_config_str(),
                 keep_existing=resuming)

  # --- input pipeline: this host's rows, resumed at the batches already consumed -----------
  rows = part.host_batch_rows(device_mesh, rules, batch_size)
  features = model_features(model)
  batches = _host_batches(pipeline, mixture_or_task, sequence_length, batch_size, rows,
                          input_shards, seed, skip=start_step, features=features)

  # --- compiled steps ------------------------------------------------------------------
  rng = jax.random.PRNGKey(seed)
  step_fn = jax.jit(
      lambda s, b: ts.train_step(model, tx, s, b, rng, microbatches=microbatches,
                                 learning_rate_fn=schedule),
      out_shardings=(state_shardings, None), donate_argnums=0)
  eval_fn = jax.jit(lambda p, e, b: ts.eval_step(model, p, e, b))
  train_flops = metrics_lib.train_flops_per_token(
      params_lib.count(module, sequence_length).flops_per_token)
  # The peak of a matmul in the model's activation dtype (bf16 on accelerators: a float32
  # peak would overstate MFU several times) on one device, times the devices; simulated CPU
  # devices share the host's cores, so there one matmul measures the whole machine.
  peak_flops = metrics_lib.measure_peak_flops(dtype=jnp.dtype(module.dtype)) * (
      1 if jax.default_backend() == "cpu" else jax.device_count())
  writer = metrics_lib.MetricsWriter(model_dir) if jax.process_index() == 0 else None
  progress = _progress(start_step, train_steps, progress_bar)

  def evaluate(step: int) -> None:
    results = evaluate_tasks(eval_fn, state, eval_tasks, device_mesh, rules, sequence_length,
                             batch_size, eval_batches, seed, features=features)
    for task, scalars in results.items():
      if writer is not None:
        writer.write(step, scalars, split=f"eval/{task}")
    if results and jax.process_index() == 0:
      progress.write(eval_table(step, results))

  # --- the loop ------------------------------------------------------------------------
  last, summed, summed_steps, step_seconds = {}, None, 0, 0.0
  step_start = time.perf_counter()
  for step in range(start_step, train_steps):
    batch = next(batches)
    batch["decoder_loss_weights"] = batch["decoder_loss_weights"].astype(np.float32)
    if nan_at_step is not None and step == nan_at_step:
      batch["decoder_loss_weights"][:] = np.nan
    with part.activate(device_mesh, rules):
      state, metrics = step_fn(state, part.global_batch(batch, device_mesh, rules))
    if bool(metrics["nonfinite"]):
      message = (f"Non-finite loss or gradient at step {step} (loss "
                 f"{float(metrics['loss/total'])}, grad norm {float(metrics['grad_norm'])}).")
      if on_nonfinite == "stop":
        checkpointer.wait()
        raise NonFiniteError(message + f" Stopped; the last checkpoint (step "
                             f"{checkpointer.latest_step()}) is the last good state. Set "
                             "--gin.train.on_nonfinite=\"'skip'\" to skip such steps.")
      logging.warning("%s Skipped (state unchanged).", message)
    else:
      # Logged metrics are means over the (finite) steps since the last log: one step's loss
      # on a mixture of objectives is noisy. Summed on device, so nothing waits for them.
      summed = metrics if summed is None else jax.tree.map(jnp.add, summed, metrics)
      summed_steps += 1
    done = step + 1
    if summed_steps and (done % log_every == 0 or done == train_steps):
      seconds = (time.perf_counter() - step_start) / summed_steps
      step_seconds += seconds * summed_steps
      means = jax.tree.map(lambda x: x / summed_steps, summed)
      last = metrics_lib.scalars(means)
      summed, summed_steps = None, 0
      tokens_per_s = batch_size * sequence_length / seconds
      last.update({"step_time_s": seconds, "tokens_per_s": tokens_per_s,
                   "mfu": tokens_per_s * train_flops / peak_flops})
      if writer is not None:
        writer.write(done, last, vectors=metrics_lib.vectors(means))
      progress.update(done, last)
    if eval_every and eval_tasks and (done % eval_every == 0 or done == train_steps):
      evaluate(done)
    if done % checkpoint_every == 0 or done == train_steps:
      checkpointer.save(done, state, {"batches_consumed": done, "seed": seed,
                                      "mixture_or_task": mixture_or_task,
                                      "input_shards": input_shards})
    if not summed_steps:  # just logged: time the next interval from here, after eval/save
      step_start = time.perf_counter()
  checkpointer.wait()
  checkpointer.close()
  progress.close()
  if jax.process_index() == 0 and train_steps > start_step:
    print(f"Trained steps {start_step + 1}-{train_steps} in {step_seconds / 60:.1f} min of steps "
          f"({step_seconds / (train_steps - start_step):.2f} s/step, evaluation and "
          f"checkpoints excluded); final train loss "
          f"{last.get('loss/cross_entropy', float('nan')):.3f}.", flush=True)
  if writer is not None:
    writer.close()
  return last


def write_config(model_dir: str, name: str, text: str, keep_existing: bool = False) -> None:
  """Writes a config file of the run atomically (a temporary file renamed over it), so a crash
  never leaves a half-written config. With `keep_existing`, a file of that name with other
  contents is kept and this one is written as `<stem>-2.gin` (-3, ...); the same contents are
  not written twice (a finished run started again)."""
  path = os.path.join(model_dir, name)
  if keep_existing:
    stem, n = path[:-len(".gin")], 1
    while os.path.exists(path):
      with open(path) as f:
        if f.read() == text:
          return
      n += 1
      path = f"{stem}-{n}.gin"
  temporary = f"{path}.tmp-{os.getpid()}"
  with open(temporary, "w") as f:
    f.write(text)
  os.replace(temporary, path)


def check_against_checkpoint(target, checkpoint_dir: str, step: Optional[int] = None,
                             restart: bool = True, setting: str = "CHECKPOINT_DIR") -> None:
  """The model's parameters (and, for a restart, the optimizer state) have the shapes of the
  checkpoint's (`step`, default the newest), else a SettingError naming the first differing
  parameter. Read from orbax's metadata: no array is read, nothing is written."""
  steps = checkpoints_lib.committed_steps(checkpoint_dir)
  if not restart and (not steps or (step is not None and int(step) not in steps)):
    which = "" if step is None else f" for step {step}"
    raise checks.SettingError(
        f"no committed checkpoint{which} in {checkpoint_dir}: {setting} must name a run's "
        f"checkpoints directory (<MODEL_DIR>/checkpoints); committed steps there: {steps}.")
  if not steps:
    return
  step = steps[-1] if step is None else int(step)
  try:
    saved = checkpoints_lib.saved_shapes(checkpoint_dir, step)
  except Exception:  # pylint: disable=broad-except  (unreadable metadata: restore decides)
    return
  if not any(name.startswith("params/") for name in saved):
    return  # no parameter metadata read: nothing to compare (the restore reports what is wrong)
  expected = {checkpoints_lib.path_string(p): tuple(leaf.shape)
              for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
  difference = checkpoints_lib.first_shape_difference(saved, expected)
  if difference is None and restart:
    optimizer_saved = sorted(v for k, v in saved.items() if k.startswith("opt_state/"))
    optimizer_expected = sorted(v for k, v in expected.items() if k.startswith("opt_state/"))
    if optimizer_saved != optimizer_expected:
      difference = (f"the optimizer state has {len(optimizer_saved)} arrays in the checkpoint "
                    f"and {len(optimizer_expected)} here (another optimizer or its settings)")
  if difference is None:
    return
  run_config = os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), "config.gin")
  settings = f" ({run_config})" if os.path.exists(run_config) else ""
  if restart:
    raise checks.SettingError(
        f"{os.path.dirname(os.path.abspath(checkpoint_dir))} holds a run whose checkpoint "
        f"(step {step}) does not fit this model: {difference}. A restart must use the run's "
        f"settings{settings}; for a new run choose another MODEL_DIR, or start from its "
        "weights with train.init_checkpoint. Nothing in the run directory was changed.")
  raise checks.SettingError(
      f"the checkpoint {checkpoint_dir} (step {step}) does not fit this model: {difference}. "
      f"Give the model the run's settings{settings}, e.g. --gin_file=<that config.gin> as the "
      "model, or the --gin.VOCAB_SIZE / size macros it was trained with.")


def eval_table(step: int, results: dict) -> str:
  """The evaluation results of a step as a table: one row per task."""
  width = max(len(t) for t in results) + 2
  lines = [f"eval at step {step}:", f"  {'task':{width}s}{'loss':>8s}{'accuracy':>10s}"
                                      f"{'tokens':>10s}"]
  for task, metrics in results.items():
    lines.append(f"  {task:{width}s}{metrics['loss/cross_entropy']:8.3f}"
                 f"{metrics['accuracy']:10.3f}{metrics['num_tokens']:10,.0f}")
  return "\n".join(lines)


def model_features(model) -> str:
  """The batch layout a model reads (tasks.pipeline.FEATURE_LAYOUTS): its `features`."""
  return getattr(model, "features", "decoder_only")


def _host_batches(pipeline, mixture_or_task: str, sequence_length: int, batch_size: int,
                  rows: slice, input_shards: int, seed: int, skip: int,
                  features: str = "decoder_only"):
  """This process's rows of every global batch: global row r comes from input shard
  r // (batch_size / input_shards), a seqio shard of the mixture read with the run's seed, so
  which data a step sees does not depend on how many processes read it."""
  per_shard = batch_size // input_shards
  first, last = rows.start // per_shard, -(-rows.stop // per_shard)
  streams = [pipeline.get_dataset(mixture_or_task, sequence_length, per_shard, seed=seed,
                                  shard_index=i, shard_count=input_shards, features=features)
             .skip(skip).as_numpy_iterator() for i in range(first, last)]
  lo, hi = rows.start - first * per_shard, rows.stop - first * per_shard
  while True:
    parts = [next(stream) for stream in streams]
    yield {k: np.concatenate([p[k] for p in parts])[lo:hi] for k in parts[0]}


def evaluate_tasks(eval_fn, state, tasks: Sequence[str], mesh, rules, sequence_length: int,
                   batch_size: int, max_batches: int, seed: int = 0,
                   features: str = "decoder_only") -> dict:
  """{task: token-weighted mean metrics} over up to `max_batches` batches of each task's
  validation split (one pass, no shuffling; the last short batch padded with empty rows)."""
  from tasks import pipeline  # pylint: disable=g-import-not-at-top
  rows = part.host_batch_rows(mesh, rules, batch_size)
  host_batch = rows.stop - rows.start
  results = {}
  for task in tasks:
    totals, tokens_seen = {}, 0.0
    data = pipeline.get_dataset(task, sequence_length, host_batch, split="validation",
                                seed=seed, shuffle=False, shard_index=rows.start // host_batch,
                                shard_count=batch_size // host_batch, features=features)
    batches = [_pad_rows(b, host_batch) for b in data.take(max_batches).as_numpy_iterator()]
    for batch in _same_count_on_every_process(batches, task):
      with part.activate(mesh, rules):
        out = metrics_lib.scalars(eval_fn(state.params, state.extra,
                                          part.global_batch(batch, mesh, rules)))
      n = out["num_tokens"]
      tokens_seen += n
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + v * n
    if tokens_seen:
      results[task] = {k: v / tokens_seen for k, v in totals.items() if k != "num_tokens"}
      results[task]["num_tokens"] = tokens_seen
  return results


def _same_count_on_every_process(batches: list, task: str) -> list:
  """Every process must run the same number of (collective) eval steps: hosts whose
  validation shard ran out early add empty batches (zero loss weight) up to the largest
  count."""
  if jax.process_count() == 1:
    return batches
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  most = int(np.max(multihost_utils.process_allgather(np.int32(len(batches)))))
  if len(batches) < most and not batches:
    raise ValueError(f"eval task {task!r}: process {jax.process_index()} has no validation "
                     f"batch while others have {most}; use fewer processes or a larger task.")
  empty = {k: np.zeros_like(v) for k, v in batches[0].items()} if batches else None
  return batches + [empty] * (most - len(batches))


def state_target(module, tx, mesh, rules, tokens: jax.ShapeDtypeStruct):
  """(abstract TrainState with the shardings of `mesh` — what a checkpoint restores into —,
  the state's shardings), without allocating anything."""
  boxed = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), tokens)
  variable_shardings = part.logical_shardings(boxed, mesh, rules)
  abstract_state = jax.eval_shape(lambda v: ts.TrainState.create(v, tx), nn.meta.unbox(boxed))
  state_shardings = part.train_state_shardings(abstract_state, variable_shardings, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, state_shardings)
  return target, state_shardings


def params_target(module, mesh, rules, tokens: jax.ShapeDtypeStruct) -> dict:
  """{"params": ..., "extra": ...} abstract arrays with the shardings of `mesh`."""
  boxed = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), tokens)
  shardings = part.logical_shardings(boxed, mesh, rules)
  abstract = nn.meta.unbox(boxed)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return {"params": target["params"],
          "extra": {k: v for k, v in target.items() if k not in ("params", "cache")}}


def _pad_rows(batch: dict, rows: int) -> dict:
  """Pads a short last eval batch with empty rows (zero loss weight) to a fixed shape."""
  missing = rows - next(iter(batch.values())).shape[0]
  if missing <= 0:
    return batch
  return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


class _progress:  # pylint: disable=invalid-name
  """A tqdm bar with the latest loss, or log lines when tqdm is off."""

  def __init__(self, start: int, total: int, enabled: bool):
    self._bar = None
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self._step = start

  def update(self, step: int, scalars: dict) -> None:
    text = (f"loss {scalars.get('loss/cross_entropy', float('nan')):.3f} "
            f"{scalars.get('tokens_per_s', 0):,.0f} tok/s")
    if self._bar is not None:
      self._bar.update(step - self._step)
      self._bar.set_postfix_str(text)
    elif jax.process_index() == 0:  # print: absl's handler keeps INFO logs off the console
      print(f"step {step}: {text}", flush=True)
    self._step = step

  def write(self, text: str) -> None:
    """Prints above the bar (or plainly when there is none)."""
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _distributed_flags(rest: Sequence[str]):
  """t5x's multi-process flags -> (namespace, the arguments left over)."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  parser.add_argument("--multiprocess_gpu", action="store_true",
                      help="initialise jax.distributed on GPU hosts (SLURM/MPI fill the rest)")
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  parser.add_argument("--process_count", type=int, default=None)
  parser.add_argument("--process_index", type=int, default=None)
  parser.add_argument("--distributed_timeout", type=int, default=300,
                      help="seconds to wait for the coordinator and the other processes")
  return parser.parse_known_args(list(rest))


def parse_flags(argv: Sequence[str]):
  """Parses t5x-style gin flags and the multi-process flags; a missing gin file, a misspelled
  name or a bad process index fails here, before anything compiles, naming the closest valid
  names. Returns the multi-process flags."""
  files, bindings, rest = config_lib.split_gin_args(argv)
  distributed, rest = _distributed_flags(rest)
  if rest:
    raise SystemExit(f"Unknown arguments {rest}; use --gin_file=..., --gin.NAME=value, "
                     "--gin_search_paths=... and the multi-process flags --coordinator_address, "
                     "--process_count, --process_index, --multiprocess_gpu, "
                     "--distributed_timeout.")
  count, index = distributed.process_count, distributed.process_index
  if count is not None and count < 1:
    raise SystemExit(f"--process_count must be >= 1, got {count}.")
  if index is not None and count is not None and not 0 <= index < count:
    raise SystemExit(f"--process_index={index} must be in [0, --process_count={count}), i.e. "
                     f"0 to {count - 1}.")
  if (index is None) != (count is None) or (count is not None and count > 1
                                             and not distributed.coordinator_address):
    raise SystemExit("multi-process runs need --coordinator_address, --process_count and "
                     "--process_index together (or none of them under SLURM, Open MPI or on a "
                     "TPU pod, where JAX finds them).")
  parse_gin_flags(files, bindings)
  return distributed


def parse_gin_flags(files: Sequence[str], bindings: Sequence[str],
                    extra_bindings: Sequence[str] = config_lib.MODEL_BINDINGS) -> None:
  """What every command does with its gin flags: parse them with the checks of
  `config.parse_gin`, refuse macros left %gin.REQUIRED, and turn any mistake into one message
  (SystemExit) with the closest valid names."""
  try:
    config_lib.parse_gin(files, list(bindings) + list(extra_bindings))
    checks.required_macros(config_lib.macros()[2], files)
  except checks.SettingError as e:
    raise SystemExit(f"error: {e}") from None
  except (ValueError, KeyError) as e:
    raise SystemExit(f"gin: {e}{_gin_suggestion(str(e))}") from None


def start_processes(flags) -> None:
  """Joins the job's processes (jax.distributed) before any JAX computation, when the flags,
  the MOE_JAX_* variables or a SLURM / Open MPI / TPU pod environment say it has several."""
  given = (flags.multiprocess_gpu or flags.coordinator_address is not None
           or flags.process_count is not None)
  from_env = "MOE_JAX_COORDINATOR" in os.environ
  if not (given or from_env or part.cluster_detected()):
    return
  if flags.process_count == 1:
    return  # one process: nothing to join
  try:
    part.initialize_distributed(flags.coordinator_address, flags.process_count,
                                flags.process_index, multiprocess_gpu=flags.multiprocess_gpu,
                                timeout_s=flags.distributed_timeout)
  except (RuntimeError, ValueError) as e:
    raise SystemExit(str(e)) from None
  logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _gin_suggestion(message: str) -> str:
  """Closest valid names for gin's 'no such parameter' and 'no such configurable' errors."""
  import inspect  # pylint: disable=g-import-not-at-top
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  parameter = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'",
                        message)
  if parameter:
    configurable = registry.get_match(parameter.group(1))
    if configurable is not None:
      fn = configurable.wrapped
      fn = fn.__init__ if inspect.isclass(fn) else fn
      return checks.closest(parameter.group(2), list(inspect.signature(fn).parameters))
  name = re.search(r"'([^']+)'", message)
  return checks.closest(name.group(1), [str(n) for n, _ in registry.items()]) if name else ""


def run_command(fn, argv=None) -> int:
  """The body of `python -m moe_jax.{train,evaluate,infer}`: gin flags, then `fn()`."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the data side's TensorFlow: errors only
  console.quiet_native_logs()  # TensorFlow's CUDA probing, SentencePiece's per-load line
  flags = parse_flags(sys.argv[1:] if argv is None else argv)
  start_processes(flags)
  checks.exit_on_setting_error(fn)  # everything comes from gin
  return 0
