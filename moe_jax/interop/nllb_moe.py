"""Hugging Face `NllbMoeForConditionalGeneration` <-> moe_jax `EncoderDecoder`.

NLLB-MoE (NLLB Team 2022) is a fairseq-style encoder-decoder: pre-norm LayerNorm with biases,
biases in every projection, token embeddings × √H plus fairseq's sinusoidal positions (offset
2, the padding id 1), ReLU FFNs, a top-2 MoE in every `sparse_step`-th FFN (layers step−1,
2·step−1, …), output logits from the tied embedding without scaling. The import builds that
from config.json (norm="layer", use_bias, scale_embeddings, position_embedding="sinusoidal",
tied_output_scale=False; MoeLayer with expert_bias and token_dropout_rate).

Their layout (torch Linear weights are [out, in]; prefix "model."):

    shared.weight [V, H] (= encoder/decoder.embed_tokens.weight = lm_head.weight when tied)
    {encoder,decoder}.layers.i.self_attn.{q,k,v,out}_proj.{weight,bias}, self_attn_layer_norm
    decoder.layers.i.cross_attention.{q,k,v,out}_proj.*, cross_attention_layer_norm
    …layers.i.ffn.fc{1,2}.{weight,bias} (dense) | ffn.router.classifier.weight [E, H],
      ffn.experts.expert_j.fc{1,2}.{weight,bias} (sparse); ff_layer_norm
    {encoder,decoder}.layer_norm.{weight,bias}

Where the semantics differ:
  * Capacity. Theirs counts slots over the whole batch (all top-1 choices first, then top-2):
    in evaluation ceil(moe_eval_capacity_token_fraction · tokens) (1.0: nothing dropped), in
    training the fixed `expert_capacity`. Ours routes each sequence as a group: the import sets
    the eval capacity factor to fraction · E / 2 (a sequence's tokens, fraction 1: nothing
    dropped either) and keeps our training capacity factor. With drops, which tokens drop
    differs.
  * Gates are top-1 / top-2 probabilities renormalised to sum to 1; theirs renormalise after
    dropping by default (a token whose second choice dropped keeps weight 1 on the first), ours
    before (it keeps its first weight).
  * `moe_token_dropout` p, as transformers' NllbMoe applies it: the expert output is scaled by
    (1 − p) in evaluation and dropped out (rate p, rescaled by 1 / (1 − p)) in training, so its
    evaluation expectation is (1 − p) times its training one; ours on the combined output,
    theirs per expert output (the same in evaluation). Training from such a checkpoint keeps
    that mismatch, as theirs does.
  * second_expert_policy "sampling" and "random" draw noise even in evaluation; only "all" is
    imported.
  * Padding: their padding id is 1 and the model reads an attention mask; ours treats id 0 as
    padding (id 0 is NLLB's <s>). Feed unpadded rows (or pack) for equal logits. Decoding
    starts from config.json's decoder_start_token_id (2), which the import keeps.
  * transformers 5.25's `NllbMoeExperts.forward` one-hots an index it already one-hot encoded:
    only experts 0 and 1 ever run. The parity test patches it with the intended sum over the
    chosen experts (transformers 4.x's); checkpoints are unaffected.

    module, params = import_checkpoint("path/to/hf_dir")
    export_checkpoint(module, params, "out_dir")
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import numpy as np

from moe_jax.encoder_decoder import EncoderDecoder
from moe_jax.moe_layer import MoeLayer
from moe_jax.interop import tensors as tensors_lib
from moe_jax.interop.tensors import Tensors, take_tied
from moe_jax.routing import TokenChoiceRouter

MODEL_TYPE = "nllb-moe"
_STACKS = ("encoder", "decoder")


def sparse_layers(cfg: Mapping[str, Any], stack: str) -> Tuple[int, ...]:
  step = cfg.get(f"{stack}_sparse_step", 4)
  return tuple(i for i in range(cfg[f"{stack}_layers"]) if step > 0 and (i + 1) % step == 0)


def encoder_decoder_from_hf_config(cfg: Mapping[str, Any], **overrides) -> EncoderDecoder:
  """The `EncoderDecoder` an NLLB-MoE config.json describes; unsupported settings are refused
  by name."""
  if cfg.get("model_type") != MODEL_TYPE:
    raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {cfg.get('model_type')!r}.")
  required = {"router_bias": False, "second_expert_policy": "all",
              "activation_function": "relu", "pad_token_id": 1}
  for name, supported in required.items():
    if cfg.get(name, supported) != supported:
      raise ValueError(f"config.json {name}={cfg.get(name)!r} is not supported; the NLLB-MoE "
                       f"import needs {name}={supported!r}.")
  for a, b in (("encoder_attention_heads", "decoder_attention_heads"),
               ("encoder_ffn_dim", "decoder_ffn_dim")):
    if cfg[a] != cfg[b]:
      raise ValueError(f"config.json {a}={cfg[a]} differs from {b}={cfg[b]}: moe_jax's "
                       "encoder-decoder shares one value.")
  e = cfg["num_experts"]
  fraction = float(cfg.get("moe_eval_capacity_token_fraction", 1.0))
  moe = functools.partial(
      MoeLayer, router=TokenChoiceRouter(
          2, normalize_combine_weights=True,
          batch_prioritized=bool(cfg.get("batch_prioritized_routing", False))),
      num_experts=e, expert_hidden_dim=cfg["encoder_ffn_dim"], activation="relu",
      dispatch="gather", eval_capacity_factor=max(fraction, 1e-9) * e / 2, expert_bias=True,
      token_dropout_rate=float(cfg.get("moe_token_dropout", 0.0)))
  settings = dict(
      vocab_size=cfg["vocab_size"], d_model=cfg["d_model"],
      num_heads=cfg["encoder_attention_heads"], mlp_dim=cfg["encoder_ffn_dim"],
      num_encoder_layers=cfg["encoder_layers"], num_decoder_layers=cfg["decoder_layers"],
      activation="relu", dropout_rate=float(cfg.get("dropout", 0.0)),
      attention_dropout_rate=float(cfg.get("attention_dropout", 0.0)), norm="layer",
      norm_epsilon=1e-5, use_bias=True, scale_embeddings=bool(cfg.get("scale_embedding", True)),
      position_embedding="sinusoidal", sinusoidal_offset=2,
      tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), tied_output_scale=False,
      decoder_start_id=int(cfg.get("decoder_start_token_id", 2)))
  for stack in _STACKS:
    ids = sparse_layers(cfg, stack)
    if ids:
      settings.update({f"{stack}_moe_layer": moe, f"{stack}_moe_layer_indices": ids})
  settings.update(overrides)
  return EncoderDecoder(**settings)


def hf_to_params(tensors: Mapping[str, np.ndarray], module: EncoderDecoder) -> Dict:
  """Flat HF state dict -> our param tree (float32 numpy); every tensor must be read."""
  ts = Tensors(tensors)
  h, n = module.d_model, module.num_heads
  d = module.head_dim or h // n
  shared = take_tied(ts, "model.shared.weight", ("model.encoder.embed_tokens.weight",
                                                  "model.decoder.embed_tokens.weight",
                                                  "lm_head.weight"), module.tie_embeddings)
  params = {"token_embed": {"embedding": shared}}
  if not module.tie_embeddings:
    params["lm_head"] = ts.take("lm_head.weight").T
  norm = lambda p: {"scale": ts.take(p + ".weight"), "bias": ts.take(p + ".bias")}

  def attention(p):
    w = {}
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      w[ours] = ts.take(f"{p}.{theirs}_proj.weight").T.reshape(h, n, d)
      w[ours + "_bias"] = ts.take(f"{p}.{theirs}_proj.bias").reshape(n, d)
    w["out"] = ts.take(f"{p}.out_proj.weight").T.reshape(n, d, h)
    w["out_bias"] = ts.take(f"{p}.out_proj.bias")
    return w

  def ffn(p):
    return {"wi": ts.take(p + "fc1.weight").T, "wi_bias": ts.take(p + "fc1.bias"),
            "wo": ts.take(p + "fc2.weight").T, "wo_bias": ts.take(p + "fc2.bias")}

  for stack in _STACKS:
    tree = {"final_norm": norm(f"model.{stack}.layer_norm")}
    for i in range(getattr(module, f"num_{stack}_layers")):
      p = f"model.{stack}.layers.{i}."
      layer = {"attention": attention(p + "self_attn"),
               "pre_attention_norm": norm(p + "self_attn_layer_norm"),
               "pre_mlp_norm": norm(p + "ff_layer_norm")}
      if stack == "decoder":
        layer["cross_attention"] = attention(p + "cross_attention")
        layer["pre_cross_attention_norm"] = norm(p + "cross_attention_layer_norm")
      if i in module.moe_ids(stack):
        e = module.sparse_sublayers()[f"{stack}/moe"].num_experts
        experts = [ffn(p + f"ffn.experts.expert_{j}.") for j in range(e)]
        layer["moe"] = {
            "router": {"logits": {"kernel": ts.take(p + "ffn.router.classifier.weight").T}},
            "experts": {w: np.stack([x[w] for x in experts]) for w in experts[0]}}
      else:
        layer["mlp"] = ffn(p + "ffn.")
      tree[f"layers_{i}"] = layer
    params[stack] = tree
  ts.check_all_read()
  return params


def params_to_hf(params: Mapping, module: EncoderDecoder) -> Dict[str, np.ndarray]:
  """Our param tree -> flat HF state dict (the inverse of `hf_to_params`)."""
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  h = module.d_model
  shared = a(params["token_embed"]["embedding"])
  out = {"model.shared.weight": shared, "model.encoder.embed_tokens.weight": shared.copy(),
         "model.decoder.embed_tokens.weight": shared.copy(),
         "lm_head.weight": shared.copy() if module.tie_embeddings
                           else a(np.asarray(params["lm_head"]).T)}

  def norm(p, w):
    out[p + ".weight"], out[p + ".bias"] = a(w["scale"]), a(w["bias"])

  def attention(p, w):
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      out[f"{p}.{theirs}_proj.weight"] = a(np.asarray(w[ours]).reshape(h, -1).T)
      out[f"{p}.{theirs}_proj.bias"] = a(np.asarray(w[ours + "_bias"]).reshape(-1))
    out[f"{p}.out_proj.weight"] = a(np.asarray(w["out"]).reshape(-1, h).T)
    out[f"{p}.out_proj.bias"] = a(w["out_bias"])

  def ffn(p, w):
    out[p + "fc1.weight"], out[p + "fc1.bias"] = a(np.asarray(w["wi"]).T), a(w["wi_bias"])
    out[p + "fc2.weight"], out[p + "fc2.bias"] = a(np.asarray(w["wo"]).T), a(w["wo_bias"])

  for stack in _STACKS:
    tree = params[stack]
    norm(f"model.{stack}.layer_norm", tree["final_norm"])
    for i in range(getattr(module, f"num_{stack}_layers")):
      p, layer = f"model.{stack}.layers.{i}.", tree[f"layers_{i}"]
      attention(p + "self_attn", layer["attention"])
      norm(p + "self_attn_layer_norm", layer["pre_attention_norm"])
      norm(p + "ff_layer_norm", layer["pre_mlp_norm"])
      if stack == "decoder":
        attention(p + "cross_attention", layer["cross_attention"])
        norm(p + "cross_attention_layer_norm", layer["pre_cross_attention_norm"])
      if "moe" in layer:
        out[p + "ffn.router.classifier.weight"] = a(
            np.asarray(layer["moe"]["router"]["logits"]["kernel"]).T)
        experts = layer["moe"]["experts"]
        for j in range(np.asarray(experts["wi"]).shape[0]):
          ffn(p + f"ffn.experts.expert_{j}.", {w: np.asarray(v)[j] for w, v in experts.items()})
      else:
        ffn(p + "ffn.", layer["mlp"])
  return out


def hf_config(module: EncoderDecoder) -> Dict[str, Any]:
  """The config.json of an NLLB-style `module` (as `encoder_decoder_from_hf_config` builds)."""
  tensors_lib.require_settings(
      module, {"norm": "layer", "use_bias": True, "position_embedding": "sinusoidal",
               "tied_output_scale": False, "activation": "relu", "moe_dense_ffn": "none"},
      "NLLB-MoE")
  layers = list(module.sparse_sublayers().values())
  for layer in layers:
    for name, value in (("num_selected_experts", 2), ("expert_bias", True),
                        ("num_experts", layers[0].num_experts),
                        ("eval_capacity_factor", layers[0].eval_capacity_factor),
                        ("token_dropout_rate", layers[0].token_dropout_rate)):
      have = getattr(layer.router if name == "num_selected_experts" else layer, name)
      if have != value:
        raise ValueError(f"NLLB-MoE needs MoE layers with {name}={value!r} (in both "
                         f"stacks); this model has {have!r}.")
  layer = layers[0]
  steps = {stack: tensors_lib.every_step(module.moe_ids(stack),
                                         getattr(module, f"num_{stack}_layers"),
                                         lambda i, s: (i + 1) % s == 0)
           for stack in _STACKS}
  return {
      "model_type": MODEL_TYPE, "architectures": ["NllbMoeForConditionalGeneration"],
      "vocab_size": module.vocab_size, "d_model": module.d_model,
      "encoder_layers": module.num_encoder_layers, "decoder_layers": module.num_decoder_layers,
      "encoder_attention_heads": module.num_heads, "decoder_attention_heads": module.num_heads,
      "encoder_ffn_dim": module.mlp_dim, "decoder_ffn_dim": module.mlp_dim,
      "encoder_sparse_step": steps["encoder"], "decoder_sparse_step": steps["decoder"],
      "num_experts": layer.num_experts, "expert_capacity": 64, "router_bias": False,
      "moe_token_dropout": layer.token_dropout_rate, "second_expert_policy": "all",
      # Ours: a sequence's eval capacity cf · 2 · S / E, i.e. this fraction of its tokens.
      "moe_eval_capacity_token_fraction": min(layer.eval_capacity_factor * 2 / layer.num_experts,
                                              1.0),
      # Ours renormalises the two gates before capacity drops, and routes no padding.
      "normalize_router_prob_before_dropping": True, "router_ignore_padding_tokens": False,
      "batch_prioritized_routing": bool(layer.router.batch_prioritized),
      "activation_function": "relu", "scale_embedding": module.scale_embeddings,
      "tie_word_embeddings": module.tie_embeddings, "dropout": module.dropout_rate,
      "attention_dropout": module.attention_dropout_rate, "activation_dropout": 0.0,
      "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "pad_token_id": 1, "bos_token_id": 0,
      "eos_token_id": 2, "decoder_start_token_id": module.decoder_start_id,
      "is_encoder_decoder": True}


def import_checkpoint(path: str, module: Optional[EncoderDecoder] = None, shardings: Any = None
                      ) -> Tuple[EncoderDecoder, Dict]:
  """(module, params) from a Hugging Face directory (config.json + safetensors)."""
  return tensors_lib.load(path, encoder_decoder_from_hf_config, hf_to_params, module, shardings)


def export_checkpoint(module: EncoderDecoder, params: Mapping, path: str,
                      config_overrides: Optional[Mapping[str, Any]] = None) -> None:
  """Writes config.json and model.safetensors that transformers loads."""
  cfg = {**hf_config(module), **dict(config_overrides or {})}
  tensors_lib.save(path, params_to_hf(nn.meta.unbox(params), module), cfg)
