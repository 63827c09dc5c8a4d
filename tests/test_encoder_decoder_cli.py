"""The encoder-decoder through the real commands on the local corpus's span corruption: a
Switch run upcycled from a dense checkpoint (loss falls), then evaluate, infer and the routing
report on its checkpoint."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import analyze as analyze_lib
from moe_jax import checkpoints
from moe_jax import config
from moe_jax import evaluate as evaluate_lib
from moe_jax import infer as infer_lib
from moe_jax import trainer
from moe_jax.train_step import TrainState

MODEL = "gin_configs/models/switch_base_8_tiny.gin"
MODEL_SIZE = ["VOCAB_SIZE=8384", "NUM_LAYERS=1", "MOE_EVERY=1", "D_MODEL=32", "NUM_HEADS=2", "HEAD_DIM=16",
              "MLP_DIM=64", "EXPERT_DIM=64"]
SMALL = MODEL_SIZE + ["SEQUENCE_LENGTH=64", "BATCH_SIZE=8",
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
  # The dense model's checkpoint, as a dense run would leave it (its training is the decoder-
  # only trainer's, tested elsewhere; tests/test_upcycling.py checks the function it keeps).
  dense = config.load_model([MODEL], MODEL_SIZE + DENSE).module
  variables = nn.meta.unbox(jax.jit(dense.init)(jax.random.PRNGKey(0),
                                                jnp.ones((1, 8), jnp.int32)))
  with checkpoints.Checkpointer(os.path.join(dense_dir, "checkpoints")) as saver:
    saver.save(3, TrainState.create(variables, optax.adam(1e-3)), {})
  losses = _train(moe_dir, 8, files=["gin_configs/runs/sparse_upcycle.gin"], extra=[
      f"INITIAL_CHECKPOINT_PATH='{dense_dir}/checkpoints'"])
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses

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

  out = str(tmp_path / "report")  # the decoder's records: tests/test_encoder_decoder.py
  analyze_lib.analyze([f"--checkpoint={moe_dir}", "--sublayer=encoder/moe",
                       "--task=code=local_code_span_corruption_8k", "--max_tokens=300",
                       "--sequence_length=64", "--compare_steps=none", f"--out={out}"])
  assert "encoder/moe" in open(os.path.join(out, "report.md")).read()
