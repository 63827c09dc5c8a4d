"""SwitchHead attention against plain numpy, its reduction to multi-head attention, and the
model around it (losses per sub-layer, parameter count, metrics)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from moe_jax import config, params
from moe_jax.attention import Attention
from moe_jax.routing import TokenChoiceRouter
from moe_jax.switchhead import SwitchHeadAttention

B, L, H, N, D, E = 2, 6, 16, 2, 8, 4


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(tree))


def numpy_switchhead(p, x, k, mask, theta=10000.0):
  """Head by head and query by query (causal), each side's sigmoid top-k gates by argsort;
  padding tokens (mask 0) get no expert, like an FFN MoE layer's."""
  x = np.asarray(x, np.float64)
  wv, wo = p["value"], p["out"]  # [E, H, N, D], [E, N, D, H]
  pos = np.tile(np.arange(L), (B, 1))
  q = ref.rope(np.einsum("blh,hnd->blnd", x, p["query"]), pos, theta)
  kk = ref.rope(np.einsum("blh,hnd->blnd", x, p["key"]), pos, theta)
  y = np.zeros((B, L, H))
  aux = []
  for head in range(N):
    gates = {}
    for side in ("source", "destination"):
      scores = 1 / (1 + np.exp(-x @ p[f"{side}_router_{head}"]["logits"]["kernel"]))  # [B,L,E]
      g = np.zeros_like(scores)
      selected = np.zeros_like(scores)
      for b in range(B):
        for t in range(L):
          if not mask[b, t]:
            continue  # padding: routed nowhere, so its value and output are 0
          top = np.argsort(-scores[b, t], kind="stable")[:k]
          g[b, t, top] = scores[b, t, top]
          selected[b, t, top] = 1.0
      gates[side] = g
      aux.append(ref.aux_loss(scores / scores.sum(-1, keepdims=True), selected, mask))
    v = sum(gates["source"][..., e, None] * (x @ wv[e, :, head]) for e in range(E))  # [B,L,D]
    for b in range(B):
      for t in range(L):
        scores = kk[b, :t + 1, head] @ q[b, t, head] / np.sqrt(D)
        a = ref.softmax(scores) @ v[b, :t + 1]
        for e in range(E):
          y[b, t] += gates["destination"][b, t, e] * (a @ wo[e, head])
  return y, float(np.mean(aux))


def _layer(k=2, **kwargs):
  return SwitchHeadAttention(num_heads=N, head_dim=D, num_experts=E,
                             router=TokenChoiceRouter(k, score_function="sigmoid"), **kwargs)


def test_switchhead_matches_numpy():
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, H))
  mask = np.ones((B, L), np.float32)
  mask[1, -2:] = 0  # padding counts in no routing statistic
  layer = _layer(k=2)
  variables = layer.init(jax.random.PRNGKey(1), x)
  y, aux = layer.apply(variables, x, padding_mask=jnp.asarray(mask))
  want, want_aux = numpy_switchhead(_np(variables["params"]), x, 2, mask)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux.aux_loss, want_aux, rtol=1e-5)
  # Every real token of every (side, head) router reaches k experts; nothing is ever dropped.
  load = np.asarray(aux.metrics["expert_load_after"])
  assert load.sum() == 2 * N * 2 * mask.sum() and float(aux.metrics["dropped_fraction"]) == 0


def test_all_experts_with_gates_one_is_attention_with_summed_projections():
  """k = E and every gate exactly 1 (router logits of 60 through a constant feature: σ = 1.0 in
  float32): the value and output experts add up to one projection per head."""
  x = np.array(jax.random.normal(jax.random.PRNGKey(2), (B, L, H)))
  x[..., 0] = 1.0
  layer = _layer(k=E)
  variables = layer.init(jax.random.PRNGKey(3), jnp.asarray(x))
  p = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
  for name in p:
    if name.endswith(tuple(f"_router_{h}" for h in range(N))):
      kernel = np.zeros((H, E), np.float32)
      kernel[0] = 60.0
      p[name] = {"logits": {"kernel": kernel}}
  y, _ = layer.apply({"params": p}, jnp.asarray(x))
  plain = Attention(num_heads=N, head_dim=D)
  summed = {"query": p["query"], "key": p["key"], "value": p["value"].sum(0),
            "out": p["out"].sum(0)}
  np.testing.assert_allclose(y, plain.apply({"params": summed}, jnp.asarray(x)),
                             rtol=1e-5, atol=1e-5)
  # And against numpy with those gates: the same multi-head attention.
  want, _ = numpy_switchhead(_np(p), x, E, np.ones((B, L)))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_bad_settings_name_the_field():
  with pytest.raises(ValueError, match=r"num_kv_heads must be None or num_heads=2, got 1"):
    SwitchHeadAttention(num_heads=2, num_kv_heads=1)
  with pytest.raises(ValueError, match=r"num_selected_experts .*\[1, num_experts=4\].*5"):
    _layer(k=5)
  with pytest.raises(ValueError, match=r"num_experts must be >= 1, got 0"):
    SwitchHeadAttention(num_heads=2, num_experts=0)
  with pytest.raises(ValueError, match=r"qkv_bias and qk_norm apply to the default Attention"):
    config.load_model(["gin_configs/models/switchhead_tiny.gin"],
                      ["model.Decoder.qkv_bias = True"])


def test_switchhead_tiny_parameter_count():
  lm = config.load_model(["gin_configs/models/switchhead_tiny.gin"])
  module = lm.module
  assert module.sparse_layer_ids() == {"attention": (0, 1, 2, 3), "moe": (1, 3)}
  # Hand count: v=512, H=64, N=4 heads of 16, 4 attention experts (k=2), 4 layers, FFN MoE of
  # 8 swiglu experts of 128 (k=2) on layers 1 and 3, dense swiglu FFN of 128 elsewhere.
  v, h, n, d, ea, ka, layers, ef, kf, f = 512, 64, 4, 16, 4, 2, 4, 8, 2, 128
  attention = 2 * h * n * d + 2 * n * h * ea   # query, key, 2·N routers [H, E]
  attention_experts = 2 * ea * h * n * d        # value, out
  ffn_experts = ef * 3 * h * f
  total = (layers * (attention + attention_experts + 2 * h) + 2 * (ffn_experts + h * ef)
           + 2 * 3 * h * f + 2 * v * h + h)
  active = total - layers * attention_experts * (1 - ka / ea) - 2 * ffn_experts * (1 - kf / ef)
  report = params.count(module, seq_len=16)
  assert (report.total, report.active) == (total, active)
  assert report.expert == layers * attention_experts + 2 * ffn_experts
  # The losses per sub-layer: test_presets.test_tiny_preset_trains[switchhead].


def test_switchhead_routing_records():
  from moe_jax.analysis import recorder  # pylint: disable=g-import-not-at-top
  lm = config.load_model(["gin_configs/models/switchhead_tiny.gin"])
  toks = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, 16), 1, 512))
  targets = toks.copy()
  targets[1, 12:] = 0  # padding
  batch = {"decoder_input_tokens": toks, "decoder_target_tokens": targets}
  variables = jax.jit(lm.module.init)(jax.random.PRNGKey(1), jnp.asarray(toks))
  apply_fn = recorder.make_apply_fn(lm)  # one compiled pass records both kinds
  records = recorder.record_routing(lm, variables, [batch], sublayer="attention",
                                    apply_fn=apply_fn)
  assert records.layer_ids == (0, 1, 2, 3) and records.num_experts == 2 * 4 * 4
  assert records.num_tokens == 28 and records.expert.shape == (4, 28, 2 * 4 * 2)
  # Router r = side · N + head owns experts [r·E, (r+1)·E); each chooses k = 2 of its own.
  owner = np.asarray(records.expert) // 4
  assert (owner == np.repeat(np.arange(8), 2)[None, None]).all()
  ffn = recorder.record_routing(lm, variables, [batch], apply_fn=apply_fn)
  assert ffn.layer_ids == (1, 3) and ffn.num_experts == 8
  with pytest.raises(ValueError, match=r"sublayer 'mlp' is not a sparse sub-layer of this model; "
                                       r"choose one of \('attention', 'moe'\)"):
    recorder.record_routing(lm, variables, [batch], sublayer="mlp")
