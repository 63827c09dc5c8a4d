"""Where in the sequence tokens are dropped (OpenMoE: drops pile up towards the end).

With one routing group per row, capacity is filled in row order within each priority level, so
tokens late in the row find their experts full more often. Comparing records made with several
capacity factors shows how much capacity it takes to protect the end of the sequence.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from moe_jax.analysis import common
from moe_jax.analysis.records import DROPPED, RoutingRecords

POSITIONS = ("row_position", "position")


def capacity_name(capacity_factor: Optional[float]) -> str:
  """Summary-key prefix of a capacity factor: "cf_1.25", or "dropless" for None."""
  return "dropless" if capacity_factor is None else f"cf_{capacity_factor:g}"


def position_buckets(position: np.ndarray, length: int, num_buckets: int) -> np.ndarray:
  """Bucket b ∈ [0, B) of each position: B buckets of equal width length/B over
  [0, length), i.e. b = floor(position · B / length) (integer arithmetic, no float edges)."""
  return (np.asarray(position, np.int64) * num_buckets) // length


def drops_by_position(records: Union[RoutingRecords, Sequence[RoutingRecords]],
                      num_buckets: int = 8, position: str = "row_position",
                      plot: bool = True) -> common.Analysis:
  """Dropped fraction of assignments by position, per capacity factor and layer.

  records: one RoutingRecords, or several made with different capacity factors over the same
    kind of data. Positions (`position`: "row_position", the place in the capacity queue, or
    "position", within the example) are bucketed into B = min(num_buckets, L) buckets of equal
    width L / B over [0, L), L = the largest position in any of the records + 1.
  Table, per (capacity factor, layer, bucket): capacity ("cf_1.25" / "dropless"),
  capacity_factor (NaN when dropless), layer, bucket, bucket_start, bucket_end (the position
  range [start, end)), assignments (KEPT + DROPPED), dropped, dropped_fraction (NaN for an
  empty bucket).
  Summary per capacity ("cf_1.25/..."), pooled over layers: dropped_fraction,
  first_bucket_dropped_fraction, last_bucket_dropped_fraction; with several layers also
  "<capacity>/layer_<id>/dropped_fraction".
  Expert-choice records have no DROPPED assignments (capacity is how experts choose); the
  tokens no expert took have num_chosen = 0 and are not what this measures.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if position not in POSITIONS:
    raise ValueError(f"position must be one of {POSITIONS}, got {position!r}.")
  sweep = [records] if isinstance(records, RoutingRecords) else list(records)
  if not sweep:
    raise ValueError("drops_by_position needs at least one RoutingRecords.")
  names = [capacity_name(r.capacity_factor) for r in sweep]
  if len(set(names)) != len(names):
    raise ValueError(f"the records must have different capacity factors, got {names}.")
  length = max([int(getattr(r, position).max()) + 1 for r in sweep if r.num_tokens] + [1])
  num_buckets = min(num_buckets, length)  # every bucket holds at least one position
  starts = np.arange(num_buckets) * length / num_buckets
  rows, summary, curves = [], {}, []
  for name, recs in zip(names, sweep):
    bucket = position_buckets(getattr(recs, position), length, num_buckets)
    pooled = np.zeros((2, num_buckets))  # assignments, dropped
    for m in range(recs.num_layers):
      mask = common.assigned_mask(recs, m)  # [N, R]
      assigned = np.bincount(bucket, mask.sum(-1), minlength=num_buckets)
      dropped = np.bincount(bucket, (mask & (recs.status[m] == DROPPED)).sum(-1),
                            minlength=num_buckets)
      pooled += (assigned, dropped)
      with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(assigned > 0, dropped / assigned, np.nan)
      cf = np.nan if recs.capacity_factor is None else float(recs.capacity_factor)
      rows += [{"capacity": name, "capacity_factor": cf, "layer": recs.layer_ids[m],
                "bucket": b, "bucket_start": float(starts[b]),
                "bucket_end": float(starts[b] + length / num_buckets),
                "assignments": int(assigned[b]), "dropped": int(dropped[b]),
                "dropped_fraction": float(fraction[b])} for b in range(num_buckets)]
      if recs.num_layers > 1:
        summary[f"{name}/{common.layer_key(recs, m)}/dropped_fraction"] = common.ratio(
            dropped.sum(), assigned.sum())
      curves.append((name, recs.layer_ids[m], fraction))
    summary[f"{name}/dropped_fraction"] = common.ratio(pooled[1].sum(), pooled[0].sum())
    summary[f"{name}/first_bucket_dropped_fraction"] = common.ratio(pooled[1, 0], pooled[0, 0])
    summary[f"{name}/last_bucket_dropped_fraction"] = common.ratio(pooled[1, -1],
                                                                   pooled[0, -1])
  figure = (_drops_figure(names, curves, starts + length / num_buckets / 2, position)
            if plot else None)
  return common.Analysis(
      name="drops_by_position", title="Dropped assignments by position",
      description=(
          f"Fraction of router assignments dropped for lack of expert capacity, by {position} "
          f"bucket, one line per capacity factor (line style: MoE layer). A curve rising to "
          f"the right means late tokens lose their experts, as OpenMoE observed; raising the "
          f"capacity factor should flatten it."),
      table=pd.DataFrame(rows, columns=["capacity", "capacity_factor", "layer", "bucket",
                                        "bucket_start", "bucket_end", "assignments", "dropped",
                                        "dropped_fraction"]),
      summary=summary, figure=figure)


def _drops_figure(names, curves, midpoints, position):
  from moe_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  fig, (ax,) = plots.panel_grid(1, (6.5, 3.5))
  layers = sorted({layer for _, layer, _ in curves})
  for name, layer, fraction in curves:
    label = name if len(layers) == 1 else f"{name}, layer {layer}"
    ax.plot(midpoints, fraction, marker="o", markersize=3, label=label,
            color=plots.color(names.index(name), len(names)),
            linestyle=plots.LINE_STYLES[layers.index(layer) % len(plots.LINE_STYLES)])
  ax.set_ylim(bottom=0)
  ax.set_xlabel(f"{position} (bucket midpoint)")
  ax.set_ylabel("dropped fraction of assignments")
  ax.legend(fontsize="small")
  return fig
