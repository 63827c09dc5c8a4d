"""Greedy decoding throughput with the KV cache against re-running the full forward pass.

Both paths generate `--new_tokens` tokens after a random `--prompt_len`-token prompt for
`--batch` sequences, greedily, as one jit-compiled function each (wall time on the default
backend, one warm-up call that also compiles, then the median of `--repeats` timed calls):
  cached    `decoding.generate`: prefill the prompt, then one token per step against the cache
  uncached  a `lax.fori_loop` over the steps, each a full forward pass over a fixed buffer of
            prompt_len + new_tokens tokens (tokens after the current length are 0, kept out of
            the MoE layers by `padding_mask`; attention is causal, so they do not change the
            logits at earlier positions); the argmax at the last real position is written in
Throughput is batch · new_tokens / time (tok/s); speedup = cached / uncached. It also checks
that both paths produce the same tokens (they should for a dropless preset).

    python benchmarks/decode.py                          # mixtral_8x7b_tiny
    python benchmarks/decode.py --gin_file=gin_configs/models/deepseek_moe_tiny.gin
    python benchmarks/decode.py --batch 1 --new_tokens 128 --gin.NUM_LAYERS=2
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe_jax import config, decoding  # noqa: E402

DEFAULT_GIN = "gin_configs/models/mixtral_8x7b_tiny.gin"


def uncached_generate(module, max_new_tokens):
  """A jitted fn(variables, prompt [B, P]) -> new tokens [B, N], by full forward passes."""

  @jax.jit
  def run(variables, prompt):
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    buffer = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)
    positions = jnp.arange(total)

    def step(i, seq):
      length = prompt_len + i
      mask = jnp.broadcast_to(positions < length, (batch, total))
      logits, _ = module.apply(variables, seq, padding_mask=mask)
      last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
      token = jnp.argmax(last, axis=-1).astype(jnp.int32)
      return jax.lax.dynamic_update_slice(seq, token[:, None], (0, length))

    seq = jax.lax.fori_loop(0, max_new_tokens, step, buffer)
    return seq[:, prompt_len:]

  return run


def median_time(fn, repeats):
  """Output of a warm-up (compiling) call and the median wall time of `repeats` more calls."""
  out = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return out, float(np.median(times))


def main(argv):
  files, bindings, rest = config.split_gin_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(rest)
  files = files or [DEFAULT_GIN]
  preset = os.path.splitext(os.path.basename(files[-1]))[0]

  module = config.load_model(files, bindings).module
  prompt = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.prompt_len), 1,
                              module.vocab_size, dtype=jnp.int32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), prompt)
  n = args.new_tokens

  (cached_tokens, _), cached_s = median_time(
      lambda: decoding.generate(module, variables, prompt, max_new_tokens=n), args.repeats)
  uncached = uncached_generate(module, n)
  uncached_tokens, uncached_s = median_time(lambda: uncached(variables, prompt), args.repeats)

  equal = bool(np.array_equal(np.asarray(cached_tokens), np.asarray(uncached_tokens)))
  cached_tps = args.batch * n / cached_s
  uncached_tps = args.batch * n / uncached_s
  print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}, {jax.device_count()} device(s)), repeats={args.repeats}")
  print(f"preset={preset} batch={args.batch} prompt={args.prompt_len} new={n} "
        f"cached={cached_tps:.0f} tok/s uncached={uncached_tps:.0f} tok/s "
        f"speedup={cached_tps / uncached_tps:.2f} tokens_equal={equal}")
  if not equal:
    mismatch = np.asarray(cached_tokens) != np.asarray(uncached_tokens)
    print(f"  {int(mismatch.sum())} of {mismatch.size} tokens differ; first step differing: "
          f"{int(np.argmax(mismatch.any(axis=0)))}")


if __name__ == "__main__":
  main(sys.argv[1:])
