"""A routing report: each analysis's table (CSV), plot (PNG) and headline numbers in one
Markdown file (report.md) that renders on GitHub, in Colab and in any Markdown viewer."""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

TABLE_ROWS = 12  # rows of each table shown in the report; the CSV has them all


def _cell(value) -> str:
  if isinstance(value, float):
    if math.isnan(value) or math.isinf(value):
      return str(value)
    return f"{value + 0.0:.4g}"  # + 0.0: no "-0"
  return str(value).replace("|", "\\|").replace("\n", "\\n").replace("\t", "\\t")


def markdown_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_report(analyses: Sequence, out_dir: str, title: str,
                 settings: Mapping[str, object]) -> str:
  """Writes `<name>.csv`, `<name>.png` per analysis and `report.md`; returns report.md's path."""
  os.makedirs(out_dir, exist_ok=True)
  parts = [f"# {title}", "", markdown_table(list(settings.items()), ["setting", "value"]), ""]
  parts += ["Contents: " + ", ".join(f"[{a.title}](#{a.name})" for a in analyses), ""]
  for analysis in analyses:
    analysis.table.to_csv(os.path.join(out_dir, f"{analysis.name}.csv"), index=False)
    parts += [f'<a id="{analysis.name}"></a>', f"## {analysis.title}", "",
              analysis.description, ""]
    if analysis.figure is not None:
      analysis.figure.savefig(os.path.join(out_dir, f"{analysis.name}.png"), dpi=110,
                              bbox_inches="tight")
      parts += [f"![{analysis.title}]({analysis.name}.png)", ""]
    if analysis.summary:
      parts += [markdown_table(list(analysis.summary.items()), ["summary", "value"]), ""]
    table = analysis.table
    if len(table):
      shown = table.head(TABLE_ROWS)
      parts += [markdown_table(shown.itertuples(index=False), list(table.columns)), ""]
      more = f" ({len(table) - TABLE_ROWS} more rows)" if len(table) > TABLE_ROWS else ""
      parts += [f"Full table: [{analysis.name}.csv]({analysis.name}.csv){more}.", ""]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path
