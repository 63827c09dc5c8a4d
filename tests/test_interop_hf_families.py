"""Qwen3-MoE, OLMoE, DeepSeek-V3 and DeepSeek-V2 checkpoints: on tiny random instances (several
layers, dense ones among them, shared experts and GQA where the family has them, a vocabulary
of a few hundred), our logits equal transformers' within 1e-5 in float32, greedy decoding gives
the same tokens, decoding with our cache (MLA's latent cache included) equals the full pass
within 1e-5 (test_interop_hf.assert_same_as_transformers), and export -> from_pretrained gives
back transformers' logits exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax.interop import huggingface as hf  # noqa: E402
from tests.test_interop_hf import assert_same_as_transformers, hf_logits, text_ids  # noqa: E402

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4,
              max_position_embeddings=128, tie_word_embeddings=False,
              attn_implementation="eager")
# YaRN with the factor of 4 over an original context of 32 (θ 1e4 so that the ramp between
# interpolated and kept dimensions falls inside the tiny head dims).
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}


def round_trip(tmp_path, module, variables, theirs, cls, ids):
  hf.export_checkpoint(module, variables, str(tmp_path / "back"), theirs.config.to_dict())
  again = cls.from_pretrained(tmp_path / "back", attn_implementation="eager").float().eval()
  np.testing.assert_array_equal(hf_logits(again, ids), hf_logits(theirs, ids))


def check_family(tmp_path, capsys, cls, cfg, seed, name, prepare=None):
  torch.manual_seed(seed)
  theirs = cls(cfg).float().eval()
  if prepare is not None:
    prepare(theirs)
  theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
  module, variables = hf.import_checkpoint(str(tmp_path / "hf"))
  ids = text_ids(VOCAB, length=12)
  assert_same_as_transformers(name, module, variables, theirs, ids, capsys, new_tokens=5,
                              atol=1e-5)
  round_trip(tmp_path, module, variables, theirs, cls, ids)
  return module, variables


def test_qwen3_moe_per_head_qk_norm(tmp_path, capsys):
  """With YaRN as Qwen ships it for long contexts (cos and sin × (0.1 ln factor + 1))."""
  cfg = transformers.Qwen3MoeConfig(
      **COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
      num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=3,
      norm_topk_prob=True, mlp_only_layers=[1], rope_parameters=dict(YARN))
  module, _ = check_family(tmp_path, capsys, transformers.Qwen3MoeForCausalLM, cfg, 3,
                           "qwen3_moe")
  assert module.qk_norm == "head" and module.moe_ids == (0, 2) and module.head_dim == 24
  assert module.rope_scaling.cos_sin_scale == pytest.approx(0.1 * np.log(4.0) + 1)
  assert module.moe_layer(parent=None).router.normalize_combine_weights


def test_olmoe_full_width_qk_norm(tmp_path, capsys):
  cfg = transformers.OlmoeConfig(
      **COMMON, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2,
      num_experts=8, num_experts_per_tok=4, pad_token_id=1)
  module, variables = check_family(tmp_path, capsys, transformers.OlmoeForCausalLM, cfg, 4,
                                   "olmoe")
  assert module.qk_norm == "full"
  assert variables["params"]["layers_0"]["attention"]["key_norm"]["scale"].shape == (32,)
  # Released checkpoints are bfloat16 (safetensors' numpy reader cannot hold it).
  from safetensors import safe_open
  bf16 = transformers.OlmoeForCausalLM.from_pretrained(tmp_path / "hf").to(torch.bfloat16)
  bf16.save_pretrained(tmp_path / "bf16", safe_serialization=True)
  with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="flax") as f:
    assert str(f.get_tensor("lm_head.weight").dtype) == "bfloat16"
  module, variables = hf.import_checkpoint(str(tmp_path / "bf16"))
  theirs = transformers.OlmoeForCausalLM.from_pretrained(
      tmp_path / "bf16", dtype=torch.float32, attn_implementation="eager").eval()
  ids = text_ids(VOCAB, length=12)
  ours, _ = jax.jit(module.apply)(variables, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(ours), hf_logits(theirs, ids), atol=1e-5)


def _random_expert_bias(model):
  """transformers initialises e_score_correction_bias to 0; a trained model's is not."""
  with torch.no_grad():
    for layer in model.model.layers:
      if hasattr(layer.mlp, "gate"):
        layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)


@pytest.mark.parametrize("q_lora_rank,interleave", [(24, True), (None, False)])
def test_deepseek_v3_mla_group_limited_routing(tmp_path, capsys, q_lora_rank, interleave):
  """The second case also extends RoPE by YaRN as DeepSeek-V3 ships it (mscale 1, and
  mscale_all_dim 1: its softmax scale × m(factor)²)."""
  rope = {} if interleave else dict(rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0))
  cfg = transformers.DeepseekV3Config(
      **COMMON, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
      num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
      topk_group=2, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
      norm_topk_prob=True, q_lora_rank=q_lora_rank, kv_lora_rank=20, qk_nope_head_dim=12,
      qk_rope_head_dim=8, v_head_dim=10, rope_interleave=interleave, **rope)
  module, variables = check_family(tmp_path, capsys, transformers.DeepseekV3ForCausalLM, cfg,
                                   5, f"deepseek_v3 (q_lora_rank={q_lora_rank})",
                                   _random_expert_bias)
  router = module.moe_layer(parent=None).router
  assert (router.num_groups, router.top_groups, router.routed_scaling_factor) == (4, 2, 2.5)
  assert module.moe_ids == (1, 2) and module.shared_expert_dim == 32
  bias = variables["moe_balance"]["layers_1"]["moe"]["router"]["expert_bias"]
  assert float(jnp.abs(bias).max()) > 0
  if not interleave:
    assert module.rope_scaling.softmax_scale == pytest.approx((0.1 * np.log(4.0) + 1) ** 2)


def test_deepseek_v2_group_limited_greedy(tmp_path, capsys):
  cfg = transformers.DeepseekV2Config(
      **COMMON, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=2,
      num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
      topk_group=2, topk_method="group_limited_greedy", n_shared_experts=1,
      first_k_dense_replace=1, routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=20,
      qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
  module, _ = check_family(tmp_path, capsys, transformers.DeepseekV2ForCausalLM, cfg, 6,
                           "deepseek_v2")
  assert module.moe_layer(parent=None).router.group_score == "max"


def _write_config(path, cfg):
  import json
  path.mkdir()
  (path / "config.json").write_text(json.dumps(cfg))
  return str(path)


@pytest.mark.parametrize("model_type,fields,message", [
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0 is not implemented: clipping"),
    ("qwen3_moe", dict(attention_bias=True), "attention_bias=True is not implemented"),
    ("qwen3_moe", dict(use_sliding_window=True), "use_sliding_window=True"),
    ("deepseek_v3", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
     "rope type 'longrope' is not implemented"),
    ("deepseek_v3", dict(num_key_value_heads=2), "num_key_value_heads=2 is not implemented"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method='noaux_tc' is not implemented"),
    ("deepseek_v2", dict(norm_topk_prob=True), "norm_topk_prob=True is not implemented"),
    ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act='gelu' is not implemented"),
])
def test_a_setting_the_import_does_not_implement_is_refused_by_name(tmp_path, model_type,
                                                                    fields, message):
  cfg = transformers.AutoConfig.for_model(model_type).to_dict()
  cfg.update(fields)
  with pytest.raises(ValueError, match=message):
    hf.import_checkpoint(_write_config(tmp_path / "hf", cfg))


def test_an_olmoe_checkpoint_passed_as_qwen2_moe_is_refused_by_name(tmp_path):
  """Its config lacks Qwen2-MoE's expert width; with that supplied, its QK-norm tensors are
  read by nothing: either way the error names what does not fit."""
  import json
  import shutil
  cfg = transformers.OlmoeConfig(**COMMON, intermediate_size=32, num_hidden_layers=1,
                                 num_experts=4, num_experts_per_tok=2)
  transformers.OlmoeForCausalLM(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
  raw = json.loads((tmp_path / "hf" / "config.json").read_text())
  raw["model_type"] = "qwen2_moe"
  (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ValueError, match="config.json has no 'moe_intermediate_size'"):
    hf.import_checkpoint(str(tmp_path / "hf"))
  shutil.copytree(tmp_path / "hf", tmp_path / "hf2")
  raw.update(moe_intermediate_size=32, shared_expert_intermediate_size=0, qkv_bias=False)
  (tmp_path / "hf2" / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ValueError, match=r"did not read.*self_attn\.k_norm\.weight"):
    hf.import_checkpoint(str(tmp_path / "hf2"))


@pytest.mark.parametrize("preset,model_type,cls", [
    ("deepseek_v3_tiny", "deepseek_v3", "DeepseekV3ForCausalLM"),
    ("deepseek_v2_lite_tiny", "deepseek_v2", "DeepseekV2ForCausalLM"),
    ("qwen3_30b_a3b_tiny", "qwen3_moe", "Qwen3MoeForCausalLM"),
    ("olmoe_1b_7b_tiny", "olmoe", "OlmoeForCausalLM"),
])
def test_a_model_trained_from_a_preset_exports_with_a_made_config(tmp_path, preset,
                                                                  model_type, cls):
  """The preset's model (scanned, with a random aux-loss-free bias for V3), exported with the
  config hf_configs makes for it, computes in transformers what it computes here."""
  from moe_jax import config
  module = config.load_model([f"gin_configs/models/{preset}.gin"]).module
  ids = text_ids(module.vocab_size, length=10)
  variables = dict(jax.jit(module.init)(jax.random.PRNGKey(0), jnp.asarray(ids)))
  if "moe_balance" in variables:
    variables["moe_balance"] = jax.tree.map(
        lambda b: jax.random.normal(jax.random.PRNGKey(1), b.shape) * 0.05,
        variables["moe_balance"])
  ours, _ = jax.jit(module.apply)(variables, jnp.asarray(ids))
  hf.export_checkpoint(module, variables, str(tmp_path / "out"), model_type=model_type)
  theirs = getattr(transformers, cls).from_pretrained(
      tmp_path / "out", attn_implementation="eager").float().eval()
  np.testing.assert_allclose(hf_logits(theirs, ids), np.asarray(ours), atol=1e-5)


def test_a_model_a_family_cannot_express_is_refused_naming_the_settings():
  from moe_jax import config
  from moe_jax.interop.hf_configs import hf_config
  module = config.load_model(["gin_configs/models/olmoe_1b_7b_tiny.gin"]).module
  with pytest.raises(ValueError, match=r"qwen3_moe cannot express this model.*'qk_norm': "
                                       r"\('full', 'head'\)"):
    hf_config(module, "qwen3_moe")
  with pytest.raises(ValueError, match="deepseek_v3 needs multi-head latent attention"):
    hf_config(module, "deepseek_v3")
  with pytest.raises(ValueError, match="model_type must be one of .*'olmoe'.*got 'olmo'"):
    hf_config(module, "olmo")
  with pytest.raises(ValueError, match="give hf_config .* or model_type"):
    hf.export_checkpoint(module, {}, "/nonexistent/never")
