"""Hugging Face decoder-only MoE checkpoints (safetensors) <-> moe_jax `Decoder` variables.

Families (config.json's model_type; `FAMILIES`):
    mixtral       MixtralForCausalLM: top-2 renormalised, GQA
    qwen2_moe     Qwen2MoeForCausalLM: shared expert with a sigmoid gate, q/k/v biases
    qwen3_moe     Qwen3MoeForCausalLM: per-head QK RMSNorm, norm_topk_prob, no shared expert
    olmoe         OlmoeForCausalLM: QK RMSNorm over the whole projection, 64 experts top-8
    deepseek_v3   DeepseekV3ForCausalLM: MLA, sigmoid group-limited routing with the
                  aux-loss-free bias, routed scaling, shared experts, first k layers dense
    deepseek_v2   DeepseekV2ForCausalLM: MLA, softmax (group-limited) greedy routing
(the DeepSeek specifics are in interop/deepseek.py).

Every field of config.json that changes the computation is read; a value we do not implement
is refused by name (`check_config`). Every checkpoint tensor must be read and every parameter
filled, or the error names it (interop/tensors.py).

One table of tensors (`tensor_map`) serves both directions: each entry is an HF name (or one
per expert) and our variable path, related by a transpose and reshape (torch Linear weights are
[out, in]; ours [in..., out...]) and, for DeepSeek's interleaved rotary columns, a permutation.
Per layer i (Llama layout, `p = model.layers.i.`):

    p.self_attn.{q,k,v,o}_proj.weight      attention/{query,key,value,out}
    p.self_attn.{q,k}_norm.weight          attention/{query,key}_norm/scale (Qwen3, OLMoE)
    p.input_layernorm / post_attention_layernorm   pre_attention_norm / pre_mlp_norm
    p.<moe>.gate.weight                    moe/router/logits/kernel
    p.<moe>.experts.e.<gate,up,down>       moe/experts/{wi_gate, wi, wo}[e]
    p.mlp.{gate,up,down}_proj              mlp/{wi_gate, wi, wo}   (dense layers)

    variables = import_checkpoint("path/to/hf_dir")[1]     # module built from config.json
    module = config.load_model(["gin_configs/models/mixtral_8x7b.gin"]).module
    _, variables = import_checkpoint("path/to/hf_dir", module, shardings)  # placed at load
    export_checkpoint(module, variables, "out_dir", hf_config)              # and back
    export_checkpoint(module, variables, "out_dir", model_type="deepseek_v3")  # config made
                                                          # from the module (hf_configs.py)

`variables` is {"params": …} plus, for DeepSeek-V3, {"moe_balance": …} (the routers'
e_score_correction_bias).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.attention import YarnScaling
from moe_jax.interop import deepseek
from moe_jax.interop.tensors import Tensors, abstract_variables, checked_params
from moe_jax.interop.tensors import read_safetensors as _read_safetensors
from moe_jax.model import Decoder
from moe_jax.moe_layer import MoeLayer
from moe_jax.routing import EXPERT_BIAS_COLLECTION, TokenChoiceRouter

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
SUPPORTED = FAMILIES
_EXPERT_NAMES = {  # ours -> theirs, per expert
    "mixtral": {"wi_gate": "w1", "wi": "w3", "wo": "w2"},
    "default": {"wi_gate": "gate_proj", "wi": "up_proj", "wo": "down_proj"},
}
_MOE_PREFIX = {"mixtral": "block_sparse_moe"}  # the others: "mlp"
_QK_NORM = {"qwen3_moe": "head", "olmoe": "full"}


class _Config(dict):
  """config.json; a field it lacks is an error naming the field (not a bare KeyError)."""

  def __missing__(self, key):
    raise ValueError(f"config.json has no {key!r}, which a {self.get('model_type')!r} model "
                     "needs (is model_type right?).")


def _family(cfg: Mapping[str, Any]) -> str:
  kind = cfg.get("model_type")
  if kind not in FAMILIES:
    raise ValueError(f"model_type must be one of {FAMILIES}, got {kind!r}.")
  return kind


def _num_experts(cfg: Mapping[str, Any]) -> int:
  """Routed experts, under whichever name this transformers version writes."""
  for name in ("num_local_experts", "num_experts", "n_routed_experts"):
    if cfg.get(name) is not None:
      return int(cfg[name])
  raise ValueError("config.json names no expert count (num_local_experts, num_experts or "
                   "n_routed_experts).")


def rope_settings(cfg: Mapping[str, Any]) -> Tuple[float, Optional[YarnScaling]]:
  """(θ, YaRN scaling or None) from config.json's rope_theta / rope_scaling / rope_parameters
  (the older and the newer transformers spellings)."""
  params = dict(cfg.get("rope_scaling") or {})
  params.update(cfg.get("rope_parameters") or {})
  theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind != "yarn":
    raise ValueError(f"config.json's rope type {kind!r} is not implemented: only plain RoPE "
                     "and 'yarn'.")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"config.json's partial_rotary_factor={params['partial_rotary_factor']} "
                     "is not implemented: RoPE over the whole head.")
  original = int(params.get("original_max_position_embeddings")
                 or cfg["max_position_embeddings"])  # transformers' default
  factor = params.get("factor") or cfg["max_position_embeddings"] / original
  return theta, YarnScaling(
      factor=float(factor), original_max_position_embeddings=original,
      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
      mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
      attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)))


def _refuse(cfg: Mapping[str, Any], field: str, allowed: Callable[[Any], bool], why: str,
            default: Any = None) -> None:
  value = cfg.get(field, default)
  if not allowed(value):
    raise ValueError(f"config.json's {field}={value!r} is not implemented: {why}.")


def check_config(cfg: Mapping[str, Any]) -> str:
  """The family, after refusing by name every setting the import does not implement."""
  cfg = _Config(cfg)
  kind = _family(cfg)
  falsy = lambda v: not v
  _refuse(cfg, "hidden_act", lambda v: v == "silu", "only SiLU-gated (swiglu) FFNs", "silu")
  _refuse(cfg, "tie_word_embeddings", falsy, "moe_jax's tied output scales by 1/sqrt(d_model) "
          "(T5), Hugging Face's does not")
  rope_settings(cfg)  # refuses rope types other than plain and YaRN
  _refuse(cfg, "pretraining_tp", lambda v: v in (None, 1), "tensor-parallel slicing of the "
          "projections (pretraining_tp > 1)")
  _refuse(cfg, "quantization_config", falsy, "quantized (e.g. FP8) weights; convert the "
          "checkpoint to bfloat16 first (for DeepSeek-V3: DeepSeek's fp8_cast_bf16.py)")
  if kind == "mixtral":
    _refuse(cfg, "sliding_window", falsy, "sliding-window attention")
    _refuse(cfg, "router_jitter_noise", falsy, "Mixtral's jitter scales the experts' input "
            "too; moe_jax jitters the router's only")
  if kind in ("qwen2_moe", "qwen3_moe"):
    _refuse(cfg, "use_sliding_window", falsy, "sliding-window attention")
    if _num_experts(cfg) < 1:
      raise ValueError("config.json's num_experts=0 is not implemented: a model without "
                       "experts (import it as a dense Qwen).")
  if kind in ("qwen3_moe", "olmoe"):
    _refuse(cfg, "attention_bias", falsy, "biases on the q/k/v/o projections")
  if kind == "olmoe":
    _refuse(cfg, "clip_qkv", lambda v: v is None, "clipping of the q/k/v projections")
  if kind.startswith("deepseek"):
    deepseek.check_config(cfg, kind, _refuse)
  return kind


def _placement(cfg: Mapping[str, Any], kind: str) -> Dict[str, Any]:
  num_layers = cfg["num_hidden_layers"]
  if kind in ("mixtral", "olmoe"):
    return dict(moe_every=1)
  if kind.startswith("deepseek"):
    return dict(moe_every=1, first_dense_layers=int(cfg["first_k_dense_replace"] or 0))
  step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
  sparse = [i for i in range(num_layers) if (i + 1) % step == 0 and i not in dense]
  return dict(moe_layer_indices=tuple(sparse)) if dense else dict(moe_every=step)


def decoder_from_hf_config(cfg: Mapping[str, Any], **overrides) -> Decoder:
  """The `Decoder` a Hugging Face config.json describes (dropless routing, as theirs)."""
  cfg = _Config(cfg)
  kind = check_config(cfg)
  h, n = cfg["hidden_size"], cfg["num_attention_heads"]
  settings = dict(
      vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], d_model=h,
      num_heads=n, num_kv_heads=cfg.get("num_key_value_heads") or n,
      head_dim=cfg.get("head_dim") or h // n, mlp_dim=cfg["intermediate_size"],
      activation="swiglu", norm_epsilon=float(cfg["rms_norm_eps"]),
      **dict(zip(("rope_theta", "rope_scaling"), rope_settings(cfg))), **_placement(cfg, kind))
  router = dict(num_selected_experts=cfg["num_experts_per_tok"],
                normalize_combine_weights=bool(cfg.get("norm_topk_prob", False)))
  num_experts = _num_experts(cfg)
  expert_dim = cfg["intermediate_size"] if kind in ("mixtral", "olmoe") else cfg[
      "moe_intermediate_size"]
  if kind == "mixtral":
    router["normalize_combine_weights"] = True
  elif kind.startswith("deepseek"):
    settings.update(deepseek.decoder_settings(cfg, kind))
    router.update(deepseek.router_settings(cfg, kind))
  if kind == "qwen2_moe":
    settings["qkv_bias"] = bool(cfg.get("qkv_bias", True))
    if cfg.get("shared_expert_intermediate_size"):
      settings.update(shared_expert_dim=cfg["shared_expert_intermediate_size"],
                      shared_expert_gate=True)
  settings["qk_norm"] = _QK_NORM.get(kind, "none")
  settings["moe_layer"] = functools.partial(
      MoeLayer, TokenChoiceRouter(**router), num_experts, expert_dim, activation="swiglu",
      dispatch="dropless")
  settings.update(overrides)
  return Decoder(**settings)


# ---------------------------------------------------------------------------------------------
# The tensor table.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
  """One of our variables and the checkpoint tensor(s) it comes from.

  kind "linear": ours = theirsᵀ reshaped (the first `in_dims` of our dims are torch's `in`);
  "copy": ours = theirs reshaped; "experts": ours[e] = theirs[e]ᵀ, one HF name per expert.
  perm: a permutation of our last axis (DeepSeek's interleaved rotary columns), applied after
  the reshape and undone on export.
  """
  path: Tuple[str, ...]
  theirs: Any  # str, or a tuple of names for "experts"
  kind: str = "linear"
  in_dims: int = 1
  perm: Optional[np.ndarray] = None
  collection: str = "params"


def linear(path, theirs, in_dims=1, perm=None) -> Entry:
  return Entry(tuple(path.split("/")), theirs, "linear", in_dims, perm)


def copy(path, theirs, collection="params") -> Entry:
  return Entry(tuple(path.split("/")), theirs, "copy", collection=collection)


def _expert_names(ts_or_names, prefix: str, theirs: str, num_experts: Optional[int]):
  """The per-expert names: num_experts of them, or (import) as many as the checkpoint has."""
  if num_experts is None:
    num_experts = 0
    while ts_or_names(f"{prefix}experts.{num_experts}.{theirs}.weight"):
      num_experts += 1
  return tuple(f"{prefix}experts.{e}.{theirs}.weight" for e in range(num_experts))


def tensor_map(module: Decoder, cfg: Mapping[str, Any], has: Callable[[str], bool],
               num_experts: Optional[int] = None) -> List[Entry]:
  """Every variable of the (unrolled) module and its checkpoint tensors. has(name): does the
  checkpoint hold it (import: the experts are counted from it), or does the export write it
  (always True, with num_experts)."""
  kind = _family(cfg)
  n = module.num_heads
  entries = [copy("token_embed/embedding", "model.embed_tokens.weight"),
             copy("final_norm/scale", "model.norm.weight"),
             linear("lm_head", "lm_head.weight")]
  ffn_names = _EXPERT_NAMES.get(kind, _EXPERT_NAMES["default"])
  for i in range(module.num_layers):
    p, ours = f"model.layers.{i}.", f"layers_{i}/"
    entries += [copy(ours + "pre_attention_norm/scale", p + "input_layernorm.weight"),
                copy(ours + "pre_mlp_norm/scale", p + "post_attention_layernorm.weight")]
    if kind.startswith("deepseek"):
      entries += deepseek.attention_entries(module, ours + "attention/", p + "self_attn.",
                                            linear, copy, deepseek.interleaved(cfg, kind))
    else:
      a, sa = ours + "attention/", p + "self_attn."
      entries += [linear(a + "query", sa + "q_proj.weight"), linear(a + "key", sa + "k_proj.weight"),
                  linear(a + "value", sa + "v_proj.weight"),
                  linear(a + "out", sa + "o_proj.weight", in_dims=2)]
      if module.qkv_bias:
        entries += [copy(a + f"{w}_bias", sa + f"{t}_proj.bias")
                    for w, t in (("query", "q"), ("key", "k"), ("value", "v"))]
      if module.qk_norm != "none":
        entries += [copy(a + "query_norm/scale", sa + "q_norm.weight"),
                    copy(a + "key_norm/scale", sa + "k_norm.weight")]
    if i not in module.moe_ids:
      entries += [linear(ours + f"mlp/{w}", p + f"mlp.{t}.weight")
                  for w, t in _EXPERT_NAMES["default"].items()]
      continue
    m = p + _MOE_PREFIX.get(kind, "mlp") + "."
    entries.append(linear(ours + "moe/router/logits/kernel", m + "gate.weight"))
    for w, t in ffn_names.items():
      entries.append(Entry(tuple((ours + f"moe/experts/{w}").split("/")),
                           _expert_names(has, m, t, num_experts), "experts"))
    if kind == "deepseek_v3":
      entries.append(copy(ours + "moe/router/expert_bias", m + "gate.e_score_correction_bias",
                          collection=EXPERT_BIAS_COLLECTION))
    if module.shared_expert_dim:
      shared = "shared_experts" if kind.startswith("deepseek") else "shared_expert"
      entries += [linear(ours + f"shared_experts/{w}", m + f"{shared}.{t}.weight")
                  for w, t in _EXPERT_NAMES["default"].items()]
      if module.shared_expert_gate:
        entries.append(linear(ours + "shared_expert_gate", m + "shared_expert_gate.weight"))
  return entries


def _expected(module: Decoder) -> Dict[str, Dict]:
  """{collection: flat {path tuple: shape}} of the unrolled module's variables."""
  unrolled = module.clone(scan_layers=False, parent=None)
  shapes = jax.eval_shape(lambda: unrolled.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 1), jnp.int32)))
  return {c: {k: v.shape for k, v in flax.traverse_util.flatten_dict(
      nn.meta.unbox(tree)).items()} for c, tree in shapes.items()}


def _reshaped(x: np.ndarray, shape) -> np.ndarray:
  """x in `shape` when the sizes agree; else as it is (checked_params names the mismatch)."""
  return x.reshape(shape) if shape is not None and x.size == math.prod(shape) else x


def hf_to_variables(tensors: Mapping[str, np.ndarray], module: Decoder,
                    cfg: Mapping[str, Any], expected: Optional[Dict] = None) -> Dict:
  """Flat HF state dict -> our unrolled variables {collection: tree}, float32 numpy. A tensor
  the model needs and the checkpoint lacks, or one the checkpoint holds and nothing reads (the
  QK-norm weights of an OLMoE checkpoint given as qwen2_moe), is an error naming it."""
  ts = Tensors(tensors)
  expected = _expected(module) if expected is None else expected
  if cfg.get("num_nextn_predict_layers"):
    # DeepSeek-V3's multi-token-prediction module (layers num_hidden_layers, …), which
    # transformers does not load either: not modelled here (see the issue notes).
    extra = tuple(f"model.layers.{i}." for i in range(
        cfg["num_hidden_layers"], cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]))
    ts.skip(key for key in tensors if key.startswith(extra))
  flat = {}
  for e in tensor_map(module, cfg, ts.has):
    shape = expected.get(e.collection, {}).get(e.path)
    if e.kind == "experts":
      x = np.stack([ts.take(name).T for name in e.theirs]) if e.theirs else np.zeros((0,))
    elif e.kind == "linear":
      w = ts.take(e.theirs)
      x = _reshaped(w.T, shape)
    else:
      x = _reshaped(ts.take(e.theirs), shape)
    if e.perm is not None:
      if x.shape[-1] != len(e.perm):
        raise ValueError(f"{e.theirs}: checkpoint shape {ts.take(e.theirs).shape} does not fit "
                         f"the module's {'/'.join(e.path)} {shape}.")
      x = x[..., e.perm]
    flat.setdefault(e.collection, {})[e.path] = x
  ts.check_all_read()
  return {c: flax.traverse_util.unflatten_dict(tree) for c, tree in flat.items()}


def variables_to_hf(variables: Mapping, module: Decoder,
                    cfg: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Our unrolled variables -> the flat HF state dict (the inverse of `hf_to_variables`)."""
  flat = {c: flax.traverse_util.flatten_dict(tree) for c, tree in variables.items()}
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  out = {}
  num_experts = None
  if module.moe_layer is not None:
    num_experts = module.moe_layer(parent=None).num_experts
  for e in tensor_map(module, cfg, lambda name: True, num_experts):
    x = np.asarray(flat[e.collection][e.path], np.float32)
    if e.perm is not None:
      x = x[..., np.argsort(e.perm)]
    if e.kind == "experts":
      out.update({name: a(w.T) for name, w in zip(e.theirs, x)})
    elif e.kind == "linear":
      out[e.theirs] = a(x.reshape(math.prod(x.shape[:e.in_dims]), -1).T)
    else:
      out[e.theirs] = a(x.reshape(-1) if x.ndim > 1 and e.theirs.endswith("bias") else x)
  return out


def stack_layers(tree: Mapping, module: Decoder) -> Dict:
  """Unrolled tree (layers_i) -> the scanned layout ({stack}/block_j, [units, ...]; the
  stacks of `Decoder.scanned_stacks`). A collection that only some blocks hold (the routers'
  moe_balance) keeps only those."""
  if not module.scan_layers:
    return dict(tree)
  out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
  for name, first, period, units in module.scanned_stacks():
    blocks = {}
    for j in range(period):
      rows = [tree.get(f"layers_{first + u * period + j}") for u in range(units)]
      if any(r is not None for r in rows):
        blocks[f"block_{j}"] = jax.tree.map(lambda *x: np.stack(x), *rows)
    if blocks:
      out[name] = blocks
  return out


def unstack_layers(tree: Mapping, module: Decoder) -> Dict:
  """The scanned layout -> the unrolled one (identity for an unrolled module)."""
  if not module.scan_layers:
    return dict(tree)
  stacks = module.scanned_stacks()
  out = {k: v for k, v in tree.items() if k not in {name for name, *_ in stacks}}
  for name, first, period, units in stacks:
    for j, block in sorted(tree.get(name, {}).items()):
      j = int(j[len("block_"):])
      for u in range(units):
        out[f"layers_{first + u * period + j}"] = jax.tree.map(lambda x, u=u: x[u], block)
  return out


def import_checkpoint(path: str, module: Optional[Decoder] = None, shardings: Any = None
                      ) -> Tuple[Decoder, Dict]:
  """(module, variables) from a Hugging Face directory (config.json + safetensors).

  module: the target (e.g. the mixtral preset); its parameter shapes must match the
    checkpoint. None: built from config.json.
  shardings: a pytree of `jax.sharding.Sharding` matching the params (for example from
    `nn.logical_to_mesh_sharding`); each array is placed with it as it is converted.
  Returns variables {"params": …} (+ "moe_balance" for DeepSeek-V3's expert biases).
  """
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  check_config(cfg)
  from moe_jax.interop import hf_configs  # pylint: disable=g-import-not-at-top  (imports us)
  if module is None:
    module = decoder_from_hf_config(cfg)
  else:
    hf_configs.check_same_computation(module, decoder_from_hf_config(cfg),
                                      "the checkpoint's config.json")
  abstract = abstract_variables(module)
  has_bias = deepseek.has_expert_bias(cfg)
  if has_bias != (EXPERT_BIAS_COLLECTION in abstract):
    raise ValueError(
        f"the checkpoint's routers {'have' if has_bias else 'have no'} expert biases "
        f"(e_score_correction_bias) and the module's routers {'do not' if has_bias else 'do'}:"
        " set TokenChoiceRouter.expert_bias (or expert_bias_update_rate) to match.")
  converted = hf_to_variables(_read_safetensors(path), module, cfg, _expected(module))
  variables = {"params": checked_params(module, stack_layers(converted["params"], module),
                                        shardings, abstract=abstract)}
  if has_bias:
    variables[EXPERT_BIAS_COLLECTION] = checked_params(
        module, stack_layers(converted[EXPERT_BIAS_COLLECTION], module),
        collection=EXPERT_BIAS_COLLECTION, abstract=abstract)
  return module, variables


def export_checkpoint(module: Decoder, variables: Mapping, path: str,
                      hf_config: Optional[Mapping[str, Any]] = None,
                      model_type: Optional[str] = None) -> None:
  """Writes config.json and model.safetensors that transformers loads. `variables`: what
  import_checkpoint returns ({"params": …, …}), or the params alone. hf_config: the
  config.json to write (an imported model's own); None: made for `model_type` from the module
  (interop/hf_configs.py, which refuses what that family cannot express)."""
  from moe_jax.interop.tensors import save  # pylint: disable=g-import-not-at-top
  if hf_config is None:
    if model_type is None:
      raise ValueError("give hf_config (the config.json to write) or model_type (one of "
                       f"{FAMILIES}) to make one from the module.")
    from moe_jax.interop.hf_configs import hf_config as make_config  # pylint: disable=g-import-not-at-top
    hf_config = make_config(module, model_type)
  kind = check_config(hf_config)
  from moe_jax.interop import hf_configs  # pylint: disable=g-import-not-at-top  (imports us)
  hf_configs.check_same_computation(module, decoder_from_hf_config(hf_config), "hf_config")
  moe = module.moe_layer(parent=None) if module.moe_layer is not None else None
  router = moe.router if moe is not None else None
  biased = bool(getattr(router, "has_expert_bias", False))
  if biased and kind != "deepseek_v3":
    raise ValueError(f"this model's routers select with an expert bias (aux-loss-free "
                     f"balancing), which Hugging Face's {kind} cannot hold; deepseek_v3 can.")
  if kind.startswith("deepseek") != deepseek.is_latent(module):
    raise ValueError(f"model_type {kind!r} needs "
                     f"{'LatentAttention' if kind.startswith('deepseek') else 'standard'} "
                     "attention; this model's is not.")
  if not kind.startswith("deepseek") and module.attention_layer is not None:
    raise ValueError("this model's attention is not the standard one (attention_layer is set, "
                     f"e.g. SwitchHead): Hugging Face's {kind} has no such layer.")
  variables = nn.meta.unbox(dict(variables))
  if "params" not in variables:
    variables = {"params": variables}
  unrolled = {c: unstack_layers(tree, module) for c, tree in variables.items()
              if c in ("params", EXPERT_BIAS_COLLECTION)}
  if kind == "deepseek_v3" and EXPERT_BIAS_COLLECTION not in unrolled:
    if biased:
      raise ValueError("this model's routers have expert biases: pass the variables with "
                       f"their '{EXPERT_BIAS_COLLECTION}' collection, not the params alone.")
    # No bias here: transformers' zeros select exactly as no bias.
    unrolled[EXPERT_BIAS_COLLECTION] = {
        f"layers_{i}": {"moe": {"router": {"expert_bias": np.zeros(moe.num_experts,
                                                                    np.float32)}}}
        for i in module.moe_ids}
  save(path, variables_to_hf(unrolled, module, hf_config), hf_config)
