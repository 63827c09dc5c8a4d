"""Routers decide *who goes where*.

A router (the `Router` contract below) maps grouped token representations x [G, S, H] to a
routing decision that carries its own dispatch data (dispatch.py):
  * `TokenChoiceRouter`: every token picks its top-k experts (Switch k=1; GShard, GLaM, ST-MoE,
    Mixtral k=2), with the options the literature uses (jitter, noisy gating, random routing of
    the second expert, batch-prioritized routing, renormalised combine weights, DeepSeek-V3's
    aux-loss-free expert bias).
  * `ExpertChoiceRouter`: every expert picks its top-C tokens of the group (Zhou et al. 2022).
  * `soft_moe.SoftRouter`: every slot is a softmax mixture of the group's tokens (Puigcerver
    et al. 2023), in its own file: a new router is one file.

Routers never move data: dispatchers (dispatch.py) do, and experts (experts.py) compute.
The losses are small pure functions so that tests can call them directly.

Notation: G groups, S tokens per group, H model width, E experts, k experts per token,
C expert capacity (slots per expert per group).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

# The decisions carry their own dispatch data, so they live with the dispatchers (vmoe's
# design); re-exported here as the routers' return types.
from moe_jax.dispatch import ExpertChoiceRouting, Routing, TokenChoiceRouting  # pylint: disable=unused-import

Array = jax.Array

SCORE_FUNCTIONS = ("softmax", "sigmoid")
SECOND_EXPERT_POLICIES = ("all", "random")
GROUP_SCORES = ("top2_sum", "max")
EXPERT_BIAS_COLLECTION = "moe_balance"


@struct.dataclass
class RouterOutput:
  """A routing decision plus what the losses and metrics need.

  Attributes:
    routing: the decision.
    logits: [G, S, E] float32 router logits (before any noise) — input of the z-loss.
    probs: [G, S, E] float32 router probabilities (each row sums to 1) — input of the aux loss
      and the entropy/confidence metrics.
    selected: [G, S, E] float32, 0/1: the experts each real token selected (k per token for
      token choice), before random routing and capacity.
    admitted: [G, S, E] float32, the selections that queue for a slot: after GShard random
      routing of the second expert, before capacity.
    kept: [G, S, E] float32, the selections that got a slot (after capacity).
    aux_loss: scalar load-balancing loss (0 for expert choice, balanced by construction).
    z_loss: scalar router z-loss.
  """
  routing: Routing
  logits: Array
  probs: Array
  selected: Array
  admitted: Array
  kept: Array
  aux_loss: Array
  z_loss: Array


# ---------------------------------------------------------------------------------------------
# Capacity and losses: pure functions.
# ---------------------------------------------------------------------------------------------
def compute_capacity(group_size: int, num_experts: int, num_selected_experts: int,
                     capacity_factor: float, min_capacity: int = 4) -> int:
  """Expert capacity C = max(ceil(cf · k · S / E), min_capacity), clipped to S.

  Counting k means cf=1.0 gives exactly enough slots for all k·S assignments when balanced
  (flaxformer's formula omits k, so its top-2 at cf 1.25 drops >= 37.5% of assignments).
  An expert can receive at most one assignment per token, so slots beyond S are never used:
  clipping to S changes no result and saves memory.
  """
  if not (math.isfinite(capacity_factor) and capacity_factor > 0):
    raise ValueError(f"capacity_factor must be finite and > 0, got {capacity_factor}.")
  capacity = math.ceil(capacity_factor * num_selected_experts * group_size / num_experts)
  return int(min(max(capacity, min_capacity), group_size))


def _token_mask(padding_mask: Optional[Array], shape) -> Array:
  """[G, S] float32 mask, 1 for real tokens."""
  if padding_mask is None:
    return jnp.ones(shape, jnp.float32)
  return padding_mask.astype(jnp.float32)


def router_z_loss(logits: Array, padding_mask: Optional[Array] = None) -> Array:
  """ST-MoE router z-loss (eq. 5): mean over real tokens of logsumexp(logits)².

  Args:
    logits: [G, S, E] router logits.
    padding_mask: [G, S], 1 for real tokens; padding counts in no statistic.
  Returns:
    scalar float32.
  """
  mask = _token_mask(padding_mask, logits.shape[:2])
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(z**2 * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def load_balancing_loss(probs: Array, selected: Array,
                        padding_mask: Optional[Array] = None) -> Array:
  """Switch Transformer load-balancing loss (eq. 4), per group, averaged over groups.

      aux_g = E · Σ_e f_e · P_e

  f_e: fraction of the group's k·S assignments (before capacity) that chose e;
  P_e: mean router probability of e over the group's tokens. Equals 1 at perfect balance.
  `probs` must sum to 1 over experts; with sigmoid scores (DeepSeek-V3) the router passes the
  scores normalised per token, s_e / Σ_e' s_e', as DeepSeek-V3's sequence-wise balance loss does.
  Only real tokens count; groups without real tokens are left out of the average.

  Args:
    probs: [G, S, E] router probabilities.
    selected: [G, S, E] 0/1 selections before capacity (k ones per real token).
    padding_mask: [G, S], 1 for real tokens.
  Returns:
    scalar float32.
  """
  num_experts = probs.shape[-1]
  mask = _token_mask(padding_mask, probs.shape[:2])[..., None]
  tokens = jnp.sum(mask, axis=(1, 2))  # [G]
  assignments = jnp.sum(selected * mask, axis=(1, 2))  # [G], k per real token
  f = jnp.sum(selected * mask, axis=1) / jnp.maximum(assignments, 1.0)[:, None]  # [G, E]
  p = jnp.sum(probs * mask, axis=1) / jnp.maximum(tokens, 1.0)[:, None]  # [G, E]
  per_group = num_experts * jnp.sum(f * p, axis=-1)
  has_tokens = (tokens > 0).astype(jnp.float32)
  return jnp.sum(per_group * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)


def update_expert_bias(bias: Array, load: Array, rate: float) -> Array:
  """DeepSeek-V3 aux-loss-free balancing: b_e ← b_e + rate · sign(mean(load) − load_e).

  Underloaded experts get a larger bias (chosen more often), overloaded ones a smaller one.
  """
  return bias + rate * jnp.sign(jnp.mean(load) - load)


def queue_positions(expert_index: Array, valid: Array, num_experts: int,
                    priority: Optional[Array] = None) -> Array:
  """Slot of every assignment in its expert's queue, per group.

  Queue order: all first choices before all second choices (GShard); within one choice level,
  tokens in `priority` order (default: sequence order).

  Args:
    expert_index: [G, S, k] int32.
    valid: [G, S, k] bool; invalid assignments take no slot.
    num_experts: E.
    priority: optional [G, S] permutation of token indices, highest priority first.
  Returns:
    [G, S, k] int32 positions (meaningless where not valid).
  """
  if priority is not None:
    expert_index = jnp.take_along_axis(expert_index, priority[..., None], axis=1)
    valid = jnp.take_along_axis(valid, priority[..., None], axis=1)
  g, s, k = expert_index.shape
  # Choice-major flattening [G, k·S]: every first choice queues before any second choice.
  flat_expert = jnp.swapaxes(expert_index, 1, 2).reshape(g, k * s)
  flat_valid = jnp.swapaxes(valid, 1, 2).reshape(g, k * s)
  one_hot = jax.nn.one_hot(flat_expert, num_experts, dtype=jnp.int32) * flat_valid[..., None]
  position = jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=-1)  # [G, k·S]
  position = jnp.swapaxes(position.reshape(g, k, s), 1, 2)
  if priority is not None:  # back to sequence order
    inverse = jnp.argsort(priority, axis=1)
    position = jnp.take_along_axis(position, inverse[..., None], axis=1)
  return position


# ---------------------------------------------------------------------------------------------
# Router modules.
# ---------------------------------------------------------------------------------------------
class Router(nn.Module):
  """The router contract: what every router is told, returns and declares.

  Called by the layer as

      router(x, padding_mask, num_experts, capacity, deterministic) -> RouterOutput

    x [G, S, H]: the groups of token representations (any dtype; routers compute in float32).
    padding_mask [G, S] or None: 1 on real tokens; padding takes no slot and counts in no loss.
    num_experts: E, the layer's (flaxformer's convention: the layer owns E, so one router
      binding serves layers of any size).
    capacity: C, slots per expert per group, from the layer's capacity factor
      (`compute_capacity`), or None when the layer is dropless.
    deterministic: True in evaluation and decoding (no noise, no bias update).

  It returns a `RouterOutput`: the decision (`routing`, a `dispatch.Routing`, which the
  dispatchers read without asking which router made it) plus the [G, S, E] statistics the
  losses, metrics and records read.

  Declared properties (class attributes or properties of the subclass):
    kind: label of its decisions in routing records (required).
    dispatches: the layer's `dispatch` settings its decisions support.
    is_causal(dropless): a token's routing depends on no later token, so decoding token by
      token reproduces the forward pass (False: refused by decoding); `dropless`: no capacity
      limits the routing (batch priority, for one, only orders capacity queues).
    mixes_tokens: a token's output carries other tokens' content (Soft MoE): refused in causal
      (decoder-only) models, where it would show each position its future.
    experts_per_token(num_experts, group_size): expert applications per token on average
      (k for top-k routing): the capacity formula's k and the parameter counter's k / E.
    expert_capacity(capacity): the slots per expert it fills given the layer's capacity (the
      capacity itself, or its own fixed number: Soft MoE).
    check_num_experts(num_experts): raises if it cannot route over that many experts.
  """
  kind = None  # every router sets it (a class attribute, not a field)
  dispatches = ("einsum", "gather", "dropless")
  mixes_tokens = False

  def __post_init__(self):
    if not isinstance(type(self).kind, str):
      raise TypeError(f"{type(self).__name__} must set the class attribute `kind` (its label in "
                      "routing records), as the Router contract says.")
    super().__post_init__()

  def is_causal(self, dropless: bool) -> bool:
    del dropless
    return True

  def experts_per_token(self, num_experts: int, group_size: int) -> float:
    del num_experts, group_size
    return self.num_selected_experts

  def expert_capacity(self, capacity: Optional[int]) -> Optional[int]:
    return capacity

  def check_num_experts(self, num_experts: int) -> None:
    """Raises if the router cannot route over `num_experts` (called when the layer is built)."""
    _check_experts(num_experts, self.num_selected_experts)


class SparseSublayer:
  """Mixin: the sparse sub-layer protocol that model.py reads (moe_layer.MoeLayer,
  switchhead.SwitchHeadAttention), from the sub-layer's `router` and `num_experts` fields.

    causal / mixes_tokens: its router's (model.check_sublayer refuses what does not fit).
    experts_per_token(seq_len): the router's k for this sub-layer's routing groups.
    recorded_experts: experts as its routing records number them.
    expert_axis: the logical axis of its expert weights (the parameter counter's k / E).
  """
  expert_axis = "expert"
  dropless = True  # no capacity limits its routing

  @property
  def causal(self) -> bool:
    return self.router.is_causal(self.dropless)

  @property
  def mixes_tokens(self) -> bool:
    return self.router.mixes_tokens

  @property
  def recorded_experts(self) -> int:
    return self.num_experts

  def routing_group_size(self, seq_len: int) -> int:
    return seq_len

  def experts_per_token(self, seq_len: int) -> float:
    return self.router.experts_per_token(self.num_experts, self.routing_group_size(seq_len))


def default_router_init():
  # Switch Transformer: small init (scale 0.1) keeps early routing close to uniform.
  return nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")


def top_k_indices(scores: Array, k: int) -> Array:
  """Indices of the k largest scores along the last axis, in descending order [..., k].

  The same choice as `lax.top_k` (ties go to the lower index; only -0.0 vs +0.0, which
  lax.top_k orders and argmax does not, can differ), made by k rounds of argmax:
  element-wise work and reductions that GSPMD keeps on each group's device, where XLA's TopK
  custom call made it all-gather the [G, S, E] scores of every group. k is small (≤ 8).
  """
  chosen, taken = [], None
  for _ in range(k):
    if taken is None:
      # Round one: nothing taken yet. Not `argmax(~zeros)`: XLA constant-folds that [G, S, E]
      # reduction with its slow evaluator (1.5-5 s of compile time per layer at S=4096, E=64).
      remaining, first_free = scores, 0
    else:
      remaining = jnp.where(taken, -jnp.inf, scores)
      first_free = jnp.argmax(~taken, axis=-1)
    # When only -inf scores remain, the first entry not yet taken (as lax.top_k).
    index = jnp.where(jnp.max(remaining, axis=-1) == -jnp.inf, first_free,
                      jnp.argmax(remaining, axis=-1))
    chosen.append(index)
    one_hot = jax.nn.one_hot(index, scores.shape[-1], dtype=bool)
    taken = one_hot if taken is None else taken | one_hot
  return jnp.stack(chosen, axis=-1).astype(jnp.int32)


class RouterLogits(nn.Module):
  """Bias-free float32 projection x [G, S, H] -> logits [G, S, E].

  Always float32 whatever the model dtype ("selective precision", Switch §2.4): the softmax
  over experts and the exp inside the z-loss are unstable in bfloat16.
  """
  num_experts: int
  kernel_init: nn.initializers.Initializer = default_router_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
                        (x.shape[-1], self.num_experts), jnp.float32)
    return jnp.einsum("gsh,he->gse", x.astype(jnp.float32), kernel,
                      precision=jax.lax.Precision.HIGHEST)


def _jitter(module: nn.Module, x: Array, eps: float) -> Array:
  """Switch jitter: x · U(1−ε, 1+ε), from the 'jitter' RNG stream."""
  noise = jax.random.uniform(module.make_rng("jitter"), x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return x * noise


class TokenChoiceRouter(Router):
  """Tokens choose their top-k experts.

      logits = x W_r                                      [G, S, E] float32, W_r bias-free
      scores = softmax(logits)  (or sigmoid, DeepSeek-V3)
      experts = top_k(scores + b)                         b: aux-loss-free bias, selection only
      gates   = scores[experts]  (or renormalised over the k chosen: Mixtral, Shazeer)
      gates  *= routed_scaling_factor                     (DeepSeek-V3: 2.5; default 1)

Group-limited routing (DeepSeek-V2/V3; `num_groups` > 1): the E experts form `num_groups`
groups of E / num_groups (consecutive indices, a device group each in DeepSeek's deployment);
each group scores max(s + b) ("max", V2) or the sum of its two largest s + b ("top2_sum",
V3), each token keeps its `top_groups` best groups, and its top-k is taken inside them.

  Training-only randomness (off when `deterministic`):
    * jitter_noise ε: x ← x · U(1−ε, 1+ε) before the projection ('jitter' RNG stream).
    * noisy_gating (Shazeer 2017): logits ← x W_r + N(0, 1) · softplus(x W_noise), the noisy
      logits drive selection and gates ('gating_noise' RNG stream); the z-loss sees the clean ones.
    * second_expert_policy='random' (GShard): choice j>=1 is kept with probability
      min(1, 2 · g_j / Σ_i g_i) ('routing' RNG stream). A dropped choice takes no capacity.

  Capacity: assignments queue per expert, all first choices before all second choices; within
  a choice level by sequence order, or by descending top-1 score with `batch_prioritized`
  (V-MoE; it lets later tokens displace earlier ones, so only for non-causal layers).
  Assignments past the capacity C are dropped (the residual connection carries the token on).

  Aux-loss-free balancing (DeepSeek-V3): with `expert_bias_update_rate` > 0 a per-expert bias
  lives in the non-trainable collection 'moe_balance'. It is added to the scores for selection
  only and, in training, updated by rate · sign(mean load − load) from this batch's loads. The
  caller must make that collection mutable in training: `apply(..., mutable=['moe_balance'])`.
  `expert_bias=True` keeps the bias with no update (rate 0): an imported DeepSeek-V3's
  e_score_correction_bias, frozen.
  """
  num_selected_experts: int = 2
  jitter_noise: float = 0.0
  noisy_gating: bool = False
  second_expert_policy: str = "all"
  batch_prioritized: bool = False
  normalize_combine_weights: bool = False
  score_function: str = "softmax"
  expert_bias_update_rate: float = 0.0
  kernel_init: nn.initializers.Initializer = default_router_init()
  expert_bias: bool = False
  routed_scaling_factor: float = 1.0
  num_groups: int = 1
  top_groups: int = 1
  group_score: str = "top2_sum"

  kind = "token_choice"
  dispatches = ("einsum", "gather", "dropless")

  def is_causal(self, dropless: bool) -> bool:
    # Batch-prioritized routing lets later tokens take earlier tokens' slots; without a
    # capacity there are no slots to take.
    return dropless or not self.batch_prioritized

  def __post_init__(self):
    _check_experts(None, self.num_selected_experts)
    if self.score_function not in SCORE_FUNCTIONS:
      raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, "
                       f"got {self.score_function!r}.")
    if self.second_expert_policy not in SECOND_EXPERT_POLICIES:
      raise ValueError(f"second_expert_policy must be one of {SECOND_EXPERT_POLICIES}, "
                       f"got {self.second_expert_policy!r}.")
    if self.second_expert_policy == "random" and self.num_selected_experts < 2:
      raise ValueError("second_expert_policy='random' needs num_selected_experts >= 2, "
                       f"got {self.num_selected_experts}.")
    if not 0.0 <= self.jitter_noise < 1.0:
      raise ValueError(f"jitter_noise must be in [0, 1), got {self.jitter_noise}.")
    if self.expert_bias_update_rate < 0:
      raise ValueError(f"expert_bias_update_rate must be >= 0, got {self.expert_bias_update_rate}.")
    if not (math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
      raise ValueError(f"routed_scaling_factor must be finite and > 0, got "
                       f"{self.routed_scaling_factor}.")
    if self.group_score not in GROUP_SCORES:
      raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}.")
    if self.num_groups < 1 or not 1 <= self.top_groups <= self.num_groups:
      raise ValueError(f"num_groups must be >= 1 and top_groups in [1, num_groups], got "
                       f"num_groups={self.num_groups}, top_groups={self.top_groups}.")
    super().__post_init__()

  @property
  def has_expert_bias(self) -> bool:
    return self.expert_bias or self.expert_bias_update_rate > 0

  def check_num_experts(self, num_experts: int) -> None:
    super().check_num_experts(num_experts)
    if self.num_groups == 1:
      return
    per_group = num_experts // self.num_groups
    if num_experts % self.num_groups or (self.group_score == "top2_sum" and per_group < 2):
      raise ValueError(
          f"num_groups={self.num_groups} must divide num_experts={num_experts}"
          + (" into groups of at least 2 (group_score='top2_sum')"
             if self.group_score == "top2_sum" else "") + ".")
    if self.num_selected_experts > self.top_groups * per_group:
      raise ValueError(
          f"num_selected_experts={self.num_selected_experts} is more than the "
          f"top_groups={self.top_groups} groups of {per_group} experts hold.")

  def _group_limited(self, scores: Array) -> Array:
    """scores [G, S, E] with the experts outside each token's top_groups groups at -inf."""
    if self.num_groups == 1:
      return scores
    grouped = scores.reshape(scores.shape[:-1] + (self.num_groups, -1))  # [G, S, ng, E/ng]
    if self.group_score == "max":
      group_scores = jnp.max(grouped, axis=-1)
    else:
      best = jnp.take_along_axis(grouped, top_k_indices(grouped, 2), axis=-1)
      group_scores = jnp.sum(best, axis=-1)
    kept = jnp.sum(jax.nn.one_hot(top_k_indices(group_scores, self.top_groups),
                                  self.num_groups, dtype=jnp.int32), axis=-2) > 0  # [G, S, ng]
    return jnp.where(kept[..., None], grouped, -jnp.inf).reshape(scores.shape)

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array], num_experts: int,
               capacity: Optional[int], deterministic: bool) -> RouterOutput:
    """Routes x [G, S, H] over E = num_experts; `capacity` None means no limit (dropless)."""
    e, k = num_experts, self.num_selected_experts
    mask = _token_mask(padding_mask, x.shape[:2])
    valid_token = mask > 0
    x = x.astype(jnp.float32)
    if self.jitter_noise > 0 and not deterministic:
      x = _jitter(self, x, self.jitter_noise)
    logits = RouterLogits(e, self.kernel_init, name="logits")(x)
    noisy_logits = logits
    if self.noisy_gating:
      # Shazeer 2017 initialises W_noise to zero: noise std softplus(0) ≈ 0.69 at the start.
      noise_std = nn.softplus(RouterLogits(e, nn.initializers.zeros, name="noise_logits")(x))
      if not deterministic:
        noise = jax.random.normal(self.make_rng("gating_noise"), logits.shape, jnp.float32)
        noisy_logits = logits + noise * noise_std

    if self.score_function == "softmax":
      scores = jax.nn.softmax(noisy_logits, axis=-1)
    else:
      scores = jax.nn.sigmoid(noisy_logits)
    tiny = jnp.finfo(jnp.float32).tiny  # sigmoid scores can all underflow to 0
    probs = scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), tiny)

    selection_scores = scores
    bias = None
    if self.has_expert_bias:
      bias = self.variable(EXPERT_BIAS_COLLECTION, "expert_bias", jnp.zeros, (e,), jnp.float32)
      selection_scores = scores + jax.lax.stop_gradient(bias.value)
    expert_index = top_k_indices(self._group_limited(selection_scores), k)  # [G, S, k]
    gates = jnp.take_along_axis(scores, expert_index, axis=-1)
    gate_share = gates / jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), tiny)
    if self.normalize_combine_weights:
      gates = gate_share
    if self.routed_scaling_factor != 1.0:
      gates = gates * self.routed_scaling_factor

    valid = jnp.broadcast_to(valid_token[..., None], expert_index.shape)
    choice_one_hot = jax.nn.one_hot(expert_index, e)  # [G, S, k, E]

    def per_expert(mask):  # [G, S, k] -> [G, S, E]
      return jnp.sum(choice_one_hot * mask[..., None], axis=2)

    selected = per_expert(valid)
    if self.second_expert_policy == "random" and not deterministic:
      u = jax.random.uniform(self.make_rng("routing"), gates.shape)
      keep = u < jnp.minimum(1.0, 2.0 * gate_share)
      valid = valid & keep.at[..., 0].set(True)

    admitted = per_expert(valid)
    priority = None
    if self.batch_prioritized:
      priority = jnp.argsort(-jnp.max(scores, axis=-1), axis=1, stable=True)
    position = queue_positions(expert_index, valid, e, priority)
    kept = valid if capacity is None else valid & (position < capacity)

    if (self.expert_bias_update_rate > 0 and not deterministic
        and not self.is_initializing()):
      if not self.is_mutable_collection(EXPERT_BIAS_COLLECTION):
        raise ValueError(
            "expert_bias_update_rate > 0 updates the expert bias in training: call "
            f"apply(..., mutable=['{EXPERT_BIAS_COLLECTION}']) (or deterministic=True).")
      load = jnp.sum(selected, axis=(0, 1))
      bias.value = update_expert_bias(bias.value, load, self.expert_bias_update_rate)

    routing = TokenChoiceRouting(
        expert_index=expert_index.astype(jnp.int32),
        combine_weights=gates * kept,
        position=position.astype(jnp.int32),
        kept=kept)
    kept_per_expert = per_expert(kept)
    return RouterOutput(
        routing=routing, logits=logits, probs=probs, selected=selected, admitted=admitted,
        kept=kept_per_expert,
        aux_loss=load_balancing_loss(probs, selected, mask),
        z_loss=router_z_loss(logits, mask))


class ExpertChoiceRouter(Router):
  """Experts choose tokens (Zhou et al. 2022): each expert takes its top-C tokens of the group.

      probs = softmax(x W_r)                  [G, S, E], over experts
      token_index[g, e, :] = top_C over s of probs[g, s, e]
      combine weight = probs[g, token, e]

  Balanced by construction (every expert fills its C slots), so no aux loss; a token may be
  picked by several experts or by none. An expert's choice depends on the whole group, future
  tokens included: not causal. Padding tokens are never preferred over real ones; slots that
  still fall on padding (fewer real tokens than C) are marked invalid.
  `num_selected_experts` is the average number of experts per token (k), used for the capacity
  C = cf · k · S / E, computed by `compute_capacity` like token choice's: rounded up, at least
  `min_capacity` and at most S. With tiny groups min_capacity can exceed cf · k · S / E (e.g.
  S=32, E=64, k=2: 1 slot by the formula, 4 with min_capacity=4): set min_capacity=0 (or 1)
  for the exact ratio.
  """
  num_selected_experts: int = 2
  kernel_init: nn.initializers.Initializer = default_router_init()
  kind = "expert_choice"
  dispatches = ("einsum", "gather")  # a fixed capacity by construction: never dropless

  def is_causal(self, dropless: bool) -> bool:
    return False  # an expert picks among the whole group, future tokens included

  def __post_init__(self):
    _check_experts(None, self.num_selected_experts)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array], num_experts: int,
               capacity: Optional[int], deterministic: bool) -> RouterOutput:
    del deterministic  # expert choice has no training-only randomness
    if capacity is None:
      raise ValueError("ExpertChoiceRouter needs a capacity (expert choice has a fixed "
                       "capacity by construction; dispatch='dropless' does not apply).")
    mask = _token_mask(padding_mask, x.shape[:2])
    capacity = min(capacity, x.shape[1])  # an expert can take each token at most once
    logits = RouterLogits(num_experts, self.kernel_init, name="logits")(x)
    probs = jax.nn.softmax(logits, axis=-1)
    # Real tokens have probs in (0, 1]; padding gets -1 so it is chosen last.
    candidates = jnp.where(mask[..., None] > 0, probs, -1.0)
    # Top-C by a stable sort (ties to the lower index, as lax.top_k): GSPMD partitions a sort
    # along the group axis, where XLA's TopK made it gather every group's scores.
    by_expert = jnp.swapaxes(candidates, 1, 2)  # [G, E, S]
    token_index = jnp.argsort(-by_expert, axis=-1, stable=True)[..., :capacity].astype(jnp.int32)
    top_probs = jnp.take_along_axis(by_expert, token_index, axis=-1)  # [G, E, C]
    valid = top_probs >= 0
    # [G, S, E] 0/1: which experts picked each token (scatter: no [G, E, C, S] one-hot).
    g, e = jnp.arange(x.shape[0])[:, None, None], jnp.arange(num_experts)[None, :, None]
    chosen = jnp.zeros(probs.shape, jnp.float32).at[g, token_index, e].add(valid)
    routing = ExpertChoiceRouting(
        token_index=token_index.astype(jnp.int32),
        combine_weights=jnp.where(valid, top_probs, 0.0),
        valid=valid, group_size=x.shape[1])
    return RouterOutput(
        routing=routing, logits=logits, probs=probs, selected=chosen, admitted=chosen,
        kept=chosen,
        aux_loss=jnp.zeros((), jnp.float32), z_loss=router_z_loss(logits, mask))


def _check_experts(num_experts: Optional[int], num_selected_experts: int):
  """k in [1, E] (E None: only k >= 1, before the layer says E)."""
  if num_experts is not None and num_experts < 1:
    raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
  if num_experts is None and num_selected_experts < 1:
    raise ValueError(f"num_selected_experts (top-k) must be >= 1, got {num_selected_experts}.")
  if num_experts is not None and not 1 <= num_selected_experts <= num_experts:
    raise ValueError(f"num_selected_experts (top-k) must be in [1, num_experts={num_experts}], "
                     f"got {num_selected_experts}.")
