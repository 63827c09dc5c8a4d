"""Figure helpers for the analyses: matplotlib's object API only (no pyplot global state), so
figures build headless and render with `fig.savefig(path)`. matplotlib is imported here, and
this module is imported by the analyses only when a figure is asked for.
"""
from __future__ import annotations

import math
from typing import List, Tuple

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Beyond this many experts, one tick label per expert would overlap.
MAX_LABELLED_EXPERTS = 32
LINE_STYLES = ("-", "--", ":", "-.")


def panel_grid(num_panels: int, panel_size: Tuple[float, float] = (5.0, 3.0),
               max_cols: int = 2, sharex: bool = False) -> Tuple[Figure, List]:
  """A figure with `num_panels` axes on a grid of at most `max_cols` columns."""
  num_panels = max(num_panels, 1)
  ncols = min(num_panels, max_cols)
  nrows = math.ceil(num_panels / ncols)
  fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex).reshape(-1)
  for ax in axes[num_panels:]:
    ax.set_visible(False)
  return fig, list(axes[:num_panels])


def expert_panel_width(num_experts: int) -> float:
  """Panel width (inches) for bars over experts: grows with E, bounded."""
  return min(4.0 + 0.25 * num_experts, 16.0)


def expert_ticks(ax, num_experts: int) -> None:
  """One tick per expert while that stays readable, else integer ticks chosen by matplotlib."""
  ax.set_xlim(-0.6, num_experts - 0.4)
  if num_experts <= MAX_LABELLED_EXPERTS:
    ax.set_xticks(range(num_experts))
    if num_experts > 16:
      ax.tick_params(axis="x", labelsize=7)
  else:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("expert")


def color(i: int, n: int):
  """The i-th of n distinguishable colours (tab10, or tab20 for more series)."""
  if n <= 10:
    return f"C{i % 10}"
  return colormaps["tab20"](i % 20)
