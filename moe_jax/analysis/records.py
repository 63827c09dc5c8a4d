"""Routing records: per MoE layer and token, who went where — compact, in host memory.

`RoutingRecords` holds what a recorder (recorder.py) collected from a model run over some data,
as flat numpy arrays (no padding tokens). With N recorded tokens, M MoE layers, R recorded
choices per token and P recorded router probabilities per token:

  token fields, [N]:
    token_id      int32   input token id
    position      int32   position within its example (decoder_positions; packed rows restart)
    row_position  int32   index in the row: with one routing group per row (the default), the
                          token's place in its group's capacity queue
    example_id    int64   one id per example (packed segment), unique within the records
    label         int16   index into `label_names` (domain / task), -1 when unknown
  layer fields, [M, N, ...]:
    expert        int16   [M, N, R] chosen experts in choice order (choice 0: the top one);
                          -1 in unused slots (expert choice: fewer experts took the token)
    gate          float16 [M, N, R] combine weight; 0 where the assignment was not kept
    status        int8    [M, N, R] KEPT, DROPPED (no capacity slot), SKIPPED (GShard random
                          routing of the second expert), UNUSED (no choice in this slot)
    top_expert    int16   [M, N, P] the experts of the P largest router probabilities...
    top_prob      float16 [M, N, P] ...and those probabilities, descending
    entropy       float16 [M, N]    router entropy −Σ_e p_e log p_e over all E experts
    num_chosen    int16   [M, N]    experts the token was assigned to before capacity (token
                          choice: k; expert choice: any number in [0, E], of which the R with
                          the largest gates are in `expert`)

Token choice records R = k choices; expert choice records the R = min(E, 8) best, so per-expert
loads computed from `expert` are exact for token choice and for expert choice whenever
num_chosen <= R. Size: 22 + M·(5·R + 4·P + 4) bytes per token — a million tokens of a
one-MoE-layer top-2 model with P = 8 take 68 MB; with 12 MoE layers, 574 MB.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np

KEPT, DROPPED, SKIPPED, UNUSED = 0, 1, 2, -1
STATUS_NAMES = {KEPT: "kept", DROPPED: "dropped", SKIPPED: "skipped", UNUSED: "unused"}

TOKEN_FIELDS = {"token_id": np.int32, "position": np.int32, "row_position": np.int32,
                "example_id": np.int64, "label": np.int16}
LAYER_FIELDS = {"expert": np.int16, "gate": np.float16, "status": np.int8,
                "top_expert": np.int16, "top_prob": np.float16, "entropy": np.float16,
                "num_chosen": np.int16}


@dataclasses.dataclass
class RoutingRecords:
  """Per-token routing of one model over some data (module docstring for the fields).

  Metadata:
    layer_ids: the model layer index of each of the M MoE layers (e.g. (3,) or (1, 3, 5)).
    num_experts: E.
    label_names: names of the `label` values (e.g. ("code", "english")).
    capacity_factor: the capacity factor the records were made with (None: dropless).
    step: the checkpoint step of the parameters (None: fresh parameters).
    router: the routing kind (the router's `kind`: "token_choice", "expert_choice", "soft").
  """
  token_id: np.ndarray
  position: np.ndarray
  row_position: np.ndarray
  example_id: np.ndarray
  label: np.ndarray
  expert: np.ndarray
  gate: np.ndarray
  status: np.ndarray
  top_expert: np.ndarray
  top_prob: np.ndarray
  entropy: np.ndarray
  num_chosen: np.ndarray
  layer_ids: Tuple[int, ...]
  num_experts: int
  label_names: Tuple[str, ...] = ()
  capacity_factor: Optional[float] = None
  step: Optional[int] = None
  router: str = "token_choice"

  def __post_init__(self):
    for name, dtype in {**TOKEN_FIELDS, **LAYER_FIELDS}.items():
      setattr(self, name, np.asarray(getattr(self, name), dtype))
    self.layer_ids = tuple(int(i) for i in self.layer_ids)
    self.label_names = tuple(str(n) for n in self.label_names)
    n, m = self.num_tokens, len(self.layer_ids)
    for name in TOKEN_FIELDS:
      if getattr(self, name).shape != (n,):
        raise ValueError(f"{name} must have shape [N]={(n,)}, got {getattr(self, name).shape}.")
    for name in LAYER_FIELDS:
      shape = getattr(self, name).shape
      if shape[:2] != (m, n):
        raise ValueError(f"{name} must start with [M, N]={(m, n)} (M = len(layer_ids)), got "
                         f"{shape}.")
    if self.expert.shape != self.gate.shape or self.expert.shape != self.status.shape:
      raise ValueError("expert, gate and status must have the same shape [M, N, R], got "
                       f"{self.expert.shape}, {self.gate.shape}, {self.status.shape}.")
    if self.top_expert.shape != self.top_prob.shape:
      raise ValueError("top_expert and top_prob must have the same shape [M, N, P].")
    if "all" in self.label_names:
      raise ValueError("'all' is reserved for the whole records in the analyses; rename that "
                       "label.")
    if not isinstance(self.router, str) or not self.router:
      raise ValueError(f"router must name the routing kind (a router's `kind`, e.g. "
                       f"'token_choice'), got {self.router!r}.")

  # --- sizes -------------------------------------------------------------------------------
  @property
  def num_tokens(self) -> int:
    return int(self.token_id.shape[0])

  @property
  def num_layers(self) -> int:
    return len(self.layer_ids)

  @property
  def nbytes(self) -> int:
    return sum(getattr(self, f).nbytes for f in (*TOKEN_FIELDS, *LAYER_FIELDS))

  def layer_index(self, layer_id: int) -> int:
    """Row of `layer_id` (a model layer index) in the [M, ...] fields."""
    if layer_id not in self.layer_ids:
      raise ValueError(f"layer {layer_id} is not a recorded MoE layer; recorded: "
                       f"{self.layer_ids}.")
    return self.layer_ids.index(layer_id)

  def label_name(self, label: int) -> str:
    return self.label_names[label] if 0 <= label < len(self.label_names) else "unknown"

  # --- subsets and joins ---------------------------------------------------------------------
  def select(self, tokens: np.ndarray) -> "RoutingRecords":
    """The records of a subset of tokens (a boolean mask [N] or indices)."""
    fields = {f: getattr(self, f)[tokens] for f in TOKEN_FIELDS}
    fields.update({f: getattr(self, f)[:, tokens] for f in LAYER_FIELDS})
    return dataclasses.replace(self, **fields)

  def with_label(self, name: str) -> "RoutingRecords":
    """The tokens labelled `name`."""
    if name not in self.label_names:
      raise ValueError(f"label {name!r} is not in the records; labels: {self.label_names}.")
    return self.select(self.label == self.label_names.index(name))

  @staticmethod
  def concatenate(parts: Sequence["RoutingRecords"]) -> "RoutingRecords":
    """Joins records of the same model and settings (labels are merged by name; example ids
    are renumbered so they stay unique)."""
    if not parts:
      raise ValueError("concatenate needs at least one RoutingRecords.")
    first = parts[0]
    for other in parts[1:]:
      for attr in ("layer_ids", "num_experts", "capacity_factor", "step", "router"):
        if getattr(other, attr) != getattr(first, attr):
          raise ValueError(f"cannot concatenate records with different {attr}: "
                           f"{getattr(first, attr)} vs {getattr(other, attr)}.")
    names = []
    for part in parts:
      names += [n for n in part.label_names if n not in names]
    fields = {f: [] for f in (*TOKEN_FIELDS, *LAYER_FIELDS)}
    offset = 0
    for part in parts:
      remap = np.array([names.index(n) for n in part.label_names] + [-1], np.int16)
      for f in TOKEN_FIELDS:
        value = getattr(part, f)
        if f == "label":
          value = remap[np.where(value >= 0, value, len(part.label_names))]
        elif f == "example_id" and part.num_tokens:
          value = value - value.min() + offset
          offset = int(value.max()) + 1
        fields[f].append(value)
      for f in LAYER_FIELDS:
        fields[f].append(getattr(part, f))
    joined = {f: np.concatenate(v, axis=0 if f in TOKEN_FIELDS else 1)
              for f, v in fields.items()}
    return dataclasses.replace(first, label_names=tuple(names), **joined)

  # --- storage -------------------------------------------------------------------------------
  def save(self, path: str) -> None:
    """One compressed .npz file."""
    meta = {"layer_ids": np.asarray(self.layer_ids, np.int64),
            "num_experts": np.asarray(self.num_experts),
            "label_names": np.asarray(self.label_names, dtype=str),
            "capacity_factor": np.asarray(np.nan if self.capacity_factor is None
                                          else self.capacity_factor),
            "step": np.asarray(-1 if self.step is None else self.step),
            "router": np.asarray(self.router)}
    arrays = {f: getattr(self, f) for f in (*TOKEN_FIELDS, *LAYER_FIELDS)}
    with open(path, "wb") as f:
      np.savez_compressed(f, **arrays, **meta)

  @classmethod
  def load(cls, path: str) -> "RoutingRecords":
    with np.load(path, allow_pickle=False) as data:
      cf = float(data["capacity_factor"])
      step = int(data["step"])
      return cls(**{f: data[f] for f in (*TOKEN_FIELDS, *LAYER_FIELDS)},
                 layer_ids=tuple(data["layer_ids"].tolist()),
                 num_experts=int(data["num_experts"]),
                 label_names=tuple(data["label_names"].tolist()),
                 capacity_factor=None if np.isnan(cf) else cf,
                 step=None if step < 0 else step,
                 router=str(data["router"]))

  def to_frame(self, layer: Optional[int] = None):
    """A tidy pandas DataFrame: one row per (MoE layer, token, recorded choice), unused slots
    left out. `layer`: a model layer id to keep only that layer."""
    import pandas as pd  # pylint: disable=g-import-not-at-top
    layers = range(self.num_layers) if layer is None else [self.layer_index(layer)]
    frames = []
    for m in layers:
      r = self.expert.shape[-1]
      used = self.status[m] != UNUSED  # [N, R]
      token = np.repeat(np.arange(self.num_tokens), r).reshape(-1, r)[used]
      choice = np.tile(np.arange(r), self.num_tokens).reshape(-1, r)[used]
      frames.append(pd.DataFrame({
          "layer": self.layer_ids[m], "token": token, "choice": choice,
          "token_id": self.token_id[token], "position": self.position[token],
          "row_position": self.row_position[token], "example_id": self.example_id[token],
          "label": [self.label_name(l) for l in self.label[token]],
          "expert": self.expert[m][used], "gate": self.gate[m][used].astype(np.float32),
          "status": [STATUS_NAMES[s] for s in self.status[m][used]]}))
    return pd.concat(frames, ignore_index=True)
