"""Hugging Face encoder-decoder MoE checkpoints: our logits and greedy tokens equal
transformers' own in float32 (SwitchTransformers), and export loads back identically."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax import encoder_decoder as ed  # noqa: E402
from moe_jax.interop import switch_transformers as st  # noqa: E402

TEXT = ("The Switch Transformer routes each token to one expert; ST-MoE adds a router z-loss "
        "and routes to two. def route(x): return top_k(x @ w_router, k=1)\n")


def text_ids(vocab, batch, length, offset=0):
  """Real text as ids: UTF-8 bytes folded into the vocabulary, one row per offset."""
  data = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int64) % (vocab - 2) + 2
  return np.stack([data[offset + i * 11: offset + i * 11 + length] for i in range(batch)])


def tiny_switch(tmp_path, **kw):
  """A random SwitchTransformersForConditionalGeneration: 4 + 4 layers, 2 sparse in each,
  ample capacity (64 slots per expert and sequence). Heads of 16: the √D folded into W_q is a
  power of two, so export → import → export is exact."""
  cfg = transformers.SwitchTransformersConfig(**{**dict(
      vocab_size=300, d_model=32, d_kv=16, d_ff=48, num_layers=4, num_decoder_layers=4,
      num_heads=4, num_experts=4, expert_capacity=64, num_sparse_encoder_layers=2,
      num_sparse_decoder_layers=2, router_jitter_noise=0.0, dropout_rate=0.0,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), **kw})
  torch.manual_seed(0)
  model = transformers.SwitchTransformersForConditionalGeneration(cfg).float().eval()
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  return model


def hf_logits(model, inputs, decoder_inputs):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(inputs),
                 decoder_input_ids=torch.as_tensor(decoder_inputs)).logits.float().numpy()


def test_switch_transformers_import_matches_transformers(tmp_path, capsys):
  theirs = tiny_switch(tmp_path)
  module, params = st.import_checkpoint(str(tmp_path / "hf"))
  assert module.moe_ids("encoder") == (1, 3) and module.moe_ids("decoder") == (1, 3)
  inputs, targets = text_ids(300, 2, 20), text_ids(300, 2, 12, offset=5)
  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  ours, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(inputs),
                                  jnp.asarray(decoder_inputs))
  diff = float(np.abs(np.asarray(ours) - hf_logits(theirs, inputs, decoder_inputs)).max())
  with capsys.disabled():
    print(f"\nswitch_transformers: max |logits − transformers| = {diff:.2e}")
  assert diff <= 1e-5
  new, _ = ed.generate(module, {"params": params}, jnp.asarray(inputs), max_new_tokens=8)
  with torch.no_grad():
    hf_new = theirs.generate(torch.as_tensor(inputs), max_new_tokens=8, do_sample=False,
                             eos_token_id=None).numpy()
  np.testing.assert_array_equal(np.asarray(new), hf_new[:, 1:])  # theirs starts with the start id


def test_switch_transformers_capacity_drops_as_theirs(tmp_path):
  """Over a capacity of 2 per expert and sequence, the same tokens get no expert output."""
  theirs = tiny_switch(tmp_path, expert_capacity=2)
  module, params = st.import_checkpoint(str(tmp_path / "hf"))
  inputs, targets = text_ids(300, 2, 20), text_ids(300, 2, 12, offset=5)
  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  ours, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(inputs),
                                  jnp.asarray(decoder_inputs))
  np.testing.assert_allclose(ours, hf_logits(theirs, inputs, decoder_inputs), atol=1e-5, rtol=0)


def test_switch_transformers_export_round_trip(tmp_path):
  theirs = tiny_switch(tmp_path)
  module, params = st.import_checkpoint(str(tmp_path / "hf"))
  st.export_checkpoint(module, params, str(tmp_path / "back"))
  again = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
      tmp_path / "back").float().eval()
  inputs, decoder_inputs = text_ids(300, 2, 16), text_ids(300, 2, 9, offset=3)
  np.testing.assert_array_equal(hf_logits(again, inputs, decoder_inputs),
                                hf_logits(theirs, inputs, decoder_inputs))


def test_switch_transformers_bad_checkpoints_name_the_tensor_or_setting(tmp_path):
  from safetensors.numpy import load_file, save_file
  tiny_switch(tmp_path)
  path = tmp_path / "hf"
  tensors = load_file(path / "model.safetensors")
  save_file({**tensors, "encoder.block.1.layer.1.mlp.router.classifier.bias":
             np.zeros(4, np.float32)}, path / "model.safetensors")
  with pytest.raises(ValueError, match=r"did not read.*router\.classifier\.bias"):
    st.import_checkpoint(str(path))
  del tensors["decoder.block.2.layer.1.EncDecAttention.k.weight"]
  save_file(tensors, path / "model.safetensors")
  with pytest.raises(ValueError, match=r"no tensor 'decoder\.block\.2\.layer\.1\.EncDecAttention"):
    st.import_checkpoint(str(path))
  cfg = transformers.SwitchTransformersConfig(router_bias=True).to_dict()
  with pytest.raises(ValueError, match="router_bias=True is not supported"):
    st.encoder_decoder_from_hf_config(cfg)
  from moe_jax.interop import nllb_moe
  cfg = transformers.NllbMoeConfig(second_expert_policy="random").to_dict()
  with pytest.raises(ValueError, match="second_expert_policy='random' is not supported; the "
                     "NLLB-MoE import needs second_expert_policy='all'"):
    nllb_moe.encoder_decoder_from_hf_config(cfg)


def test_switch_transformers_export_refuses_what_it_cannot_write(tmp_path):
  from moe_jax import config
  lm = config.load_model(["gin_configs/models/switch_base_8_tiny.gin"])  # routes by a factor
  with pytest.raises(ValueError, match=r"expert_capacity: give the fixed per-sequence capacity"):
    st.hf_config(lm.module)
  assert st.hf_config(lm.module, expert_capacity=16)["expert_capacity"] == 16
  with pytest.raises(ValueError, match=r"SwitchTransformers needs activation='relu'; this model "
                     "has 'geglu'"):
    st.hf_config(config.load_model(["gin_configs/models/st_moe_base_tiny.gin"]).module)
  with pytest.raises(ValueError, match="normalize_combine_weights=False"):
    st.hf_config(config.load_model(["gin_configs/models/switch_base_8_tiny.gin"], [
        "routing.TokenChoiceRouter.normalize_combine_weights = True"]).module, 16)


# --- NLLB-MoE ------------------------------------------------------------------------------

def _intended_nllb_experts(self, hidden_states, router_mask, router_probs):
  """NllbMoeExperts.forward as intended (transformers 4.x): Σ over the chosen experts of
  gate · expert(x), scaled by (1 − moe_token_dropout) in evaluation. 5.25's one-hots the
  already one-hot mask and so only ever runs experts 0 and 1 (moe_jax/interop/nllb_moe.py)."""
  out = torch.zeros_like(hidden_states)
  for e in range(self.num_experts):
    rows = torch.nonzero(router_probs[:, e] > 0).squeeze(-1)
    y = self[f"expert_{e}"](hidden_states[rows]) * router_probs[rows, e, None]
    if self.moe_token_dropout > 0 and not self.training:
      y = y * (1 - self.moe_token_dropout)
    out.index_add_(0, rows, y.to(hidden_states.dtype))
  return out


def tiny_nllb(tmp_path, monkeypatch, **kw):
  """A random NllbMoeForConditionalGeneration: 4 + 4 layers, top-2 MoE in layers 1 and 3 of
  each stack (sparse step 2), token dropout 0.2, padding id 1 (the rows hold none).
  router_ignore_padding_tokens skips 5.25's padding path, which inverts the attention mask."""
  from transformers.models.nllb_moe import modeling_nllb_moe
  monkeypatch.setattr(modeling_nllb_moe.NllbMoeExperts, "forward", _intended_nllb_experts)
  cfg = transformers.NllbMoeConfig(**{**dict(
      vocab_size=300, d_model=32, encoder_layers=4, decoder_layers=4,
      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
      decoder_ffn_dim=48, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2,
      moe_token_dropout=0.2, router_ignore_padding_tokens=True, max_position_embeddings=64),
      **kw})
  torch.manual_seed(0)
  model = transformers.NllbMoeForConditionalGeneration(cfg).float().eval()
  with torch.no_grad():  # random (not zero) biases and norms, so their mapping is tested
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  return model


def test_nllb_moe_import_matches_transformers(tmp_path, monkeypatch, capsys):
  theirs = tiny_nllb(tmp_path, monkeypatch)
  from moe_jax.interop import nllb_moe
  module, params = nllb_moe.import_checkpoint(str(tmp_path / "hf"))
  assert module.moe_ids("encoder") == (1, 3) and module.norm == "layer"
  inputs, targets = text_ids(300, 2, 20) + 1, text_ids(300, 2, 12, offset=5) + 1  # no 0 / 1
  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=2)
  ours, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(inputs),
                                  jnp.asarray(decoder_inputs))
  diff = float(np.abs(np.asarray(ours) - hf_logits(theirs, inputs, decoder_inputs)).max())
  with capsys.disabled():
    print(f"\nnllb_moe: max |logits − transformers| = {diff:.2e}")
  assert diff <= 1e-5
  assert module.decoder_start_id == 2  # from config.json
  new, _ = ed.generate(module, {"params": params}, jnp.asarray(inputs), max_new_tokens=8)
  with torch.no_grad():
    hf_new = theirs.generate(torch.as_tensor(inputs), max_new_tokens=8, do_sample=False,
                             num_beams=1, eos_token_id=None).numpy()
  np.testing.assert_array_equal(np.asarray(new), hf_new[:, 1:])
  export_dir = tmp_path / "back"
  # (router_ignore_padding_tokens as in tiny_nllb: 5.25's padding path inverts the mask)
  nllb_moe.export_checkpoint(module, params, str(export_dir),
                             {"router_ignore_padding_tokens": True})
  again = transformers.NllbMoeForConditionalGeneration.from_pretrained(export_dir).float().eval()
  np.testing.assert_array_equal(hf_logits(again, inputs, decoder_inputs),
                                hf_logits(theirs, inputs, decoder_inputs))
