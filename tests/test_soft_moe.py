"""Soft MoE against plain numpy, and where it is refused."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from moe_jax import config, moe_layer, params
from moe_jax.soft_moe import SoftRouter

G, S, H, E, P, F = 4, 8, 12, 3, 2, 10


def numpy_soft_moe(p, x, mask, activation, normalize=True):
  """Group by group: slots = softmax-over-real-tokens mixtures, outputs = softmax-over-slots
  mixtures of the experts' slot outputs; padding feeds nothing and gets 0."""
  phi = p["router"]["slots"].reshape(H, E * P)
  if normalize:
    phi = p["router"]["scale"] * phi / np.sqrt((phi**2).sum(0, keepdims=True) + 1e-6)
  y = np.zeros((G, S, H))
  for g in range(G):
    xg = np.asarray(x[g], np.float64)
    xn = xg / np.sqrt((xg**2).sum(-1, keepdims=True) + 1e-6) if normalize else xg
    logits = xn @ phi  # [S, E·P]
    real = mask[g] > 0
    if not real.any():
      continue
    slots = np.stack([ref.softmax(logits[real, j]) @ xg[real] for j in range(E * P)])
    out = np.stack([ref.expert_ffn(slots[j], j // P, p["experts"], activation)
                    for j in range(E * P)])
    for s in np.flatnonzero(real):
      y[g, s] = ref.softmax(logits[s]) @ out
  return y


def _layer(**kwargs):
  return moe_layer.MoeLayer(SoftRouter(slots_per_expert=P), E, F, activation="swiglu",
                            dispatch="einsum", group_size=S, **kwargs)


@pytest.mark.parametrize("normalize", [True, False])
def test_soft_moe_matches_numpy(normalize):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 2 * S, H))
  mask = np.ones((2, 2 * S), np.float32)
  mask[0, 3] = 0
  mask[1, S:] = 0  # group 3 is all padding
  layer = moe_layer.MoeLayer(SoftRouter(slots_per_expert=P, normalize=normalize), E, F,
                             activation="swiglu", dispatch="einsum", group_size=S)
  variables = jax.jit(layer.init, static_argnums=3)(jax.random.PRNGKey(1), x, jnp.asarray(mask),
                                                    True)
  (y, aux), records = jax.jit(lambda v: layer.apply(v, x, jnp.asarray(mask), False,
                                                    mutable=[moe_layer.ROUTING_RECORDS]))(variables)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(variables["params"]))
  want = numpy_soft_moe(p, np.asarray(x).reshape(G, S, H), mask.reshape(G, S), "swiglu",
                        normalize)
  np.testing.assert_allclose(y, want.reshape(y.shape), rtol=1e-5, atol=1e-6)
  m = aux.metrics
  assert int(m["capacity"]) == P and float(m["dropped_fraction"]) == 0.0
  assert float(aux.aux_loss) == 0.0 and float(aux.z_loss) == 0.0
  np.testing.assert_allclose(m["expert_load_after"], np.full(E, mask.sum()))
  record = records[moe_layer.ROUTING_RECORDS]["record"][0]
  status = np.asarray(record["status"])
  assert (status[mask > 0] == moe_layer.KEPT).all() and (status[mask == 0] == -1).all()
  grad = jax.jit(jax.grad(lambda v: jnp.sum(layer.apply(v, x, jnp.asarray(mask), False)[0]**2)))
  assert np.isfinite(grad(variables)["params"]["router"]["slots"].value).all()


def test_soft_moe_is_refused_where_it_does_not_apply():
  with pytest.raises(ValueError, match=r"slots_per_expert must be >= 1, got 0"):
    SoftRouter(slots_per_expert=0)
  with pytest.raises(ValueError, match=r"dispatch='gather' does not apply to SoftRouter \(kind "
                                       r"'soft'\); it supports dispatch in \('einsum',\)"):
    moe_layer.MoeLayer(SoftRouter(), E, F, dispatch="gather")
  lm = config.load_model(["gin_configs/models/switch_base_decoder_only_tiny.gin",
                          "gin_configs/layers/soft_moe.gin"])
  layer = lm.module.sparse_sublayers()["moe"]
  assert layer.experts_per_token(64) == 8 * 1 / 64  # E · p / S
  with pytest.raises(ValueError, match=r"the moe sub-layer's router \(SoftRouter\) mixes tokens "
                                       r"across the sequence"):
    params.param_shapes(lm.module, 16)
