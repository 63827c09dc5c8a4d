"""The decoder-only transformer around the MoE layer: placement, scan, and the loss.

    tokens [B, L] -> Embed -> N × DecoderBlock -> RMSNorm -> logits [B, L, V]

    DecoderBlock (pre-norm residual sublayers):
      x += Attention(norm(x))    or any attention factory (`attention_layer`), e.g. SwitchHead
      x += FFN(norm(x))          FFN = dense MlpBlock, or on MoE layers:
                                 MoE(h)                        plain
                                 MoE(h) + MlpBlock(h)          moe_dense_ffn="parallel" (OpenMoE)
                                 MoE(h) + σ(h w)·Shared(h)     shared experts (DeepSeek, Qwen2)
      x += MlpBlock(norm(x))     moe_dense_ffn="sequential" (ST-MoE's extra dense FFN)

Sub-layers are injected factories (the Decoder fills in the shared sizes), so experts can sit in
the attention too: a sub-layer that returns (y, MoeAux) is sparse, and its losses and metrics
are collected per kind of sub-layer ("moe": the FFN, "attention"). A sparse sub-layer declares
`num_experts`, `experts_per_token(seq_len)`, `causal` and `mixes_tokens` (moe_layer.MoeLayer
and switchhead.SwitchHeadAttention do); `sparse_sublayers()` lists them for the tools.

MoE placement: the first `first_dense_layers` layers are dense (DeepSeek's first_k_dense);
after them, layer i is sparse iff (i − first_dense_layers) % moe_every == moe_offset; or
exactly the layers in moe_layer_indices. With scan_layers the stack is one compiled unit of
`moe_every` blocks ([dense…, moe]) under `nn.scan`, parameters stacked on a leading "layers"
axis, after a scanned stack "dense_layers" of the first_dense_layers dense blocks; MoE losses
and metrics come out of the scan stacked, in layer order, exactly as from the unrolled stack.

Loss (`DecoderOnlyLM.loss`, SPEC §3): token cross-entropy on targets (padding and inputs
masked by `decoder_loss_weights`) + logits_z_loss · mean log²Z + aux_loss_weight · mean aux
+ router_z_loss_weight · mean router z-loss, means over all sparse sub-layers.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.attention import Attention
from moe_jax.dense import Embed, MlpBlock, RMSNorm, dense_init
from moe_jax.moe_layer import ROUTING_RECORDS, MoeAux

Array = jax.Array
MOE_DENSE_FFN = ("none", "parallel", "sequential")
ACTIVATION_AXES = ("batch", "length", "act_embed")  # logical axes of the residual stream
# Rematerialisation of each block in the backward pass: what the forward keeps.
#   none: everything autodiff wants; full: only the block inputs (recompute the rest);
#   dots: matmul outputs without batch dims (MaxText's "minimal"-style middle ground).
REMAT_POLICIES = {"none": None, "full": None,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# RNG streams split per layer under scan (a layer's noise must differ from its neighbour's).
RNG_STREAMS = ("params", "dropout", "jitter", "gating_noise", "routing")
# Stats of sparse attention sub-layers carry this prefix ("attention/aux_loss"); the FFN's none.
ATTENTION_STATS = "attention/"


def is_sparse(sublayer: nn.Module) -> bool:
  """Does this (unbound) sub-layer hold experts? The sparse sub-layer protocol (module doc)."""
  return hasattr(sublayer, "experts_per_token")


def check_sublayer(kind: str, layer: nn.Module, decode: bool) -> None:
  """A causal (decoder-only) model refuses routers that mix tokens across the sequence, and
  decoding refuses routers that are not causal."""
  if not is_sparse(layer):
    return
  router = type(layer.router).__name__
  if layer.mixes_tokens:
    raise ValueError(
        f"the {kind} sub-layer's router ({router}) mixes tokens across the sequence, so in a "
        "causal decoder every position would see its future: it is for non-causal stacks (an "
        "encoder, a ViT); use a token-choice router here.")
  if decode and not layer.causal:
    raise ValueError(
        f"the {kind} sub-layer's router ({router}) is not causal (a token's routing depends on "
        "later tokens: expert choice, batch-prioritized routing with a capacity) and cannot "
        "decode token by token; use a causal router (or dropless dispatch) for generation.")


def moe_layer_ids(num_layers: int, moe_every: int, moe_offset: Optional[int] = None,
                  moe_layer_indices: Optional[Sequence[int]] = None,
                  first_dense_layers: int = 0) -> Tuple[int, ...]:
  """Indices of the sparse layers (see the module docstring), validated."""
  if not 0 <= first_dense_layers < num_layers:
    raise ValueError(f"first_dense_layers must be in [0, num_layers={num_layers}), got "
                     f"{first_dense_layers}.")
  if moe_layer_indices is not None and first_dense_layers:
    raise ValueError(f"set either moe_layer_indices ({tuple(moe_layer_indices)}) or "
                     f"first_dense_layers ({first_dense_layers}), not both.")
  if moe_layer_indices is not None:
    ids = tuple(sorted(set(int(i) for i in moe_layer_indices)))
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
      raise ValueError(f"moe_layer_indices {bad} are outside [0, num_layers={num_layers}).")
    return ids
  if moe_every < 1:
    raise ValueError(f"moe_every must be >= 1 (a MoE layer every N layers), got {moe_every}.")
  offset = moe_every - 1 if moe_offset is None else moe_offset
  if not 0 <= offset < moe_every:
    raise ValueError(f"moe_offset must be in [0, moe_every={moe_every}), got {moe_offset}.")
  return tuple(i for i in range(first_dense_layers, num_layers)
               if (i - first_dense_layers) % moe_every == offset)


class DecoderBlock(nn.Module):
  """One pre-norm transformer layer; `moe` set makes it sparse (module docstring).

  The encoder-decoder model (moe_jax/encoder_decoder.py) reuses it: its encoder blocks are
  `bidirectional` (sparse sub-layers may mix tokens; the caller's prefix_mask is all ones),
  and its decoder blocks have a `cross_attention` sub-layer between self-attention and FFN:
      x += CrossAttention(norm(x), encoded)
  """
  attention: Callable[..., nn.Module]
  mlp: Callable[..., nn.Module]
  moe: Optional[Callable[..., nn.Module]] = None
  moe_dense_ffn: str = "none"
  shared_experts: Optional[Callable[..., nn.Module]] = None
  shared_expert_gate: bool = False
  norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  deterministic: bool = True
  decode: bool = False
  cross_attention: Optional[Callable[..., nn.Module]] = None
  bidirectional: bool = False
  norm_layer: Optional[Callable[..., nn.Module]] = None  # None: RMSNorm(norm_epsilon)

  @nn.compact
  def __call__(self, x: Array, positions, segment_ids, prefix_mask, padding_mask,
               position_bias=None, encoded=None, encoded_segment_ids=None, encoded_mask=None
               ) -> Tuple[Array, Dict[str, MoeAux]]:
    """-> (x, {sub-layer kind: MoeAux} for its sparse sub-layers)."""
    # Arrays (or None) only as call arguments, the flags as fields: nn.remat-friendly.
    deterministic, decode = self.deterministic, self.decode
    norm = self.norm_layer or functools.partial(RMSNorm, self.norm_epsilon, self.dtype)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    check = lambda kind, layer: None if self.bidirectional else check_sublayer(kind, layer,
                                                                               decode)
    auxes = {}
    h = norm(name="pre_attention_norm")(x)
    attention = self.attention(name="attention")
    check("attention", attention)
    bias = {} if position_bias is None else {"position_bias": position_bias}
    y = attention(
        h, positions=positions, segment_ids=segment_ids, prefix_mask=prefix_mask,
        padding_mask=padding_mask, deterministic=deterministic, decode=decode, **bias)
    if is_sparse(attention):  # a sparse attention returns its MoeAux too
      y, auxes["attention"] = y
    x = x + drop(y)
    if self.cross_attention is not None:
      h = norm(name="pre_cross_attention_norm")(x)
      x = x + drop(self.cross_attention(name="cross_attention")(
          h, encoded, query_segment_ids=segment_ids, key_segment_ids=encoded_segment_ids,
          key_mask=encoded_mask, deterministic=deterministic, decode=decode))
    h = norm(name="pre_mlp_norm")(x)
    if self.moe is None:
      y = self.mlp(name="mlp")(h, deterministic)
    else:
      moe = self.moe(name="moe")
      check("moe", moe)
      y, auxes["moe"] = moe(h, padding_mask, deterministic)
      if self.moe_dense_ffn == "parallel":
        y = y + self.mlp(name="mlp")(h, deterministic)
      if self.shared_experts is not None:
        shared = self.shared_experts(name="shared_experts")(h, deterministic)
        if self.shared_expert_gate:
          gate = self.param("shared_expert_gate", nn.with_logical_partitioning(
              dense_init(), ("embed", None)), (h.shape[-1], 1), jnp.float32)
          shared = shared * jax.nn.sigmoid(h @ gate.astype(self.dtype))
        y = y + shared
    x = x + drop(y)
    if self.moe is not None and self.moe_dense_ffn == "sequential":
      h = norm(name="pre_extra_mlp_norm")(x)
      x = x + drop(self.mlp(name="extra_mlp")(h, deterministic))
    return nn.with_logical_constraint(x, ACTIVATION_AXES), auxes


class DecoderUnit(nn.Module):
  """`period` consecutive blocks, the body of the scanned stack; block j sparse iff in moe_ids."""
  block: Callable[..., nn.Module]
  period: int
  moe_ids: Tuple[int, ...]
  deterministic: bool
  decode: bool

  @nn.compact
  def __call__(self, x, positions, segment_ids, prefix_mask, padding_mask):
    """-> (x, {sub-layer kind: tuple of MoeAux, in block order})."""
    auxes = {}
    for j in range(self.period):
      x, block_auxes = self.block(j in self.moe_ids, self.deterministic, self.decode)(
          name=f"block_{j}")(x, positions, segment_ids, prefix_mask, padding_mask)
      for kind, aux in block_auxes.items():
        auxes.setdefault(kind, []).append(aux)
    return x, {kind: tuple(a) for kind, a in auxes.items()}


class Decoder(nn.Module):
  """Decoder-only (MoE) transformer language model.

  Attributes (H = d_model):
    vocab_size, num_layers, d_model, num_heads; num_kv_heads (None: = num_heads; fewer: GQA);
    head_dim (None: H / num_heads); mlp_dim: dense FFN width; activation: relu|gelu|swiglu|geglu.
    dropout_rate (residual and FFN), attention_dropout_rate; norm_epsilon; rope_theta;
    rope_scaling: an attention.YarnScaling (YaRN context extension) or None; qkv_bias;
    qk_norm: "none", "head" (Qwen3) or "full" (OLMoE) RMSNorm of queries and keys (attention.py).
    tie_embeddings: output logits x Eᵀ / √H (T5's scaling) instead of a separate lm_head.
    dtype: activations (float32 or bfloat16); params are float32, the router float32.
    attention_layer: factory of the attention sub-layer, called with num_heads, num_kv_heads,
      head_dim, rope_theta, dropout_rate and dtype (e.g. gin's @SwitchHeadAttention,
      @LatentAttention); None: `Attention` with `qkv_bias` and `qk_norm`.
    moe_layer: factory of the MoE layer (e.g. gin's @MoeLayer) or None for a dense model.
    moe_every / moe_offset / moe_layer_indices / first_dense_layers: placement (module
      docstring).
    moe_dense_ffn: "none", "parallel" (residual MoE: + dense FFN of moe_dense_dim on the same
      input) or "sequential" (an extra dense FFN sublayer after the MoE one, ST-MoE).
    shared_expert_dim: width of the always-on shared-expert FFN (0: none); shared_expert_gate:
      scale it by σ(h w) (Qwen2-MoE).
    scan_layers: stack the layers with nn.scan (one compiled unit of moe_every blocks).
    remat_policy: "none", "full" or "dots": recompute each block's activations in the
      backward pass instead of keeping them (REMAT_POLICIES).
  """
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  activation: str = "swiglu"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  norm_epsilon: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[Any] = None   # attention.YarnScaling
  qkv_bias: bool = False
  qk_norm: str = "none"
  tie_embeddings: bool = False
  dtype: Any = jnp.float32
  attention_layer: Optional[Callable[..., nn.Module]] = None
  moe_layer: Optional[Callable[..., nn.Module]] = None
  moe_every: int = 1
  moe_offset: Optional[int] = None
  moe_layer_indices: Optional[Sequence[int]] = None
  first_dense_layers: int = 0
  moe_dense_ffn: str = "none"
  moe_dense_dim: Optional[int] = None
  shared_expert_dim: int = 0
  shared_expert_gate: bool = False
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {tuple(REMAT_POLICIES)}, got "
                       f"{self.remat_policy!r}.")
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
    sizes_own_heads = getattr(getattr(self.attention_layer, "func", self.attention_layer),
                              "sizes_own_heads", False)
    if self.head_dim is None and self.d_model % self.num_heads and not sizes_own_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model} "
                       "(or set head_dim explicitly).")
    kv = self.num_kv_heads or self.num_heads
    if self.num_heads % kv:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads="
                       f"{self.num_heads}.")
    if self.moe_dense_ffn not in MOE_DENSE_FFN:
      raise ValueError(f"moe_dense_ffn must be one of {MOE_DENSE_FFN}, got "
                       f"{self.moe_dense_ffn!r}.")
    if self.moe_layer_indices is not None:  # gin gives lists; modules must stay hashable
      object.__setattr__(self, "moe_layer_indices", tuple(self.moe_layer_indices))
    if self.attention_layer is not None and (self.qkv_bias or self.qk_norm != "none"):
      raise ValueError("qkv_bias and qk_norm apply to the default Attention; with "
                       "attention_layer set, bind the attention factory's own settings instead.")
    if self.moe_layer is not None:
      if not moe_layer_ids(self.num_layers, self.moe_every, self.moe_offset,
                           self.moe_layer_indices, self.first_dense_layers):  # validates them
        raise ValueError(
            f"the MoE placement leaves no sparse layer (num_layers={self.num_layers}, "
            f"first_dense_layers={self.first_dense_layers}, moe_every={self.moe_every}, "
            f"moe_offset={self.moe_offset}, moe_layer_indices={self.moe_layer_indices}); set "
            "moe_layer=None for a dense model.")
      periodic = self.num_layers - self.first_dense_layers
      if self.scan_layers and (self.moe_layer_indices is not None
                               or periodic % self.moe_every):
        raise ValueError(
            "scan_layers needs a periodic placement: moe_every dividing the layers after "
            f"first_dense_layers (got num_layers={self.num_layers}, first_dense_layers="
            f"{self.first_dense_layers}, moe_every={self.moe_every}) and no "
            f"moe_layer_indices (got {self.moe_layer_indices}); or set scan_layers=False.")
    elif self.first_dense_layers:
      raise ValueError("first_dense_layers places MoE layers; this model has no moe_layer.")
    super().__post_init__()

  @property
  def scan_period(self) -> int:
    """Blocks per scanned unit (scan_layers): moe_every, or 1 without MoE FFN layers."""
    return self.moe_every if self.moe_layer is not None else 1

  @property
  def moe_ids(self) -> Tuple[int, ...]:
    if self.moe_layer is None:
      return ()
    return moe_layer_ids(self.num_layers, self.moe_every, self.moe_offset,
                         self.moe_layer_indices, self.first_dense_layers)

  @nn.nowrap
  def scanned_stacks(self) -> Tuple[Tuple[str, int, int, int], ...]:
    """(name, first layer, blocks per unit, units) of each scanned stack, in layer order:
    layer = first + unit · period + block. The tools use it to map the scanned layout."""
    first = self.first_dense_layers if self.moe_layer is not None else 0
    stacks = (("dense_layers", 0, 1, first),) if first else ()
    period = self.scan_period
    return stacks + (("layers", first, period, (self.num_layers - first) // period),)

  def _attention(self) -> Callable[..., nn.Module]:
    settings = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_dim, rope_theta=self.rope_theta,
                    dropout_rate=self.attention_dropout_rate, dtype=self.dtype)
    if self.rope_scaling is not None:
      settings["rope_scaling"] = self.rope_scaling
    if self.attention_layer is None:
      return functools.partial(Attention, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm,
                               norm_epsilon=self.norm_epsilon, **settings)
    return functools.partial(self.attention_layer, **settings)

  @nn.nowrap  # built outside any module context, so nothing adopts the sub-layers
  def sparse_sublayers(self) -> Dict[str, nn.Module]:
    """{sub-layer kind (its name in a block): an unbound instance} for the sparse sub-layers,
    as the blocks build them: what the tools (parameter counter, decoding, recorder) read."""
    sublayers = {"attention": self._attention()(parent=None)}
    if self.moe_layer is not None:
      sublayers["moe"] = self.moe_layer(dtype=self.dtype, parent=None)
    return {kind: layer for kind, layer in sublayers.items() if is_sparse(layer)}

  @nn.nowrap
  def attention_flops(self, seq_len: int) -> float:
    """Forward FLOPs per token of the attention scores and mixing, all layers (params.py)."""
    return self.num_layers * self._attention()(parent=None).score_flops(seq_len, self.d_model)

  @nn.nowrap
  def with_moe_settings(self, **settings) -> "Decoder":
    """A copy whose MoE FFN layers get `settings` (e.g. eval_capacity_factor) over the
    factory's."""
    if self.moe_layer is None:  # sparse attention only: no FFN layer to change
      return self
    return self.clone(moe_layer=functools.partial(self.moe_layer, **settings), parent=None)

  @nn.nowrap
  def sparse_layer_ids(self) -> Dict[str, Tuple[int, ...]]:
    """{sub-layer kind: the layers where it is sparse}."""
    ids = {"moe": self.moe_ids, "attention": tuple(range(self.num_layers))}
    return {kind: ids[kind] for kind in self.sparse_sublayers()}

  @nn.nowrap
  def check_decodable(self) -> None:
    """Raises unless every sparse sub-layer routes causally (decoding token by token)."""
    for kind, layer in self.sparse_sublayers().items():
      check_sublayer(kind, layer, decode=True)

  def _block(self, sparse: bool, deterministic: bool, decode: bool
             ) -> Callable[..., nn.Module]:
    attention = self._attention()
    mlp_dim = self.mlp_dim
    if sparse and self.moe_dense_ffn != "none":
      mlp_dim = self.moe_dense_dim or self.mlp_dim
    mlp = functools.partial(MlpBlock, mlp_dim, self.activation, self.dropout_rate, self.dtype)
    shared = None
    if sparse and self.shared_expert_dim:
      shared = functools.partial(MlpBlock, self.shared_expert_dim, self.activation,
                                 self.dropout_rate, self.dtype)
    moe = functools.partial(self.moe_layer, dtype=self.dtype) if sparse else None
    block = DecoderBlock
    if self.remat_policy != "none" and not decode:
      block = nn.remat(DecoderBlock, policy=REMAT_POLICIES[self.remat_policy],
                       prevent_cse=not self.scan_layers)
    return functools.partial(
        block, attention, mlp, moe, self.moe_dense_ffn, shared, self.shared_expert_gate,
        self.norm_epsilon, self.dropout_rate, self.dtype, deterministic, decode)

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None, prefix_mask: Optional[Array] = None,
               padding_mask: Optional[Array] = None, deterministic: bool = True,
               decode: bool = False) -> Tuple[Array, Dict[str, Array]]:
    """tokens [B, L] -> (logits [B, L, V] float32, stats: name -> [sparse layers, ...]): the
    FFN MoE layers' under plain names, a sparse attention's under "attention/<name>".

    positions: RoPE positions (default 0..L-1; per segment when packed); segment_ids: packed
    example ids (0 = padding); prefix_mask: 1 on positions attended bidirectionally (prefix
    LM); padding_mask: 1 on real tokens, for the MoE layers (default: segment_ids > 0).
    """
    if padding_mask is None and segment_ids is not None:
      padding_mask = segment_ids > 0
    embed = Embed(self.vocab_size, self.d_model, self.dtype, name="token_embed")
    x = nn.Dropout(self.dropout_rate)(embed(tokens), deterministic=deterministic)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    inputs = (positions, segment_ids, prefix_mask, padding_mask)
    moe_ids = self.moe_ids
    if self.scan_layers:
      auxes = {}
      for name, first, period, units in self.scanned_stacks():
        unit_moe = tuple(sorted({(i - first) % period for i in moe_ids
                                 if first <= i < first + period * units}))
        stack = nn.scan(
            DecoderUnit,
            variable_axes={"params": 0, "cache": 0, "moe_balance": 0,
                           ROUTING_RECORDS: 0},
            split_rngs={rng: True for rng in RNG_STREAMS},
            in_axes=(nn.broadcast,) * 4,
            length=units,
            metadata_params={nn.PARTITION_NAME: "layers"})
        x, unit_auxes = stack(self._block, period, unit_moe, deterministic, decode,
                              name=name)(x, *inputs)
        # Per kind, per sparse block of the unit, leaves [U, ...] -> layer order (unit-major),
        # after the earlier stack's.
        for kind, a in unit_auxes.items():
          ordered = jax.tree.map(
              lambda *v: jnp.stack(v, 1).reshape((-1,) + v[0].shape[1:]), *a)
          auxes[kind] = ordered if kind not in auxes else jax.tree.map(
              lambda u, v: jnp.concatenate([u, v]), auxes[kind], ordered)
      stats = stats_of(auxes, stacked=True)
    else:
      auxes = {}
      for i in range(self.num_layers):
        x, block_auxes = self._block(i in moe_ids, deterministic, decode)(name=f"layers_{i}")(
            x, positions, segment_ids, prefix_mask, padding_mask)
        for kind, aux in block_auxes.items():
          auxes.setdefault(kind, []).append(aux)
      stats = stats_of(auxes, stacked=False)
    x = RMSNorm(self.norm_epsilon, self.dtype, name="final_norm")(x)
    if self.tie_embeddings:
      logits = embed.attend(x) * self.d_model**-0.5
    else:
      head = self.param("lm_head", nn.with_logical_partitioning(dense_init(), ("embed", "vocab")),
                        (self.d_model, self.vocab_size), jnp.float32)
      logits = x @ head.astype(self.dtype)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32), stats


def stats_of(auxes: Dict[str, Any], stacked: bool) -> Dict[str, Array]:
  """{kind: MoeAux list (or one already-stacked MoeAux)} -> {name: [num_sparse_layers, ...]},
  the FFN's ("moe") names plain, the attention's prefixed with ATTENTION_STATS."""
  stats = {}
  for kind, kind_auxes in auxes.items():
    flat = [{"aux_loss": a.aux_loss, "z_loss": a.z_loss, **a.metrics}
            for a in ([kind_auxes] if stacked else kind_auxes)]
    prefix = "" if kind == "moe" else kind + "/"
    stats.update({prefix + name: value for name, value in
                  (flat[0] if stacked else jax.tree.map(lambda *v: jnp.stack(v), *flat)).items()})
  return stats


# ----------------------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------------------

def cross_entropy(logits: Array, targets: Array, weights: Array
                  ) -> Tuple[Array, Array, Array]:
  """Per-token −log p(target) and log Z (both [B, L], float32), and Σ weights.

  weights (decoder_loss_weights) are 0 on padding and, for prefix LM, on the inputs.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return (log_z - target_logit), log_z, jnp.sum(weights)


class TrainingObjective:
  """`loss` of a language model: its `apply(variables, batch, …) -> (logits, stats)`, the
  decoder targets' cross-entropy and the sparse sub-layers' losses (`objective`). The model
  dataclass gives aux_loss_weight, router_z_loss_weight, logits_z_loss and `module`."""

  def loss(self, variables, batch: Mapping[str, Array], *, deterministic: bool = False,
           rngs=None, mutable=False):
    """(total loss, metrics) or, with `mutable`, ((total loss, metrics), updated variables)."""
    out = self.apply(variables, batch, deterministic=deterministic, rngs=rngs, mutable=mutable)
    returns_state = mutable is not False  # flax: any collection list, even [], returns state
    (logits, stats), updates = out if returns_state else (out, None)
    total, metrics = objective(logits, stats, batch, self.module.sparse_layer_ids(),
                               aux_loss_weight=self.aux_loss_weight,
                               router_z_loss_weight=self.router_z_loss_weight,
                               logits_z_loss=self.logits_z_loss)
    return ((total, metrics), updates) if returns_state else (total, metrics)


@dataclasses.dataclass(frozen=True)
class DecoderOnlyLM(TrainingObjective):
  """A `Decoder` and its training objective (t5x's DecoderOnlyModel, in small).

  Batches use t5x's decoder-only feature names: decoder_input_tokens, decoder_target_tokens,
  decoder_loss_weights, and optionally decoder_positions, decoder_segment_ids and
  decoder_causal_attention (the prefix-LM mask).
  """
  module: Decoder
  aux_loss_weight: float = 0.01
  router_z_loss_weight: float = 1e-3
  logits_z_loss: float = 0.0
  features = "decoder_only"  # the data pipeline's layout (tasks/pipeline.get_dataset)

  def apply(self, variables, batch: Mapping[str, Array], *, deterministic: bool,
            rngs=None, mutable=False, decode: bool = False):
    return self.module.apply(
        variables, batch["decoder_input_tokens"],
        positions=batch.get("decoder_positions"), segment_ids=batch.get("decoder_segment_ids"),
        prefix_mask=batch.get("decoder_causal_attention"),
        padding_mask=decoder_padding_mask(batch), deterministic=deterministic, decode=decode,
        rngs=rngs, mutable=mutable)

  def generate(self, variables, prompt: Array, *, bidirectional_prompt: bool = False,
               **sampling):
    """Continues `prompt` [B, P] (decoding.generate's sampling settings); the prompt attended
    bidirectionally (prefix LM, UL2's mode-token prompts) with `bidirectional_prompt`."""
    from moe_jax import decoding  # pylint: disable=g-import-not-at-top  (decoding imports us)
    prefix = jnp.ones_like(prompt) if bidirectional_prompt else None
    return decoding.generate(self.module, variables, prompt, prefix_mask=prefix, **sampling)


def objective(logits: Array, stats: Dict[str, Array], batch: Mapping[str, Array],
              layer_ids: Mapping[str, Sequence[int]], *, aux_loss_weight: float,
              router_z_loss_weight: float, logits_z_loss: float) -> Tuple[Array, Dict]:
  """(total loss, metrics) from the logits over the decoder targets and the sparse
  sub-layers' stats (the module docstring's loss): what every model's `loss` returns."""
  weights = batch.get("decoder_loss_weights")
  if weights is None:
    weights = (batch["decoder_target_tokens"] > 0).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  nll, log_z, num_tokens = cross_entropy(logits, batch["decoder_target_tokens"], weights)
  denom = jnp.maximum(num_tokens, 1.0)
  ce = jnp.sum(nll * weights) / denom
  z = jnp.sum(jnp.square(log_z) * weights) / denom
  total = ce + logits_z_loss * z
  metrics = {"loss/cross_entropy": ce, "loss/logits_z_loss": z, "num_tokens": num_tokens,
             "accuracy": jnp.sum((jnp.argmax(logits, -1) == batch["decoder_target_tokens"])
                                 * weights) / denom}
  if stats:
    # Means over every sparse sub-layer, FFN and attention, encoder and decoder alike.
    aux, rz = (jnp.mean(jnp.concatenate([v for name, v in stats.items()
                                         if name.rsplit("/", 1)[-1] == loss]))
               for loss in ("aux_loss", "z_loss"))
    total = total + aux_loss_weight * aux + router_z_loss_weight * rz
    metrics.update({"loss/aux_loss": aux, "loss/router_z_loss": rz})
    metrics.update(moe_metrics(stats, layer_ids))
  metrics["loss/total"] = total
  return total, metrics


def decoder_padding_mask(batch: Mapping[str, Array]) -> Optional[Array]:
  """Real tokens for the MoE layers: targets > 0 (t5x pads with 0), or packed segments."""
  if "decoder_segment_ids" in batch:
    return batch["decoder_segment_ids"] > 0
  if "decoder_target_tokens" in batch:
    return batch["decoder_target_tokens"] > 0
  return None


def moe_metrics(stats: Dict[str, Array], layer_ids: Mapping[str, Sequence[int]]
                ) -> Dict[str, Array]:
  """Per-layer scalars ("moe/layer_3/dropped_fraction") and their means ("moe/dropped_fraction");
  per-expert vectors stay vectors ("moe/layer_3/expert_load_after": [E]). A sparse attention's
  are "moe_attention/layer_3/…" and "moe_attention/…"; an encoder-decoder's carry the stack,
  "encoder/moe/…", "decoder/moe_attention/…". layer_ids: {kind: its sparse layers}, where a
  kind is a sub-layer name ("moe", "attention") or "<stack>/<sub-layer name>"."""
  out = {}
  for name, value in stats.items():
    kind, short = name.rsplit("/", 1) if "/" in name else ("moe", name)
    stack, _, sublayer = kind.rpartition("/")
    group = (stack + "/" if stack else "") + ("moe" if sublayer == "moe" else f"moe_{sublayer}")
    for j, layer in enumerate(layer_ids[kind]):
      out[f"{group}/layer_{layer}/{short}"] = value[j]
    if value.ndim == 1:
      out[f"{group}/{short}"] = jnp.mean(value.astype(jnp.float32))
  return out
