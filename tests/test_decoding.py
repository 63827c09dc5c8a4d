"""KV-cache decoding equals the full forward pass; sampling filters against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, decoding


def load(name, *bindings):
  return config.load_model([f"gin_configs/models/{name}.gin"],
                           ["moe_layer.MoeLayer.expert_implementation = 'reference'",
                            *bindings]).module


def allowed_numpy(logits, temperature, top_k, top_p):
  """Token sets the filters keep, by sorting one row at a time."""
  out = []
  for row in np.asarray(logits, np.float64) / temperature:
    order = np.argsort(-row, kind="stable")
    keep = set(order[:top_k] if top_k else order)
    p = np.exp(row[order] - row.max())
    p /= p.sum()
    nucleus, mass = set(), 0.0
    for token, prob in zip(order, p):
      if mass < top_p:
        nucleus.add(token)
      mass += prob
    out.append(keep & nucleus)
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (4, 0.5)])
def test_sampling_filters(top_k, top_p):
  logits = jax.random.normal(jax.random.PRNGKey(0), (3, 20)) * 2
  allowed = allowed_numpy(logits, 0.8, top_k, top_p)
  draws = jax.vmap(lambda k: decoding.sample_logits(k, logits, 0.8, top_k, top_p))(
      jax.random.split(jax.random.PRNGKey(1), 2000))
  for b in range(3):
    seen = set(np.asarray(draws[:, b]).tolist())
    assert seen <= allowed[b]
    assert len(seen) >= min(len(allowed[b]), 3)
  if top_k == 0 and top_p == 1.0:  # plain temperature sampling: frequencies follow softmax
    p = np.asarray(jax.nn.softmax(logits[0] / 0.8))
    freq = np.bincount(np.asarray(draws[:, 0]), minlength=20) / 2000
    assert np.abs(freq - p).max() < 0.04


def test_greedy_and_bad_settings():
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, 11))
  np.testing.assert_array_equal(decoding.sample_logits(None, logits), np.argmax(logits, -1))
  with pytest.raises(ValueError, match="top_p"):
    decoding.sample_logits(jax.random.PRNGKey(0), logits, 1.0, 0, 1.5)


@pytest.mark.parametrize("name,bindings,prefix", [
    ("mixtral_8x7b_tiny", (), False),                       # dropless, GQA, scanned layers
    ("st_moe_decoder_only_tiny", ("EVAL_CAPACITY_FACTOR = 4.0", "SCAN_LAYERS = False"), True),
    ("switchhead_tiny", ("EVAL_CAPACITY_FACTOR = 4.0",), False),  # MoE attention: mixed-value cache
])
def test_cached_decoding_equals_full_forward(name, bindings, prefix):
  module = load(name, *bindings)
  prompt = jax.random.randint(jax.random.PRNGKey(0), (2, 7), 1, module.vocab_size)
  variables = jax.jit(module.init)(jax.random.PRNGKey(1), prompt)
  prefix_mask = jnp.ones_like(prompt, bool) if prefix else None
  new, step_logits = decoding.generate(module, variables, prompt, max_new_tokens=6,
                                       temperature=1.0, rng=jax.random.PRNGKey(3),
                                       prefix_mask=prefix_mask)
  seq = jnp.concatenate([prompt, new], axis=1)
  full_prefix = None if not prefix else jnp.arange(13)[None].repeat(2, 0) < 7
  logits, _ = jax.jit(module.apply)(variables, seq, prefix_mask=full_prefix)
  np.testing.assert_allclose(step_logits, logits[:, 6:12], atol=2e-4, rtol=1e-4)
  # Greedy decoding picks the argmax of those logits.
  greedy, greedy_logits = decoding.generate(module, variables, prompt, max_new_tokens=4)
  np.testing.assert_array_equal(greedy, jnp.argmax(greedy_logits, -1))


def test_eos_pads_the_rest_and_expert_choice_is_refused():
  module = load("mixtral_8x7b_tiny")
  prompt = jnp.ones((2, 3), jnp.int32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(1), prompt)
  first, _ = decoding.generate(module, variables, prompt, max_new_tokens=1)
  eos = int(first[0, 0])
  tokens, _ = decoding.generate(module, variables, prompt, max_new_tokens=5, eos_id=eos)
  assert int(tokens[0, 0]) == eos and np.all(np.asarray(tokens[0, 1:]) == 0)
  with pytest.raises(ValueError, match=r"the moe sub-layer's router \(ExpertChoiceRouter\) is "
                     r"not causal .* cannot decode token by token"):
    decoding.generate(load("expert_choice_tiny"), variables, prompt, max_new_tokens=2)
  # The same refusal from the router's `is_causal` alone: batch priority with a capacity (its
  # queues let later tokens take earlier tokens' slots), but not when dropless (no queues).
  bpr = "routing.TokenChoiceRouter.batch_prioritized = True"
  with pytest.raises(ValueError, match=r"\(TokenChoiceRouter\) is not causal"):
    decoding.generate(load("st_moe_decoder_only_tiny", bpr), variables, prompt, max_new_tokens=2)
  load("mixtral_8x7b_tiny", bpr).check_decodable()  # dropless: causal
