"""Autoregressive decoding with a KV cache: prefill the prompt, then one token per step.

    tokens, logits = generate(module, variables, prompt, max_new_tokens=32,
                              temperature=0.8, top_k=40, top_p=0.95, rng=key)

One jit-compiled function per (batch, prompt length, max_new_tokens, sampling settings):
the cache has a fixed size, prompt + max_new_tokens, and the steps run in a `lax.scan`.
MoE layers route every step as in evaluation (`deterministic=True`: the eval capacity factor,
no noise). With one routing group per sequence (`group_size=None`, the presets' default), a
decode step routes one token per group, which never overflows a capacity of >= 1 slot, so
cached decoding and a full forward pass agree whenever the forward pass drops nothing
(dropless, or enough eval capacity). A fixed `group_size` must divide batch × 1 at each step
(or set `pad_groups`, which puts the whole batch's step tokens in one group). Prompts in a
batch share one length (one cache index for all rows): left-align equal-length prompts.
Routers that are not causal (`Router.is_causal`: expert choice, where an expert picks among all
tokens of the group; batch-prioritized routing with a capacity) cannot decode one token at a
time.

Sampling: temperature 0 is greedy; otherwise logits / temperature, restricted to the top_k
tokens (0: all) and to the smallest set whose probability reaches top_p (1.0: all).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"need temperature >= 0 (got {temperature}), top_k >= 0 (got {top_k}) "
                     f"and top_p in (0, 1] (got {top_p}).")


def sample_logits(rng: Array, logits: Array, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """Token ids [B] from logits [B, V] (module docstring for the settings)."""
  _check_sampling(temperature, top_k, top_p)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the tokens strictly more likely than it hold < top_p of the mass.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1)


def init_cache(module, batch_size: int, max_length: int) -> Mapping[str, Any]:
  """Zero KV caches for `batch_size` sequences of up to `max_length` tokens (no forward pass)."""
  tokens = jax.ShapeDtypeStruct((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(
      lambda t: module.init(jax.random.PRNGKey(0), t, decode=True), tokens)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_id"))
def _generate(module, variables, prompt, prefix_mask, rng, *, max_new_tokens, temperature,
              top_k, top_p, eos_id):
  batch, prompt_len = prompt.shape
  cache = init_cache(module, batch, prompt_len + max_new_tokens)
  variables = {**variables, "cache": cache}

  def forward(variables, tokens, prefix):
    (logits, _), updates = module.apply(variables, tokens, prefix_mask=prefix,
                                        deterministic=True, decode=True, mutable=["cache"])
    return logits[:, -1], {**variables, **updates}

  logits, variables = forward(variables, prompt, prefix_mask)

  def step(carry, rng):
    variables, logits, done = carry
    token = sample_logits(rng, logits, temperature, top_k, top_p)
    token = jnp.where(done, 0, token)  # finished sequences continue with padding (id 0)
    if eos_id is not None:
      done = done | (token == eos_id)
    next_logits, variables = forward(variables, token[:, None], None)
    return (variables, next_logits, done), (token, logits)

  rngs = jax.random.split(rng, max_new_tokens)
  _, (tokens, step_logits) = jax.lax.scan(
      step, (variables, logits, jnp.zeros((batch,), bool)), rngs)
  return tokens.T, jnp.swapaxes(step_logits, 0, 1)


def generate(module, variables: Mapping[str, Any], prompt: Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: Optional[Array] = None, eos_id: Optional[int] = None,
             prefix_mask: Optional[Array] = None) -> Tuple[Array, Array]:
  """Continues `prompt` [B, P] by `max_new_tokens` tokens.

  variables: {"params": ...} (and any non-param collection such as "moe_balance").
  prefix_mask: [B, P], 1 where the prompt is attended bidirectionally (prefix LM, UL2).
  Returns (new tokens [B, N], logits [B, N, V] float32 that each new token was drawn from).
  """
  module.check_decodable()
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  _check_sampling(temperature, top_k, top_p)
  variables = {k: v for k, v in variables.items() if k != "cache"}
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return _generate(module, variables, jnp.asarray(prompt, jnp.int32), prefix_mask, rng,
                   max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p), eos_id=eos_id)
