"""The training loop end to end: resume after SIGKILL, restore on another mesh, NaN guard.

Runs `python -m moe_jax.train` as a subprocess on a very small model (the 8 simulated devices
come with the environment tests/conftest.py sets), on the local corpus.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("seqio")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from moe_jax import checkpoints as checkpoints_lib
from moe_jax import config as config_lib
from moe_jax import evaluate as evaluate_lib
from moe_jax import infer as infer_lib
from moe_jax import optimizers
from moe_jax import partitioning as part
from moe_jax import train_step as ts
from moe_jax import trainer
from moe_jax.analysis.records import RoutingRecords

N = 12  # steps before the kill point; the runs go to 2N
FILES = ["gin_configs/models/openmoe_base_16e_tiny.gin", "gin_configs/runs/tiny_cpu.gin"]
SMALL = ["NUM_LAYERS=4", "D_MODEL=32", "NUM_HEADS=2", "HEAD_DIM=16", "MLP_DIM=64",
         "EXPERT_DIM=64", "SEQUENCE_LENGTH=64", "BATCH_SIZE=8",
         "MIXTURE_OR_TASK_NAME='local_english_ul2_8k'", "EVAL_TASKS=[]",
         "train.log_every=1", "train.progress_bar=False",
         "optimizers.warmup_cosine_schedule.warmup_steps=2"]


def _flags(model_dir, steps, checkpoint_every, extra=()):
  bindings = SMALL + [f"MODEL_DIR='{model_dir}'", f"TRAIN_STEPS={steps}",
                      f"CHECKPOINT_EVERY={checkpoint_every}", *extra]
  return [f"--gin_file={f}" for f in FILES] + [f"--gin.{b}" for b in bindings]


def _start(flags):
  return subprocess.Popen([sys.executable, "-m", "moe_jax.train", *flags],
                          cwd=config_lib.REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _run(flags, timeout=600):
  proc = _start(flags)
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _losses(model_dir):
  # A running trainer may be mid-way through its last line: read whole lines only.
  rows = [json.loads(l) for l in open(os.path.join(model_dir, "metrics.jsonl"))
          if l.endswith("\n")]
  return {r["step"]: r["loss/total"] for r in rows if r["split"] == "train"}


def _final_params(model_dir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(model_dir, "checkpoints", str(step), "state"))
  return jax.tree.leaves(jax.device_get(restored["params"]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
  code, out = _run(_flags(model_dir, 2 * N, N))
  assert code == 0, out[-3000:]
  return model_dir


@pytest.mark.slow
@pytest.mark.xdist_group("trainer")  # shares the uninterrupted run (Makefile: --dist loadgroup)
def test_sigkill_after_a_checkpoint_then_resume_gives_the_same_run(uninterrupted, tmp_path):
  model_dir = str(tmp_path)
  proc = _start(_flags(model_dir, 2 * N, N))
  kill_after = random.Random(os.getpid()).randint(N + 1, N + 4)  # a step after the checkpoint
  metrics = os.path.join(model_dir, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    committed = os.path.isdir(os.path.join(model_dir, "checkpoints", str(N)))  # renamed: done
    if committed and os.path.exists(metrics) and max(_losses(model_dir)) >= kill_after:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  steps = checkpoints_lib.Checkpointer(os.path.join(model_dir, "checkpoints")).all_steps()
  assert steps == [N]
  code, out = _run(_flags(model_dir, 2 * N, N))
  assert code == 0, out[-3000:]
  assert "Resumed from step" in out
  reference, resumed = _losses(uninterrupted), _losses(model_dir)
  for step in range(N + 1, 2 * N + 1):  # same data and RNG after the resume: same losses
    assert resumed[step] == reference[step], step
  for a, b in zip(_final_params(uninterrupted, 2 * N), _final_params(model_dir, 2 * N)):
    np.testing.assert_array_equal(a, b)
  # What a run leaves behind besides checkpoints: TensorBoard events and the configs.
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(
      os.path.join(uninterrupted, "train")))
  operative = open(os.path.join(uninterrupted, "operative_config.gin")).read()
  for setting in ("moe_layer.MoeLayer.num_experts", "moe_layer.MoeLayer.router = @routing.",
                  "routing.TokenChoiceRouter.num_selected_experts",
                  "routing.TokenChoiceRouter.score_function"):  # every routing setting shows
    assert setting in operative, setting
  # metrics.jsonl keeps per-expert loads whole (TensorBoard gets their max/min and CV).
  train_rows = [json.loads(l) for l in open(os.path.join(uninterrupted, "metrics.jsonl"))
                if '"split": "train"' in l]
  loads = [v for k, v in train_rows[-1].items() if k.endswith("/expert_load_before")]
  assert loads and all(isinstance(v, list) and len(v) > 1 and min(v) >= 0 for v in loads)


@pytest.mark.slow
@pytest.mark.xdist_group("trainer")
def test_checkpoint_from_one_mesh_restores_on_another(uninterrupted):
  """Written on data:8 (8,1,1); restored on data:2,expert:2,model:2; the same loss."""
  trainer.parse_flags(_flags(uninterrupted, 2 * N, N))
  model = config_lib.configured_model()
  tx = optimizers.create_optimizer().tx
  rules = config_lib.configured_rules()
  tokens = jax.ShapeDtypeStruct((8, 64), jnp.int32)
  rng = np.random.default_rng(0)
  batch = {"decoder_target_tokens": rng.integers(3, 8000, (8, 64)).astype(np.int32),
           "decoder_input_tokens": rng.integers(3, 8000, (8, 64)).astype(np.int32),
           "decoder_loss_weights": np.ones((8, 64), np.float32)}
  losses = []
  for sizes in ({"data": 8}, {"data": 2, "expert": 2, "model": 2}):
    mesh = part.make_mesh(**sizes)
    target, _ = trainer.state_target(model.module, tx, mesh, rules, tokens)
    state, data = checkpoints_lib.Checkpointer(
        os.path.join(uninterrupted, "checkpoints")).restore(target)
    assert data["batches_consumed"] == 2 * N
    with part.activate(mesh, rules):
      metrics = jax.jit(lambda p, e, b: ts.eval_step(model, p, e, b))(
          state.params, state.extra, part.global_batch(batch, mesh, rules))
    losses.append(float(metrics["loss/total"]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nan_batch_stops_or_skips(mode, tmp_path):
  model_dir = str(tmp_path)
  code, out = _run(_flags(model_dir, 6, 2, [f"train.nan_at_step=3",
                                            f"train.on_nonfinite='{mode}'"]))
  steps = checkpoints_lib.Checkpointer(os.path.join(model_dir, "checkpoints")).all_steps()
  if mode == "stop":
    assert code != 0 and "Non-finite loss or gradient at step 3" in out, out[-3000:]
    assert steps == [2]  # the last good state
  else:
    assert code == 0, out[-3000:]
    assert steps[-1] == 6 and "Skipped" in out
    assert all(np.isfinite(v) for s, v in _losses(model_dir).items() if s != 4)


MODEL_SIZE = ["VOCAB_SIZE=8384", "NUM_LAYERS=4", "D_MODEL=32", "NUM_HEADS=2", "HEAD_DIM=16",
              "MLP_DIM=64", "EXPERT_DIM=64"]


@pytest.mark.slow
@pytest.mark.xdist_group("trainer")
def test_evaluate_infer_and_finetune_from_a_run(uninterrupted, tmp_path):
  checkpoint_dir = os.path.join(uninterrupted, "checkpoints")
  common = [f"--gin.{b}" for b in MODEL_SIZE] + [f"--gin.CHECKPOINT_DIR='{checkpoint_dir}'"]
  trainer.parse_flags([f"--gin_file={FILES[0]}", "--gin_file=gin_configs/runs/eval.gin",
                       *common, "--gin.EVAL_TASKS=['local_english_lm_8k']",
                       "--gin.SEQUENCE_LENGTH=64", "--gin.BATCH_SIZE=8",
                       "--gin.evaluate.max_batches=2"])
  results = evaluate_lib.evaluate()
  assert np.isfinite(results["local_english_lm_8k"]["loss/cross_entropy"])
  assert os.path.exists(os.path.join(uninterrupted, f"eval_step{2 * N}.json"))

  trainer.parse_flags([f"--gin_file={FILES[0]}", "--gin_file=gin_configs/runs/infer.gin",
                       *common, "--gin.PROMPTS=['def main(']", "--gin.VOCABULARY='spm8k'",
                       "--gin.MAX_NEW_TOKENS=4", "--gin.infer.sequence_length=64"])
  (result,) = infer_lib.infer()
  assert result["prompt"] == "def main(" and isinstance(result["prediction"], str)

  # Fine-tuning: params from the AdamW run, a fresh Adafactor (finetune.gin's optimizer).
  trainer.parse_flags([f"--gin_file={FILES[0]}", "--gin_file=gin_configs/runs/finetune.gin",
                       *[f"--gin.{b}" for b in SMALL + MODEL_SIZE],
                       f"--gin.INIT_CHECKPOINT='{checkpoint_dir}'",
                       f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=2",
                       "--gin.MIXTURE_OR_TASK_NAME='local_code_s_8k'", "--gin.EVAL_TASKS=[]"])
  last = trainer.train()  # pylint: disable=missing-kwoa
  assert np.isfinite(last["loss/total"])


@pytest.mark.slow
@pytest.mark.xdist_group("trainer")
def test_routing_report_of_a_run(uninterrupted, tmp_path):
  from moe_jax import analyze as analyze_lib  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "report")
  path = analyze_lib.analyze([f"--checkpoint={uninterrupted}", "--task=english=local_english_lm_8k",
                              "--task=code=local_code_lm_8k", "--max_tokens=1500",
                              "--sequence_length=64", "--batch_size=8",
                              "--capacity_factors=0.5,2.0", f"--out={out}"])
  text = open(path).read()
  assert f"step {2 * N}" in text and f"compared with steps | {N}" in text
  for name in ("expert_load", "dead_experts", "router_confidence", "token_specialization",
               "drops_by_position", "routing_agreement"):
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 1000, name
    assert f"({name}.png)" in text
  records = RoutingRecords.load(os.path.join(out, f"records_step{2 * N}.npz"))
  assert records.label_names == ("english", "code") and records.step == 2 * N
  assert 1500 < records.num_tokens <= 3000


def test_gin_typos_fail_before_compiling_with_the_closest_names():
  with pytest.raises(SystemExit, match="Closest: gin_configs/models/mixtral_8x7b_tiny.gin"):
    trainer.parse_flags(["--gin_file=gin_configs/models/mixtrel_8x7b_tiny.gin"])
  with pytest.raises(SystemExit, match=r"trian_steps.*Closest|Closest.*train_steps"):
    trainer.parse_flags([f"--gin_file={f}" for f in FILES] + ["--gin.train.trian_steps=3"])


def _snapshot(directory) -> dict:
  """{relative path: bytes} of every file under `directory`."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


@pytest.mark.slow
@pytest.mark.xdist_group("trainer")
def test_a_restart_with_another_model_shape_changes_no_byte(uninterrupted, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "run")
  shutil.copytree(uninterrupted, run)
  before = _snapshot(run)
  trainer.parse_flags(_flags(run, 2 * N + 4, N, ["NUM_EXPERTS=16"]))
  with pytest.raises(ValueError) as error:
    trainer.train()  # pylint: disable=missing-kwoa
  message = str(error.value)
  assert (f"{run} holds a run whose checkpoint (step {2 * N}) does not fit this model: "
          "params/layers/block_3/moe/experts/wi is [1, 8, 32, 64] in the checkpoint but "
          "[1, 16, 32, 64] in the model.") in message, message
  assert "Nothing in the run directory was changed." in message
  assert _snapshot(run) == before


@pytest.mark.slow
@pytest.mark.xdist_group("trainer")
def test_a_damaged_newest_checkpoint_falls_back_and_stale_saves_go(uninterrupted, tmp_path):
  """Step 2N truncated, a never-committed save lying around: the restart warns naming step
  2N, restores step N, sets 2N aside, removes the stale save, and trains to the same weights
  as the uninterrupted run (the same data and RNG after step N)."""
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "run")
  shutil.copytree(uninterrupted, run)
  checkpoints = os.path.join(run, "checkpoints")
  data_files = glob.glob(os.path.join(checkpoints, str(2 * N), "state", "ocdbt.process_0",
                                      "d", "*"))
  assert data_files
  for path in data_files:
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
  stale = os.path.join(checkpoints, f"{2 * N + 5}.orbax-checkpoint-tmp-1700000000")
  os.makedirs(os.path.join(stale, "state"))
  config_before = open(os.path.join(run, "config.gin")).read()

  code, out = _run(_flags(run, 2 * N, N))
  assert code == 0, out[-3000:]
  assert f"checkpoint step {2 * N} in {checkpoints} failed to restore" in out, out[-3000:]
  assert f"Resumed from step {N}" in out
  assert not os.path.exists(stale)
  assert os.path.isdir(os.path.join(checkpoints, f"{2 * N}.unreadable"))
  assert checkpoints_lib.committed_steps(checkpoints) == [N, 2 * N]
  for a, b in zip(_final_params(uninterrupted, 2 * N), _final_params(run, 2 * N)):
    np.testing.assert_array_equal(a, b)
  # The first start's config stays; this start's own are kept beside it, by step.
  assert open(os.path.join(run, "config.gin")).read() == config_before
  assert os.path.exists(os.path.join(run, f"config.step{N}.gin"))
  assert "train.train_steps" in open(os.path.join(run, f"operative_config.step{N}.gin")).read()


@pytest.mark.xdist_group("trainer")
def test_evaluate_with_another_model_names_the_parameter_and_the_run_config(uninterrupted):
  """The README-style mistake: the preset alone (512 rows) on the run's checkpoint (8384)."""
  checkpoint_dir = os.path.join(uninterrupted, "checkpoints")
  trainer.parse_flags([f"--gin_file={FILES[0]}", "--gin_file=gin_configs/runs/eval.gin",
                       f"--gin.CHECKPOINT_DIR='{checkpoint_dir}'"])
  with pytest.raises(ValueError) as error:
    evaluate_lib.evaluate()  # pylint: disable=missing-kwoa
  message = str(error.value)
  assert (f"the checkpoint {checkpoint_dir} (step {2 * N}) does not fit this model: "
          "params/final_norm/scale is [32] in the checkpoint but [64] in the model.") in message
  assert os.path.join(uninterrupted, "config.gin") in message
  # The same from a relative CHECKPOINT_DIR (what `make train` passes to infer and analyze).
  relative = os.path.relpath(checkpoint_dir)
  trainer.parse_flags([f"--gin_file={FILES[0]}", "--gin_file=gin_configs/runs/eval.gin",
                       f"--gin.CHECKPOINT_DIR='{relative}'"])
  with pytest.raises(ValueError) as error:
    evaluate_lib.evaluate()  # pylint: disable=missing-kwoa
  assert ("params/final_norm/scale is [32] in the checkpoint but [64] in the model."
          in str(error.value)), str(error.value)
