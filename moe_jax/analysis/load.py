"""How the load spreads over experts: per-label expert load (Mixtral §5's routing analysis) and
dead (starved) experts.

Counts are assignments as in common.py: a (token, expert) pair chosen by the router before
capacity (status KEPT or DROPPED, every recorded choice), so a top-k model has k per token.
"""
from __future__ import annotations

import numpy as np

from moe_jax.analysis import common
from moe_jax.analysis.records import RoutingRecords


def load_skew(label_share: np.ndarray, overall_share: np.ndarray) -> float:
  """Total-variation distance ½ Σ_e |s_label,e − s_all,e| ∈ [0, 1] between two share vectors
  [E]: the fraction of a label's assignments that would have to move to other experts for it
  to load the experts like the average token does."""
  return float(0.5 * np.sum(np.abs(np.asarray(label_share) - np.asarray(overall_share))))


def expert_load(records: RoutingRecords, plot: bool = True) -> common.Analysis:
  """Per MoE layer, label ("all" and each label with tokens) and expert: the load.

  Table columns: layer, label, expert, assigned (assignments, KEPT + DROPPED), kept (KEPT),
  share = assigned / Σ_experts assigned of that layer and label.
  Summary, per layer ("layer_<id>/..."):
    busiest_over_least: max_e assigned / min_e assigned (inf when an expert got none);
    cv: std_e / mean_e of assigned (population std; 0 = perfectly balanced);
    dropped_fraction: 1 − Σ kept / Σ assigned;
    <label>/load_skew: `load_skew` of the label's shares against the overall ones;
    most_skewed_label, .._expert, .._over_all: the label whose busiest expert is most
      over-represented relative to the overall share of that expert, that expert, and the ratio
      share_label / share_all;
    tokens_with_unrecorded_choices (only when > 0, expert choice): their extra assignments
      beyond the R recorded slots are not counted.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  e = records.num_experts
  groups = common.label_groups(records)
  rows, summary, shares_by_layer = [], {}, []
  for m in range(records.num_layers):
    key = common.layer_key(records, m)
    layer_shares = {}
    for label, tokens in groups:
      assigned, kept = common.expert_counts(records, m, tokens)
      share = common.shares(assigned)
      layer_shares[label] = share
      rows += [{"layer": records.layer_ids[m], "label": label, "expert": i,
                "assigned": int(assigned[i]), "kept": int(kept[i]), "share": float(share[i])}
               for i in range(e)]
      if label == "all":
        summary[f"{key}/busiest_over_least"] = common.ratio(assigned.max(), assigned.min())
        summary[f"{key}/cv"] = common.ratio(assigned.std(), assigned.mean())
        summary[f"{key}/dropped_fraction"] = 1.0 - common.ratio(kept.sum(), assigned.sum())
    overall = layer_shares["all"]
    best = None  # (over-representation, label, expert)
    for label, share in layer_shares.items():
      if label == "all" or np.isnan(share).any():
        continue
      summary[f"{key}/{label}/load_skew"] = load_skew(share, overall)
      busiest = int(np.argmax(share))
      over = common.ratio(share[busiest], overall[busiest])
      if best is None or over > best[0]:
        best = (over, label, busiest)
    if best is not None:
      summary[f"{key}/most_skewed_label"] = best[1]
      summary[f"{key}/most_skewed_label_expert"] = best[2]
      summary[f"{key}/most_skewed_label_over_all"] = best[0]
    unrecorded = common.unrecorded_choices(records, m)
    if unrecorded:
      summary[f"{key}/tokens_with_unrecorded_choices"] = unrecorded
    shares_by_layer.append(layer_shares)
  figure = _load_figure(records, shares_by_layer) if plot else None
  return common.Analysis(
      name="expert_load", title="Expert load by label",
      description=(
          "Share of each layer's router assignments (before capacity) that each expert "
          "receives, overall and per data label; the dashed line is the uniform share 1/E. "
          "Labels whose bars depart from the 'all' bars (high load_skew) route differently "
          "from the average token: Mixtral found little such domain specialization."),
      table=pd.DataFrame(rows, columns=["layer", "label", "expert", "assigned", "kept",
                                        "share"]),
      summary=summary, figure=figure)


def _load_figure(records, shares_by_layer):
  from moe_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  e = records.num_experts
  fig, axes = plots.panel_grid(records.num_layers, (plots.expert_panel_width(e), 3.0),
                               max_cols=1)
  for m, (ax, layer_shares) in enumerate(zip(axes, shares_by_layer)):
    n = len(layer_shares)
    width = 0.8 / n
    for i, (label, share) in enumerate(layer_shares.items()):
      if e <= plots.MAX_LABELLED_EXPERTS:  # grouped bars
        ax.bar(np.arange(e) - 0.4 + width * (i + 0.5), share, width, label=label,
               color=plots.color(i, n))
      else:  # thin grouped bars of many experts blur: one step outline per label
        ax.stairs(share, np.arange(e + 1) - 0.5, label=label, color=plots.color(i, n),
                  linewidth=1.2 if label == "all" else 0.8)
    ax.axhline(1.0 / e, color="k", linestyle="--", linewidth=1, label="1/E")
    plots.expert_ticks(ax, e)
    ax.set_ylabel("share of assignments")
    ax.set_title(f"MoE layer {records.layer_ids[m]}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
  return fig


def dead_experts(records: RoutingRecords, threshold: float = 0.1,
                 plot: bool = True) -> common.Analysis:
  """Experts that (almost) never receive tokens.

  Per (layer, expert): assigned (as in `expert_load`), share = assigned / Σ assigned,
  share_over_fair = share · E (1 = the fair share 1/E), dead = share_over_fair < threshold
  (the expert receives less than `threshold` of its fair share; False when the layer has no
  assignments at all, where shares are NaN), never_chosen = (assigned == 0).
  Summary per layer: num_dead, dead_experts (comma-separated ids, "" when none),
  num_never_chosen, min_share_over_fair.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  e = records.num_experts
  rows, summary, per_layer = [], {}, []
  for m in range(records.num_layers):
    key = common.layer_key(records, m)
    assigned, _ = common.expert_counts(records, m)
    over_fair = common.shares(assigned) * e
    with np.errstate(invalid="ignore"):
      dead = over_fair < threshold
    rows += [{"layer": records.layer_ids[m], "expert": i, "assigned": int(assigned[i]),
              "share": float(over_fair[i] / e), "share_over_fair": float(over_fair[i]),
              "dead": bool(dead[i]), "never_chosen": bool(assigned[i] == 0)}
             for i in range(e)]
    summary[f"{key}/num_dead"] = int(dead.sum())
    summary[f"{key}/dead_experts"] = ",".join(str(i) for i in np.flatnonzero(dead))
    summary[f"{key}/num_never_chosen"] = int(np.sum(assigned == 0))
    summary[f"{key}/min_share_over_fair"] = float(np.min(over_fair))
    per_layer.append((over_fair, dead))
  figure = _dead_figure(records, per_layer, threshold) if plot else None
  return common.Analysis(
      name="dead_experts", title="Dead experts",
      description=(
          f"Each expert's share of its layer's assignments relative to the fair share 1/E "
          f"(1 = fair). Experts below {threshold:g} (red) are dead or starved: their "
          f"parameters get almost no tokens and hence almost no gradient."),
      table=pd.DataFrame(rows, columns=["layer", "expert", "assigned", "share",
                                        "share_over_fair", "dead", "never_chosen"]),
      summary=summary, figure=figure)


def _dead_figure(records, per_layer, threshold):
  from moe_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  e = records.num_experts
  fig, axes = plots.panel_grid(records.num_layers, (plots.expert_panel_width(e), 2.8),
                               max_cols=1)
  for m, (ax, (over_fair, dead)) in enumerate(zip(axes, per_layer)):
    ax.bar(np.arange(e), np.nan_to_num(over_fair), 0.8,
           color=np.where(dead, "C3", "C0").tolist())
    ax.axhline(1.0, color="k", linestyle=":", linewidth=1, label="fair share")
    ax.axhline(threshold, color="C3", linestyle="--", linewidth=1,
               label=f"dead below {threshold:g}")
    plots.expert_ticks(ax, e)
    ax.set_ylabel("share × E")
    ax.set_title(f"MoE layer {records.layer_ids[m]}: {int(dead.sum())} dead")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
  return fig
