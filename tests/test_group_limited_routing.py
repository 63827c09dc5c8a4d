"""DeepSeek routing against naive numpy loops: group-limited top-k (V3: sigmoid scores, groups
ranked by their two best biased scores; V2: softmax, groups ranked by their best score), the
renormalised and scaled gates, the frozen selection bias, and V3's sequence-wise balance loss
(its eq. 17-20 written out per sequence)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moe_jax.routing import TokenChoiceRouter

E, K, GROUPS, TOP_GROUPS = 16, 4, 4, 2


def naive_route(x, kernel, bias, *, sigmoid, group_score, normalize, scale):
  """Token by token, expert by expert: (experts chosen in order, gates)."""
  experts, gates = [], []
  for token in x:
    logits = token.astype(np.float64) @ kernel
    s = 1 / (1 + np.exp(-logits)) if sigmoid else np.exp(logits - logits.max()) / np.exp(
        logits - logits.max()).sum()
    biased = s + bias
    per_group = E // GROUPS
    group_value = []
    for g in range(GROUPS):
      members = sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)
      group_value.append(members[0] + members[1] if group_score == "top2_sum" else members[0])
    kept_groups = sorted(range(GROUPS), key=lambda g: -group_value[g])[:TOP_GROUPS]
    candidates = [e for e in range(E) if e // per_group in kept_groups]
    chosen = sorted(candidates, key=lambda e: -biased[e])[:K]
    g = np.array([s[e] for e in chosen])
    if normalize:
      g = g / g.sum()
    experts.append(chosen)
    gates.append(g * scale)
  return np.array(experts), np.array(gates)


@pytest.mark.parametrize("sigmoid,group_score,normalize,scale", [
    (True, "top2_sum", True, 2.5),    # DeepSeek-V3
    (False, "max", False, 1.0),       # DeepSeek-V2, group_limited_greedy
])
def test_group_limited_routing_matches_a_naive_loop(sigmoid, group_score, normalize, scale):
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 10, 8)), np.float32)
  router = TokenChoiceRouter(
      K, score_function="sigmoid" if sigmoid else "softmax", normalize_combine_weights=normalize,
      routed_scaling_factor=scale, num_groups=GROUPS, top_groups=TOP_GROUPS,
      group_score=group_score, expert_bias=True,
      kernel_init=jax.nn.initializers.normal(1.0))
  variables = nn.meta.unbox(router.init(jax.random.PRNGKey(1), x, None, E, None, True))
  bias = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (E,)) * 0.2, np.float32)
  variables = {"params": variables["params"], "moe_balance": {"expert_bias": bias}}
  out = jax.jit(lambda v: router.apply(v, x, None, E, None, True))(variables)
  kernel = np.asarray(variables["params"]["logits"]["kernel"], np.float64)
  for g in range(x.shape[0]):
    want_e, want_w = naive_route(x[g], kernel, bias, sigmoid=sigmoid, group_score=group_score,
                                 normalize=normalize, scale=scale)
    np.testing.assert_array_equal(np.asarray(out.routing.expert_index[g]), want_e)
    np.testing.assert_allclose(np.asarray(out.routing.combine_weights[g]), want_w, rtol=1e-5)
  # The bias is frozen (expert_bias=True, no update rate): training leaves it as it was.
  _, state = router.apply(variables, x, None, E, None, False, mutable=["moe_balance"])
  np.testing.assert_array_equal(state["moe_balance"]["expert_bias"], bias)


def test_sequence_wise_balance_loss_is_deepseek_v3s_formula():
  """L = Σ_i f_i P_i per sequence (α outside), f_i = E / (K T) · #{t: i in top-k(t)},
  P_i = mean_t s'_{i,t}, s' = s / Σ_j s_j; averaged over the sequences (one group each)."""
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (4, 12, 8)), np.float32)
  router = TokenChoiceRouter(K, score_function="sigmoid", normalize_combine_weights=True,
                             num_groups=GROUPS, top_groups=TOP_GROUPS,
                             kernel_init=jax.nn.initializers.normal(1.0))
  variables = nn.meta.unbox(router.init(jax.random.PRNGKey(4), x, None, E, None, True))
  out = router.apply(variables, x, None, E, None, True)
  kernel = np.asarray(variables["params"]["logits"]["kernel"], np.float64)
  losses = []
  for seq in x:
    experts, _ = naive_route(seq, kernel, np.zeros(E), sigmoid=True, group_score="top2_sum",
                             normalize=True, scale=1.0)
    t = len(seq)
    f = np.array([E / (K * t) * np.sum(experts == i) for i in range(E)])
    s = 1 / (1 + np.exp(-(seq.astype(np.float64) @ kernel)))
    p = np.mean(s / s.sum(-1, keepdims=True), axis=0)
    losses.append(np.sum(f * p))
  np.testing.assert_allclose(float(out.aux_loss), np.mean(losses), rtol=1e-5)


@pytest.mark.parametrize("settings,message", [
    (dict(num_groups=3), "num_groups=3 must divide num_experts=16"),
    (dict(num_groups=16), "groups of at least 2"),
    (dict(num_groups=4, top_groups=1, num_selected_experts=5),
     "num_selected_experts=5 is more than the top_groups=1 groups of 4 experts"),
    (dict(num_groups=2, top_groups=3), "top_groups in \\[1, num_groups\\]"),
    (dict(group_score="mean"), "group_score must be one of"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be finite and > 0"),
])
def test_bad_group_settings_name_the_setting(settings, message):
  with pytest.raises(ValueError, match=message):
    router = TokenChoiceRouter(**{"num_selected_experts": 2, **settings})
    router.check_num_experts(E)
