"""Hugging Face MoE checkpoints (safetensors) <-> moe_jax `Decoder` parameters.

Supported: `MixtralForCausalLM` ("mixtral") and `Qwen2MoeForCausalLM` ("qwen2_moe", shared
experts with a sigmoid gate, q/k/v biases). The on-disk layout both use, per layer i:

    model.layers.i.self_attn.{q,k,v,o}_proj.weight   [out, in] (torch Linear)
    mixtral:   block_sparse_moe.gate.weight [E, H]; block_sparse_moe.experts.e.{w1,w3,w2}.weight
    qwen2_moe: mlp.gate.weight [E, H]; mlp.experts.e.{gate,up,down}_proj.weight;
               mlp.shared_expert.{gate,up,down}_proj.weight; mlp.shared_expert_gate.weight [1, H]
    input_layernorm.weight, post_attention_layernorm.weight; model.norm.weight;
    model.embed_tokens.weight [V, H]; lm_head.weight [V, H]

maps onto ours as: query = q_projᵀ reshaped [H, N, D]; out = o_projᵀ reshaped [N, D, H];
router kernel = gateᵀ; per expert wi_gate = w1ᵀ (the SiLU branch), wi = w3ᵀ, wo = w2ᵀ;
pre_attention_norm = input_layernorm, pre_mlp_norm = post_attention_layernorm. Their RoPE
("rotate half", θ^(−2i/D)) and RMSNorm are ours, so no permutation is needed.

    module, params = import_checkpoint("path/to/hf_dir")              # module from config.json
    module = config.load_model(["gin_configs/models/mixtral_8x7b.gin"]).module
    _, params = import_checkpoint("path/to/hf_dir", module, shardings)  # placed at load time
    export_checkpoint(module, params, "out_dir", hf_config)             # and back
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np

from moe_jax.interop.tensors import Tensors, checked_params
from moe_jax.interop.tensors import read_safetensors as _read_safetensors
from moe_jax.model import Decoder
from moe_jax.moe_layer import MoeLayer
from moe_jax.routing import TokenChoiceRouter

SUPPORTED = ("mixtral", "qwen2_moe")
_EXPERT_NAMES = {  # ours -> theirs, per expert
    "mixtral": {"wi_gate": "w1", "wi": "w3", "wo": "w2"},
    "qwen2_moe": {"wi_gate": "gate_proj", "wi": "up_proj", "wo": "down_proj"},
}
_MOE_PREFIX = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp"}


def _rope_theta(cfg: Mapping[str, Any]) -> float:
  if "rope_theta" in cfg:
    return float(cfg["rope_theta"])
  return float((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def decoder_from_hf_config(cfg: Mapping[str, Any], **overrides) -> Decoder:
  """The `Decoder` a Hugging Face config.json describes (dropless routing, as theirs)."""
  kind = cfg.get("model_type")
  if kind not in SUPPORTED:
    raise ValueError(f"model_type must be one of {SUPPORTED}, got {kind!r}.")
  if cfg.get("hidden_act", "silu") != "silu":
    raise ValueError(f"only SiLU-gated (swiglu) experts are supported, got hidden_act="
                     f"{cfg.get('hidden_act')!r}.")
  if cfg.get("tie_word_embeddings"):
    raise ValueError("tie_word_embeddings=True is not supported: moe_jax's tied output scales "
                     "by 1/sqrt(d_model) (T5), Hugging Face's does not.")
  if cfg.get("sliding_window") and cfg.get("use_sliding_window", kind == "mixtral"):
    raise ValueError("sliding-window attention is not supported (sliding_window="
                     f"{cfg.get('sliding_window')}).")
  rope = dict(cfg.get("rope_parameters") or {})
  if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
    raise ValueError("only plain RoPE is supported, got rope_scaling="
                     f"{cfg.get('rope_scaling')!r}, rope_parameters={rope!r}.")
  h, n = cfg["hidden_size"], cfg["num_attention_heads"]
  if kind == "mixtral":
    num_experts, expert_dim, normalize = cfg["num_local_experts"], cfg["intermediate_size"], True
    placement = dict(moe_every=1)
  else:
    num_experts, expert_dim = cfg["num_experts"], cfg["moe_intermediate_size"]
    normalize = bool(cfg.get("norm_topk_prob", False))
    step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
    sparse = [i for i in range(cfg["num_hidden_layers"]) if (i + 1) % step == 0 and i not in dense]
    placement = dict(moe_layer_indices=tuple(sparse)) if dense else dict(moe_every=step)
  router = TokenChoiceRouter(cfg["num_experts_per_tok"], normalize_combine_weights=normalize)
  moe = functools.partial(MoeLayer, router, num_experts, expert_dim, activation="swiglu", dispatch="dropless")
  settings = dict(
      vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], d_model=h,
      num_heads=n, num_kv_heads=cfg.get("num_key_value_heads") or n,
      head_dim=cfg.get("head_dim") or h // n, mlp_dim=cfg["intermediate_size"],
      activation="swiglu", norm_epsilon=float(cfg["rms_norm_eps"]), rope_theta=_rope_theta(cfg),
      qkv_bias=kind == "qwen2_moe" and bool(cfg.get("qkv_bias", True)), moe_layer=moe,
      **placement)
  if kind == "qwen2_moe" and cfg.get("shared_expert_intermediate_size"):
    settings.update(shared_expert_dim=cfg["shared_expert_intermediate_size"],
                    shared_expert_gate=True)
  settings.update(overrides)
  return Decoder(**settings)


def hf_to_params(tensors: Mapping[str, np.ndarray], module: Decoder, kind: str) -> Dict:
  """Flat HF state dict -> our (unrolled) param tree, float32 numpy. A tensor the model needs
  and the checkpoint lacks, or one the checkpoint holds and nothing reads (QK-norm weights of
  an OLMoE checkpoint given as qwen2_moe), is an error naming it."""
  ts = Tensors(tensors)
  t = ts.take
  h, n = module.d_model, module.num_heads
  kv, d = module.num_kv_heads or n, module.head_dim or h // n
  out = {"token_embed": {"embedding": t("model.embed_tokens.weight")},
         "final_norm": {"scale": t("model.norm.weight")},
         "lm_head": t("lm_head.weight").T}
  for i in range(module.num_layers):
    p = f"model.layers.{i}."
    attn = {"query": t(p + "self_attn.q_proj.weight").T.reshape(h, n, d),
            "key": t(p + "self_attn.k_proj.weight").T.reshape(h, kv, d),
            "value": t(p + "self_attn.v_proj.weight").T.reshape(h, kv, d),
            "out": t(p + "self_attn.o_proj.weight").T.reshape(n, d, h)}
    if module.qkv_bias:
      for ours, theirs, heads in (("query", "q", n), ("key", "k", kv), ("value", "v", kv)):
        attn[ours + "_bias"] = t(p + f"self_attn.{theirs}_proj.bias").reshape(heads, d)
    layer = {"attention": attn,
             "pre_attention_norm": {"scale": t(p + "input_layernorm.weight")},
             "pre_mlp_norm": {"scale": t(p + "post_attention_layernorm.weight")}}
    if i in module.moe_ids:
      m = p + _MOE_PREFIX[kind] + "."
      num_experts = t(m + "gate.weight").shape[0]
      experts = {ours: np.stack([t(m + f"experts.{e}.{theirs}.weight").T
                                 for e in range(num_experts)])
                 for ours, theirs in _EXPERT_NAMES[kind].items()}
      layer["moe"] = {"router": {"logits": {"kernel": t(m + "gate.weight").T}},
                      "experts": experts}
      if module.shared_expert_dim:
        layer["shared_experts"] = {ours: t(m + f"shared_expert.{theirs}.weight").T for ours, theirs
                                   in _EXPERT_NAMES["qwen2_moe"].items()}
        layer["shared_expert_gate"] = t(m + "shared_expert_gate.weight").T
    else:
      layer["mlp"] = {ours: t(p + f"mlp.{theirs}.weight").T
                      for ours, theirs in _EXPERT_NAMES["qwen2_moe"].items()}
    out[f"layers_{i}"] = layer
  ts.check_all_read()
  return out


def params_to_hf(params: Mapping, module: Decoder, kind: str) -> Dict[str, np.ndarray]:
  """Our (unrolled) param tree -> flat HF state dict (the inverse of `hf_to_params`)."""
  if module.attention_layer is not None:
    raise ValueError("this model's attention is not the standard one (attention_layer is set, "
                     "e.g. SwitchHead): Hugging Face's Mixtral / Qwen2-MoE have no such layer.")
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  h = module.d_model
  out = {"model.embed_tokens.weight": a(params["token_embed"]["embedding"]),
         "model.norm.weight": a(params["final_norm"]["scale"]),
         "lm_head.weight": a(np.asarray(params["lm_head"]).T)}
  for i in range(module.num_layers):
    p, layer = f"model.layers.{i}.", params[f"layers_{i}"]
    attn = layer["attention"]
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      out[p + f"self_attn.{theirs}_proj.weight"] = a(np.asarray(attn[ours]).reshape(h, -1).T)
      if module.qkv_bias:
        out[p + f"self_attn.{theirs}_proj.bias"] = a(np.asarray(attn[ours + "_bias"]).reshape(-1))
    out[p + "self_attn.o_proj.weight"] = a(np.asarray(attn["out"]).reshape(-1, h).T)
    out[p + "input_layernorm.weight"] = a(layer["pre_attention_norm"]["scale"])
    out[p + "post_attention_layernorm.weight"] = a(layer["pre_mlp_norm"]["scale"])
    if "moe" in layer:
      m = p + _MOE_PREFIX[kind] + "."
      out[m + "gate.weight"] = a(np.asarray(layer["moe"]["router"]["logits"]["kernel"]).T)
      for ours, theirs in _EXPERT_NAMES[kind].items():
        for e, w in enumerate(np.asarray(layer["moe"]["experts"][ours])):
          out[m + f"experts.{e}.{theirs}.weight"] = a(w.T)
      if "shared_experts" in layer:
        for ours, theirs in _EXPERT_NAMES["qwen2_moe"].items():
          out[m + f"shared_expert.{theirs}.weight"] = a(np.asarray(layer["shared_experts"][ours]).T)
        out[m + "shared_expert_gate.weight"] = a(np.asarray(layer["shared_expert_gate"]).T)
    else:
      for ours, theirs in _EXPERT_NAMES["qwen2_moe"].items():
        out[p + f"mlp.{theirs}.weight"] = a(np.asarray(layer["mlp"][ours]).T)
  return out


def stack_layers(params: Mapping, module: Decoder) -> Dict:
  """Unrolled tree (layers_i) -> the scanned layout (layers/block_j, [units, ...])."""
  if not module.scan_layers:
    return dict(params)
  period = module.moe_every if module.moe_layer is not None else 1
  units = module.num_layers // period
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = {f"block_{j}": jax.tree.map(lambda *x: np.stack(x), *[
      params[f"layers_{u * period + j}"] for u in range(units)]) for j in range(period)}
  return out


def unstack_layers(params: Mapping, module: Decoder) -> Dict:
  """The scanned layout -> the unrolled one (identity for an unrolled module)."""
  if not module.scan_layers:
    return dict(params)
  period = module.moe_every if module.moe_layer is not None else 1
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(module.num_layers):
    u, j = divmod(i, period)
    out[f"layers_{i}"] = jax.tree.map(lambda x: x[u], params["layers"][f"block_{j}"])
  return out


def import_checkpoint(path: str, module: Optional[Decoder] = None, shardings: Any = None
                      ) -> Tuple[Decoder, Dict]:
  """(module, params) from a Hugging Face directory (config.json + safetensors).

  module: the target (e.g. the mixtral preset); its parameter shapes must match the
    checkpoint. None: built from config.json.
  shardings: a pytree of `jax.sharding.Sharding` matching the params (for example from
    `nn.logical_to_mesh_sharding`); each array is placed with it as it is converted.
  """
  cfg = json.load(open(os.path.join(path, "config.json")))
  kind = cfg.get("model_type")
  if kind not in SUPPORTED:
    raise ValueError(f"model_type must be one of {SUPPORTED}, got {kind!r}.")
  module = module or decoder_from_hf_config(cfg)
  params = stack_layers(hf_to_params(_read_safetensors(path), module, kind), module)
  return module, checked_params(module, params, shardings)


def export_checkpoint(module: Decoder, params: Mapping, path: str,
                      hf_config: Mapping[str, Any]) -> None:
  """Writes config.json and model.safetensors that transformers loads."""
  from safetensors.numpy import save_file
  kind = hf_config.get("model_type")
  if kind not in SUPPORTED:
    raise ValueError(f"model_type must be one of {SUPPORTED}, got {kind!r}.")
  os.makedirs(path, exist_ok=True)
  tensors = params_to_hf(unstack_layers(nn.meta.unbox(params), module), module, kind)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(hf_config), f, indent=2)
