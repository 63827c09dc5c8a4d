"""Generation from a checkpoint, for prompts or a seqio task's validation examples (t5x's
infer.py).

    python -m moe_jax.infer --gin_file=gin_configs/models/openmoe_base_16e_tiny.gin \
      --gin_file=gin_configs/runs/infer.gin --gin.CHECKPOINT_DIR="'runs/tiny_cpu/checkpoints'" \
      --gin.VOCAB_SIZE=8384 --gin.PROMPTS="['def main(', 'The kernel']"

The vocabulary follows the model's VOCAB_SIZE (or the task's); prompts, task, vocabulary and
the checkpoint's shapes are checked before anything compiles.

A prompt is encoded with the task vocabulary and, with `mode_token` ("[S2S]" by default, what
UL2's prefix-LM denoiser saw), prefixed by that mode token and attended bidirectionally, as in
training. With `task`, each example's inputs are the prompt and its targets are printed beside
the prediction. Outputs go to stdout and `<checkpoint_dir>/../infer_step<N>.jsonl`.
"""
import json
import os
import sys
from typing import Optional, Sequence, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import checkpoints as checkpoints_lib
from moe_jax import checks
from moe_jax import config as config_lib
from moe_jax import partitioning as part
from moe_jax import trainer


@gin.configurable(module="moe_jax.infer")
def infer(*, model=gin.REQUIRED, checkpoint_dir: str = gin.REQUIRED,
          prompts: Sequence[str] = (), task: Union[None, str, Sequence[str]] = None,
          num_examples: int = 4,
          vocabulary: Optional[str] = None, mode_token: Optional[str] = "[S2S]",
          max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
          top_p: float = 1.0, sequence_length: int = 512, seed: int = 0,
          step: Optional[int] = None) -> list:
  """[{prompt, prediction[, targets]}] for each prompt (and each task example).

  task: a task or a list of tasks; `num_examples` validation examples in all are taken from
    them in turn.
  vocabulary: None (infer.gin's default) decodes with the task's vocabulary, or without a
    task with the shipped vocabulary of the model's size (VOCAB_SIZE): one source of truth.
  """
  from tasks import pipeline  # pylint: disable=g-import-not-at-top  (the data side)
  from tasks import registry  # pylint: disable=g-import-not-at-top
  from tasks import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts and not task:
    raise checks.SettingError("infer has nothing to do: give prompts (--gin.PROMPTS=\"['def "
                              "main(']\") or a task (--gin.INFER_TASK=\"'local_code_s_8k'\").")
  if mode_token is None and any(not p for p in prompts):
    raise checks.SettingError("infer.prompts has an empty prompt and infer.mode_token is None: "
                              "generation needs at least one token to start from; give text or "
                              "a mode token (e.g. infer.mode_token='[S2S]').")
  checks.integer("infer.max_new_tokens", max_new_tokens, 1, "MAX_NEW_TOKENS")
  checks.integer("infer.sequence_length", sequence_length, 1)
  checks.integer("infer.num_examples", num_examples, 1)
  checks.integer("infer.top_k", top_k, 0)
  checks.number("infer.temperature", temperature, minimum=0.0)
  checks.number("infer.top_p", top_p, minimum=0.0, maximum=1.0, exclusive_minimum=True)
  vocab_size = model.module.vocab_size
  task_names = [task] if isinstance(task, str) else list(task or [])
  if task_names:
    vocabularies = registry.check_tasks(task_names, "infer.task (INFER_TASK)", vocab_size,
                                        mixtures=False)
    vocab = vocabularies[task_names[0]]  # (each one's size is VOCAB_SIZE: checked above)
  else:
    vocab = vocab_lib.get_vocabulary(registry.vocabulary_of_size(vocab_size))
  if vocabulary is not None:
    if vocabulary not in list(vocab_lib.VOCABULARIES) + ["bytes"]:
      raise checks.SettingError(f"infer.vocabulary (VOCABULARY) = {vocabulary!r}; choose None "
                                f"(the model's) or one of {list(vocab_lib.VOCABULARIES)} + "
                                "['bytes'].")
    given = vocab_lib.get_vocabulary(vocabulary)
    if given.vocab_size != vocab.vocab_size:
      raise checks.SettingError(
          f"infer.vocabulary (VOCABULARY) = {vocabulary!r} has {given.vocab_size} ids but "
          f"the model's is {registry.vocabulary_name(vocab)} ({vocab.vocab_size} ids, "
          f"VOCAB_SIZE = {vocab_size}): leave VOCABULARY = None to decode with the model's.")
  mesh = part.make_mesh(data=1, model=1) if jax.device_count() == 1 else part.make_mesh()
  rules = config_lib.configured_rules()
  target = trainer.params_target(model.module, mesh, rules,
                                 jax.ShapeDtypeStruct((1, sequence_length), jnp.int32))
  trainer.check_against_checkpoint(target, checkpoint_dir, step, restart=False)
  params, extra, step = checkpoints_lib.restore_params(checkpoint_dir, target["params"],
                                                       target["extra"], step)
  variables = {"params": jax.device_get(params), **jax.device_get(extra)}

  requests = []
  mode = [] if mode_token is None else [vocab_lib.mode_token_id(vocab, mode_token)]
  for text in prompts:
    ids = vocab_lib.without_extra_ids(vocab).encode(text)
    requests.append({"prompt": text, "ids": mode + list(ids)})
  requests += _task_requests(pipeline, vocab, task_names, num_examples, sequence_length, seed,
                             trainer.model_features(model))
  results = []
  for i, request in enumerate(requests):
    prompt = np.asarray([request["ids"]], np.int32)
    new, _ = model.generate(variables, prompt, bidirectional_prompt=bool(mode),
                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, rng=jax.random.PRNGKey(seed + i), eos_id=vocab.eos_id)
    result = {k: v for k, v in request.items() if k != "ids"}
    result["prediction"] = vocab.decode(np.asarray(new[0]).tolist())
    results.append(result)
    print(_readable(result), flush=True)
  if jax.process_index() == 0:
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)),
                        f"infer_step{step}.jsonl")
    with open(path, "w") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
  return results


def _task_requests(pipeline, vocab, task_names: Sequence[str], num_examples: int,
                   sequence_length: int, seed: int, features: str = "decoder_only") -> list:
  """`num_examples` validation examples in all, taken from the tasks in turn: the inputs are
  the prompt (the prefix of an S-denoiser task), the targets what the document goes on with."""
  iterators = {name: pipeline.get_dataset(name, sequence_length, 1, split="validation",
                                          seed=seed, shuffle=False, pack=False,
                                          features=features).as_numpy_iterator()
               for name in task_names}
  requests = []
  while iterators and len(requests) < num_examples:
    for name in list(iterators):
      if len(requests) == num_examples:
        break
      batch = next(iterators[name], None)
      if batch is None:
        del iterators[name]
        continue
      if features == "encoder_decoder":  # the inputs feed the encoder, the targets the decoder
        inputs = batch["encoder_input_tokens"][0]
        inputs, targets = inputs[inputs > 0], batch["decoder_target_tokens"][0]
        targets = targets[targets > 0]
      else:
        causal = batch["decoder_causal_attention"][0]
        tokens = batch["decoder_target_tokens"][0]
        width = max(int(causal.sum()) - 1, 1)  # the inputs (causal marks one more position)
        real = tokens[tokens > 0]
        inputs, targets = real[:width], real[width:]
      mode = len(inputs) and inputs[0] >= vocab.vocab_size - vocab.extra_ids
      requests.append({"task": name, "prompt": vocab.decode(inputs[1 if mode else 0:].tolist()),
                       "targets": vocab.decode(targets.tolist()), "ids": inputs.tolist()})
  iterators.clear()  # (partly read: TensorFlow says so as they go, while the console filters)
  return requests


def _readable(result: dict, width: int = 300) -> str:
  """A result as text for the console (the .jsonl file keeps them whole)."""
  def tail(text: str) -> str:
    text = text if len(text) <= width else "…" + text[-width:]
    return text.replace("\n", "\n    ")

  def head(text: str) -> str:
    text = text if len(text) <= width else text[:width] + "…"
    return text.replace("\n", "\n    ")

  lines = [f"--- {result.get('task', 'prompt')}", f"  prompt: {tail(result['prompt'])}",
           f"  model:  {head(result['prediction'])}"]
  if "targets" in result:
    lines.append(f"  actual: {head(result['targets'])}")
  return "\n".join(lines)


def main(argv=None) -> int:
  return trainer.run_command(infer, argv)


if __name__ == "__main__":
  sys.exit(main())
