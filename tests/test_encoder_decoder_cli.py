"""The encoder-decoder through the real commands on the local corpus's span corruption: a dense
run, a Switch run upcycled from it (loss falls), then evaluate, infer and the routing report of
both stacks on its checkpoint."""
import json
import os

import numpy as np
import pytest

from moe_jax import analyze as analyze_lib
from moe_jax import evaluate as evaluate_lib
from moe_jax import infer as infer_lib
from moe_jax import trainer

MODEL = "gin_configs/models/switch_base_8_tiny.gin"
SMALL = ["NUM_LAYERS=2", "D_MODEL=32", "NUM_HEADS=2", "HEAD_DIM=16", "MLP_DIM=64",
         "EXPERT_DIM=64", "SEQUENCE_LENGTH=64", "BATCH_SIZE=8",
         "MIXTURE_OR_TASK_NAME='local_span_corruption_8k'", "EVAL_TASKS=[]",
         "train.log_every=1", "train.progress_bar=False",
         "optimizers.warmup_cosine_schedule.warmup_steps=2"]
DENSE = ["encoder_decoder.EncoderDecoder.encoder_moe_layer=None",
         "encoder_decoder.EncoderDecoder.decoder_moe_layer=None"]


def _train(model_dir, steps, files=(), extra=()):
  trainer.parse_flags([f"--gin_file={f}" for f in (MODEL, *files,
                                                    "gin_configs/runs/tiny_cpu.gin")]
                      + [f"--gin.{b}" for b in SMALL + [f"MODEL_DIR='{model_dir}'",
                                                        f"TRAIN_STEPS={steps}",
                                                        f"CHECKPOINT_EVERY={steps}", *extra]])
  trainer.train()  # pylint: disable=missing-kwoa
  rows = [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"))]
  return [r["loss/cross_entropy"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_switch_encoder_decoder_upcycled_trained_evaluated_inferred_and_reported(tmp_path):
  dense_dir, moe_dir = str(tmp_path / "dense"), str(tmp_path / "switch")
  dense = _train(dense_dir, 8, extra=DENSE)
  assert np.mean(dense[-3:]) < np.mean(dense[:3])
  losses = _train(moe_dir, 10, files=["gin_configs/runs/sparse_upcycle.gin"], extra=[
      f"INITIAL_CHECKPOINT_PATH='{dense_dir}/checkpoints'",
      "routing.TokenChoiceRouter.normalize_combine_weights=True"])
  # Upcycled: it starts near where the dense run ended (not at a fresh model's log V = 9.0)
  # and goes on falling.
  assert losses[0] < dense[0] - 0.5 and np.mean(losses[-3:]) < np.mean(losses[:3])

  common = [f"--gin_file={moe_dir}/config.gin"]
  checkpoint = f"--gin.CHECKPOINT_DIR='{moe_dir}/checkpoints'"
  trainer.parse_flags(common + ["--gin_file=gin_configs/runs/eval.gin", checkpoint,
                                "--gin.EVAL_TASKS=['local_code_span_corruption_8k']",
                                "--gin.SEQUENCE_LENGTH=64", "--gin.BATCH_SIZE=8",
                                "--gin.evaluate.max_batches=2"])
  results = evaluate_lib.evaluate()  # pylint: disable=missing-kwoa
  assert np.isfinite(results["local_code_span_corruption_8k"]["loss/cross_entropy"])

  trainer.parse_flags(common + ["--gin_file=gin_configs/runs/infer.gin", checkpoint,
                                "--gin.INFER_TASK=['local_english_span_corruption_8k']",
                                "--gin.infer.num_examples=1", "--gin.MAX_NEW_TOKENS=4",
                                "--gin.infer.sequence_length=64"])
  (result,) = infer_lib.infer()  # pylint: disable=missing-kwoa
  assert result["targets"] and isinstance(result["prediction"], str)

  for sublayer in ("encoder/moe", "decoder/moe"):
    out = str(tmp_path / sublayer.replace("/", "_"))
    analyze_lib.analyze([f"--checkpoint={moe_dir}", f"--sublayer={sublayer}",
                         "--task=code=local_code_span_corruption_8k", "--max_tokens=300",
                         "--sequence_length=64", "--compare_steps=none", f"--out={out}"])
    report = open(os.path.join(out, "report.md")).read()
    assert f"| sub-layer | {sublayer} |" in report or sublayer in report
