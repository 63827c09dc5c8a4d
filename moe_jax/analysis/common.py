"""What every routing analysis shares: the `Analysis` result and the counting conventions.

Counting convention (all analyses): an *assignment* is a (token, expert) pair the router chose
before capacity was applied, i.e. a recorded choice with status KEPT or DROPPED. SKIPPED
choices (GShard's random routing decided not to send the token to its second expert) and
UNUSED slots (expert-choice slots no expert filled, padding) are never counted.

Summary keys name MoE layers by their model layer id: "layer_3/...".
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from moe_jax.analysis.records import DROPPED, KEPT, RoutingRecords

CHOICES = ("first", "all")


@dataclasses.dataclass
class Analysis:
  """One analysis over routing records.

  Attributes:
    name: short id, used for file names ("expert_load", "token_specialization", ...).
    title: human title.
    description: 1-3 sentences: what it measures and how to read it (for a report).
    table: a tidy pandas DataFrame, one row per observation.
    summary: headline numbers (float / int / str) under flat keys such as
      "layer_3/busiest_over_least".
    figure: a matplotlib `Figure` (object API, no pyplot state), or None when plot=False.
  """
  name: str
  title: str
  description: str
  table: Any
  summary: Dict[str, Any]
  figure: Optional[Any] = None


def layer_key(records: RoutingRecords, m: int) -> str:
  """Summary-key prefix of the m-th recorded MoE layer."""
  return f"layer_{records.layer_ids[m]}"


def assigned_mask(records: RoutingRecords, m: int, choices: str = "all") -> np.ndarray:
  """[N, R] bool: the recorded choices of layer m that are assignments (KEPT or DROPPED).

  choices: "all" every recorded choice; "first" choice 0 only (the token's top expert).
  """
  if choices not in CHOICES:
    raise ValueError(f"choices must be one of {CHOICES}, got {choices!r}.")
  status = records.status[m]
  mask = ((status == KEPT) | (status == DROPPED)) & (records.expert[m] >= 0)
  if choices == "first":
    mask = mask & (np.arange(mask.shape[-1]) == 0)
  return mask


def expert_counts(records: RoutingRecords, m: int, tokens: Optional[np.ndarray] = None,
                  choices: str = "all") -> Tuple[np.ndarray, np.ndarray]:
  """(assigned [E], kept [E]) of layer m over `tokens` (a bool mask [N]; None: all tokens)."""
  mask = assigned_mask(records, m, choices)
  if tokens is not None:
    mask = mask & tokens[:, None]
  expert = records.expert[m].astype(np.int64)
  e = records.num_experts
  assigned = np.bincount(expert[mask], minlength=e)[:e]
  kept = np.bincount(expert[mask & (records.status[m] == KEPT)], minlength=e)[:e]
  return assigned, kept


def shares(counts: np.ndarray) -> np.ndarray:
  """counts / counts.sum() in float64; NaN everywhere when there are no counts at all."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  return counts / total if total > 0 else np.full(counts.shape, np.nan)


def label_groups(records: RoutingRecords) -> List[Tuple[str, np.ndarray]]:
  """[("all", every token), (label name, its tokens), ...]: labels without tokens left out."""
  groups = [("all", np.ones(records.num_tokens, bool))]
  for i, name in enumerate(records.label_names):
    tokens = records.label == i
    if tokens.any():
      groups.append((name, tokens))
  return groups


def unrecorded_choices(records: RoutingRecords, m: int) -> int:
  """Tokens of layer m assigned to more experts than recorded slots (expert choice only):
  counts computed from `expert` miss their extra assignments."""
  return int(np.sum(records.num_chosen[m] > records.expert.shape[-1]))


def normalize_entropy(entropy: np.ndarray, num_experts: int) -> np.ndarray:
  """entropy ÷ log E (1: uniform over all experts). E = 1 has only one outcome: 0."""
  if num_experts <= 1:
    return np.zeros_like(np.asarray(entropy, np.float64))
  return np.asarray(entropy, np.float64) / np.log(num_experts)


def ratio(numerator: float, denominator: float) -> float:
  """numerator / denominator as a float: inf for x/0 with x > 0, NaN for 0/0."""
  if denominator == 0:
    return float("inf") if numerator > 0 else float("nan")
  return float(numerator) / float(denominator)
