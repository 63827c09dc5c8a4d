"""Sparse upcycling: at step 0 the upcycled MoE model computes the dense model's function when
every token reaches its experts with gates summing to 1; sharded as the target mesh says; a
dense checkpoint that does not fit is refused, naming the tensor."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import checks, checkpoints, encoder_decoder as ed, partitioning as part
from moe_jax import upcycling
from moe_jax.model import Decoder
from moe_jax.moe_layer import MoeLayer
from moe_jax.routing import TokenChoiceRouter
from moe_jax.train_step import TrainState

TOKENS = jnp.asarray(np.arange(1, 33).reshape(2, 16) * 7 % 97 + 1)


def moe(k):
  # Dropless and renormalised: every token reaches its k experts with gates summing to 1, so k
  # identical copies of the dense FFN give exactly the dense FFN.
  return functools.partial(MoeLayer, router=TokenChoiceRouter(k, normalize_combine_weights=True),
                           num_experts=4, expert_hidden_dim=48, dispatch="dropless",
                           activation="swiglu")


def decoder(**kw):
  return Decoder(**{**dict(vocab_size=100, num_layers=2, d_model=32, num_heads=4, mlp_dim=48),
                    **kw})


def save_dense(module, path, step=7, shapes_only=False):
  """A dense run's checkpoint of `module`; shapes_only: zeros (the checks read shapes only)."""
  if shapes_only:
    shapes = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), TOKENS)
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes))
  else:
    variables = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), TOKENS))
  with checkpoints.Checkpointer(str(path)) as saver:
    saver.save(step, TrainState.create(variables, optax.adam(1e-3)), {})
  return variables


def upcycled(module, path, mesh=None):
  """The MoE module initialised (sharded over `mesh`) and upcycled from `path`."""
  mesh = mesh or part.make_mesh(data=1, model=1, devices=jax.devices()[:1])
  rules = part.standard_rules()
  variables = nn.meta.unbox(part.init_sharded(module, mesh, rules, TOKENS,
                                              rng=jax.random.PRNGKey(5)))
  shardings = nn.meta.unbox(part.logical_shardings(
      jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), TOKENS), mesh, rules))
  fresh = jax.tree.map(np.asarray, variables)  # (upcycle donates the fresh params)
  params, step = upcycling.upcycle(str(path), variables["params"], shardings["params"])
  assert step == 7
  return {**variables, "params": params}, fresh


@pytest.mark.parametrize("dense_scan,moe_scan", [(False, True), (True, False)])
def test_upcycled_decoder_computes_the_dense_function(tmp_path, dense_scan, moe_scan):
  dense = decoder(scan_layers=dense_scan)
  dense_vars = save_dense(dense, tmp_path)
  sparse = decoder(scan_layers=moe_scan, moe_layer=moe(2), moe_every=2)
  variables, fresh = upcycled(sparse, tmp_path)
  want, _ = jax.jit(dense.apply)(dense_vars, TOKENS)
  got, _ = jax.jit(sparse.apply)(variables, TOKENS)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  layer = (lambda p: p["layers"]["block_1"]) if moe_scan else (lambda p: p["layers_1"])
  np.testing.assert_array_equal(layer(variables["params"])["moe"]["router"]["logits"]["kernel"],
                                layer(fresh["params"])["moe"]["router"]["logits"]["kernel"])


def test_upcycled_encoder_decoder_computes_the_dense_function(tmp_path):
  settings = dict(vocab_size=100, d_model=32, num_heads=4, mlp_dim=48, num_encoder_layers=1,
                  num_decoder_layers=1, activation="swiglu", encoder_moe_every=1,
                  decoder_moe_every=1)
  dense = ed.EncoderDecoder(**settings)
  dense_vars = save_dense(dense, tmp_path)
  sparse = ed.EncoderDecoder(**settings, encoder_moe_layer=moe(1), decoder_moe_layer=moe(1))
  variables, _ = upcycled(sparse, tmp_path)
  decoder_tokens = TOKENS[:, :8]
  want, _ = jax.jit(dense.apply)(dense_vars, TOKENS, decoder_tokens)
  got, _ = jax.jit(sparse.apply)(variables, TOKENS, decoder_tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_upcycled_experts_are_sharded_as_the_target_mesh_says(tmp_path):
  dense_vars = save_dense(decoder(), tmp_path)
  mesh = part.make_mesh(data=2, expert=4, model=1)
  sparse = decoder(moe_layer=moe(2), moe_every=2)
  variables, _ = upcycled(sparse, tmp_path, mesh)
  wi = variables["params"]["layers_1"]["moe"]["experts"]["wi"]  # [E, H, F], E over `expert`
  assert wi.sharding.spec[0] == "expert" and wi.sharding.shard_shape(wi.shape)[0] == 1
  dense_wi = np.asarray(dense_vars["params"]["layers_1"]["mlp"]["wi"])
  for shard in wi.addressable_shards:  # each device holds its expert: the dense FFN
    np.testing.assert_array_equal(np.asarray(shard.data)[0], dense_wi)


def test_a_dense_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path):
  save_dense(decoder(mlp_dim=64), tmp_path / "wide", shapes_only=True)
  sparse = decoder(moe_layer=moe(2), moe_every=2)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda t: sparse.init(jax.random.PRNGKey(0), t), TOKENS))["params"]
  with pytest.raises(checks.SettingError, match=r"the dense checkpoint's layers_0/mlp/wi is "
                     r"\[32, 64\] per layer but the MoE model's layers_0/mlp/wi needs \[32, 48\]"):
    upcycling.check(abstract, str(tmp_path / "wide"))
  save_dense(decoder(num_layers=4), tmp_path / "deep", shapes_only=True)
  with pytest.raises(checks.SettingError, match=r"the dense checkpoint's layers_2/attention/key "
                     "has no place in the MoE model"):
    upcycling.check(abstract, str(tmp_path / "deep"))
  with pytest.raises(checks.SettingError, match="no committed checkpoint"):
    upcycling.check(abstract, str(tmp_path / "nothing"))
  # Scanned dense checkpoints: layers are rows of one stacked array, counted as well.
  save_dense(decoder(num_layers=4, scan_layers=True), tmp_path / "deep_scanned", shapes_only=True)
  with pytest.raises(checks.SettingError, match=r"the dense checkpoint's "
                     r"layers/block_0/attention/key \(layer rows \[2, 3\]\) has no place"):
    upcycling.check(abstract, str(tmp_path / "deep_scanned"))
  save_dense(decoder(num_layers=1, scan_layers=True), tmp_path / "shallow_scanned", shapes_only=True)
  with pytest.raises(checks.SettingError, match=r"needs layer row 1 of the dense checkpoint's "
                     r"layers/block_0/.*, which has 1: the dense model has fewer layers"):
    upcycling.check(abstract, str(tmp_path / "shallow_scanned"))
  residual = decoder(moe_layer=moe(2), moe_every=2, moe_dense_ffn="parallel")
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda t: residual.init(jax.random.PRNGKey(0), t), TOKENS))["params"]
  save_dense(decoder(), tmp_path / "dense", shapes_only=True)
  with pytest.raises(checks.SettingError, match="would both copy the dense FFN"):
    upcycling.check(abstract, str(tmp_path / "dense"))
