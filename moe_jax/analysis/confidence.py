"""How sure the router is: distributions of router entropy and of the top-1 probability."""
from __future__ import annotations

import numpy as np

from moe_jax.analysis import common
from moe_jax.analysis.records import RoutingRecords


def confidence_values(records: RoutingRecords, m: int):
  """{quantity: (values [N] float64, (lo, hi) histogram range)} of layer m.

  entropy: −Σ_e p_e log p_e over all E experts (nats, ∈ [0, log E]); normalized_entropy:
  entropy / log E (1 = uniform router); top1_prob: the largest router probability (∈ [1/E, 1]).
  Values are clipped into their range: float16 rounding can step just outside it.
  """
  e = records.num_experts
  log_e = float(np.log(e)) if e > 1 else 1.0
  entropy = np.asarray(records.entropy[m], np.float64)
  top1 = np.asarray(records.top_prob[m, :, 0], np.float64)
  ranges = {"entropy": (0.0, log_e), "normalized_entropy": (0.0, 1.0), "top1_prob": (0.0, 1.0)}
  values = {"entropy": entropy, "normalized_entropy": common.normalize_entropy(entropy, e),
            "top1_prob": top1}
  return {q: (np.clip(values[q], *ranges[q]), ranges[q]) for q in ranges}


def router_confidence(records: RoutingRecords, bins: int = 20,
                      plot: bool = True) -> common.Analysis:
  """Histograms of router entropy and of the top-1 router probability, per MoE layer.

  Table: layer, quantity ("entropy", "normalized_entropy", "top1_prob"), bin, bin_start,
  bin_end, count, fraction. `bins` equal-width bins over [0, log E] for entropy and [0, 1]
  otherwise; a bin holds [bin_start, bin_end), the last also its right edge.
  Summary per layer: mean_entropy (nats), mean_normalized_entropy, mean_top1_prob,
  frac_top1_prob_gt_0.5 (tokens whose top expert holds most of the router's mass).
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  rows, summary, histograms = [], {}, []
  for m in range(records.num_layers):
    key = common.layer_key(records, m)
    layer_hists = {}
    values = confidence_values(records, m)
    for quantity, (x, value_range) in values.items():
      count, edges = np.histogram(x, bins=bins, range=value_range)
      fraction = count / max(x.size, 1)
      layer_hists[quantity] = (fraction, edges)
      rows += [{"layer": records.layer_ids[m], "quantity": quantity, "bin": b,
                "bin_start": float(edges[b]), "bin_end": float(edges[b + 1]),
                "count": int(count[b]), "fraction": float(fraction[b])} for b in range(bins)]
      summary[f"{key}/mean_{quantity}"] = _mean(x)
    summary[f"{key}/frac_top1_prob_gt_0.5"] = _mean(values["top1_prob"][0] > 0.5)
    histograms.append(layer_hists)
  figure = _confidence_figure(records, histograms) if plot else None
  return common.Analysis(
      name="router_confidence", title="Router confidence",
      description=(
          "Distribution over tokens of the router's entropy (normalised by log E: 1 = uniform "
          "over experts, 0 = all mass on one expert) and of its largest probability. A "
          "confident router has low entropy and top-1 probabilities near 1; a router near "
          "uniform has barely learned to route."),
      table=pd.DataFrame(rows, columns=["layer", "quantity", "bin", "bin_start", "bin_end",
                                        "count", "fraction"]),
      summary=summary, figure=figure)


def _mean(x: np.ndarray) -> float:
  return float(np.mean(x)) if x.size else float("nan")


def _confidence_figure(records, histograms):
  from moe_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  fig, axes = plots.panel_grid(2 * records.num_layers, (4.5, 2.8), max_cols=2)
  e = records.num_experts
  for m, layer_hists in enumerate(histograms):
    for ax, quantity, xlabel in (
        (axes[2 * m], "normalized_entropy", f"router entropy / log E  (log E = {np.log(e):.2f})"),
        (axes[2 * m + 1], "top1_prob", "top-1 router probability")):
      fraction, edges = layer_hists[quantity]
      ax.stairs(fraction, edges, fill=True, color="C0")
      if quantity == "top1_prob":
        ax.axvline(1.0 / e, color="k", linestyle="--", linewidth=1, label="1/E")
        ax.legend(fontsize="small")
      ax.set_xlim(edges[0], edges[-1])
      ax.set_xlabel(xlabel)
      ax.set_ylabel("fraction of tokens")
      ax.set_title(f"MoE layer {records.layer_ids[m]}")
  return fig
