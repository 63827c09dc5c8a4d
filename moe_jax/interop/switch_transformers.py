"""Hugging Face `SwitchTransformersForConditionalGeneration` <-> moe_jax `EncoderDecoder`.

Their layout (torch Linear weights are [out, in]):

    shared.weight [V, H] (= encoder/decoder.embed_tokens.weight, = lm_head.weight when tied)
    encoder.block.i.layer.0.SelfAttention.{q,k,v,o}.weight, .layer_norm.weight
      (block 0 only: SelfAttention.relative_attention_bias.weight [buckets, N], the stack's)
    encoder.block.i.layer.1.mlp.{wi,wo}.weight  (dense)   .layer.1.layer_norm.weight
      sparse: mlp.router.classifier.weight [E, H]; mlp.experts.expert_j.{wi,wo}.weight
    decoder.block.i.layer.0 self-attention, .layer.1.EncDecAttention.{q,k,v,o}.weight and
      .layer.1.layer_norm.weight, .layer.2 the FFN as the encoder's layer.1
    {encoder,decoder}.final_layer_norm.weight

maps onto ours as: query = q.weightᵀ [H, N, D] · √D (T5 has no 1/√D in its attention logits;
ours does, so the scale is folded into W_q: exact for D a power of 4, else within a rounding);
key, value, out likewise reshaped; rel_embedding = relative_attention_biasᵀ; experts wi / wo
= stacked transposes; router kernel = classifierᵀ; norms one to one.

Where the semantics differ (and how the import maps them):
  * Capacity: theirs is a fixed `expert_capacity` per expert and sequence, first come first
    served by position, in training and evaluation alike; a token over it gets zero output.
    Ours: one routing group per sequence, position priority, `min_capacity = expert_capacity`
    and capacity factors of ~0, so that the minimum is the capacity: the same tokens drop.
  * Padding: their router routes padding tokens (they take capacity); ours does not.
  * Jitter: theirs multiplies the router input (and, in float32, the experts' input too, in
    place) by U(1−ε, 1+ε) in training; ours jitters the router's input only. Not imported
    (training-time only; evaluation is unaffected).
  * Their config's sparse layers: block i of a stack is sparse iff sparse_step > 0 and
    (i % step == 1 or step == 1), step = `*_sparse_step` from config.json or
    num_layers // num_sparse_*_layers. For every other layer this is flaxformer's placement;
    for every 4th it is 1, 5, 9 (flaxformer: 3, 7, 11), which the import keeps as explicit
    `moe_layer_indices`.
  * Only top-1 routing, ReLU (non-gated) FFNs and no router bias exist there: Switch-XXL's and
    ST-MoE's GEGLU FFNs cannot be exported.

    module, params = import_checkpoint("path/to/hf_dir")      # module from config.json
    export_checkpoint(module, params, "out_dir")              # config.json + safetensors
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

MODEL_TYPE = "switch_transformers"
# Capacity factors that make `min_capacity` (= their expert_capacity) the capacity.
_NO_CAPACITY_FACTOR = 1e-9
_STACK_FFN = {"encoder": 1, "decoder": 2}  # index of the FFN sub-layer in a block


def sparse_layers(cfg: Mapping[str, Any], stack: str) -> Tuple[int, ...]:
  """The sparse blocks of a stack as transformers builds them (module docstring)."""
  layers = cfg["num_layers"] if stack == "encoder" else (cfg.get("num_decoder_layers")
                                                         or cfg["num_layers"])
  step = cfg.get(f"{stack}_sparse_step")
  if step is None:
    sparse = cfg.get(f"num_sparse_{stack}_layers", 0)
    step = layers // sparse if sparse else 0
  if step <= 0:
    return ()
  return tuple(i for i in range(layers) if step == 1 or i % step == 1)


def encoder_decoder_from_hf_config(cfg: Mapping[str, Any], **overrides) -> EncoderDecoder:
  """The `EncoderDecoder` a SwitchTransformers config.json describes; unsupported settings
  are refused by name."""
  if cfg.get("model_type") != MODEL_TYPE:
    raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {cfg.get('model_type')!r}.")
  unsupported = {"router_bias": (cfg.get("router_bias", False), False),
                 "is_gated_act": (cfg.get("is_gated_act", False), False),
                 "dense_act_fn": (cfg.get("dense_act_fn", "relu"), "relu"),
                 "router_type": (cfg.get("router_type", "tokens_masked"), "tokens_masked"),
                 "num_selected_experts": (cfg.get("num_selected_experts", 1), 1)}
  for name, (value, supported) in unsupported.items():
    if value != supported:
      raise ValueError(f"config.json {name}={value!r} is not supported; SwitchTransformers "
                       f"import needs {name}={supported!r}.")
  capacity = int(cfg["expert_capacity"])
  moe = functools.partial(
      MoeLayer, router=TokenChoiceRouter(1), num_experts=cfg["num_experts"],
      expert_hidden_dim=cfg["d_ff"], activation="relu", dispatch="gather",
      train_capacity_factor=_NO_CAPACITY_FACTOR, eval_capacity_factor=_NO_CAPACITY_FACTOR,
      min_capacity=capacity)
  settings = dict(
      vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], num_heads=cfg["num_heads"],
      head_dim=cfg["d_kv"], mlp_dim=cfg["d_ff"], num_encoder_layers=cfg["num_layers"],
      num_decoder_layers=cfg.get("num_decoder_layers") or cfg["num_layers"],
      activation="relu", norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
      dropout_rate=float(cfg.get("dropout_rate", 0.0)),
      relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))
  for stack in ("encoder", "decoder"):
    ids = sparse_layers(cfg, stack)
    if ids:
      settings.update({f"{stack}_moe_layer": moe, f"{stack}_moe_layer_indices": ids})
  settings.update(overrides)
  return EncoderDecoder(**settings)


def hf_to_params(tensors: Mapping[str, np.ndarray], module: EncoderDecoder) -> Dict:
  """Flat HF state dict -> our param tree (float32 numpy). Raises, naming the tensor, when the
  checkpoint lacks one the model needs or holds one the import did not read."""
  ts = Tensors(tensors)
  h, n = module.d_model, module.num_heads
  d = module.head_dim or h // n
  shared = take_tied(ts, "shared.weight", ("encoder.embed_tokens.weight",
                                            "decoder.embed_tokens.weight", "lm_head.weight"),
                      module.tie_embeddings)
  params = {"token_embed": {"embedding": shared}}
  if not module.tie_embeddings:
    params["lm_head"] = ts.take("lm_head.weight").T

  def attention(prefix):
    w = {ours: ts.take(f"{prefix}.{theirs}.weight").T.reshape(h, n, d)
         for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"))}
    w["query"] = w["query"] * np.float32(np.sqrt(d))  # T5's logits are unscaled
    w["out"] = ts.take(f"{prefix}.o.weight").T.reshape(n, d, h)
    return w

  for stack in ("encoder", "decoder"):
    layers = getattr(module, f"num_{stack}_layers")
    ffn = _STACK_FFN[stack]
    tree = {"final_norm": {"scale": ts.take(f"{stack}.final_layer_norm.weight")},
            "relative_position_bias": {"rel_embedding": ts.take(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight").T}}
    for i in range(layers):
      p = f"{stack}.block.{i}.layer."
      layer = {"attention": attention(p + "0.SelfAttention"),
               "pre_attention_norm": {"scale": ts.take(p + "0.layer_norm.weight")},
               "pre_mlp_norm": {"scale": ts.take(p + f"{ffn}.layer_norm.weight")}}
      if stack == "decoder":
        layer["cross_attention"] = attention(p + "1.EncDecAttention")
        layer["pre_cross_attention_norm"] = {"scale": ts.take(p + "1.layer_norm.weight")}
      mlp = p + f"{ffn}.mlp."
      if i in module.moe_ids(stack):
        e = module.sparse_sublayers()[f"{stack}/moe"].num_experts
        layer["moe"] = {
            "router": {"logits": {"kernel": ts.take(mlp + "router.classifier.weight").T}},
            "experts": {w: np.stack([ts.take(mlp + f"experts.expert_{j}.{w}.weight").T
                                     for j in range(e)]) for w in ("wi", "wo")}}
      else:
        layer["mlp"] = {w: ts.take(mlp + f"{w}.weight").T for w in ("wi", "wo")}
      tree[f"layers_{i}"] = layer
    params[stack] = tree
  ts.check_all_read()
  return params


def params_to_hf(params: Mapping, module: EncoderDecoder) -> Dict[str, np.ndarray]:
  """Our param tree -> flat HF state dict (the inverse of `hf_to_params`)."""
  check_exportable(module)
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  h, n = module.d_model, module.num_heads
  d = module.head_dim or h // n
  shared = a(params["token_embed"]["embedding"])
  out = {"shared.weight": shared, "encoder.embed_tokens.weight": shared.copy(),
         "decoder.embed_tokens.weight": shared.copy(),
         "lm_head.weight": shared.copy() if module.tie_embeddings
                           else a(np.asarray(params["lm_head"]).T)}

  def attention(prefix, w):
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      scale = np.float32(1 / np.sqrt(d)) if ours == "query" else np.float32(1)
      out[f"{prefix}.{theirs}.weight"] = a(np.asarray(w[ours]).reshape(h, -1).T * scale)
    out[f"{prefix}.o.weight"] = a(np.asarray(w["out"]).reshape(-1, h).T)

  for stack in ("encoder", "decoder"):
    tree, ffn = params[stack], _STACK_FFN[stack]
    out[f"{stack}.final_layer_norm.weight"] = a(tree["final_norm"]["scale"])
    out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = a(
        np.asarray(tree["relative_position_bias"]["rel_embedding"]).T)
    for i in range(getattr(module, f"num_{stack}_layers")):
      p, layer = f"{stack}.block.{i}.layer.", tree[f"layers_{i}"]
      attention(p + "0.SelfAttention", layer["attention"])
      out[p + "0.layer_norm.weight"] = a(layer["pre_attention_norm"]["scale"])
      out[p + f"{ffn}.layer_norm.weight"] = a(layer["pre_mlp_norm"]["scale"])
      if stack == "decoder":
        attention(p + "1.EncDecAttention", layer["cross_attention"])
        out[p + "1.layer_norm.weight"] = a(layer["pre_cross_attention_norm"]["scale"])
      mlp = p + f"{ffn}.mlp."
      if "moe" in layer:
        out[mlp + "router.classifier.weight"] = a(
            np.asarray(layer["moe"]["router"]["logits"]["kernel"]).T)
        for w in ("wi", "wo"):
          for j, weight in enumerate(np.asarray(layer["moe"]["experts"][w])):
            out[mlp + f"experts.expert_{j}.{w}.weight"] = a(weight.T)
      else:
        for w in ("wi", "wo"):
          out[mlp + f"{w}.weight"] = a(np.asarray(layer["mlp"][w]).T)
  return out


def check_exportable(module: EncoderDecoder) -> None:
  """Refuses, by name, any setting SwitchTransformers cannot represent (module docstring)."""
  tensors_lib.require_settings(
      module, {"activation": "relu", "position_embedding": "relative", "norm": "rms",
               "use_bias": False, "scale_embeddings": False, "tied_output_scale": True,
               "moe_dense_ffn": "none"}, "SwitchTransformers")
  layers = list(module.sparse_sublayers().values())
  for layer in layers:
    router = layer.router
    settings = {"router": (type(router).__name__, "TokenChoiceRouter"),
                "num_selected_experts": (getattr(router, "num_selected_experts", None), 1),
                "normalize_combine_weights": (getattr(router, "normalize_combine_weights",
                                                      None), False),
                "activation": (layer.activation, "relu"),
                "expert_hidden_dim": (layer.expert_hidden_dim, module.mlp_dim),
                "expert_bias": (layer.expert_bias, False),
                "token_dropout_rate": (layer.token_dropout_rate, 0.0),
                "num_experts": (layer.num_experts, layers[0].num_experts)}
    for name, (value, wanted_value) in settings.items():
      if value != wanted_value:
        raise ValueError(f"SwitchTransformers needs MoE layers with {name}={wanted_value!r} "
                         f"(one expert count, top-1 gates by the router probability); this "
                         f"model has {value!r}.")


def hf_config(module: EncoderDecoder, expert_capacity: Optional[int] = None) -> Dict[str, Any]:
  """The config.json of `module`. expert_capacity: theirs, fixed per expert and sequence;
  required unless the model came from `import_checkpoint` (whose min_capacity is it)."""
  check_exportable(module)
  layers = list(module.sparse_sublayers().values())
  if expert_capacity is None and layers:
    if layers[0].eval_capacity_factor != _NO_CAPACITY_FACTOR:
      raise ValueError(
          "expert_capacity: give the fixed per-sequence capacity transformers should enforce "
          "(export_checkpoint(..., config_overrides={'expert_capacity': N}); e.g. "
          "ceil(eval_capacity_factor · sequence length / num_experts)): this model routes by a "
          "capacity factor, which SwitchTransformers does not have.")
    expert_capacity = layers[0].min_capacity
  steps = {stack: tensors_lib.every_step(module.moe_ids(stack),
                                         getattr(module, f"num_{stack}_layers"),
                                         lambda i, s: s == 1 or i % s == 1)
           for stack in ("encoder", "decoder")}
  return {
      "model_type": MODEL_TYPE, "architectures": ["SwitchTransformersForConditionalGeneration"],
      "vocab_size": module.vocab_size, "d_model": module.d_model, "num_heads": module.num_heads,
      "d_kv": module.head_dim or module.d_model // module.num_heads, "d_ff": module.mlp_dim,
      "num_layers": module.num_encoder_layers, "num_decoder_layers": module.num_decoder_layers,
      "num_sparse_encoder_layers": len(module.moe_ids("encoder")),
      "num_sparse_decoder_layers": len(module.moe_ids("decoder")),
      "encoder_sparse_step": steps["encoder"], "decoder_sparse_step": steps["decoder"],
      "num_experts": layers[0].num_experts if layers else 8,
      "expert_capacity": int(expert_capacity or 64),
      "router_bias": False, "router_jitter_noise": 0.0, "router_dtype": "float32",
      "relative_attention_num_buckets": module.relative_attention_num_buckets,
      "relative_attention_max_distance": module.relative_attention_max_distance,
      "layer_norm_epsilon": module.norm_epsilon, "dense_act_fn": "relu", "is_gated_act": False,
      "dropout_rate": module.dropout_rate, "tie_word_embeddings": module.tie_embeddings,
      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
      "is_encoder_decoder": True}


def import_checkpoint(path: str, module: Optional[EncoderDecoder] = None, shardings: Any = None
                      ) -> Tuple[EncoderDecoder, Dict]:
  """(module, params) from a Hugging Face directory (config.json + safetensors); the module
  from config.json unless given (its shapes must match). `shardings`: place each array."""
  return tensors_lib.load(path, encoder_decoder_from_hf_config, hf_to_params, module, shardings)


def export_checkpoint(module: EncoderDecoder, params: Mapping, path: str,
                      config_overrides: Optional[Mapping[str, Any]] = None) -> None:
  """Writes config.json and model.safetensors that transformers loads."""
  overrides = dict(config_overrides or {})
  cfg = {**hf_config(module, overrides.get("expert_capacity")), **overrides}
  tensors_lib.save(path, params_to_hf(nn.meta.unbox(params), module), cfg)
