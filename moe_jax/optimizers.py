"""Optimizers and learning-rate schedules, t5x-style and gin-configurable.

    opt = create_optimizer()                      # gin: create_optimizer.name = "adafactor" ...
    state = TrainState.create(variables, opt.tx)
    state, metrics = train_step(lm, opt.tx, state, batch, rng,
                                learning_rate_fn=opt.learning_rate_fn)

`create_optimizer` returns `Optimizer(tx, learning_rate_fn)`: the optax transformation and the
schedule it was built with (step -> learning rate), so the loop can log the rate it applies.
Both count steps from 0 at the first update (optax's count, t5x's step, `TrainState.step`).

Adafactor (Shazeer & Stern 2018) as t5x and ST-MoE run it, with one deliberate difference from
`optax.adafactor`: a parameter of rank r >= 2 is a stack of matrices over its LAST TWO dims, its
leading dims (experts, scanned layers) are batch dims. optax factors the two largest dims, which
for stacked expert weights [E, H, F] with E large averages the second moment across experts;
t5x's MoE rules (`expert` -> FactorDim.BATCH, `layers` -> BATCH) keep experts and layers apart,
and also compute update clipping and the parameter scale within each matrix, not over the
stacked array. Here that holds by shape alone (the train state holds unboxed arrays, without
axis names): for [E, H, F] the whole update equals 2-D Adafactor applied to each [H, F] slice,
and for 2-D parameters it equals `optax.adafactor` (both checked in tests/test_optimizers.py).

Caveat of the shape rule: a 3-D attention kernel [H, N, D] (or [N, D, H]) is treated as H (or N)
matrices [N, D] (or [D, H]), not as one [H, N·D] matrix as t5x with flaxformer's 2-D kernels
would: its second moment is factored over (N, D) (unfactored, i.e. as large as the kernel, while
N < min_dim_size_to_factor) and its parameter scale and clipping are per row of H.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, NamedTuple, Optional, Union

import gin
import jax
import jax.numpy as jnp
import optax

from moe_jax import checks

Array = jax.Array
Schedule = Callable[[Any], Any]  # step (int array) -> learning rate (float array)
ScalarOrSchedule = Union[float, Schedule]

OPTIMIZER_NAMES = ("adafactor", "adamw", "sgd")


# ----------------------------------------------------------------------------------------
# Schedules: step (0 at the first update) -> learning rate.
# ----------------------------------------------------------------------------------------

@gin.configurable(module="moe_jax.optimizers")
def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000,
                   linear_warmup: bool = False) -> Schedule:
  """t5x's default: lr(t) = base / √max(t, warmup_steps), constant during warm-up.

  linear_warmup=True multiplies by min(1, t / warmup_steps) (t5x's `linear_warmup` factor), so
  the rate ramps from 0 to base / √warmup_steps and then decays as base / √t. With
  warmup_steps = 0 the step is floored at 1 (base at step 0, not an infinite rate).
  """
  checks.rate("optimizers.rsqrt_schedule.base_learning_rate", base_learning_rate)
  checks.integer("optimizers.rsqrt_schedule.warmup_steps", warmup_steps, 0)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    lr = base_learning_rate * jax.lax.rsqrt(jnp.maximum(t, max(warmup_steps, 1)))
    if linear_warmup and warmup_steps > 0:
      lr = lr * jnp.minimum(1.0, t / warmup_steps)
    return lr

  return schedule


@gin.configurable(module="moe_jax.optimizers")
def warmup_cosine_schedule(peak_learning_rate: float, warmup_steps: int, decay_steps: int,
                           end_learning_rate: float = 0.0) -> Schedule:
  """Linear 0 -> peak over warmup_steps, then cosine to end_learning_rate at decay_steps.

  As `optax.warmup_cosine_decay_schedule`, decay_steps counts the warm-up too (the step at
  which the rate reaches its end value and stays).
  """
  name = "optimizers.warmup_cosine_schedule"
  checks.rate(f"{name}.peak_learning_rate", peak_learning_rate)
  checks.rate(f"{name}.end_learning_rate", end_learning_rate, allow_zero=True)
  # runs/tiny_cpu.gin sets decay_steps = TRAIN_STEPS.
  checks.integer(f"{name}.decay_steps", decay_steps, 1, "TRAIN_STEPS")
  checks.integer(f"{name}.warmup_steps", warmup_steps, 0)
  if warmup_steps >= decay_steps:
    raise checks.SettingError(
        f"{name}.warmup_steps = {warmup_steps} must be below {name}.decay_steps = "
        f"{decay_steps} (the run's length in runs/tiny_cpu.gin: TRAIN_STEPS): shorten the "
        f"warm-up, e.g. --gin.{name}.warmup_steps={max(decay_steps // 10, 0)}.")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate, warmup_steps=warmup_steps,
      decay_steps=decay_steps, end_value=end_learning_rate)


@gin.configurable(module="moe_jax.optimizers")
def constant_schedule(learning_rate: float) -> Schedule:
  """lr(t) = learning_rate."""
  checks.rate("optimizers.constant_schedule.learning_rate", learning_rate)
  return optax.constant_schedule(learning_rate)


# ----------------------------------------------------------------------------------------
# Adafactor over the last two dims.
# ----------------------------------------------------------------------------------------

def _matrix_axes(ndim: int) -> tuple:
  """The axes of one matrix of a stacked parameter: the last two (all of them when ndim <= 2)."""
  return tuple(range(max(ndim - 2, 0), ndim))


def _matrix_rms(x: Array) -> Array:
  """√mean(x²) per matrix: [..., R, C] -> [..., 1, 1] (a vector or scalar: its overall rms)."""
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=_matrix_axes(x.ndim), keepdims=True))


def _is_factored(shape: tuple, factored: bool, min_dim_size_to_factor: int) -> bool:
  """Factor when both of the last two dims are >= min_dim_size_to_factor.

  For 2-D parameters this is optax's and t5x's heuristic (the smaller of the two factored dims
  reaches the threshold); for stacked ones it applies to each matrix.
  """
  return factored and len(shape) >= 2 and min(shape[-2:]) >= min_dim_size_to_factor


def _stat_zeros(param: Array, axis: Optional[int]) -> Array:
  """float32 zeros shaped like `param` without `axis` (None: like `param`).

  Derived by `eval_shape` of a reduction rather than from the shape alone so that, under
  sharding-in-types (Explicit mesh axes), the statistic keeps the sharding of the dims it keeps.
  """
  if axis is None:
    like = jax.eval_shape(lambda p: p.astype(jnp.float32), param)
  else:
    like = jax.eval_shape(lambda p: jnp.mean(p, axis=axis, dtype=jnp.float32), param)
  return jnp.zeros_like(like)


def _decay_rate_pow(count: Array, step_offset: int, exponent: float) -> Array:
  """β₂(t) = 1 − (t + 1)^(−exponent), t = count − step_offset (optax's and t5x's schedule).

  β₂(0) = 0: the first step (and the first after step_offset) takes g² alone. Unlike optax and
  t5x, t is floored at 0: a fresh state (count 0) with step_offset > 0 would otherwise give
  β = −∞ and NaN statistics; floored, the statistics restart at every step until step_offset.
  """
  t = jnp.maximum(jnp.asarray(count - step_offset, jnp.float32), 0.0) + 1.0
  return 1.0 - t ** (-exponent)


_PLACEHOLDER = (1,)  # the statistic a leaf does not use (as optax and t5x): tiny, replicated


class FactoredRmsState(NamedTuple):
  """count: updates so far. v_row, v_col, v: trees shaped like the params (so partitioning can
  shard each statistic like its parameter); a leaf [..., R, C] holds either
  v_row [..., R] and v_col [..., C] (factored) or v [..., R, C] (not), and (1,) for the other."""
  count: Array
  v_row: Any
  v_col: Any
  v: Any


def scale_by_factored_rms(decay_rate: float = 0.8, step_offset: int = 0,
                          min_dim_size_to_factor: int = 128, epsilon1: float = 1e-30,
                          factored: bool = True) -> optax.GradientTransformation:
  """Divides the gradient by the rms of its running second moment, factored per matrix.

  For a leaf g [..., R, C] (leading dims are batch: each matrix has its own statistics), with
  β = β₂(t) from `_decay_rate_pow` and all statistics in float32:
    factored:    v_row ← β·v_row + (1−β)·mean_C(g² + ε₁)        [..., R]
                 v_col ← β·v_col + (1−β)·mean_R(g² + ε₁)        [..., C]
                 v̂ = v_row ⊗ v_col / mean_R(v_row)              [..., R, C]
    unfactored:  v̂ = v ← β·v + (1−β)·(g² + ε₁)                 like g
    update = g / √v̂.
  v̂ is the rank-1 fit of the second moment that minimises the generalised KL divergence
  (Adafactor §3); mean_R(v_row) = mean_C(v_col) = the mean of the whole statistic, so the
  normalisation could use either factor.
  """

  def init_fn(params):
    def stats(p):
      if _is_factored(p.shape, factored, min_dim_size_to_factor):
        return _stat_zeros(p, -1), _stat_zeros(p, -2), jnp.zeros(_PLACEHOLDER, jnp.float32)
      placeholder = jnp.zeros(_PLACEHOLDER, jnp.float32)
      return placeholder, placeholder, _stat_zeros(p, None)

    v_row, v_col, v = _unzip(params, jax.tree.map(stats, params), 3)
    return FactoredRmsState(jnp.zeros([], jnp.int32), v_row, v_col, v)

  def update_fn(updates, state, params=None):
    del params  # the statistics' layout follows the gradient's shape
    beta = _decay_rate_pow(state.count, step_offset, decay_rate)

    def update_leaf(g, v_row, v_col, v):
      g32 = g.astype(jnp.float32)
      g2 = jnp.square(g32) + epsilon1
      if _is_factored(g.shape, factored, min_dim_size_to_factor):
        v_row = beta * v_row + (1.0 - beta) * jnp.mean(g2, axis=-1)
        v_col = beta * v_col + (1.0 - beta) * jnp.mean(g2, axis=-2)
        row_factor = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=-1, keepdims=True))
        col_factor = jax.lax.rsqrt(v_col)
        u = g32 * row_factor[..., :, None] * col_factor[..., None, :]
      else:
        v = beta * v + (1.0 - beta) * g2
        u = g32 * jax.lax.rsqrt(v)
      return u.astype(g.dtype), v_row, v_col, v

    out = jax.tree.map(update_leaf, updates, state.v_row, state.v_col, state.v)
    new_updates, v_row, v_col, v = _unzip(updates, out, 4)
    return new_updates, FactoredRmsState(optax.safe_increment(state.count), v_row, v_col, v)

  return optax.GradientTransformation(init_fn, update_fn)


def _unzip(like, tuples, n: int) -> list:
  """A tree shaped like `like` whose leaves are n-tuples -> n trees shaped like `like`."""
  return [jax.tree.map(lambda _, t: t[i], like, tuples) for i in range(n)]


def clip_by_matrix_rms(threshold: float) -> optax.GradientTransformation:
  """u ← u / max(1, rms(u) / threshold), rms per matrix (`optax.clip_by_block_rms` per slice)."""
  def clip(u, _):
    return (u / jnp.maximum(1.0, _matrix_rms(u) / threshold)).astype(u.dtype)
  return optax.stateless_with_tree_map(clip)


def scale_by_param_matrix_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
  """u ← u · max(rms(p), min_scale), rms per matrix: a step relative to the weights' size
  (`optax.scale_by_param_block_rms` per slice; min_scale is t5x's epsilon2)."""
  def scale(u, p):
    return (u * jnp.maximum(_matrix_rms(p), min_scale)).astype(u.dtype)
  return optax.stateless_with_tree_map(scale)


@gin.configurable(module="moe_jax.optimizers")
def adafactor(learning_rate: Optional[ScalarOrSchedule], decay_rate: float = 0.8,
              step_offset: int = 0, min_dim_size_to_factor: int = 128,
              epsilon1: float = 1e-30, epsilon2: float = 1e-3,
              clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True, momentum: Optional[float] = None,
              dtype_momentum: Any = jnp.float32, weight_decay_rate: Optional[float] = None,
              weight_decay_mask: Any = None, factored: bool = True
              ) -> optax.GradientTransformation:
  """Adafactor with per-matrix statistics (module docstring), t5x's hyper-parameters.

  Per leaf, in order (the order of `optax.adafactor`, so 2-D parameters match it):
    u = g / √v̂                                  `scale_by_factored_rms`
    u ← u / max(1, rms(u) / clipping_threshold)  per matrix (None: no clipping)
    u ← lr(t) · u · max(rms(p), epsilon2)        per matrix (if multiply_by_parameter_scale)
    u ← m = momentum·m + (1−momentum)·u          (if momentum; no bias correction)
    Δp = −(u + weight_decay_rate · p)            (decoupled decay, not scaled by lr, as t5x)
  step_offset restarts the second-moment schedule for fine-tuning. weight_decay_mask: optax's
  (a tree of bools or a function of the params; None decays every leaf, as t5x).
  """
  tx = [scale_by_factored_rms(decay_rate, step_offset, min_dim_size_to_factor, epsilon1,
                              factored)]
  if clipping_threshold is not None:
    tx.append(clip_by_matrix_rms(clipping_threshold))
  if learning_rate is not None:
    tx.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    tx.append(scale_by_param_matrix_rms(epsilon2))
  if momentum is not None:
    tx.append(optax.ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
  if weight_decay_rate is not None:
    tx.append(optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
  tx.append(optax.scale(-1.0))
  return optax.chain(*tx)


# ----------------------------------------------------------------------------------------
# AdamW and SGD.
# ----------------------------------------------------------------------------------------

def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def decay_mask(params) -> Any:
  """True for the leaves weight decay applies to: weight matrices, not biases or norm scales.

  By rank alone (ndim < 2: no decay) a scanned model's norm scales [L, H] and biases [L, N, D]
  would be decayed, so leaves named `scale` or `*bias` are excluded whatever their rank.
  """
  def is_weight(path, p):
    name = _key_name(path[-1]) if path else ""
    return p.ndim >= 2 and name != "scale" and not name.endswith("bias")
  return jax.tree_util.tree_map_with_path(is_weight, params)


@gin.configurable(module="moe_jax.optimizers")
def adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.1) -> optax.GradientTransformation:
  """`optax.adamw` (decay p·weight_decay·lr(t), decoupled) masked by `decay_mask`."""
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=decay_mask)


@gin.configurable(module="moe_jax.optimizers")
def sgd(learning_rate: ScalarOrSchedule, momentum: Optional[float] = None,
        nesterov: bool = False) -> optax.GradientTransformation:
  """`optax.sgd`: Δp = −lr(t)·g (with optional heavy-ball or Nesterov momentum)."""
  return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


# ----------------------------------------------------------------------------------------
# The factory the training loop calls.
# ----------------------------------------------------------------------------------------

class Optimizer(NamedTuple):
  """tx: the optax transformation (`TrainState.create`, `train_step`); learning_rate_fn: the
  schedule inside it, step -> learning rate, for logging (`train_step(learning_rate_fn=...)`)."""
  tx: optax.GradientTransformation
  learning_rate_fn: Schedule


_FACTORIES = {"adafactor": adafactor, "adamw": adamw, "sgd": sgd}
assert tuple(_FACTORIES) == OPTIMIZER_NAMES


@gin.configurable(module="moe_jax.optimizers")
def create_optimizer(name: str = "adafactor", schedule: Union[None, float, Schedule] = None,
                     clip_grad_norm: Optional[float] = None, **kwargs) -> Optimizer:
  """The named optimizer driven by `schedule`, optionally after global-norm gradient clipping.

  Args:
    name: one of OPTIMIZER_NAMES; the factory of that name gets `kwargs` (and its own gin
      bindings, e.g. `adafactor.decay_rate = 0.8`).
    schedule: step -> learning rate (gin: `create_optimizer.schedule = @rsqrt_schedule()`), a
      float (constant), or None: `rsqrt_schedule()` for adafactor (t5x's default); adamw and
      sgd have no sensible default and require one.
    clip_grad_norm: if set, g ← g · min(1, clip_grad_norm / ‖g‖₂) over all leaves first.
  """
  if name not in _FACTORIES:
    close = difflib.get_close_matches(str(name), OPTIMIZER_NAMES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    raise checks.SettingError(f"unknown optimizer {name!r}: valid names are "
                     f"{', '.join(OPTIMIZER_NAMES)}{hint}")
  if schedule is None:
    if name != "adafactor":
      raise checks.SettingError(f"optimizer {name!r} needs a learning-rate schedule (a float or a "
                       "step -> rate function, e.g. @warmup_cosine_schedule()).")
    schedule = rsqrt_schedule()
  if not callable(schedule):
    schedule = constant_schedule(float(schedule))
  tx = _FACTORIES[name](learning_rate=schedule, **kwargs)
  if clip_grad_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
  return Optimizer(tx=tx, learning_rate_fn=schedule)
