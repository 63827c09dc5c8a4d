"""Optimizers: Adafactor against optax (2-D) and a per-expert loop (stacked), state layout and
sharding, schedules against numpy, the AdamW decay mask, the factory and its gin wiring."""
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moe_jax import optimizers
from moe_jax import partitioning

# Small enough to be quick, past min_dim_size_to_factor=8 where a test wants factoring.
MIN_DIM = 8


def random_tree(like, seed, scale=1.0):
  # numpy, not jax.random, and numpy slicing below: each eager jax op on a new shape compiles,
  # which would dominate these tests' time.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), like)


def assert_trees_close(got, want, rtol=2e-5, atol=1e-8):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol,
                                                       equal_nan=False), got, want)


def run_steps(tx, params, steps=4, seed=0, start_count=0):
  """Updates of `tx` over `steps` steps of random gradients whose scale jumps (so that update
  clipping triggers), applied to the params as a training loop would. start_count: the first
  (second-moment) transformation's count, as if resumed from a checkpoint."""
  state = jax.jit(tx.init)(params)
  if start_count:  # tx: a chain whose first state is the second moment's
    state = (state[0]._replace(count=jnp.asarray(start_count, jnp.int32)),) + tuple(state[1:])

  @jax.jit
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return updates, state, optax.apply_updates(params, updates)

  out = []
  for t in range(steps):
    grads = random_tree(params, seed + t, scale=10.0 ** (2 * (t % 2)))
    updates, state, params = step(grads, state, params)
    out.append(updates)
  return out, state


SETTINGS = [
    dict(),  # t5x's defaults: update clipping at 1, parameter scale
    dict(momentum=0.9, weight_decay_rate=1e-2, step_offset=3, decay_rate=0.5,
         clipping_threshold=None, multiply_by_parameter_scale=False),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_adafactor_equals_optax_for_matrices_and_vectors(settings):
  params = random_tree({"tall": jnp.zeros((24, 16)), "wide": jnp.zeros((16, 40)),
                        "thin": jnp.zeros((4, 32)),  # 4 < MIN_DIM: unfactored
                        "square": jnp.zeros((8, 8)), "vector": jnp.zeros((32,))}, seed=7)
  schedule = optimizers.rsqrt_schedule(0.1, warmup_steps=2, linear_warmup=True)
  ours = optimizers.adafactor(schedule, min_dim_size_to_factor=MIN_DIM, **settings)
  optax_settings = dict(settings)
  if "step_offset" in optax_settings:
    optax_settings["decay_offset"] = optax_settings.pop("step_offset")
  reference = optax.adafactor(schedule, min_dim_size_to_factor=MIN_DIM, **optax_settings)
  # Fine-tuning resumes at the offset (optax's decay is NaN before it; ours is floored there).
  start = settings.get("step_offset", 0)
  got, _ = run_steps(ours, params, start_count=start)
  want, _ = run_steps(reference, params, start_count=start)
  assert_trees_close(got, want)


def test_second_moment_restarts_until_step_offset():
  # A fresh state (count 0) with step_offset=3: β₂ = 0 at steps 0..3, each update is that of a
  # fresh state without an offset (optax's would be NaN).
  params = random_tree({"w": jnp.zeros((16, 8)), "v": jnp.zeros((8,))}, seed=1)
  offset = optimizers.scale_by_factored_rms(step_offset=3, min_dim_size_to_factor=MIN_DIM)
  plain = optimizers.scale_by_factored_rms(min_dim_size_to_factor=MIN_DIM)
  got, _ = run_steps(offset, params)
  fresh_update = jax.jit(lambda g: plain.update(g, plain.init(params))[0])
  for t, updates in enumerate(got):
    grads = random_tree(params, t, scale=10.0 ** (2 * (t % 2)))
    assert_trees_close(updates, fresh_update(grads))


def per_slice(tx, params, steps=4, seed=0):
  """The updates of `tx` applied to each matrix [..., R, C] of every leaf on its own (own
  state), on the gradients `run_steps` draws."""
  grads = [random_tree(params, seed + t, scale=10.0 ** (2 * (t % 2))) for t in range(steps)]

  def one_leaf(p, *gs):
    matrices = lambda x: np.asarray(x).reshape((-1,) + p.shape[-2:])
    init, update = jax.jit(tx.init), jax.jit(tx.update)
    per_matrix = []
    for i, x in enumerate(matrices(p)):
      state, us = init(x), []
      for g in gs:
        u, state = update(matrices(g)[i], state, x)
        x = x + np.asarray(u)
        us.append(np.asarray(u))
      per_matrix.append(np.stack(us))
    return np.stack(per_matrix, 1).reshape((steps,) + p.shape)

  stacked = jax.tree.map(one_leaf, params, *grads)
  return [jax.tree.map(lambda a: a[t], stacked) for t in range(steps)]


STACKED = {"experts": jnp.zeros((3, 24, 16)),          # [E, H, F], factored per expert
           "small_experts": jnp.zeros((3, 4, 16)),     # unfactored per expert
           "scanned_experts": jnp.zeros((2, 2, 8, 12))}  # [L, E, H, F]


def test_factored_rms_of_stacked_params_is_per_matrix():
  params = random_tree(STACKED, seed=3)
  ours = optimizers.scale_by_factored_rms(min_dim_size_to_factor=MIN_DIM)
  got, _ = run_steps(ours, params)
  want = per_slice(optax.scale_by_factored_rms(min_dim_size_to_factor=MIN_DIM), params)
  assert_trees_close(got, want)


def test_adafactor_of_stacked_params_is_per_expert_adafactor():
  # Clipping and the parameter scale too are per expert, so the whole update splits.
  params = random_tree(STACKED, seed=4)
  settings = dict(min_dim_size_to_factor=MIN_DIM, momentum=0.5, weight_decay_rate=1e-2)
  got, _ = run_steps(optimizers.adafactor(0.05, **settings), params)
  want = per_slice(optax.adafactor(0.05, **settings), params)
  assert_trees_close(got, want)
  # What optax.adafactor does instead with E=64 experts of [32, 64]: it factors the two
  # largest dims, (E, F), so v_col [H, F] is averaged over the experts.
  optax_state = optax.adafactor(0.1, min_dim_size_to_factor=8).init(
      {"w": jnp.zeros((64, 32, 64))})[0]
  assert optax_state.v_col["w"].shape == (32, 64)


def test_state_shapes_structure_and_sharding():
  e, h, f = 4, 16, 24
  params = {"moe": {"wi": jnp.zeros((e, h, f)), "wo": jnp.zeros((e, f, h))},
            "dense": jnp.zeros((h, f)), "norm": {"scale": jnp.zeros((h,))}}
  opt = optimizers.create_optimizer("adafactor", min_dim_size_to_factor=MIN_DIM,
                                    clip_grad_norm=1.0, momentum=0.9)
  state = jax.eval_shape(opt.tx.init, params)
  rms = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, optimizers.FactoredRmsState)) if isinstance(s, optimizers.FactoredRmsState)]
  assert len(rms) == 1
  rms = rms[0]
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(rms.v_row) == {"moe": {"wi": (e, h), "wo": (e, f)}, "dense": (h,),
                               "norm": {"scale": (1,)}}
  assert shapes(rms.v_col) == {"moe": {"wi": (e, f), "wo": (e, h)}, "dense": (f,),
                               "norm": {"scale": (1,)}}
  assert shapes(rms.v) == {"moe": {"wi": (1,), "wo": (1,)}, "dense": (1,),
                           "norm": {"scale": (h,)}}
  params_def = jax.tree.structure(params)
  for tree in (rms.v_row, rms.v_col, rms.v):
    assert jax.tree.structure(tree) == params_def

  # partitioning.optimizer_shardings shards each statistic like the dims it keeps.
  mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "model"), axis_types=(AxisType.Auto,) * 3)
  specs = {"moe": {"wi": P("expert", None, "model"), "wo": P("expert", "model", None)},
           "dense": P(None, "model"), "norm": {"scale": P()}}
  param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  shardings = partitioning.optimizer_shardings(state, params, param_shardings, mesh)
  (rms_sharding,) = [s for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(
      x, optimizers.FactoredRmsState)) if isinstance(s, optimizers.FactoredRmsState)]
  spec = lambda s: tuple(s.spec)
  assert spec(rms_sharding.v_row["moe"]["wi"]) == ("expert", None)
  assert spec(rms_sharding.v_col["moe"]["wi"]) == ("expert", "model")
  assert spec(rms_sharding.v_row["moe"]["wo"]) == ("expert", "model")
  assert spec(rms_sharding.v_col["dense"]) == ("model",)
  # The momentum is a params-shaped tree too: sharded exactly like the params.
  emas = [s for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(
      x, optax.EmaState)) if isinstance(s, optax.EmaState)]
  assert spec(emas[0].ema["moe"]["wi"]) == ("expert", None, "model")


def evaluate(schedule, steps):
  return np.asarray(jax.jit(schedule)(jnp.asarray(steps)))  # one compile, not one per op


def test_rsqrt_schedule():
  steps = np.array([0, 1, 500, 999, 1000, 1001, 4000, 250_000])
  flat = optimizers.rsqrt_schedule(2.0, warmup_steps=1000)
  want = 2.0 / np.sqrt(np.maximum(steps, 1000))
  np.testing.assert_allclose(evaluate(flat, steps), want, rtol=1e-6)
  linear = optimizers.rsqrt_schedule(2.0, warmup_steps=1000, linear_warmup=True)
  want = 2.0 * np.minimum(1.0, steps / 1000) / np.sqrt(np.maximum(steps, 1000))
  np.testing.assert_allclose(evaluate(linear, steps), want, rtol=1e-6)
  assert float(optimizers.rsqrt_schedule()(0)) == pytest.approx(0.01)  # t5x: 1/√10⁴
  assert float(optimizers.rsqrt_schedule(warmup_steps=0)(0)) == 1.0


def test_warmup_cosine_and_constant_schedules():
  steps = np.array([0, 50, 100, 150, 550, 1000, 2000])
  peak, end, warmup, decay = 3e-4, 3e-5, 100, 1000
  schedule = optimizers.warmup_cosine_schedule(peak, warmup, decay, end)
  progress = np.clip((steps - warmup) / (decay - warmup), 0.0, 1.0)
  cosine = end + (peak - end) * 0.5 * (1 + np.cos(np.pi * progress))
  want = np.where(steps < warmup, peak * steps / warmup, cosine)
  np.testing.assert_allclose(evaluate(schedule, steps), want, rtol=1e-5)
  assert float(optimizers.constant_schedule(0.3)(12345)) == pytest.approx(0.3)
  with pytest.raises(ValueError, match=r"optimizers.warmup_cosine_schedule.warmup_steps = 10 "
                     r"must be below optimizers.warmup_cosine_schedule.decay_steps = 10"):
    optimizers.warmup_cosine_schedule(1.0, 10, 10)


def test_adamw_decays_weight_matrices_only():
  # A scanned model's norm scales [L, H] and biases [L, N, D] have rank >= 2 but no decay.
  params = {"dense": {"kernel": jnp.ones((4, 3))}, "bias": jnp.ones((3,)),
            "layers": {"norm": {"scale": jnp.ones((2, 4))}, "query_bias": jnp.ones((2, 4, 3)),
                       "experts": {"wi": jnp.ones((2, 2, 4, 3))}}, "step_scalar": jnp.ones(())}
  assert optimizers.decay_mask(params) == {
      "dense": {"kernel": True}, "bias": False,
      "layers": {"norm": {"scale": False}, "query_bias": False, "experts": {"wi": True}},
      "step_scalar": False}
  opt = optimizers.create_optimizer("adamw", schedule=0.5, weight_decay=0.1)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(lambda g, p: opt.tx.update(g, opt.tx.init(p), p))(zero_grads, params)
  # Zero gradients leave only the decay: Δp = −lr · wd · p where decayed, 0 elsewhere.
  want = jax.tree.map(lambda p, m: -0.5 * 0.1 * p * m, params, optimizers.decay_mask(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, want)


def test_create_optimizer_schedule_and_global_norm_clipping():
  schedule = optimizers.warmup_cosine_schedule(1.0, 2, 10)
  opt = optimizers.create_optimizer("sgd", schedule=schedule, clip_grad_norm=0.5)
  assert opt.learning_rate_fn is schedule
  params = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
  grads = {"a": jnp.full((3,), 4.0), "b": jnp.full((2, 2), 4.0)}  # ‖g‖ = 4·√7
  state, update = opt.tx.init(params), jax.jit(opt.tx.update)
  for step in range(3):
    updates, state = update(grads, state, params)
    norm = float(optax.tree.norm(updates))
    assert norm == pytest.approx(0.5 * float(schedule(step)), rel=1e-5)
  assert optimizers.create_optimizer().learning_rate_fn(0) == pytest.approx(0.01)


@pytest.mark.parametrize("name, hint", [("adam", "did you mean 'adamw'"),
                                        ("adafacter", "did you mean 'adafactor'"),
                                        ("lion", r"valid names are adafactor, adamw, sgd\.")])
def test_unknown_optimizer_name(name, hint):
  with pytest.raises(ValueError, match=r"valid names are adafactor, adamw, sgd") as info:
    optimizers.create_optimizer(name, schedule=0.1)
  assert info.match(hint)


def test_adamw_without_schedule_is_an_error():
  with pytest.raises(ValueError, match="needs a learning-rate schedule"):
    optimizers.create_optimizer("adamw")


def test_gin_configures_the_optimizer():
  try:
    gin.parse_config("""
        create_optimizer.name = "adafactor"
        create_optimizer.schedule = @rsqrt_schedule()
        rsqrt_schedule.base_learning_rate = 2.0
        rsqrt_schedule.warmup_steps = 100
        adafactor.min_dim_size_to_factor = 8
    """)
    opt = optimizers.create_optimizer()
  finally:
    gin.clear_config()
  assert float(opt.learning_rate_fn(0)) == pytest.approx(0.2)
  state = opt.tx.init({"w": jnp.zeros((8, 16))})
  assert state[0].v_row["w"].shape == (8,)  # min_dim_size_to_factor reached the factory
