"""What DeepSeek-V2 / V3 checkpoints add to the Hugging Face converter (interop/huggingface.py):
multi-head latent attention and their routers.

Attention tensors, per layer (`a = model.layers.i.self_attn.`), onto `LatentAttention`:

    a.q_proj.weight [N·(Dn+Dr), H]                 query [H, N, Dn+Dr]  (no q_lora_rank)
    a.q_a_proj.weight [R_q, H]                     q_down [H, R_q]
    a.q_a_layernorm.weight                         q_norm/scale
    a.q_b_proj.weight [N·(Dn+Dr), R_q]             q_up [R_q, N, Dn+Dr]
    a.kv_a_proj_with_mqa.weight [R_kv+Dr, H]       kv_down [H, R_kv+Dr]
    a.kv_a_layernorm.weight                        kv_norm/scale
    a.kv_b_proj.weight [N·(Dn+Dv), R_kv]           kv_up [R_kv, N, Dn+Dv]
    a.o_proj.weight [H, N·Dv]                      out [N, Dv, H]

Rotary layout: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), … (V2 always, through
complex numbers; V3 when rope_interleave, its default); ours rotates halves (x_i, x_{i+Dr/2}).
Taking the rotary columns of q and k_r in the order (0, 2, 4, …, 1, 3, 5, …) turns one into
the other, and q·k is unchanged because both sides are permuted alike: the converter permutes
those columns on import and back on export, so the computation is the same to rounding.

Routers: V3 scores by sigmoid, keeps the top_groups of n_group groups by the sum of each
group's two best biased scores, renormalises the top-k when norm_topk_prob, scales by
routed_scaling_factor, and selects with e_score_correction_bias (imported into the
'moe_balance' collection, frozen: expert_bias=True, update rate 0). V2 scores by softmax, takes
the top-k greedily or inside groups ranked by their best score ("group_limited_greedy"), and
scales; transformers' V2 never renormalises, so norm_topk_prob=True is refused.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Mapping

import numpy as np

from moe_jax.latent_attention import LatentAttention

_V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def check_config(cfg: Mapping[str, Any], kind: str, refuse: Callable) -> None:
  """Refuses, by name, the DeepSeek settings the import does not implement."""
  falsy = lambda v: not v
  refuse(cfg, "attention_bias", falsy, "biases on the attention projections")
  refuse(cfg, "num_key_value_heads", lambda v: v in (None, cfg["num_attention_heads"]),
         "MLA has no kv heads to group (num_key_value_heads must equal num_attention_heads)")
  refuse(cfg, "moe_layer_freq", lambda v: v in (None, 1), "MoE layers other than every layer "
         "after first_k_dense_replace")
  if kind == "deepseek_v2":
    refuse(cfg, "mlp_bias", falsy, "biases in the FFNs")
    refuse(cfg, "topk_method", lambda v: v in _V2_TOPK_METHODS, f"only {_V2_TOPK_METHODS}",
           "greedy")
    refuse(cfg, "norm_topk_prob", falsy, "transformers' DeepseekV2 ignores it while "
           "DeepSeek's own code renormalises, so the intended computation is ambiguous")
    refuse(cfg, "scoring_func", lambda v: v in (None, "softmax"), "V2 scores by softmax")
  else:
    refuse(cfg, "scoring_func", lambda v: v in (None, "sigmoid"), "V3 scores by sigmoid")
    refuse(cfg, "topk_method", lambda v: v in (None, "noaux_tc"), "V3 routes by noaux_tc")



def router_settings(cfg: Mapping[str, Any], kind: str) -> Dict[str, Any]:
  """TokenChoiceRouter fields for a DeepSeek config. The fields are read as they are written,
  without defaults (transformers' V3 defaults are the 671B model's: a missing field would
  silently mean another model); a missing one is an error naming it."""
  settings = dict(routed_scaling_factor=float(cfg["routed_scaling_factor"]))
  if kind == "deepseek_v3":
    settings.update(score_function="sigmoid", expert_bias=True, group_score="top2_sum",
                    normalize_combine_weights=bool(cfg["norm_topk_prob"]),
                    num_groups=cfg["n_group"], top_groups=cfg["topk_group"])
  else:
    settings.update(normalize_combine_weights=False, group_score="max")
    if cfg.get("topk_method", "greedy") == "group_limited_greedy":
      settings.update(num_groups=cfg["n_group"], top_groups=cfg["topk_group"])
  return settings


def decoder_settings(cfg: Mapping[str, Any], kind: str) -> Dict[str, Any]:
  """Decoder fields for a DeepSeek config: MLA, shared experts."""
  del kind
  attention = functools.partial(
      LatentAttention, q_lora_rank=cfg["q_lora_rank"], kv_lora_rank=cfg["kv_lora_rank"],
      qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
      v_head_dim=cfg["v_head_dim"])  # the latent norms keep DeepseekRMSNorm's ε = 1e-6
  settings = dict(attention_layer=attention, num_kv_heads=None, head_dim=None)
  if cfg["n_shared_experts"]:
    settings["shared_expert_dim"] = cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
  return settings


def interleaved(cfg: Mapping[str, Any], kind: str) -> bool:
  """Does the checkpoint rotate interleaved pairs (module docstring)?"""
  return kind == "deepseek_v2" or bool(cfg.get("rope_interleave", True))


def has_expert_bias(cfg: Mapping[str, Any]) -> bool:
  """Do the checkpoint's routers hold e_score_correction_bias (V3)?"""
  return cfg.get("model_type") == "deepseek_v3"


def is_latent(module) -> bool:
  attention = module.attention_layer
  base = getattr(attention, "func", attention)
  return isinstance(base, type) and issubclass(base, LatentAttention)


def latent_settings(module) -> LatentAttention:
  return module.attention_layer(num_heads=module.num_heads, parent=None)


def rotary_permutation(offset: int, rope_dim: int, size: int) -> np.ndarray:
  """Indices over a last axis of `size` that take the rotary columns [offset, offset+Dr) in
  (even, odd) order and leave the others in place."""
  perm = np.arange(size)
  perm[offset:offset + rope_dim] = offset + np.concatenate(
      [np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])
  return perm


def attention_entries(module, ours: str, theirs: str, linear: Callable, copy: Callable,
                      interleaved: bool = True) -> List:
  """The MLA rows of huggingface.tensor_map for one layer."""
  mla = latent_settings(module)
  dn, dr = mla.qk_nope_head_dim, mla.qk_rope_head_dim
  q_perm = rotary_permutation(dn, dr, dn + dr) if interleaved else None
  kv_perm = (rotary_permutation(mla.kv_lora_rank, dr, mla.kv_lora_rank + dr)
             if interleaved else None)
  if mla.q_lora_rank is None:
    rows = [linear(ours + "query", theirs + "q_proj.weight", perm=q_perm)]
  else:
    rows = [linear(ours + "q_down", theirs + "q_a_proj.weight"),
            copy(ours + "q_norm/scale", theirs + "q_a_layernorm.weight"),
            linear(ours + "q_up", theirs + "q_b_proj.weight", perm=q_perm)]
  return rows + [linear(ours + "kv_down", theirs + "kv_a_proj_with_mqa.weight", perm=kv_perm),
                 copy(ours + "kv_norm/scale", theirs + "kv_a_layernorm.weight"),
                 linear(ours + "kv_up", theirs + "kv_b_proj.weight"),
                 linear(ours + "out", theirs + "o_proj.weight", in_dims=2)]
