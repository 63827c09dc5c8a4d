"""Runs a model over data and records, per MoE layer and token, its routing (records.py).

    records = record_routing(model, variables, batches, label="code", max_tokens=100_000)

The MoE layers write their routing to the `routing_records` collection only when it is mutable,
so recording costs nothing in training; here it is. Inference settings: no dropout, no noise,
the eval capacity factor — or `capacity_factor`, to see what another one would drop.

Batches are t5x feature dicts (decoder_input_tokens, decoder_target_tokens and, packed,
decoder_segment_ids / decoder_positions; an encoder-decoder's encoder_* too), as
`tasks.pipeline.get_dataset` yields or `text_batches` makes from raw texts. The routed token at
position t is the stack's input token at t.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from moe_jax.analysis.records import RoutingRecords
from moe_jax.moe_layer import ROUTING_RECORDS


def with_capacity_factor(model, capacity_factor: float):
  """The model with its MoE layers' eval capacity factor replaced."""
  if not model.module.sparse_sublayers():
    raise ValueError("the model has no MoE layers to record.")
  module = model.module.with_moe_settings(eval_capacity_factor=capacity_factor)
  return type(model)(**{**model.__dict__, "module": module})


def layer_settings(model, sublayer: str = "moe") -> Tuple[Optional[float], str, int]:
  """(eval capacity factor or None when nothing is dropped, router kind, experts in the
  records) of the model's sparse sub-layer `sublayer` ("moe": the FFN; "attention"; an
  encoder-decoder's "encoder/moe", "decoder/moe")."""
  sparse = model.module.sparse_sublayers()
  if sublayer not in sparse:
    raise ValueError(f"sublayer {sublayer!r} is not a sparse sub-layer of this model; choose one "
                     f"of {tuple(sparse)}.")
  layer = sparse[sublayer]
  dispatch = getattr(layer, "dispatch", "dropless")  # sparse attention has no capacity
  cf = None if dispatch == "dropless" else float(layer.eval_capacity_factor)
  return cf, layer.router.kind, layer.recorded_experts


def _layer_records(tree, module, sublayer: str = "moe") -> Iterator[Tuple[int, dict]]:
  """(model layer id, record [B, L, ...]) of one kind of sub-layer, in layer order.

  Unscanned: layers_<i>/<sublayer>/record. Scanned (nn.scan over units of `moe_every` blocks):
  layers/block_<j>/<sublayer>/record with a leading [units] axis: layer = unit · period + j.
  An encoder-decoder's "<stack>/<sublayer>": <stack>/layers_<i>/<sublayer>/record.
  """
  stack, _, sublayer = sublayer.rpartition("/")
  found = []
  for path, record in _find_records(tree):
    if stack:
      if not path or path[0] != stack:
        continue
      path = path[1:]
    if not path or path[-1] != sublayer:
      continue
    stacks = {name: (first, period) for name, first, period, _ in module.scanned_stacks()
              } if getattr(module, "scan_layers", False) else {}
    if path[0] in stacks:  # scanned
      first, period = stacks[path[0]]
      j = int(re.fullmatch(r"block_(\d+)", path[1]).group(1))
      units = next(iter(record.values())).shape[0]
      found += [(first + u * period + j, {k: v[u] for k, v in record.items()})
                for u in range(units)]
    else:
      found.append((int(re.fullmatch(r"layers_(\d+)", path[0]).group(1)), record))
  return iter(sorted(found, key=lambda item: item[0]))


def _find_records(tree, path=()):
  for key, value in tree.items():
    if key == "record":
      yield path, value[0]  # sow keeps a tuple of the values sown
    elif isinstance(value, Mapping):
      yield from _find_records(value, path + (key,))


def record_routing(model, variables, batches: Iterable[Mapping[str, np.ndarray]], *,
                   label: Optional[str] = None, max_tokens: Optional[int] = None,
                   capacity_factor: Optional[float] = None, step: Optional[int] = None,
                   apply_fn: Optional[Callable] = None, sublayer: str = "moe"
                   ) -> RoutingRecords:
  """Records the routing of `model` (a DecoderOnlyLM or EncoderDecoderLM) with `variables`
  over `batches` (the model's features).

  label: a name for every token of these batches (e.g. the domain); concatenate records of
    several sources with `RoutingRecords.concatenate`.
  max_tokens: stop after this many real (non-padding) tokens.
  capacity_factor: replaces the MoE layers' eval capacity factor.
  apply_fn: a compiled `(variables, batch) -> collection` to reuse across calls
    (`make_apply_fn`); built here when None.
  sublayer: which sparse sub-layers to record: "moe" (the FFN) or "attention" (SwitchHead,
    whose records number each (side, head)'s experts apart: switchhead.py); an
    encoder-decoder's "encoder/moe" (routing the inputs) or "decoder/moe" (the targets).
  """
  if capacity_factor is not None:
    model = with_capacity_factor(model, capacity_factor)
  cf, router, num_experts = layer_settings(model, sublayer)
  apply_fn = apply_fn or make_apply_fn(model)
  columns = {}
  layer_ids, seen, next_example = None, 0, 0
  # The tokens a stack routes: an encoder's inputs, a decoder's (shifted) targets.
  side = "encoder" if sublayer.startswith("encoder/") else "decoder"
  for batch in batches:
    tokens = np.asarray(batch[f"{side}_input_tokens"])
    b, length = tokens.shape
    real_tokens = tokens if side == "encoder" else np.asarray(batch["decoder_target_tokens"])
    segments = np.asarray(batch.get(f"{side}_segment_ids", (real_tokens > 0).astype(np.int32)))
    real = segments > 0
    if not real.any():
      continue
    collection = jax.device_get(apply_fn(variables, {
        k: np.asarray(v) for k, v in batch.items() if k.startswith(("decoder_", "encoder_"))}))
    layers = list(_layer_records(collection, model.module, sublayer))
    if layer_ids is None:
      layer_ids = tuple(i for i, _ in layers)
    positions = np.asarray(batch.get(f"{side}_positions",
                                     np.broadcast_to(np.arange(length), (b, length))))
    # One example id per (row, segment), numbered in order of appearance.
    keys = np.arange(b)[:, None] * (int(segments.max()) + 1) + segments
    _, example = np.unique(keys[real], return_inverse=True)
    take = int(real.sum()) if max_tokens is None else min(int(real.sum()), max_tokens - seen)
    token_part = {
        "token_id": tokens[real], "position": positions[real],
        "row_position": np.broadcast_to(np.arange(length), (b, length))[real],
        "example_id": example + next_example,
        "label": np.zeros(int(real.sum()), np.int16) if label is not None
                 else np.full(int(real.sum()), -1, np.int16)}
    next_example += int(example.max()) + 1
    for name, value in token_part.items():
      columns.setdefault(name, []).append(value[:take])
    for name in layers[0][1]:
      stacked = np.stack([record[name][real][:take] for _, record in layers])  # [M, n, ...]
      columns.setdefault(name, []).append(stacked)
    seen += take
    if max_tokens is not None and seen >= max_tokens:
      break
  if layer_ids is None:
    raise ValueError("no real (non-padding) tokens in the batches: nothing to record.")
  fields = {name: np.concatenate(parts, axis=0 if parts[0].ndim == 1 or name in (
      "token_id", "position", "row_position", "example_id", "label") else 1)
            for name, parts in columns.items()}
  return RoutingRecords(**fields, layer_ids=layer_ids, num_experts=num_experts,
                        label_names=(label,) if label is not None else (),
                        capacity_factor=cf, step=step, router=router)


def make_apply_fn(model) -> Callable:
  """A jitted (variables, batch) -> the MoE layers' routing records (nothing else leaves the
  device: not the logits)."""
  def apply(variables, batch):
    _, state = model.apply(variables, batch, deterministic=True, mutable=[ROUTING_RECORDS])
    return state[ROUTING_RECORDS]
  return jax.jit(apply)


def text_batches(texts: Sequence[str], encode: Callable[[str], Sequence[int]],
                 sequence_length: int, batch_size: int, eos_id: int = 1,
                 features: str = "decoder_only") -> Iterator[dict]:
  """Batches from raw texts: one text per row (+EOS), cut at sequence_length, zero-padded;
  inputs are the targets shifted right (0 first), as seqio's converter makes. Encoder-decoder
  batches give the encoder the same text."""
  rows = []
  for text in texts:
    ids = list(encode(text))[:sequence_length - 1] + [eos_id]
    rows.append(ids)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    targets = np.zeros((batch_size, sequence_length), np.int32)
    for i, ids in enumerate(chunk):
      targets[i, :len(ids)] = ids
    inputs = np.zeros_like(targets)
    inputs[:, 1:] = targets[:, :-1]
    batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
             "decoder_loss_weights": (targets > 0).astype(np.float32)}
    if features == "encoder_decoder":
      batch["encoder_input_tokens"] = targets
    yield batch
