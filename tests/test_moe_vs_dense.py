"""benchmarks/moe_vs_dense.py without training: metrics parsing, steps-to-reach, resumability on
fake metrics files, and the experiment configs' equal active FLOPs per token (moe_jax.params)."""
import importlib.util
import json
import os

import pytest

from moe_jax import config

_PATH = os.path.join(config.REPO_ROOT, "benchmarks", "moe_vs_dense.py")
_spec = importlib.util.spec_from_file_location("moe_vs_dense", _PATH)
mvd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mvd)

TASKS = ["code", "english"]


def fake_rows(steps=40, every=10, eval_every=20, start=8.0, slope=0.05, step_time=0.5,
              compile_time=20.0, moe=True):
  """Rows as the trainer writes them: train rows every `every` steps, eval rows per task."""
  rows = []
  for step in range(every, steps + 1, every):
    row = {"step": step, "split": "train", "loss/cross_entropy": start - slope * step,
           "step_time_s": compile_time if step == every else step_time,
           "tokens_per_s": 4096 / (compile_time if step == every else step_time)}
    if moe:
      row.update({"moe/dropped_fraction": 0.1, "loss/aux_loss": 1.2,
                  "moe/unrouted_token_fraction": 0.05,
                  "moe/layer_1/expert_load_before": [1.0, 3.0],
                  "moe/layer_1/expert_load_before/cv": 0.5,
                  "moe/layer_3/expert_load_before": [2.0, 2.0],
                  "moe/layer_3/expert_load_before/cv": 0.0})
    rows.append(row)
    if step % eval_every == 0:
      for i, task in enumerate(TASKS):
        rows.append({"step": step, "split": f"eval/{task}",
                     "loss/cross_entropy": start - slope * step + i})
  return rows


def write(path, rows, tail=""):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
    f.write(tail)


def test_load_rows_skips_a_cut_line_and_keeps_the_last_of_a_repeated_step(tmp_path):
  rows = fake_rows(steps=20, eval_every=20)
  repeated = dict(rows[0], **{"loss/cross_entropy": 1.0})  # logged again after a resume
  path = str(tmp_path / "metrics.jsonl")
  write(path, rows + [repeated], tail='{"step": 30, "split": "tr')
  loaded = mvd.load_rows(path)
  assert len(loaded) == len(rows)
  assert [r["loss/cross_entropy"] for r in loaded if r["split"] == "train"][0] == 1.0
  assert mvd.load_rows(str(tmp_path / "missing.jsonl")) == []


def test_eval_curve_means_tasks_and_skips_partial_steps():
  rows = fake_rows(steps=40, eval_every=20)
  rows = [r for r in rows if not (r["step"] == 40 and r["split"] == "eval/english")]
  assert mvd.eval_curve(rows, TASKS) == [(20, pytest.approx(8 - 1 + 0.5))]
  assert not mvd.is_finished(rows, 40, TASKS)  # killed between the final evals
  assert mvd.is_finished(fake_rows(steps=40), 40, TASKS)
  assert not mvd.is_finished(fake_rows(steps=40), 60, TASKS)


def test_steps_to_reach_interpolates_between_eval_points():
  curve = [(10, 5.0), (20, 4.0), (30, 3.0)]
  assert mvd.steps_to_reach(curve, 3.5) == pytest.approx(25.0)
  assert mvd.steps_to_reach(curve, 4.0) == pytest.approx(20.0)
  assert mvd.steps_to_reach(curve, 2.9) is None
  assert mvd.steps_to_reach(curve, 6.0) == 10.0        # already there at the first eval
  assert mvd.steps_to_reach([(10, 5.0), (20, 5.5), (30, 4.5)], 5.0) == 10.0


def test_train_seconds_leaves_out_compilation():
  seconds = mvd.train_seconds(fake_rows(steps=40, compile_time=30.0, step_time=0.5))
  assert seconds == {0: 0.0, 10: 5.0, 20: 10.0, 30: 15.0, 40: 20.0}


def test_summarize_routing_figures():
  s = mvd.summarize(fake_rows(steps=40), TASKS, 40)
  assert s["final_step"] == 40 and s["final_loss"] == pytest.approx(6.5)
  assert s["final_by_task"] == {"code": pytest.approx(6.0), "english": pytest.approx(7.0)}
  assert s["tokens_per_s"] == pytest.approx(8192)      # compilation interval left out
  assert s["dropped"] == pytest.approx(0.1) and s["unrouted"] == pytest.approx(0.05)
  assert s["load_cv"] == pytest.approx(0.25)           # mean over the two MoE layers
  assert s["load_max_mean"] == pytest.approx((1.5 + 1.0) / 2)
  dense = mvd.summarize(fake_rows(steps=40, moe=False), TASKS, 40)
  assert dense["dropped"] is None and dense["load_cv"] is None


def test_step_override_and_passthrough_flags():
  args, bindings = mvd.parse_args(["--steps=80", "--objective=ul2", "--gin.D_MODEL=256",
                                   "--runs=dense,switch_e8"])
  assert bindings == ["MIXTURE_OR_TASK_NAME='local_ul2_8k'", "TRAIN_STEPS=80", "EVAL_EVERY=10",
                      "CHECKPOINT_EVERY=20", "WARMUP_STEPS=8", "D_MODEL=256"]
  assert args.runs == ["dense", "switch_e8"] and args.run_dir.endswith("moe_vs_dense_ul2")
  args, _ = mvd.parse_args(["--ablation"])
  assert args.runs == list(mvd.ABLATION_RUNS) and args.out.endswith("moe_vs_dense_aux_ablation")
  with pytest.raises(SystemExit):
    mvd.parse_args(["--gin_file=x.gin"])


def test_a_run_dir_trained_with_other_flags_is_refused(tmp_path):
  record = {"gin_file": "a.gin", "bindings": ["TRAIN_STEPS=20"]}
  mvd.check_record(str(tmp_path), record)
  mvd.check_record(str(tmp_path), record)            # same flags: resumes
  with pytest.raises(SystemExit, match="another --run_dir"):
    mvd.check_record(str(tmp_path), dict(record, bindings=["TRAIN_STEPS=40"]))


def test_finished_runs_are_not_rerun_and_the_report_is_written(tmp_path, monkeypatch):
  run_dir, out = tmp_path / "runs", str(tmp_path / "results" / "report")
  settings = {"steps": 40, "eval_tasks": TASKS, "total": 1, "active": 1, "flops": 1.0,
              "moe_layers": [], "aux_weight": 0.01}
  monkeypatch.setattr(mvd, "run_settings", lambda name, bindings: dict(settings))
  write(str(run_dir / "dense" / "metrics.jsonl"), fake_rows(steps=40, moe=False))
  # Interrupted: evaluated at 20 only; trained again (the trainer resumes it).
  write(str(run_dir / "switch_e8" / "metrics.jsonl"), fake_rows(steps=20, slope=0.1))
  trained = []

  def fake_train(name, model_dir, bindings):
    trained.append(name)
    write(os.path.join(model_dir, "metrics.jsonl"), fake_rows(steps=40, slope=0.1))

  monkeypatch.setattr(mvd, "train", fake_train)
  argv = [f"--run_dir={run_dir}", f"--out={out}", "--runs=dense,switch_e8"]
  mvd.main(argv)
  assert trained == ["switch_e8"]
  text = open(out + ".md").read()
  # dense ends at 8 - 0.05 * 40 + 0.5 = 6.5; switch_e8 (slope 0.1) gets there at step 20.
  assert "| switch_e8 | 4.5000 |" in text and "| 20 | 0.50 |" in text
  assert os.path.getsize(out + ".png") > 0
  trained.clear()
  mvd.main(argv)                                     # everything finished: nothing trains
  mvd.main(argv + ["--report_only", "--runs=switch_e8,top2_e8_half"])
  assert trained == []
  mvd.check_record(str(run_dir / "switch_e8"), mvd.record("switch_e8", []))
  with pytest.raises(SystemExit, match="another --run_dir"):  # a table never mixes flags
    mvd.main(argv + ["--report_only", "--steps=40"])


def test_experiment_configs_have_the_dense_baselines_active_flops():
  """Every variant's forward FLOPs per token (moe_jax.params) within 1% of dense's."""
  names = dict.fromkeys(mvd.MAIN_RUNS + mvd.ABLATION_RUNS)
  settings = {name: mvd.run_settings(name, []) for name in names}
  mvd.check_flops(settings, tolerance=0.01)
  dense = settings["dense"]
  assert dense["moe_layers"] == [] and dense["flops"] == pytest.approx(4.508e6, rel=0.01)
  expected = {  # router, E, k, expert width, parallel dense width, dispatch
      "switch_e8": ("TokenChoice", 8, 1, 512, 0, "dropless"),
      "switch_e32": ("TokenChoice", 32, 1, 512, 0, "dropless"),
      "top2_e8_half": ("TokenChoice", 8, 2, 256, 0, "dropless"),
      "expert_choice_e8": ("ExpertChoice", 8, 1, 512, 0, "gather"),
      "residual_e8": ("TokenChoice", 8, 2, 128, 256, "dropless")}
  for name, want in expected.items():
    s = settings[name]
    assert tuple(s[k] for k in ("router", "experts", "k", "expert_dim", "dense_dim",
                                "dispatch")) == want, name
    assert s["moe_layers"] == [0, 1, 2, 3] and s["active"] == pytest.approx(dense["active"], rel=0.01)
    assert s["total"] > dense["total"]
  assert [settings[n]["aux_weight"] for n in mvd.ABLATION_RUNS] == [0.0, 1e-3, 1e-2, 1e-1]
  assert len({s["steps"] for s in settings.values()}) == 1


def test_scaling_only_mlp_dim_is_caught():
  settings = {name: mvd.run_settings(name, ["MLP_DIM=1024"])
              for name in ("dense", "top2_e8_half")}
  with pytest.raises(SystemExit, match="HALF_MLP_DIM"):
    mvd.check_flops(settings, tolerance=0.05)
