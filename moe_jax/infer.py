"""Generation from a checkpoint, for prompts or a seqio task's validation examples (t5x's
infer.py).

    python -m moe_jax.infer --gin_file=gin_configs/models/openmoe_base_16e_tiny.gin \
      --gin_file=gin_configs/runs/infer.gin --gin.CHECKPOINT_DIR="'runs/tiny_cpu/checkpoints'" \
      --gin.VOCAB_SIZE=8384 --gin.PROMPTS="['def main(', 'The kernel']"

A prompt is encoded with the task vocabulary and, with `mode_token` ("[S2S]" by default, what
UL2's prefix-LM denoiser saw), prefixed by that mode token and attended bidirectionally, as in
training. With `task`, each example's inputs are the prompt and its targets are printed beside
the prediction. Outputs go to stdout and `<checkpoint_dir>/../infer_step<N>.jsonl`.
"""
import json
import os
import sys
from typing import Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import checkpoints as checkpoints_lib
from moe_jax import config as config_lib
from moe_jax import decoding
from moe_jax import partitioning as part
from moe_jax import trainer


@gin.configurable(module="moe_jax.infer")
def infer(*, model=gin.REQUIRED, checkpoint_dir: str = gin.REQUIRED,
          prompts: Sequence[str] = (), task: Optional[str] = None, num_examples: int = 4,
          vocabulary: str = "spm8k", mode_token: Optional[str] = "[S2S]",
          max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
          top_p: float = 1.0, sequence_length: int = 512, seed: int = 0,
          step: Optional[int] = None) -> list:
  """[{prompt, prediction[, targets]}] for each prompt (and each task example)."""
  from tasks import pipeline  # pylint: disable=g-import-not-at-top  (the data side)
  from tasks import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  vocab = vocab_lib.get_vocabulary(vocabulary)
  mesh = part.make_mesh(data=1, model=1) if jax.device_count() == 1 else part.make_mesh()
  rules = config_lib.configured_rules()
  target = trainer.params_target(model.module, mesh, rules,
                                 jax.ShapeDtypeStruct((1, sequence_length), jnp.int32))
  params, extra, step = checkpoints_lib.restore_params(checkpoint_dir, target["params"],
                                                       target["extra"], step)
  variables = {"params": jax.device_get(params), **jax.device_get(extra)}

  requests = []
  mode = [] if mode_token is None else [vocab_lib.mode_token_id(vocab, mode_token)]
  for text in prompts:
    ids = vocab_lib.without_extra_ids(vocab).encode(text)
    requests.append({"prompt": text, "ids": mode + list(ids)})
  if task:
    ds = pipeline.get_dataset(task, sequence_length, 1, split="validation", seed=seed,
                              shuffle=False, pack=False)
    for batch in ds.take(num_examples).as_numpy_iterator():
      causal = batch["decoder_causal_attention"][0]
      tokens = batch["decoder_target_tokens"][0]
      width = max(int(causal.sum()) - 1, 1)  # the inputs (causal marks one more position)
      real = tokens[tokens > 0]
      requests.append({"prompt": vocab.decode(real[:width].tolist()),
                       "targets": vocab.decode(real[width:].tolist()),
                       "ids": real[:width].tolist()})
  results = []
  for i, request in enumerate(requests):
    prompt = np.asarray([request["ids"]], np.int32)
    prefix = np.ones_like(prompt) if mode else None
    new, _ = decoding.generate(model.module, variables, prompt, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               rng=jax.random.PRNGKey(seed + i), eos_id=vocab.eos_id,
                               prefix_mask=prefix)
    result = {k: v for k, v in request.items() if k != "ids"}
    result["prediction"] = vocab.decode(np.asarray(new[0]).tolist())
    results.append(result)
    print(json.dumps(result, ensure_ascii=False))
  if jax.process_index() == 0:
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)),
                        f"infer_step{step}.jsonl")
    with open(path, "w") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
  return results


def main(argv=None) -> int:
  return trainer.run_command(infer, argv)


if __name__ == "__main__":
  sys.exit(main())
