"""How much two checkpoints agree on routing the same tokens (OpenMoE: routing is learned early
in training and then barely changes).

The records keep each token's router distribution only through its P largest probabilities
(`top_expert`, `top_prob`). The divergence between two checkpoints' distributions p and q is
computed on the finest partition of the experts on which both are known: each expert in the
recorded top-P lists of *both* checkpoints is its own outcome, and every other expert is merged
into one "other" outcome holding 1 − Σ of the shared experts' probabilities (clipped at 0, and
each distribution renormalised, against float16 rounding). Both distributions go through the
same merge, so by the data-processing inequality the result is a lower bound on the true
Jensen–Shannon divergence, and exact when P = E. (Giving each side its own recorded experts
plus an "other" bucket would not be a lower bound: with P = 1 and different top experts it puts
each side's mass where the other has none and can exceed the true divergence.) When the two
top-P sets coincide this is exactly "the P recorded experts plus an other bucket".
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from moe_jax.analysis import common
from moe_jax.analysis.records import RoutingRecords
from moe_jax.analysis.specialization import token_routing

# Tokens per chunk in the pairwise [chunk, P, P] comparison of recorded experts.
_CHUNK = 1 << 16


def check_same_tokens(records_a: RoutingRecords, records_b: RoutingRecords) -> None:
  """Raises ValueError naming what differs unless both records cover the same tokens and
  MoE layers of models with the same number of experts."""
  differences = []
  for attr in ("layer_ids", "num_experts", "num_tokens"):
    if getattr(records_a, attr) != getattr(records_b, attr):
      differences.append(f"{attr} ({getattr(records_a, attr)} vs {getattr(records_b, attr)})")
  if records_a.num_tokens == records_b.num_tokens:
    for attr in ("token_id", "example_id", "position"):
      unequal = int(np.sum(getattr(records_a, attr) != getattr(records_b, attr)))
      if unequal:
        differences.append(f"{attr} ({unequal} of {records_a.num_tokens} tokens differ)")
  if differences:
    raise ValueError("routing agreement needs records of the same tokens and MoE layers; "
                     "they differ in " + ", ".join(differences) + ".")


def _kl_terms(x: np.ndarray, mid: np.ndarray) -> np.ndarray:
  """Σ x log(x / mid) over the last axis, with 0 log 0 = 0 (mid > 0 wherever x > 0)."""
  safe = x > 0
  return np.sum(np.where(safe, x * np.log(np.where(safe, x, 1.0) / np.where(safe, mid, 1.0)),
                         0.0), axis=-1)


def top_p_js_divergence(expert_a: np.ndarray, prob_a: np.ndarray, expert_b: np.ndarray,
                        prob_b: np.ndarray) -> np.ndarray:
  """Per-token Jensen–Shannon divergence (nats, in [0, log 2]) of two router distributions
  given by their recorded top-P experts [N, P] and probabilities [N, P] (module docstring):
  JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q) / 2, on the shared-experts-plus-other
  partition. Returns [N] float64."""
  out = np.zeros(expert_a.shape[0])
  for lo in range(0, expert_a.shape[0], _CHUNK):
    ea, eb = expert_a[lo:lo + _CHUNK], expert_b[lo:lo + _CHUNK]
    pa = np.asarray(prob_a[lo:lo + _CHUNK], np.float64)
    pb = np.asarray(prob_b[lo:lo + _CHUNK], np.float64)
    same = ((ea[:, :, None] == eb[:, None, :]) & (ea[:, :, None] >= 0)
            & (eb[:, None, :] >= 0))  # [n, Pa, Pb]
    x = np.where(same.any(-1), pa, 0.0)  # a's prob of each of its shared experts
    y = np.sum(np.where(same, pb[:, None, :], 0.0), axis=-1)  # b's prob of the same experts
    x = np.concatenate([x, np.maximum(1.0 - x.sum(-1), 0.0)[:, None]], axis=-1)
    y = np.concatenate([y, np.maximum(1.0 - y.sum(-1), 0.0)[:, None]], axis=-1)
    x, y = x / x.sum(-1, keepdims=True), y / y.sum(-1, keepdims=True)
    mid = 0.5 * (x + y)
    out[lo:lo + _CHUNK] = 0.5 * _kl_terms(x, mid) + 0.5 * _kl_terms(y, mid)
  return out


def _top_expert_match(records_a, records_b, m, tokens, min_count):
  """(token ids compared, fraction whose most frequent first-choice expert is the same)."""
  tr_a = token_routing(records_a, m, "first", tokens)
  tr_b = token_routing(records_b, m, "first", tokens)
  ids_a = tr_a.token_id[tr_a.occurrences >= min_count]
  _, ia, ib = np.intersect1d(ids_a, tr_b.token_id, return_indices=True)
  top_a = tr_a.top_expert[tr_a.occurrences >= min_count][ia]
  matches = top_a == tr_b.top_expert[ib]
  return int(matches.size), (float(matches.mean()) if matches.size else float("nan"))


def routing_agreement(records_a: RoutingRecords, records_b: RoutingRecords, min_count: int = 10,
                      plot: bool = True) -> common.Analysis:
  """Agreement of two checkpoints' routing of the same tokens.

  Per layer and label ("all", then each label of records_a with tokens):
    tokens: tokens compared;
    top1_match: fraction of the tokens, among those with a first choice (KEPT or DROPPED) in
      both records, whose choice-0 expert is the same;
    mean_js: mean over the tokens of `top_p_js_divergence` (a lower bound when P < E);
    token_ids, token_top_expert_match: over token ids occurring at least `min_count` times,
      the fraction whose most frequent first-choice expert is the same in both.
  Summary per layer (label "all"): top1_match, mean_js, token_top_expert_match; step_a and
  step_b (the checkpoint steps, "fresh" for None). Raises ValueError if the records do not
  cover the same tokens and layers.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  check_same_tokens(records_a, records_b)
  rows, js_by_layer = [], []
  summary = {"step_a": "fresh" if records_a.step is None else records_a.step,
             "step_b": "fresh" if records_b.step is None else records_b.step}
  for m in range(records_a.num_layers):
    key = common.layer_key(records_a, m)
    js = top_p_js_divergence(records_a.top_expert[m], records_a.top_prob[m],
                             records_b.top_expert[m], records_b.top_prob[m])
    both = (common.assigned_mask(records_a, m, "first")[:, 0]
            & common.assigned_mask(records_b, m, "first")[:, 0])
    same_first = records_a.expert[m, :, 0] == records_b.expert[m, :, 0]
    for label, tokens in common.label_groups(records_a):
      compared = tokens & both
      num_ids, id_match = _top_expert_match(records_a, records_b, m, tokens, min_count)
      row = {"layer": records_a.layer_ids[m], "label": label, "tokens": int(tokens.sum()),
             "top1_match": (float(same_first[compared].mean()) if compared.any()
                            else float("nan")),
             "mean_js": float(js[tokens].mean()) if tokens.any() else float("nan"),
             "token_ids": num_ids, "token_top_expert_match": id_match}
      rows.append(row)
      if label == "all":
        for name in ("top1_match", "mean_js", "token_top_expert_match"):
          summary[f"{key}/{name}"] = row[name]
    js_by_layer.append(js)
  table = pd.DataFrame(rows, columns=["layer", "label", "tokens", "top1_match", "mean_js",
                                      "token_ids", "token_top_expert_match"])
  figure = _agreement_figure(records_a, table, js_by_layer, summary) if plot else None
  return common.Analysis(
      name="routing_agreement",
      title=f"Routing agreement: step {summary['step_a']} vs step {summary['step_b']}",
      description=(
          "How often two checkpoints send the same token to the same first expert "
          "(top1_match), how far apart their router distributions are (Jensen–Shannon "
          "divergence in nats, 0 = identical, ln 2 = disjoint; a lower bound when fewer than "
          "E probabilities were recorded), and whether token ids keep their favourite expert. "
          "OpenMoE found routing fixed early in training: high matches, small divergences."),
      table=table, summary=summary, figure=figure)


def _agreement_figure(records, table, js_by_layer, summary):
  from moe_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  fig, (ax_js, ax_match) = plots.panel_grid(2, (5.0, 3.2))
  m_layers = records.num_layers
  for m, js in enumerate(js_by_layer):
    ax_js.hist(js, bins=30, range=(0.0, np.log(2.0)), histtype="step", linewidth=1.5,
               weights=np.full(js.size, 1.0 / max(js.size, 1)), color=plots.color(m, m_layers),
               label=f"layer {records.layer_ids[m]}")
  ax_js.set_xlabel("Jensen–Shannon divergence per token (nats)")
  ax_js.set_ylabel("fraction of tokens")
  ax_js.set_title(f"step {summary['step_a']} vs step {summary['step_b']}")
  ax_js.legend(fontsize="small")
  labels = list(dict.fromkeys(table["label"]))
  width = 0.8 / len(labels)
  for i, label in enumerate(labels):
    rows = table[table["label"] == label]
    ax_match.bar(np.arange(m_layers) - 0.4 + width * (i + 0.5), rows["top1_match"], width,
                 label=label, color=plots.color(i, len(labels)))
  ax_match.set_xticks(range(m_layers), [str(i) for i in records.layer_ids])
  ax_match.set_xlabel("MoE layer")
  ax_match.set_ylabel("top-1 expert match")
  ax_match.set_ylim(0, 1)
  ax_match.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
  return fig


def agreement_over_steps(records_by_step: Mapping[int, RoutingRecords],
                         reference_step: Optional[int] = None, min_count: int = 10,
                         plot: bool = True) -> common.Analysis:
  """Each checkpoint's routing compared with a reference checkpoint's (default: the last step).

  Table, per (step, layer), label "all" of `routing_agreement`: step, layer, top1_match,
  mean_js, token_top_expert_match (the reference step itself gives 1, 0, 1). Summary:
  reference_step and "layer_<id>/step_<s>/top1_match", ".../mean_js".
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if not records_by_step:
    raise ValueError("agreement_over_steps needs records of at least one step.")
  steps = sorted(records_by_step)
  reference_step = steps[-1] if reference_step is None else reference_step
  if reference_step not in records_by_step:
    raise ValueError(f"reference_step {reference_step} is not among the steps {steps}.")
  reference = records_by_step[reference_step]
  rows, summary = [], {"reference_step": reference_step}
  for step in steps:
    table = routing_agreement(records_by_step[step], reference, min_count, plot=False).table
    for row in table[table["label"] == "all"].itertuples():
      rows.append({"step": step, "layer": row.layer, "top1_match": row.top1_match,
                   "mean_js": row.mean_js, "token_top_expert_match": row.token_top_expert_match})
      summary[f"layer_{row.layer}/step_{step}/top1_match"] = row.top1_match
      summary[f"layer_{row.layer}/step_{step}/mean_js"] = row.mean_js
  table = pd.DataFrame(rows, columns=["step", "layer", "top1_match", "mean_js",
                                      "token_top_expert_match"])
  figure = _over_steps_figure(table, reference_step) if plot else None
  return common.Analysis(
      name="agreement_over_steps", title=f"Routing agreement with step {reference_step}",
      description=(
          f"Each checkpoint's routing of the same tokens compared with step {reference_step}'s: "
          f"the fraction of tokens with the same first expert and the mean Jensen–Shannon "
          f"divergence of the router distributions. A curve that reaches its plateau early "
          f"means routing decisions are fixed early in training (OpenMoE)."),
      table=table, summary=summary, figure=figure)


def _over_steps_figure(table, reference_step):
  from moe_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  fig, (ax_match, ax_js) = plots.panel_grid(2, (5.0, 3.2))
  layers = list(dict.fromkeys(table["layer"]))
  for i, layer in enumerate(layers):
    rows = table[table["layer"] == layer]
    style = {"marker": "o", "markersize": 3, "color": plots.color(i, len(layers)),
             "label": f"layer {layer}"}
    ax_match.plot(rows["step"], rows["top1_match"], **style)
    ax_js.plot(rows["step"], rows["mean_js"], **style)
  for ax, name in ((ax_match, "top-1 expert match"), (ax_js, "mean JS divergence (nats)")):
    ax.axvline(reference_step, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel(name)
    ax.legend(fontsize="small", loc="best")
  ax_match.set_ylim(0, 1.05)
  ax_js.set_ylim(bottom=0)
  return fig
