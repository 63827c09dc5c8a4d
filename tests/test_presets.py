"""Every gin preset: full sizes through eval_shape (published parameter counts), tiny sizes
through a real forward and backward pass, and clear errors for bad presets."""
import functools
import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, params

MODELS = os.path.join(config.REPO_ROOT, "gin_configs", "models")
PRESETS = ["switch_base_decoder_only", "gshard", "glam", "st_moe_decoder_only", "expert_choice", "mixtral_8x7b",
           "openmoe_base_16e", "openmoe_8b_32e", "openmoe_34b_32e", "deepseek_moe", "dense",
           "switchhead", "deepseek_v3", "deepseek_v2_lite", "qwen3_30b_a3b", "olmoe_1b_7b"]
# The published encoder-decoder systems (moe_jax/encoder_decoder.py): {name: (published total
# parameters or None where none was published, tolerance)}.
ENCODER_DECODER_PRESETS = {
    "switch_base_8": (619e6, 0.01),       # Hugging Face google/switch-base-8: 619M
    "switch_base_16": (None, 0), "switch_base_32": (None, 0), "switch_base_64": (None, 0),
    "switch_base_128": (7.4e9, 0.01),     # Fedus et al. 2021, Switch-Base: 7.4B
    "switch_base_256": (None, 0),
    "switch_base": (7.4e9, 0.01),         # = switch_base_128
    "switch_large_128": (26.3e9, 0.01),   # Switch-Large: 26.3B
    "switch_xxl_128": (395e9, 0.01),      # Switch-XXL: 395B
    "switch_c_2048": (1571e9, 0.01),      # Switch-C: 1571B
    "st_moe_base": (None, 0),
    "st_moe_l": (4.1e9, 0.01),            # Zoph et al. 2022, ST-MoE-L: 4.1B
    "st_moe_32b": (269e9, 0.01),          # ST-MoE-32B: 269B
}


def load(name, *bindings):
  return config.load_model([f"gin_configs/models/{name}.gin"], bindings)


def test_every_preset_file_is_listed_and_has_a_tiny_variant():
  files = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(MODELS, "*.gin"))}
  main_job = {"openmoe_base_16e_cpu"}  # `make train`'s CPU-sized OpenMoE (runs/tiny_cpu.gin)
  presets = set(PRESETS) | set(ENCODER_DECODER_PRESETS)
  assert files == (presets | {p + "_tiny" for p in presets}
                   | {"decoder_only", "encoder_decoder", "tiny"} | main_job)


@pytest.mark.parametrize("name,total,active,rtol_total,rtol_active,non_embedding", [
    # Mixtral 8x7B: 46.7B total / 12.9B active (Jiang et al. 2024), within 1%.
    ("mixtral_8x7b", 46.7e9, 12.9e9, 0.01, 0.01, False),
    # GLaM 64B/64E: "1.2T" total (1.162T, rounded in the paper) / 96.6B active.
    ("glam", 1.2e12, 96.6e9, 0.04, 0.01, False),
    # OpenMoE-8B/32E ≈ 8B / ≈ 2B and 34B/32E ≈ 34B / ≈ 6B (rounded names; the active figures
    # leave out the 256k-entry embedding). Ours: 8.78B / 2.21B and 34.6B / 6.64B.
    ("openmoe_8b_32e", 8e9, 2e9, 0.12, 0.12, True),
    ("openmoe_34b_32e", 34e9, 6e9, 0.03, 0.12, True),
    # DeepSeekMoE 16B: 16.4B / 2.8B (Dai et al. 2024).
    ("deepseek_moe", 16.4e9, 2.8e9, 0.01, 0.02, False),
    # The 2024-2025 families. Totals within 1% (ours: 671.03B, 15.71B, 30.53B, 6.92B). The
    # active figures are published to two digits, so they are only as precise as their
    # rounding: DeepSeek's count one embedding matrix ("input"; ours 36.63B for "37B",
    # 2.45B for "2.4B"), Qwen's and OLMoE's both (ours 3.35B for "3.3B", 1.28B for "1.3B").
    ("deepseek_v3", 671e9, 37e9, 0.01, 0.011, "input"),
    ("deepseek_v2_lite", 15.7e9, 2.4e9, 0.01, 0.025, "input"),
    ("qwen3_30b_a3b", 30.5e9, 3.3e9, 0.01, 0.02, False),
    ("olmoe_1b_7b", 6.9e9, 1.3e9, 0.01, 0.015, False),
])
def test_published_parameter_counts(name, total, active, rtol_total, rtol_active,
                                    non_embedding):
  module = load(name).module
  report = params.count(module)
  got_active = report.active - report.embedding if non_embedding else report.active
  if non_embedding == "input":  # the output projection counts, the input lookup does not
    got_active = report.active - module.vocab_size * module.d_model
  assert report.total == pytest.approx(total, rel=rtol_total), report.summary()
  assert got_active == pytest.approx(active, rel=rtol_active), report.summary()


def encoder_decoder_hand_count(m):
  """(total, active) of an EncoderDecoder from its settings alone, matrix by matrix."""
  h, n, d, v = m.d_model, m.num_heads, m.head_dim or m.d_model // m.num_heads, m.vocab_size
  gated = m.activation in ("swiglu", "geglu")
  ffn = lambda width: (3 if gated else 2) * h * width
  total = v * h * (1 if m.tie_embeddings else 2) + 2 * h  # embeddings, final norms
  inactive = 0
  for stack, layers in (("encoder", m.num_encoder_layers), ("decoder", m.num_decoder_layers)):
    moe = m.sparse_sublayers().get(f"{stack}/moe")
    total += n * m.relative_attention_num_buckets  # one shared bias per stack
    for i in range(layers):
      attention = 4 * h * n * d * (2 if stack == "decoder" else 1)
      norms = h * (3 if stack == "decoder" else 2)
      if i not in m.moe_ids(stack):
        total += attention + norms + ffn(m.mlp_dim)
        continue
      e, k = moe.num_experts, moe.router.num_selected_experts
      experts = e * ffn(moe.expert_hidden_dim)
      extra = (ffn(m.mlp_dim) + h) if m.moe_dense_ffn == "sequential" else 0
      total += attention + norms + experts + h * e + extra
      inactive += experts * (1 - k / e)
  return total, total - round(inactive)


@pytest.mark.parametrize("name", sorted(ENCODER_DECODER_PRESETS))
def test_encoder_decoder_parameter_counts(name):
  """Every count equals a hand count of the shapes; the published ones are within 1%."""
  module = load(name).module
  report = params.count(module)
  assert (report.total, report.active) == encoder_decoder_hand_count(module)
  published, tolerance = ENCODER_DECODER_PRESETS[name]
  if published is not None:
    assert report.total == pytest.approx(published, rel=tolerance), report.summary()


def test_counts_against_a_hand_count():
  """Tiny Mixtral by hand: every matrix listed once, experts at k / E."""
  module = load("mixtral_8x7b_tiny").module
  v, h, n, kv, d, f, e, layers = 512, 64, 4, 2, 16, 128, 8, 4
  attention = h * n * d * 2 + h * kv * d * 2
  experts = e * 3 * h * f
  per_layer = attention + experts + h * e + 2 * h  # + router + two norms
  total = layers * per_layer + 2 * v * h + h
  active = total - layers * experts * (1 - 2 / e)
  report = params.count(module, seq_len=16)
  assert (report.total, report.active) == (total, active)
  assert report.flops_per_token == 2 * (active - v * h) + 4 * layers * n * d * 16


@pytest.mark.parametrize("name", PRESETS)
def test_full_preset_shapes(name):
  module = load(name).module
  shapes = params.param_shapes(module, seq_len=2048)
  sparse = sorted({int(p.split("/")[0].split("_")[1]) for p in shapes if "/moe/" in p})
  assert tuple(sparse) == module.moe_ids
  if module.moe_layer is not None:
    e = module.sparse_sublayers()["moe"].num_experts
    wi = shapes[f"layers_{sparse[0]}/moe/experts/wi"].shape
    assert wi[0] == e and wi[1] == module.d_model


@pytest.mark.parametrize("name", PRESETS)
def test_tiny_preset_trains(name):
  # The batched reference expert kernels compile fastest; the CPU loop kernels that a
  # preset gets by default are checked against them in test_expert_kernels.py.
  lm = load(name + "_tiny", "moe_layer.MoeLayer.expert_implementation = 'reference'")
  toks = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 1, lm.module.vocab_size)
  batch = dict(decoder_input_tokens=toks, decoder_target_tokens=jnp.roll(toks, -1, axis=1))
  variables = jax.jit(lm.module.init)(jax.random.PRNGKey(1), toks)
  params_, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  rngs = {s: jax.random.PRNGKey(i) for i, s in enumerate(["dropout", "jitter", "gating_noise",
                                                           "routing"])}

  def loss_fn(p):
    (loss, metrics), _ = lm.loss({"params": p, **state}, batch, rngs=rngs,
                                 deterministic=False, mutable=list(state))
    return loss, metrics

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params_)
  assert np.isfinite(float(loss))
  assert float(loss) == pytest.approx(np.log(lm.module.vocab_size), rel=0.3)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(nn.meta.unbox(grads))]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) >= 0.9 * len(norms)
  if lm.module.moe_layer is not None:
    assert "moe/dropped_fraction" in metrics and "loss/aux_loss" in metrics
  # The losses average over every sparse sub-layer: the FFN's ("moe/") and the attention's
  # ("moe_attention/", SwitchHead), each reported per layer.
  ids = lm.module.sparse_layer_ids()
  per_layer = [metrics[f"{'moe' if kind == 'moe' else 'moe_' + kind}/layer_{i}/{loss}"]
               for loss in ("aux_loss", "z_loss") for kind in ids for i in ids[kind]]
  if per_layer:
    half = len(per_layer) // 2
    np.testing.assert_allclose(metrics["loss/aux_loss"], np.mean(per_layer[:half]), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/router_z_loss"], np.mean(per_layer[half:]),
                               rtol=1e-5)
  if name == "switchhead":
    assert ids == {"attention": (0, 1, 2, 3), "moe": (1, 3)}
    assert metrics["moe_attention/layer_2/expert_load_after"].shape == (4,)
    assert "moe/layer_2/dropped_fraction" not in metrics


@pytest.mark.parametrize("name", ["switch_base_8_tiny", "st_moe_32b_tiny"])
def test_tiny_encoder_decoder_trains(name):
  """Tied ReLU top-1 / untied top-2 GEGLU with the extra dense FFN."""
  # Two layers a stack (ST-MoE's MoE every 2nd instead of 4th): a quick compile, same recipe.
  lm = load(name, "moe_layer.MoeLayer.expert_implementation = 'reference'", "NUM_LAYERS = 2",
            "MOE_EVERY = 2")
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  inputs = jax.random.randint(keys[0], (2, 24), 1, lm.module.vocab_size)
  targets = jax.random.randint(keys[1], (2, 12), 1, lm.module.vocab_size)
  batch = dict(encoder_input_tokens=inputs, decoder_target_tokens=targets,
               decoder_input_tokens=jnp.pad(targets[:, :-1], ((0, 0), (1, 0))))
  variables = jax.jit(lm.module.init)(jax.random.PRNGKey(1), inputs)
  rngs = {"dropout": jax.random.PRNGKey(2)}
  loss_fn = lambda p: lm.loss({"params": p}, batch, rngs=rngs)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables["params"])
  assert float(loss) == pytest.approx(np.log(lm.module.vocab_size), rel=0.3)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(nn.meta.unbox(grads))]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) >= 0.9 * len(norms)
  ids = lm.module.sparse_layer_ids()
  assert set(ids) == {"encoder/moe", "decoder/moe"}
  per_layer = [metrics[f"{kind}/layer_{i}/aux_loss"] for kind in ids for i in ids[kind]]
  np.testing.assert_allclose(metrics["loss/aux_loss"], np.mean(per_layer), rtol=1e-5)


@pytest.mark.parametrize("name,dropout,expert_dropout,eval_cf", [
    ("switch_base_8", 0.1, 0.4, 2.0), ("st_moe_32b", 0.1, 0.1, 1.0),
    ("switch_xxl_128", 0.1, 0.4, 4.0), ("switch_base_decoder_only", 0.1, 0.4, 2.0),
    ("mixtral_8x7b", 0.1, 0.1, 2.0)])
def test_finetune_gin_applies_the_presets_fine_tuning_recipe(name, dropout, expert_dropout,
                                                             eval_cf):
  config.load_model([f"gin_configs/models/{name}.gin", "gin_configs/runs/finetune.gin"],
                    ["INIT_CHECKPOINT = '/nowhere'", "MODEL_DIR = '/nowhere'"])
  module = config.configured_model().module
  assert module.dropout_rate == dropout
  layers = module.sparse_sublayers().values()
  assert {layer.expert_dropout_rate for layer in layers} == {expert_dropout}
  assert {layer.eval_capacity_factor for layer in layers} == {eval_cf}


@pytest.mark.parametrize("binding,match", [
    ("MOE_EVERY = 0", "moe_every must be >= 1"),
    ("NUM_HEADS = 5\nHEAD_DIM = None", "num_heads=5 must divide d_model=64"),
    ("NUM_KV_HEADS = 3", "num_kv_heads=3 must divide num_heads=4"),
    ("TOP_K = 9", "num_selected_experts"),
    ("NUM_EXPERT_PARTITIONS = 3", "num_experts=8 must be divisible by num_expert_partitions=3"),
    ("DISPATCH = 'scatter'", "dispatch"),
    ("ACTIVATION = 'swish'", "activation must be one of"),
])
def test_bad_presets_raise_clear_errors(binding, match):
  with pytest.raises(ValueError, match=match):
    lm = load("glam_tiny", *binding.split("\n"))
    params.param_shapes(lm.module, 8)


def test_presets_carry_their_partitioning_rules():
  load("glam")
  assert dict(config.configured_rules())["embed"] == "data"  # FSDP for the 1.2T preset
  load("glam_tiny")
  rules = dict(config.configured_rules())
  assert rules["embed"] is None and rules["expert"] == "expert"
  assert rules["expert_mlp"] == "model"  # 2D expert sharding
