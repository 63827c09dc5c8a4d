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
               batch: Mapping[str, jax.Array], rng: jax.Array) -> Tuple[TrainState, Dict]:
  rng = jax.random.fold_in(rng, state.step)
  rngs = dict(zip(RNG_STREAMS, jax.random.split(rng, len(RNG_STREAMS))))

  def loss_fn(params):
    (loss, metrics), updates = lm.loss({"params": params, **state.extra}, batch, rngs=rngs,
                                       deterministic=False, mutable=list(state.extra))
    return loss, (metrics, updates)

  (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, param_updates)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            extra={**state.extra, **updates})
  return new_state, metrics
