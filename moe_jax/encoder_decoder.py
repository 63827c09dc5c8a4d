"""The T5.1.1-style encoder-decoder around the MoE layer: Switch Transformer and ST-MoE as
published (Fedus et al. 2021, Zoph et al. 2022).

    inputs [B, Le] -> Embed -> N_e × EncoderBlock -> RMSNorm -> encoded [B, Le, H]
    targets shifted right [B, Ld] -> Embed (shared) -> N_d × DecoderBlock(encoded) -> RMSNorm
      -> logits [B, Ld, V]: tied, x Eᵀ / √H (Switch, T5 1.0), or an untied lm_head (T5.1.1)

Blocks are `model.DecoderBlock`, pre-norm, no biases anywhere:
    encoder:  x += SelfAttention(norm(x))  bidirectional   x += FFN or MoE(norm(x))
    decoder:  x += SelfAttention(norm(x))  causal
              x += CrossAttention(norm(x), encoded)        x += FFN or MoE(norm(x))
    ST-MoE (moe_dense_ffn="sequential"): a sparse block adds x += MlpBlock(norm(x)) after it.
Each stack places its MoE layers on its own (`encoder_moe_every` / `_offset` /
`_layer_indices`, as `model.moe_layer_ids`: layer i is sparse iff i % every == offset,
offset every−1 by default: Switch's layers 1, 3, 5, …, ST-MoE's 3, 7, 11, …) with its own
MoE factory, so the encoder may route non-causally (expert choice, batch-prioritized routing,
Soft MoE) while the decoder must route causally (refused at construction otherwise).

Positions: T5's relative position buckets (`relative_position_bucket`: 32 buckets, max distance
128, bidirectional in the encoder and causal in the decoder), one learned [N, buckets] bias
per stack shared by its layers, added to the self-attention logits; cross-attention has no
position term. position_embedding="rope" swaps in rotary embeddings instead. The attention
logits are scaled by 1/√D as in `attention.Attention`; T5 folds that scale into W_q
(interop/huggingface.py converts).

Decoding (`generate`): the encoder runs once; each cross-attention projects the encoded
keys and values on the first decoding call and reads them from the cache after.

Losses and metrics are the decoder-only model's (`model.objective`); the sparse sub-layers
are named by stack: stats "encoder/moe/aux_loss", metrics "encoder/moe/layer_3/…".
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import decoding
from moe_jax.attention import Attention
from moe_jax.dense import Embed, LayerNorm, MlpBlock, RMSNorm, dense_init
from moe_jax.model import (ACTIVATION_AXES, MOE_DENSE_FFN, REMAT_POLICIES, DecoderBlock,
                           TrainingObjective, decoder_padding_mask, is_sparse,
                           moe_layer_ids, stats_of)
from moe_jax.positions import RelativePositionBias, sinusoidal_positions

Array = jax.Array
POSITION_EMBEDDINGS = ("relative", "rope", "sinusoidal")
NORMS = {"rms": RMSNorm, "layer": LayerNorm}
STACKS = ("encoder", "decoder")


# ----------------------------------------------------------------------------------------
# Cross-attention.
# ----------------------------------------------------------------------------------------

class CrossAttention(Attention):
  """Decoder queries attend to the encoder's output: `Attention`'s parameters (query [H, N, D],
  key / value [H, K, D], out [N, D, H]), no position term, no causal mask.

  Masks: a query attends to keys of its own packed segment (when both segment ids are given)
  that are real (key_mask). When decoding, the keys and values of `encoded` are projected on
  the first call and kept in the cache (cached_key, cached_value, filled).
  """

  @nn.compact
  def __call__(self, x: Array, encoded: Array, *, query_segment_ids: Optional[Array] = None,
               key_segment_ids: Optional[Array] = None, key_mask: Optional[Array] = None,
               deterministic: bool = True, decode: bool = False) -> Array:
    """x [B, L, H], encoded [B, M, H] -> [B, L, H]."""
    x, encoded = x.astype(self.dtype), encoded.astype(self.dtype)
    batch, length, h = x.shape
    n, k, d = self.num_heads, self.kv_heads, self.head_size(h)
    q = self.project(x, "query", n, ("embed", "heads", "kv"))
    project_kv = lambda: (self.project(encoded, "key", k, ("embed", "kv_heads", "kv")),
                          self.project(encoded, "value", k, ("embed", "kv_heads", "kv")))
    if decode:
      key, value = self._cached(project_kv, encoded)
    else:
      key, value = project_kv()
    mask = jnp.ones((batch, 1, length, encoded.shape[1]), bool)
    if key_mask is not None:
      mask &= key_mask.astype(bool)[:, None, None, :]
    if query_segment_ids is not None and key_segment_ids is not None:
      mask &= (query_segment_ids[:, :, None] == key_segment_ids[:, None, :])[:, None]
    # A query with no key to read (an example without inputs: the LM objective) reads nothing,
    # rather than a uniform mix of other segments' keys.
    out = self.mix(q, key, value, mask, deterministic=deterministic, empty_reads_nothing=True)
    return self.output(out, h)

  def _cached(self, project_kv: Callable[[], Tuple[Array, Array]], encoded: Array):
    """The encoded keys and values: projected on the first decoding call, then cached."""
    if not self.has_variable("cache", "cached_key"):  # init: shapes only
      key, value = project_kv()
      self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      self.variable("cache", "filled", lambda: jnp.zeros((), bool))
      return key, value
    cached_key = self.variable("cache", "cached_key")
    cached_value = self.variable("cache", "cached_value")
    filled = self.variable("cache", "filled")
    # Only one branch runs: the projection happens once per decoding, on the first call.
    key, value = jax.lax.cond(filled.value, lambda: (cached_key.value, cached_value.value),
                              project_kv)
    cached_key.value, cached_value.value, filled.value = key, value, jnp.ones((), bool)
    return key, value


# ----------------------------------------------------------------------------------------
# The stacks and the model.
# ----------------------------------------------------------------------------------------

class Stack(nn.Module):
  """N blocks with a shared relative position bias (or none, with RoPE) and a final norm.

  block(i, deterministic, decode) -> the factory of layer i's DecoderBlock.
  """
  block: Callable[..., Callable[..., nn.Module]]
  num_layers: int
  num_heads: int
  causal: bool
  position_embedding: str = "relative"
  num_buckets: int = 32
  max_distance: int = 128
  sinusoidal_offset: int = 2
  norm_layer: Callable[..., nn.Module] = RMSNorm
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, positions: Optional[Array], segment_ids: Optional[Array],
               padding_mask: Optional[Array], encoded=None, encoded_segment_ids=None,
               encoded_mask=None, deterministic: bool = True, decode: bool = False):
    """x [B, L, H] embedded -> (x normalised, {kind: [MoeAux per sparse layer]})."""
    batch, length = x.shape[:2]
    index = jnp.broadcast_to(jnp.arange(length), (batch, length))
    key_positions = None
    if decode:  # one unpacked sequence per row, continuing at the cache's index
      offset, cache_length = self._decode_offset(batch, length)
      positions = index + offset
      key_positions = jnp.broadcast_to(jnp.arange(cache_length), (batch, cache_length))
    elif positions is None:
      positions = index
    bias = None
    if self.position_embedding == "relative":
      bias = RelativePositionBias(self.num_heads, not self.causal, self.num_buckets,
                                  self.max_distance, name="relative_position_bias")(
          positions, positions if key_positions is None else key_positions)
    if self.position_embedding == "sinusoidal":
      x = x + sinusoidal_positions(positions + self.sinusoidal_offset,
                                   x.shape[-1]).astype(x.dtype)
    # An encoder attends bidirectionally: the prefix-LM mask over every position.
    prefix_mask = None if self.causal else jnp.ones((batch, length), bool)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    auxes = {}
    for i in range(self.num_layers):
      x, block_auxes = self.block(i, deterministic, decode)(name=f"layers_{i}")(
          x, positions, segment_ids, prefix_mask, padding_mask, bias, encoded,
          encoded_segment_ids, encoded_mask)
      for kind, aux in block_auxes.items():
        auxes.setdefault(kind, []).append(aux)
    x = self.norm_layer(name="final_norm")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic), auxes

  def _decode_offset(self, batch: int, length: int):
    """(index of the first new token, cache length); the call that creates the cache sets its
    length (flax's convention: init with [B, max_length] dummy tokens)."""
    initialized = self.has_variable("cache", "position_index")
    index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
    slots = self.variable("cache", "positions", jnp.zeros, (length,), jnp.int32)
    offset = index.value if initialized else jnp.zeros((), jnp.int32)
    if initialized:
      index.value = offset + length
    return offset, slots.value.shape[0]


class EncoderDecoder(nn.Module):
  """T5.1.1-style (MoE) encoder-decoder (module docstring).

  Attributes (H = d_model):
    vocab_size, d_model, num_heads, head_dim (None: H / num_heads), mlp_dim (dense FFN width),
      num_encoder_layers, num_decoder_layers, activation (relu, gelu, swiglu, geglu).
    dropout_rate (embeddings, residual branches, FFN, stack outputs), attention_dropout_rate,
      norm_epsilon.
    position_embedding: "relative" (T5 buckets: relative_attention_num_buckets,
      relative_attention_max_distance), "rope" (rope_theta) or "sinusoidal" (fairseq's table
      at position + sinusoidal_offset, added to the embeddings: NLLB-MoE).
    tie_embeddings: logits x Eᵀ / √H with the input embedding (Switch) or an lm_head (T5.1.1);
      tied_output_scale=False drops the 1/√H (NLLB-MoE).
    norm: "rms" (T5) or "layer" (LayerNorm with a bias: NLLB-MoE), norm_epsilon its ε.
    use_bias: biases in the attention projections and dense FFNs (NLLB-MoE; the experts' are
      the MoE layer's `expert_bias`). scale_embeddings: token embeddings × √H (NLLB-MoE).
    decoder_start_id: the first decoder input (T5: 0, the padding id; NLLB-MoE: 2).
    encoder_moe_layer / decoder_moe_layer: MoE layer factories (gin's @MoeLayer; None: dense);
      encoder_moe_every / _offset / _layer_indices and decoder_…: their placement.
    moe_dense_ffn: "none", "parallel" or "sequential" (ST-MoE: a dense FFN after each MoE
      one), moe_dense_dim its width (None: mlp_dim).
    remat_policy: as `model.Decoder`.
  """
  vocab_size: int
  d_model: int
  num_heads: int
  mlp_dim: int
  num_encoder_layers: int = 12
  num_decoder_layers: int = 12
  head_dim: Optional[int] = None
  activation: str = "relu"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  norm_epsilon: float = 1e-6
  position_embedding: str = "relative"
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  rope_theta: float = 10000.0
  sinusoidal_offset: int = 2
  tie_embeddings: bool = True
  tied_output_scale: bool = True
  norm: str = "rms"
  use_bias: bool = False
  scale_embeddings: bool = False
  decoder_start_id: int = 0
  dtype: Any = jnp.float32
  encoder_moe_layer: Optional[Callable[..., nn.Module]] = None
  decoder_moe_layer: Optional[Callable[..., nn.Module]] = None
  encoder_moe_every: int = 2
  encoder_moe_offset: Optional[int] = None
  encoder_moe_layer_indices: Optional[Sequence[int]] = None
  decoder_moe_every: int = 2
  decoder_moe_offset: Optional[int] = None
  decoder_moe_layer_indices: Optional[Sequence[int]] = None
  moe_dense_ffn: str = "none"
  moe_dense_dim: Optional[int] = None
  remat_policy: str = "none"

  def __post_init__(self):
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got "
                       f"{self.position_embedding!r}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {tuple(REMAT_POLICIES)}, got "
                       f"{self.remat_policy!r}.")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {tuple(NORMS)}, got {self.norm!r}.")
    for stack in STACKS:
      if getattr(self, f"num_{stack}_layers") < 1:
        raise ValueError(f"num_{stack}_layers must be >= 1, got "
                         f"{getattr(self, f'num_{stack}_layers')}.")
      indices = getattr(self, f"{stack}_moe_layer_indices")
      if indices is not None:  # gin gives lists; modules must stay hashable
        object.__setattr__(self, f"{stack}_moe_layer_indices", tuple(indices))
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model} "
                       "(or set head_dim explicitly).")
    if self.moe_dense_ffn not in MOE_DENSE_FFN:
      raise ValueError(f"moe_dense_ffn must be one of {MOE_DENSE_FFN}, got "
                       f"{self.moe_dense_ffn!r}.")
    for stack in STACKS:  # validates both placements, naming the stack's settings
      try:
        self.moe_ids(stack)
      except ValueError as e:
        raise ValueError(f"{stack}_moe_every / _offset / _layer_indices (num_{stack}_layers="
                         f"{getattr(self, f'num_{stack}_layers')}): {e}") from None
    decoder_moe = self.sparse_sublayers().get("decoder/moe")
    if decoder_moe is not None and (decoder_moe.mixes_tokens or not decoder_moe.causal):
      raise ValueError(
          f"decoder_moe_layer: its router ({type(decoder_moe.router).__name__}) is not causal "
          "(a target token's routing would depend on later targets: expert choice, "
          "batch-prioritized routing with a capacity, Soft MoE), which the decoder cannot "
          "allow in training or decoding. Route non-causally in the encoder "
          "(encoder_moe_layer) and causally in the decoder (token choice, or dropless).")
    super().__post_init__()

  # --- what the tools read ---------------------------------------------------------------
  @nn.nowrap
  def moe_ids(self, stack: str) -> Tuple[int, ...]:
    if getattr(self, f"{stack}_moe_layer") is None:
      return ()
    return moe_layer_ids(getattr(self, f"num_{stack}_layers"),
                         getattr(self, f"{stack}_moe_every"),
                         getattr(self, f"{stack}_moe_offset"),
                         getattr(self, f"{stack}_moe_layer_indices"))

  @nn.nowrap
  def sparse_sublayers(self) -> Dict[str, nn.Module]:
    """{"<stack>/moe": an unbound instance of that stack's MoE layer} (model.Decoder's)."""
    layers = {}
    for stack in STACKS:
      factory = getattr(self, f"{stack}_moe_layer")
      if factory is not None:
        layers[f"{stack}/moe"] = factory(dtype=self.dtype, parent=None)
    return {kind: layer for kind, layer in layers.items() if is_sparse(layer)}

  @nn.nowrap
  def with_moe_settings(self, **settings) -> "EncoderDecoder":
    """A copy whose MoE layers (both stacks') get `settings` over their factories'."""
    layers = {f"{stack}_moe_layer": functools.partial(getattr(self, f"{stack}_moe_layer"),
                                                      **settings)
              for stack in STACKS if getattr(self, f"{stack}_moe_layer") is not None}
    return self.clone(**layers, parent=None)

  @nn.nowrap
  def sparse_layer_ids(self) -> Dict[str, Tuple[int, ...]]:
    return {kind: self.moe_ids(kind.split("/")[0]) for kind in self.sparse_sublayers()}

  @property
  def num_layers(self) -> int:
    return self.num_encoder_layers + self.num_decoder_layers

  @nn.nowrap
  def attention_flops(self, seq_len: int) -> float:
    """Forward attention FLOPs per (input, target) position pair at seq_len on each side:
    4 · N · D · L per self- or cross-attention layer (params.py's convention)."""
    head_dim = self.head_dim or self.d_model // self.num_heads
    return 4.0 * self.num_heads * head_dim * seq_len * (self.num_encoder_layers
                                                        + 2 * self.num_decoder_layers)

  # --- the layers ------------------------------------------------------------------------
  def _attention(self, cls=Attention) -> Callable[..., nn.Module]:
    rope = self.rope_theta if self.position_embedding == "rope" else None
    return functools.partial(cls, num_heads=self.num_heads, head_dim=self.head_dim,
                             rope_theta=None if cls is CrossAttention else rope,
                             qkv_bias=self.use_bias, out_bias=self.use_bias,
                             dropout_rate=self.attention_dropout_rate, dtype=self.dtype)

  def _norm(self) -> Callable[..., nn.Module]:
    return functools.partial(NORMS[self.norm], self.norm_epsilon, self.dtype)

  @nn.nowrap
  def _block(self, stack: str, i: int, deterministic: bool, decode: bool):
    sparse = i in self.moe_ids(stack)
    mlp_dim = self.mlp_dim
    if sparse and self.moe_dense_ffn != "none":
      mlp_dim = self.moe_dense_dim or self.mlp_dim
    mlp = functools.partial(MlpBlock, mlp_dim, self.activation, self.dropout_rate, self.dtype,
                            self.use_bias)
    moe = None
    if sparse:
      moe = functools.partial(getattr(self, f"{stack}_moe_layer"), dtype=self.dtype)
    block = DecoderBlock
    if self.remat_policy != "none" and not decode:
      block = nn.remat(DecoderBlock, policy=REMAT_POLICIES[self.remat_policy])
    cross = self._attention(CrossAttention) if stack == "decoder" else None
    return functools.partial(
        block, self._attention(), mlp, moe, self.moe_dense_ffn, None, False, self.norm_epsilon,
        self.dropout_rate, self.dtype, deterministic, decode, cross, stack == "encoder",
        self._norm())

  def _stack(self, stack: str) -> Stack:
    return Stack(functools.partial(self._block, stack), getattr(self, f"num_{stack}_layers"),
                 self.num_heads, causal=stack == "decoder",
                 position_embedding=self.position_embedding,
                 num_buckets=self.relative_attention_num_buckets,
                 max_distance=self.relative_attention_max_distance,
                 sinusoidal_offset=self.sinusoidal_offset, norm_layer=self._norm(),
                 dropout_rate=self.dropout_rate, dtype=self.dtype, name=stack)

  def setup(self):
    self.token_embed = Embed(self.vocab_size, self.d_model, self.dtype)
    self.encoder = self._stack("encoder")
    self.decoder = self._stack("decoder")
    if not self.tie_embeddings:
      self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
          dense_init(), ("embed", "vocab")), (self.d_model, self.vocab_size), jnp.float32)

  def _embed(self, tokens: Array) -> Array:
    x = self.token_embed(tokens)
    return x * jnp.sqrt(jnp.float32(self.d_model)).astype(x.dtype) if self.scale_embeddings else x

  def encode(self, encoder_tokens: Array, *, segment_ids: Optional[Array] = None,
             positions: Optional[Array] = None, deterministic: bool = True):
    """encoder_tokens [B, Le] (0: padding) -> (encoded [B, Le, H], {kind: [MoeAux, …]})."""
    if segment_ids is None:  # unpacked: padding attends and is attended by nothing real
      segment_ids = (encoder_tokens > 0).astype(jnp.int32)
    x = nn.with_logical_constraint(self._embed(encoder_tokens), ACTIVATION_AXES)
    encoded, auxes = self.encoder(x, positions=positions, segment_ids=segment_ids,
                                  padding_mask=segment_ids > 0, deterministic=deterministic)
    return encoded, {f"encoder/{kind}": a for kind, a in auxes.items()}

  def decoder_logits(self, decoder_tokens: Array, encoded: Array, *,
             encoder_segment_ids: Optional[Array] = None, encoder_mask: Optional[Array] = None,
             segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
             padding_mask: Optional[Array] = None, deterministic: bool = True,
             decode: bool = False):
    """decoder_tokens [B, Ld] (targets shifted right), encoded [B, Le, H] ->
    (logits [B, Ld, V] float32, {kind: [MoeAux, …]})."""
    if padding_mask is None and segment_ids is not None:
      padding_mask = segment_ids > 0
    x = nn.with_logical_constraint(self._embed(decoder_tokens), ACTIVATION_AXES)
    x, auxes = self.decoder(x, positions=positions, segment_ids=segment_ids,
                            padding_mask=padding_mask, encoded=encoded,
                            encoded_segment_ids=encoder_segment_ids, encoded_mask=encoder_mask,
                            deterministic=deterministic, decode=decode)
    if self.tie_embeddings:
      logits = self.token_embed.attend(x) * (self.d_model**-0.5 if self.tied_output_scale else 1)
    else:
      logits = x @ self.lm_head.astype(self.dtype)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32), {f"decoder/{kind}": a for kind, a in auxes.items()}

  def __call__(self, encoder_tokens: Array, decoder_tokens: Optional[Array] = None, *,
               encoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               decoder_padding_mask: Optional[Array] = None, deterministic: bool = True,
               decode: bool = False) -> Tuple[Array, Dict[str, Array]]:
    """-> (logits [B, Ld, V] float32, stats {"<stack>/moe/<name>": [sparse layers, ...]}).

    decoder_tokens default to zeros shaped as encoder_tokens (`init` with one token array, as
    the trainer's shape-only initialisation calls every model).
    """
    if decoder_tokens is None:
      decoder_tokens = jnp.zeros_like(encoder_tokens)
    encoded, encoder_auxes = self.encode(encoder_tokens, segment_ids=encoder_segment_ids,
                                         positions=encoder_positions,
                                         deterministic=deterministic)
    if encoder_segment_ids is None:
      encoder_segment_ids = (encoder_tokens > 0).astype(jnp.int32)
    logits, decoder_auxes = self.decoder_logits(
        decoder_tokens, encoded, encoder_segment_ids=(
            encoder_segment_ids if decoder_segment_ids is not None else None),
        encoder_mask=encoder_segment_ids > 0, segment_ids=decoder_segment_ids,
        positions=decoder_positions, padding_mask=decoder_padding_mask,
        deterministic=deterministic, decode=decode)
    return logits, stats_of({**encoder_auxes, **decoder_auxes}, stacked=False)


@dataclasses.dataclass(frozen=True)
class EncoderDecoderLM(TrainingObjective):
  """An `EncoderDecoder` and its training objective (t5x's EncoderDecoderModel, in small).

  Batches use seqio's EncDecFeatureConverter names: encoder_input_tokens,
  decoder_input_tokens, decoder_target_tokens, decoder_loss_weights and, packed,
  encoder_segment_ids / encoder_positions / decoder_segment_ids / decoder_positions.
  """
  module: EncoderDecoder
  aux_loss_weight: float = 0.01
  router_z_loss_weight: float = 1e-3
  logits_z_loss: float = 0.0
  features = "encoder_decoder"  # the data pipeline's layout (tasks/pipeline.get_dataset)

  def apply(self, variables, batch: Mapping[str, Array], *, deterministic: bool,
            rngs=None, mutable=False, decode: bool = False):
    return self.module.apply(
        variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        decoder_positions=batch.get("decoder_positions"), decoder_padding_mask=decoder_padding_mask(batch),
        deterministic=deterministic, decode=decode, rngs=rngs, mutable=mutable)

  def generate(self, variables, prompt: Array, *, bidirectional_prompt: bool = True,
               **sampling):
    """Targets for the inputs `prompt` [B, P] (the encoder reads them whole, so
    `bidirectional_prompt` changes nothing); sampling settings as `generate`."""
    del bidirectional_prompt
    return generate(self.module, variables, prompt, **sampling)


# ----------------------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------------------

def generate(module: EncoderDecoder, variables: Mapping[str, Any], encoder_tokens: Array, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: Optional[Array] = None, eos_id: Optional[int] = None,
             decoder_start_id: Optional[int] = None) -> Tuple[Array, Array]:
  """Targets for `encoder_tokens` [B, Le] (0: padding): the encoder runs once, then the decoder
  one token per step from `decoder_start_id` (None: the module's), with its KV cache and the cross-
  attention's cached encoder keys and values. Sampling as `decoding.generate`.

  Returns (tokens [B, N], logits [B, N, V] float32 that each token was drawn from).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  decoding.sample_logits(jax.random.PRNGKey(0), jnp.zeros((1, 1)), temperature, top_k, top_p)
  variables = {k: v for k, v in variables.items() if k != "cache"}
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return _generate(module, variables, jnp.asarray(encoder_tokens, jnp.int32), rng,
                   max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p), eos_id=eos_id,
                   decoder_start_id=int(module.decoder_start_id if decoder_start_id is None
                                     else decoder_start_id))


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_id", "decoder_start_id"))
def _generate(module, variables, encoder_tokens, rng, *, max_new_tokens, temperature, top_k,
              top_p, eos_id, decoder_start_id):
  batch = encoder_tokens.shape[0]
  encoded, _ = module.apply(variables, encoder_tokens, method="encode")
  encoder_mask = encoder_tokens > 0
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), encoder_tokens, jnp.zeros((batch, max_new_tokens), jnp.int32),
      decode=True))["cache"]
  variables = {**variables, "cache": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)}

  def forward(variables, token):
    (logits, _), updates = module.apply(variables, token[:, None], encoded,
                                        encoder_mask=encoder_mask, decode=True,
                                        method="decoder_logits", mutable=["cache"])
    return logits[:, -1], {**variables, **updates}

  def step(carry, rng):
    variables, token, done = carry
    logits, variables = forward(variables, token)
    new = decoding.sample_logits(rng, logits, temperature, top_k, top_p)
    new = jnp.where(done, 0, new)  # finished sequences continue with padding (id 0)
    if eos_id is not None:
      done = done | (new == eos_id)
    return (variables, new, done), (new, logits)

  start = jnp.full((batch,), decoder_start_id, jnp.int32)
  _, (tokens, logits) = jax.lax.scan(step, (variables, start, jnp.zeros((batch,), bool)),
                                     jax.random.split(rng, max_new_tokens))
  return tokens.T, jnp.swapaxes(logits, 0, 1)
