"""Hugging Face checkpoints: our logits and greedy tokens equal transformers' own (float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax import config, decoding  # noqa: E402
from moe_jax.interop import huggingface as hf  # noqa: E402

TEXT = ("def load_checkpoint(path):\n    # Mixture-of-experts layers route each token to two "
        "of eight experts.\n    return restore(path)\n")
RULES = (("expert", "model"), ("vocab", "model"), ("heads", "model"), ("embed", None),
         ("mlp", "model"), ("expert_mlp", None), ("kv_heads", None), ("kv", None),
         ("layers", None))


def text_ids(vocab, batch=2, length=24):
  """Real text as ids: UTF-8 bytes folded into the vocabulary, one row per offset."""
  data = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int64) % (vocab - 1) + 1
  return np.stack([data[i * 7: i * 7 + length] for i in range(batch)])


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.float().numpy()


def hf_greedy(model, ids, n):
  with torch.no_grad():
    out = model.generate(torch.as_tensor(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
  return out[:, ids.shape[1]:].numpy()


def assert_same_as_transformers(name, module, variables, theirs, ids, capsys, new_tokens=8,
                                atol=1e-4):
  """Our greedy continuation (cached decoding) is transformers'; over prompt + continuation
  our logits are theirs within atol (the max difference is printed); and the logits each new
  token was drawn from, through our cache, are the full pass's within atol (cache = recompute).
  One full pass serves both comparisons: a compile less per model."""
  new, step_logits = decoding.generate(module, variables, jnp.asarray(ids),
                                       max_new_tokens=new_tokens)
  np.testing.assert_array_equal(np.asarray(new), hf_greedy(theirs, ids, new_tokens))
  both = np.concatenate([ids, np.asarray(new)], axis=1)
  ours, _ = jax.jit(module.apply)(variables, jnp.asarray(both))
  diff = float(np.abs(np.asarray(ours) - hf_logits(theirs, both)).max())
  cached = float(np.abs(np.asarray(step_logits)
                        - np.asarray(ours)[:, ids.shape[1] - 1:-1]).max())
  with capsys.disabled():
    print(f"\n{name}: max |logits − transformers| = {diff:.2e}; cached decoding vs the full "
          f"pass {cached:.2e}")
  assert diff <= atol and cached <= atol, (diff, cached)


def tiny_mixtral(tmp_path):
  """A random MixtralForCausalLM with the dimensions of our mixtral_8x7b_tiny preset."""
  cfg = transformers.MixtralConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
      num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=128,
      tie_word_embeddings=False, attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.MixtralForCausalLM(cfg).float().eval()
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  return model, cfg


def test_mixtral_import_into_the_preset_matches_transformers(tmp_path, capsys):
  theirs, cfg = tiny_mixtral(tmp_path)
  module = config.load_model(["gin_configs/models/mixtral_8x7b_tiny.gin"]).module
  assert module.scan_layers  # the tiny preset's stacked tree
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "model"))
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), int)))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract)["params"], mesh, RULES)
  _, variables = hf.import_checkpoint(str(tmp_path / "hf"), module, shardings)
  wi = variables["params"]["layers"]["block_0"]["moe"]["experts"]["wi"]
  assert wi.sharding == NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model", None, None))
  assert_same_as_transformers("mixtral", module, variables, theirs, text_ids(512), capsys)


def test_mixtral_export_round_trip(tmp_path):
  theirs, cfg = tiny_mixtral(tmp_path)
  module, variables = hf.import_checkpoint(str(tmp_path / "hf"))  # module from config.json
  assert not module.scan_layers
  hf.export_checkpoint(module, variables, str(tmp_path / "back"), cfg.to_dict())
  again = transformers.MixtralForCausalLM.from_pretrained(
      tmp_path / "back", attn_implementation="eager").float().eval()
  ids = text_ids(512)
  np.testing.assert_array_equal(hf_logits(again, ids), hf_logits(theirs, ids))


def test_qwen2_moe_with_shared_experts_matches_transformers(tmp_path, capsys):
  cfg = transformers.Qwen2MoeConfig(
      vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
      shared_expert_intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
      num_key_value_heads=2, num_experts=8, num_experts_per_tok=3, max_position_embeddings=128,
      decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False,
      attn_implementation="eager")
  torch.manual_seed(1)
  theirs = transformers.Qwen2MoeForCausalLM(cfg).float().eval()
  theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
  module, variables = hf.import_checkpoint(str(tmp_path / "hf"))
  assert module.moe_ids == (0, 2) and module.shared_expert_gate and module.qkv_bias
  assert_same_as_transformers("qwen2_moe", module, variables, theirs, text_ids(300), capsys)


def test_shape_mismatch_is_a_clear_error(tmp_path):
  tiny_mixtral(tmp_path)
  wrong = config.load_model(["gin_configs/models/mixtral_8x7b_tiny.gin"],
                            ["NUM_EXPERTS = 4"]).module
  with pytest.raises(ValueError, match=r"moe.num_experts.: \(4, 8\)"):
    hf.import_checkpoint(str(tmp_path / "hf"), wrong)


def test_qwen2_moe_without_qkv_bias_matches_and_stray_tensors_are_named(tmp_path, capsys):
  """config.json's qkv_bias is read (it was assumed); a tensor nothing reads — the QK-norm
  weights an OLMoE checkpoint carries, were it passed as qwen2_moe — is an error naming it."""
  from safetensors.numpy import load_file, save_file
  cfg = transformers.Qwen2MoeConfig(
      vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
      shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
      qkv_bias=False, tie_word_embeddings=False, attn_implementation="eager")
  torch.manual_seed(2)
  theirs = transformers.Qwen2MoeForCausalLM(cfg).float().eval()
  theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
  module, variables = hf.import_checkpoint(str(tmp_path / "hf"))
  assert not module.qkv_bias
  assert_same_as_transformers("qwen2_moe (no qkv bias)", module, variables, theirs,
                              text_ids(300), capsys, new_tokens=4)
  path = tmp_path / "hf" / "model.safetensors"
  save_file({**load_file(path), "model.layers.0.self_attn.q_norm.weight":
             np.ones(64, np.float32)}, path)
  with pytest.raises(ValueError, match=r"did not read.*model\.layers\.0\.self_attn\.q_norm"):
    hf.import_checkpoint(str(tmp_path / "hf"))
