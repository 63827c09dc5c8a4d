"""Which tokens go to which experts: OpenMoE's context-independent specialization (a token id is
routed to the same expert whatever its context) and the most frequent tokens of each expert.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from moe_jax.analysis import common
from moe_jax.analysis.records import RoutingRecords

# Experts listed in the top-tokens figure; the table always has all of them.
MAX_EXPERTS_IN_FIGURE = 64


@dataclasses.dataclass
class TokenRouting:
  """Per token id, the distribution of its assignments over experts in one layer.

  K token ids (sorted) with at least one counted assignment; the distribution is kept sparse as
  (token id, expert, count) pairs sorted by token id then expert. Ties for the top expert go to
  the lowest expert id.
  """
  token_id: np.ndarray  # [K]
  occurrences: np.ndarray  # [K] times the id occurs among the selected tokens
  count: np.ndarray  # [K] assignments counted (= occurrences for first choices of token choice)
  top_expert: np.ndarray  # [K]
  top_count: np.ndarray  # [K]
  entropy: np.ndarray  # [K] nats, of count_e / count
  pair_token: np.ndarray  # [Q]
  pair_expert: np.ndarray  # [Q]
  pair_count: np.ndarray  # [Q]


def token_routing(records: RoutingRecords, m: int, choices: str = "first",
                  tokens: Optional[np.ndarray] = None) -> TokenRouting:
  """The per-token-id expert distributions of layer m over `tokens` (bool mask [N] or None).

  choices: "first" counts choice 0 (the token's top expert), "all" every recorded choice;
  only assignments (KEPT or DROPPED) count.
  """
  mask = common.assigned_mask(records, m, choices)
  if tokens is not None:
    mask = mask & tokens[:, None]
  tok = np.broadcast_to(records.token_id[:, None], mask.shape)[mask].astype(np.int64)
  exp = records.expert[m][mask].astype(np.int64)
  e = records.num_experts
  # One int64 key per (token id, expert) pair: a sparse count, since vocab × E can be large.
  keys, pair_count = np.unique(tok * e + exp, return_counts=True)
  pair_token, pair_expert = keys // e, keys % e
  ids, starts, sizes = np.unique(pair_token, return_index=True, return_counts=True)
  if ids.size == 0:
    empty = np.zeros(0, np.int64)
    return TokenRouting(empty, empty, empty, empty, empty, np.zeros(0), empty, empty, empty)
  count = np.add.reduceat(pair_count, starts)
  # Within each token id (contiguous, same place after sorting): largest count, then lowest id.
  order = np.lexsort((pair_expert, -pair_count, pair_token))
  top = order[starts]
  p = pair_count / np.repeat(count, sizes)
  entropy = -np.add.reduceat(p * np.log(p), starts)
  all_ids, occurrences = np.unique(
      records.token_id if tokens is None else records.token_id[tokens], return_counts=True)
  return TokenRouting(ids, occurrences[np.searchsorted(all_ids, ids)], count,
                      pair_expert[top], pair_count[top], entropy, pair_token, pair_expert,
                      pair_count)


def token_specialization(records: RoutingRecords, min_count: int = 10, choices: str = "first",
                         decode: Optional[Callable[[int], str]] = None,
                         plot: bool = True) -> common.Analysis:
  """How consistently each token id goes to one expert, whatever its context.

  Per (layer, token id occurring at least `min_count` times): occurrences, count (assignments
  counted: choice 0 only for choices="first", every KEPT/DROPPED choice for "all"), top_expert
  (most frequent expert, ties to the lowest id), top_share = count to top_expert / count,
  entropy = −Σ_e q_e log q_e (nats) of the token's expert distribution q, normalized_entropy =
  entropy / log E.
  Summary per layer:
    num_token_ids, token_coverage (fraction of the layer's tokens whose id was analysed);
    mean_top_share, mean_normalized_entropy: weighted by count, so mean_top_share is the
      fraction of analysed assignments that go to their token id's top expert;
    baseline_top_share: max_e of the layer's overall load share (same choices, all tokens),
      the top_share of a token routed exactly like the average token;
    null_top_share: the count-weighted mean top_share expected if each analysed token's count
      assignments were drawn independently from that overall load (a context-free router):
      above baseline_top_share for small counts, since a few draws concentrate by chance
      (sampled with a fixed seed).
  Plus num_token_ids over all layers and the choices used. Rows are sorted by layer, then
  most frequent token id first; `decode` (token id -> text) adds a `piece` column.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  e = records.num_experts
  rows, summary, per_layer, analysed = [], {"choices": choices}, [], set()
  rng = np.random.default_rng(0)
  for m in range(records.num_layers):
    key = common.layer_key(records, m)
    tr = token_routing(records, m, choices)
    keep = tr.occurrences >= min_count
    top_share = tr.top_count[keep] / tr.count[keep]
    norm_entropy = common.normalize_entropy(tr.entropy[keep], e)
    rows += [{"layer": records.layer_ids[m], "token_id": int(t), "occurrences": int(o),
              "count": int(c), "top_expert": int(x), "top_share": float(s), "entropy": float(h),
              "normalized_entropy": float(n)}
             for t, o, c, x, s, h, n in zip(tr.token_id[keep], tr.occurrences[keep],
                                            tr.count[keep], tr.top_expert[keep], top_share,
                                            tr.entropy[keep], norm_entropy)]
    analysed.update(tr.token_id[keep].tolist())
    weights = tr.count[keep].astype(np.float64)
    overall = common.shares(common.expert_counts(records, m, choices=choices)[0])
    baseline = float(np.max(overall)) if not np.isnan(overall).any() else float("nan")
    null = _null_top_share(tr.count[keep], overall, rng)
    summary[f"{key}/num_token_ids"] = int(keep.sum())
    summary[f"{key}/token_coverage"] = common.ratio(tr.occurrences[keep].sum(),
                                                    records.num_tokens)
    summary[f"{key}/mean_top_share"] = common.ratio(np.sum(weights * top_share), weights.sum())
    summary[f"{key}/mean_normalized_entropy"] = common.ratio(np.sum(weights * norm_entropy),
                                                             weights.sum())
    summary[f"{key}/baseline_top_share"] = baseline
    summary[f"{key}/null_top_share"] = null
    per_layer.append((top_share, weights, baseline, null))
  summary["num_token_ids"] = len(analysed)
  figure = _specialization_figure(records, per_layer) if plot else None
  return common.Analysis(
      name="token_specialization", title="Context-independent token specialization",
      description=(
          f"For each token id seen at least {min_count} times, the share of its routing "
          f"({choices} choices) that goes to its most frequent expert, weighted by count. "
          f"Mass near 1, far above the baseline (dashed: a token routed like the average token) "
          f"and the context-free line (dotted: what such routing reaches by chance with these "
          f"counts), means experts specialise by token id regardless of context (OpenMoE)."),
      table=_by_frequency(pd.DataFrame(rows, columns=[
          "layer", "token_id", "occurrences", "count", "top_expert", "top_share", "entropy",
          "normalized_entropy"]), decode),
      summary=summary, figure=figure)


def _by_frequency(table, decode):
  table = table.sort_values(["layer", "occurrences", "token_id"], ascending=[True, False, True],
                            ignore_index=True)
  if decode is not None:
    table.insert(2, "piece", [decode(int(t)) for t in table["token_id"]])
  return table


def _null_top_share(counts: np.ndarray, overall: np.ndarray, rng) -> float:
  """Count-weighted mean of max_e(x_e)/n, x ~ Multinomial(n, overall), over the given counts
  (four draws each)."""
  if counts.size == 0 or np.isnan(overall).any():
    return float("nan")
  n = np.repeat(counts.astype(np.int64), 4)
  draws = rng.multinomial(n, overall / overall.sum())
  return float(draws.max(axis=-1).sum() / n.sum())


def _specialization_figure(records, per_layer):
  from moe_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  fig, axes = plots.panel_grid(records.num_layers, (5.0, 3.0))
  for m, (ax, (top_share, weights, baseline, null)) in enumerate(zip(axes, per_layer)):
    total = weights.sum()
    ax.hist(top_share, bins=20, range=(0.0, 1.0),
            weights=weights / total if total else None, color="C0")
    ax.axvline(baseline, color="k", linestyle="--", linewidth=1, label="baseline (max load)")
    ax.axvline(null, color="C3", linestyle=":", linewidth=1.5, label="context-free router")
    ax.set_xlim(0, 1)
    ax.set_xlabel("top_share (fraction of a token id's routing to its top expert)")
    ax.set_ylabel("fraction of assignments")
    ax.set_title(f"MoE layer {records.layer_ids[m]}: {len(top_share)} token ids")
    ax.legend(fontsize="small")
  return fig


def top_tokens_per_expert(records: RoutingRecords, top_n: int = 10,
                          decode: Optional[Callable[[int], str]] = None, min_count: int = 1,
                          plot: bool = False) -> common.Analysis:
  """The most frequent token ids of each expert (first choices), as OpenMoE lists them.

  Per (layer, expert, rank 1..top_n): token_id, piece (decode(token_id), or str(token_id)
  without `decode`), count (the id's first choices that went to the expert; ties ranked by
  lower token id), share_of_token = count / the id's first choices in the layer,
  share_of_expert = count / the expert's first choices. Token ids occurring fewer than
  `min_count` times are left out. Summary per layer: mean over experts of the rank-1
  share_of_token (how exclusively experts own their favourite token).
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  decode = decode or str
  rows, summary = [], {}
  for m in range(records.num_layers):
    tr = token_routing(records, m, "first")
    where = np.searchsorted(tr.token_id, tr.pair_token)
    keep = tr.occurrences[where] >= min_count
    token, expert, count = tr.pair_token[keep], tr.pair_expert[keep], tr.pair_count[keep]
    token_total = tr.count[where][keep]
    expert_total = np.bincount(expert, weights=count, minlength=records.num_experts)
    rank1 = []
    for x in range(records.num_experts):
      mine = np.flatnonzero(expert == x)
      mine = mine[np.lexsort((token[mine], -count[mine]))][:top_n]
      rows += [{"layer": records.layer_ids[m], "expert": x, "rank": r + 1,
                "token_id": int(token[i]), "piece": decode(int(token[i])),
                "count": int(count[i]), "share_of_token": float(count[i] / token_total[i]),
                "share_of_expert": float(count[i] / expert_total[x])}
               for r, i in enumerate(mine)]
      if mine.size:
        rank1.append(count[mine[0]] / token_total[mine[0]])
    summary[f"{common.layer_key(records, m)}/mean_top1_share_of_token"] = (
        float(np.mean(rank1)) if rank1 else float("nan"))
  table = pd.DataFrame(rows, columns=["layer", "expert", "rank", "token_id", "piece", "count",
                                      "share_of_token", "share_of_expert"])
  figure = _top_tokens_figure(records, table) if plot else None
  return common.Analysis(
      name="top_tokens_per_expert", title="Most frequent tokens per expert",
      description=(
          "For each expert, the token ids most often routed to it as first choice, with how "
          "much of that token's routing (share_of_token) and of the expert's load "
          "(share_of_expert) they account for. Shares near 1 mean the expert owns the token."),
      table=table, summary=summary, figure=figure)


def _top_tokens_figure(records, table, pieces_shown: int = 5):
  """Text panels: one line per expert with its most frequent pieces."""
  from moe_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  shown = min(records.num_experts, MAX_EXPERTS_IN_FIGURE)
  fig, axes = plots.panel_grid(records.num_layers, (7.0, 0.6 + 0.13 * shown), max_cols=2)
  for m, ax in enumerate(axes):
    layer = table[table["layer"] == records.layer_ids[m]]
    lines = []
    for x in range(shown):
      top = layer[(layer["expert"] == x) & (layer["rank"] <= pieces_shown)]
      pieces = "  ".join(repr(p)[1:-1] for p in top["piece"])
      lines.append(f"e{x:<3d} {pieces}")
    if shown < records.num_experts:
      lines.append(f"... {records.num_experts - shown} more experts in the table")
    ax.axis("off")
    # parse_math=False: pieces such as "$" must not be read as mathtext.
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7,
            transform=ax.transAxes, parse_math=False)
    ax.set_title(f"MoE layer {records.layer_ids[m]}: top {pieces_shown} tokens per expert")
  return fig
