"""MoE vs dense at equal active FLOPs per token (issue 9): train gin configs one after another,
then compare held-out eval loss per step and per second of training.

    .venv/bin/python benchmarks/moe_vs_dense.py                  # dense + 5 MoE variants
    .venv/bin/python benchmarks/moe_vs_dense.py --ablation       # top2_e8_half, aux weight 0..1e-1
    .venv/bin/python benchmarks/moe_vs_dense.py --report_only    # tables and plots only
    .venv/bin/python benchmarks/moe_vs_dense.py --runs=dense,switch_e8 --steps=20 \\
        --run_dir=/tmp/smoke --out=/tmp/smoke/moe_vs_dense       # a smoke test
    .venv/bin/python benchmarks/moe_vs_dense.py --objective=ul2  # train on UL2, eval LM loss
    .venv/bin/python benchmarks/moe_vs_dense.py --gin.D_MODEL=512 ...   # any binding, every run

Each run is `gin_configs/experiments/moe_vs_dense/<name>.gin`, trained by
`python -m moe_jax.train` into `<run_dir>/<name>` with the `--gin.X=...` flags given here. Before
anything trains, every model is built from gin (shapes only) and its active forward FLOPs per
token (`moe_jax.params`) must be within --flop_tolerance of the dense baseline's.

Resumable: a run whose metrics.jsonl has the eval of its final step is not run again; any other
run is started, and the trainer resumes it from its last checkpoint. `<run_dir>/<name>/
moe_vs_dense.json` keeps the flags a run was trained with; other flags for the same directory
stop the script (use another --run_dir).

Measured from each metrics.jsonl: eval loss = mean over the eval tasks of their held-out
cross-entropy; steps for each variant to reach the baseline's final eval loss (linear between
eval points); training time = logged step times (compilation, eval and checkpoints left out);
tokens/s (median); over the last quarter of training the capacity drop fraction, the unrouted
token fraction (expert choice) and the per-expert load before capacity (coefficient of
variation and max / mean, over MoE layers).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = "gin_configs/experiments/moe_vs_dense"
BASELINE = "dense"
MAIN_RUNS = ("dense", "switch_e8", "switch_e32", "top2_e8_half", "expert_choice_e8",
             "residual_e8")
ABLATION_RUNS = ("top2_e8_half_aux_0", "top2_e8_half_aux_1e-3", "top2_e8_half",
                 "top2_e8_half_aux_1e-1")
OBJECTIVES = {"lm": "local_lm_8k", "ul2": "local_ul2_8k"}
RECORD = "moe_vs_dense.json"


# ---------------------------------------------------------------------------------------
# metrics.jsonl -> curves and summaries (pure: no jax, no gin).
# ---------------------------------------------------------------------------------------

def load_rows(path: str) -> List[dict]:
  """The rows of a metrics.jsonl, by step. A line cut short by a kill is skipped; a (split,
  step) logged again after a resume replaces the earlier row."""
  if not os.path.exists(path):
    return []
  rows = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      rows[(row["split"], row["step"])] = row
  return sorted(rows.values(), key=lambda r: r["step"])


def eval_curve(rows: Sequence[dict], tasks: Sequence[str]) -> List[Tuple[int, float]]:
  """[(step, mean eval cross-entropy over `tasks`)] at the steps where every task was evaluated."""
  by_step = collections.defaultdict(dict)
  for r in rows:
    if r["split"].startswith("eval/"):
      by_step[r["step"]][r["split"][len("eval/"):]] = r["loss/cross_entropy"]
  return [(step, float(np.mean([losses[t] for t in tasks])))
          for step, losses in sorted(by_step.items()) if tasks and all(t in losses for t in tasks)]


def is_finished(rows: Sequence[dict], steps: int, tasks: Sequence[str]) -> bool:
  """True when the eval of the final step is in the rows, for every eval task."""
  return any(step == steps for step, _ in eval_curve(rows, tasks))


def train_seconds(rows: Sequence[dict]) -> Dict[int, float]:
  """{step: seconds of training up to it}: each logged interval's mean step time × its steps.
  Intervals above 3× the median step time (compilation: the first, and the first after a
  resume) are charged the median. Eval, checkpoints and start-up are not counted."""
  train = [r for r in rows if r["split"] == "train"]
  if not train:
    return {0: 0.0}
  median = float(np.median([r["step_time_s"] for r in train[1:]] or [train[0]["step_time_s"]]))
  out, total, previous = {0: 0.0}, 0.0, 0
  for r in train:
    step_time = r["step_time_s"] if r["step_time_s"] <= 3 * median else median
    total += step_time * (r["step"] - previous)
    out[r["step"]], previous = total, r["step"]
  return out


def steps_to_reach(curve: Sequence[Tuple[int, float]], target: float) -> Optional[float]:
  """First step at which the eval loss is <= target, linear between eval points; None if it
  never is. Reached at the first eval point already: that step (an upper bound)."""
  previous = None
  for step, loss in curve:
    if loss <= target:
      if previous is None or previous[1] <= loss:
        return float(step)
      s0, l0 = previous
      return s0 + (l0 - target) / (l0 - loss) * (step - s0)
    previous = (step, loss)
  return None


def summarize(rows: Sequence[dict], tasks: Sequence[str], steps: int) -> dict:
  """What the tables show for one run (routing figures are None for a dense run)."""
  train = [r for r in rows if r["split"] == "train"]
  late = [r for r in train if r["step"] > 0.75 * steps] or train[-1:]
  curve = eval_curve(rows, tasks)
  final = {r["split"][len("eval/"):]: r["loss/cross_entropy"] for r in rows
           if r["split"].startswith("eval/") and curve and r["step"] == curve[-1][0]}
  loads = [key for key in (late[0] if late else {})
           if re.fullmatch(r"moe/layer_\d+/expert_load_before", key)]
  mean = lambda xs: float(np.mean(xs)) if xs else None
  late_mean = lambda key: mean([r[key] for r in late if key in r])
  return {
      "curve": curve, "final_step": curve[-1][0] if curve else None,
      "final_loss": curve[-1][1] if curve else None, "final_by_task": final,
      "seconds": train_seconds(rows),
      # The first interval holds the compilation.
      "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train[1:] or train]))
                      if train else None,
      "dropped": late_mean("moe/dropped_fraction"),
      "unrouted": late_mean("moe/unrouted_token_fraction"),
      "aux_loss": late_mean("loss/aux_loss"),
      "load_cv": mean([r[f"{k}/cv"] for r in late for k in loads]),
      "load_max_mean": mean([max(r[k]) / max(np.mean(r[k]), 1e-9) for r in late for k in loads]),
      "routing_curve": [(r["step"], mean([r[f"{k}/cv"] for k in loads]),
                         mean([max(r[k]) / max(np.mean(r[k]), 1e-9) for k in loads]))
                        for r in train],
  }


# ---------------------------------------------------------------------------------------
# The runs: gin settings, the FLOP check, training.
# ---------------------------------------------------------------------------------------

def config_file(name: str) -> str:
  return f"{CONFIG_DIR}/{name}.gin"


def run_settings(name: str, bindings: Sequence[str]) -> dict:
  """Builds the model from gin (shapes only): steps, eval tasks, sizes, FLOPs, MoE settings."""
  import gin  # pylint: disable=g-import-not-at-top  (jax and gin only where models are built)
  from moe_jax import config, params  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, config_file(name))
  if not os.path.exists(path):
    raise SystemExit(f"no config {config_file(name)}")
  lm = config.load_model([path], ["MODEL_DIR = 'unused'", *bindings])
  module, steps = lm.module, int(gin.query_parameter("%TRAIN_STEPS"))
  report = params.count(module, int(gin.query_parameter("%SEQUENCE_LENGTH")))
  info = {"steps": steps, "eval_tasks": list(gin.query_parameter("%EVAL_TASKS")),
          "total": report.total, "active": report.active, "flops": report.flops_per_token,
          "moe_layers": list(module.moe_ids), "aux_weight": lm.aux_loss_weight}
  layer = module.sparse_sublayers().get("moe")
  if layer is not None:
    info.update(router=type(layer.router).__name__.replace("Router", ""),
                experts=layer.num_experts, k=layer.experts_per_token(report.seq_len),
                expert_dim=layer.expert_hidden_dim, dispatch=layer.dispatch,
                cf=(layer.train_capacity_factor, layer.eval_capacity_factor),
                dense_dim=((module.moe_dense_dim or module.mlp_dim)
                           if module.moe_dense_ffn == "parallel" else 0))
  return info


def check_flops(settings: Dict[str, dict], tolerance: float) -> None:
  """Stops when a variant's active FLOPs per token differ from the baseline's by > tolerance."""
  if BASELINE not in settings:
    return
  base = settings[BASELINE]["flops"]
  bad = {n: s["flops"] / base for n, s in settings.items()
         if abs(s["flops"] / base - 1) > tolerance}
  if bad:
    raise SystemExit(f"active FLOPs/token differ from {BASELINE}'s by more than {tolerance:.0%}: "
                     + ", ".join(f"{n} {r:.3f}×" for n, r in bad.items())
                     + " (scaling? override MLP_DIM, HALF_MLP_DIM and QUARTER_MLP_DIM together)")


def check_record(model_dir: str, record: dict, write: bool = True) -> None:
  """Stops if model_dir was trained with other flags; else writes them there (`write`)."""
  path = os.path.join(model_dir, RECORD)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != record:
      raise SystemExit(f"{model_dir} was trained with {previous}, not {record}: use another "
                       "--run_dir (or delete that run).")
    return
  if not write:
    return
  os.makedirs(model_dir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=1)


def record(name: str, bindings: Sequence[str]) -> dict:
  return {"gin_file": config_file(name), "bindings": list(bindings)}


def train(name: str, model_dir: str, bindings: Sequence[str]) -> None:
  check_record(model_dir, record(name, bindings))
  command = [sys.executable, "-m", "moe_jax.train", f"--gin_file={config_file(name)}",
             f"--gin.MODEL_DIR={os.path.abspath(model_dir)!r}",
             *(f"--gin.{b}" for b in bindings)]
  print(f"=== {name}: {' '.join(command[1:])}", flush=True)
  start = time.time()
  subprocess.run(command, cwd=REPO, check=True)
  print(f"=== {name}: {(time.time() - start) / 60:.1f} min (start-up, compilation and eval "
        "included)", flush=True)


def step_bindings(steps: int) -> List[str]:
  """--steps: the run length and what scales with it (8 evals, 4 checkpoints, warm-up a tenth)."""
  every = max(1, steps // 8)
  return [f"TRAIN_STEPS={steps}", f"EVAL_EVERY={every}",
          f"CHECKPOINT_EVERY={max(1, steps // 4)}",
          f"WARMUP_STEPS={max(1, steps // 10)}"]


# ---------------------------------------------------------------------------------------
# Tables and plots.
# ---------------------------------------------------------------------------------------

def _f(value, fmt: str, missing: str = "–") -> str:
  return missing if value is None else format(value, fmt)


def config_table(settings: Dict[str, dict]) -> List[str]:
  base = settings[BASELINE]["flops"] if BASELINE in settings else None
  lines = ["| run | MoE layers | router | E | k | expert F | dense F on MoE layers | "
           "capacity factor train / eval | aux weight | params | active FLOPs/token vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, s in settings.items():
    moe = ["–"] * 8
    if "router" in s:
      capacity = "dropless" if s["dispatch"] == "dropless" else "{} / {}".format(*s["cf"])
      moe = [str(s["moe_layers"]), s["router"], s["experts"], s["k"], s["expert_dim"],
             s["dense_dim"] or "–", capacity, s["aux_weight"]]
    ratio = f" ({s['flops'] / base:.4f}×)" if base else ""
    lines.append(f"| {name} | " + " | ".join(str(x) for x in moe)
                 + f" | {s['total'] / 1e6:.2f}M | {s['flops'] / 1e6:.3f}M{ratio} |")
  return lines


def results_table(results: Dict[str, dict], settings: Dict[str, dict]) -> List[str]:
  base = results.get(BASELINE)
  target = base["final_loss"] if base else None
  tasks = next(iter(settings.values()))["eval_tasks"]
  lines = [f"| run | final eval loss | {' | '.join(tasks)} | steps to {BASELINE}'s final | "
           f"fraction of {BASELINE} steps | train min | tokens/s | dropped | unrouted | "
           "load CV | load max/mean | aux loss |", "|---" * (11 + len(tasks)) + "|"]
  for name, r in results.items():
    reach = steps_to_reach(r["curve"], target) if target is not None else None
    reached = "–" if target is None else ("not reached" if reach is None else f"{reach:.0f}")
    fraction = "–" if reach is None else f"{reach / base['final_step']:.2f}"
    minutes = r["seconds"].get(r["final_step"], max(r["seconds"].values())) / 60
    lines.append(
        f"| {name} | {_f(r['final_loss'], '.4f')} | "
        + " | ".join(_f(r["final_by_task"].get(t), ".4f") for t in tasks)
        + f" | {reached} | {fraction} | {minutes:.1f} | {_f(r['tokens_per_s'], ',.0f')} | "
        f"{_f(r['dropped'], '.3f')} | {_f(r['unrouted'], '.3f')} | {_f(r['load_cv'], '.3f')} | "
        f"{_f(r['load_max_mean'], '.2f')} | {_f(r['aux_loss'], '.3f')} |")
  return lines


def plot(results: Dict[str, dict], path: str, title: str, routing: bool = False) -> None:
  """Eval loss vs steps and vs training time; with `routing` (the ablation) the expert load's
  CV and max / mean over training instead of the time panel."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3 if routing else 2, figsize=(16 if routing else 13, 4.8))
  for name, r in results.items():
    steps, losses = zip(*r["curve"])
    style = dict(marker="o", markersize=3, label=name,
                 color="black" if name == BASELINE else None,
                 linewidth=2.2 if name == BASELINE else 1.4)
    axes[0].plot(steps, losses, **style)
    if not routing:
      seconds = sorted(r["seconds"].items())
      axes[1].plot(np.interp(steps, *zip(*seconds)) / 60, losses, **style)
    elif r["load_cv"] is not None:
      train_steps, cv, max_mean = zip(*r["routing_curve"])
      axes[1].plot(train_steps, cv, label=name)
      axes[2].plot(train_steps, max_mean, label=name)
  loss_axes = axes[:1] if routing else axes
  low = min(min(l for _, l in r["curve"][len(r["curve"]) // 4:]) for r in results.values())
  high = max(r["curve"][min(1, len(r["curve"]) - 1)][1] for r in results.values())
  for ax in loss_axes:
    if BASELINE in results:
      ax.axhline(results[BASELINE]["final_loss"], color="black", linestyle=":", linewidth=1,
                 label=f"{BASELINE} final")
    ax.set_ylabel("held-out eval loss (mean over eval tasks)")
    if high > low:
      ax.set_ylim(low - 0.02 * (high - low), high + 0.02 * (high - low))
  axes[0].set_xlabel("training step")
  if routing:
    axes[1].set(xlabel="training step", ylabel="expert load CV before capacity (train)")
    axes[2].set(xlabel="training step", ylabel="busiest expert's load / mean (train)")
  else:
    axes[1].set_xlabel("training time, min (step times only)")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(results: Dict[str, dict], settings: Dict[str, dict], out: str,
                 title: str, command: str, routing: bool = False) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  lines = [f"# {title}", "", f"`{command}`", "", *results_table(results, settings), "",
           *config_table(settings), "", f"![eval loss]({os.path.basename(out)}.png)", ""]
  base = results.get(BASELINE)
  if base and base["final_loss"] is not None:
    for name, r in results.items():
      reach = steps_to_reach(r["curve"], base["final_loss"])
      if name != BASELINE and reach is not None:
        lines.append(f"- {name} reaches {BASELINE}'s final eval loss "
                     f"({base['final_loss']:.4f}) at step {reach:.0f}: "
                     f"{reach / base['final_step']:.0%} of {BASELINE}'s steps.")
  text = "\n".join(lines) + "\n"
  with open(out + ".md", "w") as f:
    f.write(text)
  plot(results, out + ".png", title, routing)
  return text


# ---------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default=None, help="comma-separated config names")
  parser.add_argument("--ablation", action="store_true",
                      help=f"the aux-loss-weight ablation: {','.join(ABLATION_RUNS)}")
  parser.add_argument("--run_dir", default=None,
                      help="default runs/moe_vs_dense (runs/moe_vs_dense_ul2 with UL2)")
  parser.add_argument("--out", default=None, help="report path without extension; default "
                      "benchmarks/results/moe_vs_dense[_ul2][_aux_ablation]")
  parser.add_argument("--steps", type=int, default=None,
                      help="override TRAIN_STEPS (8 evals, 4 checkpoints, warm-up /10)")
  parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="lm",
                      help="training mixture: causal LM or UL2 (eval is LM loss either way)")
  parser.add_argument("--report_only", action="store_true")
  parser.add_argument("--flop_tolerance", type=float, default=0.05)
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not (a.startswith("--gin.") and "=" in a)]
  if bad:
    parser.error(f"unrecognized arguments {bad} (gin bindings: --gin.NAME=VALUE)")
  bindings = [] if args.objective == "lm" else [
      f"MIXTURE_OR_TASK_NAME='{OBJECTIVES[args.objective]}'"]
  bindings += step_bindings(args.steps) if args.steps else []
  bindings += [a[len("--gin."):] for a in rest]
  suffix = "" if args.objective == "lm" else f"_{args.objective}"
  args.run_dir = args.run_dir or os.path.join(REPO, "runs", "moe_vs_dense" + suffix)
  args.out = args.out or os.path.join(REPO, "benchmarks", "results", "moe_vs_dense" + suffix
                                      + ("_aux_ablation" if args.ablation else ""))
  args.runs = args.runs.split(",") if args.runs else list(
      ABLATION_RUNS if args.ablation else MAIN_RUNS)
  return args, bindings


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, bindings = parse_args(argv)
  names = list(args.runs)
  # The baseline is the reference of every table; include it when it has been trained.
  if BASELINE not in names and os.path.exists(os.path.join(args.run_dir, BASELINE)):
    names.insert(0, BASELINE)
  settings = {name: run_settings(name, bindings) for name in names}
  check_flops(settings, args.flop_tolerance)
  for name in names:  # a table never mixes runs trained with other flags
    check_record(os.path.join(args.run_dir, name), record(name, bindings), write=False)
  for name in [] if args.report_only else args.runs:
    s, model_dir = settings[name], os.path.join(args.run_dir, name)
    if is_finished(load_rows(os.path.join(model_dir, "metrics.jsonl")), s["steps"],
                   s["eval_tasks"]):
      print(f"=== {name}: finished ({model_dir}), not run again", flush=True)
      continue
    train(name, model_dir, bindings)
  results = {name: summarize(load_rows(os.path.join(args.run_dir, name, "metrics.jsonl")),
                             settings[name]["eval_tasks"], settings[name]["steps"])
             for name in names}
  results = {n: r for n, r in results.items() if r["curve"]}
  if not results:
    raise SystemExit(f"no eval results under {args.run_dir}")
  s = next(iter(settings.values()))
  title = (("Aux loss weight ablation" if args.ablation else
            "MoE vs dense at equal active FLOPs") + f": {s['steps']} steps, held-out "
           f"{' + '.join(s['eval_tasks'])}"
           + (f" ({args.objective} training)" if args.objective != "lm" else ""))
  command = "python benchmarks/moe_vs_dense.py " + " ".join(argv)
  print(write_report(results, settings, args.out, title, command.strip(), args.ablation))
  print(f"wrote {args.out}.md and {args.out}.png")


if __name__ == "__main__":
  main()
