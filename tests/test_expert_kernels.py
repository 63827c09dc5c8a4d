"""Tests for moe_jax.expert_kernels against a naive numpy loop over experts/rows.

Forward outputs and the gradients wrt x, w_in, w_gate, w_out (for a fixed random
output cotangent) are compared with float64 numpy references computed with
explicit per-expert, per-row loops and hand-derived backward formulas.
"""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from moe_jax import expert_kernels as ek

H, F = 8, 16


# ----------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------
def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


NP_ACT = {
    # name: (jax activation, numpy f, numpy f')
    "relu": (jax.nn.relu, lambda v: np.maximum(v, 0.0), lambda v: (v > 0).astype(v.dtype)),
    "silu": (jax.nn.silu, lambda v: v * _sigmoid(v),
             lambda v: _sigmoid(v) * (1.0 + v * (1.0 - _sigmoid(v)))),
}


def _np_row_ffn(x, dy, wi, wg, wo, act):
  """One token row x: [H] through one expert; returns y and grads for cotangent dy."""
  _, f, df = NP_ACT[act]
  h = x @ wi
  if wg is None:
    a = f(h)
    y = a @ wo
    da = wo @ dy
    dh = da * df(h)
    return y, wi @ dh, np.outer(x, dh), None, np.outer(a, dy)
  g = x @ wg
  a = f(g) * h
  y = a @ wo
  da = wo @ dy
  dh = da * f(g)
  dg = da * h * df(g)
  return y, wi @ dh + wg @ dg, np.outer(x, dh), np.outer(x, dg), np.outer(a, dy)


def _np_apply(rows_by_expert, x, dy, wi, wg, wo, act):
  """rows_by_expert[e] = list of row indices (into flattened x) owned by e."""
  y = np.zeros_like(x)
  dx = np.zeros_like(x)
  dwi, dwo = np.zeros_like(wi), np.zeros_like(wo)
  dwg = None if wg is None else np.zeros_like(wg)
  for e, rows in enumerate(rows_by_expert):
    for i in rows:
      yi, dxi, dwii, dwgi, dwoi = _np_row_ffn(
          x[i], dy[i], wi[e], None if wg is None else wg[e], wo[e], act)
      y[i], dx[i] = yi, dxi
      dwi[e] += dwii
      dwo[e] += dwoi
      if wg is not None:
        dwg[e] += dwgi
  return y, (dx, dwi, dwg, dwo)


def _np_capacity(x, counts, dy, wi, wg, wo, act):
  E, C, _ = x.shape
  rows = [[e * C + c for c in range(int(counts[e]))] for e in range(E)]
  y, (dx, *dws) = _np_apply(rows, x.reshape(E * C, H), dy.reshape(E * C, H), wi, wg, wo, act)
  return y.reshape(E, C, H), (dx.reshape(E, C, H), *dws)


def _np_ragged(x, group_sizes, dy, wi, wg, wo, act):
  ends = np.cumsum(group_sizes)
  starts = ends - group_sizes
  rows = [list(range(s, e)) for s, e in zip(starts, ends)]
  return _np_apply(rows, x, dy, wi, wg, wo, act)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _weights(rng, E, gated):
  wi = rng.normal(size=(E, H, F)) * 0.4
  wg = rng.normal(size=(E, H, F)) * 0.4 if gated else None
  wo = rng.normal(size=(E, F, H)) * 0.4
  return wi, wg, wo


@functools.partial(jax.jit, static_argnames=("act", "implementation"))
def _capacity_vjp(x, counts, wi, wg, wo, dy, act, implementation):
  """Output and (x, w_in, w_gate, w_out) cotangents for output cotangent dy."""
  f = lambda x, wi, wg, wo: ek.capacity_ffn(x, wi, wg, wo, act, counts, implementation)
  y, pull = jax.vjp(f, x, wi, wg, wo)
  return y, pull(dy)


@functools.partial(jax.jit, static_argnames=("act", "implementation"))
def _ragged_vjp(x, group_sizes, wi, wg, wo, dy, act, implementation):
  f = lambda x, wi, wg, wo: ek.ragged_ffn(x, group_sizes, wi, wg, wo, act, implementation)
  y, pull = jax.vjp(f, x, wi, wg, wo)
  return y, pull(dy)


def _f32(*arrays):
  return tuple(None if a is None else jnp.asarray(a, jnp.float32) for a in arrays)


def _check(y, grads, y_ref, grads_ref):
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-4, atol=2e-4)
  for name, g, r in zip(("dx", "dw_in", "dw_gate", "dw_out"), grads, grads_ref):
    if r is None:
      assert g is None, name
      continue
    np.testing.assert_allclose(np.asarray(g), r, rtol=2e-4, atol=5e-4, err_msg=name)


ACTS = [("relu", False), ("silu", True)]  # relu FFN and swiglu (silu-gated)
ACT_IDS = ["relu", "swiglu"]


# ----------------------------------------------------------------------------
# capacity_ffn
# ----------------------------------------------------------------------------
CAPACITY_COUNTS = {
    "mixed": [0, 5, 12, 9],   # an empty expert, a full one, partial ones
    "full": [12, 12, 12, 12],  # counts == C
    "one_row": [1, 0, 0, 2],
}


@pytest.mark.parametrize("act,gated", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("implementation", ["einsum", "scan"])
@pytest.mark.parametrize("counts_name", list(CAPACITY_COUNTS) + ["none"])
def test_capacity_ffn(act, gated, implementation, counts_name):
  rng = np.random.default_rng(0)
  E, C = 4, 12
  wi, wg, wo = _weights(rng, E, gated)
  if counts_name == "none":
    counts = np.full(E, C)
  else:
    counts = np.asarray(CAPACITY_COUNTS[counts_name])
  valid = np.arange(C)[None, :, None] < counts[:, None, None]
  x = rng.normal(size=(E, C, H)) * valid  # empty slots are zero on input
  dy = rng.normal(size=(E, C, H))
  jax_act = NP_ACT[act][0]

  counts_j = None if counts_name == "none" else jnp.asarray(counts, jnp.int32)
  y, grads = _capacity_vjp(*_f32(x), counts_j, *_f32(wi, wg, wo, dy), act=jax_act,
                           implementation=implementation)
  y_ref, grads_ref = _np_capacity(x, counts, dy, wi, wg, wo, act)
  _check(y, grads, y_ref, grads_ref)
  if counts_name != "none":
    assert np.all(np.asarray(y)[~np.broadcast_to(valid, y.shape)] == 0)
    assert np.all(np.asarray(grads[0])[~np.broadcast_to(valid, y.shape)] == 0)


def test_capacity_counts_traced_under_jit():
  """counts as a jit argument (data-dependent) with the scan implementation."""
  rng = np.random.default_rng(1)
  E, C = 3, 10
  wi, _, wo = _weights(rng, E, False)
  counts = np.array([10, 0, 4])
  x = rng.normal(size=(E, C, H)) * (np.arange(C)[None, :, None] < counts[:, None, None])
  dy = rng.normal(size=(E, C, H))

  @jax.jit
  def grads(x, wi, wo, counts):
    f = lambda x, wi, wo: jnp.sum(
        ek.capacity_ffn(x, wi, None, wo, jax.nn.gelu, counts, "scan") * dy)
    return jax.grad(f, argnums=(0, 1, 2))(x, wi, wo)

  got = grads(jnp.float32(x), jnp.float32(wi), jnp.float32(wo), jnp.int32(counts))
  ref = jax.grad(lambda x, wi, wo: jnp.sum(
      ek.capacity_ffn(x, wi, None, wo, jax.nn.gelu, jnp.int32(counts), "einsum") * dy),
      argnums=(0, 1, 2))(jnp.float32(x), jnp.float32(wi), jnp.float32(wo))
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_capacity_nongated_act0_nonzero_is_masked():
  """act(0) != 0 (sigmoid): rows beyond counts must still be zero."""
  rng = np.random.default_rng(2)
  E, C = 2, 8
  wi, _, wo = _weights(rng, E, False)
  counts = jnp.array([3, 0], jnp.int32)
  x = jnp.asarray(rng.normal(size=(E, C, H)) * (np.arange(C)[None, :, None] < 3 * np.array([1, 0])[:, None, None]), jnp.float32)
  for impl in ("einsum", "scan"):
    y = ek.capacity_ffn(x, jnp.float32(wi), None, jnp.float32(wo), jax.nn.sigmoid, counts, impl)
    assert np.all(np.asarray(y)[0, 3:] == 0) and np.all(np.asarray(y)[1] == 0)


# ----------------------------------------------------------------------------
# ragged_ffn
# ----------------------------------------------------------------------------
RAGGED_CASES = {
    # name: (M, group_sizes)
    "mixed_with_padding": (40, [3, 0, 17, 9]),     # rows 29..39 are padding
    "all_in_first": (40, [40, 0, 0, 0]),
    "all_in_last": (40, [0, 0, 0, 40]),
    "all_empty": (40, [0, 0, 0, 0]),
    "even": (40, [10, 10, 10, 10]),
    "multi_chunk": (200, [0, 150, 3, 0, 40, 7, 0, 0]),  # groups span several chunks
    "multi_chunk_tail": (200, [1, 2, 0, 0, 0, 0, 0, 190]),  # last chunk clamped at M
}


@pytest.mark.parametrize("act,gated", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("implementation", ["ragged_dot", "chunked"])
@pytest.mark.parametrize("case", list(RAGGED_CASES))
def test_ragged_ffn(act, gated, implementation, case):
  M, group_sizes = RAGGED_CASES[case]
  group_sizes = np.asarray(group_sizes)
  E = len(group_sizes)
  rng = np.random.default_rng(3)
  wi, wg, wo = _weights(rng, E, gated)
  x = rng.normal(size=(M, H))
  dy = rng.normal(size=(M, H))
  jax_act = NP_ACT[act][0]
  gs = jnp.asarray(group_sizes, jnp.int32)  # traced: one compile per shape
  y, grads = _ragged_vjp(*_f32(x), gs, *_f32(wi, wg, wo, dy), act=jax_act,
                         implementation=implementation)
  y_ref, grads_ref = _np_ragged(x, group_sizes, dy, wi, wg, wo, act)
  _check(y, grads, y_ref, grads_ref)
  total = int(group_sizes.sum())
  assert np.all(np.asarray(y)[total:] == 0)
  assert np.all(np.asarray(grads[0])[total:] == 0)


def test_ragged_group_sizes_traced_random():
  """One compiled function, several random group_sizes passed as jit arguments."""
  rng = np.random.default_rng(4)
  E, M = 6, 96
  wi, wg, wo = (jnp.asarray(w, jnp.float32) for w in _weights(rng, E, True))
  x = rng.normal(size=(M, H))
  dy = rng.normal(size=(M, H))

  @jax.jit
  def run(x, gs, wi, wg, wo):
    f = lambda x, wi, wg, wo: jnp.sum(
        ek.ragged_ffn(x, gs, wi, wg, wo, jax.nn.silu, "chunked") * dy)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3))(x, wi, wg, wo)

  for trial in range(4):
    total = int(rng.integers(0, M + 1))
    gs = np.bincount(rng.integers(0, E, total), minlength=E) if total else np.zeros(E, int)
    if trial == 0:
      gs = np.zeros(E, int)
      gs[2] = M
    _, grads = run(jnp.float32(x), jnp.int32(gs), wi, wg, wo)
    _, grads_ref = _np_ragged(x, gs, dy, *(np.asarray(w, np.float64) for w in (wi, wg, wo)), "silu")
    for g, r in zip(grads, grads_ref):
      np.testing.assert_allclose(np.asarray(g), r, rtol=2e-4, atol=5e-4)


# ----------------------------------------------------------------------------
# misc
# ----------------------------------------------------------------------------
def test_buckets_cover_limit():
  for limit in (1, 5, 12, 80, 160, 1280, 2048):
    b = ek._buckets(limit)
    assert b[-1] == limit and list(b) == sorted(set(b)) and len(b) <= ek._MAX_BUCKETS
    # bucket index picks the smallest bucket that holds n rows
    for n in range(1, limit + 1, max(1, limit // 37)):
      k = int(ek._bucket_index(jnp.int32(n), b))
      assert b[k] >= n and (k == 0 or b[k - 1] < n)


def test_auto_matches_cpu_choice():
  rng = np.random.default_rng(5)
  wi, wg, wo = _f32(*_weights(rng, 4, True))
  x, dy = _f32(rng.normal(size=(40, H)), rng.normal(size=(40, H)))
  gs = jnp.array([3, 0, 17, 9], jnp.int32)
  auto = ek.ragged_ffn(x, gs, wi, wg, wo, jax.nn.silu)
  want = "chunked" if jax.default_backend() == "cpu" else "ragged_dot"
  np.testing.assert_allclose(auto, ek.ragged_ffn(x, gs, wi, wg, wo, jax.nn.silu, want),
                             rtol=1e-5, atol=1e-5)
  xc = x[:36].reshape(4, 9, H)
  counts = jnp.array([9, 0, 4, 9], jnp.int32)
  xc = jnp.where(jnp.arange(9)[None, :, None] < counts[:, None, None], xc, 0)
  want = "scan" if jax.default_backend() == "cpu" else "einsum"
  np.testing.assert_allclose(ek.capacity_ffn(xc, wi, wg, wo, jax.nn.silu, counts),
                             ek.capacity_ffn(xc, wi, wg, wo, jax.nn.silu, counts, want),
                             rtol=1e-5, atol=1e-5)


def test_unknown_implementation_raises():
  x = jnp.zeros((2, 4, H))
  w = jnp.zeros((2, H, F))
  with pytest.raises(ValueError):
    ek.capacity_ffn(x, w, None, jnp.zeros((2, F, H)), jax.nn.relu, implementation="nope")
  with pytest.raises(ValueError):
    ek.ragged_ffn(x[0], jnp.array([4, 0]), w, None, jnp.zeros((2, F, H)), jax.nn.relu,
                  implementation="nope")
