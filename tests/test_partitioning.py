"""Sharded = unsharded on 8 simulated CPU devices; shard shapes follow the rules; the MoE
token exchange is an all-to-all; bad meshes fail before compiling."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, expert_parallel, partitioning as part
from moe_jax.dry_run import collective_counts
from moe_jax.moe_layer import MoeLayer
from moe_jax.routing import ExpertChoiceRouter, TokenChoiceRouter

MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]  # (data, expert, model)
RULES = part.standard_rules()
TOL = dict(atol=2e-5, rtol=2e-5)  # float32; only the order of reductions differs


def mesh_of(d, e, m):
  return part.make_mesh(data=d, expert=e, model=m)


def test_mesh_sizes_and_errors():
  assert part.mesh_shape(8, data=-1, expert=4) == (1, 2, 4, 1)
  assert part.mesh_shape(64, data=16, expert=-1, model=2) == (1, 16, 2, 2)
  assert part.parse_mesh("data:16,expert:16,model:4") == dict(data=16, expert=16, model=4)
  with pytest.raises(ValueError, match="must multiply to the device count"):
    part.mesh_shape(8, data=2, expert=2, model=1)
  with pytest.raises(ValueError, match="do not divide"):
    part.mesh_shape(8, data=-1, expert=3)
  with pytest.raises(ValueError, match="mesh axis must be one of"):
    part.parse_mesh("pipeline:2")
  mesh = mesh_of(2, 4, 1)
  assert dict(mesh.shape) == dict(replica=1, data=2, expert=4, model=1)


def layer_and_params(router, dispatch, **kwargs):
  layer = MoeLayer(router, 8, 32, activation="swiglu", dispatch=dispatch,
                   train_capacity_factor=1.0, eval_capacity_factor=1.0, **kwargs)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16))
  mask = jnp.ones((8, 16)).at[3, 10:].set(0)
  params = layer.init(jax.random.PRNGKey(1), x, mask, True)["params"]
  return layer, x, mask, params


def grouped(layer, mesh):
  """The layer as a run on `mesh` configures it (runs/pretrain.gin: MOE_LAYOUT and
  NUM_EXPERT_PARTITIONS from MESH)."""
  return layer.clone(layout="grouped",
                     num_expert_partitions=part.logical_axis_size(mesh, RULES, "expert"))


def layer_loss(layer, params, x, mask):
  y, aux = layer.apply({"params": params}, x, mask, True)
  return jnp.sum(y * jnp.cos(y)) + aux.aux_loss + aux.z_loss, (y, aux)


@pytest.mark.parametrize("mesh_dims", MESHES)
@pytest.mark.parametrize("router_kind,dispatch", [("token", "gather"), ("token", "einsum"),
                                                  ("expert", "gather")])
def test_moe_layer_sharded_equals_single_device(mesh_dims, router_kind, dispatch):
  router = (TokenChoiceRouter(2) if router_kind == "token" else ExpertChoiceRouter(2))
  layer, x, mask, params = layer_and_params(router, dispatch)
  grad = jax.jit(jax.grad(functools.partial(layer_loss, layer), argnums=(0, 1), has_aux=True))
  (g_params, g_x), (y, aux) = grad(params, x, mask)
  if router_kind == "token":  # capacity factor 1.0: drops are exercised
    assert float(aux.metrics["dropped_fraction"]) > 0

  mesh = mesh_of(*mesh_dims)
  (s_params, s_x), (s_y, s_aux) = sharded_grad(grouped(layer, mesh), mesh, params, x, mask)
  np.testing.assert_allclose(s_y, y, **TOL)
  np.testing.assert_allclose(s_aux.aux_loss, aux.aux_loss, **TOL)
  np.testing.assert_allclose(s_aux.metrics["expert_load_after"], aux.metrics["expert_load_after"])
  np.testing.assert_allclose(s_x, g_x, **TOL)
  for a, b in zip(jax.tree.leaves(nn.meta.unbox(s_params)), jax.tree.leaves(nn.meta.unbox(g_params))):
    np.testing.assert_allclose(a, b, **TOL)


def sharded_grad(layer, mesh, params, x, mask):
  grad = jax.jit(jax.grad(functools.partial(layer_loss, layer), argnums=(0, 1), has_aux=True))
  batch = jax.sharding.NamedSharding(mesh, jax.P(part.BATCH_AXES))
  with part.activate(mesh, RULES):
    p = jax.device_put(params, part.logical_shardings(params, mesh, RULES))
    return grad(p, jax.device_put(x, batch), jax.device_put(mask, batch))


def compiled_grad_hlo(router, dispatch, mesh) -> str:
  """The optimised HLO of the layer's gradient, laid out for `mesh`."""
  layer, x, mask, params = layer_and_params(router, dispatch)
  layer = grouped(layer, mesh)
  grad = jax.jit(jax.grad(lambda p, x: layer_loss(layer, p, x, mask)[0]))
  with part.activate(mesh, RULES):
    p = jax.device_put(params, part.logical_shardings(params, mesh, RULES))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(part.BATCH_AXES)))
    return grad.lower(p, xs).compile().as_text()


DROPLESS_MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]


@pytest.fixture
def ragged_on_cpu(monkeypatch):
  """Runs the ragged_all_to_all transport on XLA:CPU, which lacks the collective, with an
  emulation of jax.lax.ragged_all_to_all's semantics built from all-gathers."""
  monkeypatch.setattr(expert_parallel, "expert_parallel_dropless", functools.partial(
      expert_parallel.expert_parallel_dropless,
      ragged_all_to_all=expert_parallel.emulated_ragged_all_to_all))


TRANSPORT_CASES = ([("all_gather", dims) for dims in DROPLESS_MESHES] +
                   [("ragged_all_to_all", dims) for dims in [(2, 4, 1), (1, 4, 2), (2, 2, 2)]])


@pytest.mark.parametrize("transport,mesh_dims", TRANSPORT_CASES)
def test_dropless_expert_parallel_equals_single_device(transport, mesh_dims, request):
  """Dropless expert parallelism (expert_parallel.py) on every mesh shape and with both
  transports: the same outputs, losses, metrics and gradients as the single-device dropless
  layer, and nothing dropped."""
  if transport == "ragged_all_to_all":
    request.getfixturevalue("ragged_on_cpu")
  layer, x, mask, params = layer_and_params(TokenChoiceRouter(2), "dropless")
  grad = jax.jit(jax.grad(functools.partial(layer_loss, layer), argnums=(0, 1), has_aux=True))
  (g_params, g_x), (y, aux) = grad(params, x, mask)
  mesh = mesh_of(*mesh_dims)
  (s_params, s_x), (s_y, s_aux) = sharded_grad(grouped(layer, mesh), mesh, params, x, mask)
  # float32; measured max |Δ| 2e-7 (outputs) and 2e-6 (parameter gradients, sums over 128
  # tokens): only the order of additions differs.
  np.testing.assert_allclose(s_y, y, **TOL)
  np.testing.assert_allclose(s_x, g_x, **TOL)
  for a, b in zip(jax.tree.leaves(nn.meta.unbox(s_params)), jax.tree.leaves(nn.meta.unbox(g_params))):
    np.testing.assert_allclose(a, b, **TOL)
  np.testing.assert_allclose(s_aux.aux_loss, aux.aux_loss, **TOL)
  np.testing.assert_allclose(s_aux.z_loss, aux.z_loss, **TOL)
  for name, value in aux.metrics.items():
    np.testing.assert_allclose(s_aux.metrics[name], value, **TOL, err_msg=name)
  # Nothing dropped: every real token's k = 2 assignments reached an expert (numpy count).
  assert float(s_aux.metrics["dropped_fraction"]) == 0.0
  assert float(s_aux.metrics["overflow_fraction"]) == 0.0
  assert float(np.sum(s_aux.metrics["expert_load_after"])) == 2 * float(np.sum(np.asarray(mask)))


@pytest.mark.parametrize("mesh_dims", [(2, 4, 1), (1, 4, 2)])
def test_dropless_expert_parallel_gathers_tokens_not_expert_weights(mesh_dims):
  hlo = compiled_grad_hlo(TokenChoiceRouter(2), "dropless", mesh_of(*mesh_dims))
  counts = collective_counts(hlo)
  assert counts["all-gather"] >= 1 and counts["reduce-scatter"] >= 1, counts
  # Weights [8, 16, 32] / [8, 32, 16] (or their model shards [8, 16, 16]) are never gathered:
  # every gathered operand has the tokens' row count (groups of 16 tokens), not E = 8 rows.
  for shape in re.findall(r"= f32\[([0-9,]*)\]\{[^}]*\} all-gather(?:-start)?\(", hlo):
    assert not shape.startswith("8,"), f"an expert weight tensor is all-gathered: [{shape}]"


def _numpy_overflow(expert_index, mask, mesh_dims, num_experts, factor):
  """Assignments that do not fit the receive buffers, counted with numpy from the routing:
  the devices of one expert group (same data index) pool their tokens; expert device d's
  buffer holds R = min(EP·T_l·min(k, E_l), ceil(f·k·T_l) rounded up to 8) rows."""
  data, ep, _ = mesh_dims
  g, s, k = expert_index.shape
  t_l = g * s // (data * ep)
  e_l = num_experts // ep
  rows = min(ep * t_l * min(k, e_l), -(-int(np.ceil(factor * k * t_l)) // 8) * 8)
  idx = np.where(np.asarray(mask)[..., None] > 0, expert_index, -1).reshape(data, -1)
  total = 0
  for group in idx:
    for d in range(ep):
      n = int(np.sum((group >= d * e_l) & (group < (d + 1) * e_l)))
      total += max(n - rows, 0)
  return total


@pytest.mark.parametrize("transport", ["all_gather", "ragged_all_to_all"])
def test_receive_buffer_bound_counts_overflow_like_numpy(transport, request):
  """receive_buffer_factor=1.0 with a router biased to experts 0-1: device 0's buffer
  overflows; the layer's overflow_fraction equals a numpy count over the routing (both
  transports fill a receiver's R rows and count the rest)."""
  if transport == "ragged_all_to_all":
    request.getfixturevalue("ragged_on_cpu")
  layer, x, mask, params = layer_and_params(TokenChoiceRouter(2), "dropless",
                                            receive_buffer_factor=1.0)
  params = nn.meta.unbox(params)
  kernel = params["router"]["logits"]["kernel"].at[:, :2].add(5.0)
  params["router"]["logits"]["kernel"] = kernel
  mesh_dims = (2, 4, 1)
  mesh = mesh_of(*mesh_dims)
  (_, _), (_, aux) = sharded_grad(grouped(layer, mesh), mesh, params, x, mask)
  logits = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)  # [G, S, E]
  top2 = np.argsort(-logits, axis=-1, kind="stable")[..., :2]
  expected = _numpy_overflow(top2, mask, mesh_dims, 8, 1.0)
  admitted = 2 * float(np.sum(np.asarray(mask)))
  assert expected > 0
  np.testing.assert_allclose(float(aux.metrics["overflow_fraction"]), expected / admitted,
                             rtol=1e-6)
  # The routing metrics are unchanged by the transport: overflow is reported on its own.
  assert float(aux.metrics["dropped_fraction"]) == 0.0


def test_shard_shapes_follow_the_rules():
  layer, x, mask, params = layer_and_params(TokenChoiceRouter(2), "gather")
  mesh = mesh_of(1, 4, 2)
  with part.activate(mesh, RULES):
    p = jax.device_put(params, part.logical_shardings(params, mesh, RULES))
  p = nn.meta.unbox(p)
  shard = lambda a: a.sharding.shard_shape(a.shape)
  # [E, H, F] over expert × model (2D); the router [H, E] is replicated.
  assert shard(p["experts"]["wi"]) == (2, 16, 16)
  assert shard(p["experts"]["wo"]) == (2, 16, 16)
  assert shard(p["router"]["logits"]["kernel"]) == (16, 8)  # tiny: replicated


@pytest.mark.parametrize("router_kind,dispatch", [("token", "gather"), ("token", "einsum"),
                                                  ("expert", "gather")])
def test_token_exchange_is_all_to_all_without_gathering_expert_weights(router_kind, dispatch):
  router = TokenChoiceRouter(2) if router_kind == "token" else ExpertChoiceRouter(2)
  hlo = compiled_grad_hlo(router, dispatch, mesh_of(2, 4, 1))
  counts = collective_counts(hlo)
  assert counts["all-to-all"] >= 2, counts  # to the experts and back (and in the backward)
  full_weight = re.compile(r"f32\[8,16,32\]\{[^}]*\} all-gather")
  assert not full_weight.search(hlo), "a full expert weight tensor is all-gathered"
  # Routing stays on each group's device: nothing at all is all-gathered (top-k by argmax
  # rounds or a sort; XLA's TopK made GSPMD gather every group's scores).
  assert counts["all-gather"] == 0, counts


def _tiny_batch(lm):
  toks = jax.random.randint(jax.random.PRNGKey(0), (8, 16), 1, lm.module.vocab_size)
  batch = dict(decoder_input_tokens=toks, decoder_target_tokens=jnp.roll(toks, -1, 1))
  if getattr(lm, "features", None) == "encoder_decoder":
    batch["encoder_input_tokens"] = jnp.flip(toks, 1)
  return toks, batch


def _loss_and_grads(lm, deterministic):
  return jax.jit(jax.value_and_grad(lambda v, b: lm.loss(v, b, deterministic=deterministic)[0]))


@functools.lru_cache(maxsize=None)
def _single_device(preset, bindings, deterministic):
  """Loss and gradients of the packed (single-device) model: computed once per worker and
  shared by the mesh cases."""
  lm = config.load_model([preset], list(bindings))
  toks, batch = _tiny_batch(lm)
  variables = jax.jit(lm.module.init)(jax.random.PRNGKey(1), toks)
  loss, grads = _loss_and_grads(lm, deterministic)(variables, batch)
  return float(loss), jax.tree.map(np.asarray, nn.meta.unbox(grads))


def _check_sharded_model(preset, bindings, mesh_dims, deterministic):
  """The preset with the layout a run on the mesh gets (MOE_LAYOUT, NUM_EXPERT_PARTITIONS),
  initialised sharded: loss and gradients equal the single-device model's."""
  loss, grads = _single_device(preset, tuple(bindings), deterministic)
  mesh = mesh_of(*mesh_dims)
  lm = config.load_model([preset], list(bindings) + [
      "MOE_LAYOUT = 'grouped'", f"NUM_EXPERT_PARTITIONS = {mesh_dims[1]}"])
  part.validate(lm.module, mesh, RULES, batch_size=8)
  toks, batch = _tiny_batch(lm)
  sharded = part.init_sharded(lm.module, mesh, RULES, toks, rng=jax.random.PRNGKey(1))
  with part.activate(mesh, RULES):
    s_loss, s_grads = _loss_and_grads(lm, deterministic)(sharded,
                                                         part.global_batch(batch, mesh, RULES))
  np.testing.assert_allclose(s_loss, loss, **TOL)
  for a, b in zip(jax.tree.leaves(nn.meta.unbox(s_grads)), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  return sharded


@pytest.mark.parametrize("mesh_dims", MESHES)
def test_tiny_model_sharded_equals_single_device(mesh_dims):
  sharded = _check_sharded_model("gin_configs/models/st_moe_decoder_only_tiny.gin", ["NUM_EXPERTS = 8"],
                                 mesh_dims, deterministic=True)
  wi = nn.meta.unbox(sharded)["params"]["layers"]["block_3"]["moe"]["experts"]["wi"]
  assert wi.sharding.shard_shape(wi.shape)[1] == 8 // mesh_dims[1]  # [layers, E, H, F]


@pytest.mark.parametrize("mesh_dims", MESHES)
def test_tiny_encoder_decoder_sharded_equals_single_device(mesh_dims):
  """Switch (top-1) in both stacks of the encoder-decoder, one sparse layer each (the fastest
  compile with every sub-layer), in training mode."""
  sharded = _check_sharded_model("gin_configs/models/switch_base_8_tiny.gin",
                                 ["NUM_LAYERS = 1", "MOE_EVERY = 1"], mesh_dims,
                                 deterministic=False)
  for stack in ("encoder", "decoder"):
    wi = nn.meta.unbox(sharded)["params"][stack]["layers_0"]["moe"]["experts"]["wi"]
    assert wi.sharding.shard_shape(wi.shape)[0] == 8 // mesh_dims[1]  # [E, H, F]


@pytest.mark.parametrize("mesh_dims", DROPLESS_MESHES)
def test_tiny_mixtral_dropless_sharded_equals_single_device(mesh_dims):
  """The tiny Mixtral preset (dropless, every layer sparse, GQA), in training mode: loss and
  gradients with dropless expert parallelism on each mesh equal the single-device model's."""
  _check_sharded_model("gin_configs/models/mixtral_8x7b_tiny.gin", ["FSDP = False"],
                       mesh_dims, deterministic=False)


def test_bad_layouts_fail_before_compiling():
  module = config.load_model(["gin_configs/models/glam_tiny.gin"], ["NUM_EXPERTS = 6"]).module
  with pytest.raises(ValueError, match="num_experts=6 is not divisible by the 'expert' mesh axis"):
    part.validate(module, mesh_of(2, 4, 1), RULES, batch_size=8)
  with pytest.raises(ValueError, match="batch size 6 is not divisible"):
    part.validate(module, mesh_of(8, 1, 1), RULES, batch_size=6)
  wrong = config.load_model(["gin_configs/models/mixtral_8x7b_tiny.gin"],
                            ["MOE_LAYOUT = 'grouped'", "NUM_EXPERT_PARTITIONS = 2"]).module
  with pytest.raises(ValueError, match="num_expert_partitions=2 but the mesh splits the "
                     "experts over 4 devices: set NUM_EXPERT_PARTITIONS = 4"):
    part.validate(wrong, mesh_of(2, 4, 1), RULES, batch_size=8)
  no_ragged = config.load_model(["gin_configs/models/mixtral_8x7b_tiny.gin"],
                                ["MOE_LAYOUT = 'grouped'", "NUM_EXPERT_PARTITIONS = 4",
                                 "DROPLESS_TRANSPORT = 'ragged_all_to_all'"]).module
  with pytest.raises(ValueError, match=r"transport='ragged_all_to_all' needs a backend whose "
                     r"XLA implements ragged-all-to-all \(gpu, tpu, cuda, rocm\); this one is "
                     r"'cpu'. Use transport='all_gather' or 'auto'."):
    part.validate(no_ragged, mesh_of(2, 4, 1), RULES, batch_size=8)
  with pytest.raises(ValueError, match=r"receive_buffer_factor must be None .* or a finite "
                     r"number >= 1 .* got 0.5"):
    MoeLayer(TokenChoiceRouter(2), 8, 8, dispatch="dropless", receive_buffer_factor=0.5)
  with pytest.raises(ValueError, match=r"transport must be one of \('auto', 'all_gather'"):
    MoeLayer(TokenChoiceRouter(2), 8, 8, dispatch="dropless", transport="nccl")
  with pytest.raises(ValueError, match=r"layout must be one of \('packed', 'grouped'\)"):
    MoeLayer(TokenChoiceRouter(2), 8, 8, layout="sharded")


@pytest.mark.parametrize("fsdp", [False, True])
def test_every_parameter_shard_shape_follows_the_rules(fsdp):
  """Expected shard shapes worked out from the rules table by hand, for every parameter."""
  lm = config.load_model(["gin_configs/models/st_moe_decoder_only_tiny.gin"], ["NUM_EXPERTS = 8"])
  mesh, rules = mesh_of(2, 2, 2), part.standard_rules(fsdp)
  boxed = part.init_sharded(lm.module, mesh, rules, jnp.ones((8, 16), jnp.int32))["params"]
  table, sizes = dict(rules), dict(mesh.shape)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) > 20
  split_somewhere = 0
  for leaf in leaves:
    array = leaf.value
    expected = []
    for dim, name in zip(array.shape, leaf.names):
      axes = table.get(name) if name else None
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      expected.append(dim // int(np.prod([sizes[a] for a in axes])))
    assert array.sharding.shard_shape(array.shape) == tuple(expected), leaf.names
    split_somewhere += tuple(expected) != array.shape
  assert split_somewhere >= (len(leaves) * 2 // 3 if fsdp else 10)
