"""Bad settings fail before anything compiles or is written, with a message that names the
setting and what is allowed (the list: moe_jax/checks.py)."""
import math
import os
import subprocess
import sys

import pytest

from moe_jax import config, optimizers, trainer

FILES = ["gin_configs/models/openmoe_base_16e_tiny.gin", "gin_configs/runs/tiny_cpu.gin"]
# (binding, the message it must give): each a mistake a user makes on the command line.
TRAIN_CASES = [
    ("TRAIN_STEPS = %gin.REQUIRED",
     "optimizers.warmup_cosine_schedule.decay_steps (TRAIN_STEPS in the run gins) is required "
     "and not set: give it, e.g. --gin.TRAIN_STEPS=N."),
    ("TRAIN_STEPS = 0",
     "optimizers.warmup_cosine_schedule.decay_steps (TRAIN_STEPS in the run gins) must be an "
     "integer >= 1, got 0."),
    ("SEQUENCE_LENGTH = 0",
     "train.sequence_length (SEQUENCE_LENGTH in the run gins) must be an integer >= 1, got 0."),
    ("BATCH_SIZE = -4",
     "train.batch_size (BATCH_SIZE in the run gins) must be an integer >= 1, got -4."),
    ("MICROBATCHES = 3",
     "train.microbatches (MICROBATCHES) = 3 must divide train.batch_size (BATCH_SIZE) = 16."),
    ("CHECKPOINT_EVERY = 0",
     "train.checkpoint_every (CHECKPOINT_EVERY in the run gins) must be an integer >= 1, got 0."),
    ("EVAL_EVERY = -1",
     "train.eval_every (EVAL_EVERY in the run gins) must be an integer >= 0, got -1."),
    ("train.log_every = 0", "train.log_every must be an integer >= 1, got 0."),
    ("train.input_shards = 3",
     "train.input_shards = 3 must divide train.batch_size (BATCH_SIZE) = 16"),
    ("TRAIN_STEPS = 20",  # tiny_cpu.gin's 40-step warm-up is longer than the run
     "optimizers.warmup_cosine_schedule.warmup_steps = 40 must be below "
     "optimizers.warmup_cosine_schedule.decay_steps = 20 (the run's length in "
     "runs/tiny_cpu.gin: TRAIN_STEPS): shorten the warm-up, e.g. "
     "--gin.optimizers.warmup_cosine_schedule.warmup_steps=2."),
]


@pytest.mark.parametrize("binding,message", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_train_settings_fail_before_anything_is_written(binding, message, tmp_path):
  model_dir = str(tmp_path / "run")
  config.parse_gin(FILES, [f"MODEL_DIR = '{model_dir}'", binding, *config.MODEL_BINDINGS])
  with pytest.raises(ValueError) as error:
    trainer.train()
  assert message in str(error.value)
  assert not os.path.exists(model_dir)


@pytest.mark.parametrize("call,message", [
    (lambda: optimizers.rsqrt_schedule(base_learning_rate=math.nan),
     "optimizers.rsqrt_schedule.base_learning_rate must be a finite number > 0, got nan."),
    (lambda: optimizers.rsqrt_schedule(warmup_steps=-1),
     "optimizers.rsqrt_schedule.warmup_steps must be an integer >= 0, got -1."),
    (lambda: optimizers.constant_schedule(0.0),
     "optimizers.constant_schedule.learning_rate must be a finite number > 0, got 0.0."),
])
def test_bad_schedules_name_the_setting(call, message):
  with pytest.raises(ValueError) as error:
    call()
  assert message in str(error.value)


@pytest.mark.parametrize("module", ["moe_jax.params", "moe_jax.dry_run"])
def test_a_missing_gin_file_is_named_with_the_closest(module):
  out = subprocess.run([sys.executable, "-m", module,
                        "--gin_file=gin_configs/models/mixtral_8x7b_tiy.gin"],
                       cwd=config.REPO_ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
  assert out.returncode != 0
  assert ("gin file 'gin_configs/models/mixtral_8x7b_tiy.gin' not found. Closest: "
          "gin_configs/models/mixtral_8x7b_tiny.gin") in out.stderr


# --- every command, as a user types it: (command, flags, the message) ----------------------
MODEL = "--gin_file=gin_configs/models/openmoe_base_16e_tiny.gin"
TINY_RUN = "--gin_file=gin_configs/runs/tiny_cpu.gin"
EVAL = ["--gin_file=gin_configs/runs/eval.gin", "--gin.CHECKPOINT_DIR='/nonexistent/checkpoints'"]
INFER = ["--gin_file=gin_configs/runs/infer.gin",
         "--gin.CHECKPOINT_DIR='/nonexistent/checkpoints'", "--gin.VOCAB_SIZE=8384"]
COMMAND_CASES = [
    ("train", [MODEL, TINY_RUN, "--gin.NUM_EXPERT=4"],
     "--gin.NUM_EXPERT: no gin file given defines or uses a macro NUM_EXPERT, so this binding "
     "would change nothing. Closest: NUM_EXPERTS"),
    ("train", [MODEL, TINY_RUN, "--gin.VOCAB_SIZE=512"],
     "train.mixture_or_task (MIXTURE_OR_TASK_NAME): 'local_ul2_8k' is tokenized with spm8k "
     "(8384 ids) but the model has VOCAB_SIZE = 512 rows: set --gin.VOCAB_SIZE=8384."),
    ("train", [MODEL, TINY_RUN, "--gin.MIXTURE_OR_TASK_NAME='local_ul2'"],
     "'local_ul2' is tokenized with spm32k (32384 ids) but the model has VOCAB_SIZE = 8384 rows: "
     "set --gin.VOCAB_SIZE=32384, or use tasks ending _8k"),
    ("train", [MODEL, TINY_RUN, "--gin.MIXTURE_OR_TASK_NAME='local_ul3_8k'"],
     "train.mixture_or_task (MIXTURE_OR_TASK_NAME): 'local_ul3_8k' is not a registered task or "
     "mixture (tasks/registry.py lists them). Closest: local_ul2_8k"),
    ("train", [MODEL, TINY_RUN, "--gin.EVAL_TASKS=['local_code_lm8k']"],
     "train.eval_tasks (EVAL_TASKS): 'local_code_lm8k' is not a registered task (tasks/"
     "registry.py lists them). Closest: local_code_lm_8k"),
    ("train", [MODEL, TINY_RUN, "--gin.EVAL_TASKS=['local_english_lm']"],
     "train.eval_tasks (EVAL_TASKS): 'local_english_lm' is tokenized with spm32k (32384 ids)"),
    ("train", [MODEL, "--gin_file=gin_configs/runs/pretrain.gin"],
     "MODEL_DIR, TRAIN_STEPS are required and not set (the run gin leaves them %gin.REQUIRED): "
     "give them, e.g. --gin.MODEL_DIR=... --gin.TRAIN_STEPS=..."),
    ("train", [MODEL, TINY_RUN,
               "--gin.optimizers.warmup_cosine_schedule.peak_learning_rate=nan"],
     "--gin.optimizers.warmup_cosine_schedule.peak_learning_rate=nan: settings must be finite "
     "numbers (nan and inf are refused)."),
    ("train", [MODEL, TINY_RUN,
               "--gin.optimizers.warmup_cosine_schedule.peak_learning_rate=1e999"],
     "optimizers.warmup_cosine_schedule.peak_learning_rate = inf: settings must be finite "
     "numbers (nan and inf are refused)."),
    ("train", [MODEL, TINY_RUN, "--gin.SEQUENCE_LENGTH=-inf"],
     "--gin.SEQUENCE_LENGTH=-inf: settings must be finite numbers"),
    ("train", ["--gin_file=gin_configs/runs/pretrain.gin", TINY_RUN],
     "moe_jax.trainer.train.model uses the macro %MODEL, which no gin file given defines. Give a "
     "model preset first, e.g. --gin_file=gin_configs/models/openmoe_base_16e_tiny.gin"),
    ("train", [MODEL, TINY_RUN, "--gin.train.on_nonfinite='ignore'"],
     "train.on_nonfinite = 'ignore'; choose 'stop' or 'skip'."),
    ("train", [MODEL, TINY_RUN, "--gin.train.init_mode='upcycle'"],
     "train.init_mode = 'upcycle'; choose 'params' or 'sparse_upcycle'."),
    ("train", [MODEL, TINY_RUN, "--gin.train.init_mode='sparse_upcycle'"],
     "train.init_mode = 'sparse_upcycle' needs the dense run's checkpoints: set "
     "train.init_checkpoint (INITIAL_CHECKPOINT_PATH)."),
    ("train", [MODEL, TINY_RUN, "--gin.train.on_restore_error='retry'"],
     "train.on_restore_error = 'retry'; choose 'fallback' or 'stop'."),
    ("train", [MODEL, "--gin_file=gin_configs/runs/tiny_cpu", "--gin.TRAIN_STEPS=5"],
     "gin file 'gin_configs/runs/tiny_cpu' not found. Closest: gin_configs/runs/tiny_cpu.gin"),
    ("infer", [MODEL, *INFER, "--gin.PROMPTS=['x']", "--gin.VOCAB_SIZE=512"],  # no vocabulary's
     "VOCAB_SIZE = 512 is the size of no shipped vocabulary: spm32k (32384 ids, tasks ending "
     "without a suffix), spm8k (8384 ids, tasks ending _8k), bytes (643 ids). Set "
     "--gin.VOCAB_SIZE to the one the model was trained with"),
    ("evaluate", [MODEL, "--gin_file=gin_configs/runs/eval.gin"],
     "CHECKPOINT_DIR is required and not set (the run gin leaves it %gin.REQUIRED): give it, "
     "e.g. --gin.CHECKPOINT_DIR=..."),
    ("evaluate", [MODEL, *EVAL, "--gin.VOCAB_SIZE=8384", "--gin.EVAL_TASKS=[]"],
     "evaluate.tasks (EVAL_TASKS) is empty"),
    ("evaluate", [MODEL, *EVAL, "--gin.VOCAB_SIZE=8384", "--gin.EVAL_TASKS=['local_code_lm']"],
     "evaluate.tasks (EVAL_TASKS): 'local_code_lm' is tokenized with spm32k (32384 ids) but the "
     "model has VOCAB_SIZE = 8384 rows"),
    ("evaluate", [MODEL, *EVAL],
     "no committed checkpoint in /nonexistent/checkpoints: CHECKPOINT_DIR must name a run's "
     "checkpoints directory"),
    ("evaluate", [MODEL, *EVAL, "--gin.VOCAB_SIZE=8384", "--gin.SEQUENCE_LENGTH=0"],
     "evaluate.sequence_length (SEQUENCE_LENGTH in the run gins) must be an integer >= 1, got 0."),
    ("infer", [MODEL, *INFER],
     "infer has nothing to do: give prompts (--gin.PROMPTS=\"['def main(']\") or a task"),
    ("infer", [MODEL, *INFER, "--gin.PROMPTS=['']", "--gin.infer.mode_token=None"],
     "infer.prompts has an empty prompt and infer.mode_token is None"),
    ("infer", [MODEL, *INFER, "--gin.PROMPTS=['x']", "--gin.VOCABULARY='spm32k'"],
     "infer.vocabulary (VOCABULARY) = 'spm32k' has 32384 ids but the model's is spm8k (8384 "
     "ids, VOCAB_SIZE = 8384): leave VOCABULARY = None"),
    ("infer", [MODEL, *INFER, "--gin.INFER_TASK='local_code_s'"],
     "infer.task (INFER_TASK): 'local_code_s' is tokenized with spm32k (32384 ids) but the model "
     "has VOCAB_SIZE = 8384 rows"),
    ("infer", [MODEL, *INFER, "--gin.PROMPTS=['x']", "--gin.MAX_NEW_TOKENS=0"],
     "infer.max_new_tokens (MAX_NEW_TOKENS in the run gins) must be an integer >= 1, got 0."),
    ("infer", [MODEL, *INFER, "--gin.PROMPTS=['x']", "--gin.infer.top_p=0.0"],
     "infer.top_p must be a finite number > 0.0 and <= 1.0, got 0.0."),
]


@pytest.mark.parametrize("command,flags,message", COMMAND_CASES,
                         ids=[f"{c[0]}:{' '.join(c[1][2:]) or c[1][-1]}" for c in COMMAND_CASES])
def test_bad_command_lines_fail_before_anything_compiles(command, flags, message, tmp_path):
  from moe_jax import checks, evaluate, infer  # pylint: disable=g-import-not-at-top
  fn = {"train": trainer.train, "evaluate": evaluate.evaluate, "infer": infer.infer}[command]
  model_dir = tmp_path / "run"
  if command == "train" and not any("pretrain.gin" in f and len(flags) == 2 for f in flags[1:]):
    flags = flags + [f"--gin.MODEL_DIR='{model_dir}'"]
  with pytest.raises(SystemExit) as error:
    trainer.parse_flags(flags)
    checks.exit_on_setting_error(fn)
  assert message in str(error.value), str(error.value)
  assert not model_dir.exists()


@pytest.mark.parametrize("argv,message", [
    (["--texts_file={empty}"], "has no non-empty line: give one text per line."),
    (["--texts_file=/nonexistent.txt"], "--texts_file=/nonexistent.txt: no such file."),
    (["--task=code=local_code_lm"],
     "--task: 'local_code_lm' is tokenized with spm32k (32384 ids) but the model has "
     "VOCAB_SIZE = 8384 rows"),
    (["--task=local_cod_lm_8k"], "--task: 'local_cod_lm_8k' is not a registered task"),
    (["--task=local_code_lm_8k", "--max_tokens=0"], "--max_tokens must be an integer >= 1"),
    (["--task=local_code_lm_8k", "--compare_steps=latest"],
     "--compare_steps=latest: choose first, all, none or a comma list of steps"),
    (["--task=local_code_lm_8k", "--capacity_factors=1,x"],
     "--capacity_factors=1,x: give a comma list of finite numbers > 0"),
    (["--task=local_code_lm_8k", "--sublayer=attention"],
     "--sublayer 'attention' is not a sparse sub-layer of this model; choose one of ('moe',)"),
])
def test_analyze_refuses_empty_or_unknown_inputs(argv, message, tmp_path):
  from moe_jax import analyze  # pylint: disable=g-import-not-at-top
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  argv = [a.format(empty=empty) for a in argv]
  with pytest.raises(SystemExit) as error:
    analyze.main(["--checkpoint=none", MODEL, "--gin.VOCAB_SIZE=8384", *argv])
  assert message in str(error.value), str(error.value)


def test_params_counts_tiny_presets_readably_and_checks_seq_len(capsys):
  from moe_jax import params  # pylint: disable=g-import-not-at-top
  assert [params.human_count(n) for n in (512, 53_248, 999_950, 1_234_567, 7.4e9, 1.571e12)
          ] == ["512", "53.2K", "1,000K", "1.23M", "7.4B", "1.57T"]
  params.main([MODEL])
  out = capsys.readouterr().out
  assert "0.00B" not in out and "total=" in out, out
  with pytest.raises(SystemExit) as error:
    params.main([MODEL, "--seq_len", "0"])
  assert "--seq_len must be an integer >= 1, got 0." in str(error.value)


def test_demo_refuses_bad_sizes(monkeypatch):
  from moe_jax import demo  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "argv", ["demo", "--tokens", "100"])
  with pytest.raises(SystemExit) as error:
    demo.main()
  assert "--tokens must be a multiple of 64 (sequences of 64), got 100." in str(error.value)
