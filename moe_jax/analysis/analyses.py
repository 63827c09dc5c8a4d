"""The routing analyses of the MoE literature, over `RoutingRecords` (records.py).

Each function returns an `Analysis`: a tidy pandas table, headline numbers and (plot=True) a
matplotlib figure. Counting conventions are in common.py: an *assignment* is a (token, expert)
choice made by the router before capacity, status KEPT or DROPPED; SKIPPED and UNUSED slots
never count.

| analysis | literature | module |
|---|---|---|
| `expert_load`: per-label load per expert, load skew | Mixtral §5 | load.py |
| `dead_experts`: experts starved of tokens | (expert collapse) | load.py |
| `token_specialization`: a token id's routing, whatever its context | OpenMoE | specialization.py |
| `top_tokens_per_expert`: each expert's most frequent tokens | OpenMoE | specialization.py |
| `drops_by_position`: dropped fraction along the sequence | OpenMoE | drops.py |
| `routing_agreement`, `agreement_over_steps`: routing learned early | OpenMoE | agreement.py |
| `router_confidence`: router entropy and top-1 probability | (ST-MoE metrics) | confidence.py |
"""
from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Union

from moe_jax.analysis.agreement import agreement_over_steps, routing_agreement
from moe_jax.analysis.common import Analysis
from moe_jax.analysis.confidence import router_confidence
from moe_jax.analysis.drops import drops_by_position
from moe_jax.analysis.load import dead_experts, expert_load
from moe_jax.analysis.records import RoutingRecords
from moe_jax.analysis.specialization import token_specialization, top_tokens_per_expert

__all__ = ["Analysis", "expert_load", "dead_experts", "token_specialization",
           "top_tokens_per_expert", "drops_by_position", "routing_agreement",
           "agreement_over_steps", "router_confidence", "run_all"]


def run_all(records: RoutingRecords, *,
            compare_with: Union[None, RoutingRecords, Mapping[int, RoutingRecords]] = None,
            capacity_sweep: Optional[Sequence[RoutingRecords]] = None,
            decode: Optional[Callable[[int], str]] = None, min_count: int = 10,
            plot: bool = True) -> List[Analysis]:
  """Every analysis that applies, with default settings otherwise.

  compare_with: records of another checkpoint on the same tokens (→ `routing_agreement` of
    records against it), or {step: records} of several checkpoints (→ `agreement_over_steps`);
    None: no agreement analysis.
  capacity_sweep: records made with several capacity factors for `drops_by_position`
    (default: `records` alone).
  decode: token id → text, for `token_specialization` and `top_tokens_per_expert`.
  min_count: occurrences a token id needs in the per-token-id analyses
    (`token_specialization`, the token_top_expert_match of the agreement).
  """
  results = [expert_load(records, plot=plot), dead_experts(records, plot=plot),
             router_confidence(records, plot=plot),
             token_specialization(records, min_count, decode=decode, plot=plot),
             top_tokens_per_expert(records, decode=decode, plot=plot),
             drops_by_position(capacity_sweep or records, plot=plot)]
  if isinstance(compare_with, RoutingRecords):
    results.append(routing_agreement(records, compare_with, min_count, plot=plot))
  elif compare_with is not None:
    results.append(agreement_over_steps(compare_with, min_count=min_count, plot=plot))
  return results
