"""The decoder-only model: attention and RoPE against numpy, masks, placement, scan, loss."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from moe_jax.attention import Attention, YarnScaling, rotary_embedding
from moe_jax.latent_attention import LatentAttention
from moe_jax.model import Decoder, DecoderOnlyLM, moe_layer_ids
from moe_jax.moe_layer import MoeLayer
from moe_jax.routing import TokenChoiceRouter

VOCAB = 61


def tiny(**overrides):
  # eval capacity C = ceil(2.0 · 2 · S / 4) = S: no token is ever dropped (see the causal
  # test); the reference expert implementation compiles fastest.
  moe = functools.partial(MoeLayer, TokenChoiceRouter(2), 4, 24, activation="swiglu",
                          eval_capacity_factor=2.0, expert_implementation="reference")
  cfg = dict(vocab_size=VOCAB, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2,
             mlp_dim=48, moe_layer=moe, moe_every=2)
  cfg.update(overrides)
  return Decoder(**cfg)


@functools.lru_cache(maxsize=None)
def jit_apply(model):
  return jax.jit(model.apply)


def tokens(batch=2, length=12, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 1, VOCAB)


def init(model, toks):
  return jax.jit(model.init)(jax.random.PRNGKey(1), toks)


# --------------------------------------------------------------------------------------
# RoPE and attention against plain numpy.
# --------------------------------------------------------------------------------------

def test_rotary_embedding_matches_pairwise_rotation():
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 8)))
  positions = np.array([[0, 1, 2, 3, 4], [7, 3, 0, 11, 2]])
  got = rotary_embedding(jnp.asarray(x), jnp.asarray(positions), theta=500.0)
  np.testing.assert_allclose(got, ref.rope(x, positions, 500.0), atol=1e-5)


def numpy_attention(params, x, prefix=None, segments=None, theta=10000.0):
  """Head by head, query by query; kv head of query head n is n // (N / K)."""
  wq, wk, wv, wo = (np.asarray(params[k], np.float64) for k in ("query", "key", "value", "out"))
  b, l, _ = x.shape
  n, k, d = wq.shape[1], wk.shape[1], wq.shape[2]
  pos = np.tile(np.arange(l), (b, 1))
  q = ref.rope(np.einsum("blh,hnd->blnd", x, wq), pos, theta)
  kk = ref.rope(np.einsum("blh,hnd->blnd", x, wk), pos, theta)
  v = np.einsum("blh,hnd->blnd", x, wv)
  out = np.zeros((b, l, n, d))
  for bi in range(b):
    for head in range(n):
      g = head // (n // k)
      for i in range(l):
        allowed = [j for j in range(l)
                   if (j <= i or (prefix is not None and prefix[bi, i] and prefix[bi, j]))
                   and (segments is None or segments[bi, i] == segments[bi, j])]
        s = np.array([q[bi, i, head] @ kk[bi, j, g] / np.sqrt(d) for j in allowed])
        p = np.exp(s - s.max())
        p /= p.sum()
        out[bi, i, head] = sum(pj * v[bi, j, g] for pj, j in zip(p, allowed))
  return np.einsum("blnd,ndh->blh", out, wo)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_numpy(kv_heads):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 16))
  prefix = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
  segments = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2]])
  attn = Attention(num_heads=4, num_kv_heads=kv_heads)
  params = nn.meta.unbox(attn.init(jax.random.PRNGKey(1), x)["params"])
  for kwargs, ref_kwargs in [({}, {}), (dict(prefix_mask=prefix), dict(prefix=prefix)),
                             (dict(segment_ids=segments, positions=None), dict(segments=segments))]:
    got = attn.apply({"params": params}, x, **kwargs)
    np.testing.assert_allclose(got, numpy_attention(params, np.asarray(x), **ref_kwargs),
                               atol=2e-5, err_msg=str(kwargs.keys()))


# --------------------------------------------------------------------------------------
# Masks through the whole model.
# --------------------------------------------------------------------------------------

def test_causal_a_future_token_never_changes_an_earlier_logit():
  # No drops here: with drops, a later token's first choice can take the slot of an earlier
  # token's second choice (all first choices queue first), which is not causal.
  model = tiny()
  toks = tokens()
  variables = init(model, toks)
  base, _ = jit_apply(model)(variables, toks)
  changed, _ = jit_apply(model)(variables, toks.at[:, 7].set((toks[:, 7] % (VOCAB - 1)) + 1))
  np.testing.assert_allclose(changed[:, :7], base[:, :7], atol=1e-5)
  assert np.abs(np.asarray(changed[:, 7:] - base[:, 7:])).max() > 1e-3


def test_prefix_lm_inputs_see_each_other_targets_stay_causal():
  model = tiny()
  toks = tokens()
  variables = init(model, toks)
  prefix = jnp.asarray(np.arange(12) < 5)[None].repeat(2, 0)  # inputs: positions 0..4
  base, _ = jit_apply(model)(variables, toks, prefix_mask=prefix)
  # A later *input* token changes an earlier input position's output ...
  later_input = toks.at[:, 4].set((toks[:, 4] % (VOCAB - 1)) + 1)
  out, _ = jit_apply(model)(variables, later_input, prefix_mask=prefix)
  assert np.abs(np.asarray(out[:, :4] - base[:, :4])).max() > 1e-3
  # ... which plain causal attention never does.
  causal_base, _ = jit_apply(model)(variables, toks)
  causal_out, _ = jit_apply(model)(variables, later_input)
  np.testing.assert_allclose(causal_out[:, :4], causal_base[:, :4], atol=1e-5)
  # A target token never changes anything before it.
  later_target = toks.at[:, 8].set((toks[:, 8] % (VOCAB - 1)) + 1)
  out, _ = jit_apply(model)(variables, later_target, prefix_mask=prefix)
  np.testing.assert_allclose(out[:, :8], base[:, :8], atol=1e-5)


def test_packed_segments_do_not_see_each_other():
  model = tiny()
  toks = tokens()
  variables = init(model, toks)
  segments = jnp.asarray([[1] * 5 + [2] * 7] * 2)
  positions = jnp.asarray([list(range(5)) + list(range(7))] * 2)
  base, _ = jit_apply(model)(variables, toks, segment_ids=segments, positions=positions)
  changed, _ = jit_apply(model)(variables, toks.at[:, 2].set((toks[:, 2] % (VOCAB - 1)) + 1),
                           segment_ids=segments, positions=positions)
  np.testing.assert_allclose(changed[:, 5:], base[:, 5:], atol=1e-5)
  # The second segment alone, at its own positions, gives the same logits.
  alone, _ = jit_apply(model)(variables, toks[:, 5:])
  np.testing.assert_allclose(alone, base[:, 5:], atol=1e-4)


# --------------------------------------------------------------------------------------
# Placement, scan, errors.
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_layers,every,offset", [(8, 2, None), (8, 2, 0), (12, 4, None),
                                                     (24, 6, 5), (6, 1, None), (7, 3, 1)])
def test_moe_layer_ids_every_n(num_layers, every, offset):
  expected = [i for i in range(num_layers)
              if (i + 1) % every == 0 and offset is None or offset is not None
              and i % every == offset]
  assert list(moe_layer_ids(num_layers, every, offset)) == expected


def test_moe_layer_ids_explicit_and_model_tree():
  assert moe_layer_ids(6, 2, None, [5, 0, 3]) == (0, 3, 5)
  model = tiny(num_layers=5, moe_layer_indices=[0, 3])
  params = init(model, tokens())["params"]
  sparse = [i for i in range(5) if "moe" in params[f"layers_{i}"]]
  dense = [i for i in range(5) if "mlp" in params[f"layers_{i}"]]
  assert sparse == [0, 3] and dense == [1, 2, 4]
  # Each MoE layer owns its router, although the factory hands them one router instance.
  kernels = [params[f"layers_{i}"]["moe"]["router"]["logits"]["kernel"] for i in sparse]
  assert not np.allclose(nn.meta.unbox(kernels[0]), nn.meta.unbox(kernels[1]))
  _, stats = jit_apply(model)({"params": params}, tokens())
  assert stats["aux_loss"].shape == (2,)


def unscan(params, num_layers, period):
  """Scanned tree (layers/block_j/... [U, ...]) -> unrolled tree (layers_i/...)."""
  params = nn.meta.unbox(params)
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    u, j = divmod(i, period)
    out[f"layers_{i}"] = jax.tree.map(lambda a: a[u], params["layers"][f"block_{j}"])
  return out


@pytest.mark.parametrize("options", [dict(moe_dense_ffn="sequential"),
                                     dict(moe_dense_ffn="parallel", shared_expert_dim=16,
                                          shared_expert_gate=True, first_dense_layers=2)])
def test_scan_equals_unrolled(options):
  """With first_dense_layers the dense prefix is its own scanned stack ("dense_layers")."""
  from moe_jax.interop.huggingface import unstack_layers
  scanned = tiny(scan_layers=True, **options)
  unrolled = tiny(**options)
  toks = tokens()
  params = init(scanned, toks)["params"]
  if "first_dense_layers" in options:
    assert unrolled.moe_ids == (3,) and scanned.scanned_stacks() == (
        ("dense_layers", 0, 1, 2), ("layers", 2, 2, 1))
    flat = unstack_layers(nn.meta.unbox(params), scanned)
  else:
    flat = unscan(params, 4, 2)
  logits_s, stats_s = jit_apply(scanned)({"params": params}, toks)
  logits_u, stats_u = jit_apply(unrolled)({"params": flat}, toks)
  np.testing.assert_allclose(logits_s, logits_u, atol=1e-5)
  for name in stats_u:
    np.testing.assert_allclose(stats_s[name], stats_u[name], atol=1e-6, err_msg=name)
  assert set(flat) == set(nn.meta.unbox(init(unrolled, toks)["params"]))


def test_scan_gradients_and_partition_axis():
  model = tiny(scan_layers=True)
  toks = tokens()
  variables = init(model, toks)
  spec = nn.get_partition_spec(variables)["params"]["layers"]["block_1"]["moe"]["experts"]["wi"]
  assert tuple(spec) == ("layers", "expert", "embed", "expert_mlp")
  lm = DecoderOnlyLM(model)
  batch = dict(decoder_input_tokens=toks, decoder_target_tokens=toks)
  grads = jax.jit(jax.grad(lambda p: lm.loss({"params": p}, batch, deterministic=True)[0]))(
      variables["params"])
  norms = jax.tree.leaves(jax.tree.map(lambda g: float(jnp.linalg.norm(g)), nn.meta.unbox(grads)))
  assert all(np.isfinite(norms)) and min(norms) > 0


@pytest.mark.parametrize("overrides,match", [
    (dict(moe_every=0), "moe_every"),
    (dict(first_dense_layers=4), "first_dense_layers must be in \\[0, num_layers=4\\)"),
    (dict(first_dense_layers=1, moe_layer_indices=(2,)), "either moe_layer_indices"),
    (dict(first_dense_layers=1, scan_layers=True), "moe_every dividing the layers after"),
    (dict(moe_offset=2), "moe_offset"),
    (dict(num_layers=3, first_dense_layers=2, moe_every=2),
     "the MoE placement leaves no sparse layer"),
    (dict(num_heads=5), "num_heads=5 must divide d_model=32"),
    (dict(num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
    (dict(moe_dense_ffn="both"), "moe_dense_ffn must be one of"),
    (dict(moe_layer_indices=[9]), "outside"),
    (dict(scan_layers=True, num_layers=5), "scan_layers needs a periodic placement"),
    (dict(scan_layers=True, moe_layer_indices=[1]), "scan_layers needs a periodic placement"),
])
def test_bad_settings_raise_before_compiling(overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny(**overrides)


# --------------------------------------------------------------------------------------
# Loss.
# --------------------------------------------------------------------------------------

def test_loss_masks_weights_and_adds_weighted_moe_losses():
  model = tiny()
  lm = DecoderOnlyLM(model, aux_loss_weight=0.1, router_z_loss_weight=0.01, logits_z_loss=1e-3)
  toks = tokens()
  targets = tokens(seed=5)
  weights = np.ones((2, 12), np.float32)
  weights[:, :4] = 0  # inputs (prefix LM) and padding carry no loss
  weights[1, 10:] = 0
  batch = dict(decoder_input_tokens=toks, decoder_target_tokens=targets,
               decoder_loss_weights=jnp.asarray(weights))
  variables = init(model, toks)
  loss = jax.jit(functools.partial(lm.loss, deterministic=True))
  total, metrics = loss(variables, batch)
  logits, stats = jit_apply(model)(variables, toks, padding_mask=targets > 0)
  logits = np.asarray(logits, np.float64)
  ce = z = 0.0
  for b in range(2):
    for i in range(12):
      if weights[b, i]:
        log_z = np.log(np.sum(np.exp(logits[b, i] - logits[b, i].max()))) + logits[b, i].max()
        ce += log_z - logits[b, i, targets[b, i]]
        z += log_z**2
  n = weights.sum()
  expected = (ce / n + 1e-3 * z / n + 0.1 * np.mean(stats["aux_loss"])
              + 0.01 * np.mean(stats["z_loss"]))
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/cross_entropy"], ce / n, rtol=1e-5)
  assert "moe/layer_1/dropped_fraction" in metrics and "moe/layer_3/aux_loss" in metrics
  # Targets under weight 0 do not matter.
  batch2 = dict(batch, decoder_target_tokens=targets.at[:, :4].set(3))
  np.testing.assert_allclose(loss(variables, batch2)[0], total, rtol=1e-6)


def test_bfloat16_activations_keep_float32_params_and_router():
  model = tiny(dtype=jnp.bfloat16)
  toks = tokens()
  variables = init(model, toks)
  dtypes = {str(p.dtype) for p in jax.tree.leaves(nn.meta.unbox(variables["params"]))}
  assert dtypes == {"float32"}
  logits, stats = jit_apply(model)(variables, toks)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(variables["params"]), sep="/")
  assert flat["layers_1/moe/router/logits/kernel"].dtype == jnp.float32


@pytest.mark.parametrize("scan,policy", [(False, "full"), (True, "dots")])
def test_remat_changes_memory_not_results(scan, policy):
  plain, remat = tiny(scan_layers=scan), tiny(scan_layers=scan, remat_policy=policy)
  toks = tokens()
  lm_plain, lm_remat = DecoderOnlyLM(plain), DecoderOnlyLM(remat)
  batch = dict(decoder_input_tokens=toks, decoder_target_tokens=jnp.roll(toks, -1, 1))
  variables = init(plain, toks)
  grad = lambda lm: jax.jit(jax.value_and_grad(
      lambda v: lm.loss(v, batch, deterministic=True)[0]))(variables)
  (l1, g1), (l2, g2) = grad(lm_plain), grad(lm_remat)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    tiny(remat_policy="some")


@pytest.mark.parametrize("make,match", [
    (lambda: Attention(4, qk_norm="rms"), "qk_norm must be one of \\('none', 'head', 'full'\\)"),
    (lambda: Attention(4, rope_theta=None, rope_scaling=YarnScaling(4.0, 32)),
     "rope_scaling \\(YaRN\\) extends rotary embeddings; it needs rope_theta"),
    (lambda: YarnScaling(0.5, 32), "YaRN's factor must be >= 1, got 0.5"),
    (lambda: YarnScaling(4.0, 0), "original_max_position_embeddings must be >= 1, got 0"),
    (lambda: LatentAttention(4, num_kv_heads=2), "num_kv_heads must be None or num_heads"),
    (lambda: LatentAttention(4, head_dim=16), "head_dim must be None, got 16"),
    (lambda: LatentAttention(4, rope_theta=None), "LatentAttention needs rope_theta"),
    (lambda: LatentAttention(4, kv_lora_rank=0), "kv_lora_rank must be >= 1, got 0"),
    (lambda: LatentAttention(4, qk_rope_head_dim=7), "qk_rope_head_dim must be even"),
    (lambda: LatentAttention(4, q_lora_rank=0), "q_lora_rank must be >= 1 or None, got 0"),
    (lambda: LatentAttention(4, qk_norm="head"), "LatentAttention has no qkv_bias, out_bias or "
                                                 "qk_norm"),
    (lambda: tiny(qk_norm="head", attention_layer=LatentAttention),
     "qkv_bias and qk_norm apply to the default Attention"),
])
def test_bad_attention_settings_name_the_setting(make, match):
  """QK norm, YaRN and MLA settings fail when the module is built, before any compile."""
  with pytest.raises(ValueError, match=match):
    make()
