"""Qwen3-MoE, OLMoE, DeepSeek-V3 and DeepSeek-V2 checkpoints: on tiny random instances (several
layers, dense ones among them, shared experts and GQA where the family has them, a vocabulary
of a few hundred), our logits equal transformers' within 1e-5 in float32, greedy decoding gives
the same tokens, decoding with our cache (MLA's latent cache included) equals the full pass,
and export -> from_pretrained gives back transformers' logits exactly."""
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


def cached_equals_full(module, variables, ids, prefill=5, atol=1e-5):
  """Logits of a prefill then one token at a time, through the decoding cache, against the
  full forward pass of the same tokens."""
  full, _ = jax.jit(module.apply)(variables, jnp.asarray(ids))
  cache = module.init(jax.random.PRNGKey(0), jnp.asarray(ids), decode=True)["cache"]
  step = jax.jit(lambda v, t: module.apply(v, t, decode=True, mutable=["cache"]))
  chunks, state = [], dict(variables, cache=cache)
  for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
    (logits, _), updates = step(state, jnp.asarray(ids[:, start:stop]))
    state["cache"] = updates["cache"]
    chunks.append(logits)
  diff = float(jnp.abs(jnp.concatenate(chunks, 1) - full).max())
  assert diff <= atol, diff


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
  cached_equals_full(module, variables, ids)
  round_trip(tmp_path, module, variables, theirs, cls, ids)
  return module, variables


def test_qwen3_moe_per_head_qk_norm(tmp_path, capsys):
  cfg = transformers.Qwen3MoeConfig(
      **COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
      num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=3,
      norm_topk_prob=True, mlp_only_layers=[1])
  module, _ = check_family(tmp_path, capsys, transformers.Qwen3MoeForCausalLM, cfg, 3,
                           "qwen3_moe")
  assert module.qk_norm == "head" and module.moe_ids == (0, 2) and module.head_dim == 24
  assert module.moe_layer(parent=None).router.normalize_combine_weights


def test_olmoe_full_width_qk_norm(tmp_path, capsys):
  cfg = transformers.OlmoeConfig(
      **COMMON, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2,
      num_experts=8, num_experts_per_tok=4, pad_token_id=1)
  module, variables = check_family(tmp_path, capsys, transformers.OlmoeForCausalLM, cfg, 4,
                                   "olmoe")
  assert module.qk_norm == "full"
  assert variables["params"]["layers_0"]["attention"]["key_norm"]["scale"].shape == (32,)


def _random_expert_bias(model):
  """transformers initialises e_score_correction_bias to 0; a trained model's is not."""
  with torch.no_grad():
    for layer in model.model.layers:
      if hasattr(layer.mlp, "gate"):
        layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)


@pytest.mark.parametrize("q_lora_rank,interleave", [(24, True), (None, False)])
def test_deepseek_v3_mla_group_limited_routing(tmp_path, capsys, q_lora_rank, interleave):
  cfg = transformers.DeepseekV3Config(
      **COMMON, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
      num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
      topk_group=2, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
      norm_topk_prob=True, q_lora_rank=q_lora_rank, kv_lora_rank=20, qk_nope_head_dim=12,
      qk_rope_head_dim=8, v_head_dim=10, rope_interleave=interleave)
  module, variables = check_family(tmp_path, capsys, transformers.DeepseekV3ForCausalLM, cfg,
                                   5, f"deepseek_v3 (q_lora_rank={q_lora_rank})",
                                   _random_expert_bias)
  router = module.moe_layer(parent=None).router
  assert (router.num_groups, router.top_groups, router.routed_scaling_factor) == (4, 2, 2.5)
  assert module.moe_ids == (1, 2) and module.shared_expert_dim == 32
  bias = variables["moe_balance"]["layers_1"]["moe"]["router"]["expert_bias"]
  assert float(jnp.abs(bias).max()) > 0


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
