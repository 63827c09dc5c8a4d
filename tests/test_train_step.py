"""The train step: gradient accumulation equals one big batch; the non-finite guard."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax import train_step as ts
from moe_jax.model import DecoderOnlyLM

from test_model import VOCAB, tiny  # pylint: disable=g-bad-import-order


def _setup(batch_rows=4, length=12):
  # Routing groups are per sequence, so splitting the rows into slices changes no routing.
  lm = DecoderOnlyLM(tiny(), aux_loss_weight=0.01, router_z_loss_weight=0.001)
  rng = np.random.default_rng(0)
  targets = rng.integers(1, VOCAB, (batch_rows, length)).astype(np.int32)
  batch = {"decoder_target_tokens": targets,
           "decoder_input_tokens": np.roll(targets, 1, axis=1),
           "decoder_loss_weights": np.ones((batch_rows, length), np.float32)}
  variables = nn.meta.unbox(lm.module.init(jax.random.PRNGKey(1), jnp.asarray(targets)))
  tx = optax.sgd(1.0)  # the update is minus the gradient, so params compare gradients
  return lm, tx, ts.TrainState.create(variables, tx), batch


def test_microbatches_give_the_big_batch_gradient():
  lm, tx, state, batch = _setup()
  step = lambda m: jax.jit(lambda s, b: ts.train_step(lm, tx, s, b, jax.random.PRNGKey(0),
                                                      microbatches=m))
  one, metrics_one = step(1)(state, batch)
  two, metrics_two = step(2)(state, batch)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(metrics_one["loss/cross_entropy"],
                             metrics_two["loss/cross_entropy"], rtol=1e-5)
  assert float(metrics_two["num_tokens"]) == batch["decoder_loss_weights"].size


def test_nonfinite_step_leaves_the_state_unchanged_but_counts_the_step():
  lm, tx, state, batch = _setup()
  batch["decoder_loss_weights"][0, 0] = np.nan
  new, metrics = jax.jit(lambda s, b: ts.train_step(lm, tx, s, b, jax.random.PRNGKey(0)))(
      state, batch)
  assert bool(metrics["nonfinite"]) and int(new.step) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
