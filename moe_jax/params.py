"""Parameter counts and FLOPs per token of a model, from shapes alone (`jax.eval_shape`).

    python -m moe_jax.params --gin_file=gin_configs/models/mixtral_8x7b.gin [--seq_len 4096]

total:   every parameter.
active:  the parameters one token uses: all of them except the experts it is not routed to
         (expert weights — those with the sub-layer's `expert_axis` logical axis — count
         k / E of theirs, k = the sub-layer's `experts_per_token`; the router, shared experts
         and dense parts count fully). Embeddings are included, as in the published Mixtral /
         GLaM figures. Sparse attention (SwitchHead) counts the same way.
flops_per_token (forward): 2 · (active matmul parameters, the output projection included,
         the input embedding lookup not) + 4 · layers · heads · head_dim · seq_len for the
         attention scores and values (PaLM's convention, no causal discount). Training ≈ 3×.
Expert choice routes k · S tokens per group on average, so k / E holds for it too; Soft MoE
         applies E · slots / S experts per token.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ParamReport:
  total: int
  active: int
  embedding: int          # input embedding (and the lm_head when untied)
  expert: int             # all expert weights
  flops_per_token: float  # forward, at seq_len
  seq_len: int

  def summary(self) -> str:
    b = human_count
    return (f"total={b(self.total)} active={b(self.active)} "
            f"active_non_embedding={b(self.active - self.embedding)} experts={b(self.expert)} "
            f"embedding={b(self.embedding)} forward_flops_per_token={self.flops_per_token:.3e} "
            f"(seq_len={self.seq_len}; training ≈ 3×)")


def human_count(n: float) -> str:
  """1.23B, 45.6M, 7.89K or 512: three significant digits at any size."""
  for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
    if abs(n) >= scale:
      text = f"{n / scale:.3g}"
      return (text if "e" not in text else f"{n / scale:,.0f}") + unit  # 999,950: "1,000K"
  return f"{n:.0f}"


def param_shapes(module: nn.Module, seq_len: int) -> Dict[str, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the params, without allocating them."""
  return {path: nn.meta.unbox(box) for path, box in _boxed_params(module, seq_len).items()}


def _boxed_params(module: nn.Module, seq_len: int) -> Dict[str, Any]:
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  variables = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), tokens)
  return flax.traverse_util.flatten_dict(variables["params"], sep="/",
                                         is_leaf=lambda _, v: isinstance(v, nn.Partitioned))


def _expert_axis(box, name: str) -> Optional[int]:
  """Index of the logical axis `name` of a boxed param, or None."""
  names = getattr(box, "names", ())
  return names.index(name) if name in names else None


def _sublayer_kind(path: str, kinds) -> Optional[str]:
  """The sparse sub-layer kind a param path belongs to: a kind is a sub-layer name ("moe") or
  "<stack>/<sub-layer name>" ("encoder/moe"), every part of it a part of the path."""
  parts = path.split("/")
  return next((kind for kind in kinds if all(p in parts for p in kind.split("/"))), None)


def count(module: nn.Module, seq_len: int = 2048) -> ParamReport:
  """Counts for a `model.Decoder` or an `encoder_decoder.EncoderDecoder` (module docstring
  for the definitions; an encoder-decoder's flops are per (input, target) position pair)."""
  boxes = _boxed_params(module, seq_len)
  size = {path: math.prod(nn.meta.unbox(box).shape) for path, box in boxes.items()}
  total = sum(size.values())
  sublayers = module.sparse_sublayers()
  expert = inactive = 0
  for path, n in size.items():
    kind = _sublayer_kind(path, sublayers)
    axis = None if kind is None else _expert_axis(boxes[path], sublayers[kind].expert_axis)
    if axis is None:
      continue
    num_experts = nn.meta.unbox(boxes[path]).shape[axis]
    k = min(sublayers[kind].experts_per_token(seq_len), num_experts)
    expert += n
    inactive += n * (1 - k / num_experts)
  active = total - round(inactive)
  embedding = size["token_embed/embedding"] + size.get("lm_head", 0)
  # Matmul params a token multiplies with: all active ones except the embedding lookup, plus
  # the tied output projection (the embedding again) when there is no lm_head.
  matmul = active - size["token_embed/embedding"]
  if module.tie_embeddings:
    matmul += size["token_embed/embedding"]
  if hasattr(module, "attention_flops"):
    attention = module.attention_flops(seq_len)
  else:
    head_dim = module.head_dim or module.d_model // module.num_heads
    attention = 4 * module.num_layers * module.num_heads * head_dim * seq_len
  return ParamReport(total=total, active=active, embedding=embedding, expert=expert,
                     flops_per_token=2.0 * matmul + attention, seq_len=seq_len)


def main(argv=None):
  from moe_jax import config  # gin is only needed by the command line
  files, bindings, rest = config.split_gin_args(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=2048)
  args = parser.parse_args(rest)
  if not files:
    parser.error("give at least one --gin_file")
  from moe_jax import checks  # pylint: disable=g-import-not-at-top
  checks.exit_on_setting_error(checks.integer, "--seq_len", args.seq_len, 1)
  model = checks.exit_on_setting_error(config.load_model, files, bindings)
  print(count(model.module, args.seq_len).summary())


if __name__ == "__main__":
  main()
