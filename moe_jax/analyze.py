"""Routing report of a trained model: who goes where, per layer, token, domain and checkpoint.

    python -m moe_jax.analyze --checkpoint=runs/tiny_cpu \
      --task=code=local_code_lm_8k --task=english=local_english_lm_8k --out=runs/tiny_cpu/routing

--checkpoint: a model dir (its config.gin and checkpoints/ are used) or a checkpoints dir (then
  give the model's --gin_file flags), or "none" for freshly initialised parameters.
--step: the checkpoint analysed (default: the latest); --compare_steps: "first" (default: the
  earliest other checkpoint), "all", "none" or a comma list: OpenMoE's early routing learning,
  routing of each such checkpoint against --step's on the same tokens.
--task LABEL=TASK (or TASK, labelled by its name), repeatable: validation examples of a seqio
  task; --texts_file: one text per line, labelled "texts" (with --vocabulary).
--capacity_factors: eval capacity factors for the drop-by-position curves (default
  0.5,1.0,1.25,2.0). --max_tokens: tokens recorded per label (default 50,000).
--gin_file / --gin.NAME=value: as the other commands.

Writes to --out (default <model dir>/routing_report): report.md, a CSV and a PNG per analysis,
and records_step<N>.npz (reload with RoutingRecords.load for your own analyses).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import checkpoints as checkpoints_lib
from moe_jax import checks
from moe_jax import console
from moe_jax import config as config_lib
from moe_jax import partitioning as part
from moe_jax import trainer
from moe_jax.analysis import analyses, recorder, report
from moe_jax.analysis.records import RoutingRecords


def _parse(argv) -> Tuple[argparse.Namespace, List[str], List[str]]:
  files, bindings, rest = config_lib.split_gin_args(argv)
  parser = argparse.ArgumentParser(prog="python -m moe_jax.analyze", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--compare_steps", default="first")
  parser.add_argument("--task", action="append", default=[])
  parser.add_argument("--texts_file", default=None)
  parser.add_argument("--vocabulary", default=None,
                      help="spm8k, spm32k or bytes (default: the first task's, else the "
                      "model's size's)")
  parser.add_argument("--capacity_factors", default="0.5,1.0,1.25,2.0")
  parser.add_argument("--max_tokens", type=int, default=50_000)
  parser.add_argument("--sequence_length", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--min_count", type=int, default=10,
                      help="occurrences a token id needs to enter the per-token analyses")
  parser.add_argument("--out", default=None)
  parser.add_argument("--sublayer", default=None,
                      help="sparse sub-layers to record: moe (the FFN) or attention (SwitchHead); "
                           "an encoder-decoder's encoder/moe or decoder/moe. Default: the "
                           "first sparse sub-layer (moe; encoder/moe)")
  args = parser.parse_args(rest)
  if not args.task and not args.texts_file:
    parser.error("give at least one --task=LABEL=TASK or a --texts_file.")
  return args, files, bindings


def _model_and_checkpoints(args, files, bindings):
  """(model, checkpoints dir or None, model dir for outputs)."""
  path = args.checkpoint
  if path == "none":
    if not files:
      raise SystemExit("--checkpoint=none needs the model's --gin_file flags.")
    return config_lib.load_model(files, bindings), None, os.getcwd()
  if os.path.isdir(os.path.join(path, "checkpoints")):
    model_dir, ckpt_dir = path, os.path.join(path, "checkpoints")
    if not files:
      files = [os.path.join(model_dir, "config.gin")]
  else:
    model_dir, ckpt_dir = os.path.dirname(os.path.abspath(path)), path
    if not files:
      config = os.path.join(model_dir, "config.gin")
      if not os.path.exists(config):
        raise SystemExit(f"no config.gin beside {path}: give the model's --gin_file flags.")
      files = [config]
  # The analyses run the model on one device, whatever mesh the run trained on.
  return config_lib.load_model(files, bindings + ["MOE_LAYOUT = 'packed'"]), ckpt_dir, model_dir


def load_variables(model, ckpt_dir: Optional[str], step: Optional[int] = None,
                   sequence_length: int = 256) -> Tuple[dict, Optional[int]]:
  """(variables, step) of a checkpoint (the latest when step is None) on one device, or fresh
  parameters when ckpt_dir is None."""
  tokens = jax.ShapeDtypeStruct((1, sequence_length), jnp.int32)
  if ckpt_dir is None:
    init = jax.jit(model.module.init)(jax.random.PRNGKey(0), jnp.zeros(tokens.shape, jnp.int32))
    return nn.meta.unbox(init), None
  mesh = part.make_mesh(data=1, model=1, devices=jax.devices()[:1])
  target = trainer.params_target(model.module, mesh, config_lib.configured_rules(), tokens)
  params, extra, step = checkpoints_lib.restore_params(ckpt_dir, target["params"],
                                                       target["extra"], step)
  return {"params": jax.device_get(params), **jax.device_get(extra)}, step


def _capacity_factors(spec: str) -> List[float]:
  try:
    factors = [float(c) for c in spec.split(",") if c.strip()]
  except ValueError:
    factors = []
  if not factors or not all(math.isfinite(f) and f > 0 for f in factors):
    raise checks.SettingError(f"--capacity_factors={spec}: give a comma list of finite numbers "
                              "> 0, e.g. 0.5,1.0,1.25,2.0.")
  return factors


def _compare_steps(spec: str, available: List[int], step: int) -> List[int]:
  """The checkpoints compared with `step`; the spec is checked even when there are none."""
  wanted = None
  if spec not in ("none", "first", "all"):
    try:
      wanted = [int(s) for s in spec.split(",")]
    except ValueError:
      raise checks.SettingError(f"--compare_steps={spec}: choose first, all, none or a comma "
                                f"list of steps; available: {available}.") from None
  others = [s for s in available if s != step]
  if spec == "none" or not others:
    return []
  if spec == "first":
    return [others[0]]
  if spec == "all":
    return others
  missing = sorted(set(wanted) - set(available))
  if missing:
    raise checks.SettingError(f"--compare_steps: no checkpoint at {missing}; available: "
                              f"{available}.")
  return [s for s in wanted if s != step]


def task_batches(tasks: Dict[str, str], sequence_length: int, batch_size: int,
                 max_tokens: int, features: str = "decoder_only"
                 ) -> Tuple[Dict[str, list], object]:
  """({label: numpy batches of the task's validation split, enough for max_tokens}, the first
  task's vocabulary). Needs the data side (tasks/)."""
  from tasks import pipeline  # pylint: disable=g-import-not-at-top  (the data side)
  import seqio  # pylint: disable=g-import-not-at-top
  sources, vocab = {}, None
  rows_needed = -(-max_tokens // sequence_length)
  for label, task in tasks.items():
    ds = pipeline.get_dataset(task, sequence_length, batch_size, split="validation",
                              shuffle=False, features=features)
    batches, rows = [], 0
    for batch in ds.as_numpy_iterator():
      batches.append(batch)
      rows += batch_size
      if rows >= rows_needed:
        break
    sources[label] = batches
    if vocab is None:
      vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
  return sources, vocab


def _tasks(args, vocab_size: int) -> Dict[str, str]:
  """{label: task} of the --task flags, each checked (registered, the model's vocabulary)."""
  from tasks import registry  # pylint: disable=g-import-not-at-top  (the data side)
  tasks = {}
  for spec in args.task:
    label, _, task = spec.rpartition("=")
    tasks[label or task] = task
  registry.check_tasks(list(tasks.values()), "--task", vocab_size, mixtures=False)
  return tasks


def _texts(path: str) -> List[str]:
  if not os.path.isfile(path):
    raise checks.SettingError(f"--texts_file={path}: no such file.")
  with open(path, encoding="utf-8") as f:
    texts = [line.rstrip("\n") for line in f if line.strip()]
  if not texts:
    raise checks.SettingError(f"--texts_file={path} has no non-empty line: give one text per "
                              "line.")
  return texts


def _sources(args, tasks: Dict[str, str], vocab_size: int, features: str = "decoder_only"
             ) -> Tuple[Dict[str, list], Callable[[int], str]]:
  """{label: numpy batches} and a token id -> piece decoder."""
  from tasks import registry  # pylint: disable=g-import-not-at-top
  from tasks import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  sources, vocab = task_batches(tasks, args.sequence_length, args.batch_size, args.max_tokens,
                                features)
  if args.vocabulary:
    vocab = vocab_lib.get_vocabulary(args.vocabulary)
  if args.texts_file:
    texts = _texts(args.texts_file)
    if vocab is None:
      vocab = vocab_lib.get_vocabulary(registry.vocabulary_of_size(vocab_size))
    encode = vocab_lib.without_extra_ids(vocab).encode
    sources["texts"] = list(recorder.text_batches(texts, encode, args.sequence_length,
                                                  args.batch_size, features=features))
  return sources, piece_decoder(vocab)


def piece_decoder(vocab) -> Callable[[int], str]:
  """Token id -> its vocabulary piece ("▁the", "<extra_id_3>", "[S2S]", "<pad>")."""
  from tasks import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  base = vocab.vocab_size - vocab.extra_ids
  tokenizer = getattr(vocab, "tokenizer", None)

  def decode(token_id: int) -> str:
    if token_id >= base:
      offset = token_id - base
      if offset < len(vocab_lib.MODE_TOKENS):
        return vocab_lib.MODE_TOKENS[offset]
      return f"<extra_id_{vocab.vocab_size - 1 - token_id}>"
    if tokenizer is not None:
      return tokenizer.id_to_piece(int(token_id))
    return vocab.decode([int(token_id)])
  return decode


def record_all(model, variables, sources: Dict[str, list], max_tokens: int, step, **kwargs
               ) -> RoutingRecords:
  """Records of every source (labelled by its name), joined."""
  apply_fn = recorder.make_apply_fn(
      recorder.with_capacity_factor(model, kwargs["capacity_factor"])
      if kwargs.get("capacity_factor") else model)
  return RoutingRecords.concatenate([
      recorder.record_routing(model, variables, batches, label=label, max_tokens=max_tokens,
                              step=step, apply_fn=apply_fn, **kwargs)
      for label, batches in sources.items()])


def analyze(argv=None) -> str:
  """The command; returns the report's path."""
  args, files, bindings = _parse(sys.argv[1:] if argv is None else argv)
  start = time.time()
  model, ckpt_dir, model_dir = _model_and_checkpoints(args, files, bindings)
  sparse = model.module.sparse_sublayers()
  if not sparse:
    raise SystemExit("the model has no MoE layers: nothing to analyse.")
  args.sublayer = args.sublayer or ("moe" if "moe" in sparse else next(iter(sparse)))
  if args.sublayer not in sparse:
    raise checks.SettingError(f"--sublayer {args.sublayer!r} is not a sparse sub-layer of this "
                              f"model; choose one of {tuple(sparse)}.")
  for name in ("max_tokens", "sequence_length", "batch_size", "min_count"):
    checks.integer(f"--{name}", getattr(args, name), 1)
  if args.texts_file:
    _texts(args.texts_file)
  tasks = _tasks(args, model.module.vocab_size)
  if ckpt_dir is not None:
    tokens = jax.ShapeDtypeStruct((1, args.sequence_length), jnp.int32)
    mesh = part.make_mesh(data=1, model=1, devices=jax.devices()[:1])
    trainer.check_against_checkpoint(
        trainer.params_target(model.module, mesh, config_lib.configured_rules(), tokens),
        ckpt_dir, args.step, restart=False)
  capacity_factors = _capacity_factors(args.capacity_factors)
  available = checkpoints_lib.committed_steps(ckpt_dir) if ckpt_dir else []  # read-only
  latest = args.step if args.step is not None else (available[-1] if available else None)
  compare = _compare_steps(args.compare_steps, available, latest)  # checked before any write
  out = args.out or os.path.join(model_dir, "routing_report")
  sources, decode = _sources(args, tasks, model.module.vocab_size,
                             trainer.model_features(model))
  variables, step = load_variables(model, ckpt_dir, args.step, args.sequence_length)
  records = record_all(model, variables, sources, args.max_tokens, step, sublayer=args.sublayer)
  os.makedirs(out, exist_ok=True)
  records.save(os.path.join(out, f"records_step{step}.npz"))
  print(f"step {step}: {records.num_tokens} tokens per layer recorded "
        f"({records.nbytes / 1e6:.1f} MB)", flush=True)

  by_step = {}
  for other in compare:
    other_vars, _ = load_variables(model, ckpt_dir, other, args.sequence_length)
    by_step[other] = record_all(model, other_vars, sources, args.max_tokens, other,
                                sublayer=args.sublayer)
  dropless = records.capacity_factor is None
  sweep = [] if dropless else [
      record_all(model, variables, sources, args.max_tokens, step, capacity_factor=cf,
                 sublayer=args.sublayer) for cf in capacity_factors]
  results = analyses.run_all(records, compare_with=by_step.get(min(by_step)) if by_step else None,
                             capacity_sweep=None if dropless else sweep, decode=decode,
                             min_count=args.min_count)
  if len(by_step) > 1:
    results.append(analyses.agreement_over_steps({**by_step, step: records},
                                                 reference_step=step,
                                                 min_count=args.min_count))
  settings = {"checkpoint": args.checkpoint, "step": step,
              "compared with steps": ", ".join(map(str, sorted(by_step))) or "-",
              "data": ", ".join(f"{label} ({len(b)} batches)" for label, b in sources.items()),
              "tokens recorded": records.num_tokens, "MoE layers": records.layer_ids,
              "sub-layer": args.sublayer,
              "experts": records.num_experts, "router": records.router,
              "eval capacity factor": records.capacity_factor,
              "capacity factors swept": args.capacity_factors}
  path = report.write_report(results, out, f"Routing report — step {step}", settings)
  print(f"Wrote {path} ({time.time() - start:.0f} s)")
  return path


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  console.quiet_native_logs()
  checks.exit_on_setting_error(analyze, argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
