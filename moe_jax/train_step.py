"""One training step, pure and jit-able: loss, gradients, optimizer update, MoE state.

    state = TrainState.create(lm, variables, optimizer)
    state, metrics = train_step(lm, optimizer, state, batch, rng)

Non-param collections (the DeepSeek-V3 expert bias in "moe_balance") are carried in
`state.extra` and updated by the forward pass, not by gradients.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

RNG_STREAMS = ("dropout", "jitter", "gating_noise", "routing")


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  extra: Dict[str, Any]

  @classmethod
  def create(cls, variables: Mapping[str, Any], optimizer: optax.GradientTransformation):
    params = variables["params"]
    extra = {k: v for k, v in variables.items() if k not in ("params", "cache")}
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
               extra=extra)


def train_step(lm, optimizer: optax.GradientTransformation, state: TrainState,
               batch: Mapping[str, jax.Array], rng: jax.Array, *, microbatches: int = 1,
               learning_rate_fn=None) -> Tuple[TrainState, Dict]:
  """One optimizer step on `batch` ([B, L] features), optionally as `microbatches` slices.

  Gradient accumulation: the batch is cut into `microbatches` slices of B / microbatches rows
  whose gradients are averaged (weighted by their loss tokens, so the result equals one big
  batch's gradient when the loss is a token mean) in a `lax.scan`, so activations of one slice
  live at a time. Non-param collections (moe_balance) are threaded through the slices.

  A non-finite loss or gradient leaves params, optimizer state and collections unchanged (the
  step counter still advances) and sets metrics["nonfinite"]; the loop decides whether to
  stop or go on.
  """
  rng = jax.random.fold_in(rng, state.step)

  def grads_of(extra, micro_batch, micro_rng):
    rngs = dict(zip(RNG_STREAMS, jax.random.split(micro_rng, len(RNG_STREAMS))))

    def loss_fn(params):
      (loss, metrics), updates = lm.loss({"params": params, **extra}, micro_batch, rngs=rngs,
                                         deterministic=False, mutable=list(extra))
      return loss, (metrics, updates)

    (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, metrics, {**extra, **updates}, grads

  if microbatches == 1:
    loss, metrics, extra, grads = grads_of(state.extra, batch, rng)
  else:
    rows = next(iter(batch.values())).shape[0]
    if rows % microbatches:
      raise ValueError(f"microbatches={microbatches} must divide the batch size {rows}.")
    sliced = jax.tree.map(lambda x: x.reshape((microbatches, rows // microbatches)
                                              + x.shape[1:]), batch)

    def body(carry, inputs):
      extra, grad_sum, weight_sum = carry
      micro_batch, micro_rng = inputs
      loss, metrics, extra, grads = grads_of(extra, micro_batch, micro_rng)
      weight = metrics["num_tokens"]
      grad_sum = jax.tree.map(lambda a, g: a + weight * g, grad_sum, grads)
      return (extra, grad_sum, weight_sum + weight), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (extra, grad_sum, weight_sum), (losses, metrics) = jax.lax.scan(
        body, (state.extra, zeros, jnp.zeros(())),
        (sliced, jax.random.split(rng, microbatches)))
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight_sum, 1.0), grad_sum)
    loss = jnp.mean(losses)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["num_tokens"] = weight_sum

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, param_updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state),
                            extra=keep(extra, state.extra))
  metrics = dict(metrics, grad_norm=grad_norm, nonfinite=~finite)
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  return new_state, metrics


def eval_step(lm, params, extra, batch: Mapping[str, jax.Array]) -> Dict:
  """Loss terms and metrics without dropout, at the eval capacity factor."""
  _, metrics = lm.loss({"params": params, **extra}, batch, deterministic=True)
  return metrics
