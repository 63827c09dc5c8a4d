"""The quick-start job until the training loop lands: route a batch through tiny MoE layers.

    python -m moe_jax.demo [--experts 8] [--tokens 256] [--steps 30]

For each router of the literature, builds a small MoE layer, routes a batch with padding and
prints its routing statistics; then trains one layer for a few steps (a toy regression onto a
random teacher, with the load-balancing loss) to show the losses moving.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax.moe_layer import MoeLayer
from moe_jax.routing import EXPERT_BIAS_COLLECTION, ExpertChoiceRouter, TokenChoiceRouter


def presets():
  """name -> (router, dispatch, activation): each system's routing in miniature (the layer
  tells each router the number of experts)."""
  return {
      "switch (top-1, jitter)": (TokenChoiceRouter(1, jitter_noise=0.01), "gather", "relu"),
      "gshard (top-2, random 2nd)": (
          TokenChoiceRouter(2, second_expert_policy="random"), "gather", "relu"),
      "shazeer (noisy top-2)": (
          TokenChoiceRouter(2, noisy_gating=True, normalize_combine_weights=True), "gather",
          "relu"),
      "st-moe (top-2, einsum)": (TokenChoiceRouter(2), "einsum", "geglu"),
      "mixtral (top-2, dropless)": (
          TokenChoiceRouter(2, normalize_combine_weights=True), "dropless", "swiglu"),
      "expert choice": (ExpertChoiceRouter(2), "gather", "relu"),
      "deepseek (bias balancing)": (
          TokenChoiceRouter(2, score_function="sigmoid", normalize_combine_weights=True,
                            expert_bias_update_rate=1e-3), "dropless", "swiglu"),
  }


def _batch(tokens: int, width: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  seq = 64
  x = rng.normal(size=(tokens // seq, seq, width)).astype(np.float32)
  mask = np.ones(x.shape[:2], np.float32)
  mask[:, -8:] = 0  # padding at the end of each sequence: takes no capacity, no statistic
  return jnp.asarray(x), jnp.asarray(mask)


def route_all(num_experts: int, tokens: int, width: int = 32, hidden: int = 64):
  x, mask = _batch(tokens, width)
  rngs = {k: jax.random.PRNGKey(i) for i, k in
          enumerate(["params", "jitter", "gating_noise", "routing", "dropout"])}
  print(f"{'router':28s} {'aux':>6s} {'z':>7s} {'drop%':>6s} {'unrouted%':>9s} "
        f"{'entropy':>7s} {'conf':>5s}  load min/max (per expert, before -> after capacity)")
  for name, (router, dispatch, activation) in presets().items():
    layer = MoeLayer(router, num_experts, hidden, activation=activation, dispatch=dispatch)
    variables = layer.init(rngs, x, mask, True)
    (y, aux), _ = layer.apply(variables, x, mask, False, rngs=rngs,
                              mutable=[EXPERT_BIAS_COLLECTION])
    m = jax.tree.map(np.asarray, aux.metrics)
    print(f"{name:28s} {float(aux.aux_loss):6.3f} {float(aux.z_loss):7.4f} "
          f"{100 * m['dropped_fraction']:6.2f} {100 * m['unrouted_token_fraction']:9.2f} "
          f"{m['router_entropy']:7.3f} {m['router_confidence']:5.3f}  "
          f"{m['expert_load_before'].min():.0f}/{m['expert_load_before'].max():.0f} -> "
          f"{m['expert_load_after'].min():.0f}/{m['expert_load_after'].max():.0f}")


def train_toy(num_experts: int, tokens: int, steps: int, width: int = 32, hidden: int = 64):
  """Fit a top-2 MoE layer to a random dense teacher; aux loss weighted 0.01 as in Switch."""
  x, mask = _batch(tokens, width, seed=1)
  teacher = jax.random.normal(jax.random.PRNGKey(42), (width, width)) / np.sqrt(width)
  target = jnp.tanh(x @ teacher)
  layer = MoeLayer(TokenChoiceRouter(2), num_experts, hidden, activation="swiglu")
  params = layer.init(jax.random.PRNGKey(0), x, mask, True)["params"]
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  def loss_fn(params):
    y, aux = layer.apply({"params": params}, x, mask, False)
    mse = jnp.sum(((y - target) ** 2).mean(-1) * mask) / jnp.sum(mask)
    return mse + 0.01 * aux.aux_loss + 1e-3 * aux.z_loss, (mse, aux)

  @jax.jit
  def step(params, opt_state):
    (loss, (mse, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mse, aux

  print(f"\ntraining a top-2 MoE layer ({num_experts} experts) on a toy regression:")
  start = time.perf_counter()
  for i in range(steps):
    params, opt_state, mse, aux = step(params, opt_state)
    if i % max(steps // 5, 1) == 0 or i == steps - 1:
      print(f"  step {i:3d}  mse {float(mse):.4f}  aux {float(aux.aux_loss):.4f}  "
            f"z {float(aux.z_loss):.4f}  dropped {100 * float(aux.metrics['dropped_fraction']):.1f}%")
  print(f"  {steps} steps in {time.perf_counter() - start:.1f}s")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=512, help="multiple of 64")
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  from moe_jax import checks  # pylint: disable=g-import-not-at-top
  for name in ("experts", "tokens", "steps"):
    checks.exit_on_setting_error(checks.integer, f"--{name}", getattr(args, name), 1)
  if args.experts < 2:
    raise SystemExit("error: --experts must be >= 2 (top-2 routers), got "
                     f"{args.experts}.")
  if args.tokens % 64:
    raise SystemExit(f"error: --tokens must be a multiple of 64 (sequences of 64), got "
                     f"{args.tokens}.")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.experts} experts, "
        f"{args.tokens} tokens (8 padding per sequence of 64)\n")
  route_all(args.experts, args.tokens)
  train_toy(args.experts, args.tokens, args.steps)


if __name__ == "__main__":
  main()
