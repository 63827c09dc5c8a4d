"""The encoder-decoder: T5 buckets against transformers, cached decoding against the full
pass, packing against separate rows, routing placement and refusals, losses over both stacks."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import encoder_decoder as ed
from moe_jax import positions
from moe_jax.moe_layer import MoeLayer
from moe_jax.routing import ExpertChoiceRouter, TokenChoiceRouter
from moe_jax.soft_moe import SoftRouter


def moe(router=None, dispatch="gather", **kw):
  # An eval capacity of a whole group: nothing is dropped, so any split of the tokens into
  # calls (cached steps, packed rows) routes the same.
  return functools.partial(MoeLayer, router=router or TokenChoiceRouter(1), num_experts=4,
                           expert_hidden_dim=16, dispatch=dispatch, eval_capacity_factor=4.0,
                           **kw)


def tiny(**kw):
  # One layer a stack, sparse: the fastest compile that still has every sub-layer.
  settings = dict(vocab_size=64, d_model=32, num_heads=4, mlp_dim=32, num_encoder_layers=1,
                  num_decoder_layers=1, encoder_moe_layer=moe(), decoder_moe_layer=moe(),
                  encoder_moe_every=1, decoder_moe_every=1)
  return ed.EncoderDecoder(**{**settings, **kw})


def init(module, length=8):
  return nn.meta.unbox(module.init(jax.random.PRNGKey(0), jnp.ones((1, length), jnp.int32)))


@pytest.mark.parametrize("bidirectional,buckets,distance", [(True, 32, 128), (False, 32, 128),
                                                            (True, 8, 20), (False, 10, 40)])
def test_relative_buckets_are_t5s(bidirectional, buckets, distance):
  torch = pytest.importorskip("torch")
  from transformers.models.switch_transformers import modeling_switch_transformers as hf
  rel = np.arange(-600, 601)
  theirs = hf.SwitchTransformersAttention._relative_position_bucket(
      torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets,
      max_distance=distance).numpy()
  np.testing.assert_array_equal(
      positions.relative_position_bucket(rel, bidirectional, buckets, distance), theirs)


@pytest.mark.parametrize("position_embedding", ["relative", "rope"])
def test_cached_decoding_equals_the_full_pass(position_embedding):
  module = tiny(position_embedding=position_embedding)
  variables = init(module)
  encoder_tokens = jnp.array([[5, 9, 3, 7, 2, 11, 0, 0], [4, 4, 8, 1, 6, 2, 9, 13]])
  tokens, step_logits = ed.generate(module, variables, encoder_tokens, max_new_tokens=6,
                                    temperature=1.0, rng=jax.random.PRNGKey(3))
  decoder_inputs = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tokens[:, :-1]], 1)
  full, _ = jax.jit(module.apply)(variables, encoder_tokens, decoder_inputs)
  # float32 through 4 layers; the same ops in another order (cache vs whole sequence).
  np.testing.assert_allclose(step_logits, full, atol=2e-5, rtol=0)


def test_packed_rows_equal_separate_rows():
  """Two examples packed in one row (segments, per-segment positions) give each the logits it
  gets alone: self-, cross-attention and the relative buckets all stay in the segment."""
  module = tiny()
  variables = init(module)
  enc = [np.array([5, 9, 3, 7, 2]), np.array([4, 8, 1])]
  dec = [np.array([0, 12, 17, 3]), np.array([0, 6, 21])]

  def packed(parts, length=10):
    tokens, seg, pos = (np.zeros((1, length), np.int32) for _ in range(3))
    start = 0
    for i, p in enumerate(parts, 1):
      tokens[0, start:start + len(p)], seg[0, start:start + len(p)] = p, i
      pos[0, start:start + len(p)] = np.arange(len(p))
      start += len(p)
    return tokens, seg, pos

  (et, es, ep), (dt, ds, dp) = packed(enc), packed(dec)
  apply = jax.jit(module.apply)
  logits, _ = apply(variables, et, dt, encoder_segment_ids=es, encoder_positions=ep,
                    decoder_segment_ids=ds, decoder_positions=dp)
  start = 0
  for e, d in zip(enc, dec):
    alone, _ = apply(variables, e[None], d[None])
    np.testing.assert_allclose(logits[0, start:start + len(d)], alone[0], atol=2e-5, rtol=0)
    start += len(d)


def test_decoder_refuses_non_causal_routing_and_the_encoder_takes_it():
  for router in (ExpertChoiceRouter(2), SoftRouter()):
    with pytest.raises(ValueError, match=r"decoder_moe_layer: its router \(\w+Router\) is not "
                                         "causal"):
      tiny(decoder_moe_layer=moe(router, dispatch="einsum"))
  dropless_priority = moe(TokenChoiceRouter(1, batch_prioritized=True),
                          dispatch="dropless")
  tiny(decoder_moe_layer=dropless_priority)  # no capacity: priority is causal
  module = tiny(encoder_moe_layer=moe(ExpertChoiceRouter(2), dispatch="einsum"))
  lm = ed.EncoderDecoderLM(module)
  variables = init(module)
  batch = {"encoder_input_tokens": jnp.array([[5, 9, 3, 7, 2, 11, 4, 1]]),
           "decoder_input_tokens": jnp.array([[0, 12, 17, 3]]),
           "decoder_target_tokens": jnp.array([[12, 17, 3, 1]])}
  grads = jax.jit(jax.grad(lambda p: lm.loss({**variables, "params": p}, batch)[0]))(
      variables["params"])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_losses_are_means_over_both_stacks_and_metrics_name_the_stack():
  module = tiny(num_encoder_layers=4, encoder_moe_every=2, num_decoder_layers=2)
  assert module.sparse_layer_ids() == {"encoder/moe": (1, 3), "decoder/moe": (0, 1)}
  lm = ed.EncoderDecoderLM(module, aux_loss_weight=0.5, router_z_loss_weight=0.25)
  variables = init(module)
  batch = {"encoder_input_tokens": jnp.array([[5, 9, 3, 7, 2, 11, 4, 1]]),
           "decoder_input_tokens": jnp.array([[0, 12, 17, 3]]),
           "decoder_target_tokens": jnp.array([[12, 17, 3, 1]])}
  total, metrics = jax.jit(functools.partial(lm.loss, deterministic=True))(variables, batch)
  per_layer = {loss: [float(metrics[f"{stack}/moe/layer_{i}/{loss}"])
                      for stack, ids in module.sparse_layer_ids().items()
                      for i in ids for stack in [stack.split("/")[0]]]
               for loss in ("aux_loss", "z_loss")}
  assert len(per_layer["aux_loss"]) == 4
  np.testing.assert_allclose(metrics["loss/aux_loss"], np.mean(per_layer["aux_loss"]), 1e-6)
  np.testing.assert_allclose(metrics["loss/router_z_loss"], np.mean(per_layer["z_loss"]), 1e-6)
  np.testing.assert_allclose(
      total, metrics["loss/cross_entropy"] + 0.5 * np.mean(per_layer["aux_loss"])
      + 0.25 * np.mean(per_layer["z_loss"]), rtol=1e-6)
  assert "encoder/moe/dropped_fraction" in metrics and "decoder/moe/layer_1/capacity" in metrics


def test_bad_settings_name_the_setting():
  with pytest.raises(ValueError, match="position_embedding must be one of"):
    tiny(position_embedding="alibi")
  with pytest.raises(ValueError, match=r"norm must be one of \('rms', 'layer'\), got 'batch'"):
    tiny(norm="batch")
  with pytest.raises(ValueError, match=r"moe_dense_ffn must be one of \('none', 'parallel', "
                     r"'sequential'\), got 'after'"):
    tiny(moe_dense_ffn="after")
  with pytest.raises(ValueError, match=r"token_dropout_rate must be in \[0, 1\), got 1.0"):
    moe(token_dropout_rate=1.0)()
  with pytest.raises(ValueError, match="num_decoder_layers must be >= 1"):
    tiny(num_decoder_layers=0)
  with pytest.raises(ValueError, match=r"encoder_moe_every / _offset / _layer_indices "
                     r"\(num_encoder_layers=2\): moe_layer_indices \[7\] are outside"):
    tiny(num_encoder_layers=2, encoder_moe_layer_indices=[1, 7])


def test_routing_records_of_each_stack():
  from moe_jax.analysis import recorder
  module = tiny(num_encoder_layers=4, encoder_moe_every=2)
  lm = ed.EncoderDecoderLM(module)
  variables = init(module)
  batch = {"encoder_input_tokens": np.array([[5, 9, 3, 7, 2, 11, 0, 0]]),
           "decoder_input_tokens": np.array([[0, 12, 17, 3, 0]]),
           "decoder_target_tokens": np.array([[12, 17, 3, 1, 0]])}
  apply_fn = recorder.make_apply_fn(lm)
  for sublayer, layers, tokens in (("encoder/moe", (1, 3), [5, 9, 3, 7, 2, 11]),
                                   ("decoder/moe", (0,), [0, 12, 17, 3])):
    records = recorder.record_routing(lm, variables, [batch], sublayer=sublayer,
                                      apply_fn=apply_fn)
    assert records.layer_ids == layers
    np.testing.assert_array_equal(records.token_id, tokens)
    assert records.expert.shape[:2] == (len(layers), len(tokens))
    assert ((records.expert >= 0) & (records.expert < 4)).all()
  with pytest.raises(ValueError, match=r"choose one of \('encoder/moe', 'decoder/moe'\)"):
    recorder.layer_settings(lm, "moe")
  lower = recorder.with_capacity_factor(lm, 0.5).module.sparse_sublayers()
  assert {k: v.eval_capacity_factor for k, v in lower.items()} == {"encoder/moe": 0.5,
                                                                   "decoder/moe": 0.5}
