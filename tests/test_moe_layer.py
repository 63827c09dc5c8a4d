"""The MoE layer end to end against naive numpy loops, and the dispatchers against each other."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import reference as ref
from moe_jax import moe_layer, routing

B, L, H, F, E = 2, 12, 16, 24, 6


def _inputs(seed=0, padding=True):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, L, H)).astype(np.float32)
  mask = np.ones((B, L), np.float32)
  if padding:
    mask[0, -4:] = 0
    mask[1, 5] = 0
  return x, mask


def _layer(router="token", k=2, dispatch="gather", activation="relu", cf=1.0, eval_cf=None,
           group_size=None, **kwargs):
  router_kwargs = {key: kwargs.pop(key) for key in list(kwargs)
                   if key in ("batch_prioritized", "normalize_combine_weights",
                              "second_expert_policy", "jitter_noise")}
  if router == "token":
    r = routing.TokenChoiceRouter(k, **router_kwargs)
  else:
    r = routing.ExpertChoiceRouter(k)
  return moe_layer.MoeLayer(r, E, F, activation=activation, dispatch=dispatch,
                            train_capacity_factor=cf, eval_capacity_factor=eval_cf or cf,
                            min_capacity=1, group_size=group_size, **kwargs)


def _init(layer, x, mask):
  return layer.init({"params": jax.random.PRNGKey(0)}, x, mask, True)


def _np_params(variables):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(variables["params"]))


def _reference(layer, variables, x, mask, deterministic=True):
  """Naive numpy MoE output: same grouping, routing from SPEC §2, per-token expert loops."""
  params = _np_params(variables)
  s = layer.group_size or x.shape[1]
  xg = np.asarray(x, np.float64).reshape(-1, s, x.shape[-1])
  mg = np.asarray(mask).reshape(-1, s)
  logits = xg @ params["router"]["logits"]["kernel"]
  k = layer.router.num_selected_experts
  cf = layer.eval_capacity_factor if deterministic else layer.train_capacity_factor
  cap = None if layer.dispatch == "dropless" else ref.capacity(s, E, k, cf, layer.min_capacity)
  if layer.router.kind == "expert_choice":
    r = ref.expert_choice(logits, cap, mg)
    y = ref.moe_output_expert_choice(xg, r, params["experts"], layer.activation)
  else:
    r = ref.token_choice(logits, k, cap, mg,
                         normalize=layer.router.normalize_combine_weights,
                         batch_prioritized=layer.router.batch_prioritized)
    y = ref.moe_output_token_choice(xg, r, params["experts"], layer.activation)
  return y.reshape(x.shape), r, logits


CASES = [
    dict(router="token", k=1, activation="relu", cf=1.0),
    dict(router="token", k=2, activation="swiglu", cf=0.7),
    dict(router="token", k=2, activation="gelu", cf=0.7, batch_prioritized=True,
         normalize_combine_weights=True),
    dict(router="token", k=3, activation="geglu", cf=1.0),
    dict(router="expert", k=2, activation="relu", cf=1.0),
    dict(router="expert", k=1, activation="swiglu", cf=0.5),
]


@pytest.mark.parametrize("dispatch", ["einsum", "gather", "dropless"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_layer_matches_numpy_reference(dispatch, case):
  if dispatch == "dropless" and case["router"] == "expert":
    pytest.skip("dropless is token-choice only (tested as an error below)")
  layer = _layer(dispatch=dispatch, **case)
  x, mask = _inputs()
  variables = _init(layer, x, mask)
  y, aux = layer.apply(variables, x, mask, True)
  want, r, logits = _reference(layer, variables, x, mask)
  np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(aux.z_loss, ref.z_loss(logits, mask.reshape(logits.shape[:2])),
                             rtol=1e-5)
  if case["router"] == "token" and dispatch != "dropless" and case["cf"] < 1:
    assert not r["kept"][mask.reshape(r["kept"].shape[:2]) > 0].all()  # drops exercised


def _loss_and_grads(layer, variables, x, mask, deterministic=True):
  cot = jax.random.normal(jax.random.PRNGKey(5), x.shape)

  def loss(params, x):
    y, aux = layer.apply({"params": params}, x, mask, deterministic)
    return jnp.sum(y * cot) + aux.aux_loss + aux.z_loss

  return jax.value_and_grad(loss, argnums=(0, 1))(variables["params"], x)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_dispatchers_agree_on_outputs_and_gradients(activation):
  # Capacity large enough (C = S) that dropless computes the same function.
  x, mask = _inputs(seed=1)
  results = {}
  for dispatch in ("einsum", "gather", "dropless"):
    layer = _layer(dispatch=dispatch, activation=activation, cf=float(E))
    variables = _init(layer, x, mask)
    results[dispatch] = _loss_and_grads(layer, variables, x, mask)
  (l0, g0) = results["einsum"]
  for name in ("gather", "dropless"):
    l1, g1 = results[name]
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)


def test_gather_and_einsum_agree_with_drops_and_expert_choice():
  x, mask = _inputs(seed=2)
  for case in (dict(router="token", k=2, cf=0.6, batch_prioritized=True),
               dict(router="expert", k=2, cf=0.8)):
    out = {}
    for dispatch in ("einsum", "gather"):
      layer = _layer(dispatch=dispatch, **case)
      out[dispatch] = _loss_and_grads(layer, _init(layer, x, mask), x, mask)
    np.testing.assert_allclose(out["gather"][0], out["einsum"][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 out["gather"][1], out["einsum"][1])


@pytest.mark.parametrize("dispatch", ["einsum", "gather", "dropless"])
def test_padding_takes_no_capacity_and_counts_in_no_statistic(dispatch):
  x, mask = _inputs(seed=3)
  layer = _layer(dispatch=dispatch, cf=0.7)
  variables = _init(layer, x, mask)
  y, aux = layer.apply(variables, x, mask, True)
  x2 = np.where(mask[..., None] > 0, x, 100.0 * np.random.default_rng(9).normal(size=x.shape))
  y2, aux2 = layer.apply(variables, x2.astype(np.float32), mask, True)
  np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)  # real tokens unaffected
  assert np.all(np.asarray(y)[mask == 0] == 0)  # padding gets no expert output
  for key in aux.metrics:
    np.testing.assert_allclose(aux2.metrics[key], aux.metrics[key], rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(aux2.aux_loss, aux.aux_loss, rtol=1e-6)
  np.testing.assert_allclose(aux2.z_loss, aux.z_loss, rtol=1e-6)
  assert float(jnp.sum(aux.metrics["expert_load_before"])) == 2 * mask.sum()


def test_metrics_match_reference():
  x, mask = _inputs(seed=4)
  layer = _layer(dispatch="gather", k=2, cf=0.6)
  variables = _init(layer, x, mask)
  _, aux = layer.apply(variables, x, mask, True)
  _, r, logits = _reference(layer, variables, x, mask)
  m = mask.reshape(r["kept"].shape[:2]) > 0
  selected = r["selected"][m].sum(0)
  kept = np.zeros(E)
  for g, s, j in zip(*np.nonzero(r["kept"])):
    kept[r["expert"][g, s, j]] += 1
  probs = r["scores"][m]
  np.testing.assert_allclose(aux.metrics["expert_load_before"], selected)
  np.testing.assert_allclose(aux.metrics["expert_load_after"], kept)
  np.testing.assert_allclose(aux.metrics["dropped_fraction"], 1 - kept.sum() / selected.sum(),
                             rtol=1e-6)
  routed = r["kept"].any(-1)[m]
  np.testing.assert_allclose(aux.metrics["unrouted_token_fraction"], 1 - routed.mean(), rtol=1e-6)
  np.testing.assert_allclose(aux.metrics["router_entropy"],
                             np.mean(-np.sum(probs * np.log(probs), -1)), rtol=1e-5)
  np.testing.assert_allclose(aux.metrics["router_confidence"], probs.max(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(aux.aux_loss, ref.aux_loss(r["scores"], r["selected"],
                                                        mask.reshape(m.shape)), rtol=1e-5)
  assert int(aux.metrics["capacity"]) == ref.capacity(L, E, 2, 0.6, 1)


def test_train_and_eval_capacity_factors_follow_deterministic():
  x, mask = _inputs()
  layer = _layer(cf=0.5, eval_cf=2.0, expert_dropout_rate=0.0)
  variables = _init(layer, x, mask)
  _, aux_eval = layer.apply(variables, x, mask, True)
  _, aux_train = layer.apply(variables, x, mask, False)
  assert int(aux_eval.metrics["capacity"]) == ref.capacity(L, E, 2, 2.0, 1)
  assert int(aux_train.metrics["capacity"]) == ref.capacity(L, E, 2, 0.5, 1)
  want, _, _ = _reference(layer, variables, x, mask, deterministic=False)
  y_train, _ = layer.apply(variables, x, mask, False)
  np.testing.assert_allclose(y_train, want, rtol=2e-4, atol=2e-5)


def test_group_size_and_pad_groups():
  x, mask = _inputs(seed=6)
  layer = _layer(group_size=8, cf=1.0)  # 24 tokens -> 3 groups of 8
  variables = _init(layer, x, mask)
  y, _ = layer.apply(variables, x, mask, True)
  want, _, _ = _reference(layer, variables, x, mask)
  np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)
  # 24 tokens in groups of 10: padded to 30, the 6 padding tokens change nothing.
  padded = _layer(group_size=10, cf=1.0, pad_groups=True)
  y, aux = padded.apply(variables, x, mask, True)
  assert float(jnp.sum(aux.metrics["expert_load_before"])) == 2 * mask.sum()
  xg = np.concatenate([x.reshape(-1, H), np.zeros((6, H), np.float32)]).reshape(3, 10, H)
  mg = np.concatenate([mask.reshape(-1), np.zeros(6, np.float32)]).reshape(3, 10)
  want, _, _ = _reference(_layer(group_size=10, cf=1.0), variables, xg, mg)
  np.testing.assert_allclose(y.reshape(-1, H), want.reshape(-1, H)[:24], rtol=2e-4, atol=2e-5)


def test_expert_dropout_is_training_only_and_unbiased():
  x, mask = _inputs()
  layer = _layer(cf=2.0, expert_dropout_rate=0.5)
  variables = _init(layer, x, mask)
  y_eval, _ = layer.apply(variables, x, mask, True)
  want, _, _ = _reference(layer, variables, x, mask)
  np.testing.assert_allclose(y_eval, want, rtol=2e-4, atol=2e-5)
  train = jax.jit(lambda key: layer.apply(variables, x, mask, False, rngs={"dropout": key})[0])
  draws = np.stack([np.asarray(train(jax.random.PRNGKey(i))) for i in range(400)])
  assert not np.allclose(draws[0], y_eval)
  # Inverted dropout on the hidden units: the mean over draws is the eval output.
  err = np.abs(draws.mean(0) - np.asarray(y_eval))
  assert np.max(err / (draws.std(0) / np.sqrt(len(draws)) + 1e-6)) < 5.0
  # Hidden-unit dropout (not output dropout): a draw is not a per-token scaling of y_eval.
  real = mask > 0
  ratio = np.asarray(draws[0])[real] / np.asarray(y_eval)[real]
  assert np.std(ratio, axis=-1).max() > 0.1


@pytest.mark.parametrize("dispatch", ["einsum", "gather", "dropless"])
def test_bfloat16_activations_keep_float32_router(dispatch):
  x, mask = _inputs()
  layer = _layer(cf=2.0, dtype=jnp.bfloat16, dispatch=dispatch)
  variables = _init(layer, jnp.asarray(x, jnp.bfloat16), mask)
  y, aux = layer.apply(variables, jnp.asarray(x, jnp.bfloat16), mask, True)
  assert y.dtype == jnp.bfloat16 and aux.z_loss.dtype == jnp.float32
  want, _, _ = _reference(layer, variables, x, mask)
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=0.05, atol=0.05)


def test_sharded_batch_gives_unsharded_result():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, L, H)).astype(np.float32)
  mask = np.ones((8, L), np.float32)
  layer = _layer(cf=1.0)
  variables = _init(layer, x, mask)
  apply = jax.jit(lambda v, x, m: layer.apply(v, x, m, True)[0])
  want = apply(variables, x, mask)
  sharding = NamedSharding(mesh, P("data"))
  got = apply(variables, jax.device_put(x, sharding), jax.device_put(mask, sharding))
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


BAD_SETTINGS = [
    (lambda: moe_layer.MoeLayer(routing.TokenChoiceRouter(5), 4, F),
     r"num_selected_experts .*\[1, num_experts=4\].*5"),
    (lambda: routing.TokenChoiceRouter(0), r"num_selected_experts \(top-k\) must be >= 1, got 0"),
    (lambda: moe_layer.MoeLayer(routing.ExpertChoiceRouter(6), 4, F), r"num_selected_experts"),
    (lambda: moe_layer.MoeLayer(routing.TokenChoiceRouter(2), 0, F), r"num_experts must be >= 1"),
    (lambda: routing.TokenChoiceRouter(2, score_function="tanh"), r"score_function must be one "
     r"of \('softmax', 'sigmoid'\)"),
    (lambda: routing.TokenChoiceRouter(2, second_expert_policy="x"), r"second_expert_policy"),
    (lambda: _layer(cf=0.0), r"train_capacity_factor must be finite and > 0, got 0.0"),
    (lambda: _layer(cf=1.0, eval_cf=-1.0), r"eval_capacity_factor must be finite and > 0"),
    (lambda: _layer(cf=float("nan")), r"train_capacity_factor must be finite and > 0, got nan"),
    (lambda: _layer(expert_dropout_rate=1.0), r"expert_dropout_rate must be in \[0, 1\)"),
    (lambda: _layer(activation="tanh"),
     r"activation must be one of \('relu', 'gelu', 'swiglu', 'geglu'\), got 'tanh'"),
    (lambda: _layer(dispatch="scatter"),
     r"dispatch must be one of \('einsum', 'gather', 'dropless'\), got 'scatter'"),
    (lambda: _layer(router="expert", dispatch="dropless"), r"dispatch='dropless' does not apply to ExpertChoiceRouter \(kind 'expert_choice'\); it "
     r"supports dispatch in \('einsum', 'gather'\)"),
    (lambda: _layer(expert_implementation="magic"), r"expert_implementation must be one of"),
    (lambda: _layer(group_size=0), r"group_size must be >= 1"),
]


@pytest.mark.parametrize("make,message", BAD_SETTINGS)
def test_bad_settings_raise_clear_errors_at_construction(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_group_size_not_dividing_tokens_raises_before_compilation():
  x, mask = _inputs()
  layer = _layer(group_size=5)  # 24 tokens
  # eval_shape only traces: the error comes before anything reaches XLA.
  with pytest.raises(ValueError, match=r"group_size=5 does not divide the 24 tokens.*pad_groups"):
    jax.eval_shape(lambda: _init(layer, x, mask))


@pytest.mark.parametrize("dispatch", ["gather", "dropless"])
def test_expert_implementations_agree_inside_the_layer(dispatch):
  x, mask = _inputs(seed=7)
  out = {}
  for impl in ("reference", "loop"):
    layer = _layer(dispatch=dispatch, activation="swiglu", cf=0.8, expert_implementation=impl)
    out[impl] = _loss_and_grads(layer, _init(layer, x, mask), x, mask)
  np.testing.assert_allclose(out["loop"][0], out["reference"][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               out["loop"][1], out["reference"][1])


def test_all_padding_batch_reports_zero_statistics():
  x, _ = _inputs()
  mask = np.zeros((B, L), np.float32)
  for dispatch, router in (("gather", "token"), ("dropless", "token"), ("gather", "expert")):
    layer = _layer(dispatch=dispatch, router=router)
    y, aux = layer.apply(_init(layer, x, mask), x, mask, True)
    assert np.all(np.asarray(y) == 0)
    for key, value in aux.metrics.items():
      if key != "capacity":
        assert np.all(np.asarray(value) == 0), (dispatch, router, key, value)
    assert float(aux.aux_loss) == 0 and float(aux.z_loss) == 0


def test_k_equal_to_num_experts():
  x, mask = _inputs(seed=8)
  layer = _layer(k=E, cf=1.0, normalize_combine_weights=True)
  variables = _init(layer, x, mask)
  y, aux = layer.apply(variables, x, mask, True)
  want, _, _ = _reference(layer, variables, x, mask)
  np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)
  assert float(aux.metrics["dropped_fraction"]) == 0.0  # C = S: every expert takes every token


def test_training_mode_with_every_rng_stream_and_bias_over_groups():
  """Jitter, noisy gating, random routing and the expert bias through the layer, G=3 groups."""
  x, mask = _inputs(seed=9)
  router = routing.TokenChoiceRouter(2, jitter_noise=0.1, noisy_gating=True,
                                     second_expert_policy="random", expert_bias_update_rate=0.01)
  layer = moe_layer.MoeLayer(router, E, F, group_size=8, train_capacity_factor=0.8, min_capacity=1,
                             expert_dropout_rate=0.1)
  variables = layer.init({"params": jax.random.PRNGKey(0)}, x, mask, True)
  rngs = {name: jax.random.PRNGKey(i) for i, name in
          enumerate(["jitter", "gating_noise", "routing", "dropout"])}
  (y, aux), state = layer.apply(variables, x, mask, False, rngs=rngs,
                                mutable=[routing.EXPERT_BIAS_COLLECTION])
  (y2, _), _ = layer.apply(variables, x, mask, False, rngs=rngs,
                           mutable=[routing.EXPERT_BIAS_COLLECTION])
  np.testing.assert_array_equal(y, y2)  # same RNG keys, same result
  assert np.all(np.isfinite(np.asarray(y)))
  y_eval, _ = layer.apply(variables, x, mask, True)
  assert not np.allclose(y, y_eval)
  # The bias moves by rate · sign(mean load − load), loads summed over all groups.
  load = np.asarray(aux.metrics["expert_load_before"])
  np.testing.assert_allclose(state[routing.EXPERT_BIAS_COLLECTION]["router"]["expert_bias"],
                             0.01 * np.sign(load.mean() - load), atol=1e-7)
  assert load.sum() == 2 * mask.sum()
  assert 0 < float(aux.metrics["random_routing_skipped_fraction"]) < 0.5


def test_bad_input_shapes_raise_clear_errors():
  x, mask = _inputs()
  layer = _layer()
  with pytest.raises(ValueError, match=r"padding_mask must have shape \[batch, length\]"):
    jax.eval_shape(lambda: _init(layer, x, mask[:, :-1]))
  with pytest.raises(ValueError, match=r"expects x of shape \[batch, length, d_model\]"):
    jax.eval_shape(lambda: _init(layer, x[0], mask))


class HashRouter(routing.Router):
  """A router written against the contract alone: token s of a group goes to expert s mod E
  (a hash layer in miniature), gate 1. Nothing else in the library knows about it."""
  num_selected_experts = 1
  kind = "hash"

  @nn.compact
  def __call__(self, x, padding_mask, num_experts, capacity, deterministic):
    g, s, _ = x.shape
    expert = jnp.broadcast_to((jnp.arange(s) % num_experts)[None, :, None], (g, s, 1))
    valid = (jnp.ones((g, s), bool) if padding_mask is None else padding_mask > 0)[..., None]
    position = routing.queue_positions(expert, valid, num_experts)
    kept = valid if capacity is None else valid & (position < capacity)
    one_hot = jax.nn.one_hot(expert[..., 0], num_experts) * valid
    zero = jnp.zeros((), jnp.float32)
    return routing.RouterOutput(
        routing=routing.TokenChoiceRouting(expert.astype(jnp.int32), kept.astype(jnp.float32),
                                           position, kept),
        logits=jnp.zeros(one_hot.shape), probs=jax.nn.one_hot(expert[..., 0], num_experts),
        selected=one_hot, admitted=one_hot, kept=one_hot * kept, aux_loss=zero, z_loss=zero)


@pytest.mark.parametrize("dispatch", ["einsum", "gather", "dropless"])
def test_a_router_written_against_the_contract_runs_every_dispatch(dispatch):
  x, mask = _inputs()
  layer = moe_layer.MoeLayer(HashRouter(), E, F, activation="relu", dispatch=dispatch,
                             train_capacity_factor=4.0, eval_capacity_factor=4.0)
  variables = _init(layer, x, mask)
  y, aux = jax.jit(lambda v: layer.apply(v, x, mask, True))(variables)
  weights = _np_params(variables)["experts"]
  want = np.zeros(x.shape)
  for b, t in zip(*np.nonzero(mask)):
    want[b, t] = ref.expert_ffn(np.asarray(x[b, t], np.float64), t % E, weights, "relu")
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(aux.metrics["dropped_fraction"]) == 0.0


def test_a_router_must_declare_its_kind():
  class Unlabelled(routing.Router):
    num_selected_experts = 1

  with pytest.raises(TypeError, match=r"Unlabelled must set the class attribute `kind`"):
    Unlabelled()
