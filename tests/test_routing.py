"""Routers against the plain-numpy references in reference.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from moe_jax import routing

G, S, H, E = 2, 24, 16, 6


def _inputs(seed=0, padding=True):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(G, S, H)).astype(np.float32)
  mask = np.ones((G, S), np.float32)
  if padding:
    mask[0, -5:] = 0  # padding at the end of group 0
    mask[1, 3] = 0  # and a hole in group 1
  return x, mask


def _run(router, x, mask, capacity, deterministic=True, rngs=None, mutable=False,
         variables=None, num_experts=E):
  if variables is None:
    variables = router.init({"params": jax.random.PRNGKey(1)}, x, mask, num_experts, capacity,
                            True)
  out = router.apply(variables, x, mask, num_experts, capacity, deterministic, rngs=rngs or {},
                     mutable=mutable)
  return out, variables


def _logits(variables, x, name="logits"):
  kernel = np.asarray(nn.meta.unbox(variables["params"][name]["kernel"]), np.float64)
  return np.asarray(x, np.float64) @ kernel


def test_capacity_formula_counts_k():
  # C = max(ceil(cf·k·S/E), min_capacity), clipped to S.
  assert routing.compute_capacity(4096, 64, 2, 1.25, 4) == 160
  assert routing.compute_capacity(4096, 64, 1, 1.25, 4) == 80
  assert routing.compute_capacity(10, 8, 2, 1.0, 4) == 4  # ceil(2.5)=3 < min_capacity
  assert routing.compute_capacity(8, 2, 2, 2.0, 4) == 8  # 16 clipped to S
  assert routing.compute_capacity(100, 3, 2, 1.1, 0) == 74  # ceil(73.33)
  for args in [(37, 5, 2, 1.3, 1), (512, 128, 2, 0.5, 0), (64, 8, 3, 2.0, 2)]:
    assert routing.compute_capacity(*args) == ref.capacity(*args)


@pytest.mark.parametrize("k,normalize,bpr,cf", [
    (1, False, False, 1.0),
    (2, False, False, 1.0),
    (2, True, False, 0.6),
    (2, False, True, 0.6),
    (3, True, True, 0.8),
    (2, False, False, None),  # no capacity (dropless)
])
def test_token_choice_matches_reference(k, normalize, bpr, cf):
  x, mask = _inputs()
  capacity = None if cf is None else routing.compute_capacity(S, E, k, cf, 1)
  router = routing.TokenChoiceRouter(k, batch_prioritized=bpr,
                                     normalize_combine_weights=normalize)
  out, variables = _run(router, x, mask, capacity)
  want = ref.token_choice(_logits(variables, x), k, capacity, mask, normalize=normalize,
                          batch_prioritized=bpr)
  r = out.routing
  np.testing.assert_array_equal(r.expert_index, want["expert"])
  np.testing.assert_array_equal(r.kept, want["kept"])
  np.testing.assert_array_equal(np.where(want["kept"], r.position, -1),
                                np.where(want["kept"], want["position"], -1))
  np.testing.assert_allclose(r.combine_weights, want["gate"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.probs, want["scores"], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(out.selected, want["selected"])
  if cf is not None and cf < 1:
    assert not want["kept"][mask > 0].all(), "the test should exercise capacity drops"
  np.testing.assert_allclose(out.aux_loss, ref.aux_loss(want["scores"], want["selected"], mask),
                             rtol=1e-5)
  np.testing.assert_allclose(out.z_loss, ref.z_loss(_logits(variables, x), mask), rtol=1e-5)


def test_first_choices_have_priority_over_second_choices():
  # Every token's top-1 is expert 0 and top-2 is expert 1, except the last token whose top-1 is
  # expert 1: with capacity 3, that late first choice must displace earlier second choices.
  s = 4
  logits = np.full((1, s, 3), -5.0, np.float32)
  logits[0, :, 0], logits[0, :, 1] = 2.0, 1.0
  logits[0, -1, 0], logits[0, -1, 1] = 1.0, 2.0
  mask = np.ones((1, s), np.float32)
  expert = np.asarray(jax.lax.top_k(jnp.asarray(logits), 2)[1])
  pos = routing.queue_positions(jnp.asarray(expert), jnp.ones(expert.shape, bool), 3)
  want = ref.token_choice(logits, 2, 3, mask)
  np.testing.assert_array_equal(np.asarray(pos)[want["kept"]], want["position"][want["kept"]])
  assert want["position"][0, -1, 0] == 0  # the late first choice queues first at expert 1
  assert not want["kept"][0, 2, 1]  # the third token's second choice is dropped


def test_expert_choice_matches_reference():
  x, mask = _inputs(padding=True)
  mask[0, :-3] = 0  # group 0: only 3 real tokens, fewer than C, so some slots are invalid
  capacity = routing.compute_capacity(S, E, 2, 1.0, 1)
  router = routing.ExpertChoiceRouter(2)
  out, variables = _run(router, x, mask, capacity)
  want = ref.expert_choice(_logits(variables, x), capacity, mask)
  r = out.routing
  np.testing.assert_array_equal(r.valid, want["valid"])
  np.testing.assert_array_equal(np.where(want["valid"], r.token_index, -1),
                                np.where(want["valid"], want["token"], -1))
  np.testing.assert_allclose(r.combine_weights, want["weight"], rtol=1e-5, atol=1e-7)
  assert float(out.aux_loss) == 0.0
  np.testing.assert_allclose(out.z_loss, ref.z_loss(_logits(variables, x), mask), rtol=1e-5)


def test_losses_against_reference_and_perfect_balance():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 10, 4)).astype(np.float32)
  mask = (rng.random((3, 10)) > 0.3).astype(np.float32)
  mask[2] = 0  # a group with no real tokens is left out
  probs = np.stack([[ref.softmax(l) for l in grp] for grp in logits])
  selected = np.zeros_like(probs)
  top = np.argsort(-probs, axis=-1)[..., :2]
  np.put_along_axis(selected, top, 1.0, axis=-1)
  np.testing.assert_allclose(routing.load_balancing_loss(probs, selected, mask),
                             ref.aux_loss(probs, selected, mask), rtol=1e-5)
  np.testing.assert_allclose(routing.router_z_loss(logits, mask), ref.z_loss(logits, mask),
                             rtol=1e-5)
  # Perfect balance: uniform probs and each expert chosen equally often -> exactly 1.
  uniform = np.full((1, 8, 4), 0.25, np.float32)
  balanced = np.eye(4, dtype=np.float32)[np.arange(8) % 4][None]
  assert float(routing.load_balancing_loss(uniform, balanced)) == pytest.approx(1.0)
  # Collapse onto one expert with confident probs -> E.
  collapsed = np.zeros((1, 8, 4), np.float32)
  collapsed[..., 0] = 1.0
  assert float(routing.load_balancing_loss(collapsed, collapsed)) == pytest.approx(4.0)


def test_jitter_is_multiplicative_uniform_and_training_only():
  eps = 0.2
  x = np.zeros((1, 2000, 4), np.float32)
  x[..., 0] = 1.0  # one feature: logits = u · W[0], so u = logits / W[0]
  router = routing.TokenChoiceRouter(1, jitter_noise=eps)
  eval_out, variables = _run(router, x, None, None, num_experts=3)
  train_out, _ = _run(router, x, None, None, deterministic=False,
                      rngs={"jitter": jax.random.PRNGKey(7)}, variables=variables, num_experts=3)
  w0 = np.asarray(nn.meta.unbox(variables["params"]["logits"]["kernel"]))[0]
  np.testing.assert_allclose(eval_out.logits, np.broadcast_to(w0, (1, 2000, 3)), rtol=1e-6)
  u = np.asarray(train_out.logits) / w0
  assert u.min() >= 1 - eps - 1e-6 and u.max() <= 1 + eps + 1e-6
  assert np.allclose(u, u[..., :1])  # one factor per input element, shared by all experts
  assert abs(u.mean() - 1.0) < 0.01 and abs(u.std() - 2 * eps / np.sqrt(12)) < 0.01


def test_noisy_gating_noise_std_is_softplus_of_learned_projection():
  # Clean logits 0, W_noise chosen so softplus(x W_noise) = (σ1, σ2); with k = E = 2 and
  # renormalised gates, log(g1/g2) = n1 σ1 − n2 σ2 ~ N(0, σ1² + σ2²).
  n = 4000
  x = np.zeros((1, n, 2), np.float32)
  x[..., 0] = 1.0
  router = routing.TokenChoiceRouter(2, noisy_gating=True, normalize_combine_weights=True)
  variables = router.init({"params": jax.random.PRNGKey(0)}, x, None, 2, None, True)
  sigma = np.array([0.5, 1.5])
  params = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
  params["logits"]["kernel"] = np.zeros((2, 2), np.float32)
  params["noise_logits"]["kernel"] = np.stack([np.log(np.expm1(sigma)), np.zeros(2)]).astype(
      np.float32)
  variables = {"params": params}
  det, _ = _run(router, x, None, None, variables=variables, num_experts=2)
  np.testing.assert_allclose(det.routing.combine_weights, 0.5)  # no noise when deterministic
  out, _ = _run(router, x, None, None, deterministic=False,
                rngs={"gating_noise": jax.random.PRNGKey(3)}, variables=variables, num_experts=2)
  w = np.asarray(out.routing.combine_weights)[0]
  e = np.asarray(out.routing.expert_index)[0]
  g1 = np.where(e[:, 0] == 0, w[:, 0], w[:, 1])
  diff = np.log(g1) - np.log1p(-g1)
  assert abs(diff.std() - np.sqrt((sigma**2).sum())) < 0.06
  assert abs(diff.mean()) < 0.08


def test_gshard_random_routing_keeps_second_expert_with_prob_2g2():
  x, _ = _inputs(seed=5, padding=False)
  x = np.concatenate([x] * 40, axis=1)  # many tokens for the statistics
  router = routing.TokenChoiceRouter(2, second_expert_policy="random")
  variables = router.init({"params": jax.random.PRNGKey(1)}, x, None, E, None, True)
  # Sharper router than at init, so keep probabilities spread over (0, 1].
  variables = jax.tree.map(lambda a: 20 * a, variables)
  det, _ = _run(router, x, None, None, variables=variables)
  assert bool(np.all(det.routing.kept))  # eval: every choice kept
  out, _ = _run(router, x, None, None, deterministic=False,
                rngs={"routing": jax.random.PRNGKey(11)}, variables=variables)
  kept = np.asarray(out.routing.kept)
  assert kept[..., 0].all()  # first choices always kept
  probs = np.asarray(out.probs)
  top2 = np.sort(probs, axis=-1)[..., ::-1][..., :2]
  keep_prob = np.minimum(1.0, 2 * top2[..., 1] / top2.sum(-1))
  assert keep_prob.min() < 0.5  # the statistics cover low keep probabilities too
  # Binned by keep probability, the observed keep rate matches min(1, 2·g2/(g1+g2)) within 4σ.
  bins = np.digitize(keep_prob, [0.25, 0.5, 0.75])
  for b in range(4):
    sel = bins == b
    if sel.sum() < 20:
      continue
    observed, expected = kept[..., 1][sel].sum(), keep_prob[sel].sum()
    sigma = np.sqrt(np.sum(keep_prob[sel] * (1 - keep_prob[sel])))
    assert abs(observed - expected) < 4 * sigma + 1, (b, observed, expected, sigma)
  # A dropped second choice takes no capacity: positions at each expert are 0..n-1 over kept.
  pos = np.asarray(out.routing.position)
  ex = np.asarray(out.routing.expert_index)
  for g in range(G):
    for e in range(E):
      sel = (ex[g] == e) & kept[g]
      assert sorted(pos[g][sel]) == list(range(sel.sum()))


def test_aux_loss_free_bias_selection_only_and_update_rule():
  x, mask = _inputs(seed=2)
  rate = 0.01
  router = routing.TokenChoiceRouter(2, expert_bias_update_rate=rate)
  variables = router.init({"params": jax.random.PRNGKey(0)}, x, mask, E, None, True)
  assert np.all(variables[routing.EXPERT_BIAS_COLLECTION]["expert_bias"] == 0)
  # Update rule: b += rate · sign(mean(load) − load), loads before capacity over real tokens.
  (out, new_state), _ = _run(router, x, mask, 4, deterministic=False, variables=variables,
                             mutable=[routing.EXPERT_BIAS_COLLECTION])
  want = ref.token_choice(_logits(variables, x), 2, 4, mask)
  load = want["selected"].sum(axis=(0, 1))
  np.testing.assert_allclose(new_state[routing.EXPERT_BIAS_COLLECTION]["expert_bias"],
                             rate * np.sign(load.mean() - load), atol=1e-7)
  # A large bias on expert 3 makes every token select it, but its gate stays the plain prob.
  bias = np.zeros(E, np.float32)
  bias[3] = 10.0
  biased = {"params": variables["params"], routing.EXPERT_BIAS_COLLECTION: {"expert_bias": bias}}
  out, _ = _run(router, x, mask, None, variables=biased)
  want = ref.token_choice(_logits(variables, x), 2, None, mask, bias=bias)
  assert np.all(np.asarray(out.routing.expert_index)[..., 0] == 3)
  np.testing.assert_allclose(out.routing.combine_weights, want["gate"], rtol=1e-5, atol=1e-7)
  # Eval never updates; training without a mutable collection is a clear error.
  (_, state), _ = _run(router, x, mask, None, variables=biased,
                       mutable=[routing.EXPERT_BIAS_COLLECTION])
  np.testing.assert_array_equal(state[routing.EXPERT_BIAS_COLLECTION]["expert_bias"], bias)
  with pytest.raises(ValueError, match="mutable"):
    _run(router, x, mask, None, deterministic=False, variables=biased)


def test_sigmoid_scores_match_reference():
  x, mask = _inputs(seed=4)
  router = routing.TokenChoiceRouter(2, score_function="sigmoid",
                                     normalize_combine_weights=True)
  out, variables = _run(router, x, mask, 5)
  want = ref.token_choice(_logits(variables, x), 2, 5, mask, normalize=True, score="sigmoid")
  np.testing.assert_array_equal(out.routing.expert_index, want["expert"])
  np.testing.assert_allclose(out.routing.combine_weights, want["gate"], rtol=1e-5, atol=1e-7)
  probs = want["scores"] / want["scores"].sum(-1, keepdims=True)
  np.testing.assert_allclose(out.aux_loss, ref.aux_loss(probs, want["selected"], mask), rtol=1e-5)


def test_router_is_float32_for_bfloat16_inputs():
  x, mask = _inputs()
  router = routing.TokenChoiceRouter(2)
  out, variables = _run(router, jnp.asarray(x, jnp.bfloat16), mask, 8)
  assert out.logits.dtype == jnp.float32 and out.routing.combine_weights.dtype == jnp.float32
  assert variables["params"]["logits"]["kernel"].value.dtype == jnp.float32


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_indices_picks_like_lax_top_k(k):
  """Selection by rounds of argmax equals lax.top_k: descending, ties to the lower index,
  and rows whose scores are (partly) -inf fall back to the first entries not yet taken."""
  rng = np.random.default_rng(k)
  scores = rng.integers(0, 4, size=(3, 50, 6)).astype(np.float32)  # many ties
  scores[0, :5] = -np.inf                                         # all -inf rows
  scores[1, :5, 1:] = -np.inf                                     # one finite entry
  scores[2, :5, ::2] = -np.inf
  got = np.asarray(routing.top_k_indices(jnp.asarray(scores), k))
  want = np.asarray(jax.lax.top_k(jnp.asarray(scores), k)[1])
  np.testing.assert_array_equal(got, want)
