"""The config.json of a `Decoder` for a Hugging Face family, to export a model trained here
(e.g. from the deepseek_v3 / qwen3_30b_a3b / olmoe_1b_7b / mixtral_8x7b presets).

    cfg = hf_config(module, "deepseek_v3")
    huggingface.export_checkpoint(module, variables, "out_dir", cfg)   # or model_type=...

The config is checked by reading it back: `huggingface.decoder_from_hf_config(cfg)` must give
the module's computation (every setting below), else the error lists the settings that family
cannot express (a qk_norm Mixtral, a residual dense FFN, noisy gating, an expert bias outside
DeepSeek-V3, ...). Training-only router options that do not change the forward pass (jitter,
random routing of the second expert, the bias update rate) are not part of a checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from moe_jax.interop import deepseek

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
}
_DECODER_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "activation",
                   "norm_epsilon", "rope_theta", "rope_scaling", "qkv_bias", "qk_norm",
                   "tie_embeddings", "moe_dense_ffn", "shared_expert_dim", "shared_expert_gate")
# has_expert_bias is not among them: its presence is checked with the tensors (a V3
# checkpoint's zero bias and no bias select alike).
_ROUTER_FIELDS = ("num_selected_experts", "normalize_combine_weights", "score_function",
                  "routed_scaling_factor", "num_groups", "noisy_gating")
_LATENT_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                  "v_head_dim")


def signature(module) -> Dict[str, Any]:
  """What a checkpoint's forward pass depends on, setting by setting."""
  out = {name: getattr(module, name) for name in _DECODER_FIELDS}
  out["moe_ids"] = module.moe_ids
  dense = [i for i in range(module.num_layers) if i not in module.moe_ids]
  if dense:
    out["mlp_dim"] = module.mlp_dim
  if deepseek.is_latent(module):
    mla = deepseek.latent_settings(module)
    out.update({f"attention.{name}": getattr(mla, name) for name in _LATENT_FIELDS})
  else:
    out["attention_layer"] = (None if module.attention_layer is None
                              else getattr(module.attention_layer, "func",
                                           module.attention_layer).__name__)
    out["num_kv_heads"] = module.num_kv_heads or module.num_heads
    out["head_dim"] = module.head_dim or module.d_model // module.num_heads
  if module.moe_layer is not None:
    moe = module.moe_layer(parent=None)
    out.update({"moe.num_experts": moe.num_experts, "moe.expert_hidden_dim":
                moe.expert_hidden_dim, "moe.activation": moe.activation,
                "moe.expert_bias": getattr(moe, "expert_bias", False),
                "moe.router": type(moe.router).__name__})
    router = moe.router
    out.update({f"router.{name}": getattr(router, name, None) for name in _ROUTER_FIELDS})
    if getattr(router, "num_groups", 1) > 1:
      out.update({"router.top_groups": router.top_groups, "router.group_score":
                  router.group_score})
  return out


def _rope(module) -> Dict[str, Any]:
  params = {"rope_type": "default", "rope_theta": module.rope_theta}
  if module.rope_scaling is not None:
    params.update({"rope_type": "yarn", **{k: v for k, v in dataclasses.asdict(
        module.rope_scaling).items() if v is not None}})
  return params


def hf_config(module, model_type: str, max_position_embeddings: int = 4096) -> Dict[str, Any]:
  """config.json for `module` as `model_type` (module docstring)."""
  from moe_jax.interop import huggingface  # pylint: disable=g-import-not-at-top  (imports us)
  if model_type not in ARCHITECTURES:
    raise ValueError(f"model_type must be one of {tuple(ARCHITECTURES)}, got {model_type!r}.")
  if module.moe_layer is None:
    raise ValueError("this model has no MoE layers: export it as a dense model instead.")
  moe = module.moe_layer(parent=None)
  router = moe.router
  h, n, layers = module.d_model, module.num_heads, module.num_layers
  dense = [i for i in range(layers) if i not in module.moe_ids]
  cfg: Dict[str, Any] = {
      "model_type": model_type, "architectures": [ARCHITECTURES[model_type]],
      "vocab_size": module.vocab_size, "hidden_size": h, "num_hidden_layers": layers,
      "num_attention_heads": n, "num_key_value_heads": module.num_kv_heads or n,
      "head_dim": module.head_dim or h // n, "intermediate_size": module.mlp_dim,
      "rms_norm_eps": module.norm_epsilon, "rope_theta": module.rope_theta,
      "rope_parameters": _rope(module), "hidden_act": "silu", "tie_word_embeddings": False,
      "max_position_embeddings": max_position_embeddings, "attention_bias": False,
      "num_experts_per_tok": getattr(router, "num_selected_experts", None),
      "norm_topk_prob": bool(getattr(router, "normalize_combine_weights", False)),
      "torch_dtype": "float32", "use_cache": True,
  }
  experts, width = moe.num_experts, moe.expert_hidden_dim
  if model_type in ("mixtral", "olmoe"):
    cfg.update(intermediate_size=width)
    cfg["num_local_experts" if model_type == "mixtral" else "num_experts"] = experts
  elif model_type in ("qwen2_moe", "qwen3_moe"):
    cfg.update(num_experts=experts, moe_intermediate_size=width, decoder_sparse_step=1,
               mlp_only_layers=dense, use_sliding_window=False)
    if model_type == "qwen2_moe":
      cfg.update(qkv_bias=module.qkv_bias,
                 shared_expert_intermediate_size=module.shared_expert_dim)
  else:
    mla = deepseek.latent_settings(module) if deepseek.is_latent(module) else None
    if mla is None:
      raise ValueError(f"{model_type} needs multi-head latent attention (LatentAttention).")
    groups = getattr(router, "num_groups", 1)
    cfg.update({name: getattr(mla, name) for name in _LATENT_FIELDS})
    cfg.update(n_routed_experts=experts, moe_intermediate_size=width,
               n_shared_experts=module.shared_expert_dim // width if module.shared_expert_dim
               else None,
               first_k_dense_replace=module.moe_ids[0] if module.moe_ids else layers,
               routed_scaling_factor=getattr(router, "routed_scaling_factor", 1.0),
               n_group=groups, topk_group=getattr(router, "top_groups", 1),
               num_key_value_heads=n)
    del cfg["head_dim"]
    if model_type == "deepseek_v3":
      cfg.update(rope_interleave=False, scoring_func="sigmoid", topk_method="noaux_tc")
    else:
      cfg.update(topk_method="group_limited_greedy" if groups > 1 else "greedy")
  check_same_computation(module, huggingface.decoder_from_hf_config(cfg), model_type,
                         f"{model_type} cannot express this model")
  return cfg


def check_same_computation(module, described, source: str, problem: Optional[str] = None
                           ) -> None:
  """Raises unless `module` computes what `described` (built from a config.json) does,
  naming every setting that differs."""
  want, got = signature(module), signature(described)
  differ = {k: (want.get(k), got.get(k)) for k in sorted(set(want) | set(got))
            if want.get(k) != got.get(k)}
  if differ:
    raise ValueError(f"{problem or 'the module does not compute what ' + source + ' describes'}"
                     f"; settings (the module's, {source}'s): {differ}")
